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


def _xla_attention(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, causal, scale):
  batch, length, num_heads, head_dim = q_BLHD.shape
  num_kv_heads = k_BLKD.shape[2]
  # Group query heads by their kv head instead of repeating K/V.
  q_BLKGD = q_BLHD.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
  logits_BKGLL = jnp.einsum('blkgd,bmkd->bkglm', q_BLKGD, k_BLKD,
                            preferred_element_type=jnp.float32) * scale
  mask_BLL = attention_mask(segment_ids_BL, length, causal)
  logits_BKGLL = jnp.where(mask_BLL[:, None, None], logits_BKGLL, jnp.finfo(jnp.float32).min)
  probs_BKGLL = jax.nn.softmax(logits_BKGLL, axis=-1)
  # A row that sees no key at all (padding) gives zeros.
  probs_BKGLL = jnp.where(mask_BLL[:, None, None], probs_BKGLL, 0.0)
  out_BLKGD = jnp.einsum('bkglm,bmkd->blkgd', probs_BKGLL.astype(v_BLKD.dtype), v_BLKD,
                         preferred_element_type=jnp.float32)
  return out_BLKGD.reshape(batch, length, num_heads, head_dim).astype(q_BLHD.dtype)


def _cudnn_attention(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, causal, scale):
  mask = None
  if segment_ids_BL is not None:
    # cuDNN takes a dense mask; the Pallas kernel skips masked blocks instead.
    mask = attention_mask(segment_ids_BL, q_BLHD.shape[1], causal=False)[:, None]
  return jax.nn.dot_product_attention(q_BLHD, k_BLKD, v_BLKD, mask=mask, scale=scale,
                                      is_causal=causal, implementation='cudnn')
