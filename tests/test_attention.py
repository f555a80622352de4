"""Attention against an independent float64 numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_reference import jnp_reference
from euro_lm.model.attention import attention, xla_query_chunks


def reference_attention(q, k, v, segment_ids, causal):
  """float64 numpy: each query head reads kv head h // (H // K); masked softmax."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  batch, length, num_heads, head_dim = q.shape
  group = num_heads // k.shape[2]
  out = np.zeros_like(q)
  for b in range(batch):
    for h in range(num_heads):
      logits = q[b, :, h] @ k[b, :, h // group].T / np.sqrt(head_dim)
      visible = np.ones((length, length), bool)
      if causal:
        visible &= np.tri(length, dtype=bool)
      if segment_ids is not None:
        seg = np.asarray(segment_ids[b])
        visible &= (seg[:, None] == seg[None, :]) & (seg[:, None] != 0)
      logits = np.where(visible, logits, -np.inf)
      top = logits.max(-1, keepdims=True)
      probs = np.where(visible, np.exp(logits - np.where(np.isfinite(top), top, 0)), 0.0)
      total = probs.sum(-1, keepdims=True)
      # Padding (segment 0) sees no key and outputs zeros.
      out[b, :, h] = np.where(total > 0, probs / np.where(total > 0, total, 1), 0) @ \
          v[b, :, h // group]
  return out


@pytest.mark.parametrize('num_heads,num_kv_heads', [(4, 4), (4, 2), (8, 1)])
@pytest.mark.parametrize('causal', [True, False])
@pytest.mark.parametrize('packed', [True, False])
def test_xla_attention_matches_reference(num_heads, num_kv_heads, causal, packed):
  rng = np.random.default_rng(0)
  batch, length, head_dim = 2, 12, 8
  q = rng.standard_normal((batch, length, num_heads, head_dim)).astype(np.float32)
  k = rng.standard_normal((batch, length, num_kv_heads, head_dim)).astype(np.float32)
  v = rng.standard_normal((batch, length, num_kv_heads, head_dim)).astype(np.float32)
  # Row 0: three documents then padding (segment 0); row 1: one document.
  segment_ids = np.array([[1] * 4 + [2] * 3 + [3] * 3 + [0] * 2, [1] * length]) if packed else None
  out = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                  segment_ids_BL=None if segment_ids is None else jnp.asarray(segment_ids),
                  causal=causal, impl='xla')
  np.testing.assert_allclose(out, reference_attention(q, k, v, segment_ids, causal),
                             atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize('causal', [True, False])
def test_long_xla_attention_matches_reference(causal):
  """At 256 tokens causal attention runs in query chunks (documents crossing chunk edges)."""
  rng = np.random.default_rng(2)
  batch, length, num_heads, num_kv_heads, head_dim = 2, 256, 4, 2, 8
  q = rng.standard_normal((batch, length, num_heads, head_dim)).astype(np.float32)
  k = rng.standard_normal((batch, length, num_kv_heads, head_dim)).astype(np.float32)
  v = rng.standard_normal((batch, length, num_kv_heads, head_dim)).astype(np.float32)
  segment_ids = np.array([[1] * 50 + [2] * 100 + [3] * 90 + [0] * 16, [1] * length])
  run = jax.jit(lambda q, k, v, s: attention(q, k, v, segment_ids_BL=s, causal=causal,
                                             impl='xla'))
  out = run(
      jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(segment_ids))
  np.testing.assert_allclose(out, reference_attention(q, k, v, segment_ids, causal),
                             atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize('length,causal', [(12, True), (12, False), (256, True), (256, False)])
@pytest.mark.parametrize('num_heads,num_kv_heads', [(4, 4), (4, 2), (8, 1)])
def test_xla_attention_gradients_match_float64(length, causal, num_heads, num_kv_heads):
  """The xla attention's own backward (recomputed per query chunk) against autodiff of a
  dense float64 reference, with documents crossing the chunk edges and a padded row."""
  rng = np.random.default_rng(3)
  make = lambda n: jnp.asarray(rng.standard_normal((2, length, n, 8)), jnp.float32)
  q, k, v = make(num_heads), make(num_kv_heads), make(num_kv_heads)
  first, second = length * 5 // 16, length * 8 // 16
  segment_ids = np.array([[1] * first + [2] * second + [0] * (length - first - second),
                          [0] * length], np.int32)
  w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  loss = lambda *a: jnp.sum(attention(*a, segment_ids_BL=jnp.asarray(segment_ids),
                                      causal=causal, impl='xla') * w)
  ours = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  with jax.enable_x64(True):
    theirs = jax.jit(jax.grad(
        lambda *a: jnp.sum(jnp_reference(*a, segment_ids, causal, None) * w),
        argnums=(0, 1, 2)))(*(jnp.asarray(x, jnp.float64) for x in (q, k, v)))
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4)
  assert all(np.all(np.asarray(g)[1] == 0) for g in ours)  # the padded row: no gradient
  assert xla_query_chunks(length, causal) == (8 if causal and length == 256 else 1)


def test_xla_attention_bfloat16_gradients():
  """bf16 inputs: the backward accumulates in float32 and returns the inputs' dtype."""
  rng = np.random.default_rng(4)
  length = 256
  q, k, v = (jnp.asarray(rng.standard_normal((1, length, h, 16)), jnp.float32) for h in (4, 2, 2))
  w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  grad = jax.jit(jax.grad(
      lambda *a: jnp.sum(attention(*a, impl='xla').astype(jnp.float32) * w), argnums=(0, 1, 2)))
  grads = lambda dtype: grad(*(x.astype(dtype) for x in (q, k, v)))
  for low, high in zip(grads(jnp.bfloat16), grads(jnp.float32)):
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(low, np.float32), high,
                               atol=0.05 * float(jnp.max(jnp.abs(high))))


def test_gqa_equals_mha_with_repeated_kv():
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.standard_normal((2, 10, 8, 16)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((2, 10, 2, 16)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((2, 10, 2, 16)), jnp.float32)
  gqa = attention(q, k, v, impl='xla')
  mha = attention(q, jnp.repeat(k, 4, axis=2), jnp.repeat(v, 4, axis=2), impl='xla')
  np.testing.assert_allclose(gqa, mha, atol=1e-6)


def test_unknown_impl_is_rejected():
  x = jnp.zeros((1, 4, 2, 8))
  with pytest.raises(ValueError, match="unknown attention impl 'flash'"):
    attention(x, x, x, impl='flash')

