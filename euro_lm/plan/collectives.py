"""Communication per train step: measured from the compiled HLO, predicted for any mesh,
priced against the links of a cluster.

`measure(config)` compiles the real train step (abstract shapes: no weights allocated) on
the devices present, e.g. 8 simulated CPU devices, and reads its collectives
(`euro_lm.plan.hlo`). `predicted_bytes(config, degrees)` is the closed form of what that
compile contains, per mesh axis and per device, under the ring cost model of `hlo`:

- `data` (n = data): the float32 gradients, as sharded over fsdp x tensor, all-reduced
  once per step: 2(n-1)/n x G/fsdp; without micro-batches a tied embedding's gradient is
  reduced twice (once per use); with micro-batches, the step sums each replica's gradients
  and reduces the sums once, the tied table's once too. Not counted: at small shapes XLA
  also gathers each micro-batch's looked-up rows over data (tiny: 9% of the data bytes;
  llama_1b: none, the rows move over fsdp).
- `fsdp` (n = fsdp): the weights of each layer (tensor-sharded), cast to the compute dtype
  (norm scales in float32), all-gathered in the forward and the backward (`LAYER_GATHERS`:
  with `full` remat the attention's a third time), and the gradients all-reduced: XLA:CPU
  leaves the all-reduce + slice that XLA:GPU turns into a reduce-scatter ((n-1)/n, half the
  bytes); the prediction follows the CPU compile it is checked against.
- `tensor` (n = tensor): the [b, L, D] activations of one micro-batch per device in the
  compute dtype, all-reduced `TENSOR_ALL_REDUCES[remat]` times per layer and twice
  outside the layers (embedding lookup, output head's gradient).

Every other term is per micro-batch, so `train.grad_accum_steps` multiplies them (fsdp
gathers the weights for each micro-batch and reduces their gradients: what FSDP trades
for its memory). Outside the layers: the head (tied or not) is gathered in the forward and
the backward, cast (at small shapes XLA gathered a tied one once); the embedding lookup
moves its rows by all-to-all when they are smaller than two tables, else gathers the
float32 table once (what XLA chose in every compile checked). The layers' collectives agree
exactly, the totals to a few percent (tests/test_collectives.py, BENCHMARKS.md). Gradients
are reduced in float32 (`euro_lm.model.layers.dense`). The looked-up embedding rows and a
gathered lookup table are float32 (the lookup reads the float32 table). With LoRA,
only the adapters' gradients are reduced while every weight is still gathered (assumed:
no LoRA step was compiled for this).

`step_seconds` prices bytes per axis on the links of `euro_lm.devices.LINKS`: an axis whose
devices stay within a node runs over the node's link, one that crosses nodes at the network's
(rings are as slow as their slowest hop). `mesh_options` ranks the meshes of a node count by
the communication that would be exposed if nothing overlapped.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from euro_lm import devices
from euro_lm.config import validate
from euro_lm.errors import ConfigError
from euro_lm.model import Decoder, train_flops_per_token
from euro_lm.plan import hlo
from euro_lm.plan.memory import per_device_elements, state_leaves, with_overrides
from euro_lm.sharding import (
    MESH_AXES,
    MeshError,
    batch_sharding,
    logical_rules,
    make_mesh,
    mesh_axes_size,
)
from euro_lm.train.optimizer import make_optimizer
from euro_lm.train.state import abstract_train_state
from euro_lm.train.step import BATCH_KEYS, make_train_step

# [b, L, D] all-reduces over `tensor` per layer in a compiled step, by remat policy (read
# from the CPU compile: 2 forward, 5 backward, one per matmul whose input dim is split;
# `full` and `save_attention_out` recompute the attention output's projection input).
_KEEP_PROJECTIONS = ('none', 'dots', 'dots_no_batch', 'dots_and_attention')
TENSOR_ALL_REDUCES = {p: 7 for p in _KEEP_PROJECTIONS} | {'full': 8, 'save_attention_out': 8}
TENSOR_ALL_REDUCES_OUTSIDE_LAYERS = 2
# How many times a layer's weights are all-gathered over fsdp per micro-batch, by remat
# policy: (MLP weights, the rest: attention and norms). Read from the CPU compile: the
# forward and the backward gather each; `full` and `save_attention_out` gather the
# attention's and the norms' a third time (the policies that keep the projections do not).
LAYER_GATHERS = {p: (2, 2) for p in _KEEP_PROJECTIONS} | {
    'full': (2, 3),
    'save_attention_out': (2, 3),
}


def ring_factor(kind, n):
  """Bytes each device sends per byte of the full buffer, for a group of `n` devices."""
  if n <= 1:
    return 0.0
  return 2 * (n - 1) / n if kind == 'all-reduce' else (n - 1) / n


# --------------------------------------------------------------------------- measurement


def compile_text(config, num_devices=None):
  """Optimized HLO of the real train step for the config's mesh on the devices present (the
  first `num_devices` of them), compiled from abstract shapes (ShapeDtypeStructs: nothing
  is allocated). Returns `(hlo text, mesh shape in MESH_AXES order)`."""
  present = jax.devices()
  mesh = make_mesh(config.mesh, present[:num_devices] if num_devices else present)
  rules = logical_rules(config.mesh)
  model = Decoder(config.model)
  tx, schedule = make_optimizer(config.optimizer, config.train.steps)
  t = config.train
  state, shardings = abstract_train_state(model, tx, t.seq_len, mesh, rules)
  step = make_train_step(model, tx, schedule, t, config.optimizer.z_loss, mesh, shardings)
  tokens = jax.ShapeDtypeStruct(
      (t.global_batch_size, t.seq_len), jnp.int32, sharding=batch_sharding(mesh, rules)
  )
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    compiled = step.lower(state, {k: tokens for k in BATCH_KEYS}).compile()
  return compiled.as_text(), tuple(mesh.shape[a] for a in MESH_AXES)


def measure(config, num_devices=None):
  """`(collectives, trip counts)` of the compiled step (`compile_text`, `hlo.collectives`)."""
  text, shape = compile_text(config, num_devices)
  return hlo.collectives(text, shape), hlo.trip_counts(text)


# --------------------------------------------------------------------------- prediction


def _param_bytes(config, degrees, leaves, which, trainable=True, cast=False):
  """Bytes per device of the params (only the trainable ones: those with gradients) for
  which `which(path)` holds, sharded as under `degrees`: float32, or with `cast` as the
  step gathers them, in the compute dtype but for the norms' scales (used in float32)."""
  rules = logical_rules(config.mesh)
  compute = jnp.dtype(config.model.compute_dtype).itemsize

  def itemsize(x):
    return x.itemsize if not cast or x.path.endswith("['scale']") else compute

  return sum(
      per_device_elements(x.shape, x.logical_axes, rules, degrees) * itemsize(x)
      for x in leaves
      if x.part == 'params' and not (trainable and x.frozen) and which(x.path)
  )


def _is_layer(path):
  return path.startswith(".params['layers']")


def _is_embedding(path):
  return path == ".params['embedding']"


@dataclasses.dataclass(frozen=True)
class Traffic:
  """Full buffers (S, bytes) per step of each group of collectives."""

  data_all_reduce: float  # gradients over data
  fsdp_all_gather: float  # weights gathered over fsdp
  fsdp_all_reduce: float  # gradients over fsdp
  fsdp_all_to_all: float  # the embedding lookup's rows and their gradient over fsdp
  tensor_all_reduce: float  # activations over tensor
  degrees: dict

  def bytes_per_axis(self):
    """`{'data', 'fsdp', 'tensor'}`: bytes each device sends per step (ring model)."""
    d = self.degrees
    return {
        'data': ring_factor('all-reduce', d['data']) * self.data_all_reduce,
        'fsdp': ring_factor('all-gather', d['fsdp']) * (self.fsdp_all_gather + self.fsdp_all_to_all)
        + ring_factor('all-reduce', d['fsdp']) * self.fsdp_all_reduce,
        'tensor': ring_factor('all-reduce', d['tensor']) * self.tensor_all_reduce,
    }


def predicted(config, degrees, leaves=None):
  """The `Traffic` of the train step on a mesh of `degrees` ({'data', 'fsdp', 'tensor'}),
  from shapes alone (see the module docstring)."""
  leaves = state_leaves(config) if leaves is None else leaves
  m, t = config.model, config.train
  micro = t.grad_accum_steps
  gathered = dict(degrees, data=1, fsdp=1)

  def weights(which, trainable=False, cast=False):  # whole, frozen (LoRA's base) included
    return _param_bytes(config, gathered, leaves, which, trainable, cast)

  layers = weights(_is_layer, cast=True)
  mlp = weights(lambda p: _is_layer(p) and "['mlp']" in p, cast=True)
  mlp_gathers, other_gathers = LAYER_GATHERS.get(m.remat_policy, LAYER_GATHERS['full'])
  layer_gathers = mlp_gathers * mlp + other_gathers * (layers - mlp)
  embedding = weights(_is_embedding)
  head = weights(_is_embedding, cast=True)
  rest = weights(lambda p: not _is_layer(p), cast=True)
  # Untied, the head is gathered in the forward and the backward and the embedding's rows
  # move by all-to-all; tied, the one table is gathered once, for the head.
  gather = 2 * (rest - head) + head if m.tie_embeddings else 2 * (rest - head)
  # Gradients: of the trainable params only.
  layer_grads = weights(_is_layer, trainable=True)
  embedding_grads = weights(_is_embedding, trainable=True)
  rest_grads = weights(lambda p: not _is_layer(p), trainable=True)
  reduce_fsdp = rest_grads if m.tie_embeddings else rest_grads - embedding_grads
  grads_data = dict(degrees, data=1)
  data = _param_bytes(config, grads_data, leaves, lambda p: True)
  if m.tie_embeddings and micro == 1:  # its gradient is reduced once per use
    data += _param_bytes(config, grads_data, leaves, _is_embedding)
  rules = logical_rules(config.mesh)
  batch_axes = next((axes for name, axes in rules if name == 'batch'), ())
  mesh = jax.sharding.AbstractMesh(tuple(degrees[a] for a in MESH_AXES), MESH_AXES)
  rows = t.global_batch_size / micro / mesh_axes_size(mesh, batch_axes)
  activation = rows * t.seq_len * m.embed_dim * jnp.dtype(m.compute_dtype).itemsize
  per_layer = TENSOR_ALL_REDUCES.get(m.remat_policy, TENSOR_ALL_REDUCES['full'])
  tensor = (per_layer * m.num_layers + TENSOR_ALL_REDUCES_OUTSIDE_LAYERS) * activation
  # The embedding lookup over fsdp: XLA moved the looked-up rows by all-to-all (float32,
  # forward and backward) where they were smaller than two tables, else gathered the table
  # once and all-reduced its whole gradient (tiny: rows; llama_1b, llama_7b: table).
  rows_bytes = rows * t.seq_len * m.embed_dim * 4
  lookup = 2 * rows_bytes if rows_bytes < 2 * embedding else 0
  if not lookup:  # once, float32, for the lookup; a tied head is then gathered again, cast
    gather += embedding + (head if m.tie_embeddings else 0)
    reduce_fsdp += embedding_grads
  return Traffic(
      data_all_reduce=data,  # once per step, micro-batches or not (`train.step`)
      fsdp_all_gather=micro * (layer_gathers + gather),
      fsdp_all_reduce=micro * (layer_grads + reduce_fsdp),
      fsdp_all_to_all=micro * lookup,
      tensor_all_reduce=micro * tensor,
      degrees=dict(degrees),
  )


def predicted_bytes(config, degrees, leaves=None):
  """`{'data', 'fsdp', 'tensor'}`: bytes each device sends per step over that axis."""
  return predicted(config, degrees, leaves).bytes_per_axis()


# --------------------------------------------------------------------------- pricing


@dataclasses.dataclass(frozen=True)
class MeshOption:
  ici: dict  # in-node degrees
  dcn: dict  # across-node degrees
  bytes_per_axis: dict
  seconds_per_axis: dict
  compute_seconds: float

  @property
  def degrees(self):
    return {a: self.ici[a] * self.dcn[a] for a in MESH_AXES}

  @property
  def comm_seconds(self):
    return sum(self.seconds_per_axis.values())

  @property
  def exposed_seconds(self):
    """Communication time if none of it overlaps compute (an upper bound)."""
    return self.comm_seconds

  @property
  def hidden_lower_bound(self):
    """Communication still exposed if all of it overlapped compute (a lower bound)."""
    return max(0.0, self.comm_seconds - self.compute_seconds)

  @property
  def overrides(self):
    """The config changes (dotted path -> degree) that make this mesh."""
    return mesh_overrides(self.ici, self.dcn)

  def describe(self):
    i, d = self.ici, self.dcn
    return (
        f'data={i["data"]}x{d["data"]} fsdp={i["fsdp"]}x{d["fsdp"]} '
        f'tensor={i["tensor"]}x{d["tensor"]}'
    )


def mesh_overrides(ici, dcn):
  """`{'mesh.data': .., ..., 'mesh.dcn_tensor': ..}`: the config changes that make the mesh of
  in-node degrees `ici` and across-node degrees `dcn`."""
  return {f'mesh.{a}': ici[a] for a in MESH_AXES} | {f'mesh.dcn_{a}': dcn[a] for a in MESH_AXES}


def step_seconds(bytes_per_axis, dcn, node_link, network_link):
  """Seconds per axis: over the network for an axis split across nodes, else in the node."""
  return {
      a: b / (network_link.bytes_per_s if dcn[a] > 1 else node_link.bytes_per_s)
      for a, b in bytes_per_axis.items()
  }


def compute_seconds(config, num_devices, peak_flops, mfu):
  t = config.train
  tokens = t.global_batch_size * t.seq_len
  return train_flops_per_token(config.model, t.seq_len) * tokens / (num_devices * peak_flops * mfu)


def candidate_meshes(nodes, devices_per_node):
  """In-node tensor (1, 2, 4, ... devices_per_node) with fsdp or data over the rest of the
  node; across nodes all data or all fsdp. `(ici, dcn)` dicts."""
  found = []
  tensor = 1
  while tensor <= devices_per_node:
    for inside in ('fsdp', 'data') if tensor < devices_per_node else ('fsdp',):
      ici = {'data': 1, 'fsdp': 1, 'tensor': tensor}
      ici[inside] = devices_per_node // tensor
      for across in ('data', 'fsdp') if nodes > 1 else ('fsdp',):
        dcn = {'data': 1, 'fsdp': 1, 'tensor': 1}
        dcn[across] = nodes
        found.append((ici, dcn))
    tensor *= 2
  return found


def mesh_options(
    config,
    nodes,
    devices_per_node=8,
    accelerator_name='h100',
    node_link='nvlink4',
    network_link='ndr',
    mfu=0.4,
    leaves=None,
):
  """The `MeshOption` of every `candidate_meshes` a run would accept (the config's own
  validation: heads and batch divisible), least exposed communication first."""
  leaves = state_leaves(config) if leaves is None else leaves
  peak = devices.accelerator(accelerator_name).peak_flops_16bit
  node_link, network_link = devices.link(node_link), devices.link(network_link)
  num_devices = nodes * devices_per_node
  found = []
  for ici, dcn in candidate_meshes(nodes, devices_per_node):
    candidate = with_overrides(config, mesh_overrides(ici, dcn))
    degrees = {a: ici[a] * dcn[a] for a in MESH_AXES}
    try:
      validate(candidate, num_devices, nodes, devices.accelerator_device(accelerator_name))
    except (ConfigError, MeshError):  # a mesh a run would reject is left out
      continue
    traffic = predicted_bytes(candidate, degrees, leaves)
    found.append(
        MeshOption(
            ici=ici,
            dcn=dcn,
            bytes_per_axis=traffic,
            seconds_per_axis=step_seconds(traffic, dcn, node_link, network_link),
            compute_seconds=compute_seconds(config, num_devices, peak, mfu),
        )
    )
  return sorted(found, key=lambda o: o.exposed_seconds)


def _gb(x):
  return f'{x / 1e9:.2f}'


def format_options(options, title=''):
  """`mesh_options` as a text table: GB per device per step per axis, seconds, compute."""
  header = (
      f'{"mesh (in-node x across)":<34} {"data GB":>8} {"fsdp GB":>8} {"tensor GB":>9} '
      f'{"comm s":>7} {"compute s":>9} {"comm/compute":>12}'
  )
  lines = ([title] if title else []) + [header, '-' * len(header)]
  for o in options:
    b = o.bytes_per_axis
    lines.append(
        f'{o.describe():<34} {_gb(b["data"]):>8} {_gb(b["fsdp"]):>8} {_gb(b["tensor"]):>9} '
        f'{o.comm_seconds:>7.3f} {o.compute_seconds:>9.3f} '
        f'{o.comm_seconds / o.compute_seconds:>12.2f}'
    )
  return '\n'.join(lines)
