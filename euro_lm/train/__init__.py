"""Optimizer, train state, pure train/eval steps and the training loop."""
