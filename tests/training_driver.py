"""Runs a small training job in its own process, optionally with an injected fault.

`python tests/training_driver.py WORKDIR OVERRIDES_JSON [--kill_at_commit=N]
[--file_size_limit=BYTES]`: the tiny config with the dotted overrides ('train.steps': 20),
trained in WORKDIR as `python -m euro_lm.train` would. Faults:
  --kill_at_commit=N    SIGKILL this process once step N's checkpoint is written, just
                        before Orbax commits it: a node dying in the middle of an async save.
  --file_size_limit=B   no file may grow past B bytes (RLIMIT_FSIZE): writes fail as on a
                        full disk.
"""

import argparse
import json
import os
import resource
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update('jax_threefry_partitionable', True)

from configs import tiny  # noqa: E402


def tiny_config(overrides):
  config = tiny.get_config()
  config.update_from_flattened_dict(overrides)
  return config


def kill_at_commit(step):
  from orbax.checkpoint._src.path import atomicity

  commit = atomicity.on_commit_callback

  async def commit_or_die(tmp_dir, **kwargs):
    if tmp_dir.get_final().name == str(step):
      os.kill(os.getpid(), signal.SIGKILL)
    return await commit(tmp_dir, **kwargs)

  atomicity.on_commit_callback = commit_or_die


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('workdir')
  parser.add_argument('overrides')
  parser.add_argument('--kill_at_commit', type=int)
  parser.add_argument('--file_size_limit', type=int)
  args = parser.parse_args()
  if args.kill_at_commit:
    kill_at_commit(args.kill_at_commit)
  if args.file_size_limit:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a dead process
    resource.setrlimit(resource.RLIMIT_FSIZE, (args.file_size_limit, args.file_size_limit))
  from euro_lm.errors import UserError
  from euro_lm.train.loop import train

  try:
    train(tiny_config(json.loads(args.overrides)), args.workdir)
  except UserError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  main()
