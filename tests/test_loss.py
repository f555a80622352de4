"""The fused, chunked output projection + cross-entropy (`model.loss_chunk_length`): its
loss and hand-derived gradients against autodiff of the plain loss and a float64 value,
the train and eval steps against the unfused ones (on a sharded mesh too), and the
memory it saves in XLA's analysis of the compiled step."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import base
from euro_lm import plan
from euro_lm.bench.synthetic import compile_train_step
from euro_lm.config import validate
from euro_lm.errors import ConfigError
from euro_lm.model import Decoder, loss
from euro_lm.sharding import global_batch, logical_rules, make_mesh
from euro_lm.train.step import token_losses
from tests.test_train_step import random_batch, run_steps, small_config

B, L, D, V = 2, 12, 16, 40


def inputs(dtype, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(B, L, D)), dtype)
  head = jnp.asarray(rng.normal(size=(V, D)) * 0.5, jnp.float32)
  targets = jnp.asarray(rng.integers(0, V, (B, L)), jnp.int32)
  weights = jnp.asarray(rng.random((B, L)) > 0.25, jnp.float32)  # some padding
  return x, head, targets, weights


def plain_objective(x, head, targets, weights, z_loss, dtype, softcap=0.0):
  """The unfused loss, as autodiff sees it: all `[B, L, V]` logits at once."""
  logits = jnp.einsum(
      'bld,vd->blv', x.astype(dtype), head.astype(dtype), preferred_element_type=jnp.float32
  )
  if softcap:
    logits = softcap * jnp.tanh(logits / softcap)
  logz = jax.nn.logsumexp(logits, axis=-1)
  nll = logz - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * weights) + z_loss * jnp.sum(logz**2 * weights)


@pytest.mark.parametrize('chunk', [1, 5, 12, 100])  # 5: L is not a multiple; 100 > L
@pytest.mark.parametrize('z_loss', [0.0, 1e-2])
def test_fused_loss_and_gradients_match_autodiff_of_the_plain_loss(chunk, z_loss):
  x, head, targets, weights = inputs(jnp.float32)
  fused = lambda x, head, weights: loss.loss_sums(
      x, head, targets, weights, z_loss=z_loss, chunk=chunk, dtype='float32'
  )[0]
  value, grads = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2)))(x, head, weights)
  ref_value, ref_grads = jax.value_and_grad(plain_objective, argnums=(0, 1, 3))(
      x, head, targets, weights, z_loss, jnp.float32
  )
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # And the loss value against float64 numpy.
  logits = np.asarray(x, np.float64) @ np.asarray(head, np.float64).T
  logz = np.log(np.exp(logits).sum(-1))
  nll = logz - np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]
  w = np.asarray(weights)
  objective, loss_sum = loss.loss_sums(
      x, head, targets, weights, z_loss=z_loss, chunk=chunk, dtype='float32'
  )
  np.testing.assert_allclose(loss_sum, (nll * w).sum(), rtol=1e-6)
  np.testing.assert_allclose(objective, (nll * w).sum() + z_loss * (logz**2 * w).sum(), rtol=1e-6)


@pytest.mark.parametrize('chunk', [5, 12])
def test_soft_capped_logits_loss_and_gradients_match_autodiff(chunk):
  """model.final_logit_softcap (Gemma 2): the fused loss caps the logits and its
  hand-derived gradient goes back through the cap; a cap below the logits' size matters."""
  x, head, targets, weights = inputs(jnp.float32)
  cap = 1.5
  fused = lambda x, head, weights: loss.loss_sums(
      x, head, targets, weights, z_loss=1e-2, chunk=chunk, dtype='float32', softcap=cap
  )[0]
  value, grads = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2)))(x, head, weights)
  plain = lambda c: jax.value_and_grad(plain_objective, argnums=(0, 1, 3))(
      x, head, targets, weights, 1e-2, jnp.float32, c
  )
  ref_value, ref_grads = plain(cap)
  assert abs(float(plain(0.0)[0] - ref_value)) > 1.0
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  nll, _ = loss.token_losses(x, head, targets, chunk=chunk, dtype='float32', softcap=cap)
  np.testing.assert_allclose(
      jnp.sum(nll * weights),
      plain_objective(x, head, targets, weights, 0.0, jnp.float32, cap),
      rtol=1e-6,
  )


def test_bfloat16_compute_matches_autodiff_in_bfloat16():
  """16-bit hidden states and matmul inputs, float32 softmax and accumulation, as the plain
  loss does; gradients come back in the inputs' dtypes. (The z-loss term moves these
  gradients by about 6%, so the 5e-3 bound checks it.)"""
  x, head, targets, weights = inputs(jnp.bfloat16)
  fused = lambda x, head: loss.loss_sums(
      x, head, targets, weights, z_loss=1e-2, chunk=4, dtype='bfloat16'
  )[0]
  value, (d_x, d_head) = jax.value_and_grad(fused, argnums=(0, 1))(x, head)
  ref_value, (ref_x, ref_head) = jax.value_and_grad(plain_objective, argnums=(0, 1))(
      x, head, targets, weights, 1e-2, jnp.bfloat16
  )
  assert d_x.dtype == jnp.bfloat16 and d_head.dtype == jnp.float32
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  rel = lambda a, b: float(
      jnp.linalg.norm((a - b).astype(jnp.float32)) / jnp.linalg.norm(b.astype(jnp.float32))
  )
  assert rel(d_x, ref_x) < 5e-3 and rel(d_head, ref_head) < 5e-3


def test_loss_sum_is_reported_not_differentiated_and_cotangents_scale():
  x, head, targets, weights = inputs(jnp.float32)
  sums = lambda x: loss.loss_sums(x, head, targets, weights, z_loss=0.0, chunk=4, dtype='float32')
  assert not np.any(jax.grad(lambda x: sums(x)[1])(x))
  np.testing.assert_allclose(
      jax.grad(lambda x: 3.0 * sums(x)[0])(x), 3.0 * jax.grad(lambda x: sums(x)[0])(x), rtol=1e-6
  )


def test_devices_reduce_the_head_gradient_once_not_per_chunk():
  """On a data 2 x fsdp 4 mesh, each device adds its own chunks' head gradients; the
  compiled gradient has no collective inside the chunk loop, so the 8 chunks cost one
  reduction (after the loop) like the plain loss, not eight."""
  c = base.get_config().mesh
  c.data, c.fsdp = 2, 4
  mesh, rules = make_mesh(c), logical_rules(c)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    assert loss.batch_shards() == 8
    spec = lambda *axes: jax.sharding.NamedSharding(mesh, nn.logical_to_mesh_axes(axes))
    x = jax.device_put(jnp.zeros((16, 64, 32)), spec('batch', 'length', 'embed'))
    head = jax.device_put(jnp.zeros((256, 32)), spec('vocab', 'embed'))
    targets, weights = jnp.zeros((16, 64), jnp.int32), jnp.ones((16, 64))
    grad = jax.jit(
        jax.grad(
            lambda x, head: loss.loss_sums(
                x, head, targets, weights, z_loss=1e-4, chunk=8, dtype='float32'
            )[0],
            argnums=(0, 1),
        )
    )
    hlo = grad.lower(x, head).compile().as_text()
  bodies = set(re.findall(r'while\(.*?body=%?([\w.\-]+)', hlo))
  assert bodies, 'expected the chunk loop in the compiled gradient'
  collective = re.compile(r'(all-reduce|reduce-scatter|all-gather|all-to-all|collective-permute)')
  for computation in re.split(r'\n(?=\S)', hlo):
    name = computation.split(' ', 1)[0].lstrip('%')
    if name in bodies:
      assert not collective.search(computation), computation
  assert collective.search(hlo)  # the one reduction, after the loop


def assert_trees_close(got, want, rtol=1e-4):
  """Leaf by leaf, with an absolute tolerance scaled to the leaf's largest entry."""

  def close(a, b):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(np.max(np.abs(b))))

  jax.tree.map(close, got, want)


def chunked(config, chunk):
  config.model.loss_chunk_length = chunk
  return config


def test_sharded_fused_steps_equal_single_device_unfused_steps():
  """Two optimizer steps of two micro-batches each: the fused loss in chunks of 5 (16
  positions: a partial last chunk) on a 2 x 2 x 2 (data, fsdp, tensor) mesh, where the
  vocabulary is split over tensor and the width over fsdp, against the plain loss on one
  device: metrics, gradients and params."""
  ref_history, ref_params, _, ref_grads = run_steps(
      chunked(small_config(grad_accum_steps=2), 0), jax.devices()[:1]
  )
  history, params, _, grads = run_steps(
      chunked(small_config(data=2, fsdp=2, tensor=2, grad_accum_steps=2), 5), jax.devices()
  )
  for ref, got in zip(ref_history, history):
    for key in ('loss', 'grad_norm', 'tokens'):
      np.testing.assert_allclose(got[key], ref[key], rtol=1e-5, err_msg=key)
  assert_trees_close(grads, ref_grads)
  # AdamW's first updates are about lr * sign(g), so a gradient entry near zero turns a
  # rounding difference into a visible parameter difference: a looser bound.
  assert_trees_close(params, ref_params, rtol=1e-3)


def untied(config):
  config.model.tie_embeddings = False
  return config


def test_eval_losses_equal_the_unfused_ones_with_an_untied_output():
  config = untied(small_config())
  model = Decoder(config.model)
  params = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 16), jnp.int32))['params']
  params = nn.unbox(params)
  batch = random_batch(config, 5)
  mesh = make_mesh(config.mesh, jax.devices()[:1])
  rules = logical_rules(config.mesh)
  results = []
  for chunk in (0, 3):
    model = Decoder(chunked(untied(small_config()), chunk).model)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      results.append(
          jax.device_get(
              jax.jit(lambda p, b, m=model: token_losses(m, p, b))(
                  params, global_batch(batch, mesh, rules)
              )
          )
      )
  for got, want in zip(results[1], results[0]):  # nll, logz, weights
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_negative_chunk_length_names_the_field():
  with pytest.raises(ConfigError, match='model.loss_chunk_length=-1 must be >= 0'):
    validate(chunked(small_config(), -1), 1)


def test_compiled_step_holds_one_chunk_of_logits():
  """XLA's memory analysis of the real train step on 8 devices: with a vocabulary of 16k
  and 512 tokens per device, [B, L, V] logits dominate the temporaries; in chunks of 32
  positions they go."""
  temps = {}
  for chunk in (0, 32):
    c = chunked(small_config(), chunk)
    c.model.vocab_size, c.model.num_layers = 16384, 1
    c.train.global_batch_size, c.train.seq_len, c.mesh.data = 16, 256, -1
    temps[chunk] = compile_train_step(c)[0].memory_analysis().temp_size_in_bytes
    # The planner's estimate of the temporaries follows (as tests/test_plan.py checks).
    est = plan.estimate_memory(c, 8)
    estimate = est.gradients + est.activations + est.logits + est.working
    assert 0.5 < estimate / temps[chunk] < 2, (chunk, estimate, temps[chunk])
  logits_bytes = 2 * 256 * 16384 * 4
  # Unfused: at least the float32 logits and their gradient.
  assert temps[0] > 2 * logits_bytes
  assert temps[32] < temps[0] - 1.5 * logits_bytes, temps
