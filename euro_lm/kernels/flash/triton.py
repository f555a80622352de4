"""The Triton-style flash attention kernels (`backend='gpu'`): NVIDIA and AMD GPUs, and the
Pallas interpreter on CPU.

Each query block loops over the key blocks of its `BlockRanges`, masking only the blocks
that straddle an edge. The forward saves a float32 logsumexp; the backward recomputes
probabilities blockwise in two deterministic kernels (dK/dV per key block, summing its
query heads; dQ per query block), with float32 accumulation and no atomics. Softmax runs in
base 2 (exp2). Scores may be soft-capped (`Static.softcap`, Gemma 2).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from euro_lm import softcap as softcap_lib
from euro_lm.kernels.flash import blocks


def forward(static, q, k, v, segment_ids):
  """(out `[B, L, H, d]`, the residuals `backward` takes)."""
  out, lse = _forward(static, q, k, v, segment_ids)
  return out, (q, k, v, segment_ids, out, lse)


def backward(static, residuals, d_out):
  """(dq, dk, dv) from `forward`'s residuals and the output's cotangent."""
  return _backward(static, *residuals, d_out)


def _masked_and_full_loops(ranges_ref, row, body, carry):
  """Runs `body(index, carry, masked)` over row `row`'s range: masked on the blocks that
  straddle an edge ([lo, full_lo) and [full_hi, hi)), unmasked on [full_lo, full_hi)."""
  lo, full_lo, full_hi, hi = (ranges_ref[n, row] for n in range(4))
  masked = functools.partial(body, masked=True)
  carry = lax.fori_loop(lo, full_lo, masked, carry)
  carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
  return lax.fori_loop(full_hi, hi, masked, carry)


def _mask(static, q_index, k_index, q_segments, k_segments):
  """[bq, bk] visibility inside a block pair."""
  return blocks.visibility(
      static, q_index[:, None], k_index[None, :], q_segments[:, None], k_segments[None, :]
  )


# --- forward -----------------------------------------------------------------------------
#
# Grids put the sequence blocks first: Triton launches program id 0 fastest, so the blocks
# of one (batch, head) run side by side and share its K/V (or Q/dO) in L2. Query blocks go
# in reverse, so under a causal mask the longest ones start first and the short ones fill
# the tail.


def _forward_kernel(
    ranges_ref, q_ref, k_ref, v_ref, seg_q_ref, seg_k_ref, o_ref, lse_ref, *, static, num_q_blocks
):
  block_q, block_k = static.blocks.block_q, static.blocks.block_k
  i = num_q_blocks - 1 - pl.program_id(0)
  q = q_ref[...]  # [bq, d]
  q_index = i * block_q + jnp.arange(block_q)
  q_segments = seg_q_ref[...]
  head_dim = q.shape[-1]
  scale = static.scale * blocks.LOG2_E  # scores in base 2: exp2 is one instruction, exp is not
  if static.softcap:  # the cap takes natural-unit scores, so scale first; then base 2 alone
    scale = 1.0

  def body(j, carry, masked):
    acc, m, l = carry
    keys = pl.ds(j * block_k, block_k)
    s = blocks.dot(q, k_ref[keys, :], trans_b=True)
    if static.softcap:
      s = softcap_lib.scaled(s, static.scale, static.softcap) * blocks.LOG2_E
    if masked:
      visible = _mask(
          static, q_index, j * block_k + jnp.arange(block_k), q_segments, seg_k_ref[keys]
      )
      s = jnp.where(visible, s * scale, blocks.MASKED)
      m_new = jnp.maximum(m, s.max(axis=1))
      p = jnp.where(visible, jnp.exp2(s - m_new[:, None]), 0.0)
    else:  # scale > 0, so max(s) * scale is the scaled maximum
      m_new = jnp.maximum(m, s.max(axis=1) * scale)
      p = jnp.exp2(s * scale - m_new[:, None])
    correction = jnp.exp2(m - m_new)
    l = l * correction + p.sum(axis=1)
    acc = acc * correction[:, None] + blocks.dot(p.astype(v_ref.dtype), v_ref[keys, :])
    return acc, m_new, l

  init = (
      jnp.zeros((block_q, head_dim), jnp.float32),
      jnp.full((block_q,), blocks.MASKED, jnp.float32),
      jnp.zeros((block_q,), jnp.float32),
  )
  acc, m, l = _masked_and_full_loops(ranges_ref, i, body, init)
  seen = l > 0  # a query that sees no key (padding) gives zeros
  l = jnp.where(seen, l, 1.0)
  o_ref[...] = jnp.where(seen[:, None], acc / l[:, None], 0.0).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, (m + jnp.log2(l)) / blocks.LOG2_E, jnp.inf)  # natural log


def _compiler_params(static, backward=False):
  sizes = static.blocks
  if backward:
    return pltriton.CompilerParams(
        num_warps=sizes.num_warps if sizes.num_warps_bwd is None else sizes.num_warps_bwd,
        num_stages=sizes.num_stages if sizes.num_stages_bwd is None else sizes.num_stages_bwd,
    )
  return pltriton.CompilerParams(num_warps=sizes.num_warps, num_stages=sizes.num_stages)


def _forward(static, q, k, v, segment_ids):
  batch, length, num_heads, head_dim = q.shape
  group = num_heads // k.shape[2]
  block_q, block_k = static.blocks.block_q, static.blocks.block_k
  num_q_blocks = length // block_q
  ranges = blocks.from_ids(
      segment_ids,
      (batch, length),
      lambda ids: blocks.key_ranges(static, ids, block_q, block_k).stacked(),
  )
  segment_ids = blocks.ids_or_ones(segment_ids, (batch, length))
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
      out_shape=[
          jax.ShapeDtypeStruct(q.shape, q.dtype),
          jax.ShapeDtypeStruct((batch, num_heads, length), jnp.float32),
      ],
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
  """(p, capped): the probabilities, and the soft-capped scaled scores that the cap's
  gradient needs (None without a cap)."""
  s2, capped = blocks.base2_scores(static, blocks.dot(q, k, trans_b=True))
  p = jnp.exp2(s2 - lse2[:, None])
  return (p if visible is None else jnp.where(visible, p, 0.0)), capped


def _dkv_kernel(
    ranges_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse2_ref,
    delta_ref,
    seg_q_ref,
    seg_k_ref,
    dk_ref,
    dv_ref,
    *,
    static,
    group,
):
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
        visible = _mask(
            static, i * block_q + jnp.arange(block_q), k_index, seg_q_ref[queries], k_segments
        )
      p, capped = _probabilities(static, q, k, lse2_ref[g, queries], visible)
      dv = dv + blocks.dot(p.astype(do.dtype), do, trans_a=True)
      dp = blocks.dot(do, v, trans_b=True)
      ds = softcap_lib.backward(p * (dp - delta_ref[g, queries][:, None]), capped, static.softcap)
      dk = dk + blocks.dot(ds.astype(q.dtype), q, trans_a=True)
      return dk, dv

    return _masked_and_full_loops(ranges_ref, j, body, carry)

  zeros = jnp.zeros((block_k, head_dim), jnp.float32)
  dk, dv = lax.fori_loop(0, group, head_body, (zeros, zeros))
  dk_ref[...] = (dk * static.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(
    ranges_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse2_ref,
    delta_ref,
    seg_q_ref,
    seg_k_ref,
    dq_ref,
    *,
    static,
    num_q_blocks,
):
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
      visible = _mask(
          static, q_index, j * block_k + jnp.arange(block_k), q_segments, seg_k_ref[keys]
      )
    p, capped = _probabilities(static, q, k, lse2, visible)
    dp = blocks.dot(do, v_ref[keys, :], trans_b=True)
    ds = softcap_lib.backward(p * (dp - delta[:, None]), capped, static.softcap)
    return dq + blocks.dot(ds.astype(k.dtype), k)

  dq = _masked_and_full_loops(ranges_ref, i, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * static.scale).astype(dq_ref.dtype)


def _backward(static, q, k, v, segment_ids, out, lse, d_out):
  batch, length, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  group = num_heads // num_kv_heads
  block_q, block_k = static.blocks.block_q_bwd, static.blocks.block_k_bwd
  num_q_blocks, num_k_blocks = length // block_q, length // block_k
  delta = blocks.softmax_delta(out, d_out)
  # Padding rows (lse = inf) have p masked to 0 anyway; 0 keeps exp2 finite there.
  lse2 = jnp.where(jnp.isinf(lse), 0.0, lse * blocks.LOG2_E)
  params = dict(compiler_params=_compiler_params(static, backward=True), interpret=static.interpret)

  query_ranges = blocks.from_ids(
      segment_ids,
      (batch, length),
      lambda ids: blocks.query_ranges(static, ids, block_q, block_k).stacked(),
  )
  key_ranges = blocks.from_ids(
      segment_ids,
      (batch, length),
      lambda ids: blocks.key_ranges(static, ids, block_q, block_k).stacked(),
  )
  segment_ids = blocks.ids_or_ones(segment_ids, (batch, length))
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
      name='euro_lm_flash_dkv',
      **params,
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
      name='euro_lm_flash_dq',
      **params,
  )(key_ranges, q, k, v, d_out, lse2, delta, segment_ids, segment_ids)
  return dq, dk, dv
