"""Fault injection for the data tools (issue 24): compressed and Parquet inputs cut short
or corrupt, hostile records, empty files, a missing tokenizer, and prepare_data's workers
when their parent is killed; text and conversation files alike.

Expected counts come from the construction of each file or from another reader of the
same bytes (the gzip module, zstandard's stream reader), never from euro_lm's readers.
"""

import gzip
import io
import json
import os
import signal
import subprocess
import sys
import time
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from euro_lm.data import conversations
from euro_lm.data import prepared as prepared_lib
from euro_lm.data import tokenizer as tokenizer_lib
from euro_lm.data.prepare import shards, sources
from euro_lm.data.prepare import tokenizer_training as tt
from euro_lm.errors import DataError

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = sources.TextSource(language='de')
STRICT = sources.TextSource(language='de', strict=True)
LINE_BYTES = 128
LINES_PER_BLOCK = 1024  # 128 KiB of lines: zstd's largest block
LINES = 4 * LINES_PER_BLOCK


def _text(i: int) -> str:
  """Document i: its JSON line is exactly LINE_BYTES long with the newline."""
  head = f'Dokument {i:05d}: der schnelle braune Fuchs '
  return head + 'x' * (LINE_BYTES - 1 - len(json.dumps({'text': head})))


def _lines(start: int, stop: int) -> bytes:
  lines = [json.dumps({'text': _text(i)}).encode() + b'\n' for i in range(start, stop)]
  assert {len(line) for line in lines} == {LINE_BYTES}
  return b''.join(lines)


def _zstd_with_blocks() -> tuple[bytes, list[int]]:
  """All LINES in one zstd frame (with checksum), a block ending after every
  LINES_PER_BLOCK lines; and the byte offsets where those blocks end."""
  compressor = zstandard.ZstdCompressor(write_checksum=True).compressobj()
  data, block_ends = b'', []
  for start in range(0, LINES, LINES_PER_BLOCK):
    data += compressor.compress(_lines(start, start + LINES_PER_BLOCK))
    data += compressor.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    block_ends.append(len(data))
  return data + compressor.flush(), block_ends


def _zstd_reference(data: bytes) -> bytes:
  """What zstandard's stream reader (euro_lm's former reader) yields: silently short."""
  reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True)
  return reader.read()


def _gzip_reference(data: bytes) -> bytes:
  """What zlib decompresses of the members, each in one call, up to the cut."""
  out = []
  while data:
    member = zlib.decompressobj(wbits=31)
    out.append(member.decompress(data))
    data = member.unused_data if member.eof else b''
  return b''.join(out)


def _write(path, data: bytes):
  path.write_bytes(data)
  return path


def _read(source, path):
  documents, report = source.read(str(path))
  return [d.text for d in documents], report


def _check_truncated(path, data: bytes, reference: bytes, codec: str):
  """The file is read up to its cut, reported truncated there, and an error if strict."""
  path.write_bytes(data)
  complete = reference.count(b'\n')  # Lines the cut left whole.
  texts, report = _read(SOURCE, path)
  assert texts == [_text(i) for i in range(complete)]
  assert report.total == 0
  assert report.truncated == sources.Truncation(
      len(data), complete + 1, f'the file ends inside a {codec} frame (cut short)'
  )
  message = (
      f'{path}: truncated at byte {len(data)}: the file ends inside a {codec} frame'
      f' (cut short); lines from {complete + 1} on are lost.'
  )
  assert report.warning(len(texts)) == message
  with pytest.raises(DataError) as error:
    _read(STRICT, path)
  assert str(error.value) == message


def test_zstd_cut_anywhere_is_reported_truncated(tmp_path):
  data, block_ends = _zstd_with_blocks()
  cuts = {
      'header': 5,
      'first block end': block_ends[0],
      'second block end': block_ends[1],
      'mid block': block_ends[1] + 100,
      'checksum': len(data) - 1,
  }
  for name, cut in cuts.items():
    reference = _zstd_reference(data[:cut])
    if name.endswith('block end'):
      # The silent case of the issue: whole lines only, nothing looks bad.
      assert reference == _lines(0, len(reference) // LINE_BYTES), name
    _check_truncated(tmp_path / f'{name}.jsonl.zst', data[:cut], reference, 'zstd')
  assert _read(SOURCE, _write(tmp_path / 'whole.jsonl.zst', data))[0] == [
      _text(i) for i in range(LINES)
  ]


def test_gzip_cut_in_either_member_is_reported_truncated(tmp_path):
  first = gzip.compress(_lines(0, LINES // 2), mtime=0)
  second = gzip.compress(_lines(LINES // 2, LINES), mtime=0)
  data = first + second
  cuts = {
      'header': 10,
      'mid first': len(first) // 2,
      'mid second': len(first) + len(second) // 2,
      'trailer': len(data) - 4,
  }
  for name, cut in cuts.items():
    _check_truncated(tmp_path / f'{name}.jsonl.gz', data[:cut], _gzip_reference(data[:cut]), 'gzip')
  # Trailing zeros (tape padding) are no truncation, as for the gzip module.
  texts, report = _read(SOURCE, _write(tmp_path / 'padded.jsonl.gz', data + bytes(512)))
  assert (len(texts), report.truncated) == (LINES, None)


@pytest.mark.parametrize('codec', ['gzip', 'zstd'])
def test_a_corrupt_second_member_loses_only_what_follows(tmp_path, codec):
  compress = (
      (lambda b: gzip.compress(b, mtime=0))
      if codec == 'gzip'
      else zstandard.ZstdCompressor(write_checksum=True).compress
  )
  first = compress(_lines(0, 100))
  second = bytearray(compress(_lines(100, 200)))
  second[:4] = b'\xde\xad\xbe\xef'  # Not a member's magic.
  path = _write(tmp_path / f'docs.jsonl.{"gz" if codec == "gzip" else "zst"}', first + second)
  texts, report = _read(SOURCE, path)
  assert texts == [_text(i) for i in range(100)]
  assert (report.truncated.byte, report.truncated.position) == (len(first), 101)
  assert report.truncated.reason.startswith(f'corrupt {codec} data (')


def _parquet(path, rows: int, **kwargs):
  table = pa.table({'text': pa.array([_text(i) for i in range(rows)], pa.string())})
  pq.write_table(table, path, row_group_size=1000, **kwargs)
  return path


def test_parquet_cut_short_or_corrupt(tmp_path):
  data = _parquet(tmp_path / 'whole.parquet', 3000).read_bytes()
  for cut in (len(data) // 2, len(data) - 8, len(data) - 1):
    path = _write(tmp_path / f'cut-{cut}.parquet', data[:cut])
    texts, report = _read(SOURCE, path)
    assert texts == []
    assert (report.truncated.byte, report.truncated.position) == (cut, 0)
    assert report.truncated.reason.startswith('no readable Parquet footer (cut short?): ')
    assert report.warning(0).startswith(f'{path}: truncated at byte {cut}: no readable')
    assert report.warning(0).endswith('; rows from 0 on are lost.')
    with pytest.raises(DataError, match=f'^{path}: truncated at byte {cut}: '):
      _read(STRICT, path)
  # Flipped bytes in row group 1 of a file with page checksums.
  path = _parquet(tmp_path / 'sums.parquet', 3000, write_page_checksum=True)
  group = pq.ParquetFile(path).metadata.row_group(1).column(0)
  start = group.dictionary_page_offset if group.has_dictionary_page else group.data_page_offset
  data = bytearray(path.read_bytes())
  data[start + 200 : start + 216] = bytes(16)
  texts, report = _read(SOURCE, _write(path, bytes(data)))
  assert texts == [_text(i) for i in range(1000)]
  assert (report.truncated.byte, report.truncated.position) == (start, 1000)
  assert 'row group 1 (' in report.truncated.reason


def test_empty_files_warn_and_are_errors_if_strict(tmp_path):
  paths = [
      _write(tmp_path / 'empty.jsonl', b''),
      _write(tmp_path / 'empty.jsonl.gz', gzip.compress(b'')),
      _write(tmp_path / 'empty.jsonl.zst', b''),
      _write(tmp_path / 'empty.parquet', b''),
      _parquet(tmp_path / 'no-rows.parquet', 0),
  ]
  for path in paths:
    texts, report = _read(SOURCE, path)
    assert (texts, report.total, report.truncated) == ([], 0, None)
    assert report.warning(0) == f'{path}: holds no records (an empty file).'
    with pytest.raises(DataError, match=f'^{path}: holds no records'):
      _read(STRICT, path)


# Line -> its bad-record kind, None for a document. Line 6 is a document when the
# language is fixed (--language), not read from the records.
HOSTILE = [
    (b'{"text": "Guten Tag", "lang": "de"}', None),
    (b'{"text": "a", "lang": "de", "n": ' + b'9' * 5000 + b'}', 'invalid_json'),
    (b'[' * 200_000 + b']' * 200_000, 'invalid_json'),
    (b'{"text": "\xff\xfe kaputt", "lang": "de"}', 'invalid_utf8'),
    (b'{"text": "\\ud800", "lang": "de"}', 'invalid_utf8'),
    (b'{"text": "Hallo", "lang": "' + b'x' * 100_000 + b'"}', 'unknown_language'),
    (b'{"text": {"nested": [1, 2]}, "lang": "de"}', 'not_a_string'),
    (b'{"text": "Servus", "lang": "de", "deep": ' + b'[' * 500 + b']' * 500 + b'}', None),
    (b'{"text": "Moin", "lang": "de", "huge": 1e999999}', None),
    (b'{"text": "Tschuess", "lang": "de"}', None),
]


def _hostile_expectation(fixed_language: bool = False):
  """The documents' texts, and kind -> (count, first line)."""
  if fixed_language:
    hostile = [(line, None if kind == 'unknown_language' else kind) for line, kind in HOSTILE]
  else:
    hostile = HOSTILE
  texts = [json.loads(line)['text'] for line, kind in hostile if kind is None]
  kinds = {}
  for number, (_, kind) in enumerate(hostile, 1):
    if kind:
      count, first = kinds.get(kind, (0, number))
      kinds[kind] = (count + 1, first)
  return texts, kinds


def test_hostile_records_are_counted_not_fatal(tmp_path):
  path = _write(tmp_path / 'hostile.jsonl', b'\n'.join(line for line, _ in HOSTILE) + b'\n')
  texts, kinds = _hostile_expectation()
  source = sources.TextSource(language_field='lang')
  read, report = _read(source, path)
  assert read == texts
  assert {k: (v.count, v.first) for k, v in report.kinds.items()} == kinds
  assert max(len(v.reason) for v in report.kinds.values()) <= 303  # One line of a report.
  with pytest.raises(DataError, match=f'^{path}:2: invalid JSON: Exceeds the limit'):
    _read(sources.TextSource(language_field='lang', strict=True), path)

  # The same through train_tokenizer's reader.
  logs = []
  sample = tt.sample_files(
      [str(path)], source, chars_per_language=1000, heldout_fraction=0.25, log=logs.append
  )
  assert sample.documents == {'deu_Latn': len(texts)}
  assert [b.path for b in sample.bad_records] == [str(path)]
  assert {k: (v.count, v.first) for k, v in sample.bad_records[0].kinds.items()} == kinds


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  texts = [_text(i) for i in range(50)] + ['Guten Tag, Servus, Moin, Tschüss, Hallo'] * 20
  path = tmp_path_factory.mktemp('tokenizer') / 'tok.model'
  return tokenizer_lib.train_sentencepiece(texts, str(path), vocab_size=400)


def _messages(stderr: str) -> list[str]:
  """The error and warning lines, without the progress bars; never a traceback."""
  assert 'Traceback' not in stderr
  return [line for line in stderr.splitlines() if line.startswith(('error:', 'warning:'))]


def _run(module, *args, **kwargs):
  return subprocess.run(
      [sys.executable, '-m', module, *args],
      cwd=_REPO,
      capture_output=True,
      text=True,
      timeout=120,
      check=False,
      **kwargs,
  )


@pytest.fixture(scope='module')
def faulty(tmp_path_factory):
  """A directory of inputs, one per fault, and what each must yield:
  name -> (documents, truncation as the manifest has it, warning or None)."""
  root = tmp_path_factory.mktemp('faulty')
  zst, block_ends = _zstd_with_blocks()
  gz = gzip.compress(_lines(0, 500), mtime=0)
  parquet = _parquet(root / 'whole.parquet', 1500).read_bytes()
  os.remove(root / 'whole.parquet')
  files = {
      'good.jsonl': _lines(0, 7),
      'cut.jsonl.zst': zst[: block_ends[1]],
      'cut.jsonl.gz': gz[: len(gz) // 2],
      'cut.parquet': parquet[:-100],
      'empty.jsonl': b'',
      'hostile.jsonl': b'\n'.join(line for line, _ in HOSTILE),
  }
  for name, data in files.items():
    _write(root / name, data)
  path = {name: str(root / name) for name in files}
  gz_lines = _gzip_reference(files['cut.jsonl.gz']).count(b'\n')
  cut_zst = len(files['cut.jsonl.zst'])
  expected = {
      'good.jsonl': (7, None, None),
      'cut.jsonl.zst': (
          2 * LINES_PER_BLOCK,
          {
              'byte': cut_zst,
              'line': 2 * LINES_PER_BLOCK + 1,
              'reason': 'the file ends inside a zstd frame (cut short)',
          },
          f'{path["cut.jsonl.zst"]}: truncated at byte {cut_zst}: the file ends inside a zstd'
          f' frame (cut short); lines from {2 * LINES_PER_BLOCK + 1} on are lost.',
      ),
      'cut.jsonl.gz': (
          gz_lines,
          {
              'byte': len(files['cut.jsonl.gz']),
              'line': gz_lines + 1,
              'reason': 'the file ends inside a gzip frame (cut short)',
          },
          f'{path["cut.jsonl.gz"]}: truncated at byte {len(files["cut.jsonl.gz"])}: the file'
          f' ends inside a gzip frame (cut short); lines from {gz_lines + 1} on are lost.',
      ),
      'cut.parquet': (
          0,
          'footer',
          f'{path["cut.parquet"]}: truncated at byte {len(parquet) - 100}',
      ),
      'empty.jsonl': (0, None, f'{path["empty.jsonl"]}: holds no records (an empty file).'),
      'hostile.jsonl': (len(_hostile_expectation(fixed_language=True)[0]), None, None),
  }
  return root, expected


def test_prepare_data_cli_reports_every_fault(faulty, tokenizer, tmp_path):
  root, expected = faulty
  result = _run(
      'euro_lm.prepare_data',
      f'--input={root}/*',
      f'--output={tmp_path}',
      f'--tokenizer={tokenizer.path}',
      '--language=de',
      '--workers=2',
  )
  assert result.returncode == 0, result.stderr
  warnings = _messages(result.stderr)
  for *_, warning in expected.values():
    if warning:
      assert len([w for w in warnings if w.startswith(f'warning: {warning}')]) == 1, warning
  assert len(warnings) == sum(1 for *_, warning in expected.values() if warning), warnings
  manifest = prepared_lib.read_manifest(str(tmp_path))
  inputs = {os.path.basename(p): entry for p, entry in manifest['inputs'].items()}
  assert sorted(inputs) == sorted(expected)
  for name, (documents, truncated, _) in expected.items():
    assert inputs[name]['documents'] == documents, name
    if truncated == 'footer':
      assert inputs[name]['truncated']['row'] == 0
      assert inputs[name]['truncated']['reason'].startswith('no readable Parquet footer')
    else:
      assert inputs[name]['truncated'] == truncated, name
  kinds = {
      k: (v['count'], v['first'])
      for k, v in inputs['hostile.jsonl']['bad_records']['kinds'].items()
  }
  assert kinds == _hostile_expectation(fixed_language=True)[1]
  total = sum(documents for documents, *_ in expected.values())
  assert manifest['languages']['deu_Latn']['documents'] == total


@pytest.mark.parametrize('name', ['cut.jsonl.zst', 'empty.jsonl', 'hostile.jsonl'])
def test_prepare_data_strict_is_one_error_line(faulty, tokenizer, tmp_path, name):
  root, expected = faulty
  result = _run(
      'euro_lm.prepare_data',
      f'--input={root / name}',
      f'--output={tmp_path}',
      f'--tokenizer={tokenizer.path}',
      '--language=de',
      '--strict',
  )
  assert result.returncode == 1
  if name == 'hostile.jsonl':
    message = f'{root / name}:2: invalid JSON: Exceeds the limit'
  else:
    message = expected[name][2]
  [error] = _messages(result.stderr)
  assert error.startswith(f'error: {message}')
  assert result.stderr.endswith(f'{error}\n')
  assert not os.path.exists(tmp_path / prepared_lib.MANIFEST)


def test_prepare_data_without_a_tokenizer_is_one_error_line(faulty, tmp_path):
  root, _ = faulty
  args = (f'--input={root / "good.jsonl"}', f'--output={tmp_path}', '--language=de')
  result = _run('euro_lm.prepare_data', *args)
  assert (result.returncode, result.stderr) == (
      1,
      'error: flag --tokenizer=None: Flag --tokenizer must have a value other than None.\n',
  )
  missing = tmp_path / 'no-such.model'
  result = _run('euro_lm.prepare_data', *args, f'--tokenizer={missing}')
  assert result.returncode == 1
  assert result.stderr.startswith(f'error: No tokenizer at {missing} ')
  assert result.stderr.count('\n') == 1


def test_train_tokenizer_cli_warns_and_skips(faulty, tmp_path):
  root, expected = faulty
  inputs = ','.join(str(root / n) for n in ('cut.jsonl.zst', 'hostile.jsonl', 'empty.jsonl'))
  result = _run(
      'euro_lm.train_tokenizer',
      f'--output={tmp_path}',
      f'--input={inputs}',
      '--language=de',
      '--vocab_size=320',
      '--chars_per_language=20000',
  )
  assert result.returncode == 0, result.stderr
  assert f'warning: {expected["cut.jsonl.zst"][2]}\n' in result.stdout
  assert f'warning: {expected["empty.jsonl"][2]}\n' in result.stdout
  assert f'Skipped bad records: {root / "hostile.jsonl"}: 2 invalid_json (first at line 2:' in (
      result.stdout
  )
  truncated = json.loads((tmp_path / 'fertility.json').read_text())['training']['truncated']
  assert truncated == {str(root / 'cut.jsonl.zst'): expected['cut.jsonl.zst'][1]}


def _children(pid: int) -> list[int]:
  children = []
  for entry in os.listdir('/proc'):
    if entry.isdigit():
      try:
        with open(f'/proc/{entry}/stat') as f:
          fields = f.read().rsplit(')', 1)[1].split()
      except OSError:
        continue
      if int(fields[1]) == pid:
        children.append(int(entry))
  return children


def _alive(pid: int) -> bool:
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except OSError:
    return False


def _tree(directory) -> dict[str, int]:
  return {
      os.path.join(root, name): os.path.getsize(os.path.join(root, name))
      for root, _, names in os.walk(directory)
      for name in names
  }


@pytest.mark.skipif(not os.path.isdir('/proc/self'), reason='needs /proc to find the workers')
@pytest.mark.parametrize('signum', [signal.SIGKILL, signal.SIGTERM])
def test_workers_stop_with_a_killed_parent(tokenizer, tmp_path, signum):
  for name in ('a', 'b'):
    lines = [json.dumps({'text': f'{name} {i} Guten Tag, Servus'}) for i in range(150_000)]
    (tmp_path / f'{name}.jsonl').write_text('\n'.join(lines) + '\n')
  output = tmp_path / 'out'
  command = [
      sys.executable,
      '-m',
      'euro_lm.prepare_data',
      f'--input={tmp_path}/*.jsonl',
      f'--output={output}',
      f'--tokenizer={tokenizer.path}',
      '--language=de',
      '--workers=2',
  ]
  parent = subprocess.Popen(command, cwd=_REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.monotonic() + 60
  # Both workers writing: a temporary shard of each input.
  while len([p for p in _tree(output) if p.endswith('.tmp')]) < 2:
    assert parent.poll() is None, parent.stderr.read()
    assert time.monotonic() < deadline, 'the workers never started writing'
    time.sleep(0.05)
  workers = _children(parent.pid)
  assert len([w for w in workers if _alive(w)]) >= 2
  parent.send_signal(signum)
  parent.wait(10)
  killed = time.monotonic()
  while any(_alive(w) for w in workers) and time.monotonic() - killed < 5:
    time.sleep(0.02)
  assert not any(_alive(w) for w in workers)
  assert time.monotonic() - killed < 1.5
  before = _tree(output)
  time.sleep(0.5)
  assert _tree(output) == before  # Nothing writes on.
  # Nothing looks finished: no manifest, no receipt (a unit takes seconds, the kill came
  # at its first document). Re-running redoes such units (see test_prepare).
  assert prepared_lib.MANIFEST not in os.listdir(output)
  assert os.listdir(output / 'receipts') == []


def test_input_warnings_come_from_the_manifest_alone(faulty, tokenizer, tmp_path):
  root, expected = faulty
  manifest = shards.prepare([str(root / '*')], str(tmp_path), tokenizer.path, SOURCE, workers=1)
  warnings = shards.input_warnings(prepared_lib.read_manifest(str(tmp_path)))
  assert warnings == shards.input_warnings(manifest)
  assert [w for w in warnings if 'parquet' not in w] == [
      expected[name][2] for name in sorted(expected) if expected[name][2] and 'parquet' not in name
  ]


# Conversation files go through the same readers: the faults above, as conversations.
def _conversation(i: int) -> list[dict]:
  return [
      {'role': 'user', 'content': f'Frage {i}?'},
      {'role': 'assistant', 'content': f'Antwort {i}.'},
  ]


def _read_conversations(source, path):
  read, report = source.read(str(path))
  return [c.messages for c in read], report


def test_conversation_parquet_cut_short_or_corrupt(tmp_path):
  source = conversations.ConversationSource(language='de')
  strict = conversations.ConversationSource(language='de', strict=True)
  path = tmp_path / 'chats.parquet'
  table = pa.table({'messages': [_conversation(i) for i in range(3000)]})
  pq.write_table(table, path, row_group_size=1000, write_page_checksum=True)
  data = path.read_bytes()
  cut = _write(tmp_path / 'cut.parquet', data[: len(data) // 2])
  read, report = _read_conversations(source, cut)
  assert read == [] and (report.truncated.byte, report.truncated.position) == (len(data) // 2, 0)
  assert report.warning(0).startswith(f'{cut}: truncated at byte {len(data) // 2}: no readable')
  with pytest.raises(DataError, match=f'^{cut}: truncated at byte '):
    _read_conversations(strict, cut)
  # Flipped bytes in row group 1: the 1000 conversations of group 0 are kept.
  column = pq.ParquetFile(path).metadata.row_group(1).column(0)
  start = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
  corrupt = bytearray(data)
  corrupt[start + 200 : start + 216] = bytes(16)
  read, report = _read_conversations(source, _write(path, bytes(corrupt)))
  assert read == [_conversation(i) for i in range(1000)]
  assert (report.truncated.byte, report.truncated.position) == (start, 1000)
  assert report.warning(1000).endswith('; rows from 1000 on are lost.')


def test_empty_conversation_files_warn_and_are_errors_if_strict(tmp_path):
  source = conversations.ConversationSource()
  strict = conversations.ConversationSource(strict=True)
  empty_parquet = tmp_path / 'no-rows.parquet'
  pq.write_table(pa.table({'messages': pa.array([], pa.string())}), empty_parquet)
  for path in [
      _write(tmp_path / 'empty.jsonl', b''),
      _write(tmp_path / 'empty.jsonl.gz', gzip.compress(b'')),
      _write(tmp_path / 'empty.parquet', b''),
      empty_parquet,
  ]:
    read, report = _read_conversations(source, path)
    assert (read, report.total, report.truncated) == ([], 0, None)
    assert report.warning(0) == f'{path}: holds no records (an empty file).'
    with pytest.raises(DataError, match=f'^{path}: holds no records'):
      _read_conversations(strict, path)


def test_hostile_conversation_cells_are_counted_not_fatal(tmp_path):
  """A Parquet column of JSON text with arrays nested 100k deep, invalid UTF-8 (a binary
  column) or a language code of 100k characters: each is one bad row."""
  good = json.dumps(_conversation(0)).encode()
  cells = [good, b'[' * 100_000 + b']' * 100_000, b'\xff' + good, good, good]
  codes = ['de', 'de', 'de', 'x' * 100_000, 'fr']
  path = tmp_path / 'hostile.parquet'
  pq.write_table(pa.table({'messages': pa.array(cells, pa.binary()), 'lang': codes}), path)
  read, report = _read_conversations(conversations.ConversationSource(language_field='lang'), path)
  assert read == [_conversation(0), _conversation(0)]
  assert {k: (v.count, v.first) for k, v in report.kinds.items()} == {
      'invalid_json': (1, 1),
      'invalid_utf8': (1, 2),
      'unknown_language': (1, 3),
  }
  assert max(len(v.reason) for v in report.kinds.values()) <= 303  # One line of a report.
  # A language column that cannot hold codes is one error naming file and column.
  pq.write_table(pa.table({'messages': cells[:1], 'lang': [[1, 2]]}), path)
  with pytest.raises(
      DataError, match=f"^{path}: column 'lang' holds list<.+>, not language codes.$"
  ):
    _read_conversations(conversations.ConversationSource(language_field='lang'), path)
