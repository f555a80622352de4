"""Soft-capping (Gemma 2): logits pass through `cap * tanh(logits / cap)`, so that none
exceeds `cap` in size; a cap of 0 leaves them as they are. The attention scores and the
output logits each have their own cap (`model.attn_logit_softcap`,
`model.final_logit_softcap`).
"""

import jax.numpy as jnp


def apply(logits, cap):
  """`cap * tanh(logits / cap)`, or `logits` when `cap` is 0."""
  return cap * jnp.tanh(logits / cap) if cap else logits


def scaled(scores, scale, cap):
  """`apply(scores * scale, cap)` with one multiply per score and no division: what the
  attention kernels take of raw q.k scores, in their inner loops."""
  return cap * jnp.tanh(scores * (scale / cap)) if cap else scores * scale


def backward(d_capped, capped, cap):
  """The gradient with respect to the logits, from the gradient with respect to the capped
  logits and the capped logits themselves: d tanh(u) = 1 - tanh(u)^2."""
  return d_capped * (1.0 - jnp.square(capped * (1.0 / cap))) if cap else d_capped
