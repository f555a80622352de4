"""The decoder: embedding, a scanned stack of blocks, final norm, output projection."""

import jax
import jax.numpy as jnp
from flax import linen as nn

from euro_lm.model.layers import Block, RMSNorm

# Named rematerialisation policies (`model.remat_policy`): what the backward pass keeps.
REMAT_POLICIES = {
    'none': None,  # no remat: keep every activation
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'save_attention_out': jax.checkpoint_policies.save_only_these_names('attention_out'),
}


class Decoder(nn.Module):
  """Llama-family decoder. `apply(params, tokens_BL, segment_ids_BL, positions_BL)`
  returns float32 logits `[B, L, V]`."""
  config: 'ml_collections.ConfigDict'  # the `model` section

  @nn.compact
  def __call__(self, tokens_BL, segment_ids_BL=None, positions_BL=None):
    cfg = self.config
    dtype = jnp.dtype(cfg.compute_dtype)
    if positions_BL is None:
      positions_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)

    embedding_VD = self.param(
        'embedding', nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                  ('vocab', 'embed')),
        (cfg.vocab_size, cfg.embed_dim), jnp.float32)
    x_BLD = jnp.take(embedding_VD, tokens_BL, axis=0).astype(dtype)
    x_BLD = nn.with_logical_constraint(x_BLD, ('batch', 'length', 'embed'))

    block = Block
    if cfg.remat_policy != 'none':
      block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
    stack = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True},
                    in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
                    metadata_params={nn.PARTITION_NAME: 'layers'})
    x_BLD, _ = stack(cfg, name='layers')(x_BLD, segment_ids_BL, positions_BL)
    x_BLD = RMSNorm(cfg.norm_eps, name='final_norm')(x_BLD)

    if cfg.tie_embeddings:
      logits_BLV = jnp.einsum('bld,vd->blv', x_BLD, embedding_VD.astype(dtype),
                              preferred_element_type=jnp.float32)
    else:
      output_DV = self.param(
          'output', nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                 ('embed', 'vocab')),
          (cfg.embed_dim, cfg.vocab_size), jnp.float32)
      logits_BLV = jnp.einsum('bld,dv->blv', x_BLD, output_DV.astype(dtype),
                              preferred_element_type=jnp.float32)
    return nn.with_logical_constraint(logits_BLV, ('batch', 'length', 'vocab'))
