"""Benchmarks: each module is a command line that prints a table (BENCHMARKS.md has results).

`python -m euro_lm.bench` is the train-step benchmark (`euro_lm.bench.train_step`).
"""
