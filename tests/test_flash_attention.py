"""The Pallas flash attention kernel, in interpret mode, against a float64 reference; and its
lowering for NVIDIA GPUs (Triton)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from euro_lm.kernels import BlockSizes, flash_attention

SMALL_BLOCKS = BlockSizes(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)


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


def inputs(heads, kv_heads, dim, dtype, length=64, seed=0):
  rng = np.random.default_rng(seed)
  make = lambda n: rng.standard_normal((2, length, n, dim)).astype(np.float32)
  q, k, v = make(heads), make(kv_heads), make(kv_heads)
  # Row 0: two documents then padding; row 1: fully padded.
  first, second = length * 5 // 16, length * 8 // 16
  segment_ids = np.array([[1] * first + [2] * second + [0] * (length - first - second),
                          [0] * length], np.int32)
  cast = lambda x: jnp.asarray(x, dtype)
  return cast(q), cast(k), cast(v), segment_ids


@pytest.mark.parametrize('causal,window', [(True, None), (False, None), (True, 8), (False, 8)])
@pytest.mark.parametrize('heads,kv_heads', [(2, 2), (4, 2), (8, 2), (8, 1)])
def test_forward_and_gradients_match_float64(causal, window, heads, kv_heads):
  q, k, v, seg = inputs(heads, kv_heads, 16, jnp.float32)
  out = flash_attention(q, k, v, segment_ids=jnp.asarray(seg), causal=causal, window=window,
                        block_sizes=SMALL_BLOCKS)
  np.testing.assert_allclose(out, reference(q, k, v, seg, causal, window), atol=2e-5)
  assert np.all(np.asarray(out)[1] == 0)  # the fully padded row: zeros, not NaN

  # Gradients of <out, w>: a plain-jnp reference differentiated by JAX in float64.
  w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
  ours = jax.grad(lambda *a: jnp.sum(flash_attention(*a, segment_ids=jnp.asarray(seg),
                                                     causal=causal, window=window,
                                                     block_sizes=SMALL_BLOCKS) * w),
                  argnums=(0, 1, 2))(q, k, v)
  with jax.enable_x64(True):
    theirs = jax.grad(lambda *a: jnp.sum(_jnp_reference(*a, seg, causal, window) * w),
                      argnums=(0, 1, 2))(*(jnp.asarray(x, jnp.float64) for x in (q, k, v)))
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(a, b, atol=5e-5)


def _jnp_reference(q, k, v, seg, causal, window):
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
  p = jnp.where(visible, jax.nn.softmax(jnp.where(visible, logits, -1e30), -1), 0)
  return jnp.einsum('bhqk,bkhd->bqhd', p, v)


@pytest.mark.parametrize('dim', [64, 128])
@pytest.mark.parametrize('dtype,atol', [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)])
def test_head_dims_and_dtypes(dim, dtype, atol):
  q, k, v, seg = inputs(4, 2, dim, dtype)
  out = flash_attention(q, k, v, segment_ids=jnp.asarray(seg), block_sizes=SMALL_BLOCKS)
  assert out.dtype == dtype
  np.testing.assert_allclose(np.asarray(out, np.float32), reference(q, k, v, seg, True, None),
                             atol=atol)


def test_lengths_that_do_not_fit_the_blocks_are_refused():
  q, k, v, _ = inputs(2, 2, 16, jnp.float32, length=40)
  with pytest.raises(ValueError, match='sequence length 40 is not a multiple of block_q=16'):
    flash_attention(q, k, v, block_sizes=SMALL_BLOCKS)


def test_model_trains_the_same_with_pallas_and_xla():
  from configs import tiny
  from euro_lm.model import Decoder
  config = tiny.get_config().model
  config.update(vocab_size=64, num_layers=1, embed_dim=32, num_heads=4, num_kv_heads=2,
                head_dim=16, mlp_dim=48)
  tokens = jax.random.randint(jax.random.key(0), (2, 64), 0, 64)
  segment_ids = jnp.asarray(np.repeat([[1, 2, 3, 4]], 16, axis=1).repeat(2, 0))
  positions = jnp.tile(jnp.arange(16), (2, 4))

  def loss_and_grads(impl):
    config.attention_impl = impl
    model = Decoder(config)
    params = model.init(jax.random.key(1), tokens)['params']
    loss = lambda p: jnp.mean(model.apply({'params': p}, tokens, segment_ids, positions) ** 2)
    return jax.value_and_grad(loss)(params)

  (xla_loss, xla_grads), (pallas_loss, pallas_grads) = loss_and_grads('xla'), loss_and_grads('pallas')
  np.testing.assert_allclose(pallas_loss, xla_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               pallas_grads, xla_grads)


@pytest.mark.parametrize('dim', [64, 128])
def test_forward_and_backward_lower_for_nvidia_gpus(dim):
  q = jax.ShapeDtypeStruct((2, 512, 8, dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 512, 2, dim), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((2, 512), jnp.int32)

  def loss(q, k, v, s):
    return flash_attention(q, k, v, segment_ids=s, window=256, interpret=False).astype(
        jnp.float32).sum()

  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, seg).lower(
      lowering_platforms=('cuda',))
  text = lowered.as_text()
  for kernel in ('euro_lm_flash_forward', 'euro_lm_flash_dkv', 'euro_lm_flash_dq'):
    assert kernel in text
