"""Tests for train_tokenizer on the user's own files (--input)."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import zstandard

from euro_lm.data import corpus
from euro_lm.data import tokenizer as tokenizer_lib
from euro_lm.data.prepare import sources
from euro_lm.data.prepare import tokenizer_training as tt
from euro_lm.errors import ConfigError, DataError

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SOURCE = sources.TextSource(language_field='lang')
CHARS = 4200  # --chars_per_language: cuts a document short
HELDOUT = 0.25  # every 4th document is held out
EVERY = 4
# How each language is spelled in the records, and in which files its
# documents are, how many: deu spans two files; ell has fewer than EVERY.
LAYOUT = {
    'deu_Latn': ('de', {'a.jsonl': 10, 'c.jsonl': 6}),
    'eng_Latn': ('eng', {'a.jsonl': 12}),
    'fra_Latn': ('fra_Latn', {'b.jsonl.zst': 12}),
    'ell_Grek': ('el', {'b.jsonl.zst': 3}),
}
# Records that are no document, counted as bad in a.jsonl.
BAD_LINES = [
    'not json',
    json.dumps({'text': '  ', 'lang': 'de'}),
    json.dumps({'text': 'Hallo', 'lang': 'zz'}),
    json.dumps({'lang': 'de'}),
]


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """(directory, language -> its documents in file order)."""
  root = tmp_path_factory.mktemp('input')
  embedded = corpus.load_embedded_corpus()
  records = {}  # file -> [(language, JSON line)]
  for tag, (code, per_file) in LAYOUT.items():
    # 500-character pieces of the embedded corpus: distinct documents.
    pieces = [d[i : i + 500] for d in embedded[tag] for i in range(0, 2000, 500)]
    pieces = [p for p in dict.fromkeys(pieces) if p.strip()]
    for name, count in per_file.items():
      taken, pieces = pieces[:count], pieces[count:]
      records.setdefault(name, []).extend(
          (tag, json.dumps({'text': t, 'lang': code}, ensure_ascii=False)) for t in taken
      )
  # Interleave a.jsonl's languages, with the bad records between them.
  a = records['a.jsonl']
  records['a.jsonl'] = a[0::2] + [(None, l) for l in BAD_LINES] + a[1::2]
  docs = {tag: [] for tag in LAYOUT}
  for name in sorted(records):  # The order the files are read in.
    for tag, line in records[name]:
      if tag:
        docs[tag].append(json.loads(line)['text'])
    data = '\n'.join(line for _, line in records[name]).encode('utf-8')
    if name.endswith('.zst'):
      data = zstandard.ZstdCompressor().compress(data)
    (root / name).write_bytes(data)
  return root, docs


def _globs(root):
  return [str(root / '*.jsonl'), str(root / '*.zst')]


def _expected(docs, budget):
  """The training text and held-out documents, by the rule, from scratch."""
  n = len(docs)
  held = [i for i in range(n) if i % EVERY == EVERY - 1] or [n - 1]
  train = [i for i in range(n) if i not in held]
  text, filled_at = '', n
  for i in train:
    text += docs[i]
    if len(text) >= budget:
      filled_at = i
      break
  heldout = [docs[i] for i in held if i < filled_at] or [docs[held[0]]]
  return text[:budget], heldout, sum(len(docs[i]) for i in train)


@pytest.mark.parametrize('sampling, chars', [('uniform', CHARS), ('natural', 2000)])
def test_sample_fills_budgets_and_holds_out_every_kth(files, sampling, chars):
  root, docs = files
  logs = []
  sample = tt.sample_files(
      _globs(root),
      SOURCE,
      chars_per_language=chars,
      sampling=sampling,
      heldout_fraction=HELDOUT,
      log=logs.append,
  )
  assert sorted(sample.texts) == sorted(LAYOUT)
  available = {tag: _expected(d, 0)[2] for tag, d in docs.items()}
  if sampling == 'uniform':
    budgets = {tag: min(chars, n) for tag, n in available.items()}
    assert budgets['ell_Grek'] == available['ell_Grek'] < chars  # Capped.
  else:
    total = chars * len(available)
    budgets = {
        tag: min(n, math.floor(total * n / sum(available.values()))) for tag, n in available.items()
    }
  assert sample.budgets == budgets
  assert sample.documents == {tag: len(d) for tag, d in docs.items()}
  for tag, budget in budgets.items():
    text, heldout, _ = _expected(docs[tag], budget)
    assert sum(map(len, sample.texts[tag])) == budget, tag
    assert ''.join(sample.texts[tag]) == text, tag
    assert sample.heldout[tag] == heldout, tag
    for held in heldout:
      assert not any(held in t for t in sample.texts[tag]), tag
  assert [b.path for b in sample.bad_records] == [str(root / 'a.jsonl')]
  assert sample.bad_records[0].total == len(BAD_LINES)
  assert any('4 bad records skipped in 1 of 3 file(s)' in l for l in logs)


def test_train_on_files(files, tmp_path):
  root, docs = files
  logs = []
  tokenizer, report = tt.train_tokenizer(
      str(tmp_path),
      input_globs=_globs(root),
      source=SOURCE,
      vocab_size=600,
      chars_per_language=CHARS,
      heldout_fraction=HELDOUT,
      log=logs.append,
  )
  assert os.path.isfile(tmp_path / 'tokenizer.model')
  assert tokenizer.vocab_size == 600
  for tag, d in docs.items():
    assert tokenizer.decode(tokenizer.encode(d[-1])) == d[-1], tag
  written = json.loads((tmp_path / 'fertility.json').read_text('utf-8'))
  assert written == report
  assert sorted(report['languages']) == sorted(LAYOUT)
  assert report['parity_kind'] == 'per_char'
  assert 'not parallel' in report['parity_meaning']
  assert report['languages']['eng_Latn']['parity'] == 1.0
  assert report['languages']['ell_Grek']['texts'] == 1
  training = report['training']
  assert training['corpus'] == 'input'
  assert training['input'] == _globs(root)
  assert training['characters']['deu_Latn'] == CHARS
  bad = training['bad_records'][str(root / 'a.jsonl')]['kinds']
  assert {k: v['count'] for k, v in bad.items()} == {
      'empty_text': 1,
      'invalid_json': 1,
      'missing_field': 1,
      'unknown_language': 1,
  }
  assert any('not parallel text' in l for l in logs)


def test_errors_name_the_flag_or_file(files, tmp_path):
  root, _ = files
  kwargs = dict(
      input_globs=_globs(root),
      source=SOURCE,
      chars_per_language=CHARS,
      heldout_fraction=HELDOUT,
      log=lambda _: None,
  )
  with pytest.raises(DataError, match="^--input: The input glob '.*nothing"):
    tt.train_tokenizer(str(tmp_path), **dict(kwargs, input_globs=[str(root / 'nothing*')]))
  with pytest.raises(ConfigError, match='^--languages: '):
    tt.train_tokenizer(str(tmp_path), languages='de,xx', **kwargs)
  with pytest.raises(ConfigError, match=r"^--languages asks for 'pl'"):
    tt.train_tokenizer(str(tmp_path), languages='pl', **kwargs)
  with pytest.raises(ConfigError, match='^--vocab_size=50000 '):
    tt.train_tokenizer(str(tmp_path), vocab_size=50000, **kwargs)
  strict = sources.TextSource(language_field='lang', strict=True)
  with pytest.raises(DataError, match=re.escape(f'{root / "a.jsonl"}:') + r'\d+: invalid JSON'):
    tt.train_tokenizer(str(tmp_path), **dict(kwargs, source=strict))
  assert not os.path.exists(tmp_path / 'tokenizer.model')


def test_long_texts_are_cut_for_sentencepiece():
  text = 'ж' * (tt.MAX_TEXT_CHARS * 2 + 5)
  pieces = list(tt.cut_long(['ab', text]))
  assert [len(p) for p in pieces] == [2] + [tt.MAX_TEXT_CHARS] * 2 + [5]
  assert max(len(p.encode()) for p in pieces) <= 1 << 20
  assert ''.join(pieces[1:]) == text


def _run_cli(*flags):
  return subprocess.run(
      [sys.executable, '-m', 'euro_lm.train_tokenizer', *flags],
      cwd=_REPO,
      capture_output=True,
      text=True,
      timeout=120,
      check=False,
  )


def test_cli_trains_on_files(files, tmp_path):
  root, docs = files
  result = _run_cli(
      f'--output={tmp_path}',
      f'--input={",".join(_globs(root))}',
      '--language_field=lang',
      '--vocab_size=600',
      f'--chars_per_language={CHARS}',
      f'--heldout_fraction={HELDOUT}',
      '--languages=de,en,el',
  )
  assert result.returncode == 0, result.stderr
  report = json.loads((tmp_path / 'fertility.json').read_text('utf-8'))
  assert sorted(report['languages']) == ['deu_Latn', 'ell_Grek', 'eng_Latn']
  assert report['parity_kind'] == 'per_char'
  tokenizer = tokenizer_lib.load_tokenizer(str(tmp_path / 'tokenizer.model'))
  assert tokenizer.decode(tokenizer.encode(docs['ell_Grek'][0])) == (docs['ell_Grek'][0])
  assert f'{root / "a.jsonl"}: 1 empty_text (first at line' in result.stdout
  assert 'text not parallel' in result.stdout  # The table's parity line.


def test_cli_errors_are_one_line(tmp_path):
  pattern = str(tmp_path / 'nothing-*.jsonl')
  result = _run_cli(f'--output={tmp_path}', f'--input={pattern}', '--language=de')
  assert result.returncode == 1
  assert result.stderr == (f"error: --input: The input glob '{pattern}' matches no file.\n")
  result = _run_cli(f'--output={tmp_path}', '--language=de')
  assert result.returncode == 1
  assert result.stderr == ('error: --language: set for --input files, but --input is not given.\n')
