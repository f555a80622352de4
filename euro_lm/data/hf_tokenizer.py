"""A Hugging Face `tokenizer.json` (the `tokenizers` library transformers itself runs), with
the special tokens of the `tokenizer_config.json` beside it.

This is how Llama 3, Qwen, Gemma 3 and Mistral ship their tokenizers. Ids equal transformers'
`AutoTokenizer` on the same folder: `encode` is `AutoTokenizer(text,
add_special_tokens=False)`, and `adds_bos` says whether AutoTokenizer's default prepends BOS.
"""

import functools
import hashlib
import json
import os
import re
from collections.abc import Sequence

import numpy as np

from euro_lm.errors import DataError, read_json_object

TOKENIZER_JSON = 'tokenizer.json'
# Files of an HF tokenizer besides tokenizer.json: its special tokens and chat template.
COMPANION_FILES = ('tokenizer_config.json', 'special_tokens_map.json', 'chat_template.jinja')
# The named special tokens transformers passes to chat templates (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = (
    'bos_token',
    'eos_token',
    'unk_token',
    'sep_token',
    'pad_token',
    'cls_token',
    'mask_token',
)


class HFTokenizer:
  """A `tokenizer.json` and its companion files; see `euro_lm.data.tokenizer.Tokenizer`."""

  backend = 'tokenizers'

  def __init__(self, path: str):
    """`path`: a tokenizer.json file or a directory holding one.

    Raises:
      DataError: no such file, not a tokenizers file, or a companion file that is not
        valid JSON or names a special token the vocabulary lacks.
    """
    json_path = os.path.join(path, TOKENIZER_JSON) if os.path.isdir(path) else path
    if not os.path.isfile(json_path):
      raise DataError(f'No Hugging Face tokenizer file at {json_path}.')
    import tokenizers  # pylint: disable=import-outside-toplevel

    try:
      with open(json_path, 'rb') as f:
        self._json_bytes = f.read()
      self._tokenizer = tokenizers.Tokenizer.from_str(self._json_bytes.decode('utf-8'))
    except Exception as e:  # tokenizers raises a bare Exception
      raise DataError(f'{json_path} is not a valid tokenizers file: {e}') from e
    self._path = path
    self._json_path = json_path
    directory = os.path.dirname(json_path)
    built, alone = _transformers_builds(self._json_bytes, directory)
    self._rebuilt = _rebuild(self._tokenizer, built, directory)
    # A copy leaves the model's config.json behind: where that chose another pipeline than
    # the tokenizer files alone give, the copy names the class that builds this one.
    self._class_for_copies = None
    if built != alone:
      other = self._tokenizer_from_file()
      _rebuild(other, alone, directory)
      if _ids_pipeline(_described(other)) != _ids_pipeline(_described(self._tokenizer)):
        self._class_for_copies = _CLASS_NAMES[built]
    special = _special_tokens(directory)
    self._bos_id = self._token_id(special.get('bos_token'), 'bos_token', directory)
    self._eos_id = self._token_id(special.get('eos_token'), 'eos_token', directory)
    self._pad_id = self._token_id(special.get('pad_token'), 'pad_token', directory)
    self._adds_bos = self._default_adds_bos(special.get('add_bos_token'))
    self._special_tokens = {k: v for k, v in special.items() if k != 'add_bos_token' and v}
    self._files = [json_path] + [
        p for p in (os.path.join(directory, n) for n in COMPANION_FILES) if os.path.isfile(p)
    ]

  def _token_id(self, token, field, directory):
    if token is None:
      return None
    token_id = self._tokenizer.token_to_id(token)
    if token_id is None:
      raise DataError(
          f'{directory}: {field}={token!r} is not a token of {self._json_path}; the model could '
          'not mark documents with it'
      )
    return token_id

  def _default_adds_bos(self, configured):
    """What AutoTokenizer does by default: the config's add_bos_token when it sets one
    (transformers then rebuilds the post-processor from it), else the file's post-processor."""
    if self._bos_id is None:
      return False
    if configured is not None:
      return bool(configured)
    probe = 'a b'
    bare = self._tokenizer.encode(probe, add_special_tokens=False).ids
    full = self._tokenizer.encode(probe, add_special_tokens=True).ids
    return full[:1] == [self._bos_id] and full[1 : 1 + len(bare)] == bare

  @property
  def path(self) -> str:
    return self._path

  @property
  def files(self) -> list[str]:
    """The files that make this tokenizer, tokenizer.json first."""
    return list(self._files)

  @property
  def class_for_copies(self) -> str | None:
    """The tokenizer_class a copy's tokenizer_config.json must name for transformers to read
    the copy as it reads this folder, where the class named here would not do: a folder
    whose model config.json (which copies leave behind) chose the pipeline (an older
    Mistral conversion under LlamaTokenizer keeps its own; a Qwen2 model's tokenizer is
    Qwen2Tokenizer's whatever it names; a class named there alone). None: copies are as
    the files are."""
    return self._class_for_copies

  def _tokenizer_from_file(self):
    import tokenizers  # pylint: disable=import-outside-toplevel

    return tokenizers.Tokenizer.from_str(self._json_bytes.decode('utf-8'))

  @functools.cached_property
  def fingerprint(self) -> str:
    """sha256 over what fixes the ids: tokenizer.json and the special token ids (the chat
    template and other settings may change without changing what a model was trained on)."""
    special = json.dumps([self._bos_id, self._eos_id, self._pad_id, self._adds_bos])
    rebuilt = f'\0{self._rebuilt}'.encode() if self._rebuilt else b''  # other ids than the file's
    return hashlib.sha256(self._json_bytes + rebuilt + b'\0' + special.encode()).hexdigest()

  @functools.cached_property
  def vocab_size(self) -> int:
    """One more than the largest id, added tokens included (embedding rows it needs)."""
    return max(self._tokenizer.get_vocab(with_added_tokens=True).values()) + 1

  @property
  def bos_id(self) -> int | None:
    return self._bos_id

  @property
  def eos_id(self) -> int | None:
    return self._eos_id

  @property
  def pad_id(self) -> int:
    """The pad id, or -1 if the tokenizer has none."""
    return -1 if self._pad_id is None else self._pad_id

  @property
  def adds_bos(self) -> bool:
    """Whether transformers' AutoTokenizer prepends BOS by default."""
    return self._adds_bos

  @property
  def special_tokens(self) -> dict[str, str]:
    """The named special tokens the config sets (bos_token, ...), as transformers'
    `special_tokens_map`: what chat templates see."""
    return dict(self._special_tokens)

  def encode(self, text: str) -> list[int]:
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """`encode(text)` and each token's (start, end) character span in `text`."""
    encoding = self._tokenizer.encode(text, add_special_tokens=False)
    return encoding.ids, encoding.offsets

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    encodings = self._tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
    return [e.ids for e in encodings]

  def decode(self, ids: Sequence[int]) -> str:
    """The text of `ids`, special tokens (BOS, EOS, chat markers) left out."""
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  def token_bytes(self) -> np.ndarray:
    """UTF-8 bytes each token adds to decoded text, int32 [vocab_size], read-only.

    Byte-level vocabularies (Llama 3, Qwen) map each character of a piece back to one
    byte; SentencePiece-style ones (Gemma, Mistral) count `<0xNN>` byte pieces as 1 and
    '▁' as the space it decodes to. Special tokens count 0.
    """
    return self._token_bytes

  @functools.cached_property
  def _token_bytes(self) -> np.ndarray:
    byte_level = is_byte_level(json.loads(self._json_bytes))
    added = self._tokenizer.get_added_tokens_decoder()
    counts = np.zeros(self.vocab_size, np.int32)
    for piece, i in self._tokenizer.get_vocab(with_added_tokens=True).items():
      if i in added:  # matched in the raw text, decoded as their content
        counts[i] = 0 if added[i].special else len(added[i].content.encode('utf-8'))
      else:
        counts[i] = len(piece_bytes(piece, byte_level))
    counts.flags.writeable = False
    return counts


def is_byte_level(description: dict) -> bool:
  """Whether a parsed tokenizer.json spells pieces in GPT-2's byte alphabet (Llama 3, Qwen)."""
  return 'ByteLevel' in json.dumps(description.get('decoder'))


def is_byte_piece(piece: str) -> bool:
  """Whether a piece is a SentencePiece-style byte-fallback piece `<0xNN>` (Gemma, Mistral)."""
  return re.fullmatch('<0x[0-9A-Fa-f]{2}>', piece) is not None


def piece_bytes(piece: str, byte_level: bool) -> bytes:
  """The bytes a vocabulary piece (not an added token) decodes to: a byte-level piece's
  bytes (possibly part of a character), a `<0xNN>` piece's byte, else its text with '▁' as
  a space. `byte_level`: see `is_byte_level`."""
  byte_of_char = _byte_of_char()
  if byte_level and all(c in byte_of_char for c in piece):
    return bytes(byte_of_char[c] for c in piece)
  if is_byte_piece(piece):
    return bytes([int(piece[3:5], 16)])
  return piece.replace('\u2581', ' ').encode('utf-8')


@functools.cache
def _byte_of_char():
  return {c: b for b, c in _bytes_to_unicode().items()}


# Classes whose tokenizer transformers 5 rebuilds from tokenizer.json's vocabulary and merges
# with a pipeline of its own; of those, LlamaTokenizer's differs from released files: older
# conversions (Llama 2, Mistral v0.1) prepend '▁' in a normalizer, after every special token.
_LLAMA_CLASSES = ('LlamaTokenizer', 'LlamaTokenizerFast')
_QWEN2_CLASSES = ('Qwen2Tokenizer', 'Qwen2TokenizerFast')
# Model types (config.json beside the tokenizer) whose AutoTokenizer is the file's own
# pipeline whatever class tokenizer_config.json names (transformers 5's TOKENIZER_MAPPING:
# TokenizersBackend for the Mistral family).
_OWN_PIPELINE_MODEL_TYPES = frozenset(
    {'mistral', 'mistral3', 'mixtral', 'ministral', 'ministral3', 'pixtral'}
)
# Pipelines transformers 5 builds in place of the file's ('': the file's own), and the
# tokenizer_class that names each in transformers 4 and 5.
_LLAMA, _QWEN2 = 'llama', 'qwen2'
_CLASS_NAMES = {'': 'PreTrainedTokenizerFast', _LLAMA: 'LlamaTokenizer', _QWEN2: 'Qwen2Tokenizer'}


def _transformers_builds(json_bytes, directory) -> tuple[str, str]:
  """(the pipeline transformers 5's AutoTokenizer builds for the folder, the one it builds
  for the tokenizer files alone): `_LLAMA` (LlamaTokenizer's), `_QWEN2` (Qwen2Tokenizer's)
  or '' (tokenizer.json's own). The model's config.json beside them decides too: its
  `tokenizer_class` where tokenizer_config.json names none; Mistral models keep the file's
  pipeline under any class; Qwen2 models (and Qwen3 ones naming no class) get
  Qwen2Tokenizer's under any class (DeepSeek-R1-Distill-Qwen names Llama's)."""
  path = os.path.join(directory, 'tokenizer_config.json')
  named = (read_json_object(path, DataError) if os.path.isfile(path) else {}).get('tokenizer_class')
  path = os.path.join(directory, 'config.json')
  model = read_json_object(path, DataError) if os.path.isfile(path) else {}
  declared = named if named is not None else model.get('tokenizer_class')
  alone, by_class = (_pipeline_of_class(c, json_bytes) for c in (named, declared))
  model_type = model.get('model_type')
  if model_type == 'qwen2' or (model_type == 'qwen3' and declared is None):
    return _QWEN2, alone
  if model_type in _OWN_PIPELINE_MODEL_TYPES and by_class == _LLAMA:
    return '', alone
  return by_class, alone


def _pipeline_of_class(tokenizer_class, json_bytes) -> str:
  """The pipeline transformers 5 builds under `tokenizer_class` alone."""
  if tokenizer_class in _QWEN2_CLASSES:
    return _QWEN2
  if tokenizer_class in _LLAMA_CLASSES and b'"ByteLevel"' not in json_bytes:
    return _LLAMA  # transformers never gives a byte-level file LlamaTokenizer's pipeline
  return ''


def _rebuild(tokenizer, pipeline, directory) -> str:
  """Gives `tokenizer` the `pipeline` transformers builds (`_transformers_builds`); returns
  what changed the file's ids ('' if nothing did)."""
  if pipeline == _LLAMA:
    return _as_llama_tokenizer_builds(tokenizer, directory)
  if pipeline == _QWEN2:
    return _as_qwen2_tokenizer_builds(tokenizer, directory)
  return ''


# Qwen2Tokenizer's pre-tokenizer split (transformers 5): single digits, unlike Llama 3's.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r'|\s*[\r\n]+|\s+(?!\S)|\s+'
)


def _as_qwen2_tokenizer_builds(tokenizer, directory) -> str:
  """Gives a tokenizer that transformers reads as Qwen2Tokenizer the pipeline transformers 5
  builds for it from the file's vocabulary and merges: NFC, Qwen's split, byte-level
  (`add_prefix_space` as tokenizer_config.json says, else off), keeping the file's offset
  trimming and byte-level decoder (neither changes an id). Returns 'qwen2' where that
  changed the ids' pipeline (a Qwen folder's own is this one), else ''."""
  from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers  # pylint: disable=import-outside-toplevel

  if not isinstance(tokenizer.model, models.BPE):
    return ''
  path = os.path.join(directory, 'tokenizer_config.json')
  config = read_json_object(path, DataError) if os.path.isfile(path) else {}
  described = _described(tokenizer)
  before = _ids_pipeline(described)
  trim = '"trim_offsets": false' not in json.dumps(described.get('pre_tokenizer'))
  model = tokenizer.model
  model.dropout, model.unk_token = None, None
  model.continuing_subword_prefix, model.end_of_word_suffix = '', ''
  model.fuse_unk = model.byte_fallback = model.ignore_merges = False
  tokenizer.normalizer = normalizers.NFC()
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
      [
          pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior='isolated', invert=False),
          pre_tokenizers.ByteLevel(
              add_prefix_space=bool(config.get('add_prefix_space')),
              trim_offsets=trim,
              use_regex=False,
          ),
      ]
  )
  if (described.get('decoder') or {}).get('type') != 'ByteLevel':
    tokenizer.decoder = decoders.ByteLevel()
    return _QWEN2
  return _QWEN2 if _ids_pipeline(_described(tokenizer)) != before else ''


def _described(tokenizer) -> dict:
  return json.loads(tokenizer.to_str())


def _ids_pipeline(described) -> str:
  """What of a tokenizer's pipeline (`_described`) decides its ids: the normalizer, the
  pre-tokenizer (offset trimming aside) and the model's settings (its vocabulary aside)."""
  model = {k: v for k, v in described['model'].items() if k not in ('vocab', 'merges')}
  pre = re.sub(r'"trim_offsets": (true|false), ', '', json.dumps(described.get('pre_tokenizer')))
  return json.dumps([described.get('normalizer'), pre, model])


def _as_llama_tokenizer_builds(tokenizer, directory) -> str:
  """Gives a tokenizer that transformers reads as LlamaTokenizer (`_LLAMA`) the
  normalizer, pre-tokenizer and decoder transformers 5 builds for it: Metaspace, prepending
  '▁' to the first piece of text only ('first'; 'always' with `legacy: true`; 'never'
  with `add_prefix_space: false`). Returns that scheme where it changed the file's
  pipeline, else ''."""
  path = os.path.join(directory, 'tokenizer_config.json')
  config = read_json_object(path, DataError) if os.path.isfile(path) else {}
  from tokenizers import decoders, models, pre_tokenizers  # pylint: disable=import-outside-toplevel

  if not isinstance(tokenizer.model, models.BPE):
    return ''
  before = tokenizer.to_str()
  add_prefix_space = config.get('add_prefix_space')
  add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
  scheme = ('always' if config.get('legacy') else 'first') if add_prefix_space else 'never'
  tokenizer.model.fuse_unk = True
  tokenizer.model.byte_fallback = True
  tokenizer.normalizer = None
  tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
      replacement='\u2581', prepend_scheme=scheme, split=False
  )
  steps = [decoders.Replace('\u2581', ' '), decoders.ByteFallback(), decoders.Fuse()]
  tokenizer.decoder = decoders.Sequence(
      steps + ([decoders.Strip(content=' ', left=1)] if add_prefix_space else [])
  )
  return scheme if tokenizer.to_str() != before else ''


def _special_tokens(directory):
  """The named special tokens and add_bos_token of tokenizer_config.json, as transformers 5
  reads them: special_tokens_map.json's tokens over them only in a legacy folder, whose
  config has no added_tokens_decoder. Named tokens are the standard ones
  (SPECIAL_TOKEN_NAMES), a model's own (`extra_special_tokens` given as a dict, such as
  Gemma 3's image_token) and any other `*_token` string field."""
  settings = {}
  for name in ('tokenizer_config.json', 'special_tokens_map.json'):
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      continue
    values = read_json_object(path, DataError)
    for key in (*SPECIAL_TOKEN_NAMES, 'add_bos_token'):
      if key in values:
        settings[key] = _token_content(values[key], key, path)
    named = values.get('extra_special_tokens')
    own = {k: v for k, v in values.items() if k.endswith('_token') and k not in settings}
    for key, value in (own | (named if isinstance(named, dict) else {})).items():
      if isinstance(value, str) or (isinstance(value, dict) and 'content' in value):
        settings[key] = _token_content(value, key, path)
    if 'added_tokens_decoder' in values:
      break  # the config is complete: transformers 5 does not read the map
  return settings


def _token_content(value, key, path):
  """A special token as a string: transformers writes a plain string or an AddedToken dict."""
  if key == 'add_bos_token':
    if not isinstance(value, bool | None):
      raise DataError(f'{path}: add_bos_token={value!r} is not true, false or null')
    return value
  if isinstance(value, dict):
    value = value.get('content')
  if not isinstance(value, str | None):
    raise DataError(f'{path}: {key}={value!r} is not a token string')
  return value


@functools.cache
def _bytes_to_unicode():
  """GPT-2's byte -> printable character table that byte-level BPE vocabularies use."""
  printable = [*range(ord('!'), ord('~') + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
  table, extra = {}, 0
  for b in range(256):
    if b in printable:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table
