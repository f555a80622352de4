"""Tests for `python -m euro_lm.evaluate_tokenizer` and the tokenizer report it shares with
train_tokenizer: every number against the tokenizer libraries' own encodings."""

import base64
import collections
import gzip
import json
import os
import subprocess
import sys

import pytest
import sentencepiece as spm
import tokenizers

from euro_lm.data import corpus, hf_tokenizer
from euro_lm.data import tokenizer as tokenizer_lib
from euro_lm.data.prepare import fertility, sources, token_counter, tokenizer_training
from euro_lm.errors import UserError
from euro_lm.evaluation import tokenizers as evaluation
from tests import hf_tokenizers

tiktoken_load = pytest.importorskip('tiktoken.load')
tiktoken = pytest.importorskip('tiktoken')

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Held-out parallel text (written here, in no training catalog) in Latin, Greek and
# Cyrillic script, with rare characters (a CJK word, an emoji, Georgian) for byte fallback.
PARALLEL = {
    'eng_Latn': ['The library opens at nine.', 'We read old books by the lake 📚.'],
    'deu_Latn': ['Die Bibliothek öffnet um neun.', 'Wir lesen alte Bücher am See 📚.'],
    'ell_Grek': ['Η βιβλιοθήκη ανοίγει στις εννέα.', 'Διαβάζουμε παλιά βιβλία στη λίμνη 📚.'],
    'rus_Cyrl': ['Библиотека открывается в девять.', 'Мы читаем старые книги у озера 图书馆.'],
    'ukr_Cyrl': ['Бібліотека відкривається о дев’ятій.', 'Ми читаємо старі книжки біля озера ႠႡ.'],
}


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """A parallel JSONL, the three kinds of tokenizer, and a tiktoken file of the Llama 3 one."""
  root = tmp_path_factory.mktemp('evaluate_tokenizer')
  with open(root / 'parallel.jsonl', 'w', encoding='utf-8') as f:
    for tag, texts in PARALLEL.items():
      for text in texts:
        f.write(json.dumps({'text': text, 'lang': tag}, ensure_ascii=False) + '\n')
  docs = corpus.load_embedded_corpus()
  sample = [d for tag in sorted(docs) for d in docs[tag][:8]]
  tokenizer_lib.train_sentencepiece(sample, str(root / 'sp.model'), vocab_size=700)
  tokenizer_lib.train_sentencepiece(
      sample, str(root / 'sp_unk.model'), vocab_size=700, byte_fallback=False
  )
  llama3 = hf_tokenizers.make_tokenizer_folder('llama3', root / 'llama3', 600)
  # Its byte-level BPE as a tiktoken file: a piece's bytes and its id as the rank (ids are
  # the 256 bytes, then merges in order, so ranks merge as the BPE does).
  vocab = json.loads((root / 'llama3' / 'tokenizer.json').read_text('utf-8'))['model']['vocab']
  with open(root / 'llama3.tiktoken', 'w', encoding='ascii') as f:
    for piece, rank in sorted(vocab.items(), key=lambda item: item[1]):
      token = hf_tokenizer.piece_bytes(piece, byte_level=True)
      f.write(f'{base64.b64encode(token).decode()} {rank}\n')
  return {
      'root': root,
      'jsonl': str(root / 'parallel.jsonl'),
      'sp': str(root / 'sp.model'),
      'sp_unk': str(root / 'sp_unk.model'),
      'llama3': llama3,
      'tiktoken': str(root / 'llama3.tiktoken'),
  }


def _reference_ids(files, name, texts):
  """Ids from each library's own encoder, not through euro_lm."""
  if name in ('sp', 'sp_unk'):
    return spm.SentencePieceProcessor(model_file=files[name]).EncodeAsIds(texts)
  if name == 'llama3':
    tokenizer = tokenizers.Tokenizer.from_file(os.path.join(files['llama3'], 'tokenizer.json'))
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
  encoding = tiktoken.Encoding(
      'reference',
      pat_str=token_counter.TIKTOKEN_PATTERNS['llama3'],
      mergeable_ranks=tiktoken_load.load_tiktoken_bpe(files['tiktoken']),
      special_tokens={},
  )
  return [encoding.encode(t) for t in texts]


def _evaluate(files, names, **kwargs):
  return evaluation.evaluate_tokenizers(
      [files[n] for n in names],
      [files['jsonl']],
      sources.TextSource(language_field='lang'),
      labels=names,
      tiktoken_pattern='llama3',
      log=lambda _: None,
      **kwargs,
  )


@pytest.fixture(autouse=True)
def _no_tiktoken_cache(monkeypatch):
  # tiktoken.load caches files it reads under /tmp unless this is empty.
  monkeypatch.setenv('TIKTOKEN_CACHE_DIR', '')


def test_counts_and_parities_equal_the_libraries_encodings(files):
  names = ['sp', 'llama3', 'tiktoken']
  result = _evaluate(files, names, parallel=True, pivot='en')
  assert result['pivot'] == 'eng_Latn' and result['parity_kind'] == 'parallel'
  for name in names:
    stats = result['tokenizers'][name]['languages']
    assert list(stats) == sorted(PARALLEL)
    expected = {}
    for tag, texts in PARALLEL.items():
      tokens = sum(map(len, _reference_ids(files, name, texts)))
      words = sum(len(t.split()) for t in texts)
      chars = sum(len(t) for t in texts)
      num_bytes = sum(len(t.encode('utf-8')) for t in texts)
      expected[tag] = (tokens, words, chars, num_bytes)
    en_tokens, en_words, en_chars, _ = expected['eng_Latn']
    for tag, (tokens, words, chars, num_bytes) in expected.items():
      s = stats[tag]
      assert (s['tokens'], s['words'], s['characters'], s['bytes']) == expected[tag]
      assert s['tokens_per_word'] == tokens / words
      assert s['tokens_per_char'] == tokens / chars
      assert s['bytes_per_token'] == num_bytes / tokens
      assert s['parity'] == tokens / en_tokens
      assert s['parity_per_word'] == tokens * en_words / (words * en_tokens)
      assert s['parity_per_char'] == tokens * en_chars / (chars * en_tokens)
    assert stats['eng_Latn']['parity'] == stats['eng_Latn']['parity_per_char'] == 1.0
  # The tiktoken file is the Llama 3 BPE: with Llama 3's pattern, the same counts.
  for tag in PARALLEL:
    assert (
        result['tokenizers']['tiktoken']['languages'][tag]['tokens']
        == result['tokenizers']['llama3']['languages'][tag]['tokens']
    )


def test_an_empty_or_cut_input_is_warned_and_recorded(files, tmp_path):
  with open(files['jsonl'], 'rb') as f:
    whole = f.read()
  lines = whole.count(b'\n')
  cut = tmp_path / 'cut.jsonl.gz'
  cut.write_bytes(gzip.compress(whole)[:-8])  # without the trailer: every line, no end
  empty = tmp_path / 'empty.jsonl'
  empty.write_bytes(b'')
  logged = []
  result = evaluation.evaluate_tokenizers(
      [files['sp']],
      [str(cut), str(empty)],
      sources.TextSource(language_field='lang'),
      log=logged.append,
  )
  assert result['documents'] == {tag: len(texts) for tag, texts in PARALLEL.items()}
  assert [line for line in logged if line.startswith('warning: ')] == [
      f'warning: {cut}: truncated at byte {cut.stat().st_size}: the file ends'
      f' inside a gzip frame (cut short); lines from {lines + 1} on are lost.',
      f'warning: {empty}: holds no records (an empty file).',
  ]
  assert result['truncated'][str(cut)]['line'] == lines + 1


def test_byte_fallback_unknown_and_rare_pieces(files):
  names = ['sp', 'sp_unk', 'llama3', 'tiktoken']
  result = _evaluate(files, names, rare_max_count=2)
  assert result['parity_kind'] == 'per_char'
  encoding = tiktoken.Encoding(
      'reference',
      pat_str=token_counter.TIKTOKEN_PATTERNS['llama3'],
      mergeable_ranks=tiktoken_load.load_tiktoken_bpe(files['tiktoken']),
      special_tokens={},
  )
  llama3 = tokenizers.Tokenizer.from_file(os.path.join(files['llama3'], 'tokenizer.json'))

  def is_byte_fallback(name, token):
    if name in ('sp', 'sp_unk'):
      piece = spm.SentencePieceProcessor(model_file=files[name]).IdToPiece(token)
      return len(piece) == 6 and piece.startswith('<0x')
    if name == 'llama3':  # the decoder writes U+FFFD for bytes that are no whole character
      return '\ufffd' in llama3.decode([token])
    try:
      encoding.decode_single_token_bytes(token).decode('utf-8')
    except UnicodeDecodeError:
      return True
    return False

  for name in names:
    ids = {tag: _reference_ids(files, name, texts) for tag, texts in PARALLEL.items()}
    everywhere = collections.Counter(i for e in ids.values() for t in e for i in t)
    unk = spm.SentencePieceProcessor(model_file=files['sp_unk']).unk_id()
    for tag, encoded in ids.items():
      flat = [i for t in encoded for i in t]
      s = result['tokenizers'][name]['languages'][tag]
      assert s['byte_fallback_rate'] == sum(is_byte_fallback(name, i) for i in flat) / len(flat)
      unknown = sum(i == unk for i in flat) if name == 'sp_unk' else 0
      assert s['unknown_rate'] == unknown / len(flat)
      assert s['rare_piece_rate'] == sum(everywhere[i] <= 2 for i in flat) / len(flat)
      assert s['distinct_pieces'] == len(set(flat))
  rates = {n: result['tokenizers'][n]['languages'] for n in names}
  # The rare characters: bytes with byte fallback, the unknown piece without.
  assert rates['sp']['rus_Cyrl']['byte_fallback_rate'] > 0
  assert rates['sp_unk']['rus_Cyrl']['unknown_rate'] > 0
  assert rates['sp_unk']['rus_Cyrl']['byte_fallback_rate'] == 0
  assert rates['llama3']['ell_Grek']['byte_fallback_rate'] > 0
  assert rates['sp']['eng_Latn']['unknown_rate'] == 0


def test_cli_writes_the_contract_and_a_plot(files, tmp_path):
  pytest.importorskip('matplotlib')
  result = _run_cli(
      f'--tokenizer={files["sp"]}',
      f'--tokenizer={files["llama3"]}',
      f'--tokenizer={files["tiktoken"]}',
      f'--input={files["jsonl"]}',
      '--language_field=lang',
      '--parallel',
      '--pivot=eng_Latn',
      '--tiktoken_pattern=llama3',
      f'--output={tmp_path / "result.json"}',
      f'--plot={tmp_path / "plot.png"}',
  )
  assert result.returncode == 0, result.stderr
  written = json.loads((tmp_path / 'result.json').read_text('utf-8'))
  assert list(written['tokenizers']) == ['sp.model', 'llama3', 'llama3.tiktoken']
  for report in written['tokenizers'].values():
    for stats in report['languages'].values():
      for key in ('tokens_per_word', 'tokens_per_char', 'bytes_per_token', 'parity'):
        assert isinstance(stats[key], float), key
  assert (tmp_path / 'plot.png').read_bytes()[:4] == b'\x89PNG'
  # The table: one row per language, tokens/word of each tokenizer in its first columns.
  rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()}
  for tag in PARALLEL:
    tpw = [
        written['tokenizers'][n]['languages'][tag]['tokens_per_word'] for n in written['tokenizers']
    ]
    assert rows[tag][:3] == [f'{x:.2f}' for x in tpw]


def _run_cli(*flags):
  return subprocess.run(
      [sys.executable, '-m', 'euro_lm.evaluate_tokenizer', *flags],
      cwd=_REPO,
      capture_output=True,
      text=True,
      timeout=120,
      check=False,
  )


@pytest.mark.parametrize(
    'flags, message',
    [
        (['--tokenizer={root}/missing.model'], 'No tokenizer at {root}/missing.model'),
        (['--language=xx', '--language_field='], "language='xx': Unknown language code"),
        (['--pivot=qqq'], '--pivot=qqq: Unknown language code'),
        (['--pivot=fr'], '--pivot=fr: no fra_Latn documents'),
        (['--input={root}/uneven.jsonl', '--parallel'], '--parallel: parallel text has'),
        (['--tokenizer={root}/bad.tiktoken'], '{root}/bad.tiktoken:2: not a tiktoken line'),
    ],
)
def test_bad_input_is_one_error_line(files, flags, message):
  root = files['root']
  with open(root / 'uneven.jsonl', 'w', encoding='utf-8') as f:
    f.write('{"text": "a b", "lang": "en"}\n{"text": "c", "lang": "en"}\n')
    f.write('{"text": "α", "lang": "el"}\n')
  (root / 'bad.tiktoken').write_text('YQ== 0\nnot base64!\n', encoding='ascii')
  defaults = {
      '--tokenizer': files['sp'],
      '--input': files['jsonl'],
      '--language_field': 'lang',
  }
  given = [f.format(root=root) for f in flags]
  named = {f.split('=')[0] for f in given}
  args = given + [f'{k}={v}' for k, v in defaults.items() if k not in named]
  result = _run_cli(*args)
  assert result.returncode == 1
  assert result.stderr.startswith('error: '), result.stderr
  assert message.format(root=root) in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1


def test_tiktoken_file_is_told_by_its_content(files, tmp_path):
  # Llama 3 ships its tiktoken file as `tokenizer.model`, SentencePiece's name.
  renamed = tmp_path / 'tokenizer.model'
  renamed.write_bytes(open(files['tiktoken'], 'rb').read())
  assert token_counter.is_tiktoken_file(str(renamed))
  assert not token_counter.is_tiktoken_file(files['sp'])
  assert not token_counter.is_tiktoken_file(os.path.join(files['llama3'], 'tokenizer.json'))
  counter = token_counter.load_counter(str(renamed), 'llama3')
  assert counter.kind == 'tiktoken' and counter.vocab_size == 600
  with pytest.raises(UserError, match='tiktoken_pattern'):
    token_counter.load_counter(str(renamed), '(unclosed')


def test_labels():
  assert evaluation.tokenizer_labels(['a/tok/tokenizer.json', 'b/tok', 'c/x.model']) == [
      'tok',
      'tok#2',
      'x.model',
  ]
  with pytest.raises(UserError, match='--label'):
    evaluation.tokenizer_labels(['a', 'b'], ['same', 'same'])


# --- train_tokenizer: --character_coverage and the vocabulary-size warning -------------


def test_character_coverage_reaches_sentencepiece(tmp_path):
  common = dict(languages='de,el', chars_per_language=20_000, vocab_size=600, log=lambda _: None)
  pieces = {}
  for coverage in (1.0, 0.98):
    directory = tmp_path / str(coverage)
    tokenizer, report = tokenizer_training.train_tokenizer(
        str(directory), character_coverage=coverage, **common
    )
    assert report['training']['character_coverage'] == coverage
    processor = spm.SentencePieceProcessor(model_file=str(directory / 'tokenizer.model'))
    pieces[coverage] = {processor.IdToPiece(i) for i in range(processor.vocab_size())}
  # Full coverage gives every character of the sample a piece of its own; less leaves the
  # rarest ones to byte fallback.
  characters = {c: {p for p in ps if len(p) == 1} for c, ps in pieces.items()}
  assert characters[0.98] < characters[1.0]
  with pytest.raises(UserError, match='--character_coverage'):
    tokenizer_training.train_tokenizer(str(tmp_path / 'x'), character_coverage=0.0, **common)


def test_a_vocabulary_too_large_for_the_sample_is_warned(tmp_path):
  texts = corpus.load_embedded_corpus()['deu_Latn'][:20]
  logs = {}
  for vocab_size in (450, 2500):
    log = []
    _, report = tokenizer_training.train_tokenizer(
        str(tmp_path / str(vocab_size)),
        languages='de',
        chars_per_language=sum(map(len, texts)),
        vocab_size=vocab_size,
        log=log.append,
    )
    logs[vocab_size] = (report['training']['rare_piece_share'], log)
  # The share, independently: pieces the sample itself uses fewer than 3 times.
  for vocab_size, (share, log) in logs.items():
    processor = spm.SentencePieceProcessor(
        model_file=str(tmp_path / str(vocab_size) / 'tokenizer.model')
    )
    warned = any(line.startswith('warning: --vocab_size') for line in log)
    assert warned == (share > tokenizer_training.RARE_PIECE_WARNING), vocab_size
    assert 0 <= share <= 1 and processor.vocab_size() == vocab_size
  assert logs[450][0] < tokenizer_training.RARE_PIECE_WARNING < logs[2500][0]


def test_rare_piece_share_by_hand(tmp_path):
  # 4 special + 256 bytes + 'a', 'b' + 'ab' (the one merge) + 2 user-defined pieces.
  model = tmp_path / 'm.model'
  tokenizer_lib.train_sentencepiece(
      ['ab ab ab b'] * 3, str(model), vocab_size=266, user_defined_symbols=['<x>', '<y>']
  )
  processor = spm.SentencePieceProcessor(model_file=str(model))
  learned = [
      processor.IdToPiece(i)
      for i in range(processor.vocab_size())
      if not (processor.IsControl(i) or processor.IsByte(i) or processor.IsUnknown(i))
      and processor.IdToPiece(i) not in ('<x>', '<y>')
  ]
  counts = collections.Counter(processor.IdToPiece(i) for i in processor.EncodeAsIds('ab ab b a'))
  expected = sum(counts[p] < 3 for p in learned) / len(learned)
  assert tokenizer_training.rare_piece_share(str(model), ['ab ab b a'], ['<x>', '<y>']) == expected


def test_the_report_inside_train_tokenizer_is_the_same_code(files):
  # train_tokenizer calls fertility_report on a euro_lm Tokenizer; evaluate_tokenizer on its
  # counter: equal reports.
  tokenizer = tokenizer_lib.load_tokenizer(files['sp'])
  direct = fertility.fertility_report(tokenizer, PARALLEL, parallel=True)
  counted = fertility.fertility_report(
      token_counter.load_counter(files['sp']), PARALLEL, parallel=True
  )
  assert direct == counted
