"""Flash attention in Pallas: forward and backward, GQA, packed segments, causal, window.

Layout: q `[B, L, H, D]`, k and v `[B, L, K, D]`, K dividing H (query head h reads kv head
h // (H // K); K/V are never repeated in memory). `segment_ids` `[B, L]` are contiguous
runs (as packing produces); a token attends only within its run, and segment 0 is padding
that attends nowhere, so a fully padded row gives zeros.

Work is skipped, not masked: for each query block the kernels loop only over the key
blocks that the causal diagonal, the window and the query block's documents can reach
(`BlockRanges`, computed once per call from the segment ids), and apply the mask only to
the blocks in that range that straddle an edge; blocks seen whole run unmasked.
The forward saves a float32 logsumexp; the backward recomputes probabilities blockwise in
two deterministic kernels (dK/dV per key block, summing its query heads; dQ per query
block), with float32 accumulation and no atomics. Softmax runs in base 2 (exp2).

Two kernel sets share this contract: the Triton-style kernels here (NVIDIA/AMD GPUs, and the
Pallas interpreter on CPU) and the Mosaic kernels in `flash_attention_tpu` (TPUs), picked by
`flash_attention(..., backend=...)`. A third set, 'mosaic_gpu', is written for Hopper GPUs
(`flash_attention_hopper`: TMA and wgmma, in Pallas Mosaic GPU).
"""

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from euro_lm import devices

_MASKED = -1e30  # finite: exp(_MASKED - m) underflows to 0 without inf - inf = NaN
_LOG2_E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes: queries and keys per block, forward and backward.

  `num_warps`/`num_stages` (Triton only) apply to the forward kernel, and to the backward
  kernels unless `num_warps_bwd`/`num_stages_bwd` are given. The TPU kernels read only the
  block sizes, which there must be multiples of 128.
  """
  block_q: int = 64
  block_k: int = 64
  block_q_bwd: int = 64
  block_k_bwd: int = 64
  num_warps: int = 4
  num_stages: int = 2
  num_warps_bwd: int | None = None
  num_stages_bwd: int | None = None


# Per head_dim, from `python -m euro_lm.bench.attention --sweep --lengths=4096` (BENCHMARKS.md):
# head_dim 128 on an H100, the forward and the backward each the best of their candidates;
# head_dim 64 is not swept yet (the first H200 sweep's pick for both). These are Hopper's
# (228 KB of shared memory per SM, which 3 stages of 128 x 128 tiles need); other GPUs
# (an A100 has 164 KB, an MI250X 64 KB of LDS) take `BlockSizes()` until swept there.
GPU_BLOCK_SIZES = {
    64: BlockSizes(block_q=64, block_k=64, block_q_bwd=64, block_k_bwd=64, num_warps=4,
                   num_stages=2),
    128: BlockSizes(block_q=128, block_k=128, block_q_bwd=64, block_k_bwd=64, num_warps=8,
                    num_stages=3, num_warps_bwd=4, num_stages_bwd=2),
}

# Below this sequence length the Triton kernels beat the Hopper ones on an H100 (2k: 252
# against 230 TFLOP/s forward+backward; 4k: 295 against 343), so `default_backend` keeps them.
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


def flash_attention(q, k, v, *, segment_ids=None, causal=True, scale=None, window=None,
                    block_sizes=None, interpret=None, backend=None):
  """Attention output `[B, L, H, D]` in q's dtype; differentiable (custom VJP).

  Args:
    q, k, v: `[B, L, H, D]` and `[B, L, K, D]`.
    segment_ids: optional int `[B, L]` contiguous document ids; 0 is padding.
    causal: mask keys after the query.
    scale: logit scale, positive; default 1/sqrt(D).
    window: optional int W: a query at i sees keys in (i - W, i] (with causal) or
      [i - W + 1, i + W - 1] (without).
    block_sizes: `BlockSizes`; default from `gpu_block_sizes` or `TPU_BLOCK_SIZES` by head
      dim (the TPU defaults shrunk to fit the length). 'mosaic_gpu' takes block_q 64 (one
      compute warpgroup per CTA) or 128 (two, and a producer), by default 128, with
      block_k = 128, and backward blocks of 64.
    interpret: run the kernels in the Pallas interpreter (default: on CPU).
    backend: 'gpu' (Triton kernels), 'tpu' (Mosaic kernels) or 'mosaic_gpu' (the Hopper
      kernels, bf16/f16 only); None takes `default_backend(...)`: 'tpu' on a TPU,
      'mosaic_gpu' on an NVIDIA Hopper GPU when the shapes fit those kernels, else 'gpu',
      so a CPU runs the Triton kernels in the interpreter. The choice is made when tracing, not by `lax.platform_dependent`:
      that would trace both kernel sets, and both would have to accept the shapes (TPU tiles
      are multiples of 128). Lowering on one machine for another (e.g.
      `.lower(lowering_platforms=('tpu',))` on a CPU host) therefore names the backend,
      with `interpret=False`.
  """
  batch, length, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  if num_heads % num_kv_heads:
    raise ValueError(f'{num_heads} query heads are not a multiple of {num_kv_heads} kv heads')
  if backend is None:
    backend = default_backend(q.dtype, length, head_dim, block_sizes)
  if backend not in BACKENDS:
    raise ValueError(f'unknown flash attention backend {backend!r}; expected one of {BACKENDS}')
  if backend == 'tpu':
    blocks = block_sizes or _fit_tpu_blocks(TPU_BLOCK_SIZES.get(head_dim, _TPU_DEFAULT), length)
  else:
    blocks = block_sizes or gpu_block_sizes(head_dim)
  if backend == 'mosaic_gpu':
    from euro_lm.kernels.flash import mosaic_gpu  # pylint: disable=g-import-not-at-top
    if not block_sizes:
      rows = mosaic_gpu.ROWS
      blocks = dataclasses.replace(blocks, block_q=mosaic_gpu.BLOCK_Q,
                                   block_k=mosaic_gpu.BLOCK_K, block_q_bwd=rows,
                                   block_k_bwd=rows)
  for name in _BLOCK_FIELDS:
    size = getattr(blocks, name)
    if backend == 'tpu' and size % TPU_BLOCK_MULTIPLE:
      raise ValueError(f'TPU flash attention needs {name} to be a multiple of '
                       f'{TPU_BLOCK_MULTIPLE}, not {size} (sequence length {length})')
    if length % size:
      raise ValueError(f'sequence length {length} is not a multiple of {name}={size}; pad '
                       'the sequence (with segment id 0) or pass smaller block_sizes')
  if interpret is None:
    interpret = jax.default_backend() == 'cpu'
  scale = head_dim ** -0.5 if scale is None else float(scale)
  if not scale > 0:
    raise ValueError(f'flash attention needs a positive logit scale, not {scale}')
  static = _Static(causal=causal, scale=scale, window=window, blocks=blocks,
                   interpret=interpret, hopper=backend == 'mosaic_gpu')
  if segment_ids is not None:
    segment_ids = segment_ids.astype(jnp.int32)
  if backend == 'tpu':
    from euro_lm.kernels.flash import mosaic_tpu  # pylint: disable=g-import-not-at-top
    return mosaic_tpu.attention(static, q, k, v, segment_ids)
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
  current one) when no backend is named: 'tpu' on TPUs; on an
  NVIDIA Hopper GPU (sm90), 'mosaic_gpu' where its kernels take the call and win (bf16/f16,
  head_dim 64 or 128, default blocks, a length that is a multiple of 128 and at least
  `HOPPER_MIN_LENGTH`): on an H100 they ran forward+backward 1.2-1.3x faster than the
  Triton kernels at 4k and 8k, and slower at 2k (BENCHMARKS.md); else 'gpu' (Triton;
  interpreted on CPU)."""
  device = device or devices.describe()
  if device.platform == 'tpu':
    return 'tpu'
  if not device.hopper:
    return 'gpu'
  from euro_lm.kernels.flash import mosaic_gpu  # pylint: disable=g-import-not-at-top
  fits = (jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim in (64, 128)
          and length % mosaic_gpu.BLOCK_Q == 0
          and length % mosaic_gpu.BLOCK_K == 0 and length >= HOPPER_MIN_LENGTH
          and block_sizes is None)
  return 'mosaic_gpu' if fits else 'gpu'


def _fit_tpu_blocks(blocks, length):
  """`blocks` with each size lowered to the largest multiple of 128 that divides `length`
  (unchanged when `length` is no multiple of 128: the caller's check then names it)."""
  def fit(size):
    for candidate in range(size - size % TPU_BLOCK_MULTIPLE, 0, -TPU_BLOCK_MULTIPLE):
      if length % candidate == 0:
        return candidate
    return size
  return dataclasses.replace(blocks, **{name: fit(getattr(blocks, name))
                                        for name in _BLOCK_FIELDS})


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


@dataclasses.dataclass(frozen=True)
class _Static:
  causal: bool
  scale: float
  window: int | None
  blocks: BlockSizes
  interpret: bool
  hopper: bool = False  # the Mosaic GPU kernels (flash_attention_hopper)


# --- block ranges ------------------------------------------------------------------------
#
# Computed from the segment ids in XLA, once per call; or, without ids (each row one
# document), in numpy while tracing, so that the compiled program holds them as constants
# instead of running dozens of small device ops per call. The functions below take either.

def _numpy_or_jnp(x):
  return np if isinstance(x, np.ndarray) else jnp


def _document_edges(segment_ids):
  """Per token: index of the first and of the last token of its (contiguous) segment."""
  xp = _numpy_or_jnp(segment_ids)
  length = segment_ids.shape[1]
  index = xp.arange(length)
  starts = xp.concatenate([xp.ones_like(segment_ids[:, :1], bool),
                           segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  ends = xp.concatenate([segment_ids[:, 1:] != segment_ids[:, :-1],
                         xp.ones_like(segment_ids[:, :1], bool)], axis=1)
  first, last = xp.where(starts, index, 0), xp.where(ends, index, length - 1)
  if xp is np:
    return (np.maximum.accumulate(first, axis=1),
            np.minimum.accumulate(last[:, ::-1], axis=1)[:, ::-1])
  return lax.cummax(first, axis=1), lax.cummin(last, axis=1, reverse=True)


class BlockRanges(NamedTuple):
  """Per block, int32 `[B, L / block]` each: the other blocks it meets are [lo, hi); those
  in [full_lo, full_hi) (a sub-range, empty as full_lo = full_hi = hi) are visible in every
  (query, key) pair, so need no mask."""
  lo: jax.Array
  full_lo: jax.Array
  full_hi: jax.Array
  hi: jax.Array

  def stacked(self):
    """One int32 `[B, 4, L / block]` array (lo, full_lo, full_hi, hi), for a kernel ref."""
    return _numpy_or_jnp(self.lo).stack(self, axis=1)


def _token_spans(segment_ids, first, last, back, ahead):
  """int32 `[B, L]` each: token i meets the tokens lo_i ..= hi_i (its document, at most
  `back` before and `ahead` after it; None: no limit); padding meets none (lo = L, hi = -1)."""
  xp = _numpy_or_jnp(segment_ids)
  length = segment_ids.shape[1]
  index = xp.arange(length)
  lo, hi = first, last
  if back is not None:
    lo = xp.maximum(lo, index - back)
  if ahead is not None:
    hi = xp.minimum(hi, index + ahead)
  real = segment_ids != 0
  return (xp.where(real, lo, length).astype(np.int32),
          xp.where(real, hi, -1).astype(np.int32))


def _block_ranges(segment_ids, block, other_block, back, ahead):
  """`BlockRanges` of the `other_block` blocks each block of `block` tokens meets.

  A token meets tokens of its own document, at most `back` positions before it and
  `ahead` after it (None: no limit). Documents are contiguous runs of equal ids; id 0 is
  padding, which sees nothing, so no block holding padding is fully visible.
  """
  xp = _numpy_or_jnp(segment_ids)
  batch, length = segment_ids.shape
  first, last = _document_edges(segment_ids)
  # Any pair visible: per block, from the lowest start to the highest end of its tokens'
  # spans.
  lo_token, hi_token = _token_spans(segment_ids, first, last, back, ahead)
  lo_token = lo_token.reshape(batch, -1, block).min(axis=2)
  hi_token = hi_token.reshape(batch, -1, block).max(axis=2)
  lo = lo_token // other_block
  hi = xp.maximum((hi_token + other_block) // other_block, lo)  # floor(hi / ob) + 1
  # Every pair visible: this block lies in one real document, and the other block lies in
  # it too, no more than `back` before this block's end nor `ahead` after its start.
  start = xp.arange(0, length, block)
  end = start + block - 1
  one_document = (first[:, start] == first[:, end]) & (segment_ids[:, start] != 0)
  full_lo_token, full_hi_token = first[:, start], last[:, start]
  if back is not None:
    full_lo_token = xp.maximum(full_lo_token, end - back)
  if ahead is not None:
    full_hi_token = xp.minimum(full_hi_token, start + ahead)
  full_lo = xp.clip(-(-full_lo_token // other_block), lo, hi)
  full_hi = xp.clip((full_hi_token + 1) // other_block, lo, hi)
  empty = ~one_document | (full_hi <= full_lo)
  full_lo, full_hi = xp.where(empty, hi, full_lo), xp.where(empty, hi, full_hi)
  return BlockRanges(*(x.astype(np.int32) for x in (lo, full_lo, full_hi, hi)))


def _ids_or_ones(segment_ids, shape):
  """The segment ids, or ones (each row one document) where there are none."""
  return jnp.ones(shape, jnp.int32) if segment_ids is None else segment_ids


def _from_ids(segment_ids, shape, make):
  """`make(ids)`: block ranges or spans from the segment ids, or from numpy ones (constants
  of the program) where there are none."""
  return make(np.ones(shape, np.int32) if segment_ids is None else segment_ids)


def _reach(static):
  """(before, after): how far back and ahead a query sees keys (None: no limit)."""
  reach = static.window - 1 if static.window else None
  return reach, 0 if static.causal else reach


def _key_ranges(static, segment_ids, block_q, block_k):
  """For each query block: `BlockRanges` of the key blocks it sees."""
  before, after = _reach(static)
  return _block_ranges(segment_ids, block_q, block_k, back=before, ahead=after)


def _visible_key_spans(static, segment_ids):
  """`_token_spans` of the keys each query sees: the contiguous-document form of the mask,
  which the Hopper kernels compare key positions against."""
  before, after = _reach(static)
  return _token_spans(segment_ids, *_document_edges(segment_ids), back=before, ahead=after)


def _query_ranges(static, segment_ids, block_q, block_k):
  """For each key block: `BlockRanges` of the query blocks that see it."""
  before, after = _reach(static)
  return _block_ranges(segment_ids, block_k, block_q, back=after, ahead=before)


def _masked_and_full_loops(ranges_ref, row, body, carry):
  """Runs `body(index, carry, masked)` over row `row`'s range: masked on the blocks that
  straddle an edge ([lo, full_lo) and [full_hi, hi)), unmasked on [full_lo, full_hi)."""
  lo, full_lo, full_hi, hi = (ranges_ref[n, row] for n in range(4))
  masked = functools.partial(body, masked=True)
  carry = lax.fori_loop(lo, full_lo, masked, carry)
  carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
  return lax.fori_loop(full_hi, hi, masked, carry)


def _dot(a, b, trans_a=False, trans_b=False):
  """a @ b (optionally transposed operands) with float32 accumulation."""
  contract = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, contract, preferred_element_type=jnp.float32)


def _visible(static, q_index, k_index, q_segments, k_segments):
  """Which (query, key) pairs attend, elementwise over broadcastable operands: [bq, 1] and
  [1, bk] here, full tiles in either orientation in the TPU kernels."""
  visible = (q_segments == k_segments) & (q_segments != 0)
  if static.causal:
    visible &= q_index >= k_index
  if static.window:
    visible &= q_index - k_index < static.window
    if not static.causal:
      visible &= k_index - q_index < static.window
  return visible


def _mask(static, q_index, k_index, q_segments, k_segments):
  """[bq, bk] visibility inside a block pair."""
  return _visible(static, q_index[:, None], k_index[None, :], q_segments[:, None],
                  k_segments[None, :])


# --- forward -----------------------------------------------------------------------------
#
# Grids put the sequence blocks first: Triton launches program id 0 fastest, so the blocks
# of one (batch, head) run side by side and share its K/V (or Q/dO) in L2. Query blocks go
# in reverse, so under a causal mask the longest ones start first and the short ones fill
# the tail.

def _forward_kernel(ranges_ref, q_ref, k_ref, v_ref, seg_q_ref, seg_k_ref, o_ref, lse_ref,
                    *, static, num_q_blocks):
  block_q, block_k = static.blocks.block_q, static.blocks.block_k
  i = num_q_blocks - 1 - pl.program_id(0)
  q = q_ref[...]                                            # [bq, D]
  q_index = i * block_q + jnp.arange(block_q)
  q_segments = seg_q_ref[...]
  head_dim = q.shape[-1]
  scale = static.scale * _LOG2_E  # scores in base 2: exp2 is one instruction, exp is not

  def body(j, carry, masked):
    acc, m, l = carry
    keys = pl.ds(j * block_k, block_k)
    s = _dot(q, k_ref[keys, :], trans_b=True)
    if masked:
      visible = _mask(static, q_index, j * block_k + jnp.arange(block_k), q_segments,
                      seg_k_ref[keys])
      s = jnp.where(visible, s * scale, _MASKED)
      m_new = jnp.maximum(m, s.max(axis=1))
      p = jnp.where(visible, jnp.exp2(s - m_new[:, None]), 0.0)
    else:  # scale > 0, so max(s) * scale is the scaled maximum
      m_new = jnp.maximum(m, s.max(axis=1) * scale)
      p = jnp.exp2(s * scale - m_new[:, None])
    correction = jnp.exp2(m - m_new)
    l = l * correction + p.sum(axis=1)
    acc = acc * correction[:, None] + _dot(p.astype(v_ref.dtype), v_ref[keys, :])
    return acc, m_new, l

  init = (jnp.zeros((block_q, head_dim), jnp.float32),
          jnp.full((block_q,), _MASKED, jnp.float32), jnp.zeros((block_q,), jnp.float32))
  acc, m, l = _masked_and_full_loops(ranges_ref, i, body, init)
  seen = l > 0  # a query that sees no key (padding) gives zeros
  l = jnp.where(seen, l, 1.0)
  o_ref[...] = jnp.where(seen[:, None], acc / l[:, None], 0.0).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, (m + jnp.log2(l)) / _LOG2_E, jnp.inf)  # natural log


def _compiler_params(static, backward=False):
  blocks = static.blocks
  if backward:
    return pltriton.CompilerParams(
        num_warps=blocks.num_warps if blocks.num_warps_bwd is None else blocks.num_warps_bwd,
        num_stages=blocks.num_stages if blocks.num_stages_bwd is None else blocks.num_stages_bwd)
  return pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def _forward(static, q, k, v, segment_ids):
  if static.hopper:
    from euro_lm.kernels.flash import mosaic_gpu  # pylint: disable=g-import-not-at-top
    ranges = _from_ids(segment_ids, q.shape[:2], lambda ids: _key_ranges(
        static, ids, mosaic_gpu.ROWS, static.blocks.block_k).stacked())
    spans = _from_ids(segment_ids, q.shape[:2], functools.partial(_visible_key_spans, static))
    return mosaic_gpu.forward(static, q, k, v, ranges, spans)
  batch, length, num_heads, head_dim = q.shape
  group = num_heads // k.shape[2]
  block_q, block_k = static.blocks.block_q, static.blocks.block_k
  num_q_blocks = length // block_q
  ranges = _from_ids(segment_ids, (batch, length),
                     lambda ids: _key_ranges(static, ids, block_q, block_k).stacked())
  segment_ids = _ids_or_ones(segment_ids, (batch, length))
  q_block = lambda i, b, h: (b, num_q_blocks - 1 - i, h, 0)
  kv_rows = lambda i, b, h: (b, 0, h // group, 0)
  out, lse = pl.pallas_call(
      functools.partial(_forward_kernel, static=static, num_q_blocks=num_q_blocks),
      grid=(num_q_blocks, batch, num_heads),
      in_specs=[
          pl.BlockSpec((None, 4, num_q_blocks), lambda i, b, h: (b, 0, 0)),
          pl.BlockSpec((None, block_q, None, head_dim), q_block),
          pl.BlockSpec((None, length, None, head_dim), kv_rows),
          pl.BlockSpec((None, length, None, head_dim), kv_rows),
          pl.BlockSpec((None, block_q), lambda i, b, h: (b, num_q_blocks - 1 - i)),
          pl.BlockSpec((None, length), lambda i, b, h: (b, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, block_q, None, head_dim), q_block),
          pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, num_q_blocks - 1 - i)),
      ],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, num_heads, length), jnp.float32)],
      compiler_params=_compiler_params(static),
      interpret=static.interpret,
      name='euro_lm_flash_forward',
  )(ranges, q, k, v, segment_ids, segment_ids)
  return out, lse


# --- backward ----------------------------------------------------------------------------
#
# Probabilities are recomputed in base 2 from the logsumexp (`lse2` = lse * log2 e), and
# the logit scale of dS is applied once to the finished dK and dQ, not per score.

def _probabilities(static, q, k, lse2, visible):
  p = jnp.exp2(_dot(q, k, trans_b=True) * (static.scale * _LOG2_E) - lse2[:, None])
  return p if visible is None else jnp.where(visible, p, 0.0)


def _dkv_kernel(ranges_ref, q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref, seg_q_ref,
                seg_k_ref, dk_ref, dv_ref, *, static, group):
  block_q, block_k = static.blocks.block_q_bwd, static.blocks.block_k_bwd
  j = pl.program_id(0)
  k = k_ref[...]
  v = v_ref[...]
  k_index = j * block_k + jnp.arange(block_k)
  k_segments = seg_k_ref[...]
  head_dim = k.shape[-1]

  def head_body(g, carry):
    def body(i, carry, masked):
      dk, dv = carry
      queries = pl.ds(i * block_q, block_q)
      q = q_ref[queries, g, :]
      do = do_ref[queries, g, :]
      visible = None
      if masked:
        visible = _mask(static, i * block_q + jnp.arange(block_q), k_index, seg_q_ref[queries],
                        k_segments)
      p = _probabilities(static, q, k, lse2_ref[g, queries], visible)
      dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
      dp = _dot(do, v, trans_b=True)
      ds = p * (dp - delta_ref[g, queries][:, None])
      dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
      return dk, dv
    return _masked_and_full_loops(ranges_ref, j, body, carry)

  zeros = jnp.zeros((block_k, head_dim), jnp.float32)
  dk, dv = lax.fori_loop(0, group, head_body, (zeros, zeros))
  dk_ref[...] = (dk * static.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(ranges_ref, q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref, seg_q_ref,
               seg_k_ref, dq_ref, *, static, num_q_blocks):
  block_q, block_k = static.blocks.block_q_bwd, static.blocks.block_k_bwd
  i = num_q_blocks - 1 - pl.program_id(0)
  q = q_ref[...]
  do = do_ref[...]
  lse2 = lse2_ref[...]
  delta = delta_ref[...]
  q_index = i * block_q + jnp.arange(block_q)
  q_segments = seg_q_ref[...]

  def body(j, dq, masked):
    keys = pl.ds(j * block_k, block_k)
    k = k_ref[keys, :]
    visible = None
    if masked:
      visible = _mask(static, q_index, j * block_k + jnp.arange(block_k), q_segments,
                      seg_k_ref[keys])
    p = _probabilities(static, q, k, lse2, visible)
    dp = _dot(do, v_ref[keys, :], trans_b=True)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k)

  dq = _masked_and_full_loops(ranges_ref, i, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * static.scale).astype(dq_ref.dtype)


def _softmax_delta(out, d_out):
  """delta_i = sum_d dO_id * O_id, float32 `[B, H, L]`: the softmax gradient's row term.

  Summed over D in the inputs' `[B, L, H]` order, then transposed. The barrier keeps XLA
  from fusing the sum into its `[B, H, L]`-ordered consumer: there each thread summed one
  row while its warp's neighbours read 4 KB apart, and on an H100 at 4k that kernel took
  0.29 ms, a tenth of the whole forward+backward (cuDNN's takes 0.09 ms)."""
  per_row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  return jnp.swapaxes(lax.optimization_barrier(per_row), 1, 2)


def _backward(static, q, k, v, segment_ids, out, lse, d_out):
  batch, length, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  group = num_heads // num_kv_heads
  block_q, block_k = static.blocks.block_q_bwd, static.blocks.block_k_bwd
  num_q_blocks, num_k_blocks = length // block_q, length // block_k
  delta = _softmax_delta(out, d_out)
  # Padding rows (lse = inf) have p masked to 0 anyway; 0 keeps exp2 finite there.
  lse2 = jnp.where(jnp.isinf(lse), 0.0, lse * _LOG2_E)
  params = dict(compiler_params=_compiler_params(static, backward=True),
                interpret=static.interpret)

  query_ranges = _from_ids(segment_ids, (batch, length),
                           lambda ids: _query_ranges(static, ids, block_q, block_k).stacked())
  key_ranges = _from_ids(segment_ids, (batch, length),
                         lambda ids: _key_ranges(static, ids, block_q, block_k).stacked())
  segment_ids = _ids_or_ones(segment_ids, (batch, length))
  all_queries = lambda j, b, h: (b, 0, h, 0)
  kv_block = lambda j, b, h: (b, j, h, 0)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, static=static, group=group),
      grid=(num_k_blocks, batch, num_kv_heads),
      in_specs=[
          pl.BlockSpec((None, 4, num_k_blocks), lambda j, b, h: (b, 0, 0)),
          pl.BlockSpec((None, length, group, head_dim), all_queries),
          pl.BlockSpec((None, block_k, None, head_dim), kv_block),
          pl.BlockSpec((None, block_k, None, head_dim), kv_block),
          pl.BlockSpec((None, length, group, head_dim), all_queries),
          pl.BlockSpec((None, group, length), lambda j, b, h: (b, h, 0)),
          pl.BlockSpec((None, group, length), lambda j, b, h: (b, h, 0)),
          pl.BlockSpec((None, length), lambda j, b, h: (b, 0)),
          pl.BlockSpec((None, block_k), lambda j, b, h: (b, j)),
      ],
      out_specs=[pl.BlockSpec((None, block_k, None, head_dim), kv_block)] * 2,
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      name='euro_lm_flash_dkv', **params,
  )(query_ranges, q, k, v, d_out, lse2, delta, segment_ids, segment_ids)

  q_block = lambda i, b, h: (b, num_q_blocks - 1 - i, h, 0)
  q_row = lambda i, b, h: (b, h, num_q_blocks - 1 - i)
  kv_rows = lambda i, b, h: (b, 0, h // group, 0)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, static=static, num_q_blocks=num_q_blocks),
      grid=(num_q_blocks, batch, num_heads),
      in_specs=[
          pl.BlockSpec((None, 4, num_q_blocks), lambda i, b, h: (b, 0, 0)),
          pl.BlockSpec((None, block_q, None, head_dim), q_block),
          pl.BlockSpec((None, length, None, head_dim), kv_rows),
          pl.BlockSpec((None, length, None, head_dim), kv_rows),
          pl.BlockSpec((None, block_q, None, head_dim), q_block),
          pl.BlockSpec((None, None, block_q), q_row),
          pl.BlockSpec((None, None, block_q), q_row),
          pl.BlockSpec((None, block_q), lambda i, b, h: (b, num_q_blocks - 1 - i)),
          pl.BlockSpec((None, length), lambda i, b, h: (b, 0)),
      ],
      out_specs=pl.BlockSpec((None, block_q, None, head_dim), q_block),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      name='euro_lm_flash_dq', **params,
  )(key_ranges, q, k, v, d_out, lse2, delta, segment_ids, segment_ids)
  return dq, dk, dv


# --- custom VJP --------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(static, q, k, v, segment_ids):
  return _forward(static, q, k, v, segment_ids)[0]


def _attention_fwd(static, q, k, v, segment_ids):
  out, lse = _forward(static, q, k, v, segment_ids)
  return out, (q, k, v, segment_ids, out, lse)


def _attention_bwd(static, residuals, d_out):
  q, k, v, segment_ids, out, lse = residuals
  if static.hopper:
    dq, dk, dv = _hopper_backward(static, q, k, v, segment_ids, out, lse, d_out)
  else:
    dq, dk, dv = _backward(static, q, k, v, segment_ids, out, lse, d_out)
  return dq, dk, dv, None


def _hopper_backward(static, q, k, v, segment_ids, out, lse, d_out):
  from euro_lm.kernels.flash import mosaic_gpu  # pylint: disable=g-import-not-at-top
  rows = mosaic_gpu.ROWS
  from_ids = functools.partial(_from_ids, segment_ids, q.shape[:2])
  return mosaic_gpu.backward(
      static, q, k, v, d_out, lse, _softmax_delta(out, d_out),
      from_ids(functools.partial(_visible_key_spans, static)),
      from_ids(lambda ids: _key_ranges(static, ids, rows, rows).stacked()),
      from_ids(lambda ids: _query_ranges(static, ids, rows, rows).stacked()))


_attention.defvjp(_attention_fwd, _attention_bwd)
