"""The TPU (Mosaic) flash attention kernels: in the Pallas interpreter against float64
references, and lowered for TPU from this CPU host (which checks Mosaic's block-shape rules
and the kernels' conversion to Mosaic MLIR, not libtpu's compile)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_reference import inputs, jnp_reference, reference

from euro_lm import devices
from euro_lm.kernels import TPU_BLOCK_SIZES, BlockSizes, flash_attention, tpu_block_sizes
from euro_lm.kernels.flash import mosaic_tpu
from euro_lm.kernels.flash.blocks import Static, key_ranges, query_ranges
from euro_lm.model.attention import attention

BLOCKS = BlockSizes(block_q=128, block_k=128, block_q_bwd=128, block_k_bwd=128)


def many_documents(length):
  """Row 0: documents of 1/4, 1/4, 25/64 and 9/64 of the row, so whole query blocks see
  only their own key block; row 1: one document with no padding."""
  sizes = [length // 4, length // 4, length * 25 // 64]
  row = np.repeat([3, 4, 5, 6], sizes + [length - sum(sizes)])
  return np.stack([row, np.full(length, 7)]).astype(np.int32)


def tpu_attention(seg, causal, window, softcap=0.0):
  return lambda q, k, v: flash_attention(
      q,
      k,
      v,
      segment_ids=jnp.asarray(seg),
      causal=causal,
      window=window,
      softcap=softcap,
      block_sizes=BLOCKS,
      backend='tpu',
      interpret=True,
  )


def gradients(fn, q, k, v):
  """Gradients of <fn(q, k, v), w> for a fixed random w."""
  w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
  return jax.grad(lambda *a: jnp.sum(fn(*a).astype(w.dtype) * w), argnums=(0, 1, 2))(q, k, v)


def reference_gradients(q, k, v, seg, causal, window, softcap=0.0):
  with jax.enable_x64(True):
    return gradients(
        lambda *a: jnp_reference(*a, seg, causal, window, softcap),
        *(jnp.asarray(x, jnp.float64) for x in (q, k, v)),
    )


@pytest.mark.parametrize(
    'causal,window,heads,kv_heads,length,layout',
    [
        (True, None, 2, 2, 256, 'padded'),  # two documents, padding, a fully padded row
        (False, None, 4, 1, 512, 'many'),  # GQA group 4; documents skip blocks both ways
        (True, None, 2, 1, 512, 'many'),  # whole blocks below the diagonal run unmasked
        (True, 100, 4, 1, 512, 'padded'),  # a window: fewer key steps than key blocks
        (False, 60, 2, 2, 512, 'padded'),
    ],
)
def test_forward_and_gradients_match_float64(causal, window, heads, kv_heads, length, layout):
  q, k, v, seg = inputs(
      heads,
      kv_heads,
      128,
      jnp.float32,
      length=length,
      segment_ids=many_documents(length) if layout == 'many' else None,
  )
  fn = tpu_attention(seg, causal, window)
  out = fn(q, k, v)
  np.testing.assert_allclose(out, reference(q, k, v, seg, causal, window), atol=2e-5)
  if layout == 'padded':
    assert np.all(np.asarray(out)[1] == 0)  # the fully padded row: zeros, not NaN
  ours = gradients(fn, q, k, v)
  for a, b in zip(ours, reference_gradients(q, k, v, seg, causal, window)):
    np.testing.assert_allclose(a, b, atol=5e-5)


def test_soft_capped_scores_and_gradients_match_float64():
  """Gemma 2's score cap in the masked and whole blocks of all three kernels."""
  cap = 0.5
  q, k, v, seg = inputs(2, 1, 128, jnp.float32, length=256, segment_ids=many_documents(256))
  fn = tpu_attention(seg, True, None, cap)
  with jax.enable_x64(True):
    want = jnp_reference(*(jnp.asarray(x, jnp.float64) for x in (q, k, v)), seg, True, None, cap)
  np.testing.assert_allclose(fn(q, k, v), want, atol=2e-5)
  assert np.abs(np.asarray(want) - reference(q, k, v, seg, True, None)).max() > 0.1
  for a, b in zip(gradients(fn, q, k, v), reference_gradients(q, k, v, seg, True, None, cap)):
    np.testing.assert_allclose(a, b, atol=5e-5)


def test_bfloat16_forward_and_gradients():
  q, k, v, seg = inputs(4, 1, 128, jnp.bfloat16, length=256)
  fn = tpu_attention(seg, True, None)
  out = fn(q, k, v)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(
      np.asarray(out, np.float32), reference(q, k, v, seg, True, None), atol=3e-2
  )
  ours = gradients(fn, q, k, v)
  for a, b in zip(ours, reference_gradients(q, k, v, seg, True, None)):
    assert a.dtype == jnp.bfloat16
    a, b = np.asarray(a, np.float64), np.asarray(b)
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-2  # measured 3e-3
    np.testing.assert_allclose(a, b, atol=5e-2)


@pytest.mark.parametrize('causal', [True, False])
@pytest.mark.parametrize('window', [None, 1, 60, 200])
@pytest.mark.parametrize('block,other', [(128, 128), (256, 128), (128, 256)])
def test_grid_width_bounds_every_range(causal, window, block, other):
  # The grid walks `width` steps through each range: a range longer than that would
  # silently drop blocks. One document per row gives the longest ranges.
  static = Static(causal=causal, scale=1.0, window=window, blocks=BLOCKS, interpret=True)
  segment_ids = jnp.ones((1, 1024), jnp.int32)
  width = mosaic_tpu._range_width(static, block, other, 1024)
  longest = 0
  for ranges in (
      key_ranges(static, segment_ids, block, other),
      query_ranges(static, segment_ids, other, block),
  ):
    lo, hi = ranges.lo, ranges.hi
    longest = max(longest, int(jnp.max(hi - lo)))
    # Each step's block lies in the range; past its end the last block repeats.
    lo, hi = lo.reshape(-1), hi.reshape(-1)
    rows = jnp.arange(lo.size)
    for step in range(width):
      index = mosaic_tpu._block_index(lo, hi, rows, step)
      np.testing.assert_array_equal(index, jnp.minimum(lo + step, hi - 1))
  assert longest <= width
  if window is None:
    assert width == 1024 // other
  else:  # a window shrinks the grid to within one step of the longest range
    assert width <= longest + 1


def _lower(fn, length, dim, heads=8, kv_heads=2):
  q = jax.ShapeDtypeStruct((2, length, heads, dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, length, kv_heads, dim), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((2, length), jnp.int32)
  return jax.jit(fn).trace(q, kv, kv, seg).lower(lowering_platforms=('tpu',)).as_text()


@pytest.mark.parametrize('dim,softcap', [(64, 0.0), (128, 0.0), (128, 50.0)])
@pytest.mark.parametrize('grad', [False, True])
def test_forward_and_backward_lower_for_tpus(dim, softcap, grad):
  def forward(q, k, v, s):
    return flash_attention(
        q, k, v, segment_ids=s, window=256, softcap=softcap, interpret=False, backend='tpu'
    )

  loss = lambda *a: forward(*a).astype(jnp.float32).sum()
  text = _lower(jax.grad(loss, argnums=(0, 1, 2)) if grad else forward, 1024, dim)
  kernels = ['euro_lm_flash_forward_tpu'] + ['euro_lm_flash_dkv_tpu', 'euro_lm_flash_dq_tpu'] * grad
  assert text.count('stablehlo.custom_call @tpu_custom_call(') == len(kernels)
  for kernel in kernels:
    assert f'kernel_name = "{kernel}"' in text


def test_default_tpu_blocks_fit_the_length():
  assert TPU_BLOCK_SIZES[128].block_q == 512
  fitted = tpu_block_sizes(128, 384)
  assert (fitted.block_q, fitted.block_k, fitted.block_q_bwd, fitted.block_k_bwd) == (
      384,
      384,
      128,
      128,
  )
  assert tpu_block_sizes(128, 4096) == TPU_BLOCK_SIZES[128]
  text = _lower(
      lambda q, k, v, s: flash_attention(q, k, v, segment_ids=s, interpret=False, backend='tpu'),
      384,
      128,
  )
  assert text.count('@tpu_custom_call(') == 1


def test_blocks_tpus_cannot_take_are_refused():
  q, k, v, _ = inputs(2, 2, 128, jnp.float32, length=256)
  small = BlockSizes(block_q=128, block_k=64, block_q_bwd=128, block_k_bwd=128)
  with pytest.raises(
      ValueError,
      match=r'TPU flash attention needs block_k to be a multiple '
      r'of 128, not 64 \(sequence length 256\)',
  ):
    flash_attention(q, k, v, block_sizes=small, backend='tpu')
  q, k, v, _ = inputs(2, 2, 128, jnp.float32, length=200)
  with pytest.raises(ValueError, match='sequence length 200 is not a multiple of block_q=512'):
    flash_attention(q, k, v, backend='tpu')
  with pytest.raises(ValueError, match="unknown flash attention backend 'mps'"):
    flash_attention(q, k, v, backend='mps')


def test_auto_attention_takes_the_tpu_kernels_on_tpu(monkeypatch):
  # The resolver is told the device; the kernels, deciding whether to interpret, ask JAX.
  monkeypatch.setattr(jax, 'default_backend', lambda: 'tpu')

  def fn(q, k, v, s):
    return attention(q, k, v, segment_ids_BL=s, impl='auto', device=devices.Device('tpu'))

  assert _lower(fn, 256, 128).count('@tpu_custom_call(') == 1
  assert '@tpu_custom_call(' not in _lower(fn, 192, 128)  # no 128-multiple: xla
