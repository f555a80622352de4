"""`python -m euro_lm.train_tokenizer --output=DIR [--vocab_size=8192 ...]`

Trains a SentencePiece tokenizer on a language-balanced sample of the
corpus's training split and reports its fertility on held-out text: writes
DIR/tokenizer.model and DIR/fertility.json and prints the table.
`euro_lm.data.prepare.tokenizer_training.train_tokenizer` is the same job as
a function, for notebooks.

The corpus is the embedded one (held-out parallel text, parity by token
counts) or, with `--input=GLOB[,GLOB...]` and the source flags of
`euro_lm.prepare_data`, your own JSONL/Parquet files, read in two streaming
passes (held-out documents, parity per character).
"""

import os

from absl import app, flags

from euro_lm import cli
from euro_lm.data import tokenizer as tokenizer_lib
from euro_lm.data.prepare import fertility, source_flags, tokenizer_training

_OUTPUT = flags.DEFINE_string('output', None, 'Directory for tokenizer.model and fertility.json.')
_CORPUS = flags.DEFINE_string(
    'corpus',
    'embedded',
    "Training text without --input; only 'embedded' (Django's catalogs).",
)
_INPUT = flags.DEFINE_list('input', [], 'Your own text instead: input file globs, comma-separated.')
_VOCAB_SIZE = flags.DEFINE_integer('vocab_size', 8192, 'Pieces in the model.')
_MODEL_TYPE = flags.DEFINE_enum(
    'model_type', 'bpe', tokenizer_lib.MODEL_TYPES, 'SentencePiece algorithm.'
)
_BYTE_FALLBACK = flags.DEFINE_bool(
    'byte_fallback', True, 'Encode unknown characters as their UTF-8 bytes.'
)
_CHARACTER_COVERAGE = flags.DEFINE_float(
    'character_coverage',
    0.9995,
    "SentencePiece's share of the sample's characters that get pieces of their own; the"
    ' rarest rest are byte fallback (or unknown without it). 1.0 keeps every character.',
)
_SPECIAL_TOKENS = flags.DEFINE_list(
    'special_tokens',
    ['<|im_start|>', '<|im_end|>'],
    'Comma-separated pieces that always encode as one id.',
)
_SAMPLING = flags.DEFINE_enum(
    'sampling',
    'uniform',
    tokenizer_training.SAMPLING,
    'How languages share the training sample: the same characters each, in'
    ' proportion to size, or to size ** (1 / temperature).',
)
_TEMPERATURE = flags.DEFINE_float(
    'temperature', 3.0, 'For --sampling=temperature; higher is flatter.'
)
_CHARS_PER_LANGUAGE = flags.DEFINE_integer(
    'chars_per_language',
    1_000_000,
    'Average characters sampled per language (all languages share this times their number).',
)
_LANGUAGES = flags.DEFINE_string('languages', '', "Comma-separated language codes; '' means all.")
_HELDOUT_FRACTION = flags.DEFINE_float(
    'heldout_fraction',
    0.1,
    'Held out of training: this share of documents (as the trainer splits'
    ' with data.valid_fraction) and of parallel messages (the report); with'
    ' --input, every k-th document per language, k = round(1 / this).',
)
_SEED = flags.DEFINE_integer(
    'seed',
    0,
    'Seeds the order documents are drawn (embedded corpus; --input takes them in file order).',
)
flags.mark_flag_as_required('output')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  _, report = tokenizer_training.train_tokenizer(
      _OUTPUT.value,
      corpus_name=_CORPUS.value,
      input_globs=_INPUT.value,
      source=source_flags.input_text_source(bool(_INPUT.value)),
      vocab_size=_VOCAB_SIZE.value,
      model_type=_MODEL_TYPE.value,
      byte_fallback=_BYTE_FALLBACK.value,
      character_coverage=_CHARACTER_COVERAGE.value,
      special_tokens=_SPECIAL_TOKENS.value,
      sampling=_SAMPLING.value,
      temperature=_TEMPERATURE.value,
      chars_per_language=_CHARS_PER_LANGUAGE.value,
      languages=_LANGUAGES.value,
      heldout_fraction=_HELDOUT_FRACTION.value,
      seed=_SEED.value,
  )
  print(fertility.format_table(report))
  print(f'Wrote {os.path.join(_OUTPUT.value, "fertility.json")}')


if __name__ == '__main__':
  cli.run(main)
