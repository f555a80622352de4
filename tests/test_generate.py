"""KV-cache decoding and sampling against independent references: per-row full-prefix
`model.apply` on the unpadded sequence, hand-made distributions, and the CLI end to end."""

import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flax import linen as nn

from configs import tiny
from euro_lm import sampling
from euro_lm.checkpoint import CheckpointError
from euro_lm.data.conversations import ConversationSource
from euro_lm.inference import answer, complete, load_run
from euro_lm.model.decoder import Decoder, init_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[2, 5, 6], [2, 7, 8, 9, 10, 11], [2]]  # different lengths, left-padded
EOS = 3


def small_config(**overrides):
  m = tiny.get_config().model
  m.vocab_size, m.num_layers, m.embed_dim, m.mlp_dim = 97, 2, 32, 48
  m.num_heads, m.num_kv_heads, m.head_dim = 4, 2, 8  # GQA: 2 query heads per kv head
  m.init_std = 0.2  # large enough that a wrong position or mask moves the logits a lot
  m.qk_norm, m.tie_embeddings = True, False  # the paths that add params to the cached one
  m.update(overrides)
  return m


@functools.cache
def _model_and_apply(overrides):
  model = Decoder(small_config(**dict(overrides)))
  init = jax.jit(lambda r: nn.unbox(model.init(r, jnp.zeros((1, 8), jnp.int32))['params']))
  return model, init(jax.random.key(0)), jax.jit(model.apply)


def make_model(**overrides):
  """(model, params, jitted model.apply), built once per settings."""
  return _model_and_apply(tuple(sorted(overrides.items())))


def full_logits(apply, params, row, length=16):
  """Reference: the whole unpadded sequence at once, positions 0.., no cache. Filler after
  the row (one compiled shape) cannot change its logits: attention is causal."""
  tokens_1L = np.full((1, length), 1, np.int32)
  tokens_1L[0, : len(row)] = row
  return np.asarray(apply({'params': params}, tokens_1L)[0, : len(row)])


def test_cached_decode_logits_equal_full_recompute():
  model, params, apply = make_model()
  continuation_BT = np.asarray(jax.random.randint(jax.random.key(1), (3, 5), 0, 97))
  tokens_BP, lengths_B = sampling.left_pad(PROMPTS, pad_id=0)
  batch, prompt_len = tokens_BP.shape
  padding_B1 = (prompt_len - lengths_B)[:, None]
  slots_1P = np.arange(prompt_len)[None]
  cache = init_cache(model.config, batch, prompt_len + continuation_BT.shape[1])
  logits_BPV, cache = apply(
      {'params': params},
      tokens_BP,
      (slots_1P >= padding_B1).astype(np.int32),
      np.maximum(slots_1P - padding_B1, 0),
      cache=cache,
  )
  steps = [np.asarray(logits_BPV[:, -1])]
  for t in range(continuation_BT.shape[1] - 1):
    logits_B1V, cache = apply(
        {'params': params}, continuation_BT[:, t : t + 1], None, lengths_B[:, None] + t, cache=cache
    )
    steps.append(np.asarray(logits_B1V[:, 0]))
  assert int(cache['index']) == prompt_len + continuation_BT.shape[1] - 1
  for b, prompt in enumerate(PROMPTS):
    reference_LV = full_logits(apply, params, prompt + list(continuation_BT[b]))
    # The prompt itself (prefill), then one new token per step.
    np.testing.assert_allclose(
        np.asarray(logits_BPV[b, prompt_len - len(prompt) :]),
        reference_LV[: len(prompt)],
        rtol=1e-5,
        atol=1e-5,
    )
    for t, logits_BV in enumerate(steps):
      np.testing.assert_allclose(
          logits_BV[b], reference_LV[len(prompt) - 1 + t], rtol=1e-5, atol=1e-5
      )


@functools.cache
def _generate_fn(model_id, **settings):
  return sampling.make_generate(_MODELS[model_id], **settings)


_MODELS = {}


def run_generate(model, params, key, prompts=PROMPTS, **settings):
  """sampling.generate, compiled once per (model, settings) across tests."""
  _MODELS[id(model)] = model
  tokens_BP, lengths_B = sampling.left_pad(prompts, pad_id=0)
  return _generate_fn(id(model), **settings)(params, tokens_BP, lengths_B, key)


def greedy_reference(apply, params, prompt, steps):
  """Greedy decoding by recomputing the unpadded prefix every step, in plain Python."""
  row = list(prompt)
  for _ in range(steps):
    row.append(int(np.argmax(full_logits(apply, params, row)[-1])))
  return row[len(prompt) :]


def test_greedy_with_cache_equals_recompute():
  model, params, apply = make_model()
  kwargs = dict(max_new_tokens=6, eos_id=-1, temperature=0.0)
  cached = run_generate(model, params, jax.random.key(0), **kwargs)
  recomputed = run_generate(model, params, jax.random.key(0), use_cache=False, **kwargs)
  expected = [greedy_reference(apply, params, p, 6) for p in PROMPTS]
  np.testing.assert_array_equal(cached.tokens_BN, expected)
  np.testing.assert_array_equal(recomputed.tokens_BN, expected)
  np.testing.assert_array_equal(cached.lengths_B, [6, 6, 6])


def test_a_padded_vocabulary_is_never_sampled():
  """With `num_tokens` (the tokenizer's size) below the model's vocabulary, the rows past
  it are never drawn, greedy or sampled, even where they hold the largest logits."""
  model, params, apply = make_model()
  vocab = params['embedding'].shape[0]
  greedy = greedy_reference(apply, params, PROMPTS[0], 6)
  num_tokens = max(min(greedy), 1)  # the greedy choices themselves are out of reach
  for temperature in (0.0, 2.0):
    got = run_generate(
        model,
        params,
        jax.random.key(0),
        max_new_tokens=6,
        eos_id=-1,
        temperature=temperature,
        num_tokens=num_tokens,
    )
    assert np.asarray(got.tokens_BN).max() < num_tokens < vocab


def test_top_k_1_is_greedy():
  model, params, _ = make_model()
  greedy = run_generate(
      model, params, jax.random.key(0), max_new_tokens=6, eos_id=-1, temperature=0.0
  )
  top_1 = run_generate(
      model, params, jax.random.key(1), max_new_tokens=6, eos_id=-1, temperature=3.0, top_k=1
  )
  np.testing.assert_array_equal(top_1.tokens_BN, greedy.tokens_BN)


@pytest.mark.parametrize(
    'top_p,kept',
    [
        (0.45, [0.5]),
        (0.65, [0.5, 0.2]),
        (0.75, [0.5, 0.2, 0.15]),
        (0.9, [0.5, 0.2, 0.15, 0.1]),
        (0.99, [0.5, 0.2, 0.15, 0.1, 0.05]),
        (1.0, None),
    ],
)
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
  probs_V = np.array([0.1, 0.5, 0.05, 0.2, 0.15])
  logits_BV = np.log(np.stack([probs_V, probs_V[::-1]]))  # two rows, different orders
  filtered_BV = np.asarray(sampling.filter_logits(jnp.asarray(logits_BV), top_p=top_p))
  for row_logits, row_filtered in zip(logits_BV, filtered_BV):
    row_probs = np.exp(row_logits)
    expected = np.isin(np.round(row_probs, 6), kept) if kept else np.ones(5, bool)
    np.testing.assert_array_equal(np.isfinite(row_filtered), expected)
    np.testing.assert_allclose(row_filtered[expected], row_logits[expected], rtol=1e-6)


def test_top_k_keeps_the_k_largest():
  logits_BV = jnp.asarray([[0.0, 3.0, 1.0, 2.0, -1.0]])
  filtered_BV = np.asarray(sampling.filter_logits(logits_BV, top_k=2))
  np.testing.assert_array_equal(np.isfinite(filtered_BV), [[False, True, False, True, False]])


@pytest.mark.parametrize('temperature', [0.5, 2.0])
def test_sampling_frequencies_follow_the_tempered_softmax(temperature):
  logits_V = np.array([1.0, 0.0, -0.5, 2.0])
  draws = 20_000
  samples_B = sampling.sample_logits(
      jnp.tile(jnp.asarray(logits_V), (draws, 1)), jax.random.key(42), temperature=temperature
  )
  frequencies_V = np.bincount(np.asarray(samples_B), minlength=4) / draws
  expected_V = np.exp(logits_V / temperature) / np.exp(logits_V / temperature).sum()
  # 4 standard deviations of a frequency over 20k draws is at most 0.015.
  np.testing.assert_allclose(frequencies_V, expected_V, atol=0.015)


def test_eos_stops_a_row_and_pads_after_it():
  model, params, _ = make_model()
  free = np.asarray(
      run_generate(
          model, params, jax.random.key(0), max_new_tokens=6, eos_id=-1, temperature=0.0
      ).tokens_BN
  )
  eos = int(free[0, 2])  # row 0 emits it at step 3 at the latest
  out = run_generate(
      model, params, jax.random.key(0), max_new_tokens=6, eos_id=eos, temperature=0.0
  )
  for b in range(len(PROMPTS)):
    hits = np.flatnonzero(free[b] == eos)
    length = hits[0] + 1 if hits.size else 6
    assert int(out.lengths_B[b]) == length
    np.testing.assert_array_equal(out.tokens_BN[b, :length], free[b, :length])
    np.testing.assert_array_equal(out.tokens_BN[b, length:], 0)
  assert int(out.lengths_B[0]) <= 3


def test_any_of_several_stop_ids_ends_a_row():
  """EOS and a chat template's end of turn: a row ends at the first of either."""
  model, params, _ = make_model()
  free = np.asarray(
      run_generate(
          model, params, jax.random.key(0), max_new_tokens=6, eos_id=-1, temperature=0.0
      ).tokens_BN
  )
  stops = sorted({int(free[0, 3]), int(free[1, 1])})
  out = run_generate(
      model, params, jax.random.key(0), max_new_tokens=6, eos_id=tuple(stops), temperature=0.0
  )
  for b in range(len(PROMPTS)):
    hits = np.flatnonzero(np.isin(free[b], stops))
    length = hits[0] + 1 if hits.size else 6
    assert int(out.lengths_B[b]) == length
    np.testing.assert_array_equal(out.tokens_BN[b, :length], free[b, :length])
  assert int(out.lengths_B[1]) <= 2


def test_bad_sampling_settings_are_rejected():
  model = make_model()[0]
  with pytest.raises(ValueError, match='top_p'):
    sampling.make_generate(model, max_new_tokens=2, eos_id=3, temperature=1.0, top_p=1.5)
  with pytest.raises(ValueError, match='max_new_tokens'):
    sampling.make_generate(model, max_new_tokens=0, eos_id=3)
  with pytest.raises(ValueError, match='at least one token'):
    sampling.left_pad([[2], []], 0)


@pytest.fixture
def trained_workdir(small_run):
  """conftest.py's two-step run (checkpoint step 2), shared with tests/test_evaluate.py."""
  return small_run


def test_cli_prints_completions(trained_workdir):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  result = subprocess.run(
      [
          sys.executable,
          '-m',
          'euro_lm.generate',
          f'--workdir={trained_workdir}',
          '--prompt=Hello',
          '--prompt=Bonjour le monde',
          '--max_new_tokens=6',
          '--seed=1',
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
      env=env,
  )
  assert result.returncode == 0, result.stderr
  assert "--- 'Hello'\nHello" in result.stdout
  assert "--- 'Bonjour le monde'\nBonjour le monde" in result.stdout
  assert 'checkpoints/2' in result.stdout


def test_workdir_without_checkpoints_is_a_clear_error(trained_workdir, tmp_path):
  with open(os.path.join(trained_workdir, 'config.json'), encoding='utf-8') as f:
    (tmp_path / 'config.json').write_text(f.read())
  with pytest.raises(CheckpointError, match='no checkpoint in'):
    load_run(str(tmp_path))
  with pytest.raises(CheckpointError, match='no checkpoint for step 7'):
    load_run(trained_workdir, step=7)


# Prompts of different lengths (so each batch pads them differently), in file order.
TEXTS = ['Hello', 'Bonjour le monde, comment', 'Guten']


def test_greedy_answers_do_not_depend_on_the_batch_size(trained_workdir):
  """Padding is masked out exactly: a prompt's greedy completion is the same alone, in
  pairs or in one batch of all; `on_batch` gets the batches in order as they come."""
  greedy = functools.partial(complete, load_run(trained_workdir), TEXTS, temperature=0.0)
  texts, batches = greedy(max_new_tokens=8), []
  assert len(set(texts)) == len(TEXTS)  # a mix-up of rows would show
  assert greedy(max_new_tokens=8, batch_size=1) == texts
  assert greedy(max_new_tokens=8, batch_size=2, on_batch=lambda *b: batches.append(b)) == texts
  assert batches == [(0, 2, texts[:2]), (1, 2, texts[2:])]


def test_a_sample_does_not_depend_on_later_prompts(trained_workdir):
  """Batch k samples with fold_in(key(seed), k): the first batches of a longer file are
  answered as the shorter file's."""
  run = load_run(trained_workdir)
  sample = functools.partial(complete, run, max_new_tokens=8, temperature=1.0, seed=3)
  assert sample(TEXTS, batch_size=2)[:2] == sample(TEXTS[:2], batch_size=2)
  assert sample(TEXTS, batch_size=2) != sample(TEXTS, batch_size=2, seed=4)


# The default template with the tools in a turn of their own, and a generation prompt that
# ends with the last message's text: the 2-step model's greedy answer depends on little but
# the last token, so each record gets its own answer (and their order shows).
ECHO_TEMPLATE = (
    '{{ bos_token }}'
    "{% if tools %}{{ '<|im_start|>tools\\n' + (tools | tojson) + '<|im_end|>\\n' }}{% endif %}"
    '{% for message in messages %}'
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    '{% endfor %}'
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' + messages[-1]['content'] }}"
    '{% endif %}'
)
WEATHER = {'type': 'function', 'function': {'name': 'get_weather', 'parameters': {}}}


def test_cli_writes_answered_conversations_to_a_jsonl_file(trained_workdir, tmp_path):
  """`--conversations --output --batch_size=2`: the output holds each record, its other
  fields kept, with the greedy answer appended as an assistant message, in file order, and
  reads back as chat data; stdout has one summary line, stderr the batches."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained_workdir, workdir)
  with open(os.path.join(workdir, 'chat_template.jinja'), 'w', encoding='utf-8') as f:
    f.write(ECHO_TEMPLATE)
  user = lambda text: {'role': 'user', 'content': text}
  records = [
      {'messages': [user('Hallo')], 'language': 'de'},
      {
          'messages': [
              {'role': 'system', 'content': 'Be brief.'},
              user('Hi'),
              {'role': 'assistant', 'content': 'Hello!'},
              user('How are you?'),
          ],
          'id': 'q2',
      },
      {'messages': [user('Bonjour, le monde')], 'language': 'fr', 'tools': [WEATHER]},
      {'messages': [user('the cat')]},
      {'messages': [user('Guten Tag')], 'language': 'de'},
  ]
  prompts, out = tmp_path / 'prompts.jsonl', tmp_path / 'answers.jsonl'
  prompts.write_text(''.join(json.dumps(r) + '\n' for r in records), encoding='utf-8')
  result = subprocess.run(
      [
          sys.executable,
          '-m',
          'euro_lm.generate',
          f'--workdir={workdir}',
          f'--conversations={prompts}',
          f'--output={out}',
          '--batch_size=2',
          '--max_new_tokens=8',
          '--temperature=0',
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
      env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=''),
  )
  assert result.returncode == 0, result.stderr
  run = load_run(workdir)
  assert result.stdout == f'wrote 5 answers of {run.step_dir} to {out}\n'
  progress = [l for l in result.stderr.splitlines() if l.startswith('batch ')]
  assert progress == ['batch 1/3: 2 answers', 'batch 2/3: 2 answers', 'batch 3/3: 1 answer']
  assert sorted(os.listdir(tmp_path)) == ['answers.jsonl', 'prompts.jsonl', 'run']  # no .tmp

  texts = answer(
      run,
      [r['messages'] for r in records],
      tools=[r.get('tools') for r in records],
      max_new_tokens=8,
      temperature=0.0,
  )
  assert len(set(texts)) == len(records) and all(t.strip() for t in texts)
  expected = [
      {**r, 'messages': [*r['messages'], {'role': 'assistant', 'content': t}]}
      for r, t in zip(records, texts)
  ]
  with open(out, encoding='utf-8') as f:
    assert [json.loads(line) for line in f] == expected
  # Chat data again: strict reading stops at a bad record.
  read = list(ConversationSource(strict=True).read(str(out))[0])
  assert [c.messages for c in read] == [e['messages'] for e in expected]
  assert [c.tools for c in read] == [None, None, [WEATHER], None, None]


def test_a_failed_output_run_keeps_and_names_its_answers(trained_workdir, tmp_path):
  """A record whose field JSON cannot hold (NaN) stops the run with one error line after
  the batch before it was written: those answers stay in FILE.tmp, named on stderr, and a
  second run refuses to start over them."""
  user = {'role': 'user', 'content': 'Hallo'}
  prompts, out = tmp_path / 'prompts.jsonl', tmp_path / 'answers.jsonl'
  prompts.write_text(
      json.dumps({'messages': [user], 'score': 1.5})
      + '\n'
      + json.dumps({'messages': [user], 'score': float('nan')})
      + '\n',
      encoding='utf-8',
  )
  command = [
      sys.executable,
      '-m',
      'euro_lm.generate',
      f'--workdir={trained_workdir}',
      f'--conversations={prompts}',
      f'--output={out}',
      '--batch_size=1',
      '--max_new_tokens=2',
      '--temperature=0',
  ]
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
  assert result.returncode == 1
  assert result.stderr.splitlines()[-2:] == [
      f'warning: the answers written so far are kept in {out}.tmp',
      f'error: --output={out}: answer 2 has a field JSON cannot hold: NaN or infinity',
  ]
  assert not out.exists()
  kept = [json.loads(line) for line in open(f'{out}.tmp', encoding='utf-8')]
  assert [(r['score'], r['messages'][:1]) for r in kept] == [(1.5, [user])]
  again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
  assert again.stderr.splitlines()[-1].startswith(f'error: --output={out}: {out}.tmp exists')
  assert [json.loads(line) for line in open(f'{out}.tmp', encoding='utf-8')] == kept


def test_parquet_prompts_keep_their_other_columns(tmp_path):
  """What `--output` writes a Parquet record back with: its other columns as they are (null
  where a row has none), its tools column parsed from JSON text into `tools`."""
  user = lambda text: json.dumps([{'role': 'user', 'content': text}])
  path = str(tmp_path / 'prompts.parquet')
  pq.write_table(
      pa.table(
          {
              'id': ['a', 'b'],
              'messages': [user('Hallo'), user('Salut')],
              'tools': [json.dumps([WEATHER]), None],
              'language': ['de', None],
          }
      ),
      path,
  )
  read = list(ConversationSource(prompts=True, strict=True, keep_fields=True).read(path)[0])
  assert [(c.tools, c.fields) for c in read] == [
      ([WEATHER], {'id': 'a', 'tools': json.dumps([WEATHER]), 'language': 'de'}),
      (None, {'id': 'b', 'tools': None, 'language': None}),
  ]
  assert list(ConversationSource(prompts=True).read(path)[0])[0].fields is None
