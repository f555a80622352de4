"""Documents from raw files (JSONL, Parquet), and the record readers that
euro_lm.data.conversations shares.

A raw file yields `Document(text, language, location)`. A location is
`path:line` (JSONL, lines from 1) or `path row N` (Parquet, rows from 0).
Prepared ArrayRecord shards are read by euro_lm.data.prepared.

A record that cannot be a document is never dropped silently: each reader
counts it in a `BadRecords` report by kind, with where the first one was, or
raises `DataError` at the first one when the source is strict. A file that
stops before its proper end (a compressed stream cut short or corrupt, a
Parquet file without its footer) is read up to there and marked truncated in
the report, with the byte and line or row; strict, that and a file without a
single record are errors too.
"""

import dataclasses
import glob
import io
import json
import os
import zlib
from collections.abc import Callable, Iterator, Sequence
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
# Compressed bytes per decompressor call: bounds what one call returns (zstd's
# decompressobj has no output limit).
_COMPRESSED_CHUNK = 1 << 16
# A bad record's reason is cut to this many characters: it is one line of a report.
_MAX_REASON_CHARS = 300


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


@dataclasses.dataclass(frozen=True)
class Truncation:
  """Where reading a file stopped before its proper end, and why.

  `byte` is the offset in the file as stored (compressed), None where the
  format does not say; `position` the first line or row not read.
  """

  byte: int | None
  position: int
  reason: str


@dataclasses.dataclass
class BadRecords:
  """The bad records of one input file, by kind (`invalid_json`, ...), and
  whether the file was truncated.

  `position_name` says what positions count: 'line' (JSONL, from 1) or
  'row' (Parquet, from 0). With `strict`, `add`, `truncate` and
  `no_records` raise instead of counting.
  """

  path: str
  position_name: str
  strict: bool = False
  kinds: dict[str, BadKind] = dataclasses.field(default_factory=dict)
  truncated: Truncation | None = None

  def location(self, position: int) -> str:
    if self.position_name == 'line':
      return f'{self.path}:{position}'
    return f'{self.path} {self.position_name} {position}'

  def add(self, kind: str, position: int, reason: str):
    reason = _one_line(reason)
    if self.strict:
      raise DataError(f'{self.location(position)}: {reason}')
    if kind in self.kinds:
      self.kinds[kind].count += 1
    else:
      self.kinds[kind] = BadKind(1, position, reason)

  def truncate(self, byte: int | None, position: int, reason: str):
    """Reading stopped before the file's end: `position` on is lost."""
    self.truncated = Truncation(byte, position, _one_line(reason))
    if self.strict:
      raise DataError(self.truncation_message())

  def no_records(self):
    """The file holds not a single record (a warning unless strict)."""
    if self.strict:
      raise DataError(f'{self.path}: holds no records (an empty file).')

  def truncation_message(self) -> str:
    t = self.truncated
    at_byte = '' if t.byte is None else f' at byte {t.byte}'
    lost = f'{self.position_name}s from {t.position} on are lost'
    return f'{self.path}: truncated{at_byte}: {t.reason}; {lost}.'

  def warning(self, documents: int) -> str | None:
    """What a user must hear about a file that yielded `documents`, if anything."""
    if self.truncated:
      return self.truncation_message()
    if documents:
      return None
    if self.total:
      return f'{self.path}: no documents: all {self.total} records are bad.'
    return f'{self.path}: holds no records (an empty file).'

  @property
  def total(self) -> int:
    return sum(bad.count for bad in self.kinds.values())

  def to_json(self) -> dict:
    return {
        'position_name': self.position_name,
        'kinds': {kind: dataclasses.asdict(bad) for kind, bad in sorted(self.kinds.items())},
    }

  def truncation_json(self) -> dict | None:
    """The truncation as `{'byte', 'line' or 'row', 'reason'}`, None if there is none."""
    if self.truncated is None:
      return None
    t = self.truncated
    return {'byte': t.byte, self.position_name: t.position, 'reason': t.reason}

  @classmethod
  def from_json(cls, path: str, report: dict, truncation: dict | None = None) -> 'BadRecords':
    kinds = {k: BadKind(**v) for k, v in report['kinds'].items()}
    name = report['position_name']
    truncated = truncation and Truncation(
        truncation['byte'], truncation[name], truncation['reason']
    )
    return cls(path, name, kinds=kinds, truncated=truncated)

  def __str__(self) -> str:
    return f'{self.path}: ' + '; '.join(
        f'{bad.count} {kind} (first at {self.position_name} {bad.first}: {bad.reason})'
        for kind, bad in sorted(self.kinds.items())
    )


def _one_line(reason: str) -> str:
  """A reason as one line of a report, cut to _MAX_REASON_CHARS characters."""
  reason = ' '.join(reason.split())
  if len(reason) > _MAX_REASON_CHARS:
    return reason[:_MAX_REASON_CHARS] + '...'
  return reason


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
    language_of = LanguageCache(self.language)
    for line_number, record in jsonl_records(path, bad_records, self.text_field):
      document = self._document(
          record.get(self.text_field),
          record.get(self.language_field) if self.language_field else None,
          language_of,
          bad_records,
          line_number,
      )
      if document is not None:
        yield document

  def _parquet_documents(self, path: str, bad_records: BadRecords) -> Iterator[Document]:
    language_of = LanguageCache(self.language)
    columns = [self.text_field] + ([self.language_field] if self.language_field else [])
    for first_row, batch in parquet_batches(path, bad_records, columns, self._schema_problem):
      # As bytes, so that invalid UTF-8 is one bad row, not a failed batch.
      texts = batch.column(0).cast(pa.large_binary()).to_pylist()
      codes = (
          batch.column(1).cast(pa.large_string()).to_pylist()
          if self.language_field
          else [None] * len(texts)
      )
      for row, (raw_text, code) in enumerate(zip(texts, codes), first_row):
        try:
          text = None if raw_text is None else raw_text.decode('utf-8')
        except UnicodeDecodeError as e:
          bad_records.add(INVALID_UTF8, row, f'invalid UTF-8: {e}')
          continue
        document = self._document(text, code, language_of, bad_records, row)
        if document is not None:
          yield document

  def _schema_problem(self, schema: pa.Schema) -> str | None:
    text_type = schema.field(self.text_field).type
    if not (
        pa.types.is_string(text_type)
        or pa.types.is_large_string(text_type)
        or pa.types.is_binary(text_type)
        or pa.types.is_large_binary(text_type)
    ):
      return f'column {self.text_field!r} holds {text_type}, not text'
    if self.language_field:
      return language_column_problem(schema, self.language_field)
    return None

  def _document(
      self,
      text,
      code,
      language_of: 'LanguageCache',
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


class BadRecord(Exception):
  """A record that cannot be read, with its kind of bad record."""

  def __init__(self, kind: str, reason: str):
    super().__init__(reason)
    self.kind = kind
    self.reason = reason


def parse_json(raw: bytes | str):
  """`raw` as JSON. Raises `BadRecord`: invalid UTF-8 or JSON (an integer past Python's
  digit limit and nesting past its recursion limit included)."""
  try:
    text = raw.decode('utf-8') if isinstance(raw, bytes) else raw
  except UnicodeDecodeError as e:
    raise BadRecord(INVALID_UTF8, f'invalid UTF-8: {e}') from None
  try:
    return json.loads(text)
  except (ValueError, RecursionError) as e:
    raise BadRecord(INVALID_JSON, f'invalid JSON: {e}') from None


def jsonl_records(path: str, bad_records: BadRecords, field: str) -> Iterator[tuple[int, dict]]:
  """The JSON objects of a JSONL file (plain, .gz or .zst), each with its line number.

  A line that is not a JSON object is a bad record (`field`, what an object should hold,
  names it); a compressed stream cut short or corrupt keeps every line before the cut and
  marks the report truncated; a file without a line is reported to hold no records.

  Raises:
    DataError: the file is unreadable, or (strict) holds a bad record.
  """
  line_number = 0
  try:
    with open_binary(path) as lines:
      for line_number, line in enumerate(lines, 1):
        try:
          record = parse_json(line)
        except BadRecord as e:
          bad_records.add(e.kind, line_number, e.reason)
          continue
        if not isinstance(record, dict):
          bad_records.add(
              MISSING_FIELD,
              line_number,
              f'a JSON {type(record).__name__}, not an object with field {field!r}',
          )
          continue
        yield line_number, record
  except Incomplete as e:
    bad_records.truncate(e.byte, line_number + 1, e.reason)
  except OSError as e:
    raise DataError(f'{path}: unreadable after line {line_number}: {e}') from e
  if not line_number and not bad_records.truncated:
    bad_records.no_records()


def parquet_batches(
    path: str,
    bad_records: BadRecords,
    columns: Sequence[str],
    schema_problem: Callable[[pa.Schema], str | None] = lambda schema: None,
    batch_rows: int = _PARQUET_BATCH_ROWS,
) -> Iterator[tuple[int, pa.RecordBatch]]:
  """`columns` of a Parquet file in batches, each with the index of its first row.

  Read row group by row group, page checksums verified where the writer stored them: a
  corrupt group keeps the rows before it and marks the report truncated; a file cut short,
  without a readable footer, is truncated at row 0; a file without rows is reported to hold
  no records.

  Raises:
    DataError: the file is unreadable, lacks one of `columns`, has a schema that
      `schema_problem` describes a problem with, or (strict) is truncated or empty.
  """
  try:
    size = os.path.getsize(path)
  except OSError as e:
    raise DataError(f'{path}: unreadable Parquet file: {e}') from e
  if not size:
    bad_records.no_records()
    return
  try:
    parquet = pq.ParquetFile(path, page_checksum_verification=True)
  except (OSError, pa.ArrowException) as e:
    # The footer, at the end, is the first thing read: a file cut short fails here.
    bad_records.truncate(size, 0, f'no readable Parquet footer (cut short?): {e}')
    return
  schema = parquet.schema_arrow
  for column in columns:
    if column not in schema.names:
      raise DataError(f'{path} has no column {column!r}; its columns are {schema.names}.')
  problem = schema_problem(schema)
  if problem:
    raise DataError(f'{path}: {problem}.')
  if not parquet.metadata.num_rows:
    bad_records.no_records()
  row_start, group = 0, 0  # Of the row group being read.
  try:
    for group in range(parquet.metadata.num_row_groups):
      batch_start = row_start
      for batch in parquet.iter_batches(batch_rows, [group], columns):
        yield batch_start, batch
        batch_start += batch.num_rows
      row_start += parquet.metadata.row_group(group).num_rows
  except (OSError, pa.ArrowException) as e:
    bad_records.truncate(
        _row_group_offset(parquet.metadata.row_group(group)),
        row_start,
        f'unreadable Parquet data in row group {group} ({e})',
    )


def language_column_problem(schema: pa.Schema, column: str) -> str | None:
  """What is wrong with a Parquet column of language codes, if anything: its values must
  be readable as strings."""
  column_type = schema.field(column).type
  try:
    pa.array([], column_type).cast(pa.large_string())
  except pa.ArrowException:
    return f'column {column!r} holds {column_type}, not language codes'
  return None


def _row_group_offset(group: pq.RowGroupMetaData) -> int:
  """Where a Parquet row group's data starts in its file."""
  return min(
      (c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset)
      for c in (group.column(i) for i in range(group.num_columns))
  )


class LanguageCache:
  """Resolves language codes once each: a file repeats a handful of them."""

  def __init__(self, fixed_tag: str):
    self._fixed_tag = fixed_tag
    self._tags = {}  # code -> tag
    self._errors = {}  # code -> why it names no language

  def __call__(self, code: str | None) -> str:
    if self._fixed_tag:
      return self._fixed_tag
    if len(code) > 64:  # Neither cached nor quoted: a hostile file may hold many.
      raise ValueError(f'a string of {len(code):,} characters is no language code')
    if code not in self._tags and code not in self._errors:
      try:
        self._tags[code] = languages.resolve_language(code)
      except ValueError as e:
        self._errors[code] = str(e)
    if code in self._errors:
      raise ValueError(self._errors[code])
    return self._tags[code]


def open_binary(path: str) -> io.BufferedIOBase:
  """The file's bytes, decompressed by its suffix (.gz, .zst, .zstd).

  Reading a compressed file raises `Incomplete` where its stream stops
  before the proper end, after every complete line before that.
  """
  name = path.lower()
  if name.endswith('.gz'):
    return io.BufferedReader(_Decompressed(path, 'gzip'), buffer_size=1 << 20)
  if name.endswith(('.zst', '.zstd')):
    return io.BufferedReader(_Decompressed(path, 'zstd'), buffer_size=1 << 20)
  return open(path, 'rb')


class Incomplete(Exception):
  """A compressed stream stops before its proper end, at compressed `byte`."""

  def __init__(self, byte: int, reason: str):
    super().__init__(reason)
    self.byte = byte
    self.reason = reason


class _Decompressed(io.RawIOBase):
  """A gzip or zstd file's content, member after member (frame after frame).

  Parallel compressors (pigz, pzstd, zstdmt) write several. A decompressor
  object per member says whether the member ended (`eof`): the file must end
  with one that did, or `readinto` raises `Incomplete`, as for corrupt data.
  """

  def __init__(self, path: str, codec: str):
    self._codec = codec
    self._file = open(path, 'rb')
    self._member = None  # The current member's decompressor.
    self._offset = 0  # Compressed bytes read.
    self._pending = memoryview(b'')
    self._error = None  # An Incomplete to raise once the data before it is read.

  def readable(self) -> bool:
    return True

  def close(self):
    self._file.close()
    super().close()

  def readinto(self, buffer) -> int:
    while not self._pending:
      if self._error is not None:
        raise self._error
      data = self._decompress_next()
      if data is None:
        return 0
      self._pending = memoryview(data)
    n = min(len(buffer), len(self._pending))
    buffer[:n] = self._pending[:n]
    self._pending = self._pending[n:]
    return n

  def _new_member(self):
    if self._codec == 'gzip':
      return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    return zstandard.ZstdDecompressor().decompressobj()

  def _decompress_next(self) -> bytes | None:
    """The next chunk's content (maybe empty); None at the file's proper end.

    Corrupt data sets `_error`, raised once what came before it is read.
    """
    chunk_start = self._offset
    chunk = self._file.read(_COMPRESSED_CHUNK)
    self._offset += len(chunk)
    if not chunk:
      if self._member is not None and not self._member.eof:
        raise Incomplete(chunk_start, f'the file ends inside a {self._codec} frame (cut short)')
      return None
    pieces = []
    while chunk:
      if self._member is None or self._member.eof:
        # gzip allows zero padding after the last member, as tar and tape writers add.
        if self._codec == 'gzip' and self._member is not None and not chunk.strip(b'\0'):
          break
        self._member = self._new_member()
      try:
        pieces.append(self._member.decompress(chunk))
      except (zlib.error, zstandard.ZstdError) as e:
        # Where in the chunk is unknown, but not before the data left in it.
        byte = self._offset - len(chunk)
        self._error = Incomplete(byte, f'corrupt {self._codec} data ({e})')
        break
      chunk = self._member.unused_data if self._member.eof else b''
    return b''.join(pieces)
