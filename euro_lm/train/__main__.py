"""`python -m euro_lm.train --config=configs/tiny.py --workdir=DIR [--config.a.b=v ...]`"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from euro_lm import cli

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/tiny.py.', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and logs.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)  # Orbax and Grain log every file at INFO
  from euro_lm import host_memory

  # Before any thread allocates (it then keeps its own malloc arena).
  host_memory.configure_before_backend(_CONFIG.value.hardware.keep_freed_host_memory)
  from euro_lm import distributed
  from euro_lm.train.loop import train

  distributed.initialize(_CONFIG.value.distributed, os.environ)
  train(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  cli.run(main)
