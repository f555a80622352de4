"""FP8 matmuls of the projections (`model.fp8`): Flax's delayed-scaling fp8 dot.

Each q/k/v/o and MLP projection quantizes its input and weight to float8_e4m3fn and the
gradient of its output to float8_e5m2, each with a scale from the largest magnitude over
the last `AMAX_HISTORY` steps (`flax.linen.fp8_ops.Fp8DirectDotGeneralOp`, as MaxText).
Scales and histories are not trainable: they live in Flax's `COLLECTION`, whose gradient
is the next step's value, and the train state keeps them beside the params (`TrainState.
fp8`), so the optimizer, LoRA's split and export never see them.

They run where that state is passed, `variables(params, fp8_state)`: the training step.
Everywhere else (validation, generation, evaluation, export checks) the same params run in
the compute dtype.
"""

import jax
import jax.numpy as jnp
from flax.linen import fp8_ops

COLLECTION = fp8_ops.OVERWRITE_WITH_GRADIENT
AMAX_HISTORY = 1024  # steps of input/weight/gradient maxima a scale is taken from
SUFFIX = '_fp8'  # a projection's fp8 state: the weight's name plus this


def enabled(model_config) -> bool:
  return bool(model_config.get('fp8', False))


def dot(name, x, w, in_axes):
  """`x W` with fp8 operands, contracting x's last `in_axes` axes with W's first. Called in
  a module's compact method: its state is the submodule `name` there."""
  contract = tuple(range(x.ndim - in_axes, x.ndim)), tuple(range(in_axes))
  op = fp8_ops.Fp8DirectDotGeneralOp(amax_history_length=AMAX_HISTORY, name=name)
  return op(x, w, (contract, ((), ())))


def active(module) -> bool:
  """Whether `module`'s projections run in fp8: the config asks and the state is given (or
  being created)."""
  return enabled(module.config) and (module.is_initializing() or COLLECTION in module.variables)


def variables(params, fp8_state):
  """What `model.apply` takes: the params, and the fp8 state when there is one."""
  return {'params': params, COLLECTION: fp8_state} if fp8_state else {'params': params}


def fresh(abstract_state):
  """A new fp8 state shaped like `abstract_state`: scales 1, histories 0 (Flax's init)."""

  def init(path, x):
    name = str(getattr(path[-1], 'key', path[-1]))
    fill = 1.0 if name.endswith('scale') else 0.0
    return jnp.full(x.shape, fill, x.dtype)

  return jax.tree_util.tree_map_with_path(init, abstract_state)
