"""`python -m euro_lm.bench`: the train-step benchmark, `euro_lm.bench.train_step`."""

from absl import app

from euro_lm.bench import train_step

if __name__ == '__main__':
  app.run(train_step.main)
