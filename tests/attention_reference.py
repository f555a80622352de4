"""Independent references for the flash attention tests: float64 numpy, and plain jnp
that JAX differentiates; plus the shared packed inputs."""

import jax
import jax.numpy as jnp
import numpy as np


def reference(q, k, v, segment_ids, causal, window):
  """float64 numpy attention; query head h reads kv head h // (H // K); segment 0 sees
  nothing and outputs zeros."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  batch, length, heads, dim = q.shape
  group = heads // k.shape[2]
  index = np.arange(length)
  out = np.zeros_like(q)
  for b in range(batch):
    seg = segment_ids[b]
    visible = (seg[:, None] == seg[None, :]) & (seg[:, None] != 0)
    if causal:
      visible &= index[:, None] >= index[None, :]
    if window:
      visible &= index[:, None] - index[None, :] < window
      if not causal:
        visible &= index[None, :] - index[:, None] < window
    for h in range(heads):
      logits = np.where(visible, q[b, :, h] @ k[b, :, h // group].T / np.sqrt(dim), -np.inf)
      top = logits.max(-1, keepdims=True)
      p = np.where(visible, np.exp(logits - np.where(np.isfinite(top), top, 0)), 0)
      total = p.sum(-1, keepdims=True)
      out[b, :, h] = np.where(total > 0, p / np.where(total > 0, total, 1), 0) @ v[b, :, h // group]
  return out


def inputs(heads, kv_heads, dim, dtype, length=64, seed=0, segment_ids=None):
  """Random q, k, v `[2, L, ., dim]` and numpy segment ids `[2, L]`: by default row 0 holds
  two documents then padding, and row 1 is fully padded."""
  rng = np.random.default_rng(seed)
  make = lambda n: rng.standard_normal((2, length, n, dim)).astype(np.float32)
  q, k, v = make(heads), make(kv_heads), make(kv_heads)
  if segment_ids is None:
    first, second = length * 5 // 16, length * 8 // 16
    segment_ids = np.array(
        [[1] * first + [2] * second + [0] * (length - first - second), [0] * length], np.int32
    )
  cast = lambda x: jnp.asarray(x, dtype)
  return cast(q), cast(k), cast(v), segment_ids


def jnp_reference(q, k, v, seg, causal, window, softcap=0.0):
  """Dense masked softmax attention in plain jnp (float64 under enable_x64); scores
  soft-capped as `softcap * tanh(scores / softcap)` where `softcap` > 0 (Gemma 2)."""
  heads, kv_heads = q.shape[2], k.shape[2]
  k, v = jnp.repeat(k, heads // kv_heads, 2), jnp.repeat(v, heads // kv_heads, 2)
  index = jnp.arange(q.shape[1])
  visible = (seg[:, None, :, None] == seg[:, None, None, :]) & (seg[:, None, :, None] != 0)
  if causal:
    visible &= index[:, None] >= index[None, :]
  if window:
    visible &= index[:, None] - index[None, :] < window
    if not causal:
      visible &= index[None, :] - index[:, None] < window
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
  if softcap:
    logits = softcap * jnp.tanh(logits / softcap)
  p = jnp.where(visible, jax.nn.softmax(jnp.where(visible, logits, -1e30), -1), 0)
  return jnp.einsum('bhqk,bkhd->bqhd', p, v)
