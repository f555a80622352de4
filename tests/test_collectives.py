"""Collectives of the real compiled train step on 8 simulated devices, against references
computed from the parameter shapes alone; the closed form the planner scales with, against
the compiled HLO at 2, 4 and 8 devices; the HLO parser against explicit replica groups."""

import math

import numpy as np
import pytest

from configs import tiny
from euro_lm import devices, plan
from euro_lm.plan import collectives, hlo, memory
from euro_lm.sharding import MESH_AXES


def small_config(mesh, **overrides):
  """Tiny with 2 layers (compiles in seconds): mesh (data, fsdp, tensor)."""
  c = tiny.get_config()
  c.model.num_layers = 2
  c.model.mlp_dim = 256
  c.model.vocab_size = 1024
  c.train.global_batch_size = 8
  c.train.seq_len = 64
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
  for path, value in overrides.items():
    section, field = path.split('.')
    c[section][field] = value
  return c


def param_bytes(config, layers_only=False, tensor=1):
  """Float32 bytes of the params, from numpy over the eval_shape leaves (the tensor axis
  splits heads, kv heads, mlp and vocab)."""
  total = 0
  for leaf in memory.state_leaves(config):
    if leaf.part != 'params' or (layers_only and "['layers']" not in leaf.path):
      continue
    split = tensor if set(leaf.logical_axes) & {'heads', 'kv_heads', 'mlp', 'vocab'} else 1
    total += int(np.prod(leaf.shape)) * 4 // split
  return total


_MEASURED = {}


def measured(mesh, **overrides):
  """`(config, collectives, trip counts)` of the step compiled on the first
  data x fsdp x tensor devices, once per session."""
  key = (mesh, tuple(sorted(overrides.items())))
  if key not in _MEASURED:
    config = small_config(mesh, **overrides)
    _MEASURED[key] = (config, *collectives.measure(config, math.prod(mesh)))
  return _MEASURED[key]


UNTIED = {'model.tie_embeddings': False}


def arrays_bytes(found):
  return sum(hlo.nbytes([s]) * c.count for c in found for s in c.shapes if s[1])


def test_data_parallel_reduces_the_float32_gradients_once_over_data():
  config, found, trips = measured((8, 1, 1), **UNTIED)
  assert trips == [2, 2]  # the forward and backward layer scans: num_layers
  assert {c.kind for c in found} == {'all-reduce'}
  assert {c.axes for c in found} == {('data',)}
  assert {c.group_size for c in found} == {8}
  # Every non-scalar array all-reduced, times its runs per step, is one gradient.
  assert arrays_bytes(found) == param_bytes(config)
  sent = hlo.bytes_per_axis(found)['data']
  assert sent == pytest.approx(2 * 7 / 8 * param_bytes(config), abs=64)  # + scalars
  assert sent == pytest.approx(
      collectives.predicted_bytes(config, dict(data=8, fsdp=1, tensor=1))['data'], abs=64
  )


def test_a_tied_embedding_gradient_is_reduced_once_per_use():
  config, found, _ = measured((4, 1, 1))
  m = config.model
  assert arrays_bytes(found) == param_bytes(config) + m.vocab_size * m.embed_dim * 4


@pytest.mark.parametrize('mesh, tied', [((8, 1, 1), False), ((8, 1, 1), True), ((2, 2, 2), False)])
def test_micro_batches_reduce_the_gradients_over_data_once_per_step(mesh, tied):
  """Four micro-batches: the step sums each replica's gradients and all-reduces the sums
  once, outside every loop (a tied embedding's too, once); before, XLA all-reduced them
  after each micro-batch. Data traffic equals the closed form's, which no longer grows
  with the micro-batches."""
  micro = 4
  overrides = {
      'model.tie_embeddings': tied,
      'train.grad_accum_steps': micro,
      'train.global_batch_size': 8 * micro,
  }
  config, found, _ = measured(mesh, **overrides)
  grads = [c for c in found if c.axes == ('data',) and c.kind == 'all-reduce']
  assert grads and {(c.count, c.in_loop) for c in grads} == {(1, False)}
  tensor = mesh[2]
  fsdp_split = mesh[1]  # every weight here has one dim over fsdp
  assert arrays_bytes(grads) == param_bytes(config, tensor=tensor) // fsdp_split
  # The closed form counts the gradients once per step; at fsdp > 1 XLA also gathers each
  # micro-batch's looked-up rows over data (float32 [B/A, L, D/fsdp] per micro-batch).
  degrees = dict(zip(MESH_AXES, mesh))
  rows = 0
  if mesh[1] > 1:
    rows = micro * hlo.nbytes([('f32', (8, 64, config.model.embed_dim // mesh[1]))]) / 2
  sent = hlo.bytes_per_axis(found)['data']
  predicted = collectives.predicted_bytes(config, degrees)['data']
  assert sent == pytest.approx(predicted + rows, abs=64)
  one = small_config(mesh, **dict(overrides, **{'train.grad_accum_steps': 1}))
  assert predicted <= collectives.predicted_bytes(one, degrees)['data']


def test_fsdp_gathers_each_layer_twice_and_reduces_its_gradient_in_the_scan():
  config, found, _ = measured((1, 8, 1), **UNTIED)
  assert {c.axes for c in found if c.group_size > 1} == {('fsdp',)}
  in_layers = [c for c in found if c.in_loop]
  assert {c.count for c in in_layers} == {config.model.num_layers}
  gathered = sum(c.full_bytes * c.count for c in in_layers if c.kind == 'all-gather')
  reduced = sum(c.full_bytes * c.count for c in in_layers if c.kind == 'all-reduce')
  layers = param_bytes(config, layers_only=True)
  assert gathered == 2 * layers  # forward and backward, whole (unsharded) float32 weights
  assert reduced == layers  # XLA:CPU all-reduces (GPU: a reduce-scatter)


def test_a_bf16_step_gathers_bf16_weights_and_reduces_float32_gradients():
  """What a GPU moves: XLA:CPU computes bf16 in float32, so its HLO gathers float32 arrays
  converted from bf16 values; `hlo` reads them as bf16. The gradients are reduced in
  float32 (`layers.dense` makes them float32 sums: tests/test_layers.py; XLA:CPU's HLO
  would show float32 either way). The closed form agrees."""
  bf16 = {'model.compute_dtype': 'bfloat16'}
  config, found, _ = measured((1, 8, 1), **UNTIED, **bf16)
  in_layers = [c for c in found if c.in_loop]
  norms = 2 * config.model.embed_dim * 4 * config.model.num_layers
  gathered = sum(c.full_bytes * c.count for c in in_layers if c.kind == 'all-gather')
  reduced = sum(c.full_bytes * c.count for c in in_layers if c.kind == 'all-reduce')
  layers = param_bytes(config, layers_only=True)
  assert gathered == 2 * ((layers - norms) // 2 + norms)
  assert reduced == layers
  assert {s[0] for c in in_layers if c.kind == 'all-gather' for s in c.shapes} == {'bf16', 'f32'}
  predicted = collectives.predicted_bytes(config, {'data': 1, 'fsdp': 8, 'tensor': 1})['fsdp']
  assert hlo.bytes_per_axis(found)['fsdp'] == pytest.approx(predicted, rel=0.15)
  f32, *_ = measured((1, 8, 1), **UNTIED)
  f32_predicted = collectives.predicted_bytes(f32, {'data': 1, 'fsdp': 8, 'tensor': 1})['fsdp']
  assert predicted < 0.8 * f32_predicted


def test_full_remat_gathers_attention_and_norms_a_third_time():
  config, found, _ = measured((1, 4, 1), **UNTIED, **{'model.remat_policy': 'full'})
  m = config.model
  mlp = 3 * m.embed_dim * m.mlp_dim * 4 * m.num_layers
  gathered = sum(c.full_bytes * c.count for c in found if c.in_loop and c.kind == 'all-gather')
  assert gathered == 2 * mlp + 3 * (param_bytes(config, layers_only=True) - mlp)


def test_tensor_all_reduces_one_activation_per_matmul_with_a_split_input():
  config, found, _ = measured((4, 1, 2), **UNTIED)
  m, t = config.model, config.train
  activation = (t.global_batch_size // 4) * t.seq_len * m.embed_dim * 4  # float32 [b, L, D]
  tensor = [c for c in found if c.axes == ('tensor',) and c.in_loop]
  assert {hlo.nbytes([s]) for c in tensor for s in c.shapes} == {activation}
  per_layer = sum(len(c.shapes) for c in tensor)  # arrays per layer
  assert per_layer == collectives.TENSOR_ALL_REDUCES['none'] == 7
  data = [c for c in found if c.axes == ('data',)]
  assert arrays_bytes(data) == param_bytes(config, tensor=2)  # gradients, tensor-sharded


# At 4 devices: the tied embedding (data) and full remat (fsdp), the tests' other variants.
CLOSED_FORM = {2: UNTIED, 4: {}, 8: UNTIED}


@pytest.mark.parametrize('n', [2, 4, 8])
@pytest.mark.parametrize('axis', ['data', 'fsdp'])
def test_the_closed_form_equals_the_compiled_hlo(axis, n):
  """Data: exactly (but scalars). Fsdp: the layers' collectives exactly; the step's within
  15%: XLA gathers the untied head once or twice, by batch and group size, the closed form
  twice."""
  mesh = tuple(n if a == axis else 1 for a in MESH_AXES)
  overrides = dict(CLOSED_FORM[n])
  if axis == 'fsdp' and n == 4:
    overrides.update(UNTIED, **{'model.remat_policy': 'full'})
  config, found, _ = measured(mesh, **overrides)
  predicted = collectives.predicted_bytes(config, dict(zip(MESH_AXES, mesh)))[axis]
  got = hlo.bytes_per_axis(found)[axis]
  if axis == 'data':
    assert got == pytest.approx(predicted, abs=64)
    return
  m = config.model
  layers = param_bytes(config, layers_only=True)
  mlp = 3 * m.embed_dim * m.mlp_dim * 4 * m.num_layers
  mlp_gathers, other_gathers = collectives.LAYER_GATHERS[m.remat_policy]
  in_layers = (n - 1) / n * (mlp_gathers * mlp + other_gathers * (layers - mlp))
  in_layers += 2 * (n - 1) / n * layers
  assert sum(c.bytes_per_step for c in found if c.in_loop) == pytest.approx(in_layers)
  assert got == pytest.approx(predicted, rel=0.15)


def test_the_closed_form_of_tensor_at_2_and_of_a_mixed_mesh():
  config, found, _ = measured((4, 1, 2), **UNTIED)
  predicted = collectives.predicted_bytes(config, dict(data=4, fsdp=1, tensor=2))
  got = hlo.bytes_per_axis(found)
  assert got['data'] == pytest.approx(predicted['data'], rel=1e-4)
  assert got['tensor'] == pytest.approx(predicted['tensor'], rel=2e-3)  # + [b, L] sums


def test_replica_group_formats_expand_to_the_same_groups():
  shape = (2, 2, 2)
  explicit = hlo.replica_groups('replica_groups={{0,4},{1,5},{2,6},{3,7}}, x', 8)
  iota = hlo.replica_groups('replica_groups=[4,2]<=[2,4]T(1,0), x', 8)
  mesh = hlo.replica_groups(
      "replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}, use_global_device_ids=true", 8
  )
  assert sorted(map(sorted, explicit)) == sorted(map(sorted, iota)) == sorted(map(sorted, mesh))
  assert hlo.spanned_axes(explicit, shape) == ('data',)
  permuted = hlo.replica_groups(
      "replica_groups=mesh['axis_0'=2,'axis_1'=2,'axis_2'=2], device_ids=([2,2,2]T(2,1,0)) "
      "{'axis_0'}, x",
      8,
  )
  # ids [0..8) as [2,2,2] transposed (2,1,0): axis_0 of the result is the mesh's tensor axis.
  assert hlo.spanned_axes(permuted, shape) == ('tensor',)
  assert hlo.replica_groups('source_target_pairs={{0,1}}', 8) is None


def test_ring_costs_and_a_scan_body_counted_per_trip():
  text = """HloModule m

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %ag = f32[8]{0} all-gather(f32[2]{0} %x), replica_groups={{0,1,2,3}}, dimensions={0}
  %rs = f32[2]{0} reduce-scatter(f32[8]{0} %ag), replica_groups={{0,1,2,3}}, dimensions={0}
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %w = (s32[], f32[8]{0}) while(%t), condition=%cond, body=%body, TRIP
  %ar = bf16[8]{0} all-reduce(%a), replica_groups={{0,1},{2,3}}, to_apply=%cond
  %ars = bf16[8]{0} all-reduce-start(%a), replica_groups={{0,1},{2,3}}, to_apply=%cond
  %ard = bf16[8]{0} all-reduce-done(%ars)
  %cp = f32[4]{0} collective-permute(%a), source_target_pairs={{0,1},{1,0},{2,2}}
}
"""
  text = text.replace('TRIP', 'backend_config={"known_trip_count":{"n":"5"}}')
  found = {c.name: c for c in hlo.collectives(text, (1, 2, 2))}
  assert set(found) == {'ag', 'rs', 'ar', 'ars', 'cp'}
  assert found['ag'].count == found['rs'].count == 5 and found['ag'].in_loop
  assert found['ag'].axes == ('fsdp', 'tensor') and found['ag'].bytes_per_run == 3 / 4 * 32
  assert found['rs'].full_bytes == 32 and found['rs'].bytes_per_run == 24
  assert found['ar'].axes == ('tensor',) and found['ar'].bytes_per_run == 2 * 1 / 2 * 16
  assert found['cp'].bytes_per_run == 16 and found['cp'].axes == ('tensor',)  # 0 -> 1
  assert hlo.trip_counts(text) == [5]
  assert hlo.async_pairs(text) == {'all-reduce': [0]}


def test_links_are_named_and_the_mesh_options_are_ranked():
  assert devices.link('NDR').bytes_per_s == 400e9 / 8
  assert devices.link('slingshot-11').bytes_per_s == 200e9 / 8
  config = small_config((1, 8, 1), **{'train.global_batch_size': 64})
  options = collectives.mesh_options(config, 4, devices_per_node=8, network_link='ndr')
  assert options and all(math.prod(o.degrees.values()) == 32 for o in options)
  seconds = [o.exposed_seconds for o in options]
  assert seconds == sorted(seconds)
  for o in options:  # an axis crossing nodes is priced at the network's rate
    for axis in MESH_AXES:
      link = 'ndr' if o.dcn[axis] > 1 else 'nvlink4'
      assert o.seconds_per_axis[axis] == pytest.approx(
          o.bytes_per_axis[axis] / devices.link(link).bytes_per_s
      )
    # Its overrides make that mesh.
    assert memory.mesh_degrees(plan.with_overrides(config, o.overrides), 32, 4) == o.degrees


def test_the_plan_reports_communication_and_the_mesh_with_the_least():
  config = small_config((1, 8, 1), **{'train.global_batch_size': 64, 'mesh.dcn_fsdp': 2})
  text = plan.format_plan(config, 16, 2, accelerator_name='h100', network_link='slingshot11')
  sent = collectives.predicted_bytes(config, dict(data=1, fsdp=16, tensor=1))
  assert f'fsdp {sent["fsdp"] / 1e9:.2f}' in text
  assert 'on nvlink4 in a node, slingshot11 across nodes' in text
  best = collectives.mesh_options(config, 2, 8, 'h100', network_link='slingshot11')[0]
  assert f'least communication on 2 nodes: {best.describe()}' in text
  assert '--config.mesh.dcn_data=2' in text  # gradients once across nodes, not weights
