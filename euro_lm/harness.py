"""lm-evaluation-harness tasks on a checkpoint, without exporting it.

  python -m euro_lm.harness --workdir=DIR --tasks=belebele_fin_Latn,xnli_de \
      [--include_path=my_tasks/] [--num_fewshot=N] [--limit=N] [--step=N] \
      [--batch_size=8] [--max_length=N] [--add_bos_token=true|false] [--output=RESULT.json]

Compute nodes are offline: tasks read local data, e.g. a YAML in --include_path whose
`dataset_path: json` and `dataset_kwargs.data_files` name local files (README). Needs the
`eval` extra: pip install 'euro_lm[eval]'.
"""

from absl import app, flags, logging

from euro_lm import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training or import workdir.')
_TASKS = flags.DEFINE_list('tasks', None, 'lm-eval task or group names, comma-separated.')
_INCLUDE_PATH = flags.DEFINE_string('include_path', '', 'A folder of your own task YAMLs.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step; default the newest.')
_NUM_FEWSHOT = flags.DEFINE_integer('num_fewshot', None, "Few-shot examples; default the task's.")
_LIMIT = flags.DEFINE_integer('limit', None, 'At most this many documents per task.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 8, 'Rows per scoring step over all devices.')
_MAX_LENGTH = flags.DEFINE_integer('max_length', 0, "Longest row; default the run's seq_len.")
_ADD_BOS = flags.DEFINE_enum(
    'add_bos_token',
    'default',
    ['default', 'true', 'false'],
    "BOS before each text: the tokenizer's default, or forced (as lm-eval's hf model_args).",
)
_OUTPUT = flags.DEFINE_string('output', '', 'Write the results here as JSON.')
_SET = flags.DEFINE_multi_string(
    'set', [], "Override a field of the run's config, e.g. model.attention_impl=xla."
)
flags.mark_flags_as_required(['workdir', 'tasks'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file at INFO
  from euro_lm.errors import UserError

  try:
    from euro_lm.evaluation import harness
  except ImportError as e:
    raise UserError(f"{e.name} is not installed: pip install 'euro_lm[eval]'") from e
  harness.run_tasks(
      _WORKDIR.value,
      _TASKS.value,
      include_path=_INCLUDE_PATH.value,
      step=_STEP.value,
      num_fewshot=_NUM_FEWSHOT.value,
      limit=_LIMIT.value,
      batch_size=_BATCH_SIZE.value,
      max_length=_MAX_LENGTH.value,
      add_bos_token={'default': None, 'true': True, 'false': False}[_ADD_BOS.value],
      overrides=_SET.value,
      output=_OUTPUT.value,
  )


if __name__ == '__main__':
  cli.run(main)
