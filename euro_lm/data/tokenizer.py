"""What every tokenizer offers, loading one by its files, and training a SentencePiece one.

A run's tokenizer is a SentencePiece `.model` (what euro_lm trains) or a Hugging Face
`tokenizer.json` (what Llama 3, Qwen, Gemma 3 and Mistral ship); `load_tokenizer` takes
either file, or a directory holding one.
"""

import functools
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np
import sentencepiece as spm

from euro_lm.data.hf_tokenizer import TOKENIZER_JSON, HFTokenizer
from euro_lm.errors import ConfigError, DataError, UserError, read_json_object

_SPACE_PIECE = '\u2581'  # SentencePiece's '▁', which decodes to a space.

SENTENCEPIECE_MODEL = 'tokenizer.model'
# Encoders of a SentencePiece model; an HF tokenizer.json always runs on `tokenizers`.
BACKENDS = ('sentencepiece', 'tf_text')
# SentencePiece algorithms a tokenizer can be trained with.
MODEL_TYPES = ('bpe', 'unigram')


class BackendNotInstalledError(UserError, RuntimeError):
  """The package an encoding backend needs is not installed."""


class Tokenizer(Protocol):
  """Text to ids and back. bos/eos ids are None when the tokenizer has no such token; a
  document is `[bos] + encode(text) + [eos]` as `data.add_bos`/`data.add_eos` say."""

  path: str  # as given to load_tokenizer
  files: list[str]  # the files that make it: copied into checkpoints, imports and exports
  fingerprint: str  # sha256 of what fixes the ids: equal fingerprints, equal ids
  backend: str
  vocab_size: int  # one more than the largest id
  bos_id: int | None
  eos_id: int | None
  pad_id: int  # -1 if none
  adds_bos: bool  # whether the tokenizer's own default prepends BOS
  special_tokens: dict[str, str]  # bos_token, eos_token, ...: what chat templates see

  def encode(self, text: str) -> list[int]:
    ...

  def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids of `text` and each token's (start, end) character span, with special tokens
    written in the text (`<s>`, chat markers) as their single ids, as transformers encodes a
    rendered chat template."""
    ...

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    ...

  def decode(self, ids: Sequence[int]) -> str:
    ...

  def token_bytes(self) -> np.ndarray:
    ...


def tokenizer_in(directory: str) -> str | None:
  """The tokenizer file in `directory` that load_tokenizer reads (tokenizer.json before
  tokenizer.model, as transformers prefers the fast tokenizer), or None."""
  for name in (TOKENIZER_JSON, SENTENCEPIECE_MODEL):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return path
  return None


def run_tokenizer(workdir: str) -> str | None:
  """Where a run keeps the tokenizer it names no other: `<workdir>/tokenizer/` (an imported
  or `init_from` tokenizer's files) or `<workdir>/tokenizer.model` (one it trained); None."""
  directory = os.path.join(workdir, 'tokenizer')
  if os.path.isdir(directory) and tokenizer_in(directory):
    return directory
  model = os.path.join(workdir, SENTENCEPIECE_MODEL)
  return model if os.path.isfile(model) else None


def file_names(tokenizer: Tokenizer) -> dict[str, str]:
  """Each of the tokenizer's files and the name its copy takes: the main file (the first)
  the name `tokenizer_in` looks for, whatever it was called (`tok.model`, `my.json`), its
  companions (tokenizer_config.json, ...) their own."""
  main = TOKENIZER_JSON if tokenizer.backend == HFTokenizer.backend else SENTENCEPIECE_MODEL
  first, *companions = tokenizer.files
  return {first: main, **{file: os.path.basename(file) for file in companions}}


def copy_files(tokenizer: Tokenizer, directory: str) -> str:
  """Copies the tokenizer's files into the existing `directory` under `file_names`; returns
  the copy of the main file. A copy's tokenizer_config.json names the class that keeps
  transformers reading it as it reads the original (`HFTokenizer.class_for_copies`)."""
  for file, name in file_names(tokenizer).items():
    shutil.copyfile(file, os.path.join(directory, name))
  if tokenizer.backend == HFTokenizer.backend and tokenizer.class_for_copies:
    path = os.path.join(directory, 'tokenizer_config.json')
    config = read_json_object(path, DataError)
    with open(path, 'w', encoding='utf-8') as f:
      json.dump(config | {'tokenizer_class': tokenizer.class_for_copies}, f, indent=2)
  return os.path.join(directory, file_names(tokenizer)[tokenizer.files[0]])


def copy_tokenizer(tokenizer: Tokenizer, directory: str) -> str:
  """Copies the tokenizer's files into a new `directory`, atomically (a directory of
  another process's identical copy is kept); returns `directory`."""
  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  temporary = tempfile.mkdtemp(dir=parent, prefix='.tokenizer-')
  try:
    copy_files(tokenizer, temporary)
    os.chmod(temporary, 0o755)
    os.rename(temporary, directory)
  except OSError:
    shutil.rmtree(temporary, ignore_errors=True)
    if not (os.path.isdir(directory) and tokenizer_in(directory)):
      raise
  return directory


def load_tokenizer(path: str, backend: str | None = None) -> Tokenizer:
  """The tokenizer at `path`: a SentencePiece `.model`, an HF `tokenizer.json` (special
  tokens from the `tokenizer_config.json` beside it), or a directory holding one.
  `backend` encodes a SentencePiece model ('sentencepiece', the default, or 'tf_text').

  Raises:
    DataError: nothing readable at `path`.
    ConfigError: an unknown backend, or one that does not fit the file.
    BackendNotInstalledError: the backend's package is not installed.
  """
  if not os.path.exists(path):
    raise DataError(
        f'No tokenizer at {path} (expected a {SENTENCEPIECE_MODEL}, a {TOKENIZER_JSON} or a'
        ' directory with one).'
    )
  file = tokenizer_in(path) if os.path.isdir(path) else path
  if file is None:
    raise DataError(f'No {TOKENIZER_JSON} or {SENTENCEPIECE_MODEL} in the directory {path}.')
  if file.endswith('.json'):
    if backend not in (None, HFTokenizer.backend):
      raise ConfigError(
          f'The tokenizer {file} is a Hugging Face tokenizer.json, which encodes with'
          f' {HFTokenizer.backend!r}, not {backend!r}.'
      )
    return HFTokenizer(path)
  return SentencePieceTokenizer.from_file(file, backend or 'sentencepiece')


class SentencePieceTokenizer:
  """A SentencePiece model with bos and eos pieces; see `Tokenizer`.

  `backend` picks what encodes: 'sentencepiece' (the default) or 'tf_text'
  (tensorflow-text's SentencepieceTokenizer on the same serialized model, for
  input pipelines built on tf.data). Both give the same ids; decoding and the
  piece tables always use SentencePiece.
  """

  def __init__(
      self,
      processor: spm.SentencePieceProcessor,
      path: str,
      backend: str = 'sentencepiece',
  ):
    if backend not in BACKENDS:
      raise ConfigError(f'Unknown tokenizer backend {backend!r}; use one of {BACKENDS}.')
    self._processor = processor
    self._path = path
    self._backend = backend
    self._token_bytes = None
    # None selects the SentencePiece path, which then costs one `is` check.
    self._tf_tokenizer = (
        _tf_text_tokenizer(processor.serialized_model_proto()) if backend == 'tf_text' else None
    )

  @classmethod
  def from_file(cls, path: str, backend: str = 'sentencepiece') -> 'SentencePieceTokenizer':
    """Loads a SentencePiece `.model` file to encode with `backend`.

    Raises:
      DataError: no file at `path`, not a SentencePiece model, or no bos/eos.
      ConfigError: an unknown backend.
      BackendNotInstalledError: the backend's package is not installed.
    """
    if not os.path.isfile(path):
      raise DataError(f'No SentencePiece tokenizer model at {path}.')
    processor = spm.SentencePieceProcessor()
    try:
      processor.Load(model_file=path)
    except (OSError, RuntimeError) as e:
      raise DataError(f'{path} is not a valid SentencePiece model: {e}') from e
    if processor.bos_id() < 0 or processor.eos_id() < 0:
      raise DataError(
          f'The tokenizer {path} has no bos or eos piece; euro_lm marks'
          ' document boundaries with both.'
      )
    return cls(processor, path, backend)

  @property
  def backend(self) -> str:
    return self._backend

  @property
  def path(self) -> str:
    return self._path

  @property
  def files(self) -> list[str]:
    return [self._path]

  @functools.cached_property
  def fingerprint(self) -> str:
    """sha256 of the model file."""
    with open(self._path, 'rb') as f:
      return hashlib.sha256(f.read()).hexdigest()

  @property
  def adds_bos(self) -> bool:
    return True  # what transformers' LlamaTokenizer does with a SentencePiece model

  @property
  def vocab_size(self) -> int:
    return self._processor.vocab_size()

  @property
  def bos_id(self) -> int:
    return self._processor.bos_id()

  @property
  def eos_id(self) -> int:
    return self._processor.eos_id()

  @property
  def pad_id(self) -> int:
    """The pad id, or -1 if the model has none (a loaded foreign model)."""
    return self._processor.pad_id()

  def encode(self, text: str) -> list[int]:
    if self._tf_tokenizer is None:
      return self._processor.EncodeAsIds(text)
    return self._tf_tokenizer.tokenize(text).numpy().tolist()

  @property
  def special_tokens(self) -> dict[str, str]:
    """bos/eos/unk/pad pieces by transformers' names: what its LlamaTokenizer on the
    exported model passes to chat templates."""
    ids = {
        'bos_token': self.bos_id,
        'eos_token': self.eos_id,
        'unk_token': self._processor.unk_id(),
        'pad_token': self.pad_id,
    }
    return {name: self._processor.IdToPiece(i) for name, i in ids.items() if i >= 0}

  def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and character spans of `text`, control pieces (`<s>`, `</s>`, `<pad>`, `<unk>`)
    written in it as their ids, as transformers' tokenizer converted from this model (the
    export's) encodes them; user-defined pieces (chat markers) are single ids anyway."""
    controls, pattern = self._control_pieces
    ids, offsets, start = [], [], 0
    for match in pattern.finditer(text) if controls else ():
      self._encode_span(text, start, match.start(), ids, offsets)
      ids.append(controls[match.group()])
      offsets.append(match.span())
      start = match.end()
    self._encode_span(text, start, len(text), ids, offsets)
    return ids, offsets

  @functools.cached_property
  def _control_pieces(self):
    """{piece: id} of the control and unknown pieces, and a regex matching them."""
    controls = {
        self._processor.IdToPiece(i): i
        for i in range(self.vocab_size)
        if self._processor.IsControl(i) or self._processor.IsUnknown(i)
    }
    longest_first = sorted(controls, key=len, reverse=True)
    return controls, re.compile('|'.join(map(re.escape, longest_first)))

  def _encode_span(self, text, start, end, ids, offsets):
    """Appends the pieces of text[start:end] and their character spans in `text`."""
    if start == end:
      return
    segment = text[start:end]
    # SentencePiece reports byte offsets: map them to characters (a byte inside a character
    # belongs to it; byte-fallback pieces of one character all get its span).
    char_of_byte = [0] * (len(segment.encode('utf-8')) + 1)
    position = 0
    for i, character in enumerate(segment):
      size = len(character.encode('utf-8'))
      char_of_byte[position : position + size] = [i] * size
      position += size
    char_of_byte[position] = len(segment)
    for piece in self._processor.encode(segment, out_type='proto').pieces:
      first = char_of_byte[piece.begin]
      last = char_of_byte[piece.end - 1] + 1 if piece.end > piece.begin else first + 1
      ids.append(piece.id)
      offsets.append((start + first, start + min(last, len(segment))))

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    if self._tf_tokenizer is None:
      return self._processor.EncodeAsIds(list(texts))
    if not texts:
      return []  # TensorFlow reads an empty list as a float tensor.
    return self._tf_tokenizer.tokenize(list(texts)).to_list()

  def decode(self, ids: Sequence[int]) -> str:
    return self._processor.DecodeIds([int(i) for i in ids])

  def token_bytes(self) -> np.ndarray:
    """UTF-8 bytes each token adds to decoded text, int32 [vocab_size].

    Byte-fallback pieces `<0xNN>` count 1, control and unknown pieces 0, and
    '▁' one byte (the space it decodes to). So for a model without a dummy
    prefix, such as `train_sentencepiece` makes, the sum over `ids` is
    exactly the UTF-8 length of `decode(ids)` (which is `text` for
    `ids = encode(text)` unless `text` holds a literal '▁'). A model with a
    dummy prefix counts one more byte per encoded text: the leading '▁' that
    decoding drops.
    The array is computed once and read-only.
    """
    if self._token_bytes is None:
      self._token_bytes = self._count_token_bytes()
      self._token_bytes.flags.writeable = False
    return self._token_bytes

  def _count_token_bytes(self) -> np.ndarray:
    counts = np.zeros(self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      if self._processor.IsByte(i):
        counts[i] = 1
      elif not (self._processor.IsControl(i) or self._processor.IsUnknown(i)):
        piece = self._processor.IdToPiece(i)
        counts[i] = len(piece.replace(_SPACE_PIECE, ' ').encode('utf-8'))
    return counts


def _tf_text_tokenizer(model: bytes):
  """tensorflow-text's SentencepieceTokenizer for a serialized model."""
  try:
    # Imported only here: TensorFlow is a large extra, slow to load.
    import tensorflow_text  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise BackendNotInstalledError(
        "The 'tf_text' tokenizer backend needs tensorflow-text, which is not"
        f" installed ({e}): pip install 'euro_lm[tf]'"
    ) from e
  # Its defaults (no bos/eos, no sampling, int32 ids) match EncodeAsIds.
  return tensorflow_text.SentencepieceTokenizer(model=model)


def train_sentencepiece(
    texts: Iterable[str],
    model_path: str,
    *,
    vocab_size: int,
    model_type: str = 'bpe',
    byte_fallback: bool = True,
    user_defined_symbols: Sequence[str] = (),
    character_coverage: float = 0.9995,
    seed_sentencepiece_size: int = 1_000_000,
    num_threads: int = 2,
    vocab_size_name: str = 'model.vocab_size',
) -> 'SentencePieceTokenizer':
  """Trains a SentencePiece model on `texts` and writes it to `model_path`.

  Ids: pad 0, unk 1, bos 2, eos 3. Text is not normalized and gets no dummy
  prefix, so with byte fallback `decode(encode(x)) == x` for any string
  without '▁' (U+2581), which SentencePiece reads as a space.
  The model is written atomically: a crash never leaves a partial file.

  Raises:
    ConfigError: `vocab_size` is too large for the texts, or too small for
      their characters; the message names it as `vocab_size_name`.
  """
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=byte_fallback,
        user_defined_symbols=list(user_defined_symbols),
        character_coverage=character_coverage,
        seed_sentencepiece_size=seed_sentencepiece_size,
        num_threads=num_threads,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        split_digits=True,
        normalization_rule_name='identity',
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        # Documents are whole texts of a few thousand characters, not lines.
        max_sentence_length=1 << 20,
        train_extremely_large_corpus=False,
        minloglevel=2,
    )
  except RuntimeError as e:
    message = str(e)
    if 'Vocabulary size' in message:
      # Keep SentencePiece's advice ("set it to a value <= N"), not its
      # source location.
      advice = message[message.index('Vocabulary size') :]
      raise ConfigError(
          f'{vocab_size_name}={vocab_size} does not fit the tokenizer training text: {advice}'
      ) from e
    raise
  directory = os.path.dirname(os.path.abspath(model_path))
  os.makedirs(directory, exist_ok=True)
  # Write next to the target, then rename: readers see no model or a whole one.
  fd, temp_path = tempfile.mkstemp(dir=directory, suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(model.getvalue())
      f.flush()
      os.fsync(f.fileno())
    # mkstemp makes the file private; make it readable like other outputs.
    os.chmod(temp_path, 0o644)
    os.replace(temp_path, model_path)
  except BaseException:
    os.remove(temp_path)
    raise
  return SentencePieceTokenizer.from_file(model_path)


def balanced_texts(docs_by_lang: dict[str, list[str]], chars_per_language: int) -> list[str]:
  """The first `chars_per_language` characters of each language's documents."""
  texts = []
  for tag in sorted(docs_by_lang):
    budget = chars_per_language
    for doc in docs_by_lang[tag]:
      if budget <= 0:
        break
      texts.append(doc[:budget])
      budget -= len(doc)
  return texts
