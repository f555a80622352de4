"""Tests for euro_lm.data.prepare.shards, euro_lm.data.prepared and their CLI,
euro_lm.prepare_data."""

import gzip
import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from array_record.python import array_record_module

from euro_lm.data import prepared as prepared_lib
from euro_lm.data import tokenizer as tokenizer_lib
from euro_lm.data.prepare import shards, sources
from euro_lm.errors import ConfigError, DataError

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SENTENCES = {
    'deu_Latn': (
        'Der schnelle braune Fuchs springt über den faulen Hund.',
        'Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich.',
        'Die Würde des Menschen ist unantastbar.',
        'Heute ist das Wetter schön, morgen regnet es vielleicht.',
    ),
    'fra_Latn': (
        'Portez ce vieux whisky au juge blond qui fume.',
        'Le cœur a ses raisons que la raison ne connaît point.',
        'Voix ambiguë d’un cœur qui au zéphyr préfère les jattes de kiwis.',
        'Il fait beau aujourd’hui, demain il pleuvra peut-être.',
    ),
    'ell_Grek': (
        'Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.',
        'Η γλώσσα μου έδωσαν ελληνική.',
        'Καλημέρα σε όλους, τι κάνετε σήμερα;',
        'Ο καιρός είναι ωραίος σήμερα.',
    ),
    'ukr_Cyrl': (
        'Чуєш їх, доцю, га? Кумедна ж ти, прощайся без ґольфів!',
        'Сьогодні гарна погода, а завтра може піти дощ.',
        'Усі люди народжуються вільними і рівними у своїй гідності та правах.',
        'Добрий день, як справи?',
    ),
}
# Per input file: its languages and how many documents of each.
FILES = {
    'a.jsonl': {'deu_Latn': 7, 'fra_Latn': 4},
    'b.jsonl.gz': {'ell_Grek': 5},
    'c.parquet': {'ukr_Cyrl': 6, 'deu_Latn': 2},
}
DOCS_PER_SHARD = 3


def _documents(tag: str, count: int, seed: int) -> list[str]:
  sentences = SENTENCES[tag]
  # Emoji are not in the tokenizer's training text: byte fallback encodes them.
  return [
      ' '.join(sentences[(seed + i + j) % 4] for j in range(1 + i % 3))
      + f' {seed}-{i}'
      + (' 🇪🇺' if i % 4 == 1 else '')
      for i in range(count)
  ]


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """Input files, and per file its (text, tag) documents in file order."""
  directory = tmp_path_factory.mktemp('raw')
  by_file = {}
  for seed, (name, counts) in enumerate(FILES.items()):
    docs = [(text, tag) for tag, count in counts.items() for text in _documents(tag, count, seed)]
    by_file[str(directory / name)] = docs
    records = [{'text': text, 'lang': tag} for text, tag in docs]
    if name.endswith('.parquet'):
      pq.write_table(pa.Table.from_pylist(records), directory / name)
      continue
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    if name == 'b.jsonl.gz':
      lines.insert(2, '{"text": "ohne Ende"')  # a bad record, line 3
    data = ('\n'.join(lines) + '\n').encode()
    (directory / name).write_bytes(gzip.compress(data, mtime=0) if name.endswith('.gz') else data)
  return directory, by_file


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  texts = [s for sentences in SENTENCES.values() for s in sentences] * 8
  path = tmp_path_factory.mktemp('tokenizer') / 'tok.model'
  return tokenizer_lib.train_sentencepiece(texts, str(path), vocab_size=400)


SOURCE = sources.TextSource(language_field='lang')


def _prepare(corpus, tokenizer, output_dir, **kwargs):
  return shards.prepare(
      [str(corpus[0] / '*.jsonl*'), str(corpus[0] / '*.parquet')],
      str(output_dir),
      tokenizer.path,
      kwargs.pop('source', SOURCE),
      docs_per_shard=DOCS_PER_SHARD,
      **kwargs,
  )


@pytest.fixture(scope='module')
def prepared(corpus, tokenizer, tmp_path_factory):
  """A directory prepared by two workers, and its manifest."""
  output_dir = tmp_path_factory.mktemp('prepared')
  return output_dir, _prepare(corpus, tokenizer, output_dir, workers=2)


def _files(directory) -> dict[str, bytes]:
  """Relative path -> contents of every file under `directory`."""
  files = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        files[os.path.relpath(path, directory)] = f.read()
  return files


def test_manifest_counts_equal_an_independent_count(corpus, tokenizer, prepared):
  output_dir, manifest = prepared
  expected = {}
  for docs in corpus[1].values():
    for text, tag in docs:
      counts = expected.setdefault(tag, [0, 0, 0, 0])
      counts[0] += 1
      counts[1] += len(tokenizer.encode(text))
      counts[2] += len(text.encode('utf-8'))
      counts[3] += len(text)

  assert {
      tag: [entry['documents'], entry['tokens'], entry['bytes'], entry['characters']]
      for tag, entry in manifest['languages'].items()
  } == expected
  for tag, entry in manifest['languages'].items():
    for count in ('documents', 'tokens', 'bytes', 'characters'):
      assert sum(shard[count] for shard in entry['shards']) == entry[count]
    for shard in entry['shards']:
      assert re.fullmatch(rf'{tag}/shard-[0-9a-f]{{16}}-\d{{5}}\.array_record', shard['path'])
      assert 1 <= shard['documents'] <= DOCS_PER_SHARD
  with open(tokenizer.path, 'rb') as f:
    sha256 = hashlib.sha256(f.read()).hexdigest()
  assert manifest['tokenizer']['sha256'] == sha256
  assert manifest['tokenizer']['vocab_size'] == 400
  assert prepared_lib.read_manifest(str(output_dir)) == manifest
  assert not [name for name in _files(output_dir) if name.endswith('.tmp')]


def test_bad_records_are_in_the_manifest(corpus, prepared):
  inputs = prepared[1]['inputs']
  assert sorted(inputs) == sorted(corpus[1])
  bad = {path: entry['bad_records']['kinds'] for path, entry in inputs.items()}
  gz_path = str(corpus[0] / 'b.jsonl.gz')
  assert {k: (v['count'], v['first']) for k, v in bad.pop(gz_path).items()} == {
      'invalid_json': (1, 3)
  }
  assert all(not kinds for kinds in bad.values())
  assert inputs[gz_path]['documents'] == len(corpus[1][gz_path])


def test_shards_hold_the_encoded_documents(corpus, tokenizer, prepared):
  output_dir, manifest = prepared
  for tag in SENTENCES:
    # Inputs in sorted order, documents in file order.
    texts = [
        text for path in sorted(corpus[1]) for text, doc_tag in corpus[1][path] if doc_tag == tag
    ]
    tokens = list(prepared_lib.iter_tokens(str(output_dir), tag))
    assert [t.tolist() for t in tokens] == [tokenizer.encode(t) for t in texts]
    assert all(t.dtype == np.int32 for t in tokens)
    # The raw records, read without euro_lm: little-endian int32, no bos/eos.
    records = []
    for shard in manifest['languages'][tag]['shards']:
      reader = array_record_module.ArrayRecordReader(os.path.join(output_dir, shard['path']))
      records += reader.read_all()
      reader.close()
    assert records == [
        b''.join(i.to_bytes(4, 'little') for i in tokenizer.encode(t)) for t in texts
    ]


def test_iter_tokens_of_a_missing_language(prepared):
  with pytest.raises(
      DataError,
      match=r'holds no pol_Latn documents; it holds' r' deu_Latn, ell_Grek, fra_Latn, ukr_Cyrl',
  ):
    next(prepared_lib.iter_tokens(str(prepared[0]), 'pl'))


def test_one_worker_and_two_give_identical_output(corpus, tokenizer, prepared, tmp_path):
  _prepare(corpus, tokenizer, tmp_path, workers=1)
  assert _files(tmp_path) == _files(prepared[0])


def test_rerun_redoes_only_unfinished_units(corpus, tokenizer, tmp_path):
  _prepare(corpus, tokenizer, tmp_path, workers=1)
  before = _files(tmp_path)
  manifest = prepared_lib.read_manifest(str(tmp_path))
  units = {os.path.basename(path): entry['unit'] for path, entry in manifest['inputs'].items()}
  shard_paths = {
      name: sorted(
          os.path.join(tmp_path, shard['path'])
          for entry in manifest['languages'].values()
          for shard in entry['shards']
          if units[name] in shard['path']
      )
      for name in units
  }
  # a: a crash after its shards, before its receipt, left a temp shard too.
  os.remove(tmp_path / 'receipts' / f'{units["a.jsonl"]}.json')
  leftover = shard_paths['a.jsonl'][0] + '.tmp'
  with open(leftover, 'wb') as f:
    f.write(b'half a shard')
  # b: its outputs are gone, its receipt is not.
  for path in shard_paths['b.jsonl.gz']:
    os.remove(path)
  untouched = {path: os.stat(path).st_mtime_ns for path in shard_paths['c.parquet']}

  _prepare(corpus, tokenizer, tmp_path, workers=1)

  assert _files(tmp_path) == before
  assert not os.path.exists(leftover)
  assert {p: os.stat(p).st_mtime_ns for p in untouched} == untouched


def test_a_changed_input_is_redone_and_a_failed_run_leaves_no_manifest(tokenizer, tmp_path):
  path = tmp_path / 'docs.jsonl'
  path.write_text('{"text": "Guten Tag"}\n')
  output_dir = str(tmp_path / 'out')

  def run(strict=False):
    source = sources.TextSource(language='de', strict=strict)
    return shards.prepare([str(path)], output_dir, tokenizer.path, source, workers=1)

  assert run()['languages']['deu_Latn']['documents'] == 1
  with open(path, 'a') as f:
    f.write('{"text": "Guten Abend"}\n')
  assert run()['languages']['deu_Latn']['documents'] == 2
  with open(path, 'a') as f:
    f.write('{"text": ""}\n')
  with pytest.raises(DataError, match=re.escape(f'{path}:3: ')):
    run(strict=True)
  with pytest.raises(DataError, match='No manifest.json in'):
    prepared_lib.read_manifest(output_dir)
  assert os.listdir(os.path.join(output_dir, 'deu_Latn')) == []


def test_rerun_with_other_settings_is_refused(corpus, tokenizer, prepared):
  with pytest.raises(ConfigError, match=re.escape('(changed: docs_per_shard;')):
    shards.prepare(
        [str(corpus[0] / '*.jsonl')], str(prepared[0]), tokenizer.path, SOURCE, docs_per_shard=5
    )


def test_strict_error_in_a_worker_names_file_and_line(corpus, tokenizer, tmp_path):
  strict = sources.TextSource(language_field='lang', strict=True)
  with pytest.raises(DataError, match=re.escape(f'{corpus[0] / "b.jsonl.gz"}:3: invalid JSON')):
    _prepare(corpus, tokenizer, tmp_path, workers=2, source=strict)


def _run_cli(*args):
  return subprocess.run(
      [sys.executable, '-m', 'euro_lm.prepare_data', *args],
      cwd=_REPO,
      capture_output=True,
      text=True,
      timeout=120,
      check=False,
  )


def test_cli_prepares_a_directory(corpus, tokenizer, tmp_path):
  inputs = f'{corpus[0] / "a.jsonl"},{corpus[0] / "b.jsonl.gz"}'
  result = _run_cli(
      f'--input={inputs}',
      f'--output={tmp_path}',
      f'--tokenizer={tokenizer.path}',
      '--language=deu_Latn',
      '--workers=1',
  )
  assert result.returncode == 0, result.stderr
  manifest = prepared_lib.read_manifest(str(tmp_path))
  # A fixed language overrides the records' own field.
  assert list(manifest['languages']) == ['deu_Latn']
  assert manifest['languages']['deu_Latn']['documents'] == 16
  assert re.search(r'^deu_Latn +16 ', result.stdout, re.MULTILINE)
  assert f'{corpus[0] / "b.jsonl.gz"}: 1 invalid_json (first at line 3:' in (result.stdout)


def test_cli_bad_glob_prints_one_error_line(tokenizer, tmp_path):
  pattern = str(tmp_path / 'nothing-*.jsonl')
  result = _run_cli(
      f'--input={pattern}',
      f'--output={tmp_path / "out"}',
      f'--tokenizer={tokenizer.path}',
      '--language=de',
  )
  assert result.returncode == 1
  assert result.stderr == (f"error: The input glob '{pattern}' matches no file.\n")
