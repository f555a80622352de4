"""The flash attention forward for NVIDIA Hopper (sm90), in Pallas Mosaic GPU.

Triton-lowered Pallas reaches FlashAttention-2 speeds at best; Hopper's tensor cores want
TMA copies into swizzled shared memory and warpgroup MMAs (wgmma), which Mosaic GPU
exposes. `flash_attention(..., backend='mosaic_gpu')` runs this forward and the Triton
backward kernels of `flash_attention` (same logsumexp contract).

One CTA is one warpgroup (128 threads) and one block of `block_q` (64) queries of one head.
It walks the key blocks of its `BlockRanges` with K/V copied by TMA `STAGES` blocks ahead
into a ring of shared-memory slots; a slot is refilled once the wgmma that read it has
finished. Visibility needs no segment ids inside the kernel: documents are contiguous runs,
so query i sees exactly the keys in [first_i, last_i] (`_visible_spans`, computed once in
XLA); the masked blocks compare key positions against those two per-row bounds.

Interpret mode (CPU tests) runs the same kernel, TMA copies and barriers included, with
the GPU-only layout hints dropped and both products as plain dots: Pallas' Mosaic GPU
interpreter takes wgmma operands only untransposed and in shared memory.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

_LOG2_E = math.log2(math.e)
BLOCK_Q = 64  # one warpgroup's wgmma rows
BLOCK_K = 128  # default keys per block (a first guess: not yet timed on a GPU)
STAGES = 2    # K/V blocks in flight


def _visible_spans(static, segment_ids, first, last):
  """int32 `[B, L]` each: query i sees keys lo_i ..= hi_i (hi < lo for padding)."""
  length = segment_ids.shape[1]
  index = jnp.arange(length)
  lo, hi = first, index if static.causal else last
  if static.window:
    lo = jnp.maximum(lo, index - static.window + 1)
    if not static.causal:
      hi = jnp.minimum(hi, index + static.window - 1)
  padding = segment_ids == 0
  return jnp.where(padding, length, lo), jnp.where(padding, -1, hi)


def forward(static, q, k, v, segment_ids, ranges, first, last):
  """(out `[B, L, H, D]`, natural-log logsumexp `[B, H, L]`, inf where a query sees no key).

  `ranges`: the stacked key `BlockRanges` of each `BLOCK_Q` query block (`static.blocks.
  block_q` must be `BLOCK_Q`), for key blocks of `static.blocks.block_k`; `first`, `last`:
  each token's document edges.
  """
  batch, length, num_heads, head_dim = q.shape
  group = num_heads // k.shape[2]
  block_k = static.blocks.block_k
  if static.blocks.block_q != BLOCK_Q or block_k % 64:
    raise ValueError(f'the Mosaic GPU forward takes block_q={BLOCK_Q} and block_k a multiple '
                     f'of 64, not {static.blocks.block_q} and {block_k}')
  if head_dim % 64 or head_dim > 256:
    raise ValueError(f'the Mosaic GPU forward takes head_dim a multiple of 64 up to 256, '
                     f'not {head_dim}')
  if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
    raise ValueError(f'the Mosaic GPU forward takes bfloat16 or float16 q, k, v, not '
                     f'{q.dtype}, {k.dtype}, {v.dtype}')
  num_q_blocks = length // BLOCK_Q
  row_lo, row_hi = _visible_spans(static, segment_ids, first, last)
  interpret = static.interpret
  scale = static.scale * _LOG2_E  # base-2 scores: exp2 is one instruction
  dtype = q.dtype

  def row_layout(x):
    return x if interpret else plgpu.layout_cast(x, plgpu.Layout.WGMMA.reduce(1))

  def key_positions():
    shape = (BLOCK_Q, block_k)
    if interpret:
      return lax.broadcasted_iota(jnp.int32, shape, 1)
    return plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)

  def kernel(ranges_ref, row_lo_ref, row_hi_ref, q_ref, k_ref, v_ref, out_ref, lse_ref,
             q_smem, k_smem, v_smem, lo_smem, hi_smem, lse_smem, q_barriers, k_barriers,
             v_barriers):
    i = num_q_blocks - 1 - lax.axis_index('q_blocks')  # longest causal rows first
    b, h = lax.axis_index('batch'), lax.axis_index('heads')
    kv_head = lax.div(h, jnp.int32(group))
    queries = pl.ds(i * BLOCK_Q, BLOCK_Q)
    lo, full_lo, full_hi, hi = (ranges_ref[b, n, i] for n in range(4))

    def fetch(j, slot):
      keys = (b, pl.ds(j * block_k, block_k), kv_head)
      plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_barriers.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_barriers.at[slot])

    plgpu.copy_gmem_to_smem(q_ref.at[b, queries, h], q_smem, q_barriers.at[0])
    plgpu.copy_gmem_to_smem(row_lo_ref.at[b, queries], lo_smem, q_barriers.at[1])
    plgpu.copy_gmem_to_smem(row_hi_ref.at[b, queries], hi_smem, q_barriers.at[2])
    for stage in range(STAGES):
      @pl.when(lo + stage < hi)
      def _():
        fetch(lo + stage, stage)
    for n in range(3):
      plgpu.barrier_wait(q_barriers.at[n])
    row_lo_q = row_layout(lo_smem[...])
    row_hi_q = row_layout(hi_smem[...])

    def body(j, carry, masked):
      acc, m, l = carry
      slot = lax.rem(j - lo, jnp.int32(STAGES))
      plgpu.barrier_wait(k_barriers.at[slot])
      if interpret:
        s = jnp.dot(q_smem[...], k_smem[slot].T, preferred_element_type=jnp.float32)
      else:
        def qk(acc_ref):
          plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
          return acc_ref[...]
        s = pl.run_scoped(qk, plgpu.ACC((BLOCK_Q, block_k), jnp.float32))
      if masked:
        key = key_positions() + j * block_k
        visible = ((key >= lax.broadcast_in_dim(row_lo_q, s.shape, [0]))
                   & (key <= lax.broadcast_in_dim(row_hi_q, s.shape, [0])))
        s = jnp.where(visible, s * scale, -jnp.inf)
      else:  # scale > 0, so max(s) * scale is the scaled maximum
        s = s * scale
      m_new = jnp.maximum(m, s.max(axis=1))
      # A row with nothing visible yet keeps m = -inf; its exp2 arguments are then taken
      # against 0, and its masked scores (-inf) still give 0.
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      p = jnp.exp2(s - lax.broadcast_in_dim(m_safe, s.shape, [0]))
      correction = jnp.exp2(m - m_safe)
      l = l * correction + p.sum(axis=1)
      plgpu.barrier_wait(v_barriers.at[slot])

      if interpret:
        pv = jnp.dot(p.astype(dtype), v_smem[slot], preferred_element_type=jnp.float32)
      else:
        def pv_product(acc_ref):
          plgpu.wgmma(acc_ref, p.astype(dtype), v_smem.at[slot])
          return acc_ref[...]
        pv = pl.run_scoped(pv_product, plgpu.ACC((BLOCK_Q, head_dim), jnp.float32))
      acc = acc * lax.broadcast_in_dim(correction, acc.shape, [0]) + pv

      # Both wgmmas reading this slot have finished (their results were read): refill it.
      @pl.when(j + STAGES < hi)
      def _():
        fetch(j + STAGES, slot)
      return acc, m_new, l

    acc = jnp.zeros((BLOCK_Q, head_dim), jnp.float32)
    if not interpret:
      acc = plgpu.layout_cast(acc, plgpu.Layout.WGMMA)
    carry = (acc, row_layout(jnp.full((BLOCK_Q,), -jnp.inf, jnp.float32)),
             row_layout(jnp.zeros((BLOCK_Q,), jnp.float32)))
    masked = functools.partial(body, masked=True)
    carry = lax.fori_loop(lo, full_lo, masked, carry)
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
    acc, m, l = lax.fori_loop(full_hi, hi, masked, carry)

    seen = l > 0  # a query that sees no key (padding) gives zeros
    l = jnp.where(seen, l, 1.0)
    out = acc / lax.broadcast_in_dim(l, acc.shape, [0])
    q_smem[...] = jnp.where(lax.broadcast_in_dim(seen, acc.shape, [0]), out, 0.0).astype(dtype)
    lse_smem[...] = jnp.where(seen, (m + jnp.log2(l)) / _LOG2_E, jnp.inf)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, out_ref.at[b, queries, h])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, queries])
    plgpu.wait_smem_to_gmem(0)

  # 128-byte swizzled tiles of 64 elements: what wgmma reads without bank conflicts.
  transforms = () if interpret else (plgpu.TilingTransform((8, 64)),
                                     plgpu.SwizzleTransform(128))
  call = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct(q.shape, dtype),
                jax.ShapeDtypeStruct((batch, num_heads, length), jnp.float32)),
      grid=(num_q_blocks, batch, num_heads),
      grid_names=('q_blocks', 'batch', 'heads'),
      scratch_types=dict(
          q_smem=plgpu.SMEM((BLOCK_Q, head_dim), dtype, transforms=transforms),
          k_smem=plgpu.SMEM((STAGES, block_k, head_dim), dtype, transforms=transforms),
          v_smem=plgpu.SMEM((STAGES, block_k, head_dim), dtype, transforms=transforms),
          lo_smem=plgpu.SMEM((BLOCK_Q,), jnp.int32),
          hi_smem=plgpu.SMEM((BLOCK_Q,), jnp.int32),
          lse_smem=plgpu.SMEM((BLOCK_Q,), jnp.float32),
          q_barriers=plgpu.Barrier(num_barriers=3),
          k_barriers=plgpu.Barrier(num_barriers=STAGES),
          v_barriers=plgpu.Barrier(num_barriers=STAGES),
      ),
      compiler_params=plgpu.CompilerParams(approx_math=True),
      **_interpret_kwargs(interpret),
  )
  return call(ranges, row_lo, row_hi, q, k, v)


def _interpret_kwargs(interpret):
  if not interpret:
    return {}
  from jax._src.pallas.mosaic_gpu.interpret import params  # pylint: disable=g-import-not-at-top
  return {'interpret': params.InterpretGPUParams()}
