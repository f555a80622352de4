"""Documents from raw files (JSONL, Parquet).

A raw file yields `Document(text, language, location)`. A location is
`path:line` (JSONL, lines from 1) or `path row N` (Parquet, rows from 0).
Prepared ArrayRecord shards are read by euro_lm.data.prepared.

A record that cannot be a document is never dropped silently: each reader
counts it in a `BadRecords` report by kind, with where the first one was, or
raises `DataError` at the first one when the source is strict.
"""

import dataclasses
import glob
import gzip
import io
import json
import os
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from euro_lm.data import languages
from euro_lm.errors import ConfigError, DataError

FORMATS = ('auto', 'jsonl', 'parquet')

INVALID_JSON = 'invalid_json'
INVALID_UTF8 = 'invalid_utf8'
EMPTY_TEXT = 'empty_text'
MISSING_FIELD = 'missing_field'
NOT_A_STRING = 'not_a_string'
UNKNOWN_LANGUAGE = 'unknown_language'

_JSONL_SUFFIXES = ('.jsonl', '.json', '.ndjson')
_COMPRESSION_SUFFIXES = ('.gz', '.zst', '.zstd')
# Rows per Parquet batch: bounds memory whatever the row-group size.
_PARQUET_BATCH_ROWS = 1024


class Document(NamedTuple):
  text: str
  language: str
  location: str


@dataclasses.dataclass
class BadKind:
  """How many bad records of one kind; the first one's position and reason."""

  count: int
  first: int
  reason: str


@dataclasses.dataclass
class BadRecords:
  """The bad records of one input file, by kind (`invalid_json`, ...).

  `position_name` says what positions count: 'line' (JSONL, from 1) or
  'row' (Parquet, from 0). With `strict`, `add` raises instead of counting.
  """

  path: str
  position_name: str
  strict: bool = False
  kinds: dict[str, BadKind] = dataclasses.field(default_factory=dict)

  def location(self, position: int) -> str:
    if self.position_name == 'line':
      return f'{self.path}:{position}'
    return f'{self.path} {self.position_name} {position}'

  def add(self, kind: str, position: int, reason: str):
    if self.strict:
      raise DataError(f'{self.location(position)}: {reason}')
    if kind in self.kinds:
      self.kinds[kind].count += 1
    else:
      self.kinds[kind] = BadKind(1, position, reason)

  @property
  def total(self) -> int:
    return sum(bad.count for bad in self.kinds.values())

  def to_json(self) -> dict:
    return {
        'position_name': self.position_name,
        'kinds': {kind: dataclasses.asdict(bad) for kind, bad in sorted(self.kinds.items())},
    }

  @classmethod
  def from_json(cls, path: str, report: dict) -> 'BadRecords':
    kinds = {k: BadKind(**v) for k, v in report['kinds'].items()}
    return cls(path, report['position_name'], kinds=kinds)

  def __str__(self) -> str:
    return f'{self.path}: ' + '; '.join(
        f'{bad.count} {kind} (first at {self.position_name} {bad.first}: {bad.reason})'
        for kind, bad in sorted(self.kinds.items())
    )


def expand_globs(patterns: Sequence[str]) -> list[str]:
  """The files the patterns match, sorted and without repeats.

  Raises:
    DataError: a pattern matches no file.
  """
  paths = set()
  for pattern in patterns:
    matches = [
        p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)
    ]
    if not matches:
      raise DataError(f'The input glob {pattern!r} matches no file.')
    paths.update(os.path.abspath(p) for p in matches)
  return sorted(paths)


def file_format(path: str) -> str:
  """'jsonl' or 'parquet', from the file name (`x.jsonl.zst` is 'jsonl')."""
  name = path.lower()
  for suffix in _COMPRESSION_SUFFIXES:
    name = name.removesuffix(suffix)
  if name.endswith(_JSONL_SUFFIXES):
    return 'jsonl'
  if name.endswith('.parquet'):
    return 'parquet'
  raise DataError(
      f'Cannot tell the format of {path} from its name (expected .jsonl,'
      ' .json or .ndjson, optionally .gz/.zst, or .parquet); set the format.'
  )


def _is_string(value, field: str, bad_records: 'BadRecords', position: int) -> bool:
  """Whether a record's field holds a string; reports it as bad otherwise."""
  if value is None:
    bad_records.add(MISSING_FIELD, position, f'no {field!r} (missing or null)')
    return False
  if not isinstance(value, str):
    bad_records.add(NOT_A_STRING, position, f'{field!r} is a {type(value).__name__}, not a string')
    return False
  return True


@dataclasses.dataclass(frozen=True)
class TextSource:
  """How to read documents from raw files.

  Attributes:
    format: 'jsonl', 'parquet', or 'auto' (from each file's name).
    text_field: the JSON field or Parquet column holding the text.
    language_field: the field or column holding each record's language code.
    language: the language of every record; set this or `language_field`.
      Any code `canonical_language` folds; stored as the canonical tag.
    strict: raise `DataError` at the first bad record instead of counting it.
  """

  format: str = 'auto'
  text_field: str = 'text'
  language_field: str = ''
  language: str = ''
  strict: bool = False

  def __post_init__(self):
    if self.format not in FORMATS:
      raise ConfigError(f'format={self.format!r} is not one of {FORMATS}.')
    if bool(self.language_field) == bool(self.language):
      raise ConfigError(
          'Set exactly one of language (every record has it) and'
          ' language_field (each record names its own); got'
          f' language={self.language!r},'
          f' language_field={self.language_field!r}.'
      )
    if self.language:
      try:
        tag = languages.resolve_language(self.language)
      except ValueError as e:
        raise ConfigError(f'language={self.language!r}: {e}') from None
      object.__setattr__(self, 'language', tag)

  def read(self, path: str) -> tuple[Iterator[Document], BadRecords]:
    """The documents of one file, and its bad-record report.

    The report fills as the iterator is consumed.

    Raises (while iterating):
      DataError: the file is unreadable, lacks the text column (Parquet), or
        holds a bad record and the source is strict.
    """
    file_type = file_format(path) if self.format == 'auto' else self.format
    if file_type == 'jsonl':
      bad_records = BadRecords(path, 'line', self.strict)
      return self._jsonl_documents(path, bad_records), bad_records
    bad_records = BadRecords(path, 'row', self.strict)
    return self._parquet_documents(path, bad_records), bad_records

  def _jsonl_documents(self, path: str, bad_records: BadRecords) -> Iterator[Document]:
    language_of = _LanguageCache(self.language)
    line_number = 0
    try:
      with _open_binary(path) as lines:
        for line_number, line in enumerate(lines, 1):
          try:
            record = json.loads(line.decode('utf-8'))
          except UnicodeDecodeError as e:
            bad_records.add(INVALID_UTF8, line_number, f'invalid UTF-8: {e}')
            continue
          except json.JSONDecodeError as e:
            bad_records.add(INVALID_JSON, line_number, f'invalid JSON: {e}')
            continue
          if not isinstance(record, dict):
            bad_records.add(
                MISSING_FIELD,
                line_number,
                f'a JSON {type(record).__name__}, not an object with field {self.text_field!r}',
            )
            continue
          document = self._document(
              record.get(self.text_field),
              record.get(self.language_field) if self.language_field else None,
              language_of,
              bad_records,
              line_number,
          )
          if document is not None:
            yield document
    except (OSError, EOFError, zstandard.ZstdError) as e:
      raise DataError(f'{path}: unreadable after line {line_number}: {e}') from e

  def _parquet_documents(self, path: str, bad_records: BadRecords) -> Iterator[Document]:
    language_of = _LanguageCache(self.language)
    columns = [self.text_field] + ([self.language_field] if self.language_field else [])
    try:
      parquet = pq.ParquetFile(path)
      schema = parquet.schema_arrow
      for column in columns:
        if column not in schema.names:
          raise DataError(f'{path} has no column {column!r}; its columns are {schema.names}.')
      text_type = schema.field(self.text_field).type
      if not (
          pa.types.is_string(text_type)
          or pa.types.is_large_string(text_type)
          or pa.types.is_binary(text_type)
          or pa.types.is_large_binary(text_type)
      ):
        raise DataError(f'{path}: column {self.text_field!r} holds {text_type}, not text.')
      batch_start = 0
      for batch in parquet.iter_batches(_PARQUET_BATCH_ROWS, columns=columns):
        # As bytes, so that invalid UTF-8 is one bad row, not a failed batch.
        texts = batch.column(0).cast(pa.large_binary()).to_pylist()
        codes = (
            batch.column(1).cast(pa.large_string()).to_pylist()
            if self.language_field
            else [None] * len(texts)
        )
        for row, (raw_text, code) in enumerate(zip(texts, codes), batch_start):
          try:
            text = None if raw_text is None else raw_text.decode('utf-8')
          except UnicodeDecodeError as e:
            bad_records.add(INVALID_UTF8, row, f'invalid UTF-8: {e}')
            continue
          document = self._document(text, code, language_of, bad_records, row)
          if document is not None:
            yield document
        batch_start += batch.num_rows
    except (OSError, pa.ArrowException) as e:
      raise DataError(f'{path}: unreadable Parquet file: {e}') from e

  def _document(
      self,
      text,
      code,
      language_of: '_LanguageCache',
      bad_records: BadRecords,
      position: int,
  ) -> Document | None:
    """The record as a document, or None after reporting why it is bad."""
    if not _is_string(text, self.text_field, bad_records, position):
      return None
    if not text.strip():
      bad_records.add(EMPTY_TEXT, position, f'{self.text_field!r} is empty or whitespace')
      return None
    # JSON escapes can spell lone surrogates, which have no UTF-8 form.
    try:
      text.encode('utf-8')
    except UnicodeEncodeError as e:
      bad_records.add(INVALID_UTF8, position, f'text is not valid Unicode: {e}')
      return None
    if self.language_field and not _is_string(code, self.language_field, bad_records, position):
      return None
    try:
      language = language_of(code)
    except ValueError as e:
      bad_records.add(UNKNOWN_LANGUAGE, position, str(e))
      return None
    return Document(text, language, bad_records.location(position))


class _LanguageCache:
  """Resolves language codes once each: a file repeats a handful of them."""

  def __init__(self, fixed_tag: str):
    self._fixed_tag = fixed_tag
    self._tags = {}  # code -> tag
    self._errors = {}  # code -> why it names no language

  def __call__(self, code: str | None) -> str:
    if self._fixed_tag:
      return self._fixed_tag
    if code not in self._tags and code not in self._errors:
      try:
        self._tags[code] = languages.resolve_language(code)
      except ValueError as e:
        self._errors[code] = str(e)
    if code in self._errors:
      raise ValueError(self._errors[code])
    return self._tags[code]


def _open_binary(path: str) -> io.BufferedIOBase:
  """The file's bytes, decompressed by its suffix (.gz, .zst, .zstd)."""
  name = path.lower()
  if name.endswith('.gz'):
    return gzip.open(path, 'rb')
  if name.endswith(('.zst', '.zstd')):
    # Parallel compressors (pzstd, zstdmt) write several frames.
    stream = zstandard.ZstdDecompressor().stream_reader(
        open(path, 'rb'), read_across_frames=True, closefd=True
    )
    return io.BufferedReader(stream, buffer_size=1 << 20)
  return open(path, 'rb')
