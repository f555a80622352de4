"""Flash attention in Pallas: forward and backward, GQA, packed segments, causal, window.

Layout: q `[B, L, H, D]`, k and v `[B, L, K, D]`, K dividing H (query head h reads kv head
h // (H // K); K/V are never repeated in memory). `segment_ids` `[B, L]` are contiguous
runs (as packing produces); a token attends only within its run, and segment 0 is padding
that attends nowhere, so a fully padded row gives zeros.

Work is skipped, not masked: for each query block the kernels loop only over the key
blocks that the causal diagonal, the window and the query block's documents can reach
(bounds computed once per call from the segment ids); masks are applied inside that range.
The forward saves a float32 logsumexp; the backward recomputes probabilities blockwise in
two deterministic kernels (dK/dV per key block, summing its query heads; dQ per query
block), with float32 accumulation and no atomics.

Two kernel sets share this contract: the Triton-style kernels here (NVIDIA/AMD GPUs, and the
Pallas interpreter on CPU) and the Mosaic kernels in `flash_attention_tpu` (TPUs), picked by
`flash_attention(..., backend=...)`.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

_MASKED = -1e30  # finite: exp(_MASKED - m) underflows to 0 without inf - inf = NaN


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


# Per head_dim, from `python -m euro_lm.kernels.bench --sweep` on an H200 (BENCHMARKS.md):
# the best forward+backward of the candidates at L = 4096. head_dim 64 is not swept yet.
GPU_BLOCK_SIZES = {
    64: BlockSizes(block_q=64, block_k=64, block_q_bwd=64, block_k_bwd=64, num_warps=4,
                   num_stages=2),
    128: BlockSizes(block_q=64, block_k=64, block_q_bwd=64, block_k_bwd=64, num_warps=4,
                    num_stages=2),
}

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
BACKENDS = ('gpu', 'tpu')


def flash_attention(q, k, v, *, segment_ids=None, causal=True, scale=None, window=None,
                    block_sizes=None, interpret=None, backend=None):
  """Attention output `[B, L, H, D]` in q's dtype; differentiable (custom VJP).

  Args:
    q, k, v: `[B, L, H, D]` and `[B, L, K, D]`.
    segment_ids: optional int `[B, L]` contiguous document ids; 0 is padding.
    causal: mask keys after the query.
    scale: logit scale; default 1/sqrt(D).
    window: optional int W: a query at i sees keys in (i - W, i] (with causal) or
      [i - W + 1, i + W - 1] (without).
    block_sizes: `BlockSizes`; default from `GPU_BLOCK_SIZES` or `TPU_BLOCK_SIZES` by head
      dim (the TPU defaults shrunk to fit the length).
    interpret: run the kernels in the Pallas interpreter (default: on CPU).
    backend: 'gpu' (Triton kernels) or 'tpu' (Mosaic kernels); None takes 'tpu' when
      `jax.default_backend()` is TPU and 'gpu' otherwise, so a CPU runs the GPU kernels in
      the interpreter. The choice is made when tracing, not by `lax.platform_dependent`:
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
    backend = 'tpu' if jax.default_backend() == 'tpu' else 'gpu'
  if backend not in BACKENDS:
    raise ValueError(f'unknown flash attention backend {backend!r}; expected one of {BACKENDS}')
  if backend == 'tpu':
    blocks = block_sizes or _fit_tpu_blocks(TPU_BLOCK_SIZES.get(head_dim, _TPU_DEFAULT), length)
  else:
    blocks = block_sizes or GPU_BLOCK_SIZES.get(head_dim, BlockSizes())
  for name in _BLOCK_FIELDS:
    size = getattr(blocks, name)
    if backend == 'tpu' and size % TPU_BLOCK_MULTIPLE:
      raise ValueError(f'TPU flash attention needs {name} to be a multiple of '
                       f'{TPU_BLOCK_MULTIPLE}, not {size} (sequence length {length})')
    if length % size:
      raise ValueError(f'sequence length {length} is not a multiple of {name}={size}; pad '
                       'the sequence (with segment id 0) or pass smaller block_sizes')
  if segment_ids is None:
    segment_ids = jnp.ones((batch, length), jnp.int32)
  if interpret is None:
    interpret = jax.default_backend() == 'cpu'
  static = _Static(causal=causal, scale=head_dim ** -0.5 if scale is None else float(scale),
                   window=window, blocks=blocks, interpret=interpret)
  if backend == 'tpu':
    from euro_lm.kernels import flash_attention_tpu  # pylint: disable=g-import-not-at-top
    return flash_attention_tpu.attention(static, q, k, v, segment_ids.astype(jnp.int32))
  return _attention(static, q, k, v, segment_ids.astype(jnp.int32))


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
  blocks = GPU_BLOCK_SIZES.get(head_dim, BlockSizes())
  return math.lcm(*(getattr(blocks, name) for name in _BLOCK_FIELDS))


@dataclasses.dataclass(frozen=True)
class _Static:
  causal: bool
  scale: float
  window: int | None
  blocks: BlockSizes
  interpret: bool


# --- block ranges ------------------------------------------------------------------------

def _document_edges(segment_ids):
  """Per token: index of the first and of the last token of its (contiguous) segment."""
  length = segment_ids.shape[1]
  index = jnp.arange(length)
  starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                            segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  first = lax.cummax(jnp.where(starts, index, 0), axis=1)
  ends = jnp.concatenate([segment_ids[:, 1:] != segment_ids[:, :-1],
                          jnp.ones_like(segment_ids[:, :1], bool)], axis=1)
  last = lax.cummin(jnp.where(ends, index, length - 1), axis=1, reverse=True)
  return first, last


def _block_ranges(segment_ids, block, other_block, back, ahead):
  """For each block of `block` tokens: [lo, hi) of the `other_block` blocks it meets.

  A token meets tokens of its own document, at most `back` positions before it and
  `ahead` after it (None: no limit). Int32 `[B, L / block]` each.
  """
  length = segment_ids.shape[1]
  first, last = _document_edges(segment_ids)
  start = jnp.arange(0, length, block)
  end = start + block - 1
  lo_token, hi_token = first[:, start], last[:, end]
  if back is not None:
    lo_token = jnp.maximum(lo_token, start - back)
  if ahead is not None:
    hi_token = jnp.minimum(hi_token, end + ahead)
  lo = lo_token // other_block
  hi = jnp.maximum(hi_token // other_block + 1, lo)
  return lo.astype(jnp.int32), hi.astype(jnp.int32)


def _reach(static):
  """(before, after): how far back and ahead a query sees keys (None: no limit)."""
  reach = static.window - 1 if static.window else None
  return reach, 0 if static.causal else reach


def _key_ranges(static, segment_ids, block_q, block_k):
  """For each query block: [lo, hi) of key blocks it can see."""
  before, after = _reach(static)
  return _block_ranges(segment_ids, block_q, block_k, back=before, ahead=after)


def _query_ranges(static, segment_ids, block_q, block_k):
  """For each key block: [lo, hi) of query blocks that can see it."""
  before, after = _reach(static)
  return _block_ranges(segment_ids, block_k, block_q, back=after, ahead=before)


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

def _forward_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, seg_q_ref, seg_k_ref, o_ref, lse_ref,
                    *, static):
  block_q, block_k = static.blocks.block_q, static.blocks.block_k
  i = pl.program_id(2)
  q = q_ref[...]                                            # [bq, D]
  q_index = i * block_q + jnp.arange(block_q)
  q_segments = seg_q_ref[...]
  head_dim = q.shape[-1]

  def body(j, carry):
    acc, m, l = carry
    keys = pl.ds(j * block_k, block_k)
    k = k_ref[keys, :]
    s = _dot(q, k, trans_b=True).astype(jnp.float32) * static.scale
    visible = _mask(static, q_index, j * block_k + jnp.arange(block_k), q_segments,
                    seg_k_ref[keys])
    s = jnp.where(visible, s, _MASKED)
    m_new = jnp.maximum(m, s.max(axis=1))
    p = jnp.where(visible, jnp.exp(s - m_new[:, None]), 0.0)
    correction = jnp.exp(m - m_new)
    l = l * correction + p.sum(axis=1)
    acc = acc * correction[:, None] + _dot(p.astype(v_ref.dtype), v_ref[keys, :]).astype(
        jnp.float32)
    return acc, m_new, l

  init = (jnp.zeros((block_q, head_dim), jnp.float32),
          jnp.full((block_q,), _MASKED, jnp.float32), jnp.zeros((block_q,), jnp.float32))
  acc, m, l = lax.fori_loop(lo_ref[i], hi_ref[i], body, init)
  seen = l > 0  # a query that sees no key (padding) gives zeros
  o_ref[...] = jnp.where(seen[:, None], acc / jnp.where(seen, l, 1.0)[:, None], 0.0).astype(
      o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)


def _compiler_params(static, backward=False):
  blocks = static.blocks
  if backward:
    return pltriton.CompilerParams(
        num_warps=blocks.num_warps if blocks.num_warps_bwd is None else blocks.num_warps_bwd,
        num_stages=blocks.num_stages if blocks.num_stages_bwd is None else blocks.num_stages_bwd)
  return pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def _forward(static, q, k, v, segment_ids):
  batch, length, num_heads, head_dim = q.shape
  group = num_heads // k.shape[2]
  block_q, block_k = static.blocks.block_q, static.blocks.block_k
  lo, hi = _key_ranges(static, segment_ids, block_q, block_k)
  grid = (batch, num_heads, length // block_q)
  out, lse = pl.pallas_call(
      functools.partial(_forward_kernel, static=static),
      grid=grid,
      in_specs=[
          pl.BlockSpec((None, length // block_q), lambda b, h, i: (b, 0)),
          pl.BlockSpec((None, length // block_q), lambda b, h, i: (b, 0)),
          pl.BlockSpec((None, block_q, None, head_dim), lambda b, h, i: (b, i, h, 0)),
          pl.BlockSpec((None, length, None, head_dim), lambda b, h, i: (b, 0, h // group, 0)),
          pl.BlockSpec((None, length, None, head_dim), lambda b, h, i: (b, 0, h // group, 0)),
          pl.BlockSpec((None, block_q), lambda b, h, i: (b, i)),
          pl.BlockSpec((None, length), lambda b, h, i: (b, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, block_q, None, head_dim), lambda b, h, i: (b, i, h, 0)),
          pl.BlockSpec((None, None, block_q), lambda b, h, i: (b, h, i)),
      ],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, num_heads, length), jnp.float32)],
      compiler_params=_compiler_params(static),
      interpret=static.interpret,
      name='euro_lm_flash_forward',
  )(lo, hi, q, k, v, segment_ids, segment_ids)
  return out, lse


# --- backward ----------------------------------------------------------------------------

def _probabilities(static, q, k, lse, q_index, k_index, q_segments, k_segments):
  s = _dot(q, k, trans_b=True).astype(jnp.float32) * static.scale
  visible = _mask(static, q_index, k_index, q_segments, k_segments)
  return jnp.where(visible, jnp.exp(s - lse[:, None]), 0.0)


def _dkv_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_q_ref,
                seg_k_ref, dk_ref, dv_ref, *, static, group):
  block_q, block_k = static.blocks.block_q_bwd, static.blocks.block_k_bwd
  j = pl.program_id(2)
  k = k_ref[...]
  v = v_ref[...]
  k_index = j * block_k + jnp.arange(block_k)
  k_segments = seg_k_ref[...]
  head_dim = k.shape[-1]

  def head_body(g, carry):
    def body(i, carry):
      dk, dv = carry
      queries = pl.ds(i * block_q, block_q)
      q = q_ref[queries, g, :]
      do = do_ref[queries, g, :]
      lse = lse_ref[g, queries]
      p = _probabilities(static, q, k, lse, i * block_q + jnp.arange(block_q), k_index,
                         seg_q_ref[queries], k_segments)
      dv = dv + _dot(p.astype(do.dtype), do, trans_a=True).astype(jnp.float32)
      dp = _dot(do, v, trans_b=True).astype(jnp.float32)
      ds = p * (dp - delta_ref[g, queries][:, None]) * static.scale
      dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True).astype(jnp.float32)
      return dk, dv
    return lax.fori_loop(lo_ref[j], hi_ref[j], body, carry)

  zeros = jnp.zeros((block_k, head_dim), jnp.float32)
  dk, dv = lax.fori_loop(0, group, head_body, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_q_ref,
               seg_k_ref, dq_ref, *, static):
  block_q, block_k = static.blocks.block_q_bwd, static.blocks.block_k_bwd
  i = pl.program_id(2)
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]
  q_index = i * block_q + jnp.arange(block_q)
  q_segments = seg_q_ref[...]

  def body(j, dq):
    keys = pl.ds(j * block_k, block_k)
    k = k_ref[keys, :]
    p = _probabilities(static, q, k, lse, q_index, j * block_k + jnp.arange(block_k),
                       q_segments, seg_k_ref[keys])
    dp = _dot(do, v_ref[keys, :], trans_b=True).astype(jnp.float32)
    ds = p * (dp - delta[:, None]) * static.scale
    return dq + _dot(ds.astype(k.dtype), k).astype(jnp.float32)

  dq = lax.fori_loop(lo_ref[i], hi_ref[i], body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _backward(static, q, k, v, segment_ids, out, lse, d_out):
  batch, length, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  group = num_heads // num_kv_heads
  block_q, block_k = static.blocks.block_q_bwd, static.blocks.block_k_bwd
  # delta_i = sum_d dO_id * O_id: the softmax-gradient correction, [B, H, L].
  delta = jnp.einsum('blhd,blhd->bhl', d_out.astype(jnp.float32), out.astype(jnp.float32))
  lse = jnp.where(jnp.isinf(lse), 0.0, lse)  # padding rows: p is masked to 0 anyway
  params = dict(compiler_params=_compiler_params(static, backward=True),
                interpret=static.interpret)

  q_lo, q_hi = _query_ranges(static, segment_ids, block_q, block_k)
  full_q = lambda b, h, j: (b, 0, h, 0)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, static=static, group=group),
      grid=(batch, num_kv_heads, length // block_k),
      in_specs=[
          pl.BlockSpec((None, length // block_k), lambda b, h, j: (b, 0)),
          pl.BlockSpec((None, length // block_k), lambda b, h, j: (b, 0)),
          pl.BlockSpec((None, length, group, head_dim), full_q),
          pl.BlockSpec((None, block_k, None, head_dim), lambda b, h, j: (b, j, h, 0)),
          pl.BlockSpec((None, block_k, None, head_dim), lambda b, h, j: (b, j, h, 0)),
          pl.BlockSpec((None, length, group, head_dim), full_q),
          pl.BlockSpec((None, group, length), lambda b, h, j: (b, h, 0)),
          pl.BlockSpec((None, group, length), lambda b, h, j: (b, h, 0)),
          pl.BlockSpec((None, length), lambda b, h, j: (b, 0)),
          pl.BlockSpec((None, block_k), lambda b, h, j: (b, j)),
      ],
      out_specs=[pl.BlockSpec((None, block_k, None, head_dim), lambda b, h, j: (b, j, h, 0))] * 2,
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      name='euro_lm_flash_dkv', **params,
  )(q_lo, q_hi, q, k, v, d_out, lse, delta, segment_ids, segment_ids)

  k_lo, k_hi = _key_ranges(static, segment_ids, block_q, block_k)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, static=static),
      grid=(batch, num_heads, length // block_q),
      in_specs=[
          pl.BlockSpec((None, length // block_q), lambda b, h, i: (b, 0)),
          pl.BlockSpec((None, length // block_q), lambda b, h, i: (b, 0)),
          pl.BlockSpec((None, block_q, None, head_dim), lambda b, h, i: (b, i, h, 0)),
          pl.BlockSpec((None, length, None, head_dim), lambda b, h, i: (b, 0, h // group, 0)),
          pl.BlockSpec((None, length, None, head_dim), lambda b, h, i: (b, 0, h // group, 0)),
          pl.BlockSpec((None, block_q, None, head_dim), lambda b, h, i: (b, i, h, 0)),
          pl.BlockSpec((None, None, block_q), lambda b, h, i: (b, h, i)),
          pl.BlockSpec((None, None, block_q), lambda b, h, i: (b, h, i)),
          pl.BlockSpec((None, block_q), lambda b, h, i: (b, i)),
          pl.BlockSpec((None, length), lambda b, h, i: (b, 0)),
      ],
      out_specs=pl.BlockSpec((None, block_q, None, head_dim), lambda b, h, i: (b, i, h, 0)),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      name='euro_lm_flash_dq', **params,
  )(k_lo, k_hi, q, k, v, d_out, lse, delta, segment_ids, segment_ids)
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
  dq, dk, dv = _backward(static, q, k, v, segment_ids, out, lse, d_out)
  return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)
