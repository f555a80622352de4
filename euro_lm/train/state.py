"""Train state, created directly sharded: eval_shape -> logical specs -> jit(init).

The optimizer state covers the trainable params only (`euro_lm.model.lora.trainable`):
all of them, or with LoRA the adapters, so frozen weights get no AdamW moments. With
`model.fp8` the fp8 scales and amax histories (`euro_lm.model.fp8`) are a field of their
own, replicated, which the step overwrites and the optimizer never sees.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn

from euro_lm.model import fp8, lora


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any  # float32 parameter pytree
  opt_state: Any  # optax state of the trainable params, sharded like them
  # nonfinite_policy='skip': updates skipped since the last applied one, and in all.
  skipped_in_a_row: jax.Array
  skipped_total: jax.Array
  fp8: Any = flax.struct.field(default_factory=dict)  # model.fp8's scales/histories, else {}


def init_boxed(model, tx, seq_len, rng):
  """Params and optimizer state still wrapped in their logical-axis metadata."""
  tokens_BL = jnp.zeros((1, seq_len), jnp.int32)
  variables = model.init(rng, tokens_BL)
  params = variables['params']
  zero = jnp.zeros((), jnp.int32)
  return TrainState(
      step=zero,
      params=params,
      opt_state=tx.init(lora.trainable(params)[0]),
      skipped_in_a_row=zero,
      skipped_total=zero,
      fp8=variables.get(fp8.COLLECTION, {}),
  )


def state_logical_specs(model, tx, seq_len):
  """PartitionSpecs of logical axis names for every leaf of the train state."""
  abstract = jax.eval_shape(lambda r: init_boxed(model, tx, seq_len, r), jax.random.key(0))
  return nn.get_partition_spec(abstract)


def state_shardings(model, tx, seq_len, mesh, rules):
  return nn.logical_to_mesh_sharding(state_logical_specs(model, tx, seq_len), mesh, rules)


def abstract_train_state(model, tx, seq_len, mesh, rules):
  """ShapeDtypeStructs with shardings: what a checkpoint restores onto, with no memory used.

  Returns `(abstract_state, shardings)`.
  """
  shardings = state_shardings(model, tx, seq_len, mesh, rules)
  shapes = jax.eval_shape(lambda r: nn.unbox(init_boxed(model, tx, seq_len, r)), jax.random.key(0))
  abstract = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
  )
  return abstract, shardings


def create_train_state(model, tx, seq_len, rng, mesh, rules):
  """Initialises the state with every array born on its shards (never whole on a host).

  Returns `(state, shardings)`.
  """
  shardings = state_shardings(model, tx, seq_len, mesh, rules)
  init = jax.jit(lambda r: nn.unbox(init_boxed(model, tx, seq_len, r)), out_shardings=shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return init(rng), shardings


def train_state_from_params(params, tx, shardings, abstract_fp8=None):
  """A fresh state (step 0, new optimizer state, and a new fp8 state shaped like
  `abstract_fp8` if given) around existing sharded `params`."""

  def build(params):
    zero = jnp.zeros((), jnp.int32)
    return TrainState(
        step=zero,
        params=params,
        opt_state=tx.init(lora.trainable(params)[0]),
        skipped_in_a_row=zero,
        skipped_total=zero,
        fp8=fp8.fresh(abstract_fp8 or {}),
    )

  return jax.jit(build, out_shardings=shardings)(params)


def with_fresh_adapters(base_params, model, seq_len, rng, mesh, rules, param_shardings):
  """`base_params` joined with newly initialised LoRA adapters, born sharded as
  `param_shardings` (the params' part of the state shardings), when the model has LoRA;
  else `base_params` as they are. For starting LoRA from a checkpoint of the base model."""
  if not lora.targets(model.config):
    return base_params
  tokens_BL = jnp.zeros((1, seq_len), jnp.int32)
  # The base weights this init makes are unused outputs: XLA drops their computation.
  init = jax.jit(
      lambda r: lora.split(nn.unbox(model.init(r, tokens_BL)['params']))[1],
      out_shardings=lora.split(param_shardings)[1],
  )
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return lora.join(base_params, init(rng))
