"""Tokenizers to measure, and what each of their tokens is.

A `TokenCounter` encodes texts and says, per id, whether the token is byte fallback, the
unknown token, or a control token that text never encodes to. It wraps a euro_lm
`Tokenizer` (a SentencePiece `.model` or an HF `tokenizer.json`: the ids are the ones
training sees) or a tiktoken BPE file, which the fertility report only needs to count
with (it is no euro_lm Tokenizer: no BOS/EOS, no decoding for training).

Byte fallback is a token that spells part of the text in bytes because the vocabulary
lacks a whole piece for it: a SentencePiece byte piece `<0xNN>` (SentencePiece models,
Gemma and Mistral `tokenizer.json`), or, in a byte-level BPE (Llama 3, Qwen, tiktoken),
a token whose bytes are not whole UTF-8 characters.
"""

import base64
import binascii
import dataclasses
import json
import os
import re
from collections.abc import Callable, Sequence

import numpy as np
import sentencepiece as spm

from euro_lm.data import hf_tokenizer
from euro_lm.data import tokenizer as tokenizer_lib
from euro_lm.errors import ConfigError, DataError

# Pre-tokenizer patterns of tiktoken BPE files (the file holds only the ranks).
TIKTOKEN_PATTERNS = {
    # GPT-3.5/4's cl100k_base.
    'cl100k_base': (
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++"""
        r"""[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
    ),
    # GPT-4o's o200k_base: words split at case changes, marks kept with letters.
    'o200k_base': '|'.join(
        [
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"""
            r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"""
            r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r'\p{N}{1,3}',
            r' ?[^\s\p{L}\p{N}]+[\r\n/]*',
            r'\s*[\r\n]+',
            r'\s+(?!\S)',
            r'\s+',
        ]
    ),
    # Llama 3's original `tokenizer.model` (a tiktoken file despite its name).
    'llama3': (
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"""
        r"""[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    ),
}
TIKTOKEN = 'tiktoken'
# A line of a tiktoken file: a base64 token, a space, its rank.
_TIKTOKEN_LINE = re.compile(rb'[A-Za-z0-9+/]+=*\s+\d+\s*')


@dataclasses.dataclass(frozen=True)
class TokenCounter:
  """Encodes texts and knows its tokens. Masks are bool [vocab_size], read-only."""

  path: str
  kind: str  # 'sentencepiece', 'tokenizers' or 'tiktoken'
  vocab_size: int
  encode_batch: Callable[[Sequence[str]], list[list[int]]]  # without BOS/EOS
  byte_fallback: np.ndarray
  unknown: np.ndarray
  control: np.ndarray  # tokens no text encodes to (bos, eos, pad, specials)

  def __post_init__(self):
    for mask in (self.byte_fallback, self.unknown, self.control):
      mask.flags.writeable = False


def counter_for(tokenizer: tokenizer_lib.Tokenizer) -> TokenCounter:
  """The counter of a euro_lm tokenizer: its own ids, its vocabulary's token kinds."""
  file = tokenizer.files[0]
  if tokenizer.backend == hf_tokenizer.HFTokenizer.backend:
    byte_fallback, unknown, control = _hf_kinds(file, tokenizer.vocab_size)
  else:
    processor = spm.SentencePieceProcessor(model_file=file)
    ids = range(processor.vocab_size())
    byte_fallback = np.array([processor.IsByte(i) for i in ids], bool)
    unknown = np.array([processor.IsUnknown(i) for i in ids], bool)
    control = np.array([processor.IsControl(i) for i in ids], bool)
  return TokenCounter(
      path=tokenizer.path,
      kind=tokenizer.backend,
      vocab_size=tokenizer.vocab_size,
      encode_batch=tokenizer.encode_batch,
      byte_fallback=byte_fallback,
      unknown=unknown,
      control=control,
  )


def _hf_kinds(json_path: str, vocab_size: int):
  import tokenizers  # pylint: disable=import-outside-toplevel

  with open(json_path, encoding='utf-8') as f:
    description = json.load(f)
  tokenizer = tokenizers.Tokenizer.from_file(json_path)
  byte_level = hf_tokenizer.is_byte_level(description)
  added = tokenizer.get_added_tokens_decoder()
  byte_fallback = np.zeros(vocab_size, bool)
  control = np.zeros(vocab_size, bool)
  unknown = np.zeros(vocab_size, bool)
  for piece, i in tokenizer.get_vocab(with_added_tokens=True).items():
    if i in added:
      control[i] = added[i].special
    elif hf_tokenizer.is_byte_piece(piece):
      byte_fallback[i] = True
    elif byte_level:
      byte_fallback[i] = not _is_utf8(hf_tokenizer.piece_bytes(piece, byte_level))
  unk = (description.get('model') or {}).get('unk_token')
  if unk is not None and tokenizer.token_to_id(unk) is not None:
    unknown[tokenizer.token_to_id(unk)] = True
  return byte_fallback, unknown, control


def _is_utf8(data: bytes) -> bool:
  try:
    data.decode('utf-8')
  except UnicodeDecodeError:
    return False
  return True


def is_tiktoken_file(path: str) -> bool:
  """Whether `path` is a tiktoken BPE file, by its first line (Llama 3 names one
  `tokenizer.model`, SentencePiece's name)."""
  if not os.path.isfile(path):
    return False
  with open(path, 'rb') as f:
    first = f.readline(4096)
  return _TIKTOKEN_LINE.fullmatch(first) is not None


def read_tiktoken_ranks(path: str) -> dict[bytes, int]:
  """token bytes -> rank of a tiktoken BPE file (base64 token, space, rank per line).

  Raises:
    DataError: a line that is not a base64 token and a rank (names path:line), a repeated
      token or rank, or no line.
  """
  ranks, seen = {}, set()
  with open(path, 'rb') as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      fields = line.split()
      try:
        token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
        if len(fields) != 2:
          raise ValueError
      except (IndexError, ValueError, binascii.Error):
        raise DataError(
            f'{path}:{number}: not a tiktoken line (a base64 token, a space, its rank):'
            f' {line[:60]!r}'
        ) from None
      if token in ranks or rank in seen:
        raise DataError(f'{path}:{number}: token {token!r} or rank {rank} given twice')
      ranks[token] = rank
      seen.add(rank)
  if not ranks:
    raise DataError(f'{path}: no tiktoken ranks in the file')
  return ranks


def tiktoken_counter(path: str, pattern: str = 'cl100k_base') -> TokenCounter:
  """A counter of a tiktoken BPE file, encoding as `tiktoken` does with no special tokens
  (text such as '<|endoftext|>' is counted as text). `pattern`: a name in
  TIKTOKEN_PATTERNS or a regex. Reads only the file (tiktoken downloads nothing here).

  Raises:
    DataError: not a valid tiktoken file.
    BackendNotInstalledError: tiktoken is not installed.
  """
  try:
    import tiktoken  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise tokenizer_lib.BackendNotInstalledError(
        f'{path} is a tiktoken BPE file, which needs tiktoken ({e}):'
        " pip install 'euro_lm[tiktoken]'"
    ) from e
  ranks = read_tiktoken_ranks(path)
  try:
    encoding = tiktoken.Encoding(
        name=os.path.basename(path),
        pat_str=TIKTOKEN_PATTERNS.get(pattern, pattern),
        mergeable_ranks=ranks,
        special_tokens={},
    )
  except ValueError as e:  # tiktoken's Rust core reports a bad regex so
    raise ConfigError(f'--tiktoken_pattern={pattern!r}: {e}') from e
  vocab_size = max(ranks.values()) + 1
  byte_fallback = np.zeros(vocab_size, bool)
  for token, rank in ranks.items():
    byte_fallback[rank] = not _is_utf8(token)
  return TokenCounter(
      path=path,
      kind=TIKTOKEN,
      vocab_size=vocab_size,
      encode_batch=encoding.encode_ordinary_batch,
      byte_fallback=byte_fallback,
      unknown=np.zeros(vocab_size, bool),
      control=np.zeros(vocab_size, bool),
  )


def load_counter(path: str, tiktoken_pattern: str = 'cl100k_base') -> TokenCounter:
  """The counter of the tokenizer at `path`: a tiktoken BPE file (told by its content), or
  what `load_tokenizer` reads (a SentencePiece `.model`, a `tokenizer.json`, a directory).

  Raises:
    UserError: nothing readable at `path` (names it), or tiktoken is not installed.
  """
  if is_tiktoken_file(path):
    return tiktoken_counter(path, tiktoken_pattern)
  return counter_for(tokenizer_lib.load_tokenizer(path))
