"""Pure train and eval steps. `make_train_step` returns a jitted, state-donating step."""

import functools

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from euro_lm import sharding
from euro_lm.data import pipeline
from euro_lm.finite import finite_flags
from euro_lm.model import fp8, lora, loss

BATCH_KEYS = ('inputs', 'targets', 'segment_ids', 'positions')
# Optional: 1 where the target counts in the loss (fine-tuning on conversations).
LOSS_MASK = pipeline.LOSS_MASK
REPLICAS = 'replicas'  # the vmapped axis of `_gradient_sums`


def _weights(batch):
  weights = (batch['segment_ids'] != 0).astype(jnp.float32)  # segment 0 is padding
  if LOSS_MASK in batch:
    weights *= batch[LOSS_MASK].astype(jnp.float32)
  return weights


def _hidden(model, params, batch, fp8_state=None):
  return model.apply(
      fp8.variables(params, fp8_state),
      batch['inputs'],
      batch['segment_ids'],
      batch['positions'],
      return_hidden=True,
  )


def token_losses(model, params, batch, fp8_state=None):
  """Per-token float32 negative log-likelihood, log-partition and loss weights; the
  projections in fp8 when `fp8_state` is given (`euro_lm.model.fp8`)."""
  cfg = model.config
  if cfg.loss_chunk_length:
    nll_BL, logz_BL = loss.token_losses(
        _hidden(model, params, batch, fp8_state),
        loss.output_head(params, cfg),
        batch['targets'],
        chunk=cfg.loss_chunk_length,
        dtype=cfg.compute_dtype,
        softcap=cfg.get('final_logit_softcap', 0.0),
    )
    return nll_BL, logz_BL, _weights(batch)
  logits_BLV = model.apply(
      fp8.variables(params, fp8_state), batch['inputs'], batch['segment_ids'], batch['positions']
  )
  with jax.named_scope('loss'):  # as euro_lm.model.loss's functions: a part in a profile
    logz_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
    target_BL = jnp.take_along_axis(logits_BLV, batch['targets'][..., None], axis=-1)[..., 0]
  return logz_BL - target_BL, logz_BL, _weights(batch)


def _loss_sums(params, batch, model, z_loss, fp8_state=None):
  """`(objective, (loss_sum, weight_sum))`; with `model.loss_chunk_length` the output
  projection and loss run fused, a chunk of positions at a time (`euro_lm.model.loss`)."""
  cfg = model.config
  if cfg.loss_chunk_length:
    weights_BL = _weights(batch)
    objective, loss_sum = loss.loss_sums(
        _hidden(model, params, batch, fp8_state),
        loss.output_head(params, cfg),
        batch['targets'],
        weights_BL,
        z_loss=z_loss,
        chunk=cfg.loss_chunk_length,
        dtype=cfg.compute_dtype,
        softcap=cfg.get('final_logit_softcap', 0.0),
    )
    return objective, (loss_sum, jnp.sum(weights_BL))
  nll_BL, logz_BL, weights_BL = token_losses(model, params, batch, fp8_state)
  objective, loss_sum = loss.objective_and_loss_sum(nll_BL, logz_BL, weights_BL, z_loss)
  return objective, (loss_sum, jnp.sum(weights_BL))


def _micro_batches(batch, num_micro):
  """[B, L] -> [A, B/A, L] taking every A-th row, so each device keeps its own rows."""

  def split(x_BL):
    x = x_BL.reshape(x_BL.shape[0] // num_micro, num_micro, *x_BL.shape[1:])
    x = jnp.swapaxes(x, 0, 1)
    return nn.with_logical_constraint(x, (None, 'batch', 'length'))

  return jax.tree.map(split, batch)


def _grad_fn(trainable, frozen, fp8_state, batch, model, z_loss):
  """`((grads, next fp8 state), (loss_sum, weight_sum))` of one (micro-)batch."""
  return jax.grad(
      lambda trained, fp8_state: _loss_sums(
          lora.join(frozen, trained), batch, model, z_loss, fp8_state
      ),
      argnums=(0, 1),
      has_aux=True,
  )(trainable, fp8_state)


def _accumulated(trainable, frozen, fp8_state, batch, model, z_loss, num_micro, replicas=()):
  """`(grads, loss_sum, weight_sum, fp8_state)` summed over `num_micro` micro-batches, the
  fp8 state threaded through them. Under a vmap named `replicas`, each replica sums its
  own micro-batches and the replicas add their sums once, after the loop; the fp8 state
  takes the largest magnitudes any replica saw, as it would on one device."""

  def accumulate(carry, micro):
    sums, fp8_state = carry
    (grads, fp8_state), (loss_sum, weight_sum) = _grad_fn(
        trainable, frozen, fp8_state, micro, model, z_loss
    )
    fp8_state = jax.lax.pmax(fp8_state, replicas)
    return (jax.tree.map(jnp.add, sums, (grads, loss_sum, weight_sum)), fp8_state), None

  zeros = (jax.tree.map(jnp.zeros_like, trainable), jnp.zeros(()), jnp.zeros(()))
  (sums, fp8_state), _ = jax.lax.scan(
      accumulate, (zeros, fp8_state), _micro_batches(batch, num_micro)
  )
  return (*jax.lax.psum(sums, replicas), fp8_state)


def _gradient_sums(trainable, frozen, fp8_state, batch, model, z_loss, num_micro, replicas):
  """`(grads, loss_sum, weight_sum, fp8_state)` of the batch.

  With micro-batches and `replicas` (`sharding.replica_axes`, e.g. ('data',)), the
  gradients cross those mesh axes once per step: a vmap over the replicas, sharded over
  those axes (`spmd_axis_name`), gives each device its own rows to sum; left to XLA, they
  were all-reduced after every micro-batch. (A `shard_map` manual over them crashes XLA's
  partitioner when the weights are split over fsdp and tensor, in jax 0.10.)
  """
  if num_micro == 1:
    (grads, fp8_state), (loss_sum, weight_sum) = _grad_fn(
        trainable, frozen, fp8_state, batch, model, z_loss
    )
    return grads, loss_sum, weight_sum, fp8_state
  if not replicas:
    return _accumulated(trainable, frozen, fp8_state, batch, model, z_loss, num_micro)
  inner_rules = sharding.without_mesh_axes(nn.get_logical_axis_rules(), replicas)
  num_replicas = sharding.mesh_axes_size(jax.sharding.get_abstract_mesh(), replicas)
  rows_spec = P(replicas, sharding.batch_mesh_axes(inner_rules) or None)

  def by_replica(x_BL):  # [B, ...] -> [replicas, B / replicas, ...]: no data moves
    x = x_BL.reshape(num_replicas, x_BL.shape[0] // num_replicas, *x_BL.shape[1:])
    return jax.lax.with_sharding_constraint(x, rows_spec)

  def replica_sums(batch):
    with nn.logical_axis_rules(inner_rules):
      return _accumulated(trainable, frozen, fp8_state, batch, model, z_loss, num_micro, REPLICAS)

  return jax.vmap(replica_sums, axis_name=REPLICAS, spmd_axis_name=replicas, out_axes=None)(
      jax.tree.map(by_replica, batch)
  )


def train_step(
    state,
    batch,
    *,
    model,
    tx,
    schedule,
    grad_accum_steps,
    z_loss,
    nonfinite_policy='stop',
    skip_grad_norm_above=0.0,
    param_shardings=None,
):
  """One optimizer step on a global batch; the loss is the token-weighted mean.

  `nonfinite_policy='skip'` keeps the params and optimizer state unchanged when the loss,
  the gradient norm or the updated params are not finite (or the norm exceeds
  `skip_grad_norm_above`, if set) and counts the skip in the state; the step counter
  advances either way. Metrics carry
  per-weight finiteness flags of the gradients and of the new params for error reports.

  Only the trainable params (`lora.trainable`: all, or the LoRA adapters) are
  differentiated and updated, so no weight gradient of a frozen weight is computed.

  The fp8 state (`state.fp8`, `{}` without `model.fp8`) is not trained: its "gradient" is
  its next value (Flax's delayed scaling), which replaces it, micro-batch after
  micro-batch; it takes no part in clipping, the gradient norm or AdamW.
  """
  trainable, frozen = lora.trainable(state.params)
  batch = {k: batch[k] for k in (*BATCH_KEYS, LOSS_MASK) if k in batch}
  replicas = ()
  if param_shardings is not None:
    mesh = jax.sharding.get_abstract_mesh()
    replicas = sharding.replica_axes(nn.get_logical_axis_rules(), param_shardings, mesh)
  grads, loss_sum, weight_sum, fp8_state = _gradient_sums(
      trainable, frozen, state.fp8, batch, model, z_loss, grad_accum_steps, replicas
  )
  with jax.named_scope('optimizer'):  # clipping, AdamW, the skip rule
    weight_sum = jnp.maximum(weight_sum, 1.0)
    grads = jax.tree.map(lambda g: g / weight_sum, grads)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    params = lora.join(frozen, optax.apply_updates(trainable, updates))
    params_finite = finite_flags(params)
    skipped_in_a_row, skipped_total = state.skipped_in_a_row, state.skipped_total
    if nonfinite_policy == 'skip':
      apply = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)
      apply &= jnp.all(jnp.stack([jnp.all(f) for f in jax.tree.leaves(params_finite)]))
      if skip_grad_norm_above:
        apply &= grad_norm <= skip_grad_norm_above
      keep_old = lambda new, old: jnp.where(apply, new, old)
      params = jax.tree.map(keep_old, params, state.params)
      opt_state = jax.tree.map(keep_old, opt_state, state.opt_state)
      fp8_state = jax.tree.map(keep_old, fp8_state, state.fp8)
      skipped_in_a_row = jnp.where(apply, 0, skipped_in_a_row + 1)
      skipped_total += jnp.where(apply, 0, 1)
  metrics = {
      'loss': loss_sum / weight_sum,
      'grad_norm': grad_norm,
      'learning_rate': schedule(state.step),
      'tokens': weight_sum,
      'skipped_in_a_row': skipped_in_a_row,
      'skipped_total': skipped_total,
      'grads_finite': finite_flags(grads),
      'params_finite': params_finite,
  }
  return (
      state.replace(
          step=state.step + 1,
          params=params,
          opt_state=opt_state,
          skipped_in_a_row=skipped_in_a_row,
          skipped_total=skipped_total,
          fp8=fp8_state,
      ),
      metrics,
  )


def eval_step(params, batch, *, model):
  """Sums for validation: loss (nats), target tokens and, if given, target UTF-8 bytes."""
  nll_BL, _, weights_BL = token_losses(model, params, batch)
  sums = {'loss_sum': jnp.sum(nll_BL * weights_BL), 'tokens': jnp.sum(weights_BL)}
  if 'target_bytes' in batch:
    sums['bytes'] = jnp.sum(batch['target_bytes'] * weights_BL)
  return sums


def make_train_step(model, tx, schedule, train_config, z_loss, mesh, shardings):
  step = functools.partial(
      train_step,
      model=model,
      tx=tx,
      schedule=schedule,
      grad_accum_steps=train_config.grad_accum_steps,
      z_loss=z_loss,
      nonfinite_policy=train_config.nonfinite_policy,
      skip_grad_norm_above=train_config.skip_grad_norm_above,
      param_shardings=shardings.params,
  )
  return jax.jit(
      step,
      in_shardings=(shardings, None),
      out_shardings=(shardings, sharding.replicated(mesh)),
      donate_argnums=0,
  )


def make_eval_step(model, mesh, param_shardings):
  return jax.jit(
      functools.partial(eval_step, model=model),
      in_shardings=(param_shardings, None),
      out_shardings=sharding.replicated(mesh),
  )
