"""Raw text files -> tokenized ArrayRecord shards per language, and a manifest;
conversation files (a ConversationSource) likewise, each record a conversation's ids
and loss mask rendered with a chat template.

The output directory's layout, and what reads it, are in euro_lm.data.prepared.

A unit is one input file and the shards made from it; `<unit>` is a hash of
the file's absolute path. A unit is finished once its receipt exists. Shards
are written as `*.tmp` and renamed when complete, then the receipt is written
(temp file + rename), so a crash leaves nothing that looks finished, and a
re-run redoes only the units without a receipt. The manifest is written
last, and removed while units are redone: where it exists, it is complete.
"""

import ctypes
import dataclasses
import functools
import glob
import hashlib
import json
import multiprocessing
import os
import queue
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import tqdm
from array_record.python import array_record_module

from euro_lm.data import chat, conversations, prepared
from euro_lm.data.prepare import sources
from euro_lm.data.tokenizer import Tokenizer, load_tokenizer
from euro_lm.errors import ConfigError, DataError

_RECEIPTS = 'receipts'
_COUNTS = ('documents', 'tokens', 'bytes', 'characters')
_CONVERSATION_COUNTS = ('documents', 'tokens', 'assistant_tokens', 'longest')
# Counts that are maxima, not sums: the longest conversation, in tokens.
_MAXIMA = ('longest',)
# Documents between progress reports from a worker.
_PROGRESS_EVERY = 256
# prctl's option that signals this process when its parent dies (linux/prctl.h).
_PR_SET_PDEATHSIG = 1


@dataclasses.dataclass(frozen=True)
class _Unit:
  """One input file to turn into shards: all a worker process needs."""

  input_path: str
  unit_id: str
  output_dir: str
  source: sources.TextSource | conversations.ConversationSource
  tokenizer_path: str
  docs_per_shard: int
  settings: dict
  source_record: dict | None = None
  chat_template: str = ''  # conversations: the template's text
  template_variables: dict | None = None  # conversations: the template's other variables
  max_length: int = 0  # conversations: longer ones are too_long bad records (0: no limit)

  @property
  def counts(self) -> tuple[str, ...]:
    return _CONVERSATION_COUNTS if self.chat_template else _COUNTS

  @property
  def receipt_path(self) -> str:
    return os.path.join(self.output_dir, _RECEIPTS, f'{self.unit_id}.json')

  def shard_name(self, language: str, index: int) -> str:
    return f'{language}/shard-{self.unit_id}-{index:05d}.array_record'


def default_workers() -> int:
  """The CPUs this process may use (a SLURM job's share, not the node's)."""
  if hasattr(os, 'sched_getaffinity'):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def prepare(
    input_globs: Sequence[str],
    output_dir: str,
    tokenizer_path: str,
    source: sources.TextSource | conversations.ConversationSource,
    *,
    docs_per_shard: int = 50_000,
    workers: int | None = None,
    progress: bool = False,
    source_record: dict | None = None,
    chat_template: str = '',
    max_length: int = 0,
    template_variables: dict | None = None,
) -> dict:
  """Tokenizes the files the globs match into `output_dir`.

  With a ConversationSource each record is a conversation rendered with `chat_template`
  as `data.chat_template` names it ('' the tokenizer folder's, else the default;
  'default'; a .jinja file), its ids and loss mask (`chat.chat_example`, assistant turns
  only; a run's data.prompt_loss widens it), with `template_variables` (as
  data.chat_template_kwargs gives them); conversations longer than `max_length` tokens (if
  > 0) are too_long bad records. The manifest holds the template and its variables.

  Returns the manifest, which is also written to `output_dir/manifest.json`.
  Input files are prepared in parallel by `workers` processes (default: the
  CPUs this process may use). Files finished by an earlier run into the same
  directory are skipped. `source_record` (euro_lm.provenance.source_record) says where
  the inputs came from; the manifest keeps it as `source` (None: undescribed; a re-run
  without it keeps the one its input files were prepared under, if they agree). The
  manifest lists this run's input files only, in sorted order, so it does not depend on
  which worker did what.

  An input cut short or corrupt is prepared up to there and marked
  `truncated` in the manifest; `input_warnings` says which inputs were
  truncated or yielded no document.

  Raises:
    DataError: a glob matches nothing, the tokenizer or an input is
      unreadable, or (with `source.strict`) an input holds a bad record, is
      truncated or holds no record.
    ConfigError: `docs_per_shard` or `workers` < 1, or `output_dir` holds
      units prepared with other settings (tokenizer, fields, template or shard size).
  """
  if docs_per_shard < 1:
    raise ConfigError(f'docs_per_shard={docs_per_shard} must be at least 1.')
  workers = default_workers() if workers is None else workers
  if workers < 1:
    raise ConfigError(f'workers={workers} must be at least 1.')
  inputs = sources.expand_globs(input_globs)
  tokenizer = load_tokenizer(tokenizer_path)
  tokenizer_info = {
      'path': os.path.abspath(tokenizer_path),
      'sha256': tokenizer.fingerprint,
      'vocab_size': tokenizer.vocab_size,
      'bos_id': tokenizer.bos_id,
      'eos_id': tokenizer.eos_id,
  }
  is_chat = isinstance(source, conversations.ConversationSource)
  template = chat.template_named(chat_template, tokenizer, '--chat_template') if is_chat else ''
  if max_length < 0:
    raise ConfigError(f'max_length={max_length} must be >= 0 (0: no limit).')
  settings = {
      'version': prepared.VERSION,
      'tokenizer_sha256': tokenizer_info['sha256'],
      'format': source.format,
      'language_field': source.language_field,
      'language': source.language,
      'docs_per_shard': docs_per_shard,
  }
  if is_chat:
    settings.update(
        kind=prepared.CONVERSATIONS,
        messages_field=source.messages_field,
        template_sha256=chat.template_fingerprint(template, template_variables),
        max_length=max_length,
    )
    if template_variables:  # settings as before where there are none
      settings['template_kwargs'] = template_variables
  else:
    settings['text_field'] = source.text_field
  units = [
      _Unit(
          path,
          _unit_id(path),
          output_dir,
          source,
          tokenizer_path,
          docs_per_shard,
          settings,
          source_record,
          template,
          template_variables,
          max_length,
      )
      for path in inputs
  ]
  os.makedirs(os.path.join(output_dir, _RECEIPTS), exist_ok=True)
  pending = [unit for unit in units if _finished_receipt(unit) is None]
  manifest_path = os.path.join(output_dir, prepared.MANIFEST)
  # A manifest stands for a complete directory: none while units are redone.
  if pending and os.path.exists(manifest_path):
    os.remove(manifest_path)
  _run_units(pending, len(units), workers, progress)
  receipts = [_finished_receipt(unit) for unit in units]
  for unit, receipt in zip(units, receipts):
    if receipt is None:
      raise DataError(f'{unit.input_path} changed while it was prepared; run again.')
  manifest = _build_manifest(receipts, tokenizer_info, settings, units[0].counts)
  if source_record is None:  # a re-run without the source flags keeps what the units say
    said = {json.dumps(r.get('source'), sort_keys=True) for r in receipts}
    source_record = receipts[0].get('source') if len(said) == 1 and receipts else None
  manifest['source'] = source_record
  if is_chat:
    manifest['kind'] = prepared.CONVERSATIONS
    manifest['record'] = (
        'token ids as little-endian int32, then the loss mask as one uint8 per token;'
        ' one conversation per record'
    )
    manifest['chat_template'] = template
  _write_json_atomically(manifest_path, manifest)
  return manifest


def _unit_id(input_path: str) -> str:
  return hashlib.sha256(os.path.abspath(input_path).encode()).hexdigest()[:16]


@functools.cache
def _load_tokenizer(path: str, fingerprint: str) -> Tokenizer:
  """One tokenizer per process, shared by the units it prepares; refuses one changed since
  the run started (keyed by content too, so a tokenizer rewritten to the same path is reloaded).
  """
  tokenizer = load_tokenizer(path)
  if tokenizer.fingerprint != fingerprint:
    raise DataError(f'the tokenizer {path} changed while data was prepared with it; run again.')
  return tokenizer


def _finished_receipt(unit: _Unit) -> dict | None:
  """The unit's receipt if it is finished and current, else None.

  Raises:
    ConfigError: the receipt was made with other settings.
  """
  try:
    with open(unit.receipt_path) as f:
      receipt = json.load(f)
  except FileNotFoundError:
    return None
  except json.JSONDecodeError:
    return None  # Written atomically, so only a hand-edited one is invalid.
  if receipt['settings'] != unit.settings:
    keys = set(unit.settings) | set(receipt['settings'])
    changed = sorted(k for k in keys if receipt['settings'].get(k) != unit.settings.get(k))
    raise ConfigError(
        f'{unit.output_dir} holds {unit.input_path} prepared with other'
        f' settings (changed: {", ".join(changed)}; see {unit.receipt_path}).'
        ' Prepare into a new output directory, or delete this one.'
    )
  if 'truncated' not in receipt:
    return None  # Made before inputs were checked for truncation: redo it.
  stat = os.stat(unit.input_path)
  if receipt['input']['size'] != stat.st_size or (receipt['input']['mtime_ns'] != stat.st_mtime_ns):
    return None  # The input changed since.
  for shards in receipt['languages'].values():
    for shard in shards:
      if not os.path.isfile(os.path.join(unit.output_dir, shard['path'])):
        return None
  return receipt


def _run_units(pending: list[_Unit], total_units: int, workers: int, progress: bool):
  """Prepares the pending units, in this process or a pool of `workers`."""
  with (
      tqdm.tqdm(
          total=total_units,
          initial=total_units - len(pending),
          unit='file',
          desc='files',
          disable=not progress,
      ) as files_bar,
      tqdm.tqdm(
          unit='tok',
          unit_scale=True,
          desc='tokens',
          disable=not progress,
      ) as tokens_bar,
  ):
    if min(workers, len(pending)) <= 1:
      for unit in pending:
        _prepare_unit(unit, tokens_bar.update)
        files_bar.update()
      return
    # spawn, not fork: the caller may run threads (JAX, Grain) that fork breaks.
    context = multiprocessing.get_context('spawn')
    token_counts = context.Queue()
    initargs = (token_counts, os.getpid())
    with context.Pool(min(workers, len(pending)), _init_worker, initargs) as pool:
      results = [pool.apply_async(_prepare_unit_in_worker, (unit,)) for unit in pending]
      while results:
        _drain(token_counts, tokens_bar.update, timeout=0.1)
        for result in [r for r in results if r.ready()]:
          results.remove(result)
          result.get()  # Re-raises a worker's error.
          files_bar.update()
      _drain(token_counts, tokens_bar.update, timeout=0)


def _drain(counts: multiprocessing.Queue, update: Callable[[int], object], timeout: float):
  try:
    update(counts.get(timeout=timeout) if timeout else counts.get_nowait())
    while True:
      update(counts.get_nowait())
  except queue.Empty:
    pass


_worker_token_counts = None


def _init_worker(token_counts: multiprocessing.Queue, parent_pid: int):
  global _worker_token_counts
  _worker_token_counts = token_counts
  _exit_with_parent(parent_pid)


def _exit_with_parent(parent_pid: int):
  """Ends this worker once the process that started it is gone, even killed
  by SIGKILL, so that no worker writes on for a run that no one waits for.

  Linux signals it (prctl); elsewhere a thread watches the parent id.
  """
  if sys.platform.startswith('linux'):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
      if os.getppid() != parent_pid:  # It died before prctl.
        os._exit(1)
      return
  threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()


def _watch_parent(parent_pid: int):
  while os.getppid() == parent_pid:
    time.sleep(0.2)
  os._exit(1)


def _prepare_unit_in_worker(unit: _Unit) -> None:
  _prepare_unit(unit, _worker_token_counts.put)


def _prepare_unit(unit: _Unit, report_tokens: Callable[[int], object]):
  """Tokenizes one input file into its shards, then writes its receipt."""
  tokenizer = _load_tokenizer(unit.tokenizer_path, unit.settings['tokenizer_sha256'])
  # Whatever an interrupted run left of this unit is replaced, not trusted.
  _remove_unit_files(unit)
  stat = os.stat(unit.input_path)
  records, bad_records = _records(unit, tokenizer)
  writers = {}
  try:
    unreported_tokens = 0
    for count, (language, record, counts) in enumerate(records, 1):
      if language not in writers:
        writers[language] = _ShardWriter(unit, language)
      writers[language].write(record, counts)
      unreported_tokens += counts['tokens']
      if count % _PROGRESS_EVERY == 0:
        report_tokens(unreported_tokens)
        unreported_tokens = 0
    report_tokens(unreported_tokens)
    shards = {tag: writers[tag].finish() for tag in sorted(writers)}
  except BaseException:
    for writer in writers.values():
      writer.close()
    _remove_unit_files(unit)
    raise
  receipt = {
      'input': {'path': unit.input_path, 'size': stat.st_size, 'mtime_ns': stat.st_mtime_ns},
      'unit': unit.unit_id,
      'settings': unit.settings,
      'languages': shards,
      'bad_records': bad_records.to_json(),
      'truncated': bad_records.truncation_json(),
      'source': unit.source_record,
  }
  _write_json_atomically(unit.receipt_path, receipt)


def _records(unit: _Unit, tokenizer: Tokenizer):
  """The unit's records as (language, record bytes, counts), and its bad-record report."""
  if not unit.chat_template:
    documents, bad_records = unit.source.read(unit.input_path)

    def texts():
      for document in documents:
        tokens = tokenizer.encode(document.text)
        counts = {
            'documents': 1,
            'tokens': len(tokens),
            'bytes': len(document.text.encode('utf-8')),
            'characters': len(document.text),
        }
        yield document.language, np.asarray(tokens, prepared.TOKEN_DTYPE).tobytes(), counts

    return texts(), bad_records
  examples, bad_records = unit.source.examples(
      unit.input_path,
      tokenizer,
      unit.chat_template,
      max_length=unit.max_length,
      variables=unit.template_variables,
  )

  def conversations_():
    for example in examples:
      counts = {
          'documents': 1,
          'tokens': len(example.ids),
          'assistant_tokens': int(example.loss_mask.sum()),
          'longest': len(example.ids),
      }
      record = prepared.conversation_record(example.ids, example.loss_mask)
      yield example.language or conversations.UNDETERMINED, record, counts

  return conversations_(), bad_records


def _remove_unit_files(unit: _Unit):
  for path in [
      unit.receipt_path,
      *glob.glob(os.path.join(glob.escape(unit.output_dir), '*', f'shard-{unit.unit_id}-*')),
  ]:
    if os.path.exists(path):
      os.remove(path)


class _ShardWriter:
  """One unit's shards of one language, each complete before it is renamed."""

  def __init__(self, unit: _Unit, language: str):
    self._unit = unit
    self._language = language
    self._shards = []
    self._writer = None
    self._temp_path = ''
    os.makedirs(os.path.join(unit.output_dir, language), exist_ok=True)

  def write(self, record: bytes, counts: dict[str, int]):
    if self._writer is None:
      name = self._unit.shard_name(self._language, len(self._shards))
      self._shards.append({'path': name, **{count: 0 for count in self._unit.counts}})
      self._temp_path = os.path.join(self._unit.output_dir, name) + '.tmp'
      self._writer = array_record_module.ArrayRecordWriter(self._temp_path, prepared.WRITER_OPTIONS)
    self._writer.write(record)
    shard = self._shards[-1]
    for count, n in counts.items():
      shard[count] = _combine(count, shard[count], n)
    if shard['documents'] == self._unit.docs_per_shard:
      self._close_shard()

  def finish(self) -> list[dict]:
    """Completes the last shard; returns the shards' names and counts."""
    if self._writer is not None:
      self._close_shard()
    return self._shards

  def close(self):
    """Closes an unfinished shard, leaving it under its temporary name."""
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def _close_shard(self):
    self._writer.close()
    self._writer = None
    _sync(self._temp_path)
    os.replace(self._temp_path, self._temp_path.removesuffix('.tmp'))
    _sync(os.path.dirname(self._temp_path))


def _sync(path: str):
  """Flushes a closed file to disk, so a rename never publishes lost data; or a
  directory, so that a rename in it is on disk before what is written next."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _write_json_atomically(path: str, value: dict):
  directory = os.path.dirname(os.path.abspath(path))
  fd, temp_path = tempfile.mkstemp(dir=directory, suffix='.tmp')
  try:
    with os.fdopen(fd, 'w') as f:
      json.dump(value, f, indent=2, sort_keys=True, ensure_ascii=False)
      f.write('\n')
      f.flush()
      os.fsync(f.fileno())
    os.chmod(temp_path, 0o644)  # mkstemp's files are private.
    os.replace(temp_path, path)
  except BaseException:
    os.remove(temp_path)
    raise
  _sync(directory)


def _build_manifest(
    receipts: list[dict], tokenizer_info: dict, settings: dict, counts: Sequence[str]
) -> dict:
  """The manifest of the receipts, which come in sorted input order."""
  languages = {}
  for receipt in receipts:
    for tag, shards in receipt['languages'].items():
      entry = languages.setdefault(tag, {**{count: 0 for count in counts}, 'shards': []})
      for shard in shards:
        for count in counts:
          entry[count] = _combine(count, entry[count], shard[count])
        entry['shards'].append(shard)
  return {
      'version': prepared.VERSION,
      'record': 'token ids as little-endian int32, one document per record, no bos/eos',
      'writer_options': prepared.WRITER_OPTIONS,
      'tokenizer': tokenizer_info,
      'settings': settings,
      'languages': {tag: languages[tag] for tag in sorted(languages)},
      'inputs': {
          receipt['input']['path']: {
              'size': receipt['input']['size'],
              'unit': receipt['unit'],
              **{
                  count: functools.reduce(
                      functools.partial(_combine, count),
                      (
                          shard[count]
                          for shards in receipt['languages'].values()
                          for shard in shards
                      ),
                      0,
                  )
                  for count in counts
              },
              'bad_records': receipt['bad_records'],
              'truncated': receipt['truncated'],
          }
          for receipt in receipts
      },
  }


def _combine(count: str, a: int, b: int) -> int:
  return max(a, b) if count in _MAXIMA else a + b


def input_warnings(manifest: dict) -> list[str]:
  """One line per input that was truncated or yielded no document."""
  warnings = []
  for path, entry in manifest['inputs'].items():
    report = sources.BadRecords.from_json(path, entry['bad_records'], entry.get('truncated'))
    if warning := report.warning(entry['documents']):
      warnings.append(warning)
  return warnings


def format_summary(manifest: dict) -> str:
  """A table of the manifest's languages, and its inputs' bad records."""
  if manifest.get('kind') == prepared.CONVERSATIONS:
    lines = [f'{"language":<10} {"conversations":>13} {"tokens":>15} {"assistant tokens":>16}']
    for tag, entry in manifest['languages'].items():
      lines.append(
          f'{tag:<10} {entry["documents"]:>13,} {entry["tokens"]:>15,}'
          f' {entry["assistant_tokens"]:>16,}'
      )
  else:
    lines = [f'{"language":<10} {"documents":>12} {"tokens":>15} {"bytes":>15} {"bytes/token":>11}']
    for tag, entry in manifest['languages'].items():
      lines.append(
          f'{tag:<10} {entry["documents"]:>12,} {entry["tokens"]:>15,}'
          f' {entry["bytes"]:>15,} {entry["bytes"] / entry["tokens"]:>11.2f}'
      )
  bad = [
      sources.BadRecords.from_json(path, entry['bad_records'])
      for path, entry in manifest['inputs'].items()
  ]
  bad = [report for report in bad if report.total]
  if bad:
    lines.append(f'Bad records (not prepared) in {len(bad)} files:')
    lines.extend(f'  {report}' for report in bad)
  return '\n'.join(lines)
