"""Tests for euro_lm.data.prepare.sources (JSONL, Parquet) and
euro_lm.data.prepared.read_array_record (ArrayRecord shards)."""

import gzip
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from array_record.python import array_record_module

from euro_lm.data import languages, prepared
from euro_lm.data.prepare import sources
from euro_lm.errors import ConfigError, DataError

# U+2028 would end a line for str.splitlines; JSONL lines end at '\n' only.
RECORDS = (
    {'text': 'Guten Tag, Welt!', 'lang': 'de'},
    {'text': 'Καλημέρα κόσμε', 'lang': 'ell'},
    {'text': 'Une ligne\u2028et un séparateur', 'lang': 'fr-FR'},
    {'text': 'Добър ден', 'lang': 'bul_Cyrl', 'id': 7},
)
RECORD_TAGS = ('deu_Latn', 'ell_Grek', 'fra_Latn', 'bul_Cyrl')


def _jsonl_bytes(records) -> bytes:
  return b''.join(json.dumps(r, ensure_ascii=False).encode() + b'\n' for r in records)


def _read_all(source, path):
  documents, bad_records = source.read(str(path))
  return list(documents), bad_records


def test_jsonl_plain_gz_zst_give_identical_documents(tmp_path):
  data = _jsonl_bytes(RECORDS)
  (tmp_path / 'plain.jsonl').write_bytes(data)
  (tmp_path / 'docs.jsonl.gz').write_bytes(gzip.compress(data))
  # Two zstd frames, as parallel compressors (pzstd) write them.
  half = len(data) // 2
  compressor = zstandard.ZstdCompressor()
  (tmp_path / 'docs.jsonl.zst').write_bytes(
      compressor.compress(data[:half]) + compressor.compress(data[half:])
  )
  source = sources.TextSource(language_field='lang')

  for name in ('plain.jsonl', 'docs.jsonl.gz', 'docs.jsonl.zst'):
    path = tmp_path / name
    documents, bad_records = _read_all(source, path)
    assert documents == [
        sources.Document(r['text'], tag, f'{path}:{line}')
        for line, (r, tag) in enumerate(zip(RECORDS, RECORD_TAGS), 1)
    ], name
    assert bad_records.total == 0


def test_fixed_language_and_custom_text_field(tmp_path):
  path = tmp_path / 'docs.ndjson'
  path.write_bytes(_jsonl_bytes([{'body': 'Ahoj světe'}, {'body': 'Dobrý den'}]))
  source = sources.TextSource(text_field='body', language='cs')
  documents, _ = _read_all(source, path)
  assert [(d.text, d.language) for d in documents] == [
      ('Ahoj světe', 'ces_Latn'),
      ('Dobrý den', 'ces_Latn'),
  ]


def test_parquet_with_custom_columns_across_row_groups(tmp_path):
  texts = [f'Dokument {i}: ☃ zażółć gęślą jaźń' for i in range(8)]
  codes = ['pl', 'pol', 'pol_Latn', 'pl-PL', 'pl', 'pl', 'pl', 'pl']
  table = pa.table(
      {
          'content': texts,
          'language_code': codes,
          'url': [f'https://example.eu/{i}' for i in range(8)],
      }
  )
  path = tmp_path / 'fineweb.parquet'
  pq.write_table(table, path, row_group_size=3)
  assert pq.ParquetFile(path).num_row_groups == 3

  source = sources.TextSource(text_field='content', language_field='language_code')
  documents, bad_records = _read_all(source, path)

  assert documents == [
      sources.Document(text, 'pol_Latn', f'{path} row {i}') for i, text in enumerate(texts)
  ]
  assert bad_records.total == 0


def test_parquet_bad_rows_are_counted_by_row_index(tmp_path):
  texts = [b'ok 0', None, b'\xff\xfe', b'ok 3', b'  ', b'ok 5', b'\xc3']
  codes = ['et', 'et', 'et', 'estonian', 'et', None, 'et']
  path = tmp_path / 'hplt.parquet'
  pq.write_table(
      pa.table({'text': pa.array(texts, pa.binary()), 'lang': codes}), path, row_group_size=2
  )
  documents, bad_records = _read_all(sources.TextSource(language_field='lang'), path)

  assert documents == [sources.Document('ok 0', 'est_Latn', f'{path} row 0')]
  assert {k: (v.count, v.first) for k, v in bad_records.kinds.items()} == {
      'missing_field': (2, 1),
      'invalid_utf8': (2, 2),
      'unknown_language': (1, 3),
      'empty_text': (1, 4),
  }


def test_parquet_without_the_text_column_names_file_and_column(tmp_path):
  path = tmp_path / 'x.parquet'
  pq.write_table(pa.table({'content': ['a']}), path)
  documents, _ = sources.TextSource(language='et').read(str(path))
  with pytest.raises(DataError, match=re.escape(f"{path} has no column 'text'")):
    list(documents)


@pytest.mark.parametrize(
    'column, values, message',
    [
        ('text', [1], "column 'text' holds int64, not text."),
        ('lang', [[1]], "column 'lang' holds list<element: int64>, not language codes."),
    ],
)
def test_parquet_columns_of_the_wrong_type_name_file_and_column(tmp_path, column, values, message):
  path = tmp_path / 'x.parquet'
  pq.write_table(pa.table({'text': ['a'], 'lang': ['de'], column: values}), path)
  documents, _ = sources.TextSource(language_field='lang').read(str(path))
  with pytest.raises(DataError, match=re.escape(f'{path}: {message}')):
    list(documents)


BAD_LINES = (
    b'{"text": "Hallo", "lang": "de"}',  # 1 good
    b'{"text": "Hallo", "lang": "de"',  # 2 invalid_json
    b'{"text": "\xff\xfe", "lang": "de"}',  # 3 invalid_utf8
    b'{"text": " \\n\\t ", "lang": "de"}',  # 4 empty_text
    b'{"lang": "de"}',  # 5 missing_field
    b'{"text": "Hallo", "lang": "germn"}',  # 6 unknown_language
    b'{"text": "Tsch\xc3\xbcss", "lang": "de"}',  # 7 good
    b'{"text": "\\ud800 lone", "lang": "de"}',  # 8 invalid_utf8 (surrogate)
    b'[1, 2]',  # 9 missing_field
    b'{"text": 5, "lang": "de"}',  # 10 not_a_string
    b'',  # 11 invalid_json
    b'{"text": "Hallo", "lang": null}',  # 12 missing_field
    b'{"text": "Servus", "lang": "deu_latn "}',  # 13 good
)


def test_bad_records_are_counted_by_kind_with_first_line(tmp_path):
  path = tmp_path / 'bad.jsonl'
  path.write_bytes(b'\n'.join(BAD_LINES) + b'\n')
  documents, bad_records = _read_all(sources.TextSource(language_field='lang'), path)

  assert documents == [
      sources.Document('Hallo', 'deu_Latn', f'{path}:1'),
      sources.Document('Tschüss', 'deu_Latn', f'{path}:7'),
      sources.Document('Servus', 'deu_Latn', f'{path}:13'),
  ]
  assert {k: (v.count, v.first) for k, v in bad_records.kinds.items()} == {
      'invalid_json': (2, 2),
      'invalid_utf8': (2, 3),
      'empty_text': (1, 4),
      'missing_field': (3, 5),
      'unknown_language': (1, 6),
      'not_a_string': (1, 10),
  }
  assert bad_records.total == len(BAD_LINES) - len(documents)
  assert "Did you mean 'deu_Latn' (German)?" in (bad_records.kinds['unknown_language'].reason)
  restored = sources.BadRecords.from_json(str(path), json.loads(json.dumps(bad_records.to_json())))
  assert restored.kinds == bad_records.kinds


def test_strict_raises_at_the_first_bad_record(tmp_path):
  path = tmp_path / 'bad.jsonl'
  path.write_bytes(b'\n'.join(BAD_LINES) + b'\n')
  documents, _ = sources.TextSource(language_field='lang', strict=True).read(str(path))
  with pytest.raises(DataError) as error:
    list(documents)
  assert str(error.value).startswith(f'{path}:2: invalid JSON: ')


def test_glob_matching_nothing_names_the_glob(tmp_path):
  (tmp_path / 'a.jsonl').write_text('')
  pattern = str(tmp_path / '*.parquet')
  with pytest.raises(DataError, match=re.escape(repr(pattern))):
    sources.expand_globs([str(tmp_path / '*.jsonl'), pattern])


def test_expand_globs_sorts_and_deduplicates(tmp_path):
  for name in ('b.jsonl', 'a.jsonl', 'c.parquet'):
    (tmp_path / name).write_text('')
  assert sources.expand_globs([str(tmp_path / '*.jsonl'), str(tmp_path / 'a.*')]) == [
      str(tmp_path / 'a.jsonl'),
      str(tmp_path / 'b.jsonl'),
  ]


def test_unrecognised_file_name_asks_for_the_format(tmp_path):
  with pytest.raises(DataError, match='set the format'):
    sources.TextSource(language='de').read(str(tmp_path / 'docs.txt'))


def test_language_codes_fold_regardless_of_case_and_spaces():
  assert languages.resolve_language('deu_latn ') == 'deu_Latn'
  assert languages.resolve_language(' UK ') == 'ukr_Cyrl'


@pytest.mark.parametrize(
    'code, tag',
    [
        ('germn', 'deu_Latn'),
        ('dey_Latn', 'deu_Latn'),
        ('Ukrainain', 'ukr_Cyrl'),
        ('catt', 'cat_Latn'),
    ],
)
def test_unknown_language_suggests_the_closest_tag(code, tag):
  with pytest.raises(ValueError, match=re.escape(f'Did you mean {tag!r}')):
    languages.resolve_language(code)


def test_wrong_script_names_the_tag_without_a_guess():
  with pytest.raises(ValueError) as error:
    languages.resolve_language('de_Cyrl')
  assert str(error.value).endswith("German only as 'deu_Latn'.")


def test_unknown_fixed_language_is_a_config_error():
  with pytest.raises(ConfigError, match="language='germn'.*Did you mean 'deu_Latn'"):
    sources.TextSource(language='germn')


@pytest.mark.parametrize('language, language_field', [('', ''), ('de', 'lang')])
def test_exactly_one_language_setting(language, language_field):
  with pytest.raises(ConfigError, match='exactly one of language'):
    sources.TextSource(language=language, language_field=language_field)


def _write_shard(path, arrays):
  writer = array_record_module.ArrayRecordWriter(str(path), 'group_size:1')
  for array in arrays:
    writer.write(np.asarray(array, '<i4').tobytes())
  writer.close()


def test_array_record_round_trip(tmp_path):
  arrays = [np.arange(n, dtype=np.int32) * 7 - 3 for n in (1, 5, 0, 3000)]
  path = tmp_path / 'shard.array_record'
  _write_shard(path, arrays)
  documents = list(prepared.read_array_record(str(path), 'sl', expected_records=4))
  assert [d.language for d in documents] == ['slv_Latn'] * 4
  assert [d.location for d in documents] == [f'{path}[{i}]' for i in range(4)]
  for document, array in zip(documents, arrays):
    assert document.tokens.dtype == np.int32
    np.testing.assert_array_equal(document.tokens, array)


def _corrupt(path, how):
  data = bytearray(path.read_bytes())
  if how == 'garbage':
    return b'not an array record file' * 100
  if how == 'truncated':
    return bytes(data[: len(data) // 2])
  data[100] ^= 0xFF  # inside the first chunk's header
  return bytes(data)


@pytest.mark.parametrize('how', ['garbage', 'truncated', 'flipped'])
def test_corrupt_array_record_names_the_file(tmp_path, how):
  path = tmp_path / 'shard.array_record'
  _write_shard(path, [np.arange(100)] * 50)
  path.write_bytes(_corrupt(path, how))
  with pytest.raises(DataError, match=re.escape(str(path))):
    list(prepared.read_array_record(str(path), 'de', expected_records=50))


def test_array_record_count_or_width_mismatch_names_the_file(tmp_path):
  path = tmp_path / 'shard.array_record'
  _write_shard(path, [[1, 2], [3]])
  with pytest.raises(DataError, match=re.escape(f'{path} holds 2 records, but')):
    list(prepared.read_array_record(str(path), 'de', expected_records=3))
  writer = array_record_module.ArrayRecordWriter(str(path), 'group_size:1')
  writer.write(b'\x01\x02\x03')
  writer.close()
  with pytest.raises(DataError, match=re.escape(f'{path}[0]: 3 bytes')):
    list(prepared.read_array_record(str(path), 'de'))
