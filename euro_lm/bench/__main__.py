"""`python -m euro_lm.bench`: the train-step benchmark, `euro_lm.bench.train_step`."""

from euro_lm import cli
from euro_lm.bench import train_step

if __name__ == '__main__':
  cli.run(train_step.main)
