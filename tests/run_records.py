"""Reading a training run's outputs in tests: per-step metrics and checkpoint steps."""

import json
import os


def step_records(workdir):
  """{step: (loss, grad_norm, learning_rate)} from metrics.jsonl, the last record of each
  step; a line still being written is left out."""
  records = {}
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return records
  with open(path) as f:
    for line in f:
      if not line.endswith('\n'):
        break
      r = json.loads(line)
      if 'loss' in r:
        records[r['step']] = (r['loss'], r['grad_norm'], r['learning_rate'])
  return records


def step_dirs(workdir):
  """The entries of checkpoints/ (step directories, and any unfinished save), sorted."""
  return sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
