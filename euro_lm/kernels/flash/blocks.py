"""The contract every flash attention kernel set shares: tile sizes, the settings fixed when
tracing, the block ranges and the visibility rule.

Work is skipped, not masked: for each query block the kernels loop only over the key
blocks that the causal diagonal, the window and the query block's documents can reach
(`BlockRanges`, computed once per call from the segment ids), and apply the mask only to
the blocks in that range that straddle an edge; blocks seen whole run unmasked.
"""

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from euro_lm import softcap as softcap_lib

MASKED = -1e30  # finite: exp(MASKED - m) underflows to 0 without inf - inf = NaN
LOG2_E = math.log2(math.e)


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


@dataclasses.dataclass(frozen=True)
class Static:
  """What `flash_attention` fixes when tracing, and every kernel reads."""

  causal: bool
  scale: float
  window: int | None
  blocks: BlockSizes
  interpret: bool
  backend: str = 'gpu'  # the kernel set: 'gpu' (Triton), 'tpu' or 'mosaic_gpu'
  softcap: float = 0.0  # > 0: scaled scores pass through softcap * tanh(s / softcap)


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
  starts = xp.concatenate(
      [xp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
  )
  ends = xp.concatenate(
      [segment_ids[:, 1:] != segment_ids[:, :-1], xp.ones_like(segment_ids[:, :1], bool)], axis=1
  )
  first, last = xp.where(starts, index, 0), xp.where(ends, index, length - 1)
  if xp is np:
    return (
        np.maximum.accumulate(first, axis=1),
        np.minimum.accumulate(last[:, ::-1], axis=1)[:, ::-1],
    )
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
  return (xp.where(real, lo, length).astype(np.int32), xp.where(real, hi, -1).astype(np.int32))


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


def ids_or_ones(segment_ids, shape):
  """The segment ids, or ones (each row one document) where there are none."""
  return jnp.ones(shape, jnp.int32) if segment_ids is None else segment_ids


def from_ids(segment_ids, shape, make):
  """`make(ids)`: block ranges or spans from the segment ids, or from numpy ones (constants
  of the program) where there are none."""
  return make(np.ones(shape, np.int32) if segment_ids is None else segment_ids)


def reach(static):
  """(before, after): how far back and ahead a query sees keys (None: no limit)."""
  limit = static.window - 1 if static.window else None
  return limit, 0 if static.causal else limit


def key_ranges(static, segment_ids, block_q, block_k):
  """For each query block: `BlockRanges` of the key blocks it sees."""
  before, after = reach(static)
  return _block_ranges(segment_ids, block_q, block_k, back=before, ahead=after)


def visible_key_spans(static, segment_ids):
  """int32 `[B, L]` each (lo, hi): query i sees the keys lo_i ..= hi_i (padding none: lo = L,
  hi = -1). The contiguous-document form of the mask, which the Mosaic GPU kernels compare
  key positions against."""
  before, after = reach(static)
  return _token_spans(segment_ids, *_document_edges(segment_ids), back=before, ahead=after)


def query_ranges(static, segment_ids, block_q, block_k):
  """For each key block: `BlockRanges` of the query blocks that see it."""
  before, after = reach(static)
  return _block_ranges(segment_ids, block_k, block_q, back=after, ahead=before)


# --- inside the kernels ------------------------------------------------------------------


def dot(a, b, trans_a=False, trans_b=False):
  """a @ b (optionally transposed operands) with float32 accumulation."""
  contract = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, contract, preferred_element_type=jnp.float32)


def visibility(static, q_index, k_index, q_segments, k_segments):
  """Which (query, key) pairs attend, elementwise over broadcastable operands: [bq, 1] and
  [1, bk] in the Triton kernels, full tiles in either orientation in the TPU kernels."""
  visible = (q_segments == k_segments) & (q_segments != 0)
  if static.causal:
    visible &= q_index >= k_index
  if static.window:
    visible &= q_index - k_index < static.window
    if not static.causal:
      visible &= k_index - q_index < static.window
  return visible


def base2_scores(static, s):
  """(base-2 scores, capped) of raw q.k scores `s`, as the backward kernels recompute them:
  scaled, soft-capped first where `static.softcap` (the cap takes natural units), times
  log2(e) for exp2; `capped` is what the cap's gradient takes (None without a cap)."""
  if not static.softcap:
    return s * (static.scale * LOG2_E), None
  capped = softcap_lib.scaled(s, static.scale, static.softcap)
  return capped * LOG2_E, capped


def softmax_delta(out, d_out):
  """delta_i = sum_d dO_id * O_id, float32 `[B, H, L]`: the softmax gradient's row term.

  Summed over d in the inputs' `[B, L, H]` order, then transposed. The barrier keeps XLA
  from fusing the sum into its `[B, H, L]`-ordered consumer, where each thread summed one
  row while its warp's neighbours read far apart, a slow kernel (BENCHMARKS.md)."""
  per_row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  return jnp.swapaxes(lax.optimization_barrier(per_row), 1, 2)
