"""Tests for the fertility report, tokenizer sampling and train_tokenizer."""

import gettext
import json
import os
import subprocess
import sys

import pytest
import sentencepiece as spm

from euro_lm.data import corpus
from euro_lm.data import tokenizer as tokenizer_lib
from euro_lm.data.prepare import fertility, tokenizer_training
from euro_lm.errors import ConfigError

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Hand-made parallel text. The tokenizer below knows exactly the characters
# 'a b c d ж' and space, one piece each, and byte-falls back on the rest, so
# every count here is countable by hand.
HAND_TEXTS = {
    # 'ab cd', 'ba': 3 words, 7 characters, 7 bytes, 7 tokens.
    'eng_Latn': ['ab cd', 'ba'],
    # 'жж ab' (5 tokens, 7 bytes), 'ж' (1 token, 2 bytes): 3 words,
    # 6 characters, 9 bytes, 6 tokens.
    'ukr_Cyrl': ['жж ab', 'ж'],
    # α, β, γ are unknown: 2 bytes, so 2 tokens, each. 'αβ γ' is 7 tokens,
    # 'ab' 2: 3 words, 6 characters, 9 bytes, 9 tokens.
    'ell_Grek': ['αβ γ', 'ab'],
    # 'e' (1 byte) and U+0301 (2 bytes) are unknown; 'e\u0301 a  b' is 7
    # characters, 8 bytes, 8 tokens, 3 words; 'c' is 1 of each.
    'fra_Latn': ['e\u0301 a  b', 'c'],
}
# language: (words, characters, bytes, tokens, byte-fallback tokens), counted above.
HAND_COUNTS = {
    'eng_Latn': (3, 7, 7, 7, 0),
    'ukr_Cyrl': (3, 6, 9, 6, 0),
    'ell_Grek': (3, 6, 9, 9, 6),
    'fra_Latn': (4, 8, 9, 9, 3),
}


@pytest.fixture(scope='module')
def char_tokenizer(tmp_path_factory):
  path = tmp_path_factory.mktemp('char') / 'char.model'
  # 4 special + 256 byte pieces + the 6 characters: no room for any merge.
  return tokenizer_lib.train_sentencepiece(
      ['ab cd'] * 10 + ['dcba ж'] * 10, str(path), vocab_size=266
  )


def test_char_tokenizer_is_what_the_hand_counts_assume(char_tokenizer):
  assert len(char_tokenizer.encode('ab cdж')) == 6
  assert len(char_tokenizer.encode('αe\u0301')) == 2 + 1 + 2


def test_fertility_on_hand_counted_parallel_text(char_tokenizer):
  report = fertility.fertility_report(char_tokenizer, HAND_TEXTS, parallel=True)
  assert report['parity_kind'] == 'parallel'
  assert report['reference'] == 'eng_Latn'
  assert report['vocab_size'] == 266
  assert list(report['languages']) == list(HAND_TEXTS)
  en_words, en_chars, _, en_tokens, _ = HAND_COUNTS['eng_Latn']
  for tag, (words, chars, num_bytes, tokens, byte_tokens) in HAND_COUNTS.items():
    stats = dict(report['languages'][tag])
    assert stats.pop('rare_piece_rate') is not None  # tests/test_evaluate_tokenizer.py
    assert stats.pop('distinct_pieces') > 0
    assert stats == {
        'texts': 2,
        'words': words,
        'characters': chars,
        'bytes': num_bytes,
        'tokens': tokens,
        'tokens_per_word': tokens / words,
        'tokens_per_char': tokens / chars,
        'bytes_per_token': num_bytes / tokens,
        'chars_per_token': chars / tokens,
        'byte_fallback_rate': byte_tokens / tokens,
        'unknown_rate': 0.0,
        'parity': tokens / en_tokens,
        # Exact ratios of integers, rounded once.
        'parity_per_word': tokens * en_words / (words * en_tokens),
        'parity_per_char': tokens * en_chars / (chars * en_tokens),
    }, tag
  assert report['languages']['eng_Latn']['parity'] == 1.0
  assert report['languages']['ukr_Cyrl']['parity'] == 6 / 7
  assert report['languages']['ell_Grek']['tokens_per_word'] == 3.0


def test_per_character_parity_for_text_that_is_not_parallel(char_tokenizer):
  texts = dict(HAND_TEXTS, deu_Latn=['abba'])  # Not parallel: 1 text.
  report = fertility.fertility_report(char_tokenizer, texts)
  assert report['parity_kind'] == 'per_char'
  assert 'not parallel' in report['parity_meaning']
  parity = {tag: s['parity'] for tag, s in report['languages'].items()}
  # (tokens / characters) / (7 / 7), from HAND_COUNTS; 'abba' is 4 and 4. Per byte,
  # Ukrainian would be 6 / 9: its letters take two bytes, not two tokens.
  assert parity == {
      'eng_Latn': 1.0,
      'ukr_Cyrl': 1.0,
      'ell_Grek': 9 / 6,
      'fra_Latn': 9 / 8,
      'deu_Latn': 1.0,
  }
  assert all(s['parity'] == s['parity_per_char'] for s in report['languages'].values())


def test_english_parity_is_exactly_one_on_real_text(docs_by_lang, tokenizer):
  texts = {tag: docs[:2] for tag, docs in docs_by_lang.items()}
  for parallel in (True, False):
    report = fertility.fertility_report(tokenizer, texts, parallel=parallel)
    assert report['languages']['eng_Latn']['parity'] == 1.0


def test_undefined_ratios_are_none(char_tokenizer):
  # No words, no text, no English: each ratio that divides by 0 is None.
  report = fertility.fertility_report(char_tokenizer, {'deu_Latn': ['  ', ''], 'ita_Latn': []})
  deu, ita = report['languages']['deu_Latn'], report['languages']['ita_Latn']
  assert (deu['words'], deu['tokens'], deu['tokens_per_word']) == (0, 2, None)
  assert deu['bytes_per_token'] == 1.0 and deu['parity'] is None
  assert ita['tokens'] == 0 and ita['bytes_per_token'] is None
  assert 'no parity' in fertility.format_table(report)


def test_parallel_texts_must_align(char_tokenizer):
  with pytest.raises(ConfigError, match='same number of texts'):
    fertility.fertility_report(char_tokenizer, dict(HAND_TEXTS, deu_Latn=['abba']), parallel=True)


def test_table_is_sorted_by_parity_and_json_round_trips(char_tokenizer, tmp_path):
  report = fertility.fertility_report(char_tokenizer, HAND_TEXTS, parallel=True)
  table = fertility.format_table(report)
  rows = [line.split() for line in table.splitlines()[3:]]
  # Parity 6/7, 1, 9/7, 9/7 (ties by tag).
  order = [r[0] for r in rows]
  assert order == ['ukr_Cyrl', 'eng_Latn', 'ell_Grek', 'fra_Latn']
  # tokens/word, tokens/char, bytes/token, parity, parity/word, parity/char, byte fallback.
  assert rows[0][1:8] == ['2.00', '1.00', '1.50', '0.857', '0.857', '1.000', '0.00%']
  assert rows[2][7] == f'{100 * 6 / 9:.2f}%'  # ell_Grek
  path = tmp_path / 'out' / 'fertility.json'
  fertility.write_report(report, str(path))
  assert json.loads(path.read_text(encoding='utf-8')) == report
  assert os.listdir(path.parent) == ['fertility.json']


# --- held-out parallel text from the embedded corpus ------------------------


@pytest.fixture(scope='module')
def docs_by_lang():
  return corpus.load_embedded_corpus()


@pytest.fixture(scope='module')
def tokenizer(docs_by_lang, tmp_path_factory):
  sample = [doc for docs in docs_by_lang.values() for doc in docs[:2]]
  path = tmp_path_factory.mktemp('tokenizer') / 'tok.model'
  return tokenizer_lib.train_sentencepiece(sample, str(path), vocab_size=1000)


def _django_catalog_paths(locale):
  import django  # pylint: disable=g-import-not-at-top

  root = os.path.dirname(django.__file__)
  paths = []
  for directory, _, files in os.walk(root):
    if directory.endswith(os.path.join('locale', locale, 'LC_MESSAGES')):
      paths += [os.path.join(directory, f) for f in files if f.endswith('.mo')]
  return paths


def test_embedded_parallel_heldout_is_aligned_translation():
  tags = ['deu_Latn', 'eng_Latn', 'kat_Geor']
  texts, lines = fertility.embedded_parallel_heldout(tags, 0.1)
  assert sorted(texts) == tags
  assert len({len(t) for t in texts.values()}) == 1
  assert len(texts['eng_Latn']) > 20
  # An independent reader: Python's gettext translates each English message
  # into the German and Georgian texts in one of Django's catalogs.
  for tag, locale in (('deu_Latn', 'de'), ('kat_Geor', 'ka')):
    catalogs = []
    for path in _django_catalog_paths(locale):
      with open(path, 'rb') as f:
        catalogs.append(gettext.GNUTranslations(f))
    for english, translated in zip(texts['eng_Latn'], texts[tag]):
      assert translated in {c.gettext(english) for c in catalogs}, english
    assert {l for t in texts[tag] for l in t.split('\n')} <= lines[tag]


def test_embedded_parallel_heldout_errors():
  with pytest.raises(ConfigError, match='heldout_fraction'):
    fertility.embedded_parallel_heldout(['deu_Latn'], 0.6)


# --- sampling budgets --------------------------------------------------------


def test_sampling_budgets_by_hand():
  sizes = {'a': 400, 'b': 3600, 'c': 100_000}
  # uniform: 1000 each, but 'a' has only 400.
  assert tokenizer_training.sampling_budgets(sizes, 1000, 'uniform') == {
      'a': 400,
      'b': 1000,
      'c': 1000,
  }
  # natural: 3000 shared by 400 : 3600 : 100000; floor(3000 * n / 104000).
  assert tokenizer_training.sampling_budgets(sizes, 1000, 'natural') == {
      'a': 11,
      'b': 103,
      'c': 2884,
  }
  # T=2: weights sqrt(n) = 20 : 60 : 316.227...; sum 396.227766...
  # a: 3000 * 20 / 396.2278 = 151.43, b: 454.28, c: 2394.29.
  assert tokenizer_training.sampling_budgets(sizes, 1000, 'temperature', 2.0) == {
      'a': 151,
      'b': 454,
      'c': 2394,
  }
  # T=1 is natural; a huge T approaches uniform, capped by what 'a' has.
  assert tokenizer_training.sampling_budgets(
      sizes, 1000, 'temperature', 1.0
  ) == tokenizer_training.sampling_budgets(sizes, 1000, 'natural')
  assert tokenizer_training.sampling_budgets(sizes, 1000, 'temperature', 1e9) == {
      'a': 400,
      'b': 999,
      'c': 1000,
  }


@pytest.mark.parametrize(
    'args, match',
    [
        (({'a': 1}, 0, 'uniform'), 'chars_per_language'),
        (({'a': 1}, 10, 'temperature', 0.0), 'temperature'),
        (({'a': 1}, 10, 'zipf'), 'zipf'),
        (({'a': 0}, 10, 'uniform'), 'no text'),
    ],
)
def test_sampling_budgets_errors(args, match):
  with pytest.raises(ConfigError, match=match):
    tokenizer_training.sampling_budgets(*args)


# --- the CLI -----------------------------------------------------------------


def _run_cli(*flags):
  return subprocess.run(
      [sys.executable, '-m', 'euro_lm.train_tokenizer', *flags],
      cwd=_REPO,
      capture_output=True,
      text=True,
      timeout=120,
      check=False,
  )


def test_cli_end_to_end(docs_by_lang, tmp_path):
  result = _run_cli(f'--output={tmp_path}', '--vocab_size=1000')
  assert result.returncode == 0, result.stderr
  model_path = tmp_path / 'tokenizer.model'
  report = json.loads((tmp_path / 'fertility.json').read_text('utf-8'))
  assert sorted(report['languages']) == sorted(docs_by_lang)
  assert report['parity_kind'] == 'parallel'
  assert report['languages']['eng_Latn']['parity'] == 1.0
  assert len({s['texts'] for s in report['languages'].values()}) == 1
  assert report['training']['sampling'] == 'uniform'
  table_rows = result.stdout.split('-----\n')[-1].splitlines()[:-1]
  assert sorted(r.split()[0] for r in table_rows) == sorted(docs_by_lang)
  # The default special tokens are one piece each, and encode as one id.
  processor = spm.SentencePieceProcessor(model_file=str(model_path))
  assert processor.vocab_size() == 1000
  start, end = processor.PieceToId('<|im_start|>'), processor.PieceToId('<|im_end|>')
  assert processor.unk_id() not in (start, end) and start != end
  ids = processor.EncodeAsIds('<|im_start|>user\nHallo<|im_end|>')
  assert ids[0] == start and ids[-1] == end
  assert ids.count(start) == ids.count(end) == 1


def test_cli_vocab_too_large_is_one_error_line(tmp_path):
  result = _run_cli(
      f'--output={tmp_path}',
      '--languages=de',
      '--chars_per_language=5000',
      '--vocab_size=50000',
  )
  assert result.returncode == 1
  assert result.stderr.startswith('error: --vocab_size=50000'), result.stderr
  assert len(result.stderr.strip().splitlines()) == 1
  assert not os.path.exists(tmp_path / 'tokenizer.model')


# --- comparing tokenizers: the table and the chart of the notebook ----------


@pytest.fixture(scope='module')
def two_reports(char_tokenizer):
  """Two reports of different numbers: parallel parity and per-character parity."""
  return {
      266: fertility.fertility_report(char_tokenizer, HAND_TEXTS, parallel=True),
      'per byte': fertility.fertility_report(char_tokenizer, HAND_TEXTS),
  }


def test_comparison_languages_orders(two_reports):
  # First report: parity 6/7, 1, 9/7, 9/7; tokens per word 2, 7/3, 3, 9/4.
  assert fertility.comparison_languages(two_reports) == [
      'ukr_Cyrl',
      'eng_Latn',
      'ell_Grek',
      'fra_Latn',
  ]
  assert fertility.comparison_languages(two_reports, 'tokens_per_word') == [
      'ukr_Cyrl',
      'fra_Latn',
      'eng_Latn',
      'ell_Grek',
  ]
  assert fertility.comparison_languages(two_reports, 'language') == sorted(HAND_TEXTS)
  # Only languages every report measured.
  partial = dict(two_reports)
  partial['per byte'] = json.loads(json.dumps(partial['per byte']))
  del partial['per byte']['languages']['ell_Grek']
  assert 'ell_Grek' not in fertility.comparison_languages(partial)
  with pytest.raises(ConfigError, match='order'):
    fertility.comparison_languages(two_reports, 'bytes')
  with pytest.raises(ConfigError, match='No fertility report'):
    fertility.comparison_languages({})


def test_format_comparison(two_reports):
  lines = fertility.format_comparison(two_reports).splitlines()
  assert 'parallel text' in lines[0]
  assert lines[2].split() == [
      'language',
      '266',
      'pieces',
      'per',
      'byte',
      '266',
      'pieces',
      'per',
      'byte',
  ]
  rows = {line.split()[0]: line.split()[1:] for line in lines[4:]}
  assert list(rows) == ['ukr_Cyrl', 'eng_Latn', 'ell_Grek', 'fra_Latn']
  # tokens/word (the same tokenizer in both), then parity 6/7 and per character 1.
  assert rows['ukr_Cyrl'] == ['2.00', '2.00', '0.857', '1.000']
  assert rows['fra_Latn'] == ['2.25', '2.25', '1.286', '1.125']


def test_plot_fertility_bars_are_the_reports_numbers(two_reports):
  matplotlib = pytest.importorskip('matplotlib')
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  axes = fertility.plot_fertility(two_reports)
  try:
    tags = fertility.comparison_languages(two_reports)
    assert [t.get_text() for t in axes[1].get_xticklabels()] == tags
    for ax, metric in zip(axes, ('tokens_per_word', 'parity')):
      assert len(ax.containers) == 2
      for bars, report in zip(ax.containers, two_reports.values()):
        assert [b.get_height() for b in bars] == [report['languages'][t][metric] for t in tags]
      # Grouped: report i's bar sits right of report i-1's, same language.
      lefts = [[b.get_x() for b in bars] for bars in ax.containers]
      assert all(a < b for a, b in zip(*lefts))
    assert [t.get_text() for t in axes[0].get_legend().get_texts()] == ['266 pieces', 'per byte']
  finally:
    plt.close('all')


def test_plot_fertility_undefined_ratio_is_nan_on_given_axes(char_tokenizer):
  matplotlib = pytest.importorskip('matplotlib')
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  report = fertility.fertility_report(char_tokenizer, {'deu_Latn': ['  '], 'eng_Latn': ['ab']})
  fig, given = plt.subplots(2, 1)
  try:
    axes = fertility.plot_fertility({'only': report}, axes=given)
    assert list(axes) == list(given)
    heights = {
        t.get_text(): b.get_height()
        for t, b in zip(axes[1].get_xticklabels(), axes[0].containers[0])
    }
    assert (
        heights['eng_Latn'] == 2.0 and heights['deu_Latn'] != heights['deu_Latn']
    )  # NaN: no words.
  finally:
    plt.close(fig)
