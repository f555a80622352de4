"""Writes a euro_lm checkpoint as a Hugging Face model folder (see euro_lm.hf).

  python -m euro_lm.export_hf --workdir=DIR --output=HFDIR [--step=N] [--dtype=bfloat16] \
      [--check] [--card_extra=FILE]

Also writes README.md (the model card) and the training-content summary from the run's
records (see euro_lm.card).
"""

from absl import app, flags, logging

from euro_lm import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir (or a step directory).')
_OUTPUT = flags.DEFINE_string('output', None, 'Output directory for the HF model.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step; default the newest.')
_DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float32'], 'Weight dtype.')
_SHARD_GB = flags.DEFINE_float('shard_gb', 2.0, 'Largest safetensors shard, in GiB.')
_MAX_POSITIONS = flags.DEFINE_integer(
    'max_position_embeddings',
    None,
    'config.json max_position_embeddings; default train.seq_len, or an imported base'
    " model's if longer.",
)
_CHECK = flags.DEFINE_bool(
    'check',
    False,
    'Then run transformers on the HF folder and euro_lm on the checkpoint (float32, CPU) and'
    ' print how far their logits differ (needs the hf extra and memory for both models).',
)
_CARD_EXTRA = flags.DEFINE_string(
    'card_extra',
    None,
    "The provider's Markdown for the model card: its YAML metadata (license, ...; summary:"
    ' for the training-content summary) and ## sections merge into the generated ones.',
)
flags.mark_flags_as_required(['workdir', 'output'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)
  from euro_lm.hf import export_hf
  from euro_lm.hf.check import compare_with_transformers

  export_hf(
      _WORKDIR.value,
      _OUTPUT.value,
      step=_STEP.value,
      dtype=_DTYPE.value,
      shard_bytes=int(_SHARD_GB.value * 2**30),
      max_position_embeddings=_MAX_POSITIONS.value,
      card_extra=_CARD_EXTRA.value,
  )
  if _CHECK.value:
    compare_with_transformers(_OUTPUT.value, _WORKDIR.value, step=_STEP.value)


if __name__ == '__main__':
  cli.run(main)
