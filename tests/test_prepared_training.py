"""Training from prepared ArrayRecord shards: the same trainer, documents read from disk."""

import json

import numpy as np
import pytest

from configs import tiny
from euro_lm.data import corpus, dataset, prepared
from euro_lm.data.prepare import shards, sources
from euro_lm.data.tokenizer import train_sentencepiece
from euro_lm.errors import ConfigError, DataError
from euro_lm.train.loop import train

LANGUAGES = ('deu_Latn', 'ell_Grek', 'pol_Latn')


@pytest.fixture(scope='module')
def prepared_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('prepared')
  docs = corpus.load_embedded_corpus()
  raw = root / 'raw.jsonl'
  with open(raw, 'w', encoding='utf-8') as f:
    for tag in LANGUAGES:
      for doc in docs[tag]:
        f.write(json.dumps({'text': doc, 'lang': tag}, ensure_ascii=False) + '\n')
  model = str(root / 'tok.model')
  train_sentencepiece([d for t in LANGUAGES for d in docs[t]], model, vocab_size=1024)
  out = str(root / 'out')
  shards.prepare([str(raw)], out, model, sources.TextSource(language_field='lang'), workers=1)
  return out


def config_for(prepared_dir, **train):
  c = tiny.get_config()
  c.model.vocab_size, c.model.num_layers = 1024, 1
  c.data.corpus, c.data.prepared_dir = 'prepared', prepared_dir
  c.train.update(steps=6, log_every=3, eval_every=0, eval_batches=1, checkpoint_every=0)
  c.train.update(train)
  return c


def test_split_holds_out_every_kth_document_of_the_shards(prepared_dir):
  result = dataset.make_data(config_for(prepared_dir), '/nonexistent-unused')
  assert result.languages == list(LANGUAGES)
  for tag in LANGUAGES:
    on_disk = [tuple(t) for t in prepared.iter_tokens(prepared_dir, tag)]
    # The first epoch of the training order is a permutation of the documents
    # not held out (every 10th, from the first).
    epoch = [result.train.document_at(tag, i) for i in range(len(on_disk) - len(on_disk[::10]))]
    assert sorted(tuple(t) for t in epoch) == sorted(t for i, t in enumerate(on_disk) if i % 10)
  batch = next(result.train)
  assert batch['inputs'].shape == (16, 128) and (batch['segment_ids'] > 0).all()
  for batches in result.valid.values():
    assert batches[0]['target_bytes'].sum() > 0


def test_trains_from_prepared_shards(prepared_dir, tmp_path):
  train(config_for(prepared_dir), str(tmp_path))
  with open(tmp_path / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  losses = [r['loss'] for r in records if 'loss' in r]
  assert len(losses) == 2 and all(np.isfinite(losses))
  assert {f'tokens/{tag}' for tag in LANGUAGES} <= set(records[0])
  evals = [r for r in records if 'valid/loss' in r]
  assert [r['step'] for r in evals] == [6]  # eval_every=0: only the final evaluation
  assert {f'valid/{tag}/bpb' for tag in LANGUAGES} <= set(evals[0])
  assert 'checkpoint/blocking_seconds' in records[-1]  # the final save, logged last


def test_a_different_tokenizer_is_refused(prepared_dir, tmp_path):
  other = str(tmp_path / 'other.model')
  train_sentencepiece(corpus.load_embedded_corpus()['deu_Latn'], other, vocab_size=1024)
  c = config_for(prepared_dir)
  c.data.tokenizer_path = other
  with pytest.raises(ConfigError, match='not the one .* was prepared with'):
    dataset.make_data(c, str(tmp_path))


def test_a_corrupt_shard_is_reported_by_name(prepared_dir, tmp_path):
  import shutil

  copy = tmp_path / 'copy'
  shutil.copytree(prepared_dir, copy)
  shard = copy / prepared.read_manifest(str(copy))['languages']['ell_Grek']['shards'][0]['path']
  shard.write_bytes(shard.read_bytes()[:100])  # truncated mid-file
  with pytest.raises(DataError, match='ell_Grek'):
    prepared.document_source(str(copy), 'ell_Grek')


def test_code_is_a_data_tag_with_its_own_mixture_share(tmp_path):
  """Non-language data (here 'code') is prepared and weighted like a language."""
  raw = tmp_path / 'mixed.jsonl'
  docs = corpus.load_embedded_corpus()['deu_Latn']
  code = [f'def f{i}(x):\n    return x * {i}\n' * 20 for i in range(30)]
  with open(raw, 'w') as f:
    for doc in docs:
      f.write(json.dumps({'text': doc, 'lang': 'de'}) + '\n')
    for doc in code:
      f.write(json.dumps({'text': doc, 'lang': 'Code'}) + '\n')
  model = str(tmp_path / 'tok.model')
  train_sentencepiece(docs + code, model, vocab_size=600)
  out = str(tmp_path / 'out')
  manifest = shards.prepare(
      [str(raw)], out, model, sources.TextSource(language_field='lang'), workers=1
  )
  assert sorted(manifest['languages']) == ['code', 'deu_Latn']
  assert manifest['languages']['code']['documents'] == 30
  c = config_for(out)
  c.model.vocab_size = 600
  c.data.mixture, c.data.mixture_groups = 'groups', 'code=0.25;*=0.75'
  result = dataset.make_data(c, str(tmp_path))
  assert dataset.mixture_schedule(c, {'code': 10, 'deu_Latn': 90}).weights_at(0) == pytest.approx(
      {'code': 0.25, 'deu_Latn': 0.75}
  )
  for _ in range(20):
    next(result.train)
  tokens = result.train.tokens_by_language()
  assert 0.15 < tokens['code'] / sum(tokens.values()) < 0.35
