"""`python -m euro_lm.import_hf --hf=HFDIR --workdir=DIR`

Reads a local Hugging Face Llama-family folder (safetensors) into a params-only euro_lm
checkpoint that `--config.train.init_from=DIR` starts from (see euro_lm.hf).
"""

import sys

from absl import app, flags, logging

_HF = flags.DEFINE_string('hf', None, 'Local HF model folder (config.json + *.safetensors).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'New directory for the euro_lm checkpoint.')
flags.mark_flags_as_required(['hf', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)
  from euro_lm.errors import UserError
  from euro_lm.hf import import_hf

  try:
    import_hf(_HF.value, _WORKDIR.value)
  except UserError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main)
