"""The tf_text encoding backend gives exactly SentencePiece's ids.

The `test` extra installs tensorflow-text, so the comparison always runs; without it
the test fails and says what to install.
"""

import importlib
import os
import sys

import pytest
import sentencepiece as spm

from euro_lm.data import corpus
from euro_lm.data import tokenizer as tokenizer_lib
from euro_lm.errors import ConfigError, UserError

# TensorFlow logs its CPU and CUDA probing at import; keep test output clean.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

SPECIAL_TOKENS = ('<|im_start|>', '<|im_end|>')

TEXTS = (
    '',
    ' ',
    '   ',
    '\t',
    '\n',
    '\t\t  \n \n\n\r\n  \t',
    '  leading and trailing  ',
    'Hello, world!',
    'Καλημέρα κόσμε· ΑΒΓ άέή',
    'Добрый день, мир! Ёё Її Ґґ Џџ',
    'ქართული ენა და დამწერლობა',
    'e\u0301 vs \u00e9, a\u0308\u0304, Z\u0335\u0321a\u0336\u034f',
    'CJK 你好，世界 日本語 한국어',
    'Emoji 😀 🇪🇺 👩\u200d👩\u200d👧 👍🏽 ❤️',
    'Digits 0123456789, 3.14159, 1,000,000 and ١٢٣',
    'Mixed\u00a0no-break\u2009thin\u3000ideographic spaces',
    'A literal \u2581 piece marker',
    f'{SPECIAL_TOKENS[0]}user\nBonjour{SPECIAL_TOKENS[1]}',
    '<|im_start <|im_end|',  # Near misses stay ordinary text.
    '\x00\x01 control \x7f characters',
    'Ünïcödé ßtraße ŁÓDŹ Ærøskøbing Þingvellir ğış',
)


def _require_tensorflow_text():
  try:
    importlib.import_module('tensorflow_text')
  except ImportError as e:
    pytest.fail(f"tensorflow-text is not importable ({e}); pip install -e '.[test]'", pytrace=False)


@pytest.fixture(scope='module')
def docs_by_lang():
  return corpus.load_embedded_corpus()


@pytest.fixture(scope='module', params=['bpe', 'unigram'])
def model_path(request, docs_by_lang, tmp_path_factory):
  sample = [doc for docs in docs_by_lang.values() for doc in docs[:3]]
  path = tmp_path_factory.mktemp(request.param) / 'tok.model'
  tokenizer_lib.train_sentencepiece(
      sample,
      str(path),
      vocab_size=1000,
      model_type=request.param,
      user_defined_symbols=SPECIAL_TOKENS,
  )
  return str(path)


def test_tf_text_gives_sentencepiece_ids(model_path, docs_by_lang):
  _require_tensorflow_text()
  reference = spm.SentencePieceProcessor(model_file=model_path)
  tf_text = tokenizer_lib.load_tokenizer(model_path, backend='tf_text')
  assert tf_text.backend == 'tf_text'
  # Whole documents too, so every script meets real merges, not only the
  # hand-picked edge cases; the last is never in the training sample.
  texts = list(TEXTS) + [docs[-1] for docs in docs_by_lang.values()]
  expected = [reference.EncodeAsIds(t) for t in texts]
  assert [tf_text.encode(t) for t in texts] == expected
  assert tf_text.encode_batch(texts) == expected
  assert tf_text.encode_batch([]) == []
  # Special tokens are one id each, in both backends.
  start, end = (reference.PieceToId(t) for t in SPECIAL_TOKENS)
  ids = tf_text.encode(f'{SPECIAL_TOKENS[0]}hi{SPECIAL_TOKENS[1]}')
  assert ids[0] == start and ids[-1] == end
  # Decoding stays on SentencePiece.
  assert tf_text.decode(expected[7]) == 'Hello, world!'


def test_default_backend_is_sentencepiece(model_path):
  tokenizer = tokenizer_lib.load_tokenizer(model_path)
  reference = spm.SentencePieceProcessor(model_file=model_path)
  assert tokenizer.backend == 'sentencepiece'
  assert tokenizer.encode_batch(TEXTS) == [reference.EncodeAsIds(t) for t in TEXTS]


def test_missing_tensorflow_text_is_a_user_error(model_path, monkeypatch):
  # A None entry makes `import tensorflow_text` raise ImportError, as it does
  # where the package is not installed.
  monkeypatch.setitem(sys.modules, 'tensorflow_text', None)
  with pytest.raises(UserError, match=r"pip install 'euro_lm\[tf\]'"):
    tokenizer_lib.load_tokenizer(model_path, backend='tf_text')


def test_unknown_backend(model_path):
  with pytest.raises(ConfigError, match="'tf'.*'sentencepiece', 'tf_text'"):
    tokenizer_lib.load_tokenizer(model_path, backend='tf')
