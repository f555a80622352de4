"""Flash attention in Pallas: forward and backward, GQA, packed segments, causal, window.

Layout: q `[B, L, H, d]`, k and v `[B, L, K, d]`, K dividing H (query head h reads kv head
h // (H // K); K/V are never repeated in memory). `segment_ids` `[B, L]` are contiguous
runs (as packing produces); a token attends only within its run, and segment 0 is padding
that attends nowhere, so a fully padded row gives zeros.

`flash_attention` picks a kernel set and its tiles, and its custom VJP hands the forward
and the backward to that set. Three share the contract of `blocks`: `triton` (NVIDIA/AMD
GPUs, and the Pallas interpreter on CPU), `mosaic_tpu` (TPUs) and `mosaic_gpu` (Hopper GPUs:
TMA and wgmma). Each has `forward(static, q, k, v, segment_ids) -> (out, residuals)` and
`backward(static, residuals, d_out) -> (dq, dk, dv)`.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from euro_lm import devices
from euro_lm.kernels.flash import triton
from euro_lm.kernels.flash.blocks import BlockSizes, Static

# Per head_dim, from `python -m euro_lm.bench.attention --sweep --lengths=4096` (BENCHMARKS.md):
# head_dim 128 on an H100, the forward and the backward each the best of their candidates;
# head_dim 64 is not swept yet (the first H200 sweep's pick for both). These are Hopper's
# (228 KB of shared memory per SM, which 3 stages of 128 x 128 tiles need); other GPUs
# (an A100 has 164 KB, an MI250X 64 KB of LDS) take `BlockSizes()` until swept there.
GPU_BLOCK_SIZES = {
    64: BlockSizes(
        block_q=64, block_k=64, block_q_bwd=64, block_k_bwd=64, num_warps=4, num_stages=2
    ),
    128: BlockSizes(
        block_q=128,
        block_k=128,
        block_q_bwd=64,
        block_k_bwd=64,
        num_warps=8,
        num_stages=3,
        num_warps_bwd=4,
        num_stages_bwd=2,
    ),
}

# Below this sequence length the Triton kernels beat the Hopper ones on an H100
# (BENCHMARKS.md), so `default_backend` keeps them.
HOPPER_MIN_LENGTH = 4096

TPU_BLOCK_MULTIPLE = 128  # Mosaic tiles: sequence blocks lie along the 128 vector lanes

# Untuned first guesses (no TPU has run these kernels yet): large forward tiles as splash
# attention uses, smaller backward tiles since those kernels hold more [bk, bq] temporaries.
# Unless block_sizes is given, each is lowered to the largest multiple of 128 dividing the
# sequence length, so any multiple of 128 runs.
TPU_BLOCK_SIZES = {
    64: BlockSizes(block_q=512, block_k=512, block_q_bwd=256, block_k_bwd=256),
    128: BlockSizes(block_q=512, block_k=512, block_q_bwd=256, block_k_bwd=256),
}
_TPU_DEFAULT = TPU_BLOCK_SIZES[128]
_BLOCK_FIELDS = ('block_q', 'block_k', 'block_q_bwd', 'block_k_bwd')
BACKENDS = ('gpu', 'tpu', 'mosaic_gpu')


def flash_attention(
    q,
    k,
    v,
    *,
    segment_ids=None,
    causal=True,
    scale=None,
    window=None,
    softcap=0.0,
    block_sizes=None,
    interpret=None,
    backend=None,
):
  """Attention output `[B, L, H, d]` in q's dtype; differentiable (custom VJP).

  Args:
    q, k, v: `[B, L, H, d]` and `[B, L, K, d]`.
    segment_ids: optional int `[B, L]` contiguous document ids; 0 is padding.
    causal: mask keys after the query.
    scale: logit scale, positive; default 1/sqrt(d).
    window: optional int W: a query at i sees keys in (i - W, i] (with causal) or
      [i - W + 1, i + W - 1] (without).
    softcap: > 0 soft-caps the scaled scores to `softcap * tanh(s / softcap)` (Gemma 2's
      attention logit cap); every kernel set takes it.
    block_sizes: `BlockSizes`; default from `gpu_block_sizes` or `tpu_block_sizes` by head
      dim (the TPU defaults shrunk to fit the length). 'mosaic_gpu' takes block_q 64 (one
      compute warpgroup per CTA) or 128 (two, and a producer), by default 128, with
      block_k = 128, and backward blocks of 64.
    interpret: run the kernels in the Pallas interpreter (default: on CPU).
    backend: 'gpu' (Triton kernels), 'tpu' (Mosaic kernels) or 'mosaic_gpu' (the Hopper
      kernels, bf16/f16 only); None takes `default_backend(...)`: 'tpu' on a TPU,
      'mosaic_gpu' on an NVIDIA Hopper GPU when the call fits those kernels, else 'gpu',
      so a CPU runs the Triton kernels in the interpreter. The choice is made when tracing,
      not by `lax.platform_dependent`: that would trace both kernel sets, and both would
      have to accept the shapes (TPU tiles are multiples of 128). Lowering on one machine
      for another (e.g. `.lower(lowering_platforms=('tpu',))` on a CPU host) therefore
      names the backend, with `interpret=False`.
  """
  batch, length, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  if num_heads % num_kv_heads:
    raise ValueError(f'{num_heads} query heads are not a multiple of {num_kv_heads} kv heads')
  softcap = float(softcap)
  if not softcap >= 0:
    raise ValueError(f'flash attention needs a soft cap >= 0 (0: none), not {softcap}')
  if backend is None:
    backend = default_backend(q.dtype, length, head_dim, block_sizes)
  if backend not in BACKENDS:
    raise ValueError(f'unknown flash attention backend {backend!r}; expected one of {BACKENDS}')
  if backend == 'tpu':
    blocks = block_sizes or tpu_block_sizes(head_dim, length)
  else:
    blocks = block_sizes or gpu_block_sizes(head_dim)
  if backend == 'mosaic_gpu':
    from euro_lm.kernels.flash import mosaic_gpu  # pylint: disable=g-import-not-at-top

    if not block_sizes:
      rows = mosaic_gpu.ROWS
      blocks = dataclasses.replace(
          blocks,
          block_q=mosaic_gpu.BLOCK_Q,
          block_k=mosaic_gpu.BLOCK_K,
          block_q_bwd=rows,
          block_k_bwd=rows,
      )
  for name in _BLOCK_FIELDS:
    size = getattr(blocks, name)
    if backend == 'tpu' and size % TPU_BLOCK_MULTIPLE:
      raise ValueError(
          f'TPU flash attention needs {name} to be a multiple of '
          f'{TPU_BLOCK_MULTIPLE}, not {size} (sequence length {length})'
      )
    if length % size:
      raise ValueError(
          f'sequence length {length} is not a multiple of {name}={size}; pad '
          'the sequence (with segment id 0) or pass smaller block_sizes'
      )
  if interpret is None:
    interpret = jax.default_backend() == 'cpu'
  scale = head_dim**-0.5 if scale is None else float(scale)
  if not scale > 0:
    raise ValueError(f'flash attention needs a positive logit scale, not {scale}')
  static = Static(
      causal=causal,
      scale=scale,
      window=window,
      blocks=blocks,
      interpret=interpret,
      backend=backend,
      softcap=softcap,
  )
  if segment_ids is not None:
    segment_ids = segment_ids.astype(jnp.int32)
  return _attention(static, q, k, v, segment_ids)


def gpu_block_sizes(head_dim, device=None):
  """The Triton kernels' default blocks on `device` (a `euro_lm.devices.Device`; default the
  current one): `GPU_BLOCK_SIZES` on Hopper GPUs, and in the interpreter and in lowering on a
  CPU (so that the tests check them); `BlockSizes()` on other GPUs, whose shared memory may
  not hold Hopper's tiles."""
  device = device or devices.describe()
  if device.gpu and not device.hopper:
    return BlockSizes()
  return GPU_BLOCK_SIZES.get(head_dim, BlockSizes())


def default_backend(dtype, length, head_dim, block_sizes=None, device=None):
  """The kernels `flash_attention` runs on `device` (a `euro_lm.devices.Device`; default the
  current one) when no backend is named: 'tpu' on TPUs; on an NVIDIA Hopper GPU (sm90),
  'mosaic_gpu' where its kernels take the call (bf16/f16, head_dim 64 or 128, default
  blocks, a length that is a multiple of 128) and win (from
  `HOPPER_MIN_LENGTH` tokens on, BENCHMARKS.md); else 'gpu' (Triton; interpreted on CPU)."""
  device = device or devices.describe()
  if device.platform == 'tpu':
    return 'tpu'
  if not device.hopper:
    return 'gpu'
  from euro_lm.kernels.flash import mosaic_gpu  # pylint: disable=g-import-not-at-top

  fits = (
      jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
      and head_dim in (64, 128)
      and length % mosaic_gpu.BLOCK_Q == 0
      and length % mosaic_gpu.BLOCK_K == 0
      and length >= HOPPER_MIN_LENGTH
      and block_sizes is None
  )
  return 'mosaic_gpu' if fits else 'gpu'


def tpu_block_sizes(head_dim, length):
  """The TPU kernels' default blocks: `TPU_BLOCK_SIZES`, each size shrunk to the largest
  multiple of 128 that divides `length`."""
  return _fit_tpu_blocks(TPU_BLOCK_SIZES.get(head_dim, _TPU_DEFAULT), length)


def _fit_tpu_blocks(blocks, length):
  """`blocks` with each size lowered to the largest multiple of 128 that divides `length`
  (unchanged when `length` is no multiple of 128: the caller's check then names it)."""

  def fit(size):
    for candidate in range(size - size % TPU_BLOCK_MULTIPLE, 0, -TPU_BLOCK_MULTIPLE):
      if length % candidate == 0:
        return candidate
    return size

  return dataclasses.replace(blocks, **{name: fit(getattr(blocks, name)) for name in _BLOCK_FIELDS})


def length_multiple(head_dim, backend='gpu'):
  """The sequence lengths the default block sizes take are the multiples of this."""
  if backend == 'tpu':
    return TPU_BLOCK_MULTIPLE
  if backend == 'mosaic_gpu':
    from euro_lm.kernels.flash import mosaic_gpu as hopper  # pylint: disable=g-import-not-at-top

    return math.lcm(hopper.BLOCK_Q, hopper.BLOCK_K)
  # Whichever GPU runs it: the Hopper table's sizes and the others' `BlockSizes()`.
  blocks = (GPU_BLOCK_SIZES.get(head_dim, BlockSizes()), BlockSizes())
  return math.lcm(*(getattr(b, name) for b in blocks for name in _BLOCK_FIELDS))


# --- custom VJP --------------------------------------------------------------------------


def _kernel_set(backend):
  """The module of `backend`'s kernels; the Mosaic ones are imported on first use."""
  if backend == 'tpu':
    from euro_lm.kernels.flash import mosaic_tpu  # pylint: disable=g-import-not-at-top

    return mosaic_tpu
  if backend == 'mosaic_gpu':
    from euro_lm.kernels.flash import mosaic_gpu  # pylint: disable=g-import-not-at-top

    return mosaic_gpu
  return triton


# What a remat policy may keep of any attention implementation (`jax.checkpoint_policies.
# save_only_these_names`): its output and each row's log-sum-exp, so that the backward
# needs no second forward.
OUT_NAME = 'attention_out'
LSE_NAME = 'attention_lse'


def named_residuals(out, lse):
  """`out` and `lse` tagged with `OUT_NAME` and `LSE_NAME` (a pytree of them for `lse`)."""
  return checkpoint_name(out, OUT_NAME), jax.tree.map(lambda x: checkpoint_name(x, LSE_NAME), lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(static, q, k, v, segment_ids):
  return _kernel_set(static.backend).forward(static, q, k, v, segment_ids)[0]


def _attention_fwd(static, q, k, v, segment_ids):
  out, (*inputs, _, lse) = _kernel_set(static.backend).forward(static, q, k, v, segment_ids)
  out, lse = named_residuals(out, lse)  # every kernel set's residuals end in (out, lse)
  return out, (*inputs, out, lse)


def _attention_bwd(static, residuals, d_out):
  dq, dk, dv = _kernel_set(static.backend).backward(static, residuals, d_out)
  return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)
