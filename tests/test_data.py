"""Tests for euro_lm.data: languages, corpus, tokenizer, packing, make_data."""

import gettext
import glob
import importlib.util
import os
import re
import struct
import sys

import numpy as np
import pytest
import sentencepiece as spm

from euro_lm.data import chat, corpus, dataset, languages, pipeline
from euro_lm.data import tokenizer as tokenizer_lib
from euro_lm.errors import DataError

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# No '▁' (U+2581) in these: SentencePiece reads a literal one as a space.
MULTILINGUAL = (
    'Hello, world!',
    'Καλημέρα κόσμε',
    'Добрый день, мир',
    'Příliš žluťoučký kůň úpěl ďábelské ódy',
    'ქართული ენა',
    'Emoji 😀🇪🇺 and CJK 你好，世界 and 한국어',
    'tabs\tand  runs   of    spaces\n\n\nand newlines\r\n',
    '  leading and trailing  ',
    '',
    'Digits 1234567890 and 3.14159',
)


def _django_dir():
  import django  # pylint: disable=g-import-not-at-top

  return os.path.dirname(django.__file__)


@pytest.fixture(scope='module')
def docs_by_lang():
  return corpus.load_embedded_corpus()


@pytest.fixture(scope='module')
def tokenizer(docs_by_lang, tmp_path_factory):
  sample = [doc for docs in docs_by_lang.values() for doc in docs[:2]]
  path = tmp_path_factory.mktemp('tokenizer') / 'tok.model'
  return tokenizer_lib.train_sentencepiece(sample, str(path), vocab_size=1024)


# --- languages ---------------------------------------------------------------


def test_language_table():
  tags = [lang.tag for lang in languages.LANGUAGES]
  assert len(tags) == len(set(tags)) == 111
  assert all(re.fullmatch(r'[a-z]{3}_[A-Z][a-z]{3}', t) for t in tags)
  assert len(languages.EU_OFFICIAL) == 24
  assert {t.split('_')[0] for t in languages.EU_OFFICIAL} == set(
      'bul ces dan deu ell eng est fin fra gle hrv hun ita lav lit mlt nld pol'
      ' por ron slk slv spa swe'.split()
  )
  # A code names one language; only a language in two scripts shares it between tags.
  for field in ('iso639_1', 'iso639_3', 'iso639_2b'):
    by_code = {}
    for lang in languages.LANGUAGES:
      if getattr(lang, field):
        by_code.setdefault(getattr(lang, field), set()).add(lang.iso639_3)
    assert all(len(v) == 1 for v in by_code.values()), field
  # No 639-2/B code is another language's 639-3 code.
  iso639_3 = {lang.iso639_3 for lang in languages.LANGUAGES}
  assert not {lang.iso639_2b for lang in languages.LANGUAGES} & iso639_3


# The languages of Europe added with the tokenizer evaluation, with their ISO 639-1
# code ('' where there is none) and 639-3 code, as ISO 639 lists them.
EUROPE = {
    'rus_Cyrl': 'ru', 'bel_Cyrl': 'be', 'cym_Latn': 'cy', 'ltz_Latn': 'lb', 'fao_Latn': 'fo',
    'roh_Latn': 'rm', 'bre_Latn': 'br', 'gla_Latn': 'gd', 'glv_Latn': 'gv', 'cor_Latn': 'kw',
    'oci_Latn': 'oc', 'cos_Latn': 'co', 'srd_Latn': 'sc', 'fry_Latn': 'fy', 'lim_Latn': 'li',
    'arg_Latn': 'an', 'wln_Latn': 'wa', 'sme_Latn': 'se', 'hye_Armn': 'hy', 'aze_Latn': 'az',
    'tat_Cyrl': 'tt', 'bak_Cyrl': 'ba', 'chv_Cyrl': 'cv', 'kom_Cyrl': 'kv', 'oss_Cyrl': 'os',
    'che_Cyrl': 'ce', 'ava_Cyrl': 'av', 'yid_Hebr': 'yi', 'lat_Latn': 'la',
    'fur_Latn': '', 'lld_Latn': '', 'hsb_Latn': '', 'dsb_Latn': '', 'csb_Latn': '',
    'szl_Latn': '', 'nds_Latn': '', 'udm_Cyrl': '', 'chm_Cyrl': '', 'krl_Latn': '',
    'vro_Latn': '', 'ltg_Latn': '', 'rup_Latn': '', 'ast_Latn': '', 'gsw_Latn': '',
    'rom_Latn': '', 'cnr_Latn': '', 'myv_Cyrl': '', 'mdf_Cyrl': '', 'crh_Latn': '',
}  # fmt: skip


@pytest.mark.parametrize('tag, iso639_1', sorted(EUROPE.items()))
def test_languages_of_europe_resolve_from_their_codes(tag, iso639_1):
  iso639_3, script = tag.split('_')
  codes = [iso639_3, iso639_3.upper(), tag, f'{iso639_3}-{script}']
  codes += [iso639_1, f'{iso639_1}_{script}', f'{iso639_1.upper()}-{script}-XX'] if iso639_1 else []
  for code in codes:
    assert languages.resolve_language(code) == tag, code
  # Round trip: the tag's own fields fold back to it.
  (lang,) = [l for l in languages.LANGUAGES if l.tag == tag]
  assert (lang.iso639_1, lang.iso639_3, lang.script) == (iso639_1, iso639_3, script)
  assert languages.canonical_language(lang.tag.lower()) == tag


def test_a_language_in_two_scripts():
  assert languages.resolve_language('sr') == 'srp_Cyrl'  # the first: its official script
  assert languages.resolve_language('srp') == 'srp_Cyrl'
  assert languages.resolve_language('sr_Latn') == 'srp_Latn'
  assert languages.resolve_language('sr-Latn-RS') == 'srp_Latn'
  assert languages.resolve_language('SRP_LATN') == 'srp_Latn'
  with pytest.raises(ValueError, match=r"Serbian only as 'srp_Cyrl' or 'srp_Latn'\."):
    languages.resolve_language('sr_Grek')


def test_the_embedded_corpus_keeps_its_languages():
  # More of Django's catalogs now name known languages (ru, cy, hy, ...); the corpus
  # stays the 36 whose catalogs share enough messages for a parallel held-out set.
  assert sorted(corpus.django_catalogs()) == sorted(corpus.EMBEDDED_LANGUAGES)
  assert len(corpus.EMBEDDED_LANGUAGES) == 36


@pytest.mark.parametrize(
    'code, tag',
    [
        ('cs', 'ces_Latn'),
        ('CES', 'ces_Latn'),
        ('cze', 'ces_Latn'),
        ('ces_Latn', 'ces_Latn'),
        ('CES_LATN', 'ces_Latn'),
        ('ger', 'deu_Latn'),
        ('gre', 'ell_Grek'),
        ('fre', 'fra_Latn'),
        ('dut', 'nld_Latn'),
        ('rum', 'ron_Latn'),
        ('slo', 'slk_Latn'),
        ('alb', 'sqi_Latn'),
        ('sqi', 'sqi_Latn'),
        ('baq', 'eus_Latn'),
        ('geo', 'kat_Geor'),
        ('ice', 'isl_Latn'),
        ('mac', 'mkd_Cyrl'),
        ('pt_BR', 'por_Latn'),
        ('pt-BR', 'por_Latn'),
        ('de_CH', 'deu_Latn'),
        ('sr', 'srp_Cyrl'),
        ('sr-Cyrl-RS', 'srp_Cyrl'),
        ('nb', 'nob_Latn'),
        (' el ', 'ell_Grek'),
    ],
)
def test_canonical_language_folds_aliases(code, tag):
  assert languages.canonical_language(code) == tag


def test_canonical_language_rejects_unknown_code():
  with pytest.raises(ValueError, match=r"'xx'.*LANGUAGES"):
    languages.canonical_language('xx')


def test_canonical_language_rejects_other_script():
  with pytest.raises(ValueError, match=r"de_Cyrl.*'Cyrl'.*deu_Latn"):
    languages.canonical_language('de_Cyrl')


# --- .mo reader and corpus ---------------------------------------------------


def _as_gettext_catalog(messages):
  """read_mo's dict in the shape of GNUTranslations' catalog."""
  catalog = {}
  for msgid, forms in messages.items():
    if '\x00' in msgid:
      singular = msgid.split('\x00')[0]
      catalog.update({(singular, i): form for i, form in enumerate(forms)})
    else:
      (catalog[msgid],) = forms
  return catalog


def _gettext_catalog(path):
  with open(path, 'rb') as f:
    # The full catalog is only reachable through this private attribute.
    catalog = dict(gettext.GNUTranslations(f)._catalog)  # pylint: disable=protected-access
  del catalog['']  # The header, which read_mo leaves out.
  return catalog


@pytest.mark.parametrize('locale', ['pl', 'el', 'ga'])
def test_read_mo_matches_gettext(locale):
  paths = glob.glob(
      os.path.join(_django_dir(), '**', 'locale', locale, 'LC_MESSAGES', '*.mo'),
      recursive=True,
  )
  assert len(paths) >= 10
  for path in paths:
    assert _as_gettext_catalog(corpus.read_mo(path)) == _gettext_catalog(path)


def _write_mo(path, messages, byte_order):
  """Writes a minimal .mo file (no hash table) in the given byte order."""
  header_entry = {'': 'Content-Type: text/plain; charset=UTF-8\n'}
  entries = sorted({**header_entry, **messages}.items())
  count = len(entries)
  originals_at = 28  # After the 7-word header.
  translations_at = originals_at + 8 * count
  strings_at = translations_at + 8 * count
  tables, blob = b'', b''
  for column in (0, 1):  # msgids, then translations
    for entry in entries:
      string = entry[column].encode()
      tables += struct.pack(byte_order + '2I', len(string), strings_at + len(blob))
      blob += string + b'\x00'
  # magic, revision, count, table offsets, then an empty hash table.
  fields = (0x950412DE, 0, count, originals_at, translations_at, 0, 0)
  header = struct.pack(byte_order + '7I', *fields)
  with open(path, 'wb') as f:
    f.write(header + tables + blob)


@pytest.mark.parametrize('byte_order', ['<', '>'])
def test_read_mo_both_byte_orders(tmp_path, byte_order):
  messages = {
      'Hello': 'Γειά σου',
      'menu\x04Open': 'Άνοιγμα',
      'one file\x00%d files': 'ένα αρχείο\x00%d αρχεία',
  }
  path = tmp_path / 'x.mo'
  _write_mo(path, messages, byte_order)
  messages_read = corpus.read_mo(str(path))
  assert messages_read == {
      'Hello': ('Γειά σου',),
      'menu\x04Open': ('Άνοιγμα',),
      'one file\x00%d files': ('ένα αρχείο', '%d αρχεία'),
  }
  assert _as_gettext_catalog(messages_read) == _gettext_catalog(path)


def test_read_mo_names_a_bad_file(tmp_path):
  path = tmp_path / 'bad.mo'
  path.write_bytes(b'not a catalog at all')
  with pytest.raises(ValueError, match=re.escape(str(path))):
    corpus.read_mo(str(path))


_SCRIPT_RANGES = {
    'Latn': ('A', 'ɏ'),
    'Grek': ('Ͱ', 'Ͽ'),
    'Cyrl': ('Ѐ', 'ӿ'),
    'Geor': ('Ⴀ', 'ჿ'),
}


def _share_in_script(text, script):
  low, high = _SCRIPT_RANGES[script]
  letters = [c for c in text if c.isalpha()]
  return sum(low <= c <= high for c in letters) / len(letters)


def test_embedded_corpus_covers_european_languages(docs_by_lang):
  assert list(docs_by_lang) == sorted(docs_by_lang)
  assert set(docs_by_lang) <= {lang.tag for lang in languages.LANGUAGES}
  assert len(set(docs_by_lang) & set(languages.EU_OFFICIAL)) >= 20
  for tag, docs in docs_by_lang.items():
    text = '\n'.join(docs)
    assert len(docs) >= 4 and len(text) >= 8000, tag
    # Mostly written in the tag's script (the rest: placeholders, names).
    assert _share_in_script(text, tag.split('_')[1]) > 0.6, tag


def test_embedded_corpus_text_comes_from_the_catalogs(docs_by_lang):
  django_dir = _django_dir()
  required = 'This field is required.'
  english_lines = '\n'.join(docs_by_lang['eng_Latn']).split('\n')
  assert english_lines.count(required) == 1  # Source strings appear once.
  for locale, tag in [
      ('de', 'deu_Latn'),
      ('el', 'ell_Grek'),
      ('sr', 'srp_Cyrl'),
  ]:
    path = os.path.join(django_dir, 'conf', 'locale', locale, 'LC_MESSAGES', 'django.mo')
    (translation,) = corpus.read_mo(path)[required]
    assert translation in '\n'.join(docs_by_lang[tag])


def test_embedded_corpus_is_deterministic_and_sized(docs_by_lang):
  assert corpus.load_embedded_corpus() == docs_by_lang
  small = corpus.load_embedded_corpus(doc_chars=500)
  for tag, docs in small.items():
    # Same text, cut differently: all but the last reach doc_chars.
    assert '\n'.join(docs) == '\n'.join(docs_by_lang[tag])
    assert all(len(doc) >= 499 for doc in docs[:-1]), tag


def test_missing_django_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, 'django', None)
  with pytest.raises(corpus.CorpusNotInstalledError, match='pip install django'):
    corpus.load_embedded_corpus()
  assert issubclass(corpus.CorpusNotInstalledError, RuntimeError)


def test_split_train_valid_holds_out_every_kth():
  docs = {
      'deu_Latn': [f'de{i}' for i in range(10)],
      'fra_Latn': ['fr0', 'fr1', 'fr2'],
  }
  train, valid = corpus.split_train_valid(docs, 0.25)
  assert valid == {'deu_Latn': ['de3', 'de7'], 'fra_Latn': ['fr2']}
  assert train == {
      'deu_Latn': ['de0', 'de1', 'de2', 'de4', 'de5', 'de6', 'de8', 'de9'],
      'fra_Latn': ['fr0', 'fr1'],
  }
  assert corpus.split_train_valid(docs, 0.25) == (train, valid)


def test_split_train_valid_on_corpus(docs_by_lang):
  train, valid = corpus.split_train_valid(docs_by_lang, 0.1)
  for tag, docs in docs_by_lang.items():
    assert train[tag] and valid[tag]
    assert sorted(train[tag] + valid[tag]) == sorted(docs)
    assert not set(train[tag]) & set(valid[tag])


@pytest.mark.parametrize('fraction', [0.0, 0.6, -0.1])
def test_split_train_valid_rejects_fraction(fraction):
  with pytest.raises(ValueError, match='data.valid_fraction'):
    corpus.split_train_valid({'deu_Latn': ['a', 'b']}, fraction)


def test_select_languages(docs_by_lang):
  assert corpus.select_languages(docs_by_lang, '') == docs_by_lang
  selected = corpus.select_languages(docs_by_lang, 'el, cze,deu_Latn')
  assert list(selected) == ['ces_Latn', 'deu_Latn', 'ell_Grek']
  assert selected['ell_Grek'] is docs_by_lang['ell_Grek']
  # Maltese is in the table but has no Django catalogs.
  with pytest.raises(ValueError, match=r'data.languages.*mlt_Latn.*Available: bos_Latn'):
    corpus.select_languages(docs_by_lang, 'de,mt')
  with pytest.raises(ValueError, match=r"data.languages.*'xx'"):
    corpus.select_languages(docs_by_lang, 'xx')


# --- tokenizer ---------------------------------------------------------------


def test_tokenizer_special_ids(tokenizer):
  assert tokenizer.vocab_size == 1024
  assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 2, 3)


@pytest.mark.parametrize('text', MULTILINGUAL)
def test_tokenizer_round_trips(tokenizer, text):
  ids = tokenizer.encode(text)
  assert tokenizer.decode(ids) == text
  # The exact bits-per-byte rule: no dummy prefix, so bytes add up exactly.
  assert tokenizer.token_bytes()[ids].sum() == len(text.encode('utf-8'))


def test_tokenizer_literal_space_piece(tokenizer):
  # SentencePiece cannot tell a literal '▁' from a space; token_bytes follows
  # the decoded text.
  ids = tokenizer.encode('a\u2581b')
  assert tokenizer.decode(ids) == 'a b'
  assert tokenizer.token_bytes()[ids].sum() == 3


def test_token_bytes_with_a_dummy_prefix_model(docs_by_lang, tmp_path):
  # A model trained elsewhere with SentencePiece's defaults (dummy prefix).
  model_path = tmp_path / 'prefix.model'
  with open(model_path, 'wb') as f:
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(docs_by_lang['deu_Latn']),
        model_writer=f,
        vocab_size=600,
        byte_fallback=True,
        minloglevel=2,
    )
  tokenizer = tokenizer_lib.load_tokenizer(str(model_path))
  for text in ('Guten Tag', 'Καλημέρα κόσμε'):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.token_bytes()[ids].sum() == len(text.encode()) + 1


def test_tokenizer_batch_digits_and_fallback(tokenizer):
  assert tokenizer.encode_batch(list(MULTILINGUAL)) == [tokenizer.encode(t) for t in MULTILINGUAL]
  assert len(tokenizer.encode('1234567890')) == 10  # split_digits
  # Characters outside the training text become their UTF-8 bytes.
  assert len(tokenizer.encode('😀')) == 4
  token_bytes = tokenizer.token_bytes()
  assert token_bytes.dtype == np.int32 and token_bytes.shape == (1024,)
  assert token_bytes[[0, 1, 2, 3]].tolist() == [0, 0, 0, 0]


def test_train_sentencepiece_is_deterministic_and_atomic(docs_by_lang, tokenizer, tmp_path):
  sample = [doc for docs in docs_by_lang.values() for doc in docs[:2]]
  path = tmp_path / 'again.model'
  tokenizer_lib.train_sentencepiece(sample, str(path), vocab_size=1024)
  with open(tokenizer.path, 'rb') as f:
    assert path.read_bytes() == f.read()
  # A failed training leaves the existing model untouched and no temp files.
  before = path.read_bytes()
  with pytest.raises(ValueError, match='model.vocab_size=100000'):
    tokenizer_lib.train_sentencepiece(sample[:2], str(path), vocab_size=100_000)
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == ['again.model']


def test_tokenizer_from_file_errors(tmp_path):
  missing = tmp_path / 'missing.model'
  with pytest.raises(DataError, match=re.escape(str(missing))):
    tokenizer_lib.load_tokenizer(str(missing))
  garbage = tmp_path / 'garbage.model'
  garbage.write_bytes(b'\x00garbage')
  with pytest.raises(ValueError, match=re.escape(str(garbage))):
    tokenizer_lib.load_tokenizer(str(garbage))


# --- packing -----------------------------------------------------------------


def _segments(segment_ids):
  """(start, end) of each nonzero run of equal ids in a row."""
  bounds = np.flatnonzero(np.diff(segment_ids)) + 1
  starts = np.concatenate([[0], bounds])
  ends = np.concatenate([bounds, [len(segment_ids)]])
  return [(s, e) for s, e in zip(starts, ends) if segment_ids[s] != 0]


def _check_rows(inputs, targets, segment_ids, positions):
  for row in range(inputs.shape[0]):
    for start, end in _segments(segment_ids[row]):
      np.testing.assert_array_equal(positions[row, start:end], np.arange(end - start))
      np.testing.assert_array_equal(targets[row, start : end - 1], inputs[row, start + 1 : end])


def _streams(tokenizer, docs):
  tokens = [[tokenizer.bos_id, *tokenizer.encode(d), tokenizer.eos_id] for d in docs]
  inputs = np.concatenate([t[:-1] for t in tokens])
  targets = np.concatenate([t[1:] for t in tokens])
  return inputs, targets


def test_eval_batches_pack_documents_exactly(docs_by_lang, tokenizer):
  docs = docs_by_lang['ell_Grek'][:3] + docs_by_lang['bul_Cyrl'][:2]
  batches = pipeline.make_eval_batches(docs, tokenizer, seq_len=64, batch_size=3, max_batches=0)
  stacked = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  for batch in batches:
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        k: ((3, 64), np.int32) for k in pipeline.FEATURES + ('target_bytes',)
    }
  _check_rows(*(stacked[k] for k in pipeline.FEATURES))
  real = stacked['segment_ids'] != 0
  inputs_stream, targets_stream = _streams(tokenizer, docs)
  np.testing.assert_array_equal(stacked['inputs'][real], inputs_stream)
  np.testing.assert_array_equal(stacked['targets'][real], targets_stream)
  # Padding: only at the end, with pad ids and no bytes.
  assert real.sum() == len(inputs_stream) > real.size - 3 * 64
  assert not real.reshape(-1)[len(inputs_stream) :].any()
  assert (stacked['inputs'][~real] == tokenizer.pad_id).all()
  assert (stacked['targets'][~real] == tokenizer.pad_id).all()
  np.testing.assert_array_equal(
      stacked['target_bytes'],
      np.where(real, tokenizer.token_bytes()[stacked['targets']], 0),
  )
  # Bytes of all targets = the documents' UTF-8 bytes (bos/eos add none).
  doc_bytes = sum(len(d.encode('utf-8')) for d in docs)
  assert stacked['target_bytes'].sum() == doc_bytes


def test_eval_batches_limit_and_process_split(docs_by_lang, tokenizer):
  docs = docs_by_lang['deu_Latn'][:4]
  whole = pipeline.make_eval_batches(docs, tokenizer, seq_len=32, batch_size=4, max_batches=0)
  assert len(whole) > 3
  limited = pipeline.make_eval_batches(docs, tokenizer, seq_len=32, batch_size=4, max_batches=2)
  assert len(limited) == 2
  for a, b in zip(limited, whole):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  # Two processes: equal counts, and interleaved rows are the one-process rows.
  rows = np.concatenate([b['inputs'] for b in whole])
  per_process = [
      pipeline.make_eval_batches(
          docs,
          tokenizer,
          seq_len=32,
          batch_size=2,
          max_batches=0,
          process_index=p,
          process_count=2,
      )
      for p in range(2)
  ]
  assert len(per_process[0]) == len(per_process[1]) == len(whole)
  interleaved = np.stack(
      [np.concatenate([b['inputs'] for b in batches]) for batches in per_process],
      axis=1,
  ).reshape(-1, 32)
  np.testing.assert_array_equal(interleaved, rows)


def _base_config():
  spec = importlib.util.spec_from_file_location(
      'base_config', os.path.join(_REPO, 'configs', 'base.py')
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.model.vocab_size = 1024
  config.data.languages = 'de,el,bg,en'
  config.train.seq_len = 64
  config.train.global_batch_size = 4
  config.train.eval_batches = 2
  return config


def test_make_data_trains_then_reuses_tokenizer(tmp_path, capsys):
  config = _base_config()
  result = dataset.make_data(config, str(tmp_path), process_index=1, process_count=2)
  assert 'tokenizer' in capsys.readouterr().out
  model_path = tmp_path / 'tokenizer.model'
  assert result.tokenizer.path == str(model_path)
  assert result.tokenizer.vocab_size == 1024
  assert result.languages == ['bul_Cyrl', 'deu_Latn', 'ell_Grek', 'eng_Latn']
  assert list(result.valid) == result.languages
  for batches in result.valid.values():
    assert 1 <= len(batches) <= 2
    assert all(b['inputs'].shape == (2, 64) for b in batches)
  batch = next(iter(result.train))
  assert all(batch[k].shape == (2, 64) for k in pipeline.FEATURES)
  # The default chat template's markers are single ids, so the model fine-tunes with it.
  assert chat.missing_tokens(result.tokenizer) == []
  assert chat.chat_template_for(result.tokenizer) == chat.DEFAULT_TEMPLATE
  assert [result.tokenizer.encode(t) for t in chat.DEFAULT_TEMPLATE_TOKENS] == [[4], [5]]

  model_bytes = model_path.read_bytes()
  again = dataset.make_data(config, str(tmp_path))
  assert capsys.readouterr().out == ''
  assert model_path.read_bytes() == model_bytes
  assert again.tokenizer.encode('Καλημέρα') == result.tokenizer.encode('Καλημέρα')

  config.model.vocab_size = 1024 + 64  # padded: more embedding rows than pieces is valid
  padded = dataset.make_data(config, str(tmp_path))
  assert padded.tokenizer.vocab_size == 1024
  assert int(next(iter(padded.train))['targets'].max()) < 1024
  config.model.vocab_size = 512  # fewer rows than pieces is not
  with pytest.raises(ValueError, match=rf'{re.escape(str(model_path))}.*1024.*512'):
    dataset.make_data(config, str(tmp_path))


def test_make_data_rejects_unknown_corpus(tmp_path):
  config = _base_config()
  config.data.corpus = 'web'
  with pytest.raises(ValueError, match='data.corpus'):
    dataset.make_data(config, str(tmp_path))


def test_balanced_texts_caps_each_language():
  texts = tokenizer_lib.balanced_texts({'b': ['xxxx', 'yyyy'], 'a': ['12345678'], 'c': ['z']}, 6)
  assert texts == ['123456', 'xxxx', 'yy', 'z']


@pytest.mark.parametrize(
    'mixture_name,check',
    [
        (
            'natural',
            lambda w, n: w == pytest.approx({k: v / sum(n.values()) for k, v in n.items()}),
        ),
        (
            'temperature',
            lambda w, n: (
                w['deu_Latn'] / w['eng_Latn']
                == pytest.approx((n['deu_Latn'] / n['eng_Latn']) ** (1 / 3))
            ),
        ),
        ('unimax', lambda w, n: w == pytest.approx({k: 0.25 for k in n})),  # budget fits: uniform
    ],
)
def test_mixture_from_config(mixture_name, check):
  config = _base_config()
  config.data.mixture = mixture_name
  counts = {'bul_Cyrl': 900, 'deu_Latn': 1000, 'ell_Grek': 1100, 'eng_Latn': 4000}
  config.train.steps, config.train.global_batch_size, config.train.seq_len = 10, 4, 20
  schedule = dataset.mixture_schedule(config, counts)
  assert check(schedule.weights_at(0), counts)


def test_staged_explicit_mixture_from_config():
  config = _base_config()
  config.data.mixture = 'explicit'
  config.data.mixture_weights = '0:de=3,en=1;100:de=0,en=1'
  schedule = dataset.mixture_schedule(config, {'deu_Latn': 10, 'eng_Latn': 10})
  assert schedule.weights_at(99) == {'deu_Latn': 0.75, 'eng_Latn': 0.25}
  assert schedule.weights_at(100) == {'deu_Latn': 0.0, 'eng_Latn': 1.0}
  config.data.mixture_weights = 'deu_Latn=1,gle_Latn=1'
  with pytest.raises(ValueError, match='data.mixture_weights.*gle_Latn'):
    dataset.mixture_schedule(config, {'deu_Latn': 10, 'eng_Latn': 10})


def test_group_mixture_from_config():
  config = _base_config()
  config.data.mixture = 'groups'
  config.data.mixture_groups = 'eng_Latn=0.5;*=0.5'
  config.data.mixture_min_share = 0.1
  counts = {'bul_Cyrl': 100, 'deu_Latn': 800, 'eng_Latn': 4000}
  weights = dataset.mixture_schedule(config, counts).weights_at(0)
  # eng 0.5; rest 0.5 split 1:8 -> bul 0.0556 is floored to 0.1, paid by the others
  # in proportion: deu 0.4444 * 0.9/0.9444, eng 0.5 * 0.9/0.9444.
  assert weights['bul_Cyrl'] == pytest.approx(0.1)
  assert weights['eng_Latn'] == pytest.approx(0.5 * 0.9 / (0.5 + 4 / 9))
  assert weights['deu_Latn'] == pytest.approx(4 / 9 * 0.9 / (0.5 + 4 / 9))
  config.data.mixture_groups = 'eng_Latn:0.5'
  with pytest.raises(ValueError, match="data.mixture_groups: 'eng_Latn:0.5' is not"):
    dataset.mixture_schedule(config, counts)


def test_process_shards_are_disjoint_and_make_up_the_global_batch(tmp_path):
  config = _base_config()  # global batch of 4 rows
  whole = iter(dataset.make_data(config, str(tmp_path)).train)
  halves = [
      iter(dataset.make_data(config, str(tmp_path), process_index=p, process_count=2).train)
      for p in range(2)
  ]
  for _ in range(3):
    batch, first, second = next(whole), next(halves[0]), next(halves[1])
    assert first['inputs'].shape == second['inputs'].shape == (2, 64)
    for k in pipeline.FEATURES:  # process 0 holds the first rows of the global batch
      np.testing.assert_array_equal(np.concatenate([first[k], second[k]]), batch[k])
    assert not {r.tobytes() for r in first['inputs']} & {r.tobytes() for r in second['inputs']}
