"""The output projection and the cross-entropy, fused, a chunk of positions at a time.

With a large vocabulary the logits are a step's biggest activation: `[B, L, V]` float32
logits, their float32 gradient and, in 16-bit compute, a 16-bit copy of that gradient.
At V = 64k that is 20 GiB per 32k tokens. With `model.loss_chunk_length = C > 0` the
train and eval steps take the model's final hidden states and make the logits here, C
positions at a time, holding one `[B, C, V]` block at once.

The train step's loss is `sum(w * nll) + z * sum(w * logz^2)`. Its gradient with respect
to one token's logits, `w * ((1 + 2 z logz) * softmax(logits) - onehot(target))`, needs
only that token's logits. So the forward pass makes each chunk's logits once and uses them
for the loss, the hidden-state gradient dX and the head gradient dW before moving on; the
backward pass scales the saved dX and dW by the incoming cotangent. That is the unfused
loss's three matmuls (logits, dX, dW) with no recompute, and float32 accumulation
throughout.

On a mesh that splits the batch, each device adds its chunks' dW into its own float32
partial (`[V / tensor, D]` per device, unsplit over fsdp), and the devices reduce the
partials once, after the last chunk, as the plain loss does. Summing across devices in
every chunk would move the head gradient once per chunk.

With `model.final_logit_softcap` (Gemma 2) the logits are soft-capped before the loss
(`euro_lm.softcap`), and their gradient goes back through the cap in the same pass.

Reverse mode only (`jax.custom_vjp`): `jax.jvp` through the fused loss is not defined.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from euro_lm import softcap as softcap_lib
from euro_lm.sharding import mesh_axes_size


def output_head(params, model_config):
  """The output projection as `[V, D]`: the embedding when tied, else `output` transposed."""
  if model_config.tie_embeddings:
    return params['embedding']
  return params['output'].T


def _split(chunk, *arrays_BL):
  """Pads each `[B, L, ...]` array with zeros to a multiple of `chunk` positions and stacks
  the chunks first: `[N, B, chunk, ...]`. Zero weights make the padding count for nothing."""
  length = arrays_BL[0].shape[1]
  padded = -(-length // chunk) * chunk
  out = []
  for x in arrays_BL:
    x = jnp.pad(x, [(0, 0), (0, padded - length)] + [(0, 0)] * (x.ndim - 2))
    out.append(jnp.moveaxis(x.reshape(x.shape[0], padded // chunk, chunk, *x.shape[2:]), 1, 0))
  return out


def _merge(length, x_NBC):
  """Inverse of `_split` for one array: `[N, B, C, ...]` -> `[B, L, ...]`."""
  x = jnp.moveaxis(x_NBC, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


def _chunk_losses(x_BCD, head_VD, targets_BC, softcap):
  """float32 (soft-capped) logits of one chunk, their log-partition and each token's nll."""
  logits_BCV = jnp.einsum('bcd,vd->bcv', x_BCD, head_VD, preferred_element_type=jnp.float32)
  logits_BCV = softcap_lib.apply(logits_BCV, softcap)
  logits_BCV = nn.with_logical_constraint(logits_BCV, ('batch', 'length', 'vocab'))
  logz_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
  target_BC = jnp.take_along_axis(logits_BCV, targets_BC[..., None], axis=-1)[..., 0]
  return logits_BCV, logz_BC, logz_BC - target_BC


def _chunk_length(chunk, length):
  return max(1, min(chunk, length))


def batch_shards():
  """How many ways the mesh in context splits the logical 'batch' axis (1 outside a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  return mesh_axes_size(mesh, nn.logical_to_mesh_axes(('batch',))[0])


@jax.named_scope('loss')  # the part of the step it is in a profile
def token_losses(x_BLD, head_VD, targets_BL, *, chunk, dtype, softcap=0.0):
  """Per-token float32 `(nll_BL, logz_BL)` from final hidden states, `chunk` positions at a
  time (forward only: evaluation); `softcap` is `model.final_logit_softcap`."""
  length = x_BLD.shape[1]
  head_VD = head_VD.astype(dtype)

  def body(_, xs):
    x_BCD, targets_BC = xs
    _, logz_BC, nll_BC = _chunk_losses(x_BCD.astype(dtype), head_VD, targets_BC, softcap)
    return None, (nll_BC, logz_BC)

  _, (nll, logz) = jax.lax.scan(body, None, _split(_chunk_length(chunk, length), x_BLD, targets_BL))
  return _merge(length, nll), _merge(length, logz)


@jax.named_scope('loss')  # the part of the step it is in a profile
def loss_sums(x_BLD, head_VD, targets_BL, weights_BL, *, z_loss, chunk, dtype, softcap=0.0):
  """`(objective, loss_sum)` of the train step: `loss_sum = sum(w * nll)` and
  `objective = loss_sum + z_loss * sum(w * logz^2)`, differentiable in `x_BLD` and
  `head_VD` through the objective (the loss_sum is a report and is not differentiated)."""
  objective, loss_sum = _fused_loss(
      chunk,
      jnp.dtype(dtype).name,
      float(z_loss),
      float(softcap),
      batch_shards(),
      x_BLD,
      head_VD,
      targets_BL,
      weights_BL,
  )
  return objective, jax.lax.stop_gradient(loss_sum)


@jax.named_scope('loss')  # the part of the step it is in a profile
def objective_and_loss_sum(nll_BL, logz_BL, weights_BL, z_loss):
  """The train step's `(sum(w * nll) + z_loss * sum(w * logz^2), sum(w * nll))`."""
  loss_sum = jnp.sum(nll_BL * weights_BL)
  return loss_sum + z_loss * jnp.sum(jnp.square(logz_BL) * weights_BL), loss_sum


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _fused_loss(chunk, dtype, z_loss, softcap, shards, x_BLD, head_VD, targets_BL, weights_BL):
  del shards
  nll_BL, logz_BL = token_losses(
      x_BLD, head_VD, targets_BL, chunk=chunk, dtype=dtype, softcap=softcap
  )
  return objective_and_loss_sum(nll_BL, logz_BL, weights_BL, z_loss)


def _fused_loss_fwd(chunk, dtype, z_loss, softcap, shards, x_BLD, head_VD, targets_BL, weights_BL):
  length = x_BLD.shape[1]
  head_c_VD = head_VD.astype(dtype)
  by_shard = lambda a: a.reshape(shards, a.shape[0] // shards, *a.shape[1:])

  def body(d_head_SVD, xs):
    x_BCD, targets_BC, weights_BC = xs
    x_BCD = x_BCD.astype(dtype)
    logits_BCV, logz_BC, nll_BC = _chunk_losses(x_BCD, head_c_VD, targets_BC, softcap)
    # d objective / d logits, in float32; the matmuls take it in the compute dtype.
    probs_BCV = jnp.exp(logits_BCV - logz_BC[..., None])
    scale_BC = weights_BC * (1.0 + 2.0 * z_loss * logz_BC)
    is_target_BCV = jnp.arange(logits_BCV.shape[-1]) == targets_BC[..., None]
    d_logits_BCV = softcap_lib.backward(
        scale_BC[..., None] * probs_BCV - jnp.where(is_target_BCV, weights_BC[..., None], 0.0),
        logits_BCV,
        softcap,
    ).astype(dtype)
    d_logits_BCV = nn.with_logical_constraint(d_logits_BCV, ('batch', 'length', 'vocab'))
    d_x_BCD = jnp.einsum(
        'bcv,vd->bcd', d_logits_BCV, head_c_VD, preferred_element_type=jnp.float32
    ).astype(x_BLD.dtype)
    # Each batch shard's partial dW stays on its devices until after the last chunk.
    d_head_SVD += nn.with_logical_constraint(
        jnp.einsum(
            'sbcv,sbcd->svd',
            by_shard(d_logits_BCV),
            by_shard(x_BCD),
            preferred_element_type=jnp.float32,
        ),
        ('batch', 'vocab', None),
    )
    return d_head_SVD, (nll_BC, logz_BC, d_x_BCD)

  d_head_SVD = nn.with_logical_constraint(
      jnp.zeros((shards, *head_VD.shape), jnp.float32), ('batch', 'vocab', None)
  )
  d_head_SVD, (nll, logz, d_x) = jax.lax.scan(
      body, d_head_SVD, _split(_chunk_length(chunk, length), x_BLD, targets_BL, weights_BL)
  )
  nll_BL, logz_BL = _merge(length, nll), _merge(length, logz)
  sums = objective_and_loss_sum(nll_BL, logz_BL, weights_BL, z_loss)
  # Kept in the input dtypes: dX is the size of X, dW of the head. d objective / d weights
  # is each token's own term.
  d_weights_BL = nll_BL + z_loss * jnp.square(logz_BL)
  return sums, (
      _merge(length, d_x),
      jnp.sum(d_head_SVD, axis=0).astype(head_VD.dtype),
      targets_BL,
      d_weights_BL.astype(weights_BL.dtype),
  )


def _fused_loss_bwd(chunk, dtype, z_loss, softcap, shards, residuals, cotangents):
  del chunk, dtype, z_loss, softcap, shards
  d_x_BLD, d_head_VD, targets_BL, d_weights_BL = residuals
  d_objective, _ = cotangents  # the loss_sum output is under stop_gradient
  return (
      (d_objective * d_x_BLD).astype(d_x_BLD.dtype),
      (d_objective * d_head_VD).astype(d_head_VD.dtype),
      np.zeros(targets_BL.shape, jax.dtypes.float0),
      (d_objective * d_weights_BL).astype(d_weights_BL.dtype),
  )


_fused_loss.defvjp(_fused_loss_fwd, _fused_loss_bwd)
