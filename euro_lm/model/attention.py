"""Attention: one function, several backends.

`impl='xla'` is the reference (plain einsums, any platform); `impl='cudnn'` calls
`jax.nn.dot_product_attention(implementation='cudnn')` (NVIDIA GPUs); `impl='pallas'` is
euro_lm's flash attention kernels (euro_lm.kernels: Triton on GPUs, Mosaic on TPUs,
interpreted on CPU); `impl='auto'` is pallas on GPUs and TPUs when the sequence length fits
the kernels' default blocks, and xla otherwise. All take q `[B, L, H, D]` and k, v
`[B, L, K, D]` with K dividing H (grouped-query attention: K/V are never repeated in
memory) and optional packed-document `segment_ids` `[B, L]`: a token attends only to
earlier tokens of its own segment, and segment 0 is padding that attends nowhere (its
output is zero).
"""

import jax
import jax.numpy as jnp

IMPLS = ('xla', 'cudnn', 'pallas', 'auto')


def attention(q_BLHD, k_BLKD, v_BLKD, *, segment_ids_BL=None, causal=True,
              scale=None, impl='xla'):
  """Returns the attention output `[B, L, H, D]` in q's dtype."""
  num_heads, num_kv_heads = q_BLHD.shape[2], k_BLKD.shape[2]
  if num_heads % num_kv_heads:
    raise ValueError(f'{num_heads} query heads are not a multiple of {num_kv_heads} kv heads')
  scale = q_BLHD.shape[-1] ** -0.5 if scale is None else scale
  if impl == 'auto':
    impl = _auto_impl(q_BLHD.shape[1], q_BLHD.shape[-1])
  if impl == 'pallas':
    from euro_lm.kernels import flash_attention  # pylint: disable=g-import-not-at-top
    return flash_attention(q_BLHD, k_BLKD, v_BLKD, segment_ids=segment_ids_BL, causal=causal,
                           scale=scale)
  if impl == 'xla':
    return _xla_attention(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, causal, scale)
  if impl == 'cudnn':
    return _cudnn_attention(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, causal, scale)
  raise ValueError(f'unknown attention impl {impl!r}; expected one of {IMPLS}')


def _auto_impl(length, head_dim):
  platform = jax.default_backend()  # 'gpu' for CUDA and ROCm
  if platform in ('gpu', 'tpu'):
    from euro_lm.kernels import length_multiple  # pylint: disable=g-import-not-at-top
    if length % length_multiple(head_dim, platform) == 0:
      return 'pallas'
  return 'xla'


def attention_mask(segment_ids_BL, length, causal):
  """Boolean `[B or 1, L, L]` mask: True where query i may attend to key j."""
  mask_1LL = jnp.ones((1, length, length), bool)
  if causal:
    mask_1LL = jnp.tril(mask_1LL)
  if segment_ids_BL is None:
    return mask_1LL
  same_segment_BLL = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
  not_padding_BL1 = (segment_ids_BL != 0)[:, :, None]
  return mask_1LL & same_segment_BLL & not_padding_BL1


# Causal xla attention splits the queries into this many chunks, each against only the keys
# up to its last query: 62.5% of the score matrix for 4 chunks, and about 2x faster
# forward+backward on CPU at L = 512. Below _MIN_CHUNKED_LENGTH one chunk is faster.
_QUERY_CHUNKS = 4
_MIN_CHUNKED_LENGTH = 256


def xla_query_chunks(length, causal):
  """How many query chunks the `xla` attention splits `length` queries into."""
  if causal and length >= _MIN_CHUNKED_LENGTH and length % _QUERY_CHUNKS == 0:
    return _QUERY_CHUNKS
  return 1


def _xla_attention(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, causal, scale):
  length = q_BLHD.shape[1]
  chunks = xla_query_chunks(length, causal)
  size = length // chunks
  outs = []
  for c in range(chunks):
    start, end = c * size, (c + 1) * size
    keys = end if causal else length  # keys after a chunk's last query are all masked
    outs.append(_xla_attention_rows(
        q_BLHD[:, start:end], k_BLKD[:, :keys], v_BLKD[:, :keys],
        None if segment_ids_BL is None else segment_ids_BL[:, start:end],
        None if segment_ids_BL is None else segment_ids_BL[:, :keys], start, causal, scale))
  return outs[0] if chunks == 1 else jnp.concatenate(outs, axis=1)


def _xla_attention_rows(q_BQHD, k_BMKD, v_BMKD, q_segments_BQ, k_segments_BM, first_query,
                        causal, scale):
  """Queries first_query .. first_query + Q against keys 0 .. M."""
  batch, num_queries, num_heads, head_dim = q_BQHD.shape
  num_keys, num_kv_heads = k_BMKD.shape[1], k_BMKD.shape[2]
  # Group query heads by their kv head instead of repeating K/V.
  q_BQKGD = q_BQHD.reshape(batch, num_queries, num_kv_heads, num_heads // num_kv_heads,
                           head_dim)
  logits_BKGQM = jnp.einsum('bqkgd,bmkd->bkgqm', q_BQKGD, k_BMKD,
                            preferred_element_type=jnp.float32) * scale
  mask_BQM = jnp.ones((1, num_queries, num_keys), bool)
  if causal:
    positions_Q = first_query + jnp.arange(num_queries)
    mask_BQM = (positions_Q[:, None] >= jnp.arange(num_keys)[None, :])[None]
  if q_segments_BQ is not None:
    mask_BQM = (mask_BQM & (q_segments_BQ[:, :, None] == k_segments_BM[:, None, :])
                & (q_segments_BQ != 0)[:, :, None])
  logits_BKGQM = jnp.where(mask_BQM[:, None, None], logits_BKGQM, jnp.finfo(jnp.float32).min)
  probs_BKGQM = jax.nn.softmax(logits_BKGQM, axis=-1)
  # A row that sees no key at all (padding) gives zeros.
  probs_BKGQM = jnp.where(mask_BQM[:, None, None], probs_BKGQM, 0.0)
  out_BQKGD = jnp.einsum('bkgqm,bmkd->bqkgd', probs_BKGQM.astype(v_BMKD.dtype), v_BMKD,
                         preferred_element_type=jnp.float32)
  return out_BQKGD.reshape(batch, num_queries, num_heads, head_dim).astype(q_BQHD.dtype)


def _cudnn_attention(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, causal, scale):
  mask = None
  if segment_ids_BL is not None:
    # cuDNN takes a dense mask; the Pallas kernel skips masked blocks instead.
    mask = attention_mask(segment_ids_BL, q_BLHD.shape[1], causal=False)[:, None]
  return jax.nn.dot_product_attention(q_BLHD, k_BLKD, v_BLKD, mask=mask, scale=scale,
                                      is_causal=causal, implementation='cudnn')
