"""Transparency from a run's own records: provenance in the manifest, records in each
checkpoint, and the model card and training-content summary an export writes.

One real run: data prepared by `python -m euro_lm.prepare_data` with provenance flags,
trained 2 steps in this process (8 devices), resumed to step 4, exported at both steps;
a slow test resumes it with two processes (2 devices each) instead. The numbers are checked
against the manifest, metrics.jsonl and an uninterrupted one-process iterator; the card's
metadata is parsed by huggingface_hub.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from huggingface_hub import ModelCard
from test_cli_errors import assert_one_error_line, run_cases
from test_multiprocess import TwoProcesses, assert_exited_0

from configs import tiny
from euro_lm import card, provenance, records
from euro_lm.data import corpus, dataset
from euro_lm.data.prepare import shards, sources
from euro_lm.data.tokenizer import train_sentencepiece
from euro_lm.hf import export_hf, import_hf
from euro_lm.model import train_flops_per_token
from euro_lm.results import read_metrics
from euro_lm.train.loop import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LANGUAGES = ('deu_Latn', 'ell_Grek', 'fra_Latn')
U = provenance.UNKNOWN
SOURCE = {
    'source_name': 'catalogs-test',
    'url': 'https://huggingface.co/datasets/example/catalogs',
    'license': 'BSD-3-Clause',
    'content_type': 'curated',
    'category': 'crawled',
    'filtering': 'none beyond the catalogs',
}  # no description, no collection period: those stay unknown
BATCH, SEQ = 8, 32
OVERRIDES = {
    'model.vocab_size': 512,
    'model.num_layers': 1,
    'model.embed_dim': 64,
    'model.num_heads': 2,
    'model.num_kv_heads': 1,
    'model.head_dim': 32,
    'model.mlp_dim': 128,
    'train.global_batch_size': BATCH,
    'train.seq_len': SEQ,
    'train.log_every': 1,
    'train.eval_every': 0,
    'train.eval_batches': 1,
    'train.checkpoint_every': 2,
    'train.keep_checkpoints': 4,
    'data.corpus': 'prepared',
}


def config_for(prepared, steps):
  c = tiny.get_config()
  c.update_from_flattened_dict({**OVERRIDES, 'data.prepared_dir': prepared, 'train.steps': steps})
  return c


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """(prepared directory, the driver's results for the bad-flag cases)."""
  root = tmp_path_factory.mktemp('data')
  docs = corpus.load_embedded_corpus()
  with open(root / 'raw.jsonl', 'w', encoding='utf-8') as f:
    for tag in LANGUAGES:
      for doc in docs[tag]:
        f.write(json.dumps({'text': doc, 'lang': tag}, ensure_ascii=False) + '\n')
  tokenizer = str(root / 'tok.model')
  train_sentencepiece([d for t in LANGUAGES for d in docs[t]], tokenizer, vocab_size=512)
  (root / 'source.json').write_text(json.dumps({'source_name': 'x', 'licence': 'MIT'}))
  common = [f'--input={root / "raw.jsonl"}', f'--tokenizer={tokenizer}']
  common += ['--language_field=lang', '--workers=1']
  bad = [
      (['--source_name=x', '--content_type=video'], '--content_type='),
      (['--source_name=x', '--collected=2024-13'], '--collected='),
      (['--source_name=x', '--collected=2025..2024'], 'ends before it starts'),
      (['--source_name=x', '--url=ftp://example.org/x'], '--url='),
      (['--license=MIT'], '--source_name'),
      (['--source_name=x', '--category=bought'], '--category='),
      ([f'--source_file={root / "source.json"}'], 'licence: not a source field'),
      ([f'--source_file={root / "source.json"}', '--license=MIT'], 'give one or the other'),
  ]
  cases = [
      ([*common, f'--output={root / "out"}', *(f'--{k}={v}' for k, v in SOURCE.items())], None),
      *(([*common, f'--output={root / "bad"}', *args], expected) for args, expected in bad),
  ]
  results = run_cases('euro_lm.prepare_data', cases)
  assert results[0]['status'] == 0, results[0]['stderr']
  return str(root / 'out'), list(zip(cases[1:], results[1:]))


@pytest.fixture(scope='module')
def first_steps(prepared, tmp_path_factory):
  """A workdir trained to step 2 in this process (8 devices); copies of it resume."""
  workdir = str(tmp_path_factory.mktemp('first') / 'run')
  train(config_for(prepared[0], 2), workdir)
  return workdir


def resumed_copy(first_steps, workdir):
  shutil.copytree(first_steps, workdir)
  return workdir


@pytest.fixture(scope='module')
def run(prepared, first_steps, tmp_path_factory):
  """The workdir: steps 1-2, then resumed for steps 3-4."""
  workdir = resumed_copy(first_steps, str(tmp_path_factory.mktemp('run') / 'run'))
  train(config_for(prepared[0], 4), workdir)
  return workdir


@pytest.fixture(scope='module')
def exported(run, tmp_path_factory):
  """{step: export folder}; step 4's with a provider's --card_extra file."""
  root = tmp_path_factory.mktemp('hf')
  extra = root / 'extra.md'
  extra.write_text(
      '---\nlicense: apache-2.0\nsummary:\n  general_information:\n    provider:\n'
      '      name: Example Lab\n---\n## Intended uses and limitations\n\nResearch only.\n\n'
      '## Citation\n\nPlease cite us.\n'
  )
  out = {2: str(root / 'step2'), 4: str(root / 'step4')}
  export_hf(run, out[2], step=2, log=lambda *a: None)
  export_hf(run, out[4], step=4, log=lambda *a: None, card_extra=str(extra))
  return out


def test_prepare_data_keeps_the_source_in_the_manifest(prepared):
  with open(os.path.join(prepared[0], 'manifest.json')) as f:
    manifest = json.load(f)
  assert manifest['source'] == {**dict.fromkeys(provenance.FIELDS), **SOURCE}


def test_a_rerun_without_the_flags_keeps_the_source(prepared):
  tokenizer = os.path.join(os.path.dirname(prepared[0]), 'tok.model')
  raw = os.path.join(os.path.dirname(prepared[0]), 'raw.jsonl')
  manifest = shards.prepare(
      [raw], prepared[0], tokenizer, sources.TextSource(language_field='lang'), workers=1
  )
  assert manifest['source'] == {**dict.fromkeys(provenance.FIELDS), **SOURCE}


def test_bad_provenance_is_one_error_line_naming_the_flag_or_file(prepared):
  cases = [case for case, _ in prepared[1]]
  assert_one_error_line('euro_lm.prepare_data', cases, [result for _, result in prepared[1]])


def reference_tokens(prepared, steps):
  """Tokens per language that one uninterrupted process draws in `steps` steps."""
  iterator = dataset.make_data(config_for(prepared, steps), '/nonexistent-unused').train
  for _ in range(steps):
    next(iterator)
  return iterator.tokens_by_language()


def test_tokens_flops_and_time_are_exact_across_a_resume(prepared, run):
  at_2, at_4 = records.report(run, 2), records.report(run, 4)
  metrics = {r['step']: r for r in read_metrics(run) if 'loss' in r}
  for at, step in ((at_2, 2), (at_4, 4)):  # one process: its metrics count every row
    assert {t: e['tokens'] for t, e in at['languages'].items()} == {
        t: metrics[step][f'tokens/{t}'] for t in LANGUAGES
    }
  assert {t: e['tokens'] for t, e in at_4['languages'].items()} == reference_tokens(prepared[0], 4)
  assert sum(e['tokens'] for e in at_4['languages'].values()) == 4 * BATCH * SEQ
  with open(os.path.join(prepared[0], 'manifest.json')) as f:
    manifest = json.load(f)
  for tag, e in at_4['languages'].items():
    documents = manifest['languages'][tag]['documents']  # every 10th held out
    assert e['training_documents'] == documents - len(range(0, documents, 10))
    assert e['epochs'] == e['documents'] / e['training_documents']
    assert e['source'] == 'catalogs-test'
  tr = at_4['training']
  assert tr['tokens'] == 4 * BATCH * SEQ and at_2['training']['tokens'] == 2 * BATCH * SEQ
  config = config_for(prepared[0], 4)
  assert tr['flops'] == train_flops_per_token(config.model, SEQ) * 4 * BATCH * SEQ
  segments = [(s['from_step'], s['to_step'], s['devices'], s['processes']) for s in tr['segments']]
  assert segments == [(0, 2, 8, 1), (2, 4, 8, 1)]
  assert tr['device_hours'] == pytest.approx(
      sum(s['seconds'] * s['devices'] for s in tr['segments']) / 3600
  )
  assert at_2['training']['segments'] == tr['segments'][:1]  # step 2 reports step 2
  assert at_4['sources']['catalogs-test']['tokens_trained'] == 4 * BATCH * SEQ


@pytest.mark.slow  # two more processes; the one-process resume above covers the same code
def test_two_processes_resuming_a_run_add_their_tokens_and_devices(prepared, first_steps, tmp_path):
  workdir = resumed_copy(first_steps, str(tmp_path / 'run'))
  flags = {**OVERRIDES, 'data.prepared_dir': prepared[0], 'train.steps': 4, 'mesh.dcn_data': 2}
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  with TwoProcesses(workdir, flags, env) as processes:
    assert_exited_0(processes.finish())
  at_4 = records.report(workdir, 4)
  assert {t: e['tokens'] for t, e in at_4['languages'].items()} == reference_tokens(prepared[0], 4)
  segments = at_4['training']['segments']
  assert [(s['from_step'], s['to_step'], s['devices'], s['processes']) for s in segments] == [
      (0, 2, 8, 1),
      (2, 4, 4, 2),
  ]
  assert at_4['training']['tokens'] == 4 * BATCH * SEQ


def _card(folder):
  return ModelCard.load(os.path.join(folder, card.README))


def test_the_card_metadata_parses_and_holds_only_what_is_known(run, exported):
  data = _card(exported[2]).data
  assert data.language == ['de', 'el', 'fr']
  assert data.pipeline_tag == 'text-generation' and data.library_name == 'transformers'
  assert data.datasets == ['example/catalogs']  # the source's URL names a hub dataset
  assert data.license is None and data.base_model is None  # nobody said them
  evaluation = next(r for r in read_metrics(run) if r['step'] == 2 and 'valid/loss' in r)
  scores = {r.metric_name: r.metric_value for r in data.eval_results}
  assert scores == {k: v for k, v in evaluation.items() if k.startswith('valid/')}
  text = open(os.path.join(exported[2], card.README), encoding='utf-8').read()
  assert f'- Licence: {U}' in text and f'## Intended uses and limitations\n\n{U}' in text
  assert f'- Tokens: {2 * BATCH * SEQ:,}' in text


def test_the_summary_follows_the_template_with_the_records_numbers(prepared, exported):
  with open(os.path.join(exported[2], card.SUMMARY_JSON)) as f:
    summary = json.load(f)
  with open(os.path.join(prepared[0], 'manifest.json')) as f:
    manifest = json.load(f)
  assert list(summary) == [
      'template',
      'generated_from',
      'general_information',
      'data_sources',
      'data_processing',
  ]
  general = summary['general_information']
  assert general['training_data_size'] == {
      'tokens_trained': 2 * BATCH * SEQ,
      'band': 'Less than 1 billion tokens',
  }
  assert general['languages'] == list(LANGUAGES) and general['types_of_content'] == ['curated']
  assert general['provider'] == {'name': U, 'contact': U}
  assert general['latest_collection_date'] == U  # no collection period was given
  assert general['model']['base_model'] is None  # trained from scratch
  (source,) = summary['data_sources']['crawled']
  assert not any(v for k, v in summary['data_sources'].items() if k != 'crawled')
  assert source['description'] == U and source['collected'] == U
  assert source['license'] == 'BSD-3-Clause' and source['tokens_trained'] == 2 * BATCH * SEQ
  assert source['size'] == {
      t: {k: e[k] for k in ('documents', 'tokens', 'bytes')}
      for t, e in manifest['languages'].items()
  }
  processing = summary['data_processing']
  assert processing['tdm_rights_reservations'] == U
  assert processing['illegal_content_removal'] == U
  assert processing['other']['training']['steps'] == 2
  markdown = open(os.path.join(exported[2], card.SUMMARY_MD), encoding='utf-8').read()
  for heading in (
      '## 1. General information',
      '## 2. List of data sources',
      '### Data crawled and scraped from online sources',
      '## 3. Data processing aspects',
  ):
    assert heading in markdown


def test_languages_not_drawn_from_yet_are_sized_but_not_listed_as_trained(run, tmp_path):
  """A language of the mixture no row has drawn from by the exported step (early in a run,
  or at a small weight) is in the source's size with 0 tokens trained, and not among the
  languages the card and the summary say the model was trained on."""
  report = records.report(run, 4)
  report['languages'][LANGUAGES[0]].update(tokens=0, documents=0, epochs=0.0)
  summary = card.write_card(str(tmp_path), report)
  assert summary['general_information']['languages'] == list(LANGUAGES[1:])
  metadata = provenance.card_metadata(str(tmp_path / card.README))
  assert metadata['language'] == sorted(records.language_code(t) for t in LANGUAGES[1:])
  text = (tmp_path / card.README).read_text(encoding='utf-8')
  assert f'| {LANGUAGES[0]} | 0 | 0 | 0.000 | catalogs-test |' in text


def test_the_card_of_a_chat_model_names_its_template_and_variables(run, tmp_path):
  """A model fine-tuned on conversations: the card says where its template is and the
  template variables it was trained with (which no HF file carries); other cards do not."""
  report = records.report(run, 4)
  texts = {}
  for name, chat in (('plain', None), ('chat', {}), ('thinking', {'enable_thinking': False})):
    (tmp_path / name).mkdir()
    card.write_card(str(tmp_path / name), report, chat_variables=chat)
    texts[name] = (tmp_path / name / card.README).read_text(encoding='utf-8')
  assert '- Chat:' not in texts['plain']
  assert '- Chat: fine-tuned on conversations in the chat template of `chat_template.jinja`' in (
      texts['chat']
  )
  assert 'template variables' not in texts['chat']
  assert 'template variables `{"enable_thinking": false}`' in texts['thinking']


def test_card_extra_merges_the_providers_text(exported):
  model_card = _card(exported[4])
  assert model_card.data.license == 'apache-2.0'
  assert '## Intended uses and limitations\n\nResearch only.' in model_card.text
  assert '## Citation\n\nPlease cite us.' in model_card.text
  assert '- Licence: apache-2.0' in model_card.text
  with open(os.path.join(exported[4], card.SUMMARY_JSON)) as f:
    summary = json.load(f)
  assert summary['general_information']['provider'] == {'name': 'Example Lab', 'contact': U}
  assert summary['general_information']['training_data_size']['tokens_trained'] == 4 * BATCH * SEQ


def test_report_command_names_a_missing_checkpoint_in_one_line(tmp_path):
  cases = [([f'--workdir={tmp_path}'], f'no checkpoint in {tmp_path}')]
  assert_one_error_line('euro_lm.report', cases, run_cases('euro_lm.report', cases))


def test_report_command_prints_the_records_of_a_step(run):
  result = subprocess.run(
      [sys.executable, '-m', 'euro_lm.report', f'--workdir={run}', '--step=2', '--json'],
      capture_output=True,
      text=True,
      cwd=REPO,
      timeout=300,
  )
  assert result.returncode == 0, result.stderr
  assert json.loads(result.stdout) == json.loads(json.dumps(records.report(run, 2)))
  text = records.format_report(records.report(run, 2))
  assert f'trained: 2 steps, {2 * BATCH * SEQ:,} tokens' in text


def _declared_positions(hf_dir):
  with open(os.path.join(hf_dir, 'config.json'), encoding='utf-8') as f:
    return json.load(f)['max_position_embeddings']


def _stop_ids(hf_dir):
  with open(os.path.join(hf_dir, 'generation_config.json'), encoding='utf-8') as f:
    ids = json.load(f)['eos_token_id']
  return ids if isinstance(ids, list) else [ids]


def test_an_imported_model_keeps_its_name_and_licence(exported, tmp_path):
  # step4's export has a card whose metadata says apache-2.0 (from --card_extra).
  workdir = str(tmp_path / 'imported')
  import_hf(exported[4], workdir, log=lambda *a: None)
  base = records.base_model_of(workdir)  # what a run with train.init_from=workdir keeps
  assert base == {
      'name': 'step4',
      'license': 'apache-2.0',
      'path': exported[4],
      'max_position_embeddings': _declared_positions(exported[4]),
      'eos_token_id': _stop_ids(exported[4]),
  }
  assert records.base_model_of(os.path.join(workdir, 'checkpoints', '0')) == base
  export_hf(workdir, str(tmp_path / 'again'), log=lambda *a: None)
  again = _card(str(tmp_path / 'again'))
  assert 'imported into euro_lm and not trained further' in again.text
  assert 'Base model: step4 (its licence: apache-2.0)' in again.text
  assert again.data.base_model is None  # a folder's name is not a hub id
  assert again.data.license is None  # the base model's licence is not the provider's choice
  # A hub id in the config's _name_or_path goes into the metadata; no README: no licence.
  hf_dir = tmp_path / 'Llama-Base'
  hf_dir.mkdir()
  hf = {'_name_or_path': 'example/llama-base'}
  assert provenance.base_model_record(str(hf_dir), hf) == {
      'name': 'example/llama-base',
      'license': None,
      'path': str(hf_dir),
      'max_position_embeddings': None,
      'eos_token_id': [],
  }
  report = records.report(workdir) | {'base_model': provenance.base_model_record(str(hf_dir), hf)}
  card.write_card(str(tmp_path), report)
  assert _card(str(tmp_path)).data.base_model == 'example/llama-base'


def test_conversations_and_replay_are_sources_of_their_own(prepared, tmp_path):
  described = tmp_path / 'chats.source.json'
  described.write_text(json.dumps({'source_name': 'clinic-chats', 'content_type': 'conversations'}))
  c = config_for(prepared[0], 4)
  c.data.update(chat_files=str(tmp_path / '*.jsonl'), replay_fraction=0.1)
  sources, by_tag = records.run_sources(c)
  assert set(sources) == {'conversations:' + c.data.chat_files, 'catalogs-test'}
  assert sources['catalogs-test']['size'] is not None  # the manifest's counts
  c.data.chat_source = str(described)
  sources, by_tag = records.run_sources(c)
  assert sources['clinic-chats']['license'] is None  # not said, not guessed
  assert by_tag == {'': 'clinic-chats', 'replay-': 'catalogs-test'}


def test_the_embedded_corpus_describes_itself():
  import django

  record = corpus.embedded_source()
  assert record == provenance.source_record(record)  # valid as given
  assert record['license'] == 'BSD-3-Clause' and django.__version__ in record['source_name']
  assert record['collected'] is None  # Django does not say when its catalogs were written


def test_a_card_extra_with_bad_metadata_is_refused(tmp_path):
  bad = tmp_path / 'extra.md'
  bad.write_text('---\n- a list\n---\ntext\n')
  with pytest.raises(Exception, match='not a YAML mapping'):
    card.read_extra(str(bad))
  assert yaml.safe_load('- a list') == ['a list']
