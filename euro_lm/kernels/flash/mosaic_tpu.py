"""Flash attention on TPUs: the Mosaic kernels behind `flash_attention(backend='tpu')`.

Same contract as the GPU kernels, and the same block ranges and masks (from `blocks`):
GQA without repeating K/V, packed segments (0 is padding and gives zeros), causal, sliding
window, soft-capped scores; a float32 logsumexp residual; a deterministic backward in two
kernels (dK/dV per key block summing its group's query heads, dQ per query block) with
float32 accumulation and no atomics.

Mosaic blocks need their last two dims divisible by (8, 128) or equal to the array's, so:
- q, k, v and the output are transposed by XLA to heads-major `[B, H, L, d]` /
  `[B, K, L, d]`, and each block is one head's `[b, d]` tile;
- segment ids travel twice: as a column `[B, L, 128]` (ids down the sublanes) and a row
  `[B, 8, L]` (ids along the lanes), and a score tile compares the one with the other;
- logsumexp and delta are rows `[B, H, 1, L]` (one float per query, not a 128-lane copy);
  the dK/dV kernel works on transposed scores `[bk, bq]` where they broadcast as they are.

Block skipping: the per-block `BlockRanges` of `blocks.key_ranges` / `blocks.query_ranges`
are scalar-prefetched into SMEM. The innermost grid axis counts steps j = 0 .. width - 1
through a range, and the index map asks for block min(lo + j, hi - 1): past the end of the
range the block index repeats, so the pipeline issues no copy, and `pl.when(lo + j < hi)`
skips the compute. `width` is a static bound on a range's length:
all blocks in general, a few with a sliding window. A block in [full_lo, full_hi) is seen
whole and runs the unmasked branch; only blocks straddling an edge build a mask.

Status: tests/test_flash_attention_tpu.py checks these kernels numerically in the Pallas
interpreter on CPU and lowers them for TPU from a CPU host. That lowering stops at Mosaic
MLIR: Mosaic's layout passes run in libtpu at compile time, so compiling (and the speed)
on a real TPU is not yet verified, and `TPU_BLOCK_SIZES` is untuned.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from euro_lm import softcap as softcap_lib
from euro_lm.kernels.flash import blocks

_LANES = 128
_SUBLANES = 8


def forward(static, q, k, v, segment_ids):
  """(out `[B, L, H, d]`, the residuals `backward` takes): q `[B, L, H, d]`, k/v
  `[B, L, K, d]`, int32 segment ids `[B, L]` or None; `static.blocks` already checked."""
  q_BHLd, k_BKLd, v_BKLd = _heads_major(q), _heads_major(k), _heads_major(v)
  out_BHLd, lse_BH1L = _forward(static, q_BHLd, k_BKLd, v_BKLd, segment_ids)
  out = _heads_major(out_BHLd)
  # Heads-major q/k/v are kept so the backward needs no transposes of them.
  return out, (q_BHLd, k_BKLd, v_BKLd, segment_ids, out, lse_BH1L)


def backward(static, residuals, d_out):
  """(dq, dk, dv) from `forward`'s residuals and the output's cotangent."""
  dq, dk, dv = _backward(static, *residuals, d_out)
  return _heads_major(dq), _heads_major(dk), _heads_major(dv)


# --- layouts and ranges ------------------------------------------------------------------


def _heads_major(x_BLHd):
  return jnp.swapaxes(x_BLHd, 1, 2)


def _segment_layouts(segment_ids_BL):
  """Column `[B, L, 128]` and row `[B, 8, L]` copies of the ids: Mosaic cannot block a
  `[B, L]` array by sequence (its second-minor dim would be a squeezed 1)."""
  batch, length = segment_ids_BL.shape
  column = lax.broadcast_in_dim(segment_ids_BL, (batch, length, _LANES), (0, 1))
  row = lax.broadcast_in_dim(segment_ids_BL, (batch, _SUBLANES, length), (0, 2))
  return column, row


def _range_width(static, block, other_block, length):
  """Static bound on how many `other_block` blocks one `block` block meets."""
  before, after = blocks.reach(static)
  num_other = length // other_block
  if before is None or after is None:
    return num_other
  span = block + before + after  # tokens a block can meet
  return min(num_other, (span + other_block - 2) // other_block + 1)


def _kv_head(h, group):
  return lax.div(h, group)  # jnp's // lowers through sign(), which Mosaic lowers per chip


def _block_index(lo_ref, hi_ref, row, step):
  """Block `step` of range `row`, held at the range's last block past its end."""
  lo, hi = lo_ref[row], hi_ref[row]
  return lo + jnp.minimum(step, jnp.maximum(hi - lo - 1, 0))


def _flat_ranges(ranges):
  """`BlockRanges` as four flat int32 arrays (row b * num_blocks + i) for SMEM."""
  return tuple(x.reshape(-1) for x in ranges)


def _step(ranges_refs, row, step, body):
  """Runs `body(other_block, masked)` for step `step` of range `row`, if in the range:
  unmasked when that block is seen whole."""
  lo_ref, full_lo_ref, full_hi_ref, hi_ref = ranges_refs
  other = lo_ref[row] + step
  whole = (other >= full_lo_ref[row]) & (other < full_hi_ref[row])
  in_range = other < hi_ref[row]
  pl.when(in_range & whole)(functools.partial(body, other, masked=False))
  pl.when(in_range & ~whole)(functools.partial(body, other, masked=True))


def _widen(x, n):
  """`[rows, 128]` with equal lanes (a per-row scalar) -> `[rows, n]`."""
  if n == x.shape[1]:
    return x
  reps = -(-n // _LANES)
  return (jnp.tile(x, (1, reps)) if reps > 1 else x)[:, :n]


def _score_mask(static, shape, queries_down, q_start, k_start, column_segments, row_segments):
  """Visibility of a score tile: `[bq, bk]` (queries down the sublanes) or its transpose.

  `column_segments` `[rows, 128]` holds the ids of the tile's rows, `row_segments`
  `[1, cols]` those of its columns.
  """
  q_axis = 0 if queries_down else 1
  q_index = q_start + lax.broadcasted_iota(jnp.int32, shape, q_axis)
  k_index = k_start + lax.broadcasted_iota(jnp.int32, shape, 1 - q_axis)
  down = _widen(column_segments, shape[1])
  across = jnp.broadcast_to(row_segments, shape)
  q_segments, k_segments = (down, across) if queries_down else (across, down)
  return blocks.visibility(static, q_index, k_index, q_segments, k_segments)


def _params(*semantics):
  return pltpu.CompilerParams(dimension_semantics=semantics)


# --- forward -----------------------------------------------------------------------------


def _forward_kernel(
    lo_ref,
    full_lo_ref,
    full_hi_ref,
    hi_ref,
    q_ref,
    k_ref,
    v_ref,
    seg_q_ref,
    seg_k_ref,
    o_ref,
    lse_ref,
    m_ref,
    l_ref,
    acc_ref,
    *,
    static,
    num_q_blocks,
    width,
):
  block_q, block_k = static.blocks.block_q, static.blocks.block_k
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  ranges_refs = (lo_ref, full_lo_ref, full_hi_ref, hi_ref)

  @pl.when(j == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, blocks.MASKED, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def body(key_block, masked):
    s = softcap_lib.scaled(
        blocks.dot(q_ref[...], k_ref[...], trans_b=True), static.scale, static.softcap
    )
    if masked:  # s: [bq, bk]
      visible = _score_mask(
          static, s.shape, True, i * block_q, key_block * block_k, seg_q_ref[...], seg_k_ref[:1, :]
      )
      s = jnp.where(visible, s, blocks.MASKED)
    m_prev = m_ref[...]  # [bq, 128], lanes equal
    m_next = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
    p = jnp.exp(s - _widen(m_next, block_k))
    if masked:
      p = jnp.where(visible, p, 0.0)
    correction = jnp.exp(m_prev - m_next)
    l_ref[...] = correction * l_ref[...] + p.sum(axis=1, keepdims=True)
    m_ref[...] = m_next
    acc_ref[...] = acc_ref[...] * _widen(correction, acc_ref.shape[1]) + blocks.dot(
        p.astype(v_ref.dtype), v_ref[...]
    )

  _step(ranges_refs, b * num_q_blocks + i, j, body)

  @pl.when(j == width - 1)
  def _finish():
    l = l_ref[...]
    seen = l > 0  # a query that sees no key (padding) gives zeros
    inverse = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
    o_ref[...] = (acc_ref[...] * _widen(inverse, acc_ref.shape[1])).astype(o_ref.dtype)
    lse = jnp.where(seen, m_ref[...] + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
    lse_ref[...] = lse.T[:1, :]  # one [bq] row: a 128 x bq transpose per query block


def _forward(static, q_BHLd, k_BKLd, v_BKLd, segment_ids):
  """Output `[B, H, L, d]` and float32 logsumexp `[B, H, 1, L]` (inf for padding)."""
  batch, num_heads, length, head_dim = q_BHLd.shape
  group = num_heads // k_BKLd.shape[1]
  block_q, block_k = static.blocks.block_q, static.blocks.block_k
  num_q_blocks = length // block_q
  ranges = blocks.from_ids(
      segment_ids, (batch, length), lambda ids: blocks.key_ranges(static, ids, block_q, block_k)
  )
  width = _range_width(static, block_q, block_k, length)
  seg_column, seg_row = _segment_layouts(blocks.ids_or_ones(segment_ids, (batch, length)))

  def key_block(b, i, j, lo_ref, full_lo_ref, full_hi_ref, hi_ref):
    return _block_index(lo_ref, hi_ref, b * num_q_blocks + i, j)

  q_block = lambda b, h, i, j, *_: (b, h, i, 0)
  kv_spec = pl.BlockSpec(
      (None, None, block_k, head_dim),
      lambda b, h, i, j, *r: (b, _kv_head(h, group), key_block(b, i, j, *r), 0),
  )
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=4,
      grid=(batch, num_heads, num_q_blocks, width),
      in_specs=[
          pl.BlockSpec((None, None, block_q, head_dim), q_block),
          kv_spec,
          kv_spec,
          pl.BlockSpec((None, block_q, _LANES), lambda b, h, i, j, *_: (b, i, 0)),
          pl.BlockSpec(
              (None, _SUBLANES, block_k), lambda b, h, i, j, *r: (b, 0, key_block(b, i, j, *r))
          ),
      ],
      out_specs=[
          pl.BlockSpec((None, None, block_q, head_dim), q_block),
          pl.BlockSpec((None, None, 1, block_q), lambda b, h, i, j, *_: (b, h, 0, i)),
      ],
      scratch_shapes=[
          pltpu.VMEM((block_q, _LANES), jnp.float32),
          pltpu.VMEM((block_q, _LANES), jnp.float32),
          pltpu.VMEM((block_q, head_dim), jnp.float32),
      ],
  )
  return pl.pallas_call(
      functools.partial(_forward_kernel, static=static, num_q_blocks=num_q_blocks, width=width),
      grid_spec=grid_spec,
      out_shape=[
          jax.ShapeDtypeStruct(q_BHLd.shape, q_BHLd.dtype),
          jax.ShapeDtypeStruct((batch, num_heads, 1, length), jnp.float32),
      ],
      compiler_params=_params('parallel', 'parallel', 'parallel', 'arbitrary'),
      interpret=static.interpret,
      name='euro_lm_flash_forward_tpu',
  )(*_flat_ranges(ranges), q_BHLd, k_BKLd, v_BKLd, seg_column, seg_row)


# --- backward ----------------------------------------------------------------------------


def _dkv_kernel(
    lo_ref,
    full_lo_ref,
    full_hi_ref,
    hi_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    seg_q_ref,
    seg_k_ref,
    dk_ref,
    dv_ref,
    dk_acc_ref,
    dv_acc_ref,
    *,
    static,
    num_k_blocks,
    group,
    width,
):
  block_q, block_k = static.blocks.block_q_bwd, static.blocks.block_k_bwd
  b, j, g, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
  ranges_refs = (lo_ref, full_lo_ref, full_hi_ref, hi_ref)

  @pl.when((g == 0) & (i == 0))
  def _init():
    dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
    dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

  def body(query_block, masked):
    q, do = q_ref[...], do_ref[...]
    # Transposed scores [bk, bq]: the [1, bq] rows of lse and delta broadcast down them.
    s = softcap_lib.scaled(blocks.dot(k_ref[...], q, trans_b=True), static.scale, static.softcap)
    p = jnp.exp(s - lse_ref[...])
    if masked:
      p = jnp.where(
          _score_mask(
              static,
              s.shape,
              False,
              query_block * block_q,
              j * block_k,
              seg_k_ref[...],
              seg_q_ref[:1, :],
          ),
          p,
          0.0,
      )
    dv_acc_ref[...] += blocks.dot(p.astype(do.dtype), do)
    dp = blocks.dot(v_ref[...], do, trans_b=True)
    ds = softcap_lib.backward(p * (dp - delta_ref[...]), s, static.softcap) * static.scale
    dk_acc_ref[...] += blocks.dot(ds.astype(q.dtype), q)

  _step(ranges_refs, b * num_k_blocks + j, i, body)

  @pl.when((g == group - 1) & (i == width - 1))
  def _finish():
    dk_ref[...] = dk_acc_ref[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def _dq_kernel(
    lo_ref,
    full_lo_ref,
    full_hi_ref,
    hi_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    seg_q_ref,
    seg_k_ref,
    dq_ref,
    dq_acc_ref,
    *,
    static,
    num_q_blocks,
    width,
):
  block_q, block_k = static.blocks.block_q_bwd, static.blocks.block_k_bwd
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  ranges_refs = (lo_ref, full_lo_ref, full_hi_ref, hi_ref)

  @pl.when(j == 0)
  def _init():
    dq_acc_ref[...] = jnp.zeros(dq_acc_ref.shape, jnp.float32)

  def body(key_block, masked):
    k = k_ref[...]
    s = softcap_lib.scaled(blocks.dot(q_ref[...], k, trans_b=True), static.scale, static.softcap)
    # The [1, bq] rows as [bq, 1] columns (a relayout Mosaic does, as splash attention's).
    lse, delta = jnp.expand_dims(lse_ref[0], -1), jnp.expand_dims(delta_ref[0], -1)
    p = jnp.exp(s - lse)
    if masked:
      p = jnp.where(
          _score_mask(
              static,
              s.shape,
              True,
              i * block_q,
              key_block * block_k,
              seg_q_ref[...],
              seg_k_ref[:1, :],
          ),
          p,
          0.0,
      )
    dp = blocks.dot(do_ref[...], v_ref[...], trans_b=True)
    ds = softcap_lib.backward(p * (dp - delta), s, static.softcap) * static.scale
    dq_acc_ref[...] += blocks.dot(ds.astype(k.dtype), k)

  _step(ranges_refs, b * num_q_blocks + i, j, body)

  @pl.when(j == width - 1)
  def _finish():
    dq_ref[...] = dq_acc_ref[...].astype(dq_ref.dtype)


def _backward(static, q_BHLd, k_BKLd, v_BKLd, segment_ids, out_BLHd, lse_BH1L, d_out_BLHd):
  batch, num_heads, length, head_dim = q_BHLd.shape
  num_kv_heads = k_BKLd.shape[1]
  group = num_heads // num_kv_heads
  block_q, block_k = static.blocks.block_q_bwd, static.blocks.block_k_bwd
  num_q_blocks, num_k_blocks = length // block_q, length // block_k
  # delta_i = sum_d dO_id * O_id: the softmax-gradient correction, as rows [B, H, 1, L].
  delta = jnp.einsum(
      'blhd,blhd->bhl', d_out_BLHd.astype(jnp.float32), out_BLHd.astype(jnp.float32)
  )[:, :, None, :]
  lse = jnp.where(jnp.isinf(lse_BH1L), 0.0, lse_BH1L)  # padding rows: p is masked to 0
  do_BHLd = _heads_major(d_out_BLHd)
  seg_column, seg_row = _segment_layouts(blocks.ids_or_ones(segment_ids, (batch, length)))
  row_spec = lambda index_map: pl.BlockSpec((None, None, 1, block_q), index_map)

  # dK/dV: grid (B, K, key block, query head of the group, step through the query range).
  query_ranges = blocks.from_ids(
      segment_ids, (batch, length), lambda ids: blocks.query_ranges(static, ids, block_q, block_k)
  )
  q_width = _range_width(static, block_k, block_q, length)

  def query_block(b, j, i, lo_ref, full_lo_ref, full_hi_ref, hi_ref):
    return _block_index(lo_ref, hi_ref, b * num_k_blocks + j, i)

  q_spec = pl.BlockSpec(
      (None, None, block_q, head_dim),
      lambda b, h, j, g, i, *r: (b, h * group + g, query_block(b, j, i, *r), 0),
  )
  kv_spec = pl.BlockSpec((None, None, block_k, head_dim), lambda b, h, j, g, i, *_: (b, h, j, 0))
  lse_spec = row_spec(lambda b, h, j, g, i, *r: (b, h * group + g, 0, query_block(b, j, i, *r)))
  dk, dv = pl.pallas_call(
      functools.partial(
          _dkv_kernel, static=static, num_k_blocks=num_k_blocks, group=group, width=q_width
      ),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(batch, num_kv_heads, num_k_blocks, group, q_width),
          in_specs=[
              q_spec,
              kv_spec,
              kv_spec,
              q_spec,
              lse_spec,
              lse_spec,
              pl.BlockSpec(
                  (None, _SUBLANES, block_q),
                  lambda b, h, j, g, i, *r: (b, 0, query_block(b, j, i, *r)),
              ),
              pl.BlockSpec((None, block_k, _LANES), lambda b, h, j, g, i, *_: (b, j, 0)),
          ],
          out_specs=[kv_spec, kv_spec],
          scratch_shapes=[pltpu.VMEM((block_k, head_dim), jnp.float32)] * 2,
      ),
      out_shape=[
          jax.ShapeDtypeStruct(k_BKLd.shape, k_BKLd.dtype),
          jax.ShapeDtypeStruct(v_BKLd.shape, v_BKLd.dtype),
      ],
      compiler_params=_params('parallel', 'parallel', 'parallel', 'arbitrary', 'arbitrary'),
      interpret=static.interpret,
      name='euro_lm_flash_dkv_tpu',
  )(*_flat_ranges(query_ranges), q_BHLd, k_BKLd, v_BKLd, do_BHLd, lse, delta, seg_row, seg_column)

  # dQ: grid (B, H, query block, step through the key range).
  key_ranges = blocks.from_ids(
      segment_ids, (batch, length), lambda ids: blocks.key_ranges(static, ids, block_q, block_k)
  )
  k_width = _range_width(static, block_q, block_k, length)

  def key_block(b, i, j, lo_ref, full_lo_ref, full_hi_ref, hi_ref):
    return _block_index(lo_ref, hi_ref, b * num_q_blocks + i, j)

  q_spec = pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, i, j, *_: (b, h, i, 0))
  kv_spec = pl.BlockSpec(
      (None, None, block_k, head_dim),
      lambda b, h, i, j, *r: (b, _kv_head(h, group), key_block(b, i, j, *r), 0),
  )
  lse_spec = row_spec(lambda b, h, i, j, *_: (b, h, 0, i))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, static=static, num_q_blocks=num_q_blocks, width=k_width),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(batch, num_heads, num_q_blocks, k_width),
          in_specs=[
              q_spec,
              kv_spec,
              kv_spec,
              q_spec,
              lse_spec,
              lse_spec,
              pl.BlockSpec((None, block_q, _LANES), lambda b, h, i, j, *_: (b, i, 0)),
              pl.BlockSpec(
                  (None, _SUBLANES, block_k), lambda b, h, i, j, *r: (b, 0, key_block(b, i, j, *r))
              ),
          ],
          out_specs=q_spec,
          scratch_shapes=[pltpu.VMEM((block_q, head_dim), jnp.float32)],
      ),
      out_shape=jax.ShapeDtypeStruct(q_BHLd.shape, q_BHLd.dtype),
      compiler_params=_params('parallel', 'parallel', 'parallel', 'arbitrary'),
      interpret=static.interpret,
      name='euro_lm_flash_dq_tpu',
  )(*_flat_ranges(key_ranges), q_BHLd, k_BKLd, v_BKLd, do_BHLd, lse, delta, seg_column, seg_row)
  return dq, dk, dv
