"""`python -m euro_lm.train_tokenizer --output=DIR [--vocab_size=8192 ...]`

Trains a SentencePiece tokenizer on a language-balanced sample of the
corpus's training split and reports its fertility on held-out parallel text:
writes DIR/tokenizer.model and DIR/fertility.json and prints the table.
`train_tokenizer` is the same job as a function, for notebooks.
"""

from collections.abc import Sequence
import os
import sys

from absl import app, flags
import numpy as np

from euro_lm import data
from euro_lm.data import corpus
from euro_lm.data import fertility
from euro_lm.data import tokenizer as tokenizer_lib
from euro_lm.errors import ConfigError, UserError

_MODEL_TYPES = ('bpe', 'unigram')

_OUTPUT = flags.DEFINE_string(
    'output', None, 'Directory for tokenizer.model and fertility.json.'
)
_CORPUS = flags.DEFINE_string(
    'corpus', 'embedded', "Training text; only 'embedded' (Django's catalogs)."
)
_VOCAB_SIZE = flags.DEFINE_integer('vocab_size', 8192, 'Pieces in the model.')
_MODEL_TYPE = flags.DEFINE_enum(
    'model_type', 'bpe', _MODEL_TYPES, 'SentencePiece algorithm.'
)
_BYTE_FALLBACK = flags.DEFINE_bool(
    'byte_fallback', True, 'Encode unknown characters as their UTF-8 bytes.'
)
_SPECIAL_TOKENS = flags.DEFINE_list(
    'special_tokens',
    ['<|im_start|>', '<|im_end|>'],
    'Comma-separated pieces that always encode as one id.',
)
_SAMPLING = flags.DEFINE_enum(
    'sampling',
    'uniform',
    tokenizer_lib.SAMPLING,
    'How languages share the training sample: the same characters each, in'
    ' proportion to size, or to size ** (1 / temperature).',
)
_TEMPERATURE = flags.DEFINE_float(
    'temperature', 3.0, 'For --sampling=temperature; higher is flatter.'
)
_CHARS_PER_LANGUAGE = flags.DEFINE_integer(
    'chars_per_language',
    1_000_000,
    'Average characters sampled per language (all languages share this'
    ' times their number).',
)
_LANGUAGES = flags.DEFINE_string(
    'languages', '', "Comma-separated language codes; '' means all."
)
_HELDOUT_FRACTION = flags.DEFINE_float(
    'heldout_fraction',
    0.1,
    'Held out of training: this share of documents (as the trainer splits'
    ' with data.valid_fraction) and of parallel messages (the report).',
)
_SEED = flags.DEFINE_integer('seed', 0, 'Seeds the order documents are drawn.')
flags.mark_flag_as_required('output')


def train_tokenizer(
    output_dir: str,
    *,
    corpus_name: str = 'embedded',
    vocab_size: int = 8192,
    model_type: str = 'bpe',
    byte_fallback: bool = True,
    special_tokens: Sequence[str] = ('<|im_start|>', '<|im_end|>'),
    sampling: str = 'uniform',
    temperature: float = 3.0,
    chars_per_language: int = 1_000_000,
    languages: str = '',
    heldout_fraction: float = 0.1,
    seed: int = 0,
    log=print,
) -> tuple[tokenizer_lib.Tokenizer, dict]:
  """Trains a tokenizer into `output_dir` and writes its fertility report.

  Arguments are the CLI's flags; error messages name them as flags.

  Returns:
    The tokenizer and the report (see `fertility.fertility_report`), with
    `training`: the sampling and the characters each language trained on.

  Raises:
    UserError: a bad flag, e.g. a vocab_size the sample cannot fill.
  """
  if corpus_name != 'embedded':
    raise ConfigError(f"--corpus={corpus_name!r}: only 'embedded' exists.")
  if model_type not in _MODEL_TYPES:
    raise ConfigError(
        f'--model_type={model_type!r} is not one of {_MODEL_TYPES}.'
    )
  if not 0 < heldout_fraction <= 0.5:
    raise ConfigError(
        f'--heldout_fraction must be in (0, 0.5], got {heldout_fraction}.'
    )
  if chars_per_language <= 0:
    raise ConfigError(
        f'--chars_per_language must be positive, got {chars_per_language}.'
    )
  if sampling == 'temperature' and not temperature > 0:
    raise ConfigError(f'--temperature must be positive, got {temperature}.')
  try:
    docs = corpus.select_languages(corpus.load_embedded_corpus(), languages)
  except ConfigError as e:
    # select_languages names the config field, which here is a flag.
    raise ConfigError(
        str(e).replace('data.languages', '--languages', 1)
    ) from e
  train, _ = corpus.split_train_valid(docs, heldout_fraction)
  heldout, heldout_lines = fertility.embedded_parallel_heldout(
      sorted(docs), heldout_fraction
  )
  train = {
      tag: [_drop_lines(doc, heldout_lines[tag]) for doc in train[tag]]
      for tag in train
  }
  budgets = tokenizer_lib.sampling_budgets(
      {tag: sum(map(len, d)) for tag, d in train.items()},
      chars_per_language,
      sampling,
      temperature,
  )
  rng = np.random.default_rng(seed)
  texts = []
  for tag in sorted(train):
    # A shuffled order samples every catalog, not just the first ones.
    order = rng.permutation(len(train[tag]))
    shuffled = [train[tag][i] for i in order]
    texts += data.balanced_texts({tag: shuffled}, budgets[tag])
  path = os.path.join(output_dir, 'tokenizer.model')
  log(
      f'Training a {vocab_size}-piece {model_type} tokenizer on'
      f' {sum(map(len, texts)):,} characters in {len(train)} languages'
      f' ({sampling} sampling) -> {path}'
  )
  tokenizer = tokenizer_lib.train_sentencepiece(
      texts,
      path,
      vocab_size=vocab_size,
      model_type=model_type,
      byte_fallback=byte_fallback,
      user_defined_symbols=[t for t in special_tokens if t],
      vocab_size_name='--vocab_size',
  )
  log(
      f'Fertility on {len(heldout[min(heldout)])} held-out messages that'
      f' Django translates into all {len(heldout)} languages.'
  )
  report = fertility.fertility_report(tokenizer, heldout, parallel=True)
  report['training'] = {
      'corpus': corpus_name,
      'model_type': model_type,
      'sampling': sampling,
      'temperature': temperature if sampling == 'temperature' else None,
      'characters': budgets,
  }
  fertility.write_report(report, os.path.join(output_dir, 'fertility.json'))
  return tokenizer, report


def _drop_lines(doc: str, lines: set[str]) -> str:
  return '\n'.join(line for line in doc.split('\n') if line not in lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  try:
    _, report = train_tokenizer(
        _OUTPUT.value,
        corpus_name=_CORPUS.value,
        vocab_size=_VOCAB_SIZE.value,
        model_type=_MODEL_TYPE.value,
        byte_fallback=_BYTE_FALLBACK.value,
        special_tokens=_SPECIAL_TOKENS.value,
        sampling=_SAMPLING.value,
        temperature=_TEMPERATURE.value,
        chars_per_language=_CHARS_PER_LANGUAGE.value,
        languages=_LANGUAGES.value,
        heldout_fraction=_HELDOUT_FRACTION.value,
        seed=_SEED.value,
    )
  except UserError as e:
    sys.exit(f'error: {e}')
  print(fertility.format_table(report))
  print(f'Wrote {os.path.join(_OUTPUT.value, "fertility.json")}')


if __name__ == '__main__':
  app.run(main)
