"""Conversations prepared like pretraining data (`prepare_data --chat`) and trained on from
`data.chat_files`: the shards hold exactly the ids and masks the streaming path builds from
the raw files, a run sees the same batches from either and resumes exactly, a directory of
another tokenizer or template is refused, and named sources are drawn at their weights."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from configs import sft
from euro_lm import card, provenance, records
from euro_lm.config import validate
from euro_lm.data import chat, conversations, dataset, prepared
from euro_lm.data.prepare import shards, sources
from euro_lm.data.tokenizer import load_tokenizer
from euro_lm.errors import ConfigError, DataError
from tests.chat_templates import LLAMA3
from tests.hf_tokenizers import make_tokenizer_folder
from tests.test_cli_errors import assert_one_error_line, run_cases

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LEN = 160
QUESTIONS = {
    'de': 'Wann hat die Praxis am Tag {} offen?',
    'fr': 'Le cabinet est-il ouvert le jour {} ?',
}
ANSWERS = {'de': 'Von acht bis zwölf.', 'fr': 'De huit heures à midi.'}
FAQ_SOURCE = provenance.source_record(
    {'source_name': 'clinic-faq', 'content_type': 'conversations', 'license': 'CC-BY-4.0'}
)


def _write_conversations(path, count, seed, bad=False):
  """`count` conversations, de and fr; with `bad`, bad records at lines 3, 5 and 7 and one
  too long for a row of SEQ_LEN at line 9."""
  lines = []
  for i in range(count):
    lang = 'de' if (i + seed) % 3 else 'fr'
    messages = [
        {'role': 'user', 'content': QUESTIONS[lang].format(seed * 100 + i)},
        {'role': 'assistant', 'content': ANSWERS[lang]},
    ]
    if i % 4 == 1:  # a second turn
      messages += [
          {'role': 'user', 'content': str(i)},
          {'role': 'assistant', 'content': ANSWERS[lang][::-1]},
      ]
    lines.append(json.dumps({'messages': messages, 'lang': lang}, ensure_ascii=False))
  if bad:
    lines[2] = '{"messages": ['
    lines[4] = json.dumps({'messages': [{'role': 'function', 'content': 'x'}], 'lang': 'de'})
    lines[6] = json.dumps({'messages': [{'role': 'user', 'content': 'Hallo'}], 'lang': 'de'})
    long = [{'role': 'user', 'content': 'Wort ' * 150}, {'role': 'assistant', 'content': 'Ja.'}]
    lines[8] = json.dumps({'messages': long, 'lang': 'de'})
  path.write_text('\n'.join(lines) + '\n', encoding='utf-8')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  """A Llama 3-shaped tokenizer folder with its template; two sources of conversation
  files (`clinic`, with bad records, and `faq`), each also prepared."""
  root = tmp_path_factory.mktemp('chat_data')
  make_tokenizer_folder('llama3', root / 'tokenizer')
  (root / 'tokenizer' / 'chat_template.jinja').write_text(LLAMA3)
  (root / 'clinic').mkdir()
  _write_conversations(root / 'clinic' / 'a.jsonl', 40, 0, bad=True)
  _write_conversations(root / 'clinic' / 'b.jsonl', 30, 1)
  (root / 'faq').mkdir()
  _write_conversations(root / 'faq' / 'faq.jsonl', 30, 2)
  source = conversations.ConversationSource(language_field='lang')
  manifests = {}
  for name in ('clinic', 'faq'):
    manifests[name] = shards.prepare(
        [str(root / name / '*.jsonl')],
        str(root / f'prepared_{name}'),
        str(root / 'tokenizer'),
        source,
        docs_per_shard=7,
        workers=2,  # clinic's two files in two processes
        source_record=FAQ_SOURCE if name == 'faq' else None,
    )
  return root, manifests


def _config(root, chat_files, **overrides):
  config = sft.get_config()
  tokenizer = load_tokenizer(str(root / 'tokenizer'))
  config.update_from_flattened_dict(
      {
          'train.model_from_init': False,
          'data.tokenizer_path': str(root / 'tokenizer'),
          'model.vocab_size': tokenizer.vocab_size,
          'data.chat_files': chat_files,
          'data.chat_language_field': 'lang',
          'data.valid_fraction': 0.1,
          'train.seq_len': SEQ_LEN,
          'train.global_batch_size': 8,
          'train.eval_batches': 1,
          **overrides,
      }
  )
  return config


def _examples(root, name):
  """The streaming path's examples of a source's files, by language, in file order."""
  tokenizer = load_tokenizer(str(root / 'tokenizer'))
  examples, _, _ = conversations.read_examples(
      conversations.ConversationSource(language_field='lang'),
      sorted(str(p) for p in (root / name).glob('*.jsonl')),
      tokenizer,
      LLAMA3,
  )
  by_language = {}
  for example in examples:
    by_language.setdefault(example.language, []).append(example)
  return by_language


def test_prepared_shards_hold_the_streaming_examples(data):
  root, manifests = data
  manifest = manifests['clinic']
  expected = _examples(root, 'clinic')
  assert manifest['kind'] == prepared.CONVERSATIONS
  assert manifest['chat_template'] == LLAMA3
  assert manifest['tokenizer']['sha256'] == load_tokenizer(str(root / 'tokenizer')).fingerprint
  assert sorted(manifest['languages']) == sorted(expected) == ['deu_Latn', 'fra_Latn']
  for tag, examples in expected.items():
    documents = prepared.document_source(str(root / 'prepared_clinic'), tag)
    assert len(documents) == len(examples)
    for (ids, mask), example in zip(documents, examples):
      np.testing.assert_array_equal(ids, example.ids)
      np.testing.assert_array_equal(mask, example.loss_mask)
      assert ids.dtype == mask.dtype == np.int32
    with pytest.raises(DataError, match='holds conversations, not text documents'):
      next(prepared.iter_tokens(str(root / 'prepared_clinic'), tag))
    entry = manifest['languages'][tag]
    assert entry['documents'] == len(examples)
    assert entry['tokens'] == sum(len(e.ids) for e in examples)
    assert entry['assistant_tokens'] == sum(int(e.loss_mask.sum()) for e in examples)
    assert entry['longest'] == max(len(e.ids) for e in examples)
    assert all(1 <= shard['documents'] <= 7 for shard in entry['shards'])
    assert sum(shard['documents'] for shard in entry['shards']) == entry['documents']
  a, b = (str(root / 'clinic' / name) for name in ('a.jsonl', 'b.jsonl'))
  assert {
      kind: (bad['count'], bad['first'])
      for kind, bad in manifest['inputs'][a]['bad_records']['kinds'].items()
  } == {'invalid_json': (1, 3), 'unsupported_role': (1, 5), 'no_assistant': (1, 7)}
  assert not manifest['inputs'][b]['bad_records']['kinds']
  assert manifest['inputs'][a]['documents'] == 37 and manifest['inputs'][b]['documents'] == 30
  assert manifest['inputs'][a]['tokens'] + manifest['inputs'][b]['tokens'] == sum(
      entry['tokens'] for entry in manifest['languages'].values()
  )


def test_prepare_data_chat_command(data, tmp_path):
  """The command line: the summary table, too_long with --max_length as a bad record; the
  conversation flags without --chat are one error: line."""
  root, _ = data
  base = [sys.executable, '-m', 'euro_lm.prepare_data', f'--tokenizer={root / "tokenizer"}']
  environment = {**os.environ, 'PYTHONPATH': _REPO}
  done = subprocess.run(
      base
      + [
          '--chat',
          f'--input={root / "clinic" / "a.jsonl"}',
          f'--output={tmp_path / "out"}',
          '--language_field=lang',
          f'--max_length={SEQ_LEN + 1}',
          '--workers=1',
      ],
      capture_output=True,
      text=True,
      env=environment,
      check=False,
  )
  assert done.returncode == 0, done.stderr
  assert 'conversations' in done.stdout and 'assistant tokens' in done.stdout
  assert '1 too_long (first at line 9: ' in done.stdout
  manifest = prepared.read_manifest(str(tmp_path / 'out'))
  assert manifest['settings']['max_length'] == SEQ_LEN + 1
  assert max(e['longest'] for e in manifest['languages'].values()) <= SEQ_LEN + 1
  refused = subprocess.run(
      base + ['--input=x', '--output=y', '--max_length=5'],
      capture_output=True,
      text=True,
      env=environment,
      check=False,
  )
  assert refused.returncode == 1
  assert refused.stderr.strip().splitlines() == [
      'error: --max_length is for conversations: add --chat.'
  ]


def _batches(train, count):
  return [next(train) for _ in range(count)]


def _assert_same_batches(got, want):
  for got_batch, want_batch in zip(got, want, strict=True):
    assert set(got_batch) == set(want_batch)
    for key in want_batch:
      np.testing.assert_array_equal(got_batch[key], want_batch[key])


def test_a_prepared_directory_gives_the_raw_files_batches_and_resumes_exactly(
    data, tmp_path, capsys
):
  """The same conversations from the files and from their prepared directory: the same
  streams, token counts, validation and training batches (the conversation too long for a
  row left out of both); a run restored from a saved state continues as one that went on."""
  root, _ = data
  raw = dataset.make_data(
      _config(root, str(root / 'clinic' / '*.jsonl')), str(tmp_path / 'raw'), process_index=0
  )
  out = capsys.readouterr().out
  assert f'{root / "clinic" / "a.jsonl"}:9: 1 bad record(s) of kind too_long' in out
  config = _config(root, str(root / 'prepared_clinic'))
  validate(config, 1)
  run = dataset.make_data(config, str(tmp_path / 'prepared'))
  out = capsys.readouterr().out
  assert '1 deu_Latn conversation(s) longer than train.seq_len + 1 = 161 tokens' in out
  assert run.languages == raw.languages == ['deu_Latn', 'fra_Latn']
  assert sorted(run.valid) == sorted(raw.valid)
  for tag in raw.valid:
    _assert_same_batches(run.valid[tag], raw.valid[tag])
  expected = _batches(raw.train, 5)
  _assert_same_batches(_batches(run.train, 2), expected[:2])
  assert (tmp_path / 'prepared' / dataset.CHAT_TEMPLATE_FILE).read_text() == LLAMA3
  state = run.train.get_state()
  resumed = dataset.make_data(config, str(tmp_path / 'prepared')).train
  resumed.set_state(state)
  _assert_same_batches(_batches(resumed, 3), expected[2:])
  assert resumed.tokens_by_language() == raw.train.tokens_by_language()


def test_prompt_loss_widens_the_prepared_masks(data, tmp_path):
  """data.prompt_loss=True counts every token of a prepared conversation, as of a raw one."""
  root, _ = data
  config = _config(root, str(root / 'prepared_faq'), **{'data.prompt_loss': True})
  batch = next(dataset.make_data(config, str(tmp_path)).train)
  np.testing.assert_array_equal(batch['loss_mask'], batch['segment_ids'] != 0)
  assert batch['loss_mask'].sum() > len(batch['loss_mask']) * SEQ_LEN // 2


def test_template_variables_reach_every_rendering_and_prepared_directories_keep_them(
    data, tmp_path
):
  """data.chat_template_kwargs, here Llama 3's `date_string` (fixed, so that the ids do not
  depend on the day they are rendered): raw files and a directory prepared with the same
  variables give the same batches, which carry the date; one prepared with other
  variables is refused, naming them."""
  root, _ = data
  kwargs = '{"date_string": "26 Jul 2024"}'
  variables = chat.template_variables(kwargs, '--chat_template_kwargs')
  manifest = shards.prepare(
      [str(root / 'faq' / '*.jsonl')],
      str(tmp_path / 'dated'),
      str(root / 'tokenizer'),
      conversations.ConversationSource(language_field='lang'),
      docs_per_shard=7,
      workers=1,
      template_variables=variables,
  )
  assert manifest['settings']['template_kwargs'] == variables
  dated = {'data.chat_template_kwargs': kwargs}
  raw = dataset.make_data(
      _config(root, str(root / 'faq' / '*.jsonl'), **dated), str(tmp_path / 'r')
  )
  run = dataset.make_data(_config(root, str(tmp_path / 'dated'), **dated), str(tmp_path / 'p'))
  batches = _batches(raw.train, 2)
  _assert_same_batches(_batches(run.train, 2), batches)
  decode = load_tokenizer(str(root / 'tokenizer')).decode
  assert 'Today Date: 26 Jul 2024' in decode(batches[0]['inputs'][0].tolist())
  with pytest.raises(
      ConfigError, match=r'variables {"date_string": "26 Jul 2024"} \(in .*_kwargs={}: '
  ):
    dataset.make_data(_config(root, str(tmp_path / 'dated')), str(tmp_path / 'other'))


def test_a_prepared_directory_of_another_tokenizer_or_template_is_refused(data, tmp_path):
  root, _ = data
  config = _config(root, str(root / 'prepared_faq'), **{'data.chat_template': 'default'})
  theirs = chat.template_fingerprint(LLAMA3)[:12]
  ours = chat.template_fingerprint(chat.DEFAULT_TEMPLATE)[:12]
  with pytest.raises(
      ConfigError,
      match=rf'another chat template \(sha256 {theirs}.*sha256 {ours}',
  ):
    dataset.make_data(config, str(tmp_path / 'run'))
  make_tokenizer_folder('qwen2', tmp_path / 'qwen')
  qwen = load_tokenizer(str(tmp_path / 'qwen'))
  config = _config(
      root,
      str(root / 'prepared_faq'),
      **{'data.tokenizer_path': str(tmp_path / 'qwen'), 'model.vocab_size': qwen.vocab_size},
  )
  with pytest.raises(ConfigError) as refused:
    dataset.make_data(config, str(tmp_path / 'run'))
  message = str(refused.value)
  assert str(root / 'tokenizer') in message and qwen.path in message
  assert qwen.fingerprint[:12] in message and '\n' not in message
  # The command line says each in one error: line.
  common = [
      f'--workdir={tmp_path / "cli"}',
      f'--config={_REPO}/configs/sft.py',
      '--config.train.model_from_init=False',
      f'--config.data.chat_files={root / "prepared_faq"}',
      f'--config.train.seq_len={SEQ_LEN}',
      '--config.train.global_batch_size=8',
  ]
  run_tokenizer = [
      f'--config.data.tokenizer_path={root / "tokenizer"}',
      f'--config.model.vocab_size={load_tokenizer(str(root / "tokenizer")).vocab_size}',
  ]
  cases = [
      (
          [*common, *run_tokenizer, '--config.data.chat_template=default'],
          f'{root / "prepared_faq"} was rendered with another chat template (sha256 {theirs}',
      ),
      (
          [
              *common,
              f'--config.data.tokenizer_path={tmp_path / "qwen"}',
              f'--config.model.vocab_size={qwen.vocab_size}',
          ],
          f'was prepared with the tokenizer {root / "tokenizer"}',
      ),
  ]
  results = run_cases('euro_lm.train', cases, preload=['euro_lm.train.loop'])
  assert_one_error_line('euro_lm.train', cases, results)
  assert f'sha256 {ours})' in results[0]['stderr'] and qwen.path in results[1]['stderr']
  # A directory of text is not conversations, and conversations are not a pretraining corpus.
  config = _config(root, str(root / 'prepared_faq'))
  config.data.corpus, config.data.prepared_dir = 'prepared', str(root / 'prepared_faq')
  config.data.chat_files, config.data.chat_language_field = '', ''
  with pytest.raises(ConfigError, match='holds conversations .* data.chat_files'):
    dataset.make_data(config, str(tmp_path / 'run'))
  (tmp_path / 'text.jsonl').write_text('{"text": "Hallo Welt", "lang": "de"}\n')
  shards.prepare(
      [str(tmp_path / 'text.jsonl')],
      str(tmp_path / 'text'),
      str(root / 'tokenizer'),
      sources.TextSource(language_field='lang'),
      workers=1,
  )
  with pytest.raises(ConfigError, match=r'text documents, not conversations: .* --chat'):
    dataset.make_data(_config(root, f'faq={tmp_path / "text"}'), str(tmp_path / 'run'))


@pytest.mark.parametrize('weights', ['clinic=3,faq=1', ''])
def test_named_sources_are_drawn_at_their_weights(data, tmp_path, weights):
  """Raw files and a prepared directory as two named sources: each language of each is a
  stream `<source>/<language>`, and the realised token shares of the sources match
  data.chat_source_weights (default: their tokens)."""
  root, manifests = data
  config = _config(
      root,
      f'clinic={root / "clinic" / "a.jsonl"},faq={root / "prepared_faq"},'
      f'clinic={root / "clinic" / "b.jsonl"}',
      **{'data.chat_source_weights': weights},
  )
  validate(config, 1)
  run = dataset.make_data(config, str(tmp_path))
  streams = ['clinic/deu_Latn', 'clinic/fra_Latn', 'faq/deu_Latn', 'faq/fra_Latn']
  assert run.languages == sorted(run.valid) == streams
  for _ in range(120):  # some 1,000 conversations
    next(run.train)
  tokens = run.train.tokens_by_language()
  assert sorted(tokens) == streams
  clinic = sum(n for stream, n in tokens.items() if stream.startswith('clinic/'))
  if weights:
    expected = 0.75
  else:  # natural: the sources' conversations' tokens (too long and held out ones aside)
    faq = manifests['faq']['languages']
    faq_tokens = sum(entry['tokens'] for entry in faq.values())
    clinic_tokens = sum(e['tokens'] for e in manifests['clinic']['languages'].values())
    clinic_tokens -= manifests['clinic']['languages']['deu_Latn']['longest']  # too_long
    expected = clinic_tokens / (clinic_tokens + faq_tokens)
  assert abs(clinic / sum(tokens.values()) - expected) < 0.03
  # Within a source its languages at their natural shares (data.mixture='natural').
  faq = manifests['faq']['languages']
  share = faq['deu_Latn']['tokens'] / (faq['deu_Latn']['tokens'] + faq['fra_Latn']['tokens'])
  got = tokens['faq/deu_Latn'] / (tokens['faq/deu_Latn'] + tokens['faq/fra_Latn'])
  assert abs(got - share) < 0.05


def test_a_training_run_logs_each_sources_tokens_and_checkpoints_its_data_state(data, tmp_path):
  """python -m euro_lm.train's loop on named sources: `tokens/<source>/<lang>` and
  `valid/<source>/<lang>/loss` in metrics.jsonl, and the checkpoint's data state is the
  library's after as many steps (restoring it continues exactly: see above)."""
  from euro_lm.train.loop import train  # pylint: disable=g-import-not-at-top

  root, _ = data
  chat_files = f'clinic={root / "clinic" / "*.jsonl"},faq={root / "prepared_faq"}'
  config = _config(root, chat_files, **{'data.chat_source_weights': 'clinic=3,faq=1'})
  config.model.update(num_layers=1, embed_dim=64, num_heads=2, num_kv_heads=1, mlp_dim=128)
  config.model.head_dim = 32
  config.train.update(steps=2, log_every=1, eval_every=2, checkpoint_every=2)
  workdir = str(tmp_path / 'run')
  train(config, workdir)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    logged = [json.loads(line) for line in f]
  last = [r for r in logged if 'tokens/clinic/deu_Latn' in r][-1]
  library = dataset.make_data(config, str(tmp_path / 'library')).train
  for _ in range(2):
    next(library)
  assert {k: v for k, v in last.items() if k.startswith('tokens/')} == {
      f'tokens/{stream}': n for stream, n in library.tokens_by_language().items()
  }
  assert any('valid/faq/fra_Latn/loss' in r for r in logged)
  with open(os.path.join(workdir, 'checkpoints', '2', 'data', 'process_0-of-1.json')) as f:
    assert json.load(f) == json.loads(library.get_state())

  # The records name each source by what described it (faq's prepare_data flags; clinic
  # nothing), count its tokens from the data state, and list languages, not streams.
  report = records.report(workdir)
  assert sorted(report['sources']) == ['clinic-faq', 'conversations:clinic']
  faq = report['sources']['clinic-faq']
  assert (faq['license'], faq['languages']) == ('CC-BY-4.0', ['deu_Latn', 'fra_Latn'])
  for name, prefix in (('clinic-faq', 'faq/'), ('conversations:clinic', 'clinic/')):
    assert report['sources'][name]['tokens_trained'] == sum(
        n for stream, n in library.tokens_by_language().items() if stream.startswith(prefix)
    )
  summary = card.write_card(str(tmp_path), report)
  assert sorted(e['name'] for e in summary['data_sources']['not_categorised']) == [
      'clinic-faq',
      'conversations:clinic',
  ]
  metadata = provenance.card_metadata(str(tmp_path / card.README))
  assert metadata['language'] == ['de', 'fr']


def test_one_source_with_and_without_languages_is_refused(data, tmp_path):
  """Files read without data.chat_language_field (und) and a directory prepared with
  languages are one pool only if named apart."""
  root, _ = data
  files, directory = root / 'clinic' / '*.jsonl', root / 'prepared_faq'
  config = _config(root, f'{files},{directory}', **{'data.chat_language_field': ''})
  with pytest.raises(ConfigError, match=r'data.chat_files: conversations with a language and'):
    dataset.make_data(config, str(tmp_path))
  config.data.chat_files = f'clinic={files},faq={directory}'
  run = dataset.make_data(config, str(tmp_path))
  assert run.languages == ['clinic/und', 'faq/deu_Latn', 'faq/fra_Latn']


@pytest.mark.parametrize(
    'chat_files, weights, message',
    [
        ('a/*.jsonl', 'a=1', r"data.chat_source_weights='a=1' needs named sources"),
        ('clinic=a/*.jsonl,b/*.jsonl', '', 'data.chat_files: .*name every entry'),
        ('replay-x=a/*.jsonl', '', "data.chat_files: 'replay-x' is not a source name"),
        ('clinic=a,faq=b', 'clinic=1', 'data.chat_source_weights: no weight for source.* faq'),
        ('clinic=a,faq=b', 'clinic=1,faq=1,web=2', 'data.chat_source_weights: no data for web'),
        ('clinic=a,faq=b', 'clinic=1,faq=x', "data.chat_source_weights: weight 'x'"),
        ('clinic=a,faq=b', 'clinic=0,faq=0', 'data.chat_source_weights: the weights sum to 0'),
        (
            'clinic=a,faq=b',
            '0:clinic=1,faq=1;100:clinic=1',
            'data.chat_source_weights: the stage at step 100 lacks faq',
        ),
    ],
)
def test_sources_and_their_weights_are_validated_with_the_field_named(chat_files, weights, message):
  config = sft.get_config()
  config.train.model_from_init = False
  config.data.chat_files, config.data.chat_source_weights = chat_files, weights
  with pytest.raises(ConfigError, match=message):
    validate(config, 1)


def test_a_cut_compressed_file_and_hostile_records_are_reported_not_lost(data, tmp_path):
  """Conversations are read with the text path's integrity checks: a .jsonl.zst cut short
  keeps every whole conversation before the cut and says where it stopped (a warning when
  training streams it, in the manifest when prepared, an error when strict); a number of
  5,000 digits and arrays nested 100k deep are invalid_json records, not a crash."""
  import zstandard  # pylint: disable=import-outside-toplevel

  root, _ = data
  lines = (root / 'faq' / 'faq.jsonl').read_text(encoding='utf-8').splitlines()
  lines[3] = '{"messages": ' + '9' * 5000 + '}'
  lines[5] = '[' * 100_000 + ']' * 100_000
  compress = zstandard.ZstdCompressor().compress
  head = compress(('\n'.join(lines[:10]) + '\n').encode())  # two frames, as pzstd writes
  tail = compress(('\n'.join(lines[10:]) + '\n').encode())
  cut = tmp_path / 'faq.jsonl.zst'
  cut.write_bytes(head + tail[: len(tail) // 2])
  complete_lines = 10 + zstandard.ZstdDecompressor().decompressobj().decompress(
      tail[: len(tail) // 2]
  ).count(b'\n')

  tokenizer = load_tokenizer(str(root / 'tokenizer'))
  source = conversations.ConversationSource(language_field='lang')
  examples, reports, warnings = conversations.read_examples(source, [str(cut)], tokenizer, LLAMA3)
  (report,) = reports
  assert {k: (b.count, b.first) for k, b in report.kinds.items()} == {'invalid_json': (2, 4)}
  assert len(examples) == complete_lines - 2
  assert report.truncated.position == complete_lines + 1
  assert report.truncated.reason == 'the file ends inside a zstd frame (cut short)'
  assert warnings == [report.truncation_message()]
  assert warnings[0].startswith(f'{cut}: truncated at byte ')

  manifest = shards.prepare([str(cut)], str(tmp_path / 'out'), str(root / 'tokenizer'), source)
  assert manifest['inputs'][str(cut)]['truncated']['line'] == complete_lines + 1
  assert manifest['inputs'][str(cut)]['documents'] == complete_lines - 2
  strict = conversations.ConversationSource(language_field='lang', strict=True)
  with pytest.raises(DataError, match=re.escape(f'{cut}:4: invalid JSON: Exceeds the limit')):
    conversations.read_examples(strict, [str(cut)], tokenizer, LLAMA3)
