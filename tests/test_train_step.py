"""The sharded train step: mesh independence, gradient accumulation, the optimizer."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from configs import tiny
from euro_lm import sharding
from euro_lm.model import Decoder
from euro_lm.sharding import global_batch, logical_rules, make_mesh
from euro_lm.train.optimizer import decay_mask, learning_rate_schedule, make_optimizer
from euro_lm.train.state import create_train_state
from euro_lm.train.step import _loss_sums, make_train_step


def small_config(data=1, fsdp=1, tensor=1, grad_accum_steps=1):
  c = tiny.get_config()
  c.model.vocab_size, c.model.num_layers, c.model.embed_dim, c.model.mlp_dim = 128, 2, 32, 64
  c.model.num_heads, c.model.num_kv_heads, c.model.head_dim = 4, 2, 8
  c.train.global_batch_size, c.train.seq_len = 8, 16
  c.train.grad_accum_steps = grad_accum_steps
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
  c.optimizer.warmup_steps = 0  # every step updates the params
  c.optimizer.weight_decay = 0.1  # and the decay mask takes part
  return c


def random_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  b, l = config.train.global_batch_size, config.train.seq_len
  # Two documents per row, the second ending in padding.
  segment_ids = np.concatenate(
      [np.ones((b, l // 2)), np.full((b, l // 4), 2), np.zeros((b, l // 4))], axis=1
  ).astype(np.int32)
  positions = np.concatenate([np.arange(l // 2), np.arange(l // 4), np.zeros(l // 4)])
  return {
      'inputs': rng.integers(0, config.model.vocab_size, (b, l), dtype=np.int32),
      'targets': rng.integers(0, config.model.vocab_size, (b, l), dtype=np.int32),
      'segment_ids': segment_ids,
      'positions': np.broadcast_to(positions, (b, l)).astype(np.int32),
  }


def run_steps(config, devices, num_steps=2):
  """Returns per-step metrics, the final params (as numpy), the final state and the
  gradients of the first batch, on a mesh of `devices`."""
  model = Decoder(config.model)
  tx, schedule = make_optimizer(config.optimizer, total_steps=10)
  mesh = make_mesh(config.mesh, devices)
  rules = logical_rules(config.mesh)
  state, shardings = create_train_state(
      model, tx, config.train.seq_len, jax.random.key(0), mesh, rules
  )
  step = make_train_step(model, tx, schedule, config.train, 1e-4, mesh, shardings)
  history = []
  grad_fn = jax.jit(
      jax.grad(lambda p, b: _loss_sums(p, b, model, 1e-4)[0]),
      in_shardings=(shardings.params, None),
      out_shardings=shardings.params,
  )
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    grads = jax.device_get(
        grad_fn(state.params, global_batch(random_batch(config, 0), mesh, rules))
    )
    for i in range(num_steps):
      state, metrics = step(state, global_batch(random_batch(config, i), mesh, rules))
      history.append(jax.device_get(metrics))
  return history, jax.device_get(state.params), state, grads


@pytest.fixture(scope='module')
def single_device_run():
  return run_steps(small_config(), jax.devices()[:1])


def test_2x2x2_mesh_step_equals_single_device_step(single_device_run):
  ref_history, ref_params, _, ref_grads = single_device_run
  history, params, state, grads = run_steps(small_config(data=2, fsdp=2, tensor=2), jax.devices())
  # The state really is sharded over fsdp and tensor.
  assert state.params['layers']['mlp']['w_up'].sharding.spec == P(None, 'fsdp', 'tensor')
  assert state.opt_state[1][0].mu['layers']['mlp']['w_up'].sharding.spec == P(
      None, 'fsdp', 'tensor'
  )
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), ref_grads, grads
  )
  for ref, got in zip(ref_history, history):
    for key in ('loss', 'grad_norm', 'learning_rate', 'tokens'):
      np.testing.assert_allclose(got[key], ref[key], rtol=2e-5, err_msg=key)
  # Adam divides by sqrt(v): float32 reduction-order noise in near-zero gradients moves
  # a parameter by a small fraction of the learning rate (3e-3), never by a whole step.
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=3e-5), ref_params, params
  )


def test_gradient_accumulation_equals_one_big_batch(single_device_run):
  ref_history, ref_params, _, _ = single_device_run
  history, params, _, _ = run_steps(small_config(data=2, grad_accum_steps=4), jax.devices()[:2])
  for ref, got in zip(ref_history, history):
    np.testing.assert_allclose(got['loss'], ref['loss'], rtol=2e-5)
    np.testing.assert_allclose(got['grad_norm'], ref['grad_norm'], rtol=2e-5)
  # Adam divides by sqrt(v): float32 reduction-order noise in near-zero gradients moves
  # a parameter by a small fraction of the learning rate (3e-3), never by a whole step.
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=3e-5), ref_params, params
  )


def test_pallas_attention_on_a_2x2x2_mesh_equals_xla_on_one_device():
  """The real step (layers under nn.scan, remat, accumulation) with euro_lm's kernels
  running per device under shard_map, against the xla attention on one device."""

  def config(impl, **mesh):
    c = small_config(grad_accum_steps=2, **mesh)
    c.train.seq_len, c.model.attention_impl, c.model.remat_policy = 64, impl, 'dots'
    return c

  ref_history, ref_params, _, _ = run_steps(config('xla'), jax.devices()[:1])
  history, params, _, _ = run_steps(config('pallas', data=2, fsdp=2, tensor=2), jax.devices())
  for ref, got in zip(ref_history, history):
    for key in ('loss', 'grad_norm'):
      np.testing.assert_allclose(got[key], ref[key], rtol=2e-5, err_msg=key)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=3e-5), ref_params, params
  )


def test_loss_is_the_token_weighted_cross_entropy(single_device_run):
  """Step 1's loss equals a float64 numpy cross-entropy over the non-padding tokens."""
  config = small_config()
  model = Decoder(config.model)
  tx, _ = make_optimizer(config.optimizer, 10)
  mesh = make_mesh(config.mesh, jax.devices()[:1])
  state, _ = create_train_state(
      model, tx, config.train.seq_len, jax.random.key(0), mesh, logical_rules(config.mesh)
  )
  batch = random_batch(config, 0)
  logits = np.asarray(
      jax.jit(model.apply)(
          {'params': state.params}, batch['inputs'], batch['segment_ids'], batch['positions']
      ),
      np.float64,
  )
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  nll = logz - np.take_along_axis(logits, batch['targets'][..., None], -1)[..., 0]
  weights = batch['segment_ids'] != 0
  expected = (nll * weights).sum() / weights.sum()
  np.testing.assert_allclose(single_device_run[0][0]['loss'], expected, rtol=1e-5)
  assert single_device_run[0][0]['tokens'] == weights.sum()


def test_schedules():
  o = small_config().optimizer
  o.learning_rate, o.warmup_steps, o.min_lr_ratio = 1.0, 10, 0.1
  o.schedule = 'cosine'
  cosine = learning_rate_schedule(o, 110)
  assert float(cosine(0)) == 0.0 and float(cosine(5)) == pytest.approx(0.5)
  assert float(cosine(10)) == pytest.approx(1.0)
  assert float(cosine(60)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)  # half way down
  assert float(cosine(110)) == pytest.approx(0.1)
  o.schedule, o.decay_fraction = 'wsd', 0.2
  wsd = learning_rate_schedule(o, 110)  # warmup 10, stable until 88, decay 22 steps
  assert float(wsd(50)) == pytest.approx(1.0) and float(wsd(88)) == pytest.approx(1.0)
  assert float(wsd(99)) == pytest.approx(1.0 - 0.9 * 11 / 22)
  assert float(wsd(110)) == pytest.approx(0.1)
  # The optimizer's k-th update (count k-1) uses lr(k): no wasted first step, and the
  # last update lands on the floor.
  _, shifted = make_optimizer(o, 110)
  assert float(shifted(0)) == pytest.approx(float(wsd(1)))
  assert float(shifted(109)) == pytest.approx(0.1)


def test_weight_decay_mask():
  config = small_config()
  params = Decoder(config.model).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params']
  mask = nn.unbox(decay_mask(nn.unbox(params), decay_embeddings=False))
  assert mask['layers']['mlp']['w_up'] and mask['layers']['attention']['wq']
  assert not mask['layers']['mlp_norm']['scale'] and not mask['final_norm']['scale']
  assert not mask['embedding']
  assert decay_mask(nn.unbox(params), decay_embeddings=True)['embedding']


def test_z_loss_adds_the_squared_log_partition():
  """The objective is sum(nll) + z_loss * sum(log Z^2) over non-padding tokens."""
  config = small_config()
  model = Decoder(config.model)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))['params']
  batch = random_batch(config, 3)
  logits = np.asarray(
      jax.jit(model.apply)(
          {'params': params}, batch['inputs'], batch['segment_ids'], batch['positions']
      ),
      np.float64,
  )
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  nll = logz - np.take_along_axis(logits, batch['targets'][..., None], -1)[..., 0]
  weights = batch['segment_ids'] != 0
  objective, (loss_sum, weight_sum) = jax.jit(lambda p, b: _loss_sums(p, b, model, 1e-2))(
      params, batch
  )
  np.testing.assert_allclose(loss_sum, (nll * weights).sum(), rtol=1e-5)
  np.testing.assert_allclose(
      objective, (nll * weights).sum() + 1e-2 * (logz**2 * weights).sum(), rtol=1e-5
  )
  assert weight_sum == weights.sum()


@pytest.mark.parametrize('cause', ['gradients', 'update'])
def test_skip_policy_keeps_the_state_when_a_step_is_not_finite(cause):
  """An infinite z-loss weight makes the gradients non-finite; an infinite learning rate
  makes the updated params non-finite. With nonfinite_policy='skip' neither step changes
  the params or the optimizer state, and both are counted."""
  config = small_config()
  config.train.nonfinite_policy = 'skip'
  z_loss = math.inf if cause == 'gradients' else 0.0
  if cause == 'update':
    config.optimizer.learning_rate, config.optimizer.schedule = math.inf, 'constant'
  model = Decoder(config.model)
  tx, schedule = make_optimizer(config.optimizer, total_steps=10)
  mesh = make_mesh(config.mesh, jax.devices()[:1])
  rules = logical_rules(config.mesh)
  state, shardings = create_train_state(
      model, tx, config.train.seq_len, jax.random.key(0), mesh, rules
  )
  initial = jax.device_get((state.params, state.opt_state))
  step = make_train_step(model, tx, schedule, config.train, z_loss, mesh, shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    history = []
    for i in range(2):
      state, metrics = step(state, global_batch(random_batch(config, i), mesh, rules))
      history.append(jax.device_get(metrics))
  assert [int(m['skipped_in_a_row']) for m in history] == [1, 2]
  assert int(history[-1]['skipped_total']) == 2 and int(state.step) == 2
  assert np.isfinite(history[0]['loss'])
  assert np.isfinite(history[0]['grad_norm']) == (cause == 'update')
  jax.tree.map(
      np.testing.assert_array_equal, jax.device_get((state.params, state.opt_state)), initial
  )


def test_replica_axes_are_the_batch_axes_that_split_no_weight():
  """The axes the step sums micro-batch gradients over before reducing them once."""
  config = small_config(data=2, fsdp=2, tensor=2)
  rules = logical_rules(config.mesh)
  mesh = make_mesh(config.mesh, jax.devices())
  _, shardings = create_train_state(
      Decoder(config.model),
      make_optimizer(config.optimizer, 10)[0],
      config.train.seq_len,
      jax.random.key(0),
      mesh,
      rules,
  )
  # The default rules: batch over (data, fsdp); the weights over fsdp and tensor.
  assert sharding.batch_mesh_axes(rules) == ('data', 'fsdp')
  assert sharding.replica_axes(rules, shardings.params, mesh.abstract_mesh) == ('data',)
  one = make_mesh(small_config(data=1, fsdp=4, tensor=2).mesh, jax.devices())
  assert sharding.replica_axes(rules, shardings.params, one.abstract_mesh) == ()
  inner = dict(sharding.without_mesh_axes(rules, ('data',)))
  assert inner['batch'] == ('fsdp',) and inner['mlp'] == dict(rules)['mlp']
  assert sharding.without_mesh_axes((('batch', 'data'),), ('data',)) == (('batch', None),)
