"""The decoder: embedding, a scanned stack of blocks, final norm, output projection.

Decoding with a KV cache uses the same params: `apply(params, tokens_BT, segment_ids_BT,
positions_BT, cache=cache)` (cache from `init_cache`) returns `(logits_BTV, cache)` with
the T new tokens' K/V written at slots `cache['index'] ...` and the index advanced by T.
"""

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from euro_lm import kernels
from euro_lm import softcap as softcap_lib
from euro_lm.model import fp8
from euro_lm.model.layers import Block, head_dim, norm

_ATTENTION = jax.checkpoint_policies.save_only_these_names(kernels.OUT_NAME, kernels.LSE_NAME)

# Named rematerialisation policies (`model.remat_policy`): what the backward pass keeps.
REMAT_POLICIES = {
    'none': None,  # no remat: keep every activation
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # The attention's output and log-sum-exp: its backward reruns no forward.
    'save_attention_out': _ATTENTION,
    # dots_no_batch and the attention's: the backward recomputes only the elementwise ops.
    'dots_and_attention': jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _ATTENTION
    ),
}


class Decoder(nn.Module):
  """Llama-family decoder. `apply(params, tokens_BL, segment_ids_BL, positions_BL)`
  returns float32 logits `[B, L, V]` (soft-capped by `model.final_logit_softcap`); with
  `return_hidden=True`, the final-normed hidden states `[B, L, D]` the logits are made
  from (for `euro_lm.model.loss`)."""

  config: ml_collections.ConfigDict  # the `model` section

  @nn.compact
  def __call__(
      self, tokens_BL, segment_ids_BL=None, positions_BL=None, cache=None, return_hidden=False
  ):
    cfg = self.config
    dtype = jnp.dtype(cfg.compute_dtype)
    if positions_BL is None:
      positions_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)

    embedding_VD = self.param(
        'embedding',
        nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ('vocab', 'embed')),
        (cfg.vocab_size, cfg.embed_dim),
        jnp.float32,
    )
    with jax.named_scope('embed'):  # named scopes: the parts of the step in a profile
      x_BLD = jnp.take(embedding_VD, tokens_BL, axis=0).astype(dtype)
      if cfg.get('scale_embeddings', False):  # in the compute dtype, as Gemma does
        x_BLD = x_BLD * jnp.asarray(cfg.embed_dim**0.5, dtype)
    x_BLD = nn.with_logical_constraint(x_BLD, ('batch', 'length', 'embed'))

    if cache is None:
      block = Block
      if cfg.remat_policy != 'none':
        block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
      stack = nn.scan(
          block,
          variable_axes={'params': 0, fp8.COLLECTION: 0},
          split_rngs={'params': True},
          in_axes=(nn.broadcast, nn.broadcast, 0),
          length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: 'layers'},
      )
      x_BLD, _ = stack(cfg, name='layers')(
          x_BLD, segment_ids_BL, positions_BL, jnp.arange(cfg.num_layers)
      )
    else:
      x_BLD, cache = self._decode_layers(x_BLD, segment_ids_BL, positions_BL, cache)
    x_BLD = norm(cfg, 'final_norm')(x_BLD)
    if return_hidden:
      if cache is not None:
        raise ValueError('return_hidden is for training and evaluation, not with a KV cache')
      return x_BLD

    if cfg.tie_embeddings:
      with jax.named_scope('logits'):
        logits_BLV = jnp.einsum(
            'bld,vd->blv', x_BLD, embedding_VD.astype(dtype), preferred_element_type=jnp.float32
        )
    else:
      output_DV = self.param(
          'output',
          nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ('embed', 'vocab')),
          (cfg.embed_dim, cfg.vocab_size),
          jnp.float32,
      )
      with jax.named_scope('logits'):
        logits_BLV = jnp.einsum(
            'bld,dv->blv', x_BLD, output_DV.astype(dtype), preferred_element_type=jnp.float32
        )
    logits_BLV = softcap_lib.apply(logits_BLV, cfg.get('final_logit_softcap', 0.0))
    logits_BLV = nn.with_logical_constraint(logits_BLV, ('batch', 'length', 'vocab'))
    return logits_BLV if cache is None else (logits_BLV, cache)

  def _decode_layers(self, x_BTD, segment_ids_BT, positions_BT, cache):
    """The block stack over T new tokens with the KV cache; same param names as training.

    Each row holds one document: `segment_ids_BT` only marks padding (0), never packing.
    """
    cfg = self.config
    index = cache['index']
    new_valid_BT = (
        jnp.ones(x_BTD.shape[:2], bool) if segment_ids_BT is None else segment_ids_BT != 0
    )
    kv_valid_BS = jax.lax.dynamic_update_slice(cache['valid'], new_valid_BT, (0, index))
    # No remat: nothing is differentiated here. The per-layer cache is scanned over.
    stack = nn.scan(
        Block,
        variable_axes={'params': 0},
        split_rngs={'params': True},
        in_axes=(nn.broadcast, nn.broadcast, 0, 0, nn.broadcast),
        length=cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: 'layers'},
    )
    x_BTD, (k_NBSKd, v_NBSKd) = stack(cfg, name='layers')(
        x_BTD,
        segment_ids_BT,
        positions_BT,
        jnp.arange(cfg.num_layers),
        (cache['k'], cache['v']),
        (index, kv_valid_BS),
    )
    return x_BTD, {
        'k': k_NBSKd,
        'v': v_NBSKd,
        'valid': kv_valid_BS,
        'index': index + x_BTD.shape[1],
    }


def init_cache(model_config, batch_size, max_len):
  """An empty KV cache for `Decoder(model_config)`: K and V `[layers, B, max_len, K, head_dim]`
  in the compute dtype, no valid slot, write index 0."""
  shape = (
      model_config.num_layers,
      batch_size,
      max_len,
      model_config.num_kv_heads,
      head_dim(model_config),
  )
  dtype = jnp.dtype(model_config.compute_dtype)
  return {
      'k': jnp.zeros(shape, dtype),
      'v': jnp.zeros(shape, dtype),
      'valid': jnp.zeros((batch_size, max_len), bool),
      'index': jnp.zeros((), jnp.int32),
  }
