"""Supervised fine-tuning end to end: an imported Llama fine-tuned on conversations with
configs/sft.py learns a fixed per-language answer, the prompt carries no loss, and
transformers, through the chat template of the export, answers as trained."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs import sft
from euro_lm import hf
from euro_lm.config import validate
from euro_lm.data import dataset
from euro_lm.data.tokenizer import load_tokenizer
from euro_lm.errors import ConfigError
from euro_lm.inference import complete, load_run, prompt_ids
from euro_lm.train.loop import train
from tests.chat_templates import LLAMA3, assistant_turn
from tests.hf_tokenizers import make_tokenizer_folder

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

# The assistant's behaviour to learn: one answer per language of the question. No token
# repeats within an answer: the 2-layer, 64-wide model would need more steps to count.
ANSWERS = {'de': 'Ja, gerne.', 'fr': 'Avec plaisir.'}
QUESTIONS = {
    'de': 'Kannst du mir bei Aufgabe {} helfen?',
    'fr': "Peux-tu m'aider pour la tâche {} ?",
}


def _conversations(path, count):
  with open(path, 'w', encoding='utf-8') as f:
    for i in range(count):
      lang = 'de' if i % 2 else 'fr'
      messages = [
          {'role': 'user', 'content': QUESTIONS[lang].format(i)},
          {'role': 'assistant', 'content': ANSWERS[lang]},
      ]
      f.write(json.dumps({'messages': messages, 'lang': lang}) + '\n')


def _sft_config(tmp_path, **overrides):
  config = sft.get_config()
  config.update_from_flattened_dict(
      {
          'train.init_from': str(tmp_path / 'imported'),
          'data.chat_files': str(tmp_path / 'chats' / '*.jsonl'),
          'data.chat_language_field': 'lang',
          'data.valid_fraction': 0.1,
          'train.steps': 80,
          'train.global_batch_size': 8,
          'train.seq_len': 128,
          'train.eval_every': 80,
          'train.eval_batches': 1,
          'train.checkpoint_every': 80,
          'train.log_every': 10,
          'optimizer.learning_rate': 1e-2,
          'optimizer.warmup_steps': 5,
          **overrides,
      }
  )
  return config


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  """A random HF Llama with a Llama 3-shaped tokenizer and Llama 3's chat template,
  imported; and the conversations."""
  from tests.test_hf import HF_SHAPES, random_hf_model  # pylint: disable=g-import-not-at-top

  tmp_path = tmp_path_factory.mktemp('sft')
  tokenizer_dir = tmp_path / 'tokenizer'
  make_tokenizer_folder('llama3', tokenizer_dir)
  (tokenizer_dir / 'chat_template.jinja').write_text(LLAMA3)
  vocab_size = load_tokenizer(str(tokenizer_dir)).vocab_size
  hf_dir = tmp_path / 'hf'
  shape = {**HF_SHAPES['gqa_untied'], 'vocab_size': vocab_size, 'max_position_embeddings': 256}
  random_hf_model(shape).save_pretrained(hf_dir)
  for file in tokenizer_dir.iterdir():
    shutil.copy(file, hf_dir)
  hf.import_hf(str(hf_dir), str(tmp_path / 'imported'), log=lambda *_: None)
  (tmp_path / 'chats').mkdir()
  _conversations(tmp_path / 'chats' / 'train.jsonl', 120)
  return tmp_path


def test_the_prompt_carries_no_loss_and_packing_keeps_each_turns_mask(imported, tmp_path):
  """Rows hold whole conversations only (the rest is padding), and each counts exactly its
  assistant turn (the answer and <|eot_id|>, as the template writes it) in the loss."""
  from euro_lm.checkpoint import init_model_config  # pylint: disable=g-import-not-at-top
  from euro_lm.config import model_from  # pylint: disable=g-import-not-at-top

  config = _sft_config(
      imported, **{'data.tokenizer_path': str(imported / 'imported' / 'tokenizer')}
  )
  config = model_from(config, init_model_config(config.train.init_from))
  data = dataset.make_data(config, str(tmp_path))
  decode = transformers.AutoTokenizer.from_pretrained(imported / 'tokenizer').decode
  batch = next(data.train)
  assert set(data.valid) == {'deu_Latn', 'fra_Latn'}
  checked = 0
  for row in range(batch['inputs'].shape[0]):
    segments = batch['segment_ids'][row]
    for segment in np.unique(segments[segments > 0]):
      where = np.flatnonzero(segments == segment)
      assert batch['positions'][row][where[0]] == 0  # conversations are never cut
      prompt = decode(batch['inputs'][row][where].tolist())
      lang = 'de' if 'Kannst' in prompt else 'fr'
      counted = where[batch['loss_mask'][row][where] == 1]
      assert decode(batch['targets'][row][counted].tolist()) == assistant_turn(
          'llama3', ANSWERS[lang]
      )
      checked += 1
  assert checked >= 8
  assert 0 < data.train.packing_stats()['padding_fraction'] < 0.5
  assert 'loss_mask' in data.valid['deu_Latn'][0]


def test_fine_tuned_model_answers_as_trained_through_transformers(imported, tmp_path):
  config = _sft_config(imported)
  workdir = tmp_path / 'run'
  train(config, str(workdir))
  metrics = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  losses = [m['loss'] for m in metrics if 'loss' in m]
  assert losses[-1] < 0.1 * losses[0]

  export = tmp_path / 'export'
  hf.export_hf(str(workdir), str(export), dtype='float32', log=lambda *_: None)
  tokenizer_config = json.loads((export / 'tokenizer_config.json').read_text())
  assert tokenizer_config['chat_template'] == LLAMA3
  assert '- Chat: fine-tuned on conversations' in (export / 'README.md').read_text()
  tokenizer = transformers.AutoTokenizer.from_pretrained(export)
  model = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
  chat_pipeline = transformers.pipeline('text-generation', model=str(export))
  for lang, question in QUESTIONS.items():
    messages = [{'role': 'user', 'content': question.format(1000)}]  # unseen
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors='pt', return_dict=True
    )
    with torch.no_grad():
      out = model.generate(**ids, max_new_tokens=20)  # the export's defaults: greedy
    # It stops at the end of the turn: <|eot_id|> is a stop token of the export.
    assert tokenizer.decode(out[0, ids['input_ids'].shape[1] :]) == ANSWERS[lang] + '<|eot_id|>'
    # What serving code does: a chat pipeline on the folder, with its defaults.
    (answered,) = chat_pipeline(messages, max_new_tokens=20)
    assert answered['generated_text'][-1] == {'role': 'assistant', 'content': ANSWERS[lang]}
  eot = tokenizer.convert_tokens_to_ids('<|eot_id|>')
  stops = json.loads((export / 'generation_config.json').read_text())['eos_token_id']
  assert eot in stops
  # euro_lm's own generation from the workdir: each question as a user message, and a
  # conversation with a system message and history from a file (what transformers
  # answers greedily on the export).
  run = load_run(str(workdir))
  questions = [QUESTIONS[lang].format(1000) for lang in QUESTIONS]
  assert complete(run, questions, temperature=0.0, chat_messages=True) == list(ANSWERS.values())
  conversation = [
      {'role': 'system', 'content': 'Antworte kurz.'},
      {'role': 'user', 'content': QUESTIONS['fr'].format(7)},
      {'role': 'assistant', 'content': ANSWERS['fr']},
      {'role': 'user', 'content': QUESTIONS['de'].format(1001)},
  ]
  ids = tokenizer.apply_chat_template(
      conversation, add_generation_prompt=True, return_tensors='pt', return_dict=True
  )
  with torch.no_grad():
    out = model.generate(**ids, max_new_tokens=12)
  answer = [t for t in out[0, ids['input_ids'].shape[1] :].tolist() if t not in stops]
  expected = tokenizer.decode(answer)
  # The template variables: the run's data.chat_template_kwargs, updated by the caller's.
  run.config.data.chat_template_kwargs = '{"date_string": "02 Feb 2001"}'
  for given, date in ((None, '02 Feb 2001'), ({'date_string': '01 Jan 2000'}, '01 Jan 2000')):
    (ours,), _, _ = prompt_ids(run, [conversation], template_variables=given)
    theirs = tokenizer.apply_chat_template(
        conversation, add_generation_prompt=True, date_string=date
    )['input_ids']
    assert ours == theirs and f'Today Date: {date}' in tokenizer.decode(ours)
  prompts = tmp_path / 'prompts.jsonl'
  prompts.write_text(json.dumps({'messages': conversation}) + '\n')
  result = subprocess.run(
      [
          sys.executable,
          '-m',
          'euro_lm.generate',
          f'--workdir={workdir}',
          f'--conversations={prompts}',
          '--temperature=0',
          '--max_new_tokens=12',
      ],
      capture_output=True,
      text=True,
      timeout=300,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=''),
  )
  assert result.returncode == 0, result.stderr
  assert expected == ANSWERS['de']  # as trained, after a system message and history
  assert result.stdout.endswith(f'--- {prompts}:1\n{expected}\n')


@pytest.mark.parametrize(
    'overrides, message',
    [
        ({}, 'train.model_from_init=True needs train.init_from'),
        ({'data.chat_template': 'default'}, "data.chat_template='default' needs data.chat_files"),
        ({'data.prompt_loss': True}, 'data.prompt_loss=True needs data.chat_files'),
        ({'data.replay_fraction': 0.1}, 'data.replay_fraction=0.1 needs data.chat_files'),
        (
            {'data.chat_files': 'c.jsonl', 'data.replay_fraction': 1.0},
            r'data.replay_fraction=1.0 must be in \[0, 1\)',
        ),
        (
            {'data.chat_template_kwargs': '{"enable_thinking": false}'},
            'data.chat_template_kwargs=.* needs data.chat_files',
        ),
        (
            {'data.chat_files': 'c.jsonl', 'data.chat_template_kwargs': 'enable_thinking=0'},
            "data.chat_template_kwargs='enable_thinking=0' is not JSON",
        ),
    ],
)
def test_sft_config_is_validated_with_the_field_named(overrides, message):
  config = sft.get_config()
  config.train.model_from_init = not overrides
  config.update_from_flattened_dict(overrides)
  with pytest.raises(ConfigError, match=message):
    validate(config, 1)


def test_masked_streams_resume_exactly_and_shift_the_mask_to_targets():
  """Rows of (ids, mask) documents: at input k the mask of token k + 1, no document cut
  across rows, and a stream restored from a saved state gives the same rows."""
  from euro_lm.data.streams import PackedStreams  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  documents = []
  for n in rng.integers(3, 20, size=30):
    ids = rng.integers(1, 1000, size=n).astype(np.int32)
    documents.append((ids, (ids % 3 == 0).astype(np.int32)))

  def streams():
    return PackedStreams(
        {'und': documents},
        lambda step: {'und': 1.0},
        mean_document_tokens={'und': 11.0},
        seq_len=32,
        num_streams=4,
        streams=range(4),
        seed=1,
        bos_id=None,
        eos_id=None,
        masked=True,
    )

  first = streams()
  for _ in range(3):
    batch = next(first)
    counted = batch['segment_ids'] != 0
    # The independent rule: this toy mask marks exactly the ids divisible by 3.
    np.testing.assert_array_equal(batch['loss_mask'], counted & (batch['targets'] % 3 == 0))
    starts = np.diff(batch['segment_ids'], axis=1, prepend=0) > 0
    np.testing.assert_array_equal(batch['positions'][starts], 0)
  state = first.get_state()
  expected = [next(first) for _ in range(3)]
  resumed = streams()
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_conversations_without_languages_train_as_one_pool(imported, tmp_path):
  from euro_lm.checkpoint import init_model_config  # pylint: disable=g-import-not-at-top
  from euro_lm.config import model_from  # pylint: disable=g-import-not-at-top

  config = _sft_config(
      imported,
      **{
          'data.tokenizer_path': str(imported / 'imported' / 'tokenizer'),
          'data.chat_language_field': '',
          'data.prompt_loss': True,
      },
  )
  config = model_from(config, init_model_config(config.train.init_from))
  data = dataset.make_data(config, str(tmp_path))
  assert data.languages == [dataset.UNDETERMINED] and list(data.valid) == ['und']
  batch = next(data.train)
  # prompt_loss: every token of a conversation counts, padding none.
  np.testing.assert_array_equal(batch['loss_mask'], batch['segment_ids'] != 0)
  assert (tmp_path / dataset.CHAT_TEMPLATE_FILE).read_text() == LLAMA3


def test_a_restored_data_state_continues_with_the_same_batches(imported, tmp_path):
  """make_data reads the conversation files again on resume; the saved positions then
  give the batches an uninterrupted run sees."""
  from euro_lm.checkpoint import init_model_config  # pylint: disable=g-import-not-at-top
  from euro_lm.config import model_from  # pylint: disable=g-import-not-at-top

  config = _sft_config(
      imported, **{'data.tokenizer_path': str(imported / 'imported' / 'tokenizer')}
  )
  config = model_from(config, init_model_config(config.train.init_from))
  first = dataset.make_data(config, str(tmp_path)).train
  for _ in range(3):
    next(first)
  state = first.get_state()
  expected = [next(first) for _ in range(2)]
  resumed = dataset.make_data(config, str(tmp_path)).train
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    assert set(got) == set(want)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_a_template_file_and_a_tokenizer_without_bos(imported, tmp_path):
  """data.chat_template as a .jinja file; Qwen's tokenizer has no BOS, which the default
  data.add_bos=True does not ask of conversations (their template writes the markers)."""
  from tests.chat_templates import QWEN25  # pylint: disable=g-import-not-at-top

  tokenizer_dir = tmp_path / 'qwen'
  make_tokenizer_folder('qwen2', tokenizer_dir)
  template = tmp_path / 'qwen.jinja'
  template.write_text(QWEN25)
  tokenizer = load_tokenizer(str(tokenizer_dir))
  assert tokenizer.bos_id is None
  config = _sft_config(
      imported,
      **{
          'train.model_from_init': False,
          'train.init_from': '',
          'data.tokenizer_path': str(tokenizer_dir),
          'data.chat_template': str(template),
          'model.vocab_size': tokenizer.vocab_size,
      },
  )
  validate(config, 1)
  data = dataset.make_data(config, str(tmp_path / 'run'))
  batch = next(data.train)
  decode = transformers.AutoTokenizer.from_pretrained(tokenizer_dir).decode
  counted = decode(batch['targets'][0][batch['loss_mask'][0] == 1].tolist())
  assert counted.startswith(assistant_turn('qwen2', ANSWERS['de'])) or counted.startswith(
      assistant_turn('qwen2', ANSWERS['fr'])
  )
  assert (tmp_path / 'run' / dataset.CHAT_TEMPLATE_FILE).read_text() == QWEN25


def test_replay_mixes_pretraining_text_at_its_share_all_in_the_loss(imported, tmp_path):
  """data.replay_fraction: the embedded corpus' text (tokenized with the model's tokenizer)
  gets that share of the tokens, counted whole in the loss; conversations keep their masks."""
  from euro_lm.checkpoint import init_model_config  # pylint: disable=g-import-not-at-top
  from euro_lm.config import model_from  # pylint: disable=g-import-not-at-top

  config = _sft_config(
      imported,
      **{
          'data.tokenizer_path': str(imported / 'imported' / 'tokenizer'),
          'data.replay_fraction': 0.3,
          'data.languages': 'deu_Latn,fra_Latn',
      },
  )
  config = model_from(config, init_model_config(config.train.init_from))
  validate(config, 1)
  data = dataset.make_data(config, str(tmp_path))
  assert sorted(data.valid) == ['deu_Latn', 'fra_Latn', 'replay-deu_Latn', 'replay-fra_Latn']
  assert 'loss_mask' not in data.valid['replay-deu_Latn'][0]
  for _ in range(20):
    next(data.train)
  tokens = data.train.tokens_by_language()
  replayed = sum(n for tag, n in tokens.items() if tag.startswith('replay-'))
  assert abs(replayed / sum(tokens.values()) - 0.3) < 0.06


@pytest.mark.parametrize('loss_chunk_length', [0, 8])
def test_the_step_loss_is_the_mean_over_masked_targets(loss_chunk_length):
  """The train step's loss with a batch loss_mask equals the mean negative log-likelihood
  over exactly the masked targets, computed in numpy from the model's logits (both loss
  paths: all logits at once, and fused in chunks)."""
  import jax  # pylint: disable=g-import-not-at-top

  from tests.test_lora import fixed_batch, init, logits, small_config  # pylint: disable=g-import-not-at-top

  config = small_config(rank=0)
  config.model.loss_chunk_length = loss_chunk_length
  batch = fixed_batch(config)
  batch['loss_mask'] = (
      np.random.default_rng(1).integers(0, 2, batch['inputs'].shape).astype(np.int32)
  )
  params = init(config.model, batch['inputs'])
  logits_BLV = np.asarray(logits(config.model, params, batch['inputs']), np.float64)
  log_probs = logits_BLV - np.log(np.exp(logits_BLV).sum(-1, keepdims=True))
  nll = -np.take_along_axis(log_probs, batch['targets'][..., None], -1)[..., 0]
  expected = (nll * batch['loss_mask']).sum() / batch['loss_mask'].sum()

  from euro_lm.model import Decoder  # pylint: disable=g-import-not-at-top
  from euro_lm.train.step import _loss_sums  # pylint: disable=g-import-not-at-top

  _, (loss_sum, weight_sum) = jax.jit(lambda p, b: _loss_sums(p, b, Decoder(config.model), 0.0))(
      params, batch
  )
  assert float(weight_sum) == batch['loss_mask'].sum()
  np.testing.assert_allclose(float(loss_sum) / float(weight_sum), expected, rtol=1e-5)


def test_bad_conversations_are_reported_with_file_and_line(imported, tmp_path, capsys):
  from euro_lm.checkpoint import init_model_config  # pylint: disable=g-import-not-at-top
  from euro_lm.config import model_from  # pylint: disable=g-import-not-at-top

  chats = tmp_path / 'chats.jsonl'
  _conversations(chats, 10)
  with open(chats, 'a', encoding='utf-8') as f:
    f.write('{"messages": [\n')  # line 11
    f.write(json.dumps({'messages': [{'role': 'function', 'content': 'x'}]}) + '\n')
    long = [{'role': 'user', 'content': 'Wort ' * 200}, {'role': 'assistant', 'content': 'Ja.'}]
    f.write(json.dumps({'messages': long, 'lang': 'de'}) + '\n')  # line 13
  config = _sft_config(
      imported,
      **{
          'data.chat_files': str(chats),
          'data.tokenizer_path': str(imported / 'imported' / 'tokenizer'),
          'data.chat_language_field': '',
      },
  )
  config = model_from(config, init_model_config(config.train.init_from))
  dataset.make_data(config, str(tmp_path / 'run'))
  out = capsys.readouterr().out
  assert f'{chats}:11: 1 bad record(s) of kind invalid_json' in out
  assert f'{chats}:12: 1 bad record(s) of kind unsupported_role' in out
  assert f'{chats}:13: 1 bad record(s) of kind too_long' in out


def test_import_with_the_default_template_adds_its_tokens_and_embedding_rows(tmp_path):
  """A base model whose tokenizer lacks ChatML's markers, imported with
  chat_template='default': the markers become single ids after the last piece, the
  embedding and output grow (to a multiple of 128 rows) with the mean row for them, every
  other logit stays transformers', the export's template gives euro_lm's ids, and the run
  fine-tunes from it."""
  from euro_lm.data import chat  # pylint: disable=g-import-not-at-top
  from tests.test_hf import HF_SHAPES, random_hf_model  # pylint: disable=g-import-not-at-top

  hf_dir = tmp_path / 'hf'
  make_tokenizer_folder('llama3', hf_dir)
  original = load_tokenizer(str(hf_dir))
  pieces = original.vocab_size
  assert len(original.encode('<|im_start|>')) > 1
  shape = {**HF_SHAPES['gqa_untied'], 'vocab_size': pieces, 'max_position_embeddings': 256}
  base = random_hf_model(shape)
  base.save_pretrained(hf_dir)
  logs = []
  config = hf.import_hf(str(hf_dir), str(tmp_path / 'imported'), logs.append, 'default')
  rows = -(-(pieces + 2) // 128) * 128
  assert config.model.vocab_size == rows
  assert any('<|im_start|>, <|im_end|>' in line for line in logs)
  tokenizer = load_tokenizer(config.data.tokenizer_path)
  assert [tokenizer.encode(t) for t in chat.DEFAULT_TEMPLATE_TOKENS] == [[pieces], [pieces + 1]]
  text = 'Grüß Gott, wie geht es dir? 123'
  assert tokenizer.encode(text) == original.encode(text)

  export = tmp_path / 'export'
  hf.export_hf(str(tmp_path / 'imported'), str(export), dtype='float32', log=lambda *_: None)
  grown = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
  for new, old in (
      (grown.get_input_embeddings().weight, base.get_input_embeddings().weight),
      (grown.get_output_embeddings().weight, base.get_output_embeddings().weight),
  ):
    np.testing.assert_array_equal(new[:pieces].detach(), old.detach())
    mean = old.detach().numpy().mean(axis=0)
    np.testing.assert_allclose(new[pieces:].detach(), np.tile(mean, (rows - pieces, 1)), atol=1e-6)
  ids = torch.tensor([original.encode(text)])
  with torch.no_grad():
    np.testing.assert_allclose(grown(ids).logits[..., :pieces], base(ids).logits, atol=1e-4, rtol=0)
  messages = [
      {'role': 'system', 'content': 'Sei kurz.'},
      {'role': 'user', 'content': QUESTIONS['de'].format(1)},
      {'role': 'assistant', 'content': ANSWERS['de']},
  ]
  theirs = transformers.AutoTokenizer.from_pretrained(export)
  ours, _ = chat.chat_example(tokenizer, chat.chat_template_for(tokenizer), messages)
  assert theirs.apply_chat_template(messages)['input_ids'] == ours.tolist()

  (tmp_path / 'chats').mkdir()
  _conversations(tmp_path / 'chats' / 'train.jsonl', 20)
  sft_config = _sft_config(
      tmp_path,
      **{
          'train.steps': 2,
          'train.eval_every': 2,
          'train.checkpoint_every': 2,
          'train.log_every': 1,
      },
  )
  train(sft_config, str(tmp_path / 'run'))
  assert (tmp_path / 'run' / dataset.CHAT_TEMPLATE_FILE).read_text() == chat.DEFAULT_TEMPLATE
