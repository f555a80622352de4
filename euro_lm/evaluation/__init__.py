"""Evaluating checkpoints: per-language scores on held-out text (`held_out`)."""
