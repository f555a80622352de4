"""Attention: one function, several backends.

`impl='xla'` is the reference (plain einsums, any platform); `impl='cudnn'` calls
`jax.nn.dot_product_attention(implementation='cudnn')` (NVIDIA GPUs); `impl='pallas'` is
euro_lm's flash attention kernels (euro_lm.kernels: Triton on GPUs, Mosaic on TPUs,
interpreted on CPU); `impl='auto'` picks by device what ran fastest. `resolve` is the one
place that decides which implementation and kernel set run; the layers, config validation,
the planner and the benchmarks all ask it. All take q `[B, L, H, d]` and k, v `[B, L, K, d]` with K
dividing H (grouped-query attention: K/V are never repeated in memory) and optional
packed-document `segment_ids` `[B, L]`: a token attends only to earlier tokens of its own
segment, and segment 0 is padding that attends nowhere (its output is zero).
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from euro_lm import devices, kernels
from euro_lm import softcap as softcap_lib
from euro_lm.errors import UserError
from euro_lm.sharding import mesh_axes_size

IMPLS = ('xla', 'cudnn', 'pallas', 'auto')
PALLAS_BACKENDS = ('auto',) + kernels.BACKENDS


class AttentionError(UserError, ValueError):
  """An attention implementation or kernel set that cannot run; the message names the
  config field."""


@dataclasses.dataclass(frozen=True)
class AttentionChoice:
  """What runs: `impl` is 'xla', 'cudnn' or 'pallas'; `backend` names the pallas kernel set
  ('gpu' Triton, 'mosaic_gpu' Hopper, 'tpu' Mosaic), None for the others."""

  impl: str
  backend: str | None = None


def resolve(impl, pallas_backend='auto', *, dtype, length, head_dim, device, softcap=0.0):
  """The attention implementation and kernel set that run for these shapes on `device`.

  `impl` and `pallas_backend` are the config's `model.attention_impl` and
  `model.pallas_backend`; `device` is a `euro_lm.devices.Device`, or None when it is not
  known (then no platform is checked, and 'auto' resolves as on a CPU). `softcap` is
  `model.attn_logit_softcap`: xla and every pallas kernel set soft-cap scores, cuDNN does
  not. An explicit choice that cannot run raises AttentionError. 'auto' takes what ran
  fastest (BENCHMARKS.md): pallas on TPUs, on AMD GPUs and where the Hopper kernels take
  the call; on other NVIDIA GPUs cuDNN for 16-bit compute, as it outran the Triton kernels
  there (the Triton kernels with a soft cap); xla on CPUs and wherever no kernel takes the
  shapes or dtype.
  """
  if impl not in IMPLS:
    raise AttentionError(
        f'model.attention_impl={impl!r} is not one of ' f'{", ".join(map(repr, IMPLS))}'
    )
  if pallas_backend is None:
    pallas_backend = 'auto'
  if pallas_backend not in PALLAS_BACKENDS:
    raise AttentionError(
        f'model.pallas_backend={pallas_backend!r} is not one of '
        f'{", ".join(map(repr, PALLAS_BACKENDS))}'
    )
  platform = device.platform if device else None
  backend = (
      kernels.default_backend(dtype, length, head_dim, device=device or _ANY_DEVICE)
      if pallas_backend == 'auto'
      else pallas_backend
  )
  dtype_name = jnp.dtype(dtype).name
  cudnn_problem = _cudnn_problem(dtype_name, head_dim, platform, softcap)
  pallas_problem = _pallas_problem(backend, dtype_name, length, head_dim, platform)
  if impl == 'xla':
    return AttentionChoice('xla')
  if impl == 'cudnn':
    if cudnn_problem:
      raise AttentionError(cudnn_problem)
    return AttentionChoice('cudnn')
  if impl == 'pallas':
    if pallas_problem:
      raise AttentionError(pallas_problem)
    return AttentionChoice('pallas', backend)
  if platform not in ('cuda', 'rocm', 'tpu'):
    return AttentionChoice('xla')
  # cuDNN is preferred over the Triton kernels only where the device picked those (a named
  # backend is the user's choice).
  prefer_cudnn = not cudnn_problem and pallas_backend == 'auto' and backend == 'gpu'
  if not pallas_problem and not prefer_cudnn:
    return AttentionChoice('pallas', backend)
  return AttentionChoice('cudnn') if not cudnn_problem else AttentionChoice('xla')


def head_dim(model_config):
  """The per-head width: `model.head_dim`, or else embed_dim // num_heads."""
  return model_config.head_dim or model_config.embed_dim // model_config.num_heads


def resolve_for_model(model_config, seq_len, device):
  """`resolve` for a config's model section and sequence length."""
  return resolve(
      model_config.attention_impl,
      model_config.pallas_backend,
      dtype=model_config.compute_dtype,
      length=seq_len,
      head_dim=head_dim(model_config),
      device=device,
      softcap=model_config.get('attn_logit_softcap', 0.0),
  )


# Unknown device: the kernels' default as on a CPU (the Triton kernels' rules).
_ANY_DEVICE = devices.Device('cpu')


_SIXTEEN_BIT = ('bfloat16', 'float16')


def _cudnn_problem(dtype, head_dim, platform, softcap):
  """Why cuDNN's flash attention cannot run, or ''."""
  if softcap:
    return (
        "model.attention_impl='cudnn' does not soft-cap attention scores "
        f"(model.attn_logit_softcap={softcap}); use 'xla', 'pallas' or 'auto'"
    )
  if dtype not in _SIXTEEN_BIT:
    return (
        "model.attention_impl='cudnn' needs model.compute_dtype bfloat16 or float16, "
        f'not {dtype!r}'
    )
  if head_dim > 128:  # on every NVIDIA generation cuDNN's flash attention supports
    return f"model.attention_impl='cudnn' needs model.head_dim <= 128, not {head_dim}"
  if platform not in (None, 'cuda'):
    hint = (
        "(use 'pallas', euro_lm's Triton kernels, or 'xla')"
        if platform == 'rocm'
        else "(use 'xla')"
    )
    return f"model.attention_impl='cudnn' needs an NVIDIA GPU; this is a {platform} run {hint}"
  return ''


_BACKEND_PLATFORMS = {'gpu': ('cuda', 'rocm'), 'mosaic_gpu': ('cuda',), 'tpu': ('tpu',)}


def _pallas_problem(backend, dtype, length, head_dim, platform):
  """Why the pallas kernel set `backend` cannot run, or ''."""
  # A CPU runs any of them in Pallas' interpreter.
  if platform not in (None, 'cpu') + _BACKEND_PLATFORMS[backend]:
    return f"model.pallas_backend={backend!r} cannot run on this {platform} run (use 'auto')"
  if backend == 'mosaic_gpu':
    if dtype not in _SIXTEEN_BIT:
      return (
          "model.pallas_backend='mosaic_gpu' needs model.compute_dtype bfloat16 or "
          f'float16, not {dtype!r}'
      )
    if head_dim not in (64, 128):
      return f"model.pallas_backend='mosaic_gpu' needs model.head_dim 64 or 128, not {head_dim}"
  block = kernels.length_multiple(head_dim, backend)
  if length % block:
    return (
        f'train.seq_len={length} must be a multiple of {block} for '
        f"model.attention_impl='pallas' (the {backend!r} kernels' block size)"
    )
  return ''


@jax.named_scope('attention_core')  # the part of the step it is in a profile
def attention(
    q_BLHd,
    k_BLKd,
    v_BLKd,
    *,
    segment_ids_BL=None,
    causal=True,
    scale=None,
    impl='xla',
    pallas_backend='auto',
    device=None,
    window=None,
    softcap=0.0,
):
  """Returns the attention output `[B, L, H, d]` in q's dtype. `impl` and `pallas_backend`
  are resolved by `resolve` on `device` (default: the current one). `window` W (sliding
  window attention, as Mistral's): a query at i sees keys in (i - W, i] when causal.
  `softcap` > 0 soft-caps the scaled scores (`euro_lm.softcap`, Gemma 2)."""
  num_heads, num_kv_heads = q_BLHd.shape[2], k_BLKd.shape[2]
  if num_heads % num_kv_heads:
    raise ValueError(f'{num_heads} query heads are not a multiple of {num_kv_heads} kv heads')
  scale = q_BLHd.shape[-1] ** -0.5 if scale is None else scale
  choice = resolve(
      impl,
      pallas_backend,
      dtype=q_BLHd.dtype,
      length=q_BLHd.shape[1],
      head_dim=q_BLHd.shape[-1],
      device=device or devices.describe(),
      softcap=softcap,
  )
  if choice.impl == 'pallas':
    kernel = functools.partial(
        kernels.flash_attention,
        causal=causal,
        scale=scale,
        backend=choice.backend,
        window=window,
        softcap=softcap,
    )
    return per_device(kernel, q_BLHd, k_BLKd, v_BLKd, segment_ids_BL)
  if choice.impl == 'cudnn':  # its log-sum-exp stays inside cuDNN's call: the output only
    out_BLHd = _cudnn_attention(q_BLHd, k_BLKd, v_BLKd, segment_ids_BL, causal, scale, window)
    return checkpoint_name(out_BLHd, kernels.OUT_NAME)
  return _xla_attention(q_BLHd, k_BLKd, v_BLKd, segment_ids_BL, causal, (scale, softcap), window)


def per_device(kernel, q_BLHd, k_BLKd, v_BLKd, segment_ids_BL=None):
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
    return kernel(q_BLHd, k_BLKd, v_BLKd, segment_ids=segment_ids_BL)
  # One lookup per array: Flax gives each mesh axis to one dimension of a spec at most.
  batch, heads = nn.logical_to_mesh_axes(('batch', 'heads'))
  (kv_heads,) = nn.logical_to_mesh_axes(('kv_heads',))
  if heads != kv_heads:
    heads = kv_heads = None
  # A dimension the axes do not divide (as a batch of 1 at init) stays whole on each device.
  batch = _dividing(batch, q_BLHd.shape[0], mesh)
  heads = kv_heads = _dividing(heads, k_BLKd.shape[2], mesh)
  q_spec, kv_spec = P(batch, None, heads, None), P(batch, None, kv_heads, None)
  args, specs = [q_BLHd, k_BLKd, v_BLKd], [q_spec, kv_spec, kv_spec]
  if segment_ids_BL is not None:
    args.append(segment_ids_BL)
    specs.append(P(batch, None))
  body = lambda q, k, v, s=None: kernel(q, k, v, segment_ids=s)
  # check_vma=False: pallas_call declares no rule for how its outputs vary over the mesh.
  return jax.shard_map(body, in_specs=tuple(specs), out_specs=q_spec, check_vma=False)(*args)


def _dividing(axes, size, mesh):
  """`axes` (a mesh axis name, a tuple of them, or None) if they split `size` evenly."""
  return axes if size % mesh_axes_size(mesh, axes) == 0 else None


def attention_mask(segment_ids_BL, length, causal, queries=None, num_keys=None, window=None):
  """Boolean `[B or 1, Q, M]` mask: True where query i may attend to key j.

  All L queries and keys by default; `queries=(start, end)` and `num_keys` select the rows
  start .. end against keys 0 .. num_keys. `window` W keeps keys less than W positions
  before the query (and, without `causal`, after it).
  """
  start, end = queries or (0, length)
  num_keys = length if num_keys is None else num_keys
  offset_QM = (start + jnp.arange(end - start))[:, None] - jnp.arange(num_keys)[None, :]
  mask_1QM = jnp.ones((1, end - start, num_keys), bool)
  if causal:
    mask_1QM &= offset_QM >= 0
  if window:
    mask_1QM &= (offset_QM < window) & (causal or -offset_QM < window)
  if segment_ids_BL is None:
    return mask_1QM
  q_segments_BQ, k_segments_BM = segment_ids_BL[:, start:end], segment_ids_BL[:, :num_keys]
  return (
      mask_1QM
      & (q_segments_BQ[:, :, None] == k_segments_BM[:, None, :])
      & (q_segments_BQ != 0)[:, :, None]
  )


# The xla attention runs causal queries in this many chunks, each against only the keys up
# to its last query: 9/16 of the score matrix for 8 chunks. Below _MIN_CHUNKED_LENGTH one
# chunk ran faster (BENCHMARKS.md).
_QUERY_CHUNKS = 8
_MIN_CHUNKED_LENGTH = 256


def xla_query_chunks(length, causal):
  """How many query chunks the `xla` attention splits `length` queries into."""
  if causal and length >= _MIN_CHUNKED_LENGTH and length % _QUERY_CHUNKS == 0:
    return _QUERY_CHUNKS
  return 1


def _xla_attention(q_BLHd, k_BLKd, v_BLKd, segment_ids_BL, causal, scoring, window):
  chunks = xla_query_chunks(q_BLHd.shape[1], causal)
  return _chunked_attention(
      q_BLHd, k_BLKd, v_BLKd, segment_ids_BL, (causal, window), scoring, chunks
  )


# Like flash attention, but in plain XLA ops and whole query chunks: the forward keeps each
# row's float32 log-sum-exp instead of the probabilities, and the backward recomputes the
# scores of one chunk at a time. Against autodiff's saved L x L probabilities this trades
# one more q.k matmul for far less memory, and ran faster on the CPU (BENCHMARKS.md).
# `visibility` is (causal, window), as `attention_mask` takes them; `scoring` is (scale,
# softcap), as `_scores` takes them.
@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _chunked_attention(q_BLHd, k_BLKd, v_BLKd, segment_ids_BL, visibility, scoring, chunks):
  return _chunked_forward(q_BLHd, k_BLKd, v_BLKd, segment_ids_BL, visibility, scoring, chunks)[0]


def _chunks(length, causal, chunks):
  """(first query, end query, number of keys) of each query chunk."""
  size = length // chunks
  for c in range(chunks):
    start, end = c * size, (c + 1) * size
    yield start, end, end if causal else length  # later keys are all masked when causal


def _chunk_mask(segment_ids_BL, start, end, num_keys, visibility):
  """`[B or 1, 1, 1, Q, M]`: `attention_mask` of one query chunk, broadcast over heads."""
  causal, window = visibility
  mask_BQM = attention_mask(segment_ids_BL, None, causal, (start, end), num_keys, window)
  return mask_BQM[:, None, None]


def _query_heads_first(x_BLHd, num_kv_heads):
  """`[B, K, G, L, d]`: query heads grouped by the kv head they read (K/V never repeated),
  ahead of the sequence, so that each head's matmuls read contiguous rows."""
  batch, length, num_heads, head_dim = x_BLHd.shape
  x_BLKGd = x_BLHd.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
  return jnp.transpose(x_BLKGd, (0, 2, 3, 1, 4))


def _kv_heads_first(x_BLKd):
  """`[B, K, L, d]` from `[B, L, K, d]`, and back: the swap is its own inverse."""
  return jnp.transpose(x_BLKd, (0, 2, 1, 3))


def _sequence_first(x_BKGLd):
  """The inverse of `_query_heads_first`: `[B, L, H, d]`."""
  batch, num_kv_heads, group, length, head_dim = x_BKGLd.shape
  return jnp.transpose(x_BKGLd, (0, 3, 1, 2, 4)).reshape(
      batch, length, num_kv_heads * group, head_dim
  )


def _scores(q_BKGQd, k_BKMd, scoring):
  """float32 scores `q.k * scale`, soft-capped where `softcap` > 0."""
  scale, softcap = scoring
  scores = (
      jnp.einsum('bkgqd,bkmd->bkgqm', q_BKGQd, k_BKMd, preferred_element_type=jnp.float32) * scale
  )
  return softcap_lib.apply(scores, softcap)


# Both passes work heads-first: one transpose of q, k, v (and dout) up front instead of a
# strided operand in every chunk's matmuls, which ran faster on the CPU (BENCHMARKS.md).
def _chunked_forward(q_BLHd, k_BLKd, v_BLKd, segment_ids_BL, visibility, scoring, chunks):
  causal = visibility[0]
  num_kv_heads = k_BLKd.shape[2]
  q_BKGLd = _query_heads_first(q_BLHd, num_kv_heads)
  k_BKLd, v_BKLd = _kv_heads_first(k_BLKd), _kv_heads_first(v_BLKd)
  outs, logsumexps = [], []
  lowest = jnp.finfo(jnp.float32).min
  for start, end, num_keys in _chunks(q_BLHd.shape[1], causal, chunks):
    mask = _chunk_mask(segment_ids_BL, start, end, num_keys, visibility)
    scores_BKGQM = jnp.where(
        mask, _scores(q_BKGLd[:, :, :, start:end], k_BKLd[:, :, :num_keys], scoring), lowest
    )
    top_BKGQ1 = jnp.max(scores_BKGQM, axis=-1, keepdims=True)
    # A row that sees a key has a finite top, so its hidden keys' weights underflow to 0;
    # a row that sees none (padding) gives zeros and an infinite log-sum-exp.
    seen = top_BKGQ1 > lowest
    weights_BKGQM = jnp.exp(scores_BKGQM - top_BKGQ1)
    total_BKGQ1 = jnp.sum(weights_BKGQM, axis=-1, keepdims=True)
    out_BKGQd = jnp.einsum(
        'bkgqm,bkmd->bkgqd',
        weights_BKGQM.astype(v_BLKd.dtype),
        v_BKLd[:, :, :num_keys],
        preferred_element_type=jnp.float32,
    )
    # Normalised after the product, as flash attention does: one pass over Q x d, not Q x M.
    outs.append(out_BKGQd * jnp.where(seen, 1 / total_BKGQ1, 0.0))
    logsumexps.append(jnp.where(seen, top_BKGQ1 + jnp.log(total_BKGQ1), jnp.inf))
  out_BLHd = _sequence_first(jnp.concatenate(outs, axis=3)).astype(q_BLHd.dtype)
  out_BLHd, logsumexps = kernels.named_residuals(out_BLHd, logsumexps)
  return out_BLHd, (q_BLHd, k_BLKd, v_BLKd, segment_ids_BL, out_BLHd, logsumexps)


def _chunked_backward(visibility, scoring, chunks, residuals, dout_BLHd):
  causal = visibility[0]
  scale, softcap = scoring
  q_BLHd, k_BLKd, v_BLKd, segment_ids_BL, out_BLHd, logsumexps = residuals
  batch, length, num_heads, _ = q_BLHd.shape
  num_kv_heads = k_BLKd.shape[2]
  # The softmax gradient's row term, sum_d dout * out, per query head.
  delta_BLH = jnp.sum(dout_BLHd.astype(jnp.float32) * out_BLHd.astype(jnp.float32), axis=-1)
  delta_BKGL = jnp.transpose(
      delta_BLH.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads), (0, 2, 3, 1)
  )
  q_BKGLd, dout_BKGLd = (_query_heads_first(x, num_kv_heads) for x in (q_BLHd, dout_BLHd))
  k_BKLd, v_BKLd = _kv_heads_first(k_BLKd), _kv_heads_first(v_BLKd)
  dqs = []
  dk_BKLd = jnp.zeros(k_BKLd.shape, jnp.float32)
  dv_BKLd = jnp.zeros(v_BKLd.shape, jnp.float32)
  for (start, end, num_keys), logsumexp_BKGQ1 in zip(_chunks(length, causal, chunks), logsumexps):
    mask = _chunk_mask(segment_ids_BL, start, end, num_keys, visibility)
    q_BKGQd, dout_BKGQd = q_BKGLd[:, :, :, start:end], dout_BKGLd[:, :, :, start:end]
    k_BKMd, v_BKMd = k_BKLd[:, :, :num_keys], v_BKLd[:, :, :num_keys]
    scores_BKGQM = _scores(q_BKGQd, k_BKMd, scoring)
    probs_BKGQM = jnp.where(mask, jnp.exp(scores_BKGQM - logsumexp_BKGQ1), 0.0)
    dv_BKLd = dv_BKLd.at[:, :, :num_keys].add(
        jnp.einsum(
            'bkgqm,bkgqd->bkmd',
            probs_BKGQM.astype(dout_BLHd.dtype),
            dout_BKGQd,
            preferred_element_type=jnp.float32,
        )
    )
    dprobs_BKGQM = jnp.einsum(
        'bkgqd,bkmd->bkgqm', dout_BKGQd, v_BKMd, preferred_element_type=jnp.float32
    )
    dscores_BKGQM = softcap_lib.backward(
        probs_BKGQM * (dprobs_BKGQM - delta_BKGL[..., start:end, None]), scores_BKGQM, softcap
    )
    dscores_BKGQM = (dscores_BKGQM * scale).astype(q_BLHd.dtype)
    dqs.append(
        jnp.einsum('bkgqm,bkmd->bkgqd', dscores_BKGQM, k_BKMd, preferred_element_type=jnp.float32)
    )
    dk_BKLd = dk_BKLd.at[:, :, :num_keys].add(
        jnp.einsum('bkgqm,bkgqd->bkmd', dscores_BKGQM, q_BKGQd, preferred_element_type=jnp.float32)
    )
  dq_BLHd = _sequence_first(jnp.concatenate(dqs, axis=3))
  return (
      dq_BLHd.astype(q_BLHd.dtype),
      _kv_heads_first(dk_BKLd).astype(k_BLKd.dtype),
      _kv_heads_first(dv_BKLd).astype(v_BLKd.dtype),
      None,
  )


_chunked_attention.defvjp(_chunked_forward, _chunked_backward)


def _cudnn_attention(q_BLHd, k_BLKd, v_BLKd, segment_ids_BL, causal, scale, window):
  mask = None
  if segment_ids_BL is not None:
    # cuDNN takes a dense mask; the Pallas kernel skips masked blocks instead.
    mask = attention_mask(segment_ids_BL, q_BLHd.shape[1], causal=False)[:, None]
  return jax.nn.dot_product_attention(
      q_BLHd,
      k_BLKd,
      v_BLKd,
      mask=mask,
      scale=scale,
      is_causal=causal,
      local_window_size=(window - 1, 0 if causal else window - 1) if window else None,
      implementation='cudnn',
  )
