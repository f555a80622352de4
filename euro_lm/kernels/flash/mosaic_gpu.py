"""Flash attention kernels for NVIDIA Hopper (sm90), in Pallas Mosaic GPU.

Triton-lowered Pallas reaches FlashAttention-2 speeds at best; Hopper's tensor cores want
TMA copies into swizzled shared memory and warpgroup MMAs (wgmma), which Mosaic GPU
exposes. `flash_attention(..., backend='mosaic_gpu')` runs these: the forward below and
the two backward kernels of `backward`, with the contract of `blocks` (block ranges, a
natural-log logsumexp, zeros for padding).

Forward: each warpgroup (128 threads) owns `ROWS` = 64 queries of one head and walks the
key blocks of their `BlockRanges`: masked blocks at the edges, unmasked ones in between.
K/V arrive by TMA into a ring of `STAGES` shared-memory slots. `block_q` picks the CTA's shape:
- 64: one warpgroup, which also issues its own copies `STAGES` blocks ahead and refills a
  slot once the wgmmas that read it have finished;
- 128 (the default, FlashAttention-3's layout): two compute warpgroups share every K/V
  block, and a third, producer warpgroup with few registers issues the copies. Each
  compute warpgroup releases a slot after reading it, walking the union of the two
  ranges (blocks outside its own are released unread) so the ring stays in step. The two
  take turns on the tensor cores (FA3's ping-pong): one's softmax overlaps the other's
  wgmmas.

p·v (and every backward product that sums over blocks) accumulates in place in its wgmma
accumulator.

Soft-capped scores (Gemma 2, `Static.softcap`) pass through `cap * tanh(s / cap)` in
registers, before masking; the backward recomputes them and multiplies dS by 1 - tanh².

Visibility needs no segment ids inside the kernel: documents are contiguous runs, so
query i sees exactly the keys in [lo_i, hi_i] (`blocks.visible_key_spans`, computed once
in XLA); the masked blocks compare key positions against those two per-row bounds.

Interpret mode (CPU tests) runs the same kernel, TMA copies and barriers included, with
the GPU-only layout hints dropped and the products as plain dots (accumulated by adding):
Pallas' Mosaic GPU interpreter takes wgmma operands only untransposed and in shared memory.
The interpreter runs each warpgroup as a thread that holds one of XLA:CPU's client threads
(as many as cores) while it waits at a barrier. Under jit on a machine with few cores, a
warpgroup can then starve and the kernel hangs; `NPROC=8` in the environment, before JAX
starts, gives that pool 8 threads (`python -m euro_lm.bench.attention` sets it).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from euro_lm import softcap as softcap_lib
from euro_lm.kernels.flash import blocks

ROWS = 64  # queries per compute warpgroup: wgmma's M
BLOCK_Q = 128  # default queries per CTA: two compute warpgroups (64: one)
BLOCK_K = 128  # default keys per block (a first guess: not yet timed on a GPU)
STAGES = 2  # K/V blocks in flight


def forward(static, q, k, v, segment_ids):
  """(out `[B, L, H, d]`, the residuals `backward` takes)."""
  from_ids = functools.partial(blocks.from_ids, segment_ids, q.shape[:2])
  ranges = from_ids(
      lambda ids: blocks.key_ranges(static, ids, ROWS, static.blocks.block_k).stacked()
  )
  spans = from_ids(functools.partial(blocks.visible_key_spans, static))
  out, lse = _forward(static, q, k, v, ranges, spans)
  return out, (q, k, v, segment_ids, out, lse)


def backward(static, residuals, d_out):
  """(dq, dk, dv) from `forward`'s residuals and the output's cotangent."""
  q, k, v, segment_ids, out, lse = residuals
  from_ids = functools.partial(blocks.from_ids, segment_ids, q.shape[:2])
  delta = blocks.softmax_delta(out, d_out)
  spans = from_ids(functools.partial(blocks.visible_key_spans, static))
  key_ranges = from_ids(lambda ids: blocks.key_ranges(static, ids, ROWS, ROWS).stacked())
  query_ranges = from_ids(lambda ids: blocks.query_ranges(static, ids, ROWS, ROWS).stacked())
  setup = _BackwardSetup(static, q, k)
  stats = _query_stats(lse, delta, spans)
  dk, dv = _dkv_backward(setup, query_ranges, stats, q, k, v, d_out)
  dq = _dq_backward(setup, key_ranges, stats, q, k, v, d_out)
  return dq, dk, dv


def _forward(static, q, k, v, ranges, spans):
  """(out `[B, L, H, d]`, natural-log logsumexp `[B, H, L]`, inf where a query sees no key).

  `ranges`: the stacked key `BlockRanges` of each `ROWS`-query block, for key blocks of
  `static.blocks.block_k`; `spans`: int32 `[B, L]` (lo, hi), query i sees keys lo_i ..= hi_i.
  """
  batch, length, num_heads, head_dim = q.shape
  group = num_heads // k.shape[2]
  block_q, block_k = static.blocks.block_q, static.blocks.block_k
  if block_q not in (ROWS, 2 * ROWS) or block_k % 64:
    raise ValueError(
        f'the Mosaic GPU forward takes block_q {ROWS} or {2 * ROWS} and block_k '
        f'a multiple of 64, not {block_q} and {block_k}'
    )
  if head_dim not in (64, 128):  # the backward's float32 dK and dV must fit in registers
    raise ValueError(f'the Mosaic GPU kernels take head_dim 64 or 128, not {head_dim}')
  if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
    raise ValueError(
        f'the Mosaic GPU forward takes bfloat16 or float16 q, k, v, not '
        f'{q.dtype}, {k.dtype}, {v.dtype}'
    )
  groups = block_q // ROWS
  num_ctas = length // block_q
  row_lo, row_hi = spans
  ops = _BlockOps(static, block_k, head_dim, q.dtype)

  def load_rows(refs, b, h, i, slot, barriers):
    """Copies query block i's q and visible-key bounds into their slot; waits for them."""
    row_lo_ref, row_hi_ref, q_ref, q_smem, lo_smem, hi_smem = refs
    queries = pl.ds(i * ROWS, ROWS)
    plgpu.copy_gmem_to_smem(q_ref.at[b, queries, h], q_smem.at[slot], barriers.at[3 * slot])
    plgpu.copy_gmem_to_smem(row_lo_ref.at[b, queries], lo_smem.at[slot], barriers.at[3 * slot + 1])
    plgpu.copy_gmem_to_smem(row_hi_ref.at[b, queries], hi_smem.at[slot], barriers.at[3 * slot + 2])
    for n in range(3):
      plgpu.barrier_wait(barriers.at[3 * slot + n])
    return _rows(lo_smem[slot], static.interpret), _rows(hi_smem[slot], static.interpret)

  def store_rows(carry, out_ref, lse_ref, b, h, i, slot, q_smem, lse_smem):
    """Normalises and writes query block i's output (through its q slot) and logsumexp."""
    out, lse = ops.finish(carry)
    q_smem[slot] = out
    lse_smem[slot] = lse
    plgpu.commit_smem()
    queries = pl.ds(i * ROWS, ROWS)
    plgpu.copy_smem_to_gmem(q_smem.at[slot], out_ref.at[b, queries, h])
    plgpu.copy_smem_to_gmem(lse_smem.at[slot], lse_ref.at[b, h, queries])
    plgpu.wait_smem_to_gmem(0)

  def one_group_kernel(
      ranges_ref,
      row_lo_ref,
      row_hi_ref,
      q_ref,
      k_ref,
      v_ref,
      out_ref,
      lse_ref,
      q_smem,
      k_smem,
      v_smem,
      lo_smem,
      hi_smem,
      lse_smem,
      q_barriers,
      k_barriers,
      v_barriers,
  ):
    i = num_ctas - 1 - lax.axis_index('q_blocks')  # longest causal rows first
    b, h = lax.axis_index('batch'), lax.axis_index('heads')
    own, fetch = _start_key_ring(
        ranges_ref, b, h, i, group, block_k, (k_ref, v_ref, k_smem, v_smem, k_barriers, v_barriers)
    )
    lo, hi = own[0], own[3]
    bounds = load_rows(
        (row_lo_ref, row_hi_ref, q_ref, q_smem, lo_smem, hi_smem), b, h, i, 0, q_barriers
    )

    def step(j, carry, masked):
      slot = lax.rem(j - lo, jnp.int32(STAGES))
      plgpu.barrier_wait(k_barriers.at[slot])
      scores = ops.qk(q_smem.at[0], k_smem.at[slot])
      p, carry = ops.softmax(scores, carry, j, bounds if masked else None)
      plgpu.barrier_wait(v_barriers.at[slot])
      carry = ops.pv(p, v_smem.at[slot], carry)
      # Both wgmmas that read this slot have finished (their results were read): refill it.
      pl.when(j + STAGES < hi)(functools.partial(fetch, j + STAGES, slot))
      return carry

    carry = _walk(own, step, ops.init())
    store_rows(carry, out_ref, lse_ref, b, h, i, 0, q_smem, lse_smem)

  def two_group_kernel(
      ranges_ref,
      row_lo_ref,
      row_hi_ref,
      q_ref,
      k_ref,
      v_ref,
      out_ref,
      lse_ref,
      q_smem,
      k_smem,
      v_smem,
      lo_smem,
      hi_smem,
      lse_smem,
      q_barriers,
      k_barriers,
      v_barriers,
      k_free,
      v_free,
      turns,
  ):
    c = num_ctas - 1 - lax.axis_index('q_blocks')
    b, h = lax.axis_index('batch'), lax.axis_index('heads')
    wg = lax.axis_index('wg')
    first_step, end_step = _union_of_two(ranges_ref, b, 2 * c)
    slot_of = lambda j: lax.rem(j - first_step, jnp.int32(STAGES))

    @pl.when(wg < 2)
    def _compute():
      plgpu.set_max_registers(232, action='increase')
      i = 2 * c + wg
      own = _own_range(ranges_ref, b, i, end_step)
      bounds = load_rows(
          (row_lo_ref, row_hi_ref, q_ref, q_smem, lo_smem, hi_smem), b, h, i, wg, q_barriers
      )

      # Ping-pong (FlashAttention-3): the groups take turns on the tensor cores, so that
      # one's softmax runs while the other's wgmmas do. `take_turn` is a rendezvous of the
      # two; group 1 starts one behind, and each step holds two, skipped steps included.
      def take_turn():
        plgpu.barrier_arrive(turns)
        plgpu.barrier_wait(turns)

      def release(j, carry):  # a block outside this group's range: wait for it, pass it on
        slot = slot_of(j)
        plgpu.barrier_wait(k_barriers.at[slot])
        plgpu.barrier_arrive(k_free.at[slot])
        take_turn()
        plgpu.barrier_wait(v_barriers.at[slot])
        plgpu.barrier_arrive(v_free.at[slot])
        take_turn()
        return carry

      def step(j, carry, masked):
        slot = slot_of(j)
        plgpu.barrier_wait(k_barriers.at[slot])
        # Once q k^T is issued, the other group may issue its p v.
        scores = ops.qk(q_smem.at[wg], k_smem.at[slot], issued=take_turn)
        plgpu.barrier_arrive(k_free.at[slot])
        p, carry = ops.softmax(scores, carry, j, bounds if masked else None)
        # Finish the softmax (the rescaled acc included) before handing over the turn, so
        # that the compiler cannot sink any of it past the rendezvous, where it would
        # delay this group's p v (as JAX's Hopper attention kernel does).
        p, carry = lax.optimization_barrier((p, carry))
        plgpu.barrier_arrive(turns)  # softmax done
        plgpu.barrier_wait(v_barriers.at[slot])
        plgpu.barrier_wait(turns)  # the other group has issued its q k^T
        carry = ops.pv(p, v_smem.at[slot], carry)
        plgpu.barrier_arrive(v_free.at[slot])
        return carry

      pl.when(wg == 1)(take_turn)
      carry = lax.fori_loop(first_step, own[0], release, ops.init())
      carry = _walk(own, step, carry)
      carry = lax.fori_loop(own[3], end_step, release, carry)
      pl.when(wg == 0)(take_turn)
      store_rows(carry, out_ref, lse_ref, b, h, i, wg, q_smem, lse_smem)

    @pl.when(wg == 2)
    def _produce():
      plgpu.set_max_registers(40, action='decrease')
      fetch = functools.partial(
          _fetch,
          k_ref,
          v_ref,
          k_smem,
          v_smem,
          k_barriers,
          v_barriers,
          b,
          lax.div(h, jnp.int32(group)),
          block_k,
      )
      _stream_key_ring(fetch, first_step, end_step, k_free, v_free)

  # 128-byte swizzled tiles of 64 elements: what wgmma reads without bank conflicts.
  transforms = (
      () if static.interpret else (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  )
  dtype = q.dtype
  scratch = dict(
      q_smem=plgpu.SMEM((groups, ROWS, head_dim), dtype, transforms=transforms),
      k_smem=plgpu.SMEM((STAGES, block_k, head_dim), dtype, transforms=transforms),
      v_smem=plgpu.SMEM((STAGES, block_k, head_dim), dtype, transforms=transforms),
      lo_smem=plgpu.SMEM((groups, ROWS), jnp.int32),
      hi_smem=plgpu.SMEM((groups, ROWS), jnp.int32),
      lse_smem=plgpu.SMEM((groups, ROWS), jnp.float32),
      q_barriers=plgpu.Barrier(num_barriers=3 * groups),
      k_barriers=plgpu.Barrier(num_barriers=STAGES),
      v_barriers=plgpu.Barrier(num_barriers=STAGES),
  )
  threads = {}
  kernel = one_group_kernel
  if groups == 2:
    kernel = two_group_kernel
    scratch.update(
        k_free=plgpu.Barrier(num_arrivals=2, num_barriers=STAGES),
        v_free=plgpu.Barrier(num_arrivals=2, num_barriers=STAGES),
        turns=plgpu.Barrier(num_arrivals=2),
    )
    threads = dict(num_threads=3, thread_name='wg')
  call = plgpu.kernel(
      kernel,
      out_type=(
          jax.ShapeDtypeStruct(q.shape, dtype),
          jax.ShapeDtypeStruct((batch, num_heads, length), jnp.float32),
      ),
      grid=(num_ctas, batch, num_heads),
      grid_names=('q_blocks', 'batch', 'heads'),
      scratch_types=scratch,
      compiler_params=plgpu.CompilerParams(approx_math=True),
      **threads,
      **_interpret_kwargs(static.interpret),
  )
  return call(ranges, row_lo, row_hi, q, k, v)


def _walk(ranges_row, step, carry):
  """Runs `step(j, carry, masked)` over one range: masked edges, unmasked middle."""
  lo, full_lo, full_hi, hi = ranges_row
  carry = lax.fori_loop(lo, full_lo, functools.partial(step, masked=True), carry)
  carry = lax.fori_loop(full_lo, full_hi, functools.partial(step, masked=False), carry)
  return lax.fori_loop(full_hi, hi, functools.partial(step, masked=True), carry)


def _union_of_two(ranges_ref, b, block):
  """[first, end) of the blocks that row `block` or `block + 1` of `ranges_ref` sees: what
  a two-group CTA's producer streams, and each of its groups walks."""
  (lo0, hi0), (lo1, hi1) = ((ranges_ref[b, 0, i], ranges_ref[b, 3, i]) for i in (block, block + 1))
  empty0, empty1 = lo0 >= hi0, lo1 >= hi1
  first = jnp.where(empty0, lo1, jnp.where(empty1, lo0, jnp.minimum(lo0, lo1)))
  end = jnp.where(empty0, hi1, jnp.where(empty1, hi0, jnp.maximum(hi0, hi1)))
  return first, end


def _own_range(ranges_ref, b, i, end):
  """Row i's range [lo, full_lo, full_hi, hi] in a two-group CTA whose union ends at `end`;
  an empty one becomes [end] * 4, so its group releases every block of the union."""
  own = [ranges_ref[b, n, i] for n in range(4)]
  return [jnp.where(own[0] >= own[3], end, x) for x in own]


def _stream_key_ring(fetch, first, end, k_free, v_free):
  """A two-group CTA's producer: `fetch(j, slot, parts)` of key blocks first .. end - 1 into
  the K/V ring. Block j refills the slot of block j - STAGES once both groups have released
  it, K as soon as its slot is free, before V. The last STAGES releases are awaited too,
  with nothing to refill: every phase of a barrier is observed by each warpgroup that
  waits on it."""
  for stage in range(STAGES):
    pl.when(first + stage < end)(functools.partial(fetch, first + stage, stage))

  def refill(j, carry):
    slot = lax.rem(j - first, jnp.int32(STAGES))
    plgpu.barrier_wait(k_free.at[slot])
    pl.when(j < end)(functools.partial(fetch, j, slot, parts='k'))
    plgpu.barrier_wait(v_free.at[slot])
    pl.when(j < end)(functools.partial(fetch, j, slot, parts='v'))
    return carry

  lax.fori_loop(first + STAGES, end + STAGES, refill, None)


def _start_key_ring(ranges_ref, b, h, i, group, block_k, ring):
  """Query block i's key range [lo, full_lo, full_hi, hi] (of head h, batch row b), and
  `fetch(j, slot)` into the K/V ring `ring`, its first `STAGES` blocks already requested."""
  own = [ranges_ref[b, n, i] for n in range(4)]
  fetch = functools.partial(_fetch, *ring, b, lax.div(h, jnp.int32(group)), block_k)
  for stage in range(STAGES):
    pl.when(own[0] + stage < own[3])(functools.partial(fetch, own[0] + stage, stage))
  return own, fetch


def _fetch(
    k_ref, v_ref, k_smem, v_smem, k_barriers, v_barriers, b, kv_head, block_k, j, slot, parts='kv'
):
  """TMA-copies key block j's K and/or V (`parts`) into ring slot `slot`."""
  keys = (b, pl.ds(j * block_k, block_k), kv_head)
  if 'k' in parts:
    plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_barriers.at[slot])
  if 'v' in parts:
    plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_barriers.at[slot])


class _BlockOps:
  """What one compute warpgroup does with one key block, and its running state (acc, m, l).

  In interpret mode the layout hints are dropped and the products are plain dots.
  """

  def __init__(self, static, block_k, head_dim, dtype):
    self.interpret, self.static = static.interpret, static
    # Base-2 scores (exp2 is one instruction): the raw ones times `scale`; or, soft-capped,
    # the capped natural-unit ones times log2(e).
    self.scale = blocks.LOG2_E if static.softcap else static.scale * blocks.LOG2_E
    self.block_k, self.head_dim, self.dtype = block_k, head_dim, dtype

  def init(self):
    acc = _tile(jnp.zeros((ROWS, self.head_dim), jnp.float32), self.interpret)
    return (
        acc,
        _rows(jnp.full((ROWS,), -jnp.inf, jnp.float32), self.interpret),
        _rows(jnp.zeros((ROWS,), jnp.float32), self.interpret),
    )

  def qk(self, q_smem, k_smem, issued=lambda: None):
    """float32 `[ROWS, block_k]` scores q k^T (`issued` as for `_matmul`)."""
    return _matmul(
        q_smem, k_smem, (ROWS, self.block_k), self.interpret, transpose_b=True, issued=issued
    )

  def softmax(self, scores, carry, j, bounds):
    """Online-softmax update with key block j; masked by the rows' `bounds` unless None.
    Returns (the block's probabilities in the input dtype, (rescaled acc, m, l)).

    m is the running maximum of the scaled base-2 scores. It is taken from the raw (or
    capped) scores, as the scale is positive, so each probability costs one fused
    multiply-add and an exp2.
    """
    acc, m, l = carry
    if self.static.softcap:  # before masking: a masked score stays -inf, not -cap
      scores = softcap_lib.scaled(scores, self.static.scale, self.static.softcap)
    if bounds is not None:
      shape = (ROWS, self.block_k)
      key = _iota(shape, 1, self.interpret) + j * self.block_k
      visible = (key >= lax.broadcast_in_dim(bounds[0], shape, [0])) & (
          key <= lax.broadcast_in_dim(bounds[1], shape, [0])
      )
      scores = jnp.where(visible, scores, -jnp.inf)
    m_new = jnp.maximum(m, scores.max(axis=1) * self.scale)
    if bounds is not None:
      # A row with nothing visible yet keeps m = -inf; its exponents are then taken against
      # 0, and its masked scores (-inf) still give 0. Unmasked blocks see every key.
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    else:
      m_safe = m_new
    p = jnp.exp2(scores * self.scale - lax.broadcast_in_dim(m_safe, scores.shape, [0]))
    correction = jnp.exp2(m - m_safe)
    l = l * correction + p.sum(axis=1)
    acc = acc * lax.broadcast_in_dim(correction, acc.shape, [0])
    return p.astype(self.dtype), (acc, m_new, l)

  def pv(self, p, v_smem, carry):
    """acc += p v."""
    acc, m, l = carry
    return _matmul(p, v_smem, (ROWS, self.head_dim), self.interpret, acc=acc), m, l

  def finish(self, carry):
    """(output in the input dtype, natural-log logsumexp); zeros and inf where a query saw
    no key (padding)."""
    acc, m, l = carry
    seen = l > 0
    l = jnp.where(seen, l, 1.0)
    out = acc / lax.broadcast_in_dim(l, acc.shape, [0])
    out = jnp.where(lax.broadcast_in_dim(seen, acc.shape, [0]), out, 0.0).astype(self.dtype)
    return out, jnp.where(seen, (m + jnp.log2(l)) / blocks.LOG2_E, jnp.inf)


# --- backward ----------------------------------------------------------------------------
#
# Two kernels, `ROWS` queries by `ROWS` keys per step, float32 accumulation, no atomics:
# dK/dV per key block (looping over the query heads that read its kv head, and the query
# blocks that see it), and dQ per query block, one warpgroup each. With block_k_bwd = 128
# the dK/dV kernel takes FlashAttention-3's layout instead: two compute warpgroups of 64
# keys share each q/dO tile, streamed by a producer warpgroup (half the q/dO traffic); with
# block_q_bwd = 128 the dQ kernel does the same with two groups of 64 queries sharing each
# K/V block, as the two-group forward does.
#
# Probabilities are recomputed in base 2 from the logsumexp. Each step issues its products
# in pairs awaited once (scores and dP; then dV and dK, or dQ alone), as FlashAttention-3
# does: a wgmma awaited alone drains the tensor-core pipeline before the next can start.
# Each step's query-side operands stream through a TMA ring like the forward's K/V; the
# dK/dV kernel computes the transposed scores (keys as rows), so p^T and dS^T feed wgmma
# straight from registers.


class _BackwardSetup:
  """What the dK/dV and dQ kernels share: shapes, shared-memory tiles, compiler settings,
  and the probabilities recomputed from the logsumexp."""

  def __init__(self, static, q, k):
    sizes = static.blocks
    if sizes.block_q_bwd not in (ROWS, 2 * ROWS) or sizes.block_k_bwd not in (ROWS, 2 * ROWS):
      raise ValueError(
          f'the Mosaic GPU backward takes block_q_bwd and block_k_bwd of {ROWS} '
          f'or {2 * ROWS}, not {sizes.block_q_bwd} and {sizes.block_k_bwd}'
      )
    self.static, self.interpret, self.dtype = static, static.interpret, q.dtype
    self.batch, self.length, self.num_heads, self.head_dim = q.shape
    self.num_kv_heads = k.shape[2]
    self.group = self.num_heads // self.num_kv_heads
    self.transforms = (
        () if self.interpret else (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    )
    self.compiler = dict(
        compiler_params=plgpu.CompilerParams(approx_math=True), **_interpret_kwargs(self.interpret)
    )

  def tile(self, *shape):
    """Shared memory for `shape` `[ROWS, d]` tiles of the inputs' dtype."""
    return plgpu.SMEM((*shape, ROWS, self.head_dim), self.dtype, transforms=self.transforms)

  def zeros(self, shape):
    """float32 zeros in the layout of a wgmma result."""
    return _tile(jnp.zeros(shape, jnp.float32), self.interpret)

  def probabilities(self, scores, lse2, bounds, first_key, as_rows):
    """(p, capped): p = exp2(base-2 scores - lse2), masked by the query spans `bounds`
    unless None (keys from `first_key` on), the queries as rows (dQ) or columns (dK/dV);
    capped: the soft-capped scaled scores that the cap's gradient takes (None without a
    cap)."""
    shape = scores.shape
    per_query = lambda x: lax.broadcast_in_dim(x, shape, [0] if as_rows else [1])
    scores2, capped = blocks.base2_scores(self.static, scores)
    p = jnp.exp2(scores2 - per_query(lse2))
    if bounds is None:
      return p, capped
    # Built here, in masked steps only: kept across the loops, it would hold 32 registers.
    key = _iota(shape, 1 if as_rows else 0, self.interpret) + first_key
    visible = (key >= per_query(bounds[0])) & (key <= per_query(bounds[1]))
    return jnp.where(visible, p, 0.0), capped


def _query_stats(lse, delta, spans):
  """Per query, float32 `[B, H, 4, L]` (one `[4, ROWS]` copy per block): lse in base 2 (0 for
  padding, whose probabilities are masked anyway), delta, and the visible-key span (exact
  below 2^24)."""
  row_lo, row_hi = spans
  over_heads = lambda x: jnp.broadcast_to(x[:, None].astype(jnp.float32), lse.shape)
  return jnp.stack(
      [
          jnp.where(jnp.isinf(lse), 0.0, lse * blocks.LOG2_E),
          delta,
          over_heads(row_lo),
          over_heads(row_hi),
      ],
      axis=2,
  )


def _dkv_backward(setup, query_ranges, stats, q, k, v, d_out):
  """(dk, dv), per key block of `block_k_bwd` (64: one warpgroup; 128: two and a producer).
  `query_ranges`: for each `ROWS`-key block, the stacked `BlockRanges` of the `ROWS`-query
  blocks that see it."""
  static, interpret, dtype = setup.static, setup.interpret, setup.dtype
  batch, length, head_dim = setup.batch, setup.length, setup.head_dim
  num_kv_heads, group, compiler = setup.num_kv_heads, setup.group, setup.compiler
  tile, zeros, probabilities = setup.tile, setup.zeros, setup.probabilities

  def dkv_step(k_smem, v_smem, q_tile, do_tile, stats_tile, wait_do, first_key, masked, carry):
    """dK, dV += one (query head, query block) step's share, the keys as rows."""
    dk, dv = carry
    column = lambda n: _columns(stats_tile[n], interpret)
    bounds = (column(2).astype(jnp.int32), column(3).astype(jnp.int32)) if masked else None
    scores, dp = _wgmmas(
        [(k_smem, q_tile, True, zeros((ROWS, ROWS))), (v_smem, do_tile, True, zeros((ROWS, ROWS)))],
        interpret,
        between=wait_do,
    )
    p, capped = probabilities(scores, column(0), bounds, first_key, as_rows=False)
    ds = p * (dp - lax.broadcast_in_dim(column(1), dp.shape, [1]))
    ds = softcap_lib.backward(ds, capped, static.softcap)
    dv, dk = _wgmmas(
        [(p.astype(dtype), do_tile, False, dv), (ds.astype(dtype), q_tile, False, dk)], interpret
    )
    return dk, dv

  def store_dkv(dk, dv, k_smem, v_smem, dk_ref, dv_ref, b, keys, kv_head):
    k_smem[...] = (dk * static.scale).astype(dtype)
    v_smem[...] = dv.astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[b, keys, kv_head])
    plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[b, keys, kv_head])
    plgpu.wait_smem_to_gmem(0)

  def fetch_query_tiles(refs, b, kv_head, first, span, t, slot):
    """Step t of a dK/dV walk over (query head, query block) pairs, `span` blocks from
    `first` per head: TMA-copies its q, dO and stats tiles into ring slot `slot`."""
    q_ref, do_ref, stats_ref, q_smem, do_smem, stats_smem, q_bar, do_bar, stats_bar = refs
    g, i = lax.div(t, span), first + lax.rem(t, span)
    queries, h = pl.ds(i * ROWS, ROWS), kv_head * group + g
    plgpu.copy_gmem_to_smem(q_ref.at[b, queries, h], q_smem.at[slot], q_bar.at[slot])
    plgpu.copy_gmem_to_smem(do_ref.at[b, queries, h], do_smem.at[slot], do_bar.at[slot])
    plgpu.copy_gmem_to_smem(stats_ref.at[b, h, :, queries], stats_smem.at[slot], stats_bar.at[slot])

  def dkv_kernel(
      ranges_ref,
      stats_ref,
      q_ref,
      k_ref,
      v_ref,
      do_ref,
      dk_ref,
      dv_ref,
      k_smem,
      v_smem,
      q_smem,
      do_smem,
      stats_smem,
      kv_barriers,
      q_barriers,
      do_barriers,
      stats_barriers,
  ):
    j = lax.axis_index('k_blocks')  # under a causal mask the first keys are seen most
    b, kv_head = lax.axis_index('batch'), lax.axis_index('kv_heads')
    keys = pl.ds(j * ROWS, ROWS)
    own = [ranges_ref[b, n, j] for n in range(4)]
    blocks_seen = own[3] - own[0]
    total = group * blocks_seen  # steps: (query head, query block) pairs
    fetch = functools.partial(
        fetch_query_tiles,
        (
            q_ref,
            do_ref,
            stats_ref,
            q_smem,
            do_smem,
            stats_smem,
            q_barriers,
            do_barriers,
            stats_barriers,
        ),
        b,
        kv_head,
        own[0],
        blocks_seen,
    )

    for stage in range(STAGES):
      pl.when(stage < total)(functools.partial(fetch, stage, stage))
    plgpu.copy_gmem_to_smem(k_ref.at[b, keys, kv_head], k_smem, kv_barriers.at[0])
    plgpu.copy_gmem_to_smem(v_ref.at[b, keys, kv_head], v_smem, kv_barriers.at[1])
    plgpu.barrier_wait(kv_barriers.at[0])
    plgpu.barrier_wait(kv_barriers.at[1])

    def head(g, carry):
      def step(i, carry, masked):
        t = g * blocks_seen + i - own[0]
        slot = lax.rem(t, jnp.int32(STAGES))
        plgpu.barrier_wait(q_barriers.at[slot])
        plgpu.barrier_wait(stats_barriers.at[slot])
        carry = dkv_step(
            k_smem,
            v_smem,
            q_smem.at[slot],
            do_smem.at[slot],
            stats_smem.at[slot],
            lambda: plgpu.barrier_wait(do_barriers.at[slot]),
            j * ROWS,
            masked,
            carry,
        )
        # Every wgmma that read this slot has finished: refill it.
        pl.when(t + STAGES < total)(functools.partial(fetch, t + STAGES, slot))
        return carry

      return _walk(own, step, carry)

    dk, dv = lax.fori_loop(0, group, head, (zeros((ROWS, head_dim)), zeros((ROWS, head_dim))))
    store_dkv(dk, dv, k_smem, v_smem, dk_ref, dv_ref, b, keys, kv_head)

  def dkv_two_group_kernel(
      ranges_ref,
      stats_ref,
      q_ref,
      k_ref,
      v_ref,
      do_ref,
      dk_ref,
      dv_ref,
      k_smem,
      v_smem,
      q_smem,
      do_smem,
      stats_smem,
      kv_barriers,
      q_barriers,
      do_barriers,
      stats_barriers,
      free,
  ):
    """FlashAttention-3's backward layout: two compute warpgroups, each with its own 64
    keys, share every q/dO tile, which a producer warpgroup streams through the ring. Each
    group walks the union of the two groups' query ranges (per query head) and releases
    the tiles outside its own unread, as the two-group forward does with K/V."""
    c = lax.axis_index('k_blocks')
    b, kv_head = lax.axis_index('batch'), lax.axis_index('kv_heads')
    wg = lax.axis_index('wg')
    first, end = _union_of_two(ranges_ref, b, 2 * c)
    span = jnp.maximum(end - first, 0)
    total = group * span  # steps: (query head, query block) pairs of the union
    slot_of = lambda t: lax.rem(t, jnp.int32(STAGES))

    @pl.when(wg < 2)
    def _compute():
      plgpu.set_max_registers(232, action='increase')
      j = 2 * c + wg
      keys = pl.ds(j * ROWS, ROWS)
      own = _own_range(ranges_ref, b, j, end)
      plgpu.copy_gmem_to_smem(k_ref.at[b, keys, kv_head], k_smem.at[wg], kv_barriers.at[2 * wg])
      plgpu.copy_gmem_to_smem(v_ref.at[b, keys, kv_head], v_smem.at[wg], kv_barriers.at[2 * wg + 1])
      plgpu.barrier_wait(kv_barriers.at[2 * wg])
      plgpu.barrier_wait(kv_barriers.at[2 * wg + 1])

      def head(g, carry):
        def wait(i):
          slot = slot_of(g * span + i - first)
          plgpu.barrier_wait(q_barriers.at[slot])
          plgpu.barrier_wait(stats_barriers.at[slot])
          return slot

        def release(i, carry):  # a tile outside this group's range: observe it, pass it on
          slot = wait(i)
          plgpu.barrier_wait(do_barriers.at[slot])
          plgpu.barrier_arrive(free.at[slot])
          return carry

        def step(i, carry, masked):
          slot = wait(i)
          carry = dkv_step(
              k_smem.at[wg],
              v_smem.at[wg],
              q_smem.at[slot],
              do_smem.at[slot],
              stats_smem.at[slot],
              lambda: plgpu.barrier_wait(do_barriers.at[slot]),
              j * ROWS,
              masked,
              carry,
          )
          plgpu.barrier_arrive(free.at[slot])
          return carry

        carry = lax.fori_loop(first, own[0], release, carry)
        carry = _walk(own, step, carry)
        return lax.fori_loop(own[3], end, release, carry)

      dk, dv = lax.fori_loop(0, group, head, (zeros((ROWS, head_dim)), zeros((ROWS, head_dim))))
      store_dkv(dk, dv, k_smem.at[wg], v_smem.at[wg], dk_ref, dv_ref, b, keys, kv_head)

    @pl.when(wg == 2)
    def _produce():
      plgpu.set_max_registers(40, action='decrease')
      fetch = functools.partial(
          fetch_query_tiles,
          (
              q_ref,
              do_ref,
              stats_ref,
              q_smem,
              do_smem,
              stats_smem,
              q_barriers,
              do_barriers,
              stats_barriers,
          ),
          b,
          kv_head,
          first,
          span,
      )

      for stage in range(STAGES):
        pl.when(stage < total)(functools.partial(fetch, stage, stage))

      # Step t refills the slot of step t - STAGES once both groups have released it; the
      # last STAGES releases are awaited too (every waiter observes every phase).
      def refill(t, carry):
        slot = slot_of(t)
        plgpu.barrier_wait(free.at[slot])
        pl.when(t < total)(functools.partial(fetch, t, slot))
        return carry

      lax.fori_loop(STAGES, total + STAGES, refill, None)

  ring = dict(
      q_smem=tile(STAGES),
      do_smem=tile(STAGES),
      stats_smem=plgpu.SMEM((STAGES, 4, ROWS), jnp.float32),
      q_barriers=plgpu.Barrier(num_barriers=STAGES),
      do_barriers=plgpu.Barrier(num_barriers=STAGES),
      stats_barriers=plgpu.Barrier(num_barriers=STAGES),
  )
  if static.blocks.block_k_bwd == ROWS:
    kernel, threads = dkv_kernel, {}
    scratch = dict(k_smem=tile(), v_smem=tile(), kv_barriers=plgpu.Barrier(num_barriers=2), **ring)
  else:
    kernel, threads = dkv_two_group_kernel, dict(num_threads=3, thread_name='wg')
    scratch = dict(
        k_smem=tile(2),
        v_smem=tile(2),
        kv_barriers=plgpu.Barrier(num_barriers=4),
        **ring,
        free=plgpu.Barrier(num_arrivals=2, num_barriers=STAGES),
    )
  dk, dv = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype)),
      grid=(length // static.blocks.block_k_bwd, batch, num_kv_heads),
      grid_names=('k_blocks', 'batch', 'kv_heads'),
      scratch_types=scratch,
      **threads,
      **compiler,
  )(query_ranges, stats, q, k, v, d_out)
  return dk, dv


def _dq_backward(setup, key_ranges, stats, q, k, v, d_out):
  """dq, per query block of `block_q_bwd` (64: one warpgroup; 128: two and a producer).
  `key_ranges`: for each `ROWS`-query block, the stacked `BlockRanges` of the `ROWS`-key
  blocks it sees."""
  static, interpret, dtype = setup.static, setup.interpret, setup.dtype
  batch, length, num_heads, head_dim = setup.batch, setup.length, setup.num_heads, setup.head_dim
  group, compiler = setup.group, setup.compiler
  tile, zeros, probabilities = setup.tile, setup.zeros, setup.probabilities
  num_blocks = length // ROWS

  def dq_step(q_tile, do_tile, k_tile, v_tile, wait_v, v_done, lse2, delta, spans, j, dq):
    """dQ += one key block's share (queries as rows); `v_done()` once V is read."""
    scores, dp = _wgmmas(
        [(q_tile, k_tile, True, zeros((ROWS, ROWS))), (do_tile, v_tile, True, zeros((ROWS, ROWS)))],
        interpret,
        between=wait_v,
    )
    v_done()
    p, capped = probabilities(scores, lse2, spans, j * ROWS, as_rows=True)
    ds = p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))
    ds = softcap_lib.backward(ds, capped, static.softcap)
    return _wgmmas([(ds.astype(dtype), k_tile, False, dq)], interpret)[0]

  def load_query_rows(refs, tiles, barriers, b, h, queries):
    """TMA-copies a dQ block's q, dO and stats (`refs`) into their `tiles`, one barrier
    each, and waits; returns its (lse2, delta, visible-key spans), one entry per row."""
    q_ref, do_ref, stats_ref = refs
    sources = (q_ref.at[b, queries, h], do_ref.at[b, queries, h], stats_ref.at[b, h, :, queries])
    for source, tile_smem, barrier in zip(sources, tiles, barriers):
      plgpu.copy_gmem_to_smem(source, tile_smem, barrier)
    for barrier in barriers:
      plgpu.barrier_wait(barrier)
    lse2, delta, lo_q, hi_q = (_rows(tiles[2][n], interpret) for n in range(4))
    return lse2, delta, (lo_q.astype(jnp.int32), hi_q.astype(jnp.int32))

  def store_dq(dq, q_tile, dq_ref, b, queries, h):
    q_tile[...] = (dq * static.scale).astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_tile, dq_ref.at[b, queries, h])
    plgpu.wait_smem_to_gmem(0)

  def dq_kernel(
      ranges_ref,
      stats_ref,
      q_ref,
      k_ref,
      v_ref,
      do_ref,
      dq_ref,
      q_smem,
      do_smem,
      stats_smem,
      k_smem,
      v_smem,
      row_barriers,
      k_barriers,
      v_barriers,
  ):
    i = num_blocks - 1 - lax.axis_index('q_blocks')  # longest causal rows first
    b, h = lax.axis_index('batch'), lax.axis_index('heads')
    queries = pl.ds(i * ROWS, ROWS)
    own, fetch = _start_key_ring(
        ranges_ref, b, h, i, group, ROWS, (k_ref, v_ref, k_smem, v_smem, k_barriers, v_barriers)
    )
    lo, hi = own[0], own[3]
    lse2, delta, spans = load_query_rows(
        (q_ref, do_ref, stats_ref),
        (q_smem, do_smem, stats_smem),
        [row_barriers.at[n] for n in range(3)],
        b,
        h,
        queries,
    )

    def step(j, dq, masked):
      slot = lax.rem(j - lo, jnp.int32(STAGES))
      plgpu.barrier_wait(k_barriers.at[slot])
      dq = dq_step(
          q_smem,
          do_smem,
          k_smem.at[slot],
          v_smem.at[slot],
          lambda: plgpu.barrier_wait(v_barriers.at[slot]),
          lambda: None,
          lse2,
          delta,
          spans if masked else None,
          j,
          dq,
      )
      pl.when(j + STAGES < hi)(functools.partial(fetch, j + STAGES, slot))
      return dq

    dq = _walk(own, step, zeros((ROWS, head_dim)))
    store_dq(dq, q_smem, dq_ref, b, queries, h)

  num_ctas = length // (2 * ROWS)

  def dq_two_group_kernel(
      ranges_ref,
      stats_ref,
      q_ref,
      k_ref,
      v_ref,
      do_ref,
      dq_ref,
      q_smem,
      do_smem,
      stats_smem,
      k_smem,
      v_smem,
      row_barriers,
      k_barriers,
      v_barriers,
      k_free,
      v_free,
  ):
    """dQ in the two-group forward's layout: two compute warpgroups of 64 queries share
    every K/V block, which a producer warpgroup streams through the ring; each group walks
    the union of the two key ranges and releases the blocks outside its own unread."""
    c = num_ctas - 1 - lax.axis_index('q_blocks')  # longest causal rows first
    b, h = lax.axis_index('batch'), lax.axis_index('heads')
    wg = lax.axis_index('wg')
    first, end = _union_of_two(ranges_ref, b, 2 * c)
    slot_of = lambda j: lax.rem(j - first, jnp.int32(STAGES))

    @pl.when(wg < 2)
    def _compute():
      plgpu.set_max_registers(232, action='increase')
      i = 2 * c + wg
      queries = pl.ds(i * ROWS, ROWS)
      own = _own_range(ranges_ref, b, i, end)
      lse2, delta, spans = load_query_rows(
          (q_ref, do_ref, stats_ref),
          (q_smem.at[wg], do_smem.at[wg], stats_smem.at[wg]),
          [row_barriers.at[3 * wg + n] for n in range(3)],
          b,
          h,
          queries,
      )

      def release(j, dq):  # a block outside this group's range: observe it, pass it on
        slot = slot_of(j)
        plgpu.barrier_wait(k_barriers.at[slot])
        plgpu.barrier_arrive(k_free.at[slot])
        plgpu.barrier_wait(v_barriers.at[slot])
        plgpu.barrier_arrive(v_free.at[slot])
        return dq

      def step(j, dq, masked):
        slot = slot_of(j)
        plgpu.barrier_wait(k_barriers.at[slot])
        dq = dq_step(
            q_smem.at[wg],
            do_smem.at[wg],
            k_smem.at[slot],
            v_smem.at[slot],
            lambda: plgpu.barrier_wait(v_barriers.at[slot]),
            lambda: plgpu.barrier_arrive(v_free.at[slot]),
            lse2,
            delta,
            spans if masked else None,
            j,
            dq,
        )
        plgpu.barrier_arrive(k_free.at[slot])
        return dq

      dq = lax.fori_loop(first, own[0], release, zeros((ROWS, head_dim)))
      dq = _walk(own, step, dq)
      dq = lax.fori_loop(own[3], end, release, dq)
      store_dq(dq, q_smem.at[wg], dq_ref, b, queries, h)

    @pl.when(wg == 2)
    def _produce():
      plgpu.set_max_registers(40, action='decrease')
      fetch = functools.partial(
          _fetch,
          k_ref,
          v_ref,
          k_smem,
          v_smem,
          k_barriers,
          v_barriers,
          b,
          lax.div(h, jnp.int32(group)),
          ROWS,
      )
      _stream_key_ring(fetch, first, end, k_free, v_free)

  ring = dict(
      k_smem=tile(STAGES),
      v_smem=tile(STAGES),
      k_barriers=plgpu.Barrier(num_barriers=STAGES),
      v_barriers=plgpu.Barrier(num_barriers=STAGES),
  )
  if static.blocks.block_q_bwd == ROWS:
    kernel, threads = dq_kernel, {}
    scratch = dict(
        q_smem=tile(),
        do_smem=tile(),
        stats_smem=plgpu.SMEM((4, ROWS), jnp.float32),
        row_barriers=plgpu.Barrier(num_barriers=3),
        **ring,
    )
  else:
    kernel, threads = dq_two_group_kernel, dict(num_threads=3, thread_name='wg')
    scratch = dict(
        q_smem=tile(2),
        do_smem=tile(2),
        stats_smem=plgpu.SMEM((2, 4, ROWS), jnp.float32),
        row_barriers=plgpu.Barrier(num_barriers=6),
        **ring,
        k_free=plgpu.Barrier(num_arrivals=2, num_barriers=STAGES),
        v_free=plgpu.Barrier(num_arrivals=2, num_barriers=STAGES),
    )
  dq = plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct(q.shape, dtype),
      grid=(length // static.blocks.block_q_bwd, batch, num_heads),
      grid_names=('q_blocks', 'batch', 'heads'),
      scratch_types=scratch,
      **threads,
      **compiler,
  )(key_ranges, stats, q, k, v, d_out)
  return dq


# --- shared by the kernels: products and layouts -----------------------------------------
#
# In interpret mode the layout hints are dropped and products are plain dots: the
# interpreter takes wgmma operands only untransposed and in shared memory.


def _matmul(a, b_smem, shape, interpret, transpose_b=False, acc=None, issued=lambda: None):
  """float32 `shape` = a @ b (b^T with `transpose_b`), plus `acc` unless None: `a` in
  shared memory or registers (wgmma's A operand may be either), `b_smem` in shared memory.

  On the GPU the wgmma accumulates into `acc` in place (no second accumulator, no add),
  and `issued()` runs between issuing the wgmma and awaiting its result.
  """
  if interpret:
    b = b_smem[...]
    out = jnp.dot(a[...], b.T if transpose_b else b, preferred_element_type=jnp.float32)
    issued()
    return out if acc is None else acc + out

  def issue(acc_ref):
    plgpu.wgmma(acc_ref, a, plgpu.transpose_ref(b_smem, (1, 0)) if transpose_b else b_smem)
    issued()

  if acc is not None:
    return pl.run_state(issue)(plgpu.ACC.init(acc))  # its result awaits the wgmma

  def product(acc_ref):
    issue(acc_ref)
    return acc_ref[...]  # awaits the wgmma

  return pl.run_scoped(product, plgpu.ACC(shape, jnp.float32))


def _wgmmas(terms, interpret, between=lambda: None):
  """acc + a @ b (b^T where `transposed`) for each (a, b_smem, transposed, acc) of `terms`,
  issued back to back (`between()` after the first: a wait for the others' operands) and
  awaited together, in place in the accumulators. A wgmma awaited alone drains the
  tensor-core pipeline before the next can start. (JAX's Hopper backward pairs its
  products the same way: `run_state` over several initialised accumulators.)"""
  if interpret:
    out = []
    for n, (a, b_smem, transposed, acc) in enumerate(terms):
      b = b_smem[...]
      out.append(
          acc + jnp.dot(a[...], b.T if transposed else b, preferred_element_type=jnp.float32)
      )
      if n == 0:
        between()
    return out

  def issue(acc_refs):
    for n, (acc_ref, (a, b_smem, transposed, _)) in enumerate(zip(acc_refs, terms)):
      plgpu.wgmma(acc_ref, a, plgpu.transpose_ref(b_smem, (1, 0)) if transposed else b_smem)
      if n == 0:
        between()

  return list(pl.run_state(issue)(tuple(plgpu.ACC.init(term[3]) for term in terms)))


def _tile(x, interpret):
  """A 2-D value in the layout of a wgmma result."""
  return x if interpret else plgpu.layout_cast(x, plgpu.Layout.WGMMA)


def _rows(x, interpret):
  """A vector with one entry per row of a wgmma result."""
  return x if interpret else plgpu.layout_cast(x, plgpu.Layout.WGMMA.reduce(1))


def _columns(x, interpret):
  """A vector with one entry per column of a wgmma result."""
  return x if interpret else plgpu.layout_cast(x, plgpu.Layout.WGMMA.reduce(0))


def _iota(shape, dim, interpret):
  if interpret:
    return lax.broadcasted_iota(jnp.int32, shape, dim)
  return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def _interpret_kwargs(interpret):
  if not interpret:
    return {}
  from jax._src.pallas.mosaic_gpu.interpret import params  # pylint: disable=g-import-not-at-top

  return {'interpret': params.InterpretGPUParams()}
