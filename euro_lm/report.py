"""Prints what a checkpoint's records say: steps, tokens, FLOPs, hardware, what was drawn
per language and per source, the sources' provenance and the evaluation results (what
export_hf's model card and training-content summary are made from).

  python -m euro_lm.report --workdir=DIR [--step=N] [--json]
"""

import json

from absl import app, flags

from euro_lm import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir (or a step directory).')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step; default the newest.')
_JSON = flags.DEFINE_bool('json', False, 'Print the records as JSON instead of text.')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  from euro_lm import records

  result = records.report(_WORKDIR.value, _STEP.value)
  print(
      json.dumps(result, indent=2, ensure_ascii=False)
      if _JSON.value
      else records.format_report(result)
  )


if __name__ == '__main__':
  cli.run(main)
