"""Device mesh from the config and logical-axis sharding helpers.

The mesh always has the axes ('data', 'fsdp', 'tensor'). Within a slice/node (ICI) their
sizes are `mesh.data/fsdp/tensor`; across slices/nodes (DCN) they are multiplied by
`mesh.dcn_*`. A (1, 1, 1) mesh is the single-device case, not a special branch.
"""

import math

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from euro_lm.errors import UserError

MESH_AXES = ('data', 'fsdp', 'tensor')


class MeshError(UserError, ValueError):
  """A mesh that cannot be built from the devices present."""


def mesh_shape(mesh_config, num_devices, num_slices=1):
  """Returns `(ici_shape, dcn_shape)`, filling a single -1 in the ICI degrees."""
  dcn = tuple(mesh_config[f'dcn_{axis}'] for axis in MESH_AXES)
  ici = [mesh_config[axis] for axis in MESH_AXES]
  for axis, size in zip(MESH_AXES, dcn):
    if size < 1:
      raise MeshError(f'mesh.dcn_{axis}={size}: DCN degrees must be >= 1')
  for axis, size in zip(MESH_AXES, ici):
    if size == 0 or size < -1:
      raise MeshError(f'mesh.{axis}={size}: use a positive degree or -1 to fill')
  if ici.count(-1) > 1:
    raise MeshError(f'mesh: only one of data/fsdp/tensor may be -1, got {tuple(ici)}')
  dcn_size = math.prod(dcn)
  if dcn_size != num_slices and num_slices > 1:
    raise MeshError(f'mesh.dcn_* multiply to {dcn_size} but there are {num_slices} slices')
  if num_devices % dcn_size:
    raise MeshError(
        f'mesh.dcn_* multiply to {dcn_size}, which does not divide '
        f'the {num_devices} devices present'
    )
  per_slice = num_devices // dcn_size
  fixed = math.prod(s for s in ici if s != -1)
  if -1 in ici:
    if per_slice % fixed:
      raise MeshError(
          f'mesh: fixed degrees {tuple(ici)} (product {fixed}) do not divide '
          f'the {per_slice} devices per slice'
      )
    ici[ici.index(-1)] = per_slice // fixed
  if math.prod(ici) != per_slice:
    raise MeshError(
        f'mesh: data*fsdp*tensor = {"*".join(map(str, ici))} = {math.prod(ici)} but '
        f'{per_slice} devices are present per slice ({num_devices} devices, DCN {dcn})'
    )
  return tuple(ici), dcn


def make_mesh(mesh_config, devices=None):
  """Builds the ('data', 'fsdp', 'tensor') mesh, hybrid across slices when DCN > 1."""
  devices = jax.devices() if devices is None else devices
  num_slices = len({getattr(d, 'slice_index', 0) for d in devices})
  ici, dcn = mesh_shape(mesh_config, len(devices), num_slices)
  if math.prod(dcn) > 1:
    if num_slices > 1:
      device_array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    else:  # GPU clusters: one process per node stands in for a slice
      device_array = mesh_utils.create_hybrid_device_mesh(
          ici, dcn, devices, process_is_granule=True
      )
  else:
    device_array = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
  return Mesh(device_array, MESH_AXES)


def logical_rules(mesh_config):
  """The config's logical-axis rules as the tuple of pairs Flax expects."""
  return tuple(
      (name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
      for name, axes in mesh_config.logical_rules
  )


def logical_sharding(logical_axes, mesh, rules):
  """NamedSharding for one array with the given logical axis names."""
  return nn.logical_to_mesh_sharding(PartitionSpec(*logical_axes), mesh, rules)


def batch_sharding(mesh, rules):
  """Sharding of a `[batch, length]` token array."""
  return logical_sharding(('batch', 'length'), mesh, rules)


def mesh_axes_size(mesh, axes):
  """How many ways `axes` (a mesh axis name, a tuple of them, or None) split a dimension."""
  names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape[name] for name in names)


def batch_mesh_axes(rules):
  """The mesh axes the 'batch' logical axis is split over."""
  for name, axes in rules:
    if name == 'batch':
      return axes if isinstance(axes, tuple) else (axes,) if axes else ()
  return ()


def spec_mesh_axes(spec):
  """Every mesh axis a PartitionSpec names."""
  found = []
  for entry in spec:
    found.extend(() if entry is None else (entry,) if isinstance(entry, str) else entry)
  return tuple(found)


def replica_axes(rules, param_shardings, mesh):
  """The mesh axes of more than one device that split the batch but no weight: across each,
  devices hold the same weight shards, so a weight's gradient is the sum of theirs."""
  if mesh.empty:  # traced outside `jax.set_mesh`: nothing to split over
    return ()
  weight_axes = {a for s in jax.tree.leaves(param_shardings) for a in spec_mesh_axes(s.spec)}
  return tuple(a for a in batch_mesh_axes(rules) if a not in weight_axes and mesh.shape[a] > 1)


def without_mesh_axes(rules, axes):
  """`rules` with the mesh `axes` taken out of every mapping: the rules inside code whose
  batch is already split over `axes` (a vmap with `spmd_axis_name`, a `shard_map`)."""

  def keep(target):
    named = (target,) if isinstance(target, str) else target or ()
    if not set(named) & set(axes):
      return target
    return tuple(a for a in named if a not in axes) or None

  return tuple((name, keep(target)) for name, target in rules)


def replicated(mesh):
  return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch, mesh, rules):
  """Assembles each process's part of the batch into global arrays sharded over the batch
  axes. Every process must pass arrays of the same per-process shape."""
  sharding = batch_sharding(mesh, rules)

  def assemble(local):
    local = np.asarray(local)
    global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
    return jax.make_array_from_process_local_data(sharding, local, global_shape)

  return {name: assemble(value) for name, value in local_batch.items()}
