"""Per-language scores of a checkpoint on held-out text.

  python -m euro_lm.evaluate --workdir=DIR [--step=N] --input=GLOB[,GLOB] \
      (--language_field=lang | --language=fin_Latn) [--output=RESULT.json] \
      [--pivot=eng_Latn] [--batch_size=N] [--seq_len=N] [--max_batches=N] \
      [--set=model.attention_impl=xla ...]

Reads JSONL (plain, .gz, .zst) or Parquet as prepare_data does, packs each language's
documents as the run's validation does and prints loss (nats per token), perplexity and
bits per UTF-8 byte per language; `--pivot` (a parallel set) adds each language's total
against the pivot's. An imported Hugging Face model is a workdir too (import_hf).
"""

from absl import app, flags, logging

from euro_lm import cli
from euro_lm.data.prepare import source_flags

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training or import workdir.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step; default the newest.')
_INPUT = flags.DEFINE_list('input', None, 'Held-out file globs, comma-separated.')
_OUTPUT = flags.DEFINE_string('output', '', 'Write the result here as JSON.')
_PIVOT = flags.DEFINE_string(
    'pivot', '', 'A parallel set: report each language against this one (e.g. eng_Latn).'
)
_BATCH_SIZE = flags.DEFINE_integer(
    'batch_size', 0, "Rows per step over all devices; default the run's train.global_batch_size."
)
_SEQ_LEN = flags.DEFINE_integer('seq_len', 0, "Row length; default the run's train.seq_len.")
_MAX_BATCHES = flags.DEFINE_integer(
    'max_batches', 0, 'At most this many batches per language; 0: all the text.'
)
_SET = flags.DEFINE_multi_string(
    'set',
    [],
    "Override a field of the run's config, e.g. model.attention_impl=xla or mesh.fsdp=8.",
)
flags.mark_flags_as_required(['workdir', 'input'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file at INFO
  from euro_lm.evaluation import held_out

  held_out.evaluate_workdir(
      _WORKDIR.value,
      _INPUT.value,
      source_flags.text_source(),
      step=_STEP.value,
      output=_OUTPUT.value,
      pivot=_PIVOT.value,
      batch_size=_BATCH_SIZE.value,
      seq_len=_SEQ_LEN.value,
      max_batches=_MAX_BATCHES.value,
      overrides=_SET.value,
  )


if __name__ == '__main__':
  cli.run(main)
