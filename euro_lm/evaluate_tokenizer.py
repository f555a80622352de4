"""Tokenizers side by side on held-out text, per language.

  python -m euro_lm.evaluate_tokenizer --tokenizer=PATH [--tokenizer=PATH ...] \
      --input=GLOB[,GLOB] (--language_field=lang | --language=fin_Latn) \
      [--parallel] [--pivot=eng_Latn] [--output=RESULT.json] [--plot=FILE.png]

A tokenizer is a SentencePiece `.model`, a Hugging Face `tokenizer.json` (or a directory
with one) or a tiktoken BPE file (`--tiktoken_pattern` names its pre-tokenizer). Input is
JSONL (plain, .gz, .zst) or Parquet, read as prepare_data reads it. Prints and writes per
tokenizer and language tokens per word and per character, bytes per token, parity against
the pivot, byte-fallback, unknown and rare-piece rates.
"""

from absl import app, flags

from euro_lm import cli
from euro_lm.data.prepare import fertility, source_flags, token_counter
from euro_lm.evaluation import tokenizers

_TOKENIZER = flags.DEFINE_multi_string(
    'tokenizer', [], 'A tokenizer file or directory; repeat the flag to compare several.'
)
_LABEL = flags.DEFINE_multi_string(
    'label', [], 'A column label per --tokenizer, in order; default from the paths.'
)
_INPUT = flags.DEFINE_list('input', None, 'Held-out file globs, comma-separated.')
_PARALLEL = flags.DEFINE_bool(
    'parallel', False, 'The same texts in every language: parity is then a ratio of token counts.'
)
_PIVOT = flags.DEFINE_string('pivot', '', "Parity's reference language; default eng_Latn.")
_OUTPUT = flags.DEFINE_string('output', '', 'Write the result here as JSON.')
_PLOT = flags.DEFINE_string(
    'plot', '', 'Save a bar chart here (.png, .pdf, .svg); needs matplotlib.'
)
_TIKTOKEN_PATTERN = flags.DEFINE_string(
    'tiktoken_pattern',
    'cl100k_base',
    'Pre-tokenizer of tiktoken files: '
    + ', '.join(token_counter.TIKTOKEN_PATTERNS)
    + ' or a regex.',
)
_RARE_MAX_COUNT = flags.DEFINE_integer(
    'rare_max_count', 1, 'A piece is rare if it occurs at most this often in all the input.'
)
_METRICS = flags.DEFINE_list(
    'metrics',
    list(tokenizers.DEFAULT_METRICS),
    'Table columns and plot panels: ' + ', '.join(fertility.METRICS) + '.',
)
_ORDER = flags.DEFINE_enum(
    'order', 'parity', ['parity', 'tokens_per_word', 'language'], 'Row order (first tokenizer).'
)
flags.mark_flags_as_required(['input'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  tokenizers.evaluate_tokenizers(
      _TOKENIZER.value,
      _INPUT.value,
      source_flags.text_source(),
      labels=_LABEL.value,
      parallel=_PARALLEL.value,
      pivot=_PIVOT.value,
      tiktoken_pattern=_TIKTOKEN_PATTERN.value,
      rare_max_count=_RARE_MAX_COUNT.value,
      metrics=_METRICS.value,
      order=_ORDER.value,
      output=_OUTPUT.value,
      plot=_PLOT.value,
  )


if __name__ == '__main__':
  cli.run(main)
