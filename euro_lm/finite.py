"""Which parts of a parameter (or gradient) tree hold NaN or infinity.

Leaves are named by their path ('embed/embedding', 'layers/attention/q/kernel'). Leaves under
'layers' are stacked by the layer scan, so their flags are per layer: a report can say which
blocks went bad, not only which weight.
"""

import jax
import jax.numpy as jnp
import numpy as np


def leaf_name(path):
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def finite_flags(tree):
  """Per leaf: a bool scalar, or a `[num_layers]` bool vector for scanned leaves. Traceable."""

  def flags(path, x):
    if 'layers' in leaf_name(path).split('/') and x.ndim:  # [L, ...], or [L] (xIELU's)
      return jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim)))
    return jnp.all(jnp.isfinite(x))

  return jax.tree_util.tree_map_with_path(flags, tree)


def describe_nonfinite(flags):
  """Host-side: 'name' or 'name (layers 3, 7)' for each leaf whose flags are not all True."""
  bad = []
  for path, ok in jax.tree_util.tree_flatten_with_path(jax.device_get(flags))[0]:
    ok = np.asarray(ok)
    if ok.all():
      continue
    if ok.ndim:
      bad.append(f'{leaf_name(path)} (layers {", ".join(map(str, np.flatnonzero(~ok)))})')
    else:
      bad.append(leaf_name(path))
  return bad


_finite_flags_jit = jax.jit(finite_flags)


def nonfinite_leaves(tree):
  """Names of the leaves of `tree` (device arrays) that hold a NaN or an infinity."""
  return describe_nonfinite(_finite_flags_jit(tree))
