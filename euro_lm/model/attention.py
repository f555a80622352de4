"""Attention: one function, several backends.

`impl='xla'` is the reference (plain einsums, any platform); `impl='cudnn'` calls
`jax.nn.dot_product_attention(implementation='cudnn')` (NVIDIA GPUs); `impl='pallas'` is
euro_lm's flash attention kernels (euro_lm.kernels: Triton on GPUs, Mosaic on TPUs,
interpreted on CPU); `impl='auto'` picks by device what ran fastest (`_auto_impl`): pallas
on TPUs, on AMD GPUs and on H100/H200s at 4k and longer, cuDNN on other NVIDIA GPUs and
shorter rows, xla on CPUs. All take q `[B, L, H, D]` and k, v `[B, L, K, D]` with K
dividing H (grouped-query attention: K/V are never repeated in memory) and optional
packed-document `segment_ids` `[B, L]`: a token attends only to earlier tokens of its own
segment, and segment 0 is padding that attends nowhere (its output is zero).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from euro_lm.sharding import mesh_axes_size

IMPLS = ('xla', 'cudnn', 'pallas', 'auto')


def attention(q_BLHD, k_BLKD, v_BLKD, *, segment_ids_BL=None, causal=True,
              scale=None, impl='xla', pallas_backend=None):
  """Returns the attention output `[B, L, H, D]` in q's dtype. `pallas_backend` names the
  kernel set of `impl='pallas'` (`flash_attention`'s `backend`; None picks by device)."""
  num_heads, num_kv_heads = q_BLHD.shape[2], k_BLKD.shape[2]
  if num_heads % num_kv_heads:
    raise ValueError(f'{num_heads} query heads are not a multiple of {num_kv_heads} kv heads')
  scale = q_BLHD.shape[-1] ** -0.5 if scale is None else scale
  if impl == 'auto':
    impl = _auto_impl(q_BLHD.shape[1], q_BLHD.shape[-1], q_BLHD.dtype, pallas_backend)
  if impl == 'pallas':
    from euro_lm.kernels import flash_attention  # pylint: disable=g-import-not-at-top
    kernel = functools.partial(flash_attention, causal=causal, scale=scale,
                               backend=pallas_backend)
    return per_device(kernel, q_BLHD, k_BLKD, v_BLKD, segment_ids_BL)
  if impl == 'xla':
    return _xla_attention(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, causal, scale)
  if impl == 'cudnn':
    return _cudnn_attention(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, causal, scale)
  raise ValueError(f'unknown attention impl {impl!r}; expected one of {IMPLS}')


def per_device(kernel, q_BLHD, k_BLKD, v_BLKD, segment_ids_BL=None):
  """`kernel(q, k, v, segment_ids=...)` on each device's own rows and heads.

  A Pallas kernel is a custom call, which XLA's partitioner cannot split: under a mesh it
  would gather the whole q, k and v onto every device and compute all of it there. So,
  inside a mesh, the kernel runs in `shard_map` over the mesh axes that the logical rules
  give 'batch' and the heads. The sequence and head_dim stay whole on each device (the
  kernel needs every key of a row), and the heads are split only where 'heads' and
  'kv_heads' go to the same mesh axes, so each device keeps whole GQA groups. The mesh's
  axes must be Auto ones, as `euro_lm.sharding.make_mesh` makes them.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return kernel(q_BLHD, k_BLKD, v_BLKD, segment_ids=segment_ids_BL)
  # One lookup per array: Flax gives each mesh axis to one dimension of a spec at most.
  batch, heads = nn.logical_to_mesh_axes(('batch', 'heads'))
  kv_heads, = nn.logical_to_mesh_axes(('kv_heads',))
  if heads != kv_heads:
    heads = kv_heads = None
  # A dimension the axes do not divide (as a batch of 1 at init) stays whole on each device.
  batch = _dividing(batch, q_BLHD.shape[0], mesh)
  heads = kv_heads = _dividing(heads, k_BLKD.shape[2], mesh)
  q_spec, kv_spec = P(batch, None, heads, None), P(batch, None, kv_heads, None)
  args, specs = [q_BLHD, k_BLKD, v_BLKD], [q_spec, kv_spec, kv_spec]
  if segment_ids_BL is not None:
    args.append(segment_ids_BL)
    specs.append(P(batch, None))
  body = lambda q, k, v, s=None: kernel(q, k, v, segment_ids=s)
  # check_vma=False: pallas_call declares no rule for how its outputs vary over the mesh.
  return jax.shard_map(body, in_specs=tuple(specs), out_specs=q_spec, check_vma=False)(*args)


def _dividing(axes, size, mesh):
  """`axes` (a mesh axis name, a tuple of them, or None) if they split `size` evenly."""
  return axes if size % mesh_axes_size(mesh, axes) == 0 else None


def _auto_impl(length, head_dim, dtype, pallas_backend):
  """What `impl='auto'` runs, by device, as measured (BENCHMARKS.md).

  On TPUs and GPUs: 'pallas' where its kernels (`pallas_backend`, or the device's default)
  take the shapes and dtype. On NVIDIA GPUs, 16-bit runs take 'cudnn' instead where the
  pallas kernels would be the Triton ones (a device's own pick, or a shape no kernel takes):
  on an H100, cuDNN ran attention 1.3x as fast as them. The Hopper kernels, which an
  H100/H200 picks at 4k tokens and longer, made a 1B train step 8% faster than cuDNN did.
  Elsewhere, and on CPUs: 'xla'.
  """
  platform = jax.default_backend()  # 'gpu' for CUDA and ROCm
  if platform not in ('gpu', 'tpu'):
    return 'xla'
  from euro_lm.kernels.flash_attention import default_backend, length_multiple  # pylint: disable=g-import-not-at-top
  backend = pallas_backend or default_backend(dtype, length, head_dim)
  sixteen_bit = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
  # cuDNN's flash attention takes head_dim <= 128 on every NVIDIA generation it supports.
  cudnn = platform == 'gpu' and sixteen_bit and head_dim <= 128 and _on_nvidia_gpu()
  fits = ((backend != 'mosaic_gpu' or sixteen_bit)
          and length % length_multiple(head_dim, backend) == 0)
  if fits and not (cudnn and pallas_backend is None and backend == 'gpu'):
    return 'pallas'
  return 'cudnn' if cudnn else 'xla'


def _on_nvidia_gpu():
  from euro_lm.config import device_platform  # pylint: disable=g-import-not-at-top
  return device_platform(jax.devices()[0]) == 'cuda'


def attention_mask(segment_ids_BL, length, causal, queries=None, num_keys=None):
  """Boolean `[B or 1, Q, M]` mask: True where query i may attend to key j.

  All L queries and keys by default; `queries=(start, end)` and `num_keys` select the rows
  start .. end against keys 0 .. num_keys.
  """
  start, end = queries or (0, length)
  num_keys = length if num_keys is None else num_keys
  mask_1QM = jnp.ones((1, end - start, num_keys), bool)
  if causal:
    mask_1QM = ((start + jnp.arange(end - start))[:, None] >= jnp.arange(num_keys)[None, :])[None]
  if segment_ids_BL is None:
    return mask_1QM
  q_segments_BQ, k_segments_BM = segment_ids_BL[:, start:end], segment_ids_BL[:, :num_keys]
  return (mask_1QM & (q_segments_BQ[:, :, None] == k_segments_BM[:, None, :])
          & (q_segments_BQ != 0)[:, :, None])


# The xla attention runs causal queries in this many chunks, each against only the keys up
# to its last query: 9/16 of the score matrix for 8 chunks. Below _MIN_CHUNKED_LENGTH one
# chunk is faster.
_QUERY_CHUNKS = 8
_MIN_CHUNKED_LENGTH = 256


def xla_query_chunks(length, causal):
  """How many query chunks the `xla` attention splits `length` queries into."""
  if causal and length >= _MIN_CHUNKED_LENGTH and length % _QUERY_CHUNKS == 0:
    return _QUERY_CHUNKS
  return 1


def _xla_attention(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, causal, scale):
  chunks = xla_query_chunks(q_BLHD.shape[1], causal)
  return _chunked_attention(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, causal, scale, chunks)


# Like flash attention, but in plain XLA ops and whole query chunks: the forward keeps each
# row's float32 log-sum-exp instead of the probabilities, and the backward recomputes the
# scores of one chunk at a time. Against autodiff's saved L x L probabilities this trades
# one more q.k matmul for far less memory, and was 7% faster on the CPU at 125M (L = 512).
@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _chunked_attention(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, causal, scale, chunks):
  return _chunked_forward(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, causal, scale, chunks)[0]


def _chunks(length, causal, chunks):
  """(first query, end query, number of keys) of each query chunk."""
  size = length // chunks
  for c in range(chunks):
    start, end = c * size, (c + 1) * size
    yield start, end, end if causal else length  # later keys are all masked when causal


def _chunk_mask(segment_ids_BL, start, end, num_keys, causal):
  """`[B or 1, 1, 1, Q, M]`: `attention_mask` of one query chunk, broadcast over heads."""
  mask_BQM = attention_mask(segment_ids_BL, None, causal, (start, end), num_keys)
  return mask_BQM[:, None, None]


def _query_heads_first(x_BLHD, num_kv_heads):
  """`[B, K, G, L, D]`: query heads grouped by the kv head they read (K/V never repeated),
  ahead of the sequence, so that each head's matmuls read contiguous rows."""
  batch, length, num_heads, head_dim = x_BLHD.shape
  x_BLKGD = x_BLHD.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
  return jnp.transpose(x_BLKGD, (0, 2, 3, 1, 4))


def _kv_heads_first(x_BLKD):
  """`[B, K, L, D]` from `[B, L, K, D]`, and back: the swap is its own inverse."""
  return jnp.transpose(x_BLKD, (0, 2, 1, 3))


def _sequence_first(x_BKGLD):
  """The inverse of `_query_heads_first`: `[B, L, H, D]`."""
  batch, num_kv_heads, group, length, head_dim = x_BKGLD.shape
  return jnp.transpose(x_BKGLD, (0, 3, 1, 2, 4)).reshape(
      batch, length, num_kv_heads * group, head_dim)


def _scores(q_BKGQD, k_BKMD, scale):
  return jnp.einsum('bkgqd,bkmd->bkgqm', q_BKGQD, k_BKMD,
                    preferred_element_type=jnp.float32) * scale


# Both passes work heads-first: one transpose of q, k, v (and dout) up front instead of a
# strided operand in every chunk's matmuls; 14-19% faster forward+backward on the CPU at
# 125M's shapes (BENCHMARKS.md).
def _chunked_forward(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, causal, scale, chunks):
  num_kv_heads = k_BLKD.shape[2]
  q_BKGLD = _query_heads_first(q_BLHD, num_kv_heads)
  k_BKLD, v_BKLD = _kv_heads_first(k_BLKD), _kv_heads_first(v_BLKD)
  outs, logsumexps = [], []
  for start, end, num_keys in _chunks(q_BLHD.shape[1], causal, chunks):
    mask = _chunk_mask(segment_ids_BL, start, end, num_keys, causal)
    scores_BKGQM = jnp.where(
        mask, _scores(q_BKGLD[:, :, :, start:end], k_BKLD[:, :, :num_keys], scale),
        jnp.finfo(jnp.float32).min)
    top_BKGQ1 = jnp.max(scores_BKGQM, axis=-1, keepdims=True)
    weights_BKGQM = jnp.where(mask, jnp.exp(scores_BKGQM - top_BKGQ1), 0.0)
    total_BKGQ1 = jnp.sum(weights_BKGQM, axis=-1, keepdims=True)
    seen = total_BKGQ1 > 0  # a row that sees no key (padding) gives zeros
    probs_BKGQM = weights_BKGQM * jnp.where(seen, 1 / jnp.where(seen, total_BKGQ1, 1), 0.0)
    outs.append(jnp.einsum('bkgqm,bkmd->bkgqd', probs_BKGQM.astype(v_BLKD.dtype),
                           v_BKLD[:, :, :num_keys], preferred_element_type=jnp.float32))
    logsumexps.append(jnp.where(seen, top_BKGQ1 + jnp.log(jnp.where(seen, total_BKGQ1, 1)),
                                jnp.inf))
  out_BLHD = _sequence_first(jnp.concatenate(outs, axis=3)).astype(q_BLHD.dtype)
  return out_BLHD, (q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, out_BLHD, logsumexps)


def _chunked_backward(causal, scale, chunks, residuals, dout_BLHD):
  q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, out_BLHD, logsumexps = residuals
  batch, length, num_heads, _ = q_BLHD.shape
  num_kv_heads = k_BLKD.shape[2]
  # The softmax gradient's row term, sum_d dout * out, per query head.
  delta_BLH = jnp.sum(dout_BLHD.astype(jnp.float32) * out_BLHD.astype(jnp.float32), axis=-1)
  delta_BKGL = jnp.transpose(
      delta_BLH.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads), (0, 2, 3, 1))
  q_BKGLD, dout_BKGLD = (_query_heads_first(x, num_kv_heads) for x in (q_BLHD, dout_BLHD))
  k_BKLD, v_BKLD = _kv_heads_first(k_BLKD), _kv_heads_first(v_BLKD)
  dqs = []
  dk_BKLD = jnp.zeros(k_BKLD.shape, jnp.float32)
  dv_BKLD = jnp.zeros(v_BKLD.shape, jnp.float32)
  for (start, end, num_keys), logsumexp_BKGQ1 in zip(_chunks(length, causal, chunks),
                                                     logsumexps):
    mask = _chunk_mask(segment_ids_BL, start, end, num_keys, causal)
    q_BKGQD, dout_BKGQD = q_BKGLD[:, :, :, start:end], dout_BKGLD[:, :, :, start:end]
    k_BKMD, v_BKMD = k_BKLD[:, :, :num_keys], v_BKLD[:, :, :num_keys]
    probs_BKGQM = jnp.where(mask, jnp.exp(_scores(q_BKGQD, k_BKMD, scale) - logsumexp_BKGQ1),
                            0.0)
    dv_BKLD = dv_BKLD.at[:, :, :num_keys].add(jnp.einsum(
        'bkgqm,bkgqd->bkmd', probs_BKGQM.astype(dout_BLHD.dtype), dout_BKGQD,
        preferred_element_type=jnp.float32))
    dprobs_BKGQM = jnp.einsum('bkgqd,bkmd->bkgqm', dout_BKGQD, v_BKMD,
                              preferred_element_type=jnp.float32)
    dscores_BKGQM = (probs_BKGQM * (dprobs_BKGQM - delta_BKGL[..., start:end, None])
                     * scale).astype(q_BLHD.dtype)
    dqs.append(jnp.einsum('bkgqm,bkmd->bkgqd', dscores_BKGQM, k_BKMD,
                          preferred_element_type=jnp.float32))
    dk_BKLD = dk_BKLD.at[:, :, :num_keys].add(jnp.einsum(
        'bkgqm,bkgqd->bkmd', dscores_BKGQM, q_BKGQD, preferred_element_type=jnp.float32))
  dq_BLHD = _sequence_first(jnp.concatenate(dqs, axis=3))
  return (dq_BLHD.astype(q_BLHD.dtype), _kv_heads_first(dk_BKLD).astype(k_BLKD.dtype),
          _kv_heads_first(dv_BKLD).astype(v_BLKD.dtype), None)


_chunked_attention.defvjp(_chunked_forward, _chunked_backward)


def _cudnn_attention(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, causal, scale):
  mask = None
  if segment_ids_BL is not None:
    # cuDNN takes a dense mask; the Pallas kernel skips masked blocks instead.
    mask = attention_mask(segment_ids_BL, q_BLHD.shape[1], causal=False)[:, None]
  return jax.nn.dot_product_attention(q_BLHD, k_BLKD, v_BLKD, mask=mask, scale=scale,
                                      is_causal=causal, implementation='cudnn')
