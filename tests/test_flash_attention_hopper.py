"""The Hopper kernels (`backend='mosaic_gpu'`) in Pallas' Mosaic GPU interpreter against a
float64 reference, forward and gradients, and their lowering for NVIDIA GPUs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_reference import inputs, jnp_reference, reference

from euro_lm.kernels import BlockSizes, flash_attention

# Row 0: two documents, then padding that fills its last 64 queries, so one compute group
# of a two-group CTA has nothing to do while the other works. Row 1: one long document, so
# some key blocks are seen whole (the unmasked loop).
DOCUMENTS = np.array([[1] * 150 + [2] * 30 + [0] * 76, [3] * 256], np.int32)


def _relative_error(ours, theirs):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)


# block_q 128: two compute warpgroups and a producer (the default); 64: one warpgroup.
# The two-group kernel is slow to interpret (three simulated threads), so most of its
# cases run with `-m slow`.
@pytest.mark.parametrize(
    'causal,window,block_q,block_k',
    [
        (True, None, 128, 64),
        (False, None, 64, 128),
        (True, 100, 64, 128),
        (False, 100, 64, 128),
        pytest.param(False, None, 128, 64, marks=pytest.mark.slow),
        pytest.param(True, 100, 128, 64, marks=pytest.mark.slow),
        pytest.param(False, 100, 128, 128, marks=pytest.mark.slow),
    ],
)
def test_forward_matches_float64(causal, window, block_q, block_k):
  q, k, v, seg = inputs(2, 1, 64, jnp.bfloat16, length=256, segment_ids=DOCUMENTS)
  if block_q == 128:  # the slower two-group kernel takes one row (its documents and padding)
    q, k, v, seg = q[:1], k[:1], v[:1], seg[:1]
  out = flash_attention(
      q,
      k,
      v,
      segment_ids=jnp.asarray(seg),
      causal=causal,
      window=window,
      backend='mosaic_gpu',
      block_sizes=BlockSizes(block_q=block_q, block_k=block_k),
  )
  assert out.dtype == jnp.bfloat16
  expected = reference(q, k, v, seg, causal, window)
  assert _relative_error(out, expected) < 1e-2
  np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=3e-2)


@pytest.mark.parametrize(
    'block_q,bwd', [(64, 64), (64, 128), pytest.param(128, 64, marks=pytest.mark.slow)]
)
def test_padding_gives_zeros_and_gradients_match_float64(block_q, bwd):
  # inputs' default: row 0 holds two documents then padding, row 1 is all padding (with
  # blocks of 128, neither compute group of row 1's CTAs has anything to do).
  q, k, v, seg = inputs(2, 1, 128, jnp.bfloat16, length=128)
  w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.bfloat16)
  blocks = BlockSizes(block_q=block_q, block_k=64, block_q_bwd=bwd, block_k_bwd=bwd)
  attend = lambda q, k, v: flash_attention(
      q, k, v, segment_ids=jnp.asarray(seg), backend='mosaic_gpu', block_sizes=blocks
  )
  out = attend(q, k, v)
  assert np.all(np.asarray(out)[1] == 0) and np.all(np.asarray(out)[0, -8:] == 0)
  ours = jax.grad(lambda *a: jnp.sum((attend(*a) * w).astype(jnp.float32)), argnums=(0, 1, 2))(
      q, k, v
  )
  with jax.enable_x64(True):
    theirs = jax.grad(
        lambda *a: jnp.sum(jnp_reference(*a, seg, True, None) * w), argnums=(0, 1, 2)
    )(*(jnp.asarray(x, jnp.float64) for x in (q, k, v)))
  for a, b in zip(ours, theirs):
    assert _relative_error(a, b) < 2e-2


# Backward blocks of 128: the two-group kernels (two compute warpgroups of 64 keys, or 64
# queries, share the q/dO or K/V ring of a producer). With DOCUMENTS, one dK/dV CTA's second
# group has only padding keys, which no query sees, and one dQ CTA's second group only
# padding queries, which see nothing: each releases every tile unread.
@pytest.mark.parametrize(
    'causal,window,bwd',
    [
        (True, None, 64),
        (False, 100, 64),
        # The two-group kernels' default-suite case is the padding test's [64-128].
        pytest.param(True, None, 128, marks=pytest.mark.slow),
        pytest.param(False, 100, 128, marks=pytest.mark.slow),
    ],
)
def test_gradients_match_float64(causal, window, bwd):
  # GQA groups of 2: the dK/dV kernel loops over both query heads of each kv head. The
  # slower two-group kernels take row 0 alone (the row with the padded groups).
  q, k, v, seg = inputs(4, 2, 64, jnp.bfloat16, length=256, segment_ids=DOCUMENTS)
  if bwd == 128:
    q, k, v, seg = q[:1], k[:1], v[:1], seg[:1]
  w = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape), jnp.bfloat16)
  blocks = BlockSizes(block_q=64, block_k=128, block_q_bwd=bwd, block_k_bwd=bwd)
  ours = jax.grad(
      lambda *a: jnp.sum(
          (
              flash_attention(
                  *a,
                  segment_ids=jnp.asarray(seg),
                  causal=causal,
                  window=window,
                  backend='mosaic_gpu',
                  block_sizes=blocks,
              )
              * w
          ).astype(jnp.float32)
      ),
      argnums=(0, 1, 2),
  )(q, k, v)
  with jax.enable_x64(True):
    theirs = jax.grad(
        lambda *a: jnp.sum(jnp_reference(*a, seg, causal, window) * w), argnums=(0, 1, 2)
    )(*(jnp.asarray(x, jnp.float64) for x in (q, k, v)))
  for a, b in zip(ours, theirs):
    assert _relative_error(a, b) < 2e-2


# One compute warpgroup everywhere (the default suite); two, and producers (`-m slow`).
@pytest.mark.parametrize('block_q,bwd', [(64, 64), pytest.param(128, 128, marks=pytest.mark.slow)])
def test_soft_capped_scores_and_gradients_match_float64(block_q, bwd):
  """Gemma 2's cap on the scaled scores, `cap * tanh(s / cap)`, in the forward's masked and
  whole blocks and in both backward kernels, against the float64 reference; the cap is
  below the scores' size, so it changes the output."""
  cap = 0.5
  q, k, v, seg = inputs(4, 2, 64, jnp.bfloat16, length=256, segment_ids=DOCUMENTS)
  if block_q == 128:
    q, k, v, seg = q[:1], k[:1], v[:1], seg[:1]
  w = jnp.asarray(np.random.default_rng(3).standard_normal(q.shape), jnp.bfloat16)
  blocks = BlockSizes(block_q=block_q, block_k=128, block_q_bwd=bwd, block_k_bwd=bwd)
  attend = lambda *a: flash_attention(
      *a,
      segment_ids=jnp.asarray(seg),
      softcap=cap,
      backend='mosaic_gpu',
      block_sizes=blocks,
  )
  out = attend(q, k, v)
  ours = jax.grad(lambda *a: jnp.sum((attend(*a) * w).astype(jnp.float32)), argnums=(0, 1, 2))(
      q, k, v
  )
  with jax.enable_x64(True):
    ref = lambda *a, c=cap: jnp_reference(*a, seg, True, None, c)
    q64, k64, v64 = (jnp.asarray(x, jnp.float64) for x in (q, k, v))
    want = ref(q64, k64, v64)
    theirs = jax.grad(lambda *a: jnp.sum(ref(*a) * w), argnums=(0, 1, 2))(q64, k64, v64)
    assert _relative_error(ref(q64, k64, v64, c=0.0), want) > 0.1
  assert _relative_error(out, want) < 1e-2
  for a, b in zip(ours, theirs):
    assert _relative_error(a, b) < 2e-2


def test_what_the_hopper_kernels_cannot_take_is_refused():
  q, k, v, _ = inputs(2, 2, 64, jnp.float32, length=128)
  with pytest.raises(ValueError, match='bfloat16 or float16'):
    flash_attention(q, k, v, backend='mosaic_gpu')
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  with pytest.raises(ValueError, match='block_k a multiple of 64, not 64 and 32'):
    flash_attention(q, k, v, backend='mosaic_gpu', block_sizes=BlockSizes(block_k=32))
  with pytest.raises(ValueError, match='block_q 64 or 128'):
    flash_attention(q, k, v, backend='mosaic_gpu', block_sizes=BlockSizes(block_q=32))
  with pytest.raises(ValueError, match='block_q_bwd and block_k_bwd of 64 or 128, not 32'):
    jax.grad(
        lambda q: flash_attention(
            q, k, v, backend='mosaic_gpu', block_sizes=BlockSizes(block_q_bwd=32)
        )
        .astype(jnp.float32)
        .sum()
    )(q)


@pytest.mark.parametrize(
    'dim,block_q,bwd,softcap',
    [(64, 64, 64, 0.0), (128, 128, 64, 0.0), (128, 128, 128, 0.0), (64, 64, 64, 30.0)]
    + [(128, 128, 128, 30.0)],
)
def test_forward_and_backward_lower_for_hopper(dim, block_q, bwd, softcap):
  q = jax.ShapeDtypeStruct((2, 512, 8, dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 512, 2, dim), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((2, 512), jnp.int32)

  def loss(q, k, v, s):
    return (
        flash_attention(
            q,
            k,
            v,
            segment_ids=s,
            window=256,
            softcap=softcap,
            interpret=False,
            backend='mosaic_gpu',
            block_sizes=BlockSizes(block_q=block_q, block_k=128, block_q_bwd=bwd, block_k_bwd=bwd),
        )
        .astype(jnp.float32)
        .sum()
    )

  text = (
      jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
      .trace(q, kv, kv, seg)
      .lower(lowering_platforms=('cuda',))
      .as_text()
  )
  # Three Mosaic GPU kernels (forward, dK/dV, dQ) and none of the Triton ones.
  assert text.count('custom_call @mosaic_gpu') == 3
  assert 'euro_lm_flash_' not in text
