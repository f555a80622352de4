"""A prepared directory: its layout, manifest and token shards, and their readers.

`python -m euro_lm.prepare_data` (euro_lm.data.prepare.shards) writes, and
training with `data.corpus='prepared'` reads, a directory that holds:

  <tag>/shard-<unit>-<NNNNN>.array_record  one record per document: its token
      ids as little-endian int32 bytes, without bos/eos (the packer adds them)
  receipts/<unit>.json  one per finished input file
  manifest.json  per language: documents, tokens, UTF-8 bytes, characters and
      shards; the tokenizer's fingerprint; each input's documents, counts, bad
      records and truncation (null, or where reading stopped)

`prepare_data --chat` writes conversations the same way (manifest `kind`
'conversations', CONVERSATIONS): a record is one conversation, its token ids as
above followed by its loss mask, one uint8 per token (1: a target that counts,
see euro_lm.data.chat); the counts are documents (conversations), tokens,
assistant_tokens (the mask's ones) and longest (the most tokens of one); the
manifest also holds the chat template the ids were rendered with and its
fingerprint. Languages are tags, `und` for
conversations without one.

Where the manifest exists, the directory is complete. Read sequentially, a
shard yields `TokenizedDocument(tokens, language, location)`, the location
`path[record]` (records from 0).
"""

import json
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from array_record.python import array_record_module

from euro_lm.data import languages
from euro_lm.errors import DataError

if TYPE_CHECKING:
  import grain

MANIFEST = 'manifest.json'
VERSION = 1
# One record per chunk, so that Grain's random access decompresses only the
# document it reads.
WRITER_OPTIONS = 'group_size:1'
# A record's token ids: little-endian int32.
TOKEN_DTYPE = '<i4'
# A conversation record's loss mask after its ids: one byte per token.
MASK_DTYPE = 'u1'
# The manifest `kind` of a directory of conversations; text directories have none.
CONVERSATIONS = 'conversations'
# Records per ArrayRecord read: bounds memory whatever the shard size.
_ARRAY_RECORD_BATCH = 1024


class TokenizedDocument(NamedTuple):
  tokens: np.ndarray  # int32 [num_tokens], no bos/eos
  language: str
  location: str


def read_manifest(directory: str) -> dict:
  """The manifest of a prepared directory.

  Raises:
    DataError: no manifest, an unreadable one, or one of another version.
  """
  path = os.path.join(directory, MANIFEST)
  try:
    with open(path) as f:
      manifest = json.load(f)
  except FileNotFoundError:
    raise DataError(
        f'No {MANIFEST} in {directory}: prepare it with `python -m euro_lm.prepare_data`.'
    ) from None
  except json.JSONDecodeError as e:
    raise DataError(f'{path} is not valid JSON: {e}') from e
  if manifest.get('version') != VERSION:
    raise DataError(
        f'{path} has version {manifest.get("version")!r}; this euro_lm reads'
        f' version {VERSION}. Prepare the data again.'
    )
  return manifest


def iter_tokens(directory: str, language: str) -> Iterator[np.ndarray]:
  """The documents of one language as int32 token ids, in manifest order.

  Raises:
    DataError: the language is not in the manifest, or a shard is missing,
      corrupt or holds other than the manifest's record count, or the directory holds
      conversations (read them with `document_source`).
  """
  manifest = read_manifest(directory)
  if manifest.get('kind') == CONVERSATIONS:
    raise DataError(f'{directory} holds conversations, not text documents.')
  try:
    tag = languages.resolve_language(language)
  except ValueError as e:
    raise DataError(str(e)) from None
  if tag not in manifest['languages']:
    raise DataError(
        f'{directory} holds no {tag} documents; it holds'
        f' {", ".join(manifest["languages"]) or "none"}.'
    )
  for shard in manifest['languages'][tag]['shards']:
    for document in read_array_record(
        os.path.join(directory, shard['path']), tag, expected_records=shard['documents']
    ):
      yield document.tokens


def conversation_record(ids: np.ndarray, loss_mask: np.ndarray) -> bytes:
  """A conversation as one record: int32 ids, then one uint8 mask value per token."""
  return np.asarray(ids, TOKEN_DTYPE).tobytes() + np.asarray(loss_mask, MASK_DTYPE).tobytes()


def read_conversation(record: bytes) -> tuple[np.ndarray, np.ndarray]:
  """(ids, loss_mask), both int32, of a `conversation_record`."""
  length, remainder = divmod(len(record), 5)
  if remainder:
    raise DataError(f'a record of {len(record)} bytes is not a conversation (5 bytes a token)')
  ids = np.frombuffer(record, TOKEN_DTYPE, length).astype(np.int32)
  return ids, np.frombuffer(record, MASK_DTYPE, length, 4 * length).astype(np.int32)


def document_source(directory: str, language: str) -> 'grain.MapDataset':
  """Random access to one language's documents (int32 token ids), or of a conversations
  directory (manifest kind CONVERSATIONS) its conversations as (ids, loss_mask) int32 pairs.

  Raises:
    DataError: the language is not in the manifest, or its shards hold other
      than the manifest's record counts.
  """
  manifest = read_manifest(directory)
  entry = manifest['languages'].get(language)
  if entry is None:
    raise DataError(
        f'{directory} holds no {language} documents; it holds'
        f' {", ".join(manifest["languages"]) or "none"}.'
    )
  paths = [os.path.join(directory, shard['path']) for shard in entry['shards']]
  # Here, not at the top: prepare_data and its workers need no grain (nor the jax it imports).
  import grain

  try:
    records = grain.sources.ArrayRecordDataSource(paths)
  except Exception as e:  # array_record raises several types for bad files
    raise DataError(f'cannot open the {language} shards of {directory}: {e}') from e
  if len(records) != entry['documents']:
    raise DataError(
        f'the {language} shards of {directory} hold {len(records)} documents'
        f' but {MANIFEST} lists {entry["documents"]}: prepare the data again.'
    )
  if manifest.get('kind') == CONVERSATIONS:
    return grain.MapDataset.source(records).map(read_conversation)
  return grain.MapDataset.source(records).map(lambda record: np.frombuffer(record, TOKEN_DTYPE))


def read_array_record(
    path: str, language: str, *, expected_records: int | None = None
) -> Iterator[TokenizedDocument]:
  """The token ids of a prepared shard: one record per document.

  Args:
    path: a shard written by `euro_lm.data.prepare.shards`.
    language: the shard's language (any code `canonical_language` folds).
    expected_records: if given, the shard must hold exactly this many.

  Raises (while iterating):
    DataError: the shard is missing, corrupt, or holds a different number of
      records; names the file.
  """
  language = languages.resolve_language(language)
  if not os.path.isfile(path):
    raise DataError(f'No ArrayRecord shard at {path}.')
  try:
    reader = array_record_module.ArrayRecordReader(path)
  except (OSError, RuntimeError, ValueError) as e:
    raise DataError(f'{path}: unreadable ArrayRecord shard: {e}') from e
  # A corrupt or truncated shard opens without an error, as "not ok"; closing
  # it would raise.
  if not reader.ok():
    raise DataError(f'{path}: corrupt or truncated ArrayRecord shard.')
  try:
    num_records = reader.num_records()
    if expected_records is not None and num_records != expected_records:
      raise DataError(
          f'{path} holds {num_records} records, but the manifest says'
          f' {expected_records}: the shard is truncated or was replaced.'
      )
    for start in range(0, num_records, _ARRAY_RECORD_BATCH):
      stop = min(start + _ARRAY_RECORD_BATCH, num_records)
      try:
        records = reader.read(start, stop)
      except (RuntimeError, ValueError) as e:
        raise DataError(f'{path}: corrupt ArrayRecord shard: {e}') from e
      for index, record in enumerate(records, start):
        if len(record) % 4:
          raise DataError(f'{path}[{index}]: {len(record)} bytes, not int32 token ids.')
        yield TokenizedDocument(
            np.frombuffer(record, TOKEN_DTYPE).astype(np.int32),
            language,
            f'{path}[{index}]',
        )
  finally:
    reader.close()
