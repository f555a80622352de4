"""`python -m euro_lm.plan --config=... --devices=N [--nodes=M] [--accelerator=h100]`: the
planner's report for a config on a mesh (see `euro_lm.plan`)."""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from euro_lm import cli
from euro_lm.plan.report import format_plan

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/llama_1b.py.', lock_config=True
)
_DEVICES = flags.DEFINE_integer('devices', 1, 'Total devices (all nodes together).')
_NODES = flags.DEFINE_integer(
    'nodes', 1, 'Nodes (one process each; the mesh.dcn_* degrees must multiply to this when > 1).'
)
_MEMORY = flags.DEFINE_float(
    'device_memory_gb', 0.0, "Memory per device in GiB; overrides the accelerator's."
)
_ACCELERATOR = flags.DEFINE_string(
    'accelerator',
    '',
    'Accelerator name (h100, a100, mi250x, tpu_v5...): device memory and peak FLOP/s.',
)
flags.mark_flags_as_required(['config'])
_MFU = flags.DEFINE_float('mfu', 0.4, 'Assumed model FLOPs utilisation for the time estimate.')
_NODE_LINK = flags.DEFINE_string(
    'node_link', 'nvlink4', 'Link within a node for the communication estimate (devices.LINKS).'
)
_NETWORK_LINK = flags.DEFINE_string(
    'network_link', 'ndr', 'Link across nodes: ndr, slingshot11, lumi, leonardo, jupiter...'
)
_TOKENS = flags.DEFINE_float(
    'tokens',
    0.0,
    'Token budget for the time estimate; 0: train.steps x global_batch_size x seq_len.',
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)
  jax.config.update('jax_platforms', 'cpu')  # shapes only: never touch an accelerator
  print(
      format_plan(
          _CONFIG.value,
          _DEVICES.value,
          _NODES.value,
          _MEMORY.value or None,
          _ACCELERATOR.value or None,
          _MFU.value,
          _TOKENS.value or None,
          config_name=_config_path(),
          node_link=_NODE_LINK.value,
          network_link=_NETWORK_LINK.value,
      )
  )


def _config_path():
  for arg in sys.argv:
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
  return ''


if __name__ == '__main__':
  cli.run(main)
