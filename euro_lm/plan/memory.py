"""Mesh and memory planner: will a config fit, per device, on a given mesh? And how long
will its token budget take?

`python -m euro_lm.plan --config=configs/llama_7b.py:gpu --devices=16 --nodes=4
--accelerator=h100 --config.mesh.dcn_fsdp=4` prints the per-device memory of params,
gradients, optimizer state and activations for the mesh the config resolves to on that
many devices, and a WARNING naming what to change when it does not fit. Nothing runs on an
accelerator: shapes come from `jax.eval_shape` of the real model init and shardings from
the config's logical-axis rules, divided out arithmetically, so a 7B config on 512
devices plans on a laptop.

The library functions (`estimate_memory`, `format_plan`, `summary`, `peak_flops`,
`training_seconds`, ...) are what a notebook calls; `presets_table` /
`format_presets_table` (several configs on one mesh) and `scaling_points` / `plot_scaling`
(days and memory against the number of devices; matplotlib, imported lazily) are
notebooks/scaling.ipynb's.

What the estimate models (all per device; it is an estimate, not a measurement):

- **Train state** (exact up to XLA padding): every leaf of the real `TrainState` from
  `jax.eval_shape` of the init (params float32; AdamW's m and v float32 sharded like the
  params; the optimizer's and the state's int32 counters), each dimension divided by the
  product of the mesh axes its logical axis maps to (rounded up, as a sharded array pads).
- **Gradients**: float32, sharded like the params. With `train.grad_accum_steps > 1` the
  accumulation carry is a second params-sized float32 buffer.
- **Activations saved for the backward pass**, for one micro-batch of
  `global_batch_size / grad_accum_steps` sequences split over the batch mesh axes
  (data x fsdp, ICI and DCN). Per layer, what is kept depends on `model.remat_policy`:
  `none` keeps every residual (the residual stream, the norms' float32 intermediates, q/k/v,
  the attention output and its per-head float32 log-sum-exp (no attention impl keeps the
  L x L probabilities), the MLP's gate/up/hidden); `full` keeps only each layer's input;
  `dots` the matmul outputs; `dots_no_batch` the weight-matmul outputs;
  `save_attention_out` the layer input and the attention output.
  Activations are in `model.compute_dtype`, norms and softmax in float32. Each activation
  is divided by the mesh axes of its logical axes (batch, heads, mlp, vocab), like the
  params.
- **Logits and loss**: `[B, L, V]` float32 logits and their float32 gradient (plus a
  compute-dtype copy of the gradient for the output matmul when computing in 16 bits).
  With `model.loss_chunk_length = C`, the same for `[B, C, V]`, plus what the fused loss
  keeps from its forward: the hidden-state gradient and a float32 head-gradient partial
  per device (split over tensor, not fsdp).
- **Working set**: transients not in the above: with any remat policy the recomputed
  residuals of the one layer being differentiated; with the xla attention, the float32
  scores of its largest query chunk, recomputed in the backward; one layer's weights
  gathered over fsdp in the compute dtype and their float32 gradients before the
  reduce-scatter; the backward residual stream. Runtime and framework reserves (CUDA
  context, NCCL buffers, XLA's fragmentation) are not modelled: hence `usable_fraction`
  (default 0.9) of the device memory is what a plan may use.

Validated against `compiled.memory_analysis()` of the real train step on CPU
(tests/test_plan.py): the state is exact; activations agree within a factor of 2.
"""

import copy
import dataclasses
import math
import sys

import jax
from flax import linen as nn

from euro_lm.config import validate
from euro_lm.errors import ConfigError
from euro_lm import devices
from euro_lm.model import Decoder, param_count, train_flops_per_token
from euro_lm.model.attention import xla_query_chunks
from euro_lm.model.layers import head_dim
from euro_lm.sharding import MESH_AXES, MeshError, batch_mesh_axes, logical_rules, mesh_shape
from euro_lm.train.optimizer import make_optimizer
from euro_lm.train.state import init_boxed

GIB = 2 ** 30

USABLE_FRACTION = 0.9  # of device memory; the rest is runtime reserves and fragmentation


# --------------------------------------------------------------------------- accelerators


def accelerator_names():
  """Known accelerator names (`euro_lm.devices.ACCELERATORS`)."""
  return devices.accelerator_names()


def accelerator(name):
  """`(canonical name, peak 16-bit FLOP/s, device memory GiB)` for a known accelerator,
  matched ignoring case, spaces, '-' and '_' ('h100', 'tpu_v5_lite', 'H100 PCIe').
  Raises ConfigError listing the known names otherwise."""
  try:
    known = devices.accelerator(name)
  except ConfigError as e:
    raise ConfigError(f'{e} (or give --device_memory_gb)') from None
  return known.name, known.peak_flops_16bit, known.memory_gib


def peak_flops(name):
  """Dense 16-bit peak FLOP/s per device of a known accelerator."""
  return accelerator(name)[1]


def training_seconds(model_config, seq_len, tokens, num_devices, peak_flops_per_device,
                     mfu=0.4):
  """Wall-clock seconds to train on `tokens` tokens: model FLOPs (forward + backward,
  `train_flops_per_token`, no remat recompute) over `num_devices` devices each sustaining
  `mfu` of `peak_flops_per_device`."""
  if not 0 < mfu <= 1:
    raise ConfigError(f'mfu={mfu} must be in (0, 1]')
  flops = train_flops_per_token(model_config, seq_len) * tokens
  return flops / (num_devices * peak_flops_per_device * mfu)


def run_tokens(config, tokens=None):
  """`tokens`, or else the config's own run: train.steps x global batch x seq_len."""
  t = config.train
  return tokens or t.steps * t.global_batch_size * t.seq_len


# --------------------------------------------------------------------------- sharding


def mesh_degrees(config, num_devices, num_nodes=1):
  """`{'data', 'fsdp', 'tensor'}` degrees (ICI x DCN) of the config's mesh on
  `num_devices` devices over `num_nodes` nodes (one process per node, each a DCN granule).

  Raises MeshError / ConfigError with the message naming the field, as a run would.
  """
  try:
    ici, dcn = mesh_shape(config.mesh, num_devices, num_nodes)
  except MeshError as e:
    if num_nodes > 1 and 'slices' in str(e):
      raise MeshError(f'{e} (nodes): with {num_nodes} nodes set the mesh.dcn_* degrees to '
                      f'multiply to {num_nodes}, e.g. --config.mesh.dcn_fsdp={num_nodes} or '
                      f'--config.mesh.dcn_data={num_nodes}') from None
    raise
  validate(config, num_devices, num_nodes)
  return {axis: i * d for axis, i, d in zip(MESH_AXES, ici, dcn)}


def _axis_product(mesh_axes, degrees):
  if mesh_axes is None:
    return 1
  if isinstance(mesh_axes, str):
    mesh_axes = (mesh_axes,)
  return math.prod(degrees[a] for a in mesh_axes)


def per_device_elements(shape, logical_axes, rules, degrees):
  """Elements of one shard of an array of `shape` whose dims carry `logical_axes`: each
  dim divided (rounded up) by the mesh axes its logical name maps to under `rules`, with
  Flax's rule semantics (a mesh axis used by an earlier dim is not reused)."""
  mesh_spec = nn.logical_to_mesh_axes(tuple(logical_axes), rules)
  return math.prod(-(-size // _axis_product(axes, degrees))
                   for size, axes in zip(shape, tuple(mesh_spec) + (None,) * len(shape)))


@dataclasses.dataclass(frozen=True)
class StateLeaf:
  path: str
  part: str            # 'params' | 'optimizer' | 'other'
  shape: tuple
  itemsize: int
  logical_axes: tuple  # one name or None per dim


def state_leaves(config):
  """Every leaf of the real train state (params, optimizer state, counters) with its shape,
  dtype size and logical axes, from `jax.eval_shape` of the init: no memory used."""
  # Param shapes do not depend on the attention kernel, remat or sequence length: trace
  # the init with the reference attention on 8 tokens (cudnn cannot trace without a GPU).
  model_config = copy.deepcopy(config.model)
  model_config.attention_impl, model_config.remat_policy = 'xla', 'none'
  model = Decoder(model_config)
  tx, _ = make_optimizer(config.optimizer, config.train.steps)
  boxed = jax.eval_shape(lambda r: init_boxed(model, tx, 8, r), jax.random.key(0))
  specs = nn.get_partition_spec(boxed)
  shapes = nn.unbox(boxed)
  leaves = []
  flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
  for (path, shape), spec in zip(flat_shapes, flat_specs):
    name = jax.tree_util.keystr(path)
    part = ('params' if name.startswith('.params') else
            'optimizer' if name.startswith('.opt_state') else 'other')
    axes = tuple(spec) + (None,) * (len(shape.shape) - len(spec))
    leaves.append(StateLeaf(name, part, tuple(shape.shape), shape.dtype.itemsize, axes))
  return leaves


def leaf_bytes(leaf, rules, degrees):
  return per_device_elements(leaf.shape, leaf.logical_axes, rules, degrees) * leaf.itemsize


# --------------------------------------------------------------------------- activations


def _layer_terms(m, b, seq_len, policy, cs):
  """Per-layer activation terms `(logical axes, global shape, bytes per element)`.

  Returns `(saved, recompute)`: what the backward keeps for every layer under `policy`,
  and the full residual set of one layer (recomputed, transiently, under any remat).
  """
  L, D, H, K, hd, F = seq_len, m.embed_dim, m.num_heads, m.num_kv_heads, head_dim(m), m.mlp_dim
  BLD = (('batch', 'length', 'embed'), (b, L, D))
  BL = (('batch', 'length'), (b, L))
  BLHd = (('batch', 'length', 'heads', 'head_dim'), (b, L, H, hd))
  BLKd = (('batch', 'length', 'kv_heads', 'head_dim'), (b, L, K, hd))
  BLF = (('batch', 'length', 'mlp'), (b, L, F))
  BHL = (('batch', 'heads', 'length'), (b, H, L))
  f32_copy = cs != 4  # a float32 upcast that is a separate buffer only in 16-bit compute

  def norm(axes_shape, width=1):
    terms = [(*axes_shape, 4)] * width  # normalised float32 output
    if f32_copy:
      terms.append((*axes_shape, 4))     # float32 upcast of the input
    return terms + [(*BL, 4)]            # the reciprocal rms

  layer_input = [(*BLD, cs)]
  everything = (
      layer_input + norm(BLD) + [(*BLD, cs)]                      # attention norm -> h
      + [(*BLHd, cs), (*BLKd, cs), (*BLKd, cs)]                   # q, k, v (after RoPE)
      + (norm(BLHd) + norm(BLKd) if m.qk_norm else [])
      + [(*BHL, 4)]                                               # log-sum-exp
      + [(*BLHd, cs), (*BLD, cs)]                                 # attention out, residual
      + norm(BLD) + [(*BLD, cs)]                                  # mlp norm -> h
      + [(*BLF, cs)] * 3)                                         # gate, up, hidden
  if policy == 'none':
    return everything, []
  if policy == 'full':
    saved = layer_input
  elif policy == 'save_attention_out':
    saved = layer_input + [(*BLHd, cs)]
  elif policy in ('dots', 'dots_no_batch'):
    saved = (layer_input + [(*BLHd, cs), (*BLKd, cs), (*BLKd, cs)]  # q, k, v projections
             + [(*BLD, cs), (*BLF, cs), (*BLF, cs), (*BLD, cs)])    # o, gate, up, down
  else:
    raise ConfigError(f'model.remat_policy={policy!r} is unknown')
  return saved, everything


def _attention_transient(m, b, seq_len, cs):
  """The xla attention's largest query chunk, in its backward: float32 scores, probabilities
  and their gradient (and a compute-dtype copy in 16 bits). cudnn/pallas work in blocks."""
  if not _may_run_xla_attention(m):
    return []
  chunks = xla_query_chunks(seq_len, causal=True)
  BHQL = (('batch', 'heads', 'length', None), (b, m.num_heads, seq_len // chunks, seq_len))
  return [(*BHQL, 4)] * 3 + ([(*BHQL, cs)] if cs != 4 else [])


def _may_run_xla_attention(m):
  """'xla', or 'auto' in float32: on an accelerator, 16-bit 'auto' runs blockwise kernels
  (pallas or cuDNN), and float32 'auto' falls back to xla where the kernels do not fit."""
  return m.attention_impl == 'xla' or (m.attention_impl == 'auto'
                                       and m.compute_dtype == 'float32')


def _bytes(terms, rules, degrees):
  return sum(per_device_elements(shape, axes, rules, degrees) * size
             for axes, shape, size in terms)


# --------------------------------------------------------------------------- the estimate


@dataclasses.dataclass
class MemoryEstimate:
  """Per-device bytes of each part of a train step, and what they were computed for."""
  degrees: dict                # mesh degrees data/fsdp/tensor (ICI x DCN)
  num_devices: int
  num_nodes: int
  micro_batch_per_device: float  # sequences per device per micro-batch
  params: int
  gradients: int
  optimizer: int
  grad_accumulation: int
  other_state: int             # counters: step, skip counts, optimizer counts
  activations: int             # saved for the backward pass, all layers
  logits: int                  # logits and loss
  working: int                 # transient working set

  @property
  def state(self):
    """Params + optimizer state + counters: the train step's donated arguments."""
    return self.params + self.optimizer + self.other_state

  @property
  def total(self):
    return (self.state + self.gradients + self.grad_accumulation + self.activations
            + self.logits + self.working)

  def rows(self):
    return [
        ('params (float32)', self.params),
        ('gradients (float32)', self.gradients),
        ('optimizer state (AdamW m, v float32)', self.optimizer + self.other_state),
        ('gradient accumulation buffer', self.grad_accumulation),
        ('activations saved for backward', self.activations),
        ('logits and loss (float32)', self.logits),
        ('transient working set', self.working),
    ]


def estimate_memory(config, num_devices, num_nodes=1, leaves=None):
  """Per-device memory estimate of the train step of `config` on `num_devices` devices
  over `num_nodes` nodes. `leaves` (from `state_leaves(config)`) saves re-tracing the init
  when only batch/remat/mesh settings change. Raises MeshError/ConfigError for a mesh or
  config a run would reject."""
  degrees = mesh_degrees(config, num_devices, num_nodes)
  rules = logical_rules(config.mesh)
  leaves = state_leaves(config) if leaves is None else leaves
  parts = {'params': 0, 'optimizer': 0, 'other': 0}
  for leaf in leaves:
    parts[leaf.part] += leaf_bytes(leaf, rules, degrees)
  params = parts['params']

  m, t = config.model, config.train
  cs = jax.numpy.dtype(m.compute_dtype).itemsize
  micro = t.global_batch_size // t.grad_accum_steps  # global sequences per micro-batch
  batch_ways = math.prod(degrees[a] for a in batch_mesh_axes(rules))
  saved, recompute = _layer_terms(m, micro, t.seq_len, m.remat_policy, cs)
  activations = m.num_layers * _bytes(saved, rules, degrees)
  BLD = (('batch', 'length', 'embed'), (micro, t.seq_len, m.embed_dim))
  # Embedding output, final norm (as in a layer), final hidden state.
  activations += _bytes([(*BLD, cs), (*BLD, 4), (*BLD, cs)], rules, degrees)
  chunk = min(m.loss_chunk_length, t.seq_len) or t.seq_len
  BCV = (('batch', 'length', 'vocab'), (micro, chunk, m.vocab_size))
  logits = _bytes([(*BCV, 4), (*BCV, 4)] + ([(*BCV, cs)] if cs != 4 else []), rules, degrees)
  if m.loss_chunk_length:
    # The fused loss: the hidden states regrouped by chunk, dX kept from its forward, and
    # each device's float32 dW partial (split over tensor only; reduced after the chunks).
    partial_dW = (('vocab', None), (m.vocab_size, m.embed_dim), 4)
    logits += _bytes([(*BLD, cs), (*BLD, cs), partial_dW], rules, degrees)

  # One layer's weights, gathered over fsdp (tensor-sharded only), in the compute dtype,
  # and their float32 gradients before the reduce-scatter.
  gathered = dict(degrees, fsdp=1, data=1)
  layer_params = [leaf for leaf in leaves
                  if leaf.part == 'params' and leaf.path.startswith(".params['layers']")]
  per_layer_elements = sum(per_device_elements(leaf.shape, leaf.logical_axes, rules, gathered)
                           for leaf in layer_params) / max(m.num_layers, 1)
  working = int(per_layer_elements * (cs + 4))
  working += _bytes(recompute + _attention_transient(m, micro, t.seq_len, cs), rules, degrees)
  working += _bytes([(*BLD, 4), (*BLD, cs)], rules, degrees)  # backward residual stream
  return MemoryEstimate(
      degrees=degrees, num_devices=num_devices, num_nodes=num_nodes,
      micro_batch_per_device=micro / batch_ways, params=params, gradients=params,
      optimizer=parts['optimizer'], grad_accumulation=params if t.grad_accum_steps > 1 else 0,
      other_state=parts['other'], activations=activations, logits=logits, working=working)


def _with(config, **overrides):
  """A copy of `config` with dotted-path overrides ('model.remat_policy': 'full')."""
  config = copy.deepcopy(config)
  for path, value in overrides.items():
    section, field = path.split('.')
    config[section][field] = value
  return config


# What the planner suggests for `model.loss_chunk_length`: [B, 512, V] blocks keep the
# output matmuls large (B x 512 rows per device) while holding a fraction of the logits.
LOSS_CHUNK_LENGTH = 512


def suggestions(config, num_devices, num_nodes, budget_bytes, leaves=None):
  """Changes that make the plan fit in `budget_bytes`: a list of `(description, total
  bytes)` for each single change (and, if none fits alone, the combination) that a run
  would accept, smallest total first among those that fit."""
  leaves = state_leaves(config) if leaves is None else leaves
  m, t, h = config.model, config.train, config.mesh
  candidates = []
  per_node = num_devices // num_nodes
  if h.fsdp not in (-1, per_node) or (num_nodes > 1 and h.dcn_fsdp != num_nodes):
    change = {'mesh.data': 1, 'mesh.fsdp': -1, 'mesh.tensor': 1}
    if num_nodes > 1:
      change.update({'mesh.dcn_data': 1, 'mesh.dcn_fsdp': num_nodes, 'mesh.dcn_tensor': 1})
    candidates.append(change)
  if m.remat_policy != 'full':
    if m.remat_policy == 'none':
      candidates.append({'model.remat_policy': 'dots_no_batch'})
    candidates.append({'model.remat_policy': 'full'})
  if _may_run_xla_attention(m):
    candidates.append({'model.attention_impl': 'pallas'})
  if not m.loss_chunk_length and t.seq_len > LOSS_CHUNK_LENGTH:
    candidates.append({'model.loss_chunk_length': LOSS_CHUNK_LENGTH})
  if m.compute_dtype == 'float32':
    candidates.append({'model.compute_dtype': 'bfloat16'})
  accum = t.grad_accum_steps
  while accum * 2 <= t.global_batch_size and accum < 1024:
    accum *= 2
    candidates.append({'train.grad_accum_steps': accum})
  results, combined = [], {}
  for change in candidates:  # drop settings that are already so
    for path in list(change):
      section, field = path.split('.')
      if config[section][field] == change[path] and len(change) > 1:
        del change[path]
  for change in candidates:
    if 'train.grad_accum_steps' not in change:
      combined.update(change)
    try:
      total = estimate_memory(_with(config, **change), num_devices, num_nodes, leaves).total
    except (ConfigError, MeshError):
      continue
    if 'train.grad_accum_steps' in change:
      if total <= budget_bytes:  # only the smallest accumulation that fits
        results.append((change, total))
        break
    else:
      results.append((change, total))
  fitting = sorted([r for r in results if r[1] <= budget_bytes], key=lambda r: r[1])
  if fitting:
    return fitting
  if combined:
    for accum in [t.grad_accum_steps] + [2 ** i for i in range(1, 11)]:
      change = dict(combined, **{'train.grad_accum_steps': accum})
      if accum < t.grad_accum_steps:
        continue
      try:
        total = estimate_memory(_with(config, **change), num_devices, num_nodes, leaves).total
      except (ConfigError, MeshError):
        continue
      if total <= budget_bytes:
        return [(change, total)]
  return []


def describe_change(change):
  return ' '.join(f'--config.{k}={v}' for k, v in change.items())


def summary(config, num_devices, num_nodes=1, accelerator_name='h100', mfu=0.4, tokens=None,
            usable_fraction=USABLE_FRACTION):
  """One table row for a notebook: parameters, FLOPs/token, per-device memory (GiB), whether
  it fits on `accelerator_name`, and days for `tokens` (default: the config's run) at `mfu`."""
  name, peak, memory_gib = accelerator(accelerator_name)
  m, t = config.model, config.train
  est = estimate_memory(config, num_devices, num_nodes)
  tokens = run_tokens(config, tokens)
  return {
      'params': param_count(m),
      'train_flops_per_token': train_flops_per_token(m, t.seq_len),
      'memory_gib_per_device': est.total / GIB,
      'fits': est.total <= memory_gib * GIB * usable_fraction,
      'accelerator': f'{num_devices}x {name}',
      'tokens': tokens,
      'days': training_seconds(m, t.seq_len, tokens, num_devices, peak, mfu) / 86400,
  }


# --------------------------------------------------------------------------- the report


def _gib(n):
  return f'{n / GIB:9.2f}'


def _count(n):
  for unit, scale in (('T', 1e12), ('B', 1e9), ('M', 1e6), ('k', 1e3)):
    if n >= scale:
      return f'{n / scale:.3g}{unit}'
  return str(n)


def _duration(seconds):
  days = seconds / 86400
  return f'{days:.1f} days' if days >= 1 else f'{seconds / 3600:.1f} hours'


def format_plan(config, num_devices, num_nodes=1, device_memory_gib=None,
                accelerator_name=None, mfu=0.4, tokens=None, usable_fraction=USABLE_FRACTION,
                config_name=''):
  """The planner's report as text: mesh, per-device memory, fit verdict with WARNING lines
  naming what to change, and (with a known accelerator) the time for `tokens` (default
  the run's train.steps x global batch x seq_len) at `mfu`."""
  peak = None
  if accelerator_name:
    accelerator_name, peak, memory = accelerator(accelerator_name)
    device_memory_gib = device_memory_gib or memory
  leaves = state_leaves(config)
  est = estimate_memory(config, num_devices, num_nodes, leaves)
  m, t = config.model, config.train
  d = est.degrees
  ici, dcn = mesh_shape(config.mesh, num_devices, num_nodes)
  lines = [
      f'euro_lm plan{" for " + config_name if config_name else ""} '
      '(an estimate from shapes and shardings, not a measurement)',
      f'model: {_count(param_count(m))} params, {m.num_layers} layers, D={m.embed_dim}, '
      f'H={m.num_heads}/K={m.num_kv_heads}, F={m.mlp_dim}, V={m.vocab_size}; compute '
      f'{m.compute_dtype}, attention {m.attention_impl}, remat {m.remat_policy}',
      f'mesh: {num_devices} device{"s" if num_devices > 1 else ""} on {num_nodes} '
      f'node{"s" if num_nodes > 1 else ""}: '
      f'data={d["data"]} fsdp={d["fsdp"]} tensor={d["tensor"]} '
      f'(per node {ici}, across nodes {dcn})',
      f'batch: {t.global_batch_size} x {t.seq_len} tokens, grad_accum_steps='
      f'{t.grad_accum_steps}: {est.micro_batch_per_device:g} sequences per device per '
      'micro-batch',
      'per-device memory (GiB):',
  ]
  width = max(len(name) for name, _ in est.rows())
  lines += [f'  {name:<{width}} {_gib(value)}' for name, value in est.rows()]
  lines.append(f'  {"total":<{width}} {_gib(est.total)}')
  if device_memory_gib:
    budget = device_memory_gib * GIB * usable_fraction
    where = f' ({accelerator_name})' if accelerator_name else ''
    verdict = 'fits' if est.total <= budget else 'does NOT fit'
    lines.append(f'device memory: {device_memory_gib:g} GiB{where}, {usable_fraction:.0%} '
                 f'usable = {budget / GIB:.1f} GiB: {verdict} '
                 f'({est.total / budget:.0%} of usable)')
    if est.total > budget:
      state = est.params + est.gradients + est.optimizer + est.grad_accumulation
      lines.append(f'WARNING: the estimate ({est.total / GIB:.1f} GiB) exceeds the usable '
                   f'{budget / GIB:.1f} GiB per device; state (params+grads+optimizer) is '
                   f'{state / GIB:.1f} GiB, activations+logits+working '
                   f'{(est.activations + est.logits + est.working) / GIB:.1f} GiB.')
      found = suggestions(config, num_devices, num_nodes, budget, leaves)
      for change, total in found:
        lines.append(f'WARNING: to fit, change {describe_change(change)} '
                     f'(estimate {total / GIB:.1f} GiB)')
      if not found:
        lines.append('WARNING: no single change found that fits: use more devices (raise '
                     'mesh.fsdp / mesh.dcn_fsdp over them), model.remat_policy=full, a '
                     'lower train.global_batch_size or more train.grad_accum_steps')
  else:
    lines.append('device memory: unknown (give --accelerator or --device_memory_gb to check '
                 'the fit)')
  if peak:
    tokens = run_tokens(config, tokens)
    seconds = training_seconds(m, t.seq_len, tokens, num_devices, peak, mfu)
    lines.append(f'time: {_count(tokens)} tokens x {_count(train_flops_per_token(m, t.seq_len))} '
                 f'FLOPs/token on {num_devices}x {accelerator_name} '
                 f'({peak / 1e12:.0f} TFLOP/s peak) at {mfu:.0%} MFU: {_duration(seconds)}')
  return '\n'.join(lines)


# --------------------------------------------------------------------------- presets


def _preset_parts(est):
  """An estimate's per-device GiB in the four groups a presets table shows (they add up to
  the total): params; gradients (with the accumulation buffer); optimizer state (with the
  counters); activations (saved for backward, logits and loss, transient working set)."""
  return {
      'params_gib': est.params / GIB,
      'gradients_gib': (est.gradients + est.grad_accumulation) / GIB,
      'optimizer_gib': (est.optimizer + est.other_state) / GIB,
      'activations_gib': (est.activations + est.logits + est.working) / GIB,
      'total_gib': est.total / GIB,
  }


def presets_table(configs, num_devices, num_nodes=1, accelerator_name='h100', mfu=0.4,
                  tokens=None, overrides=None, usable_fraction=USABLE_FRACTION):
  """One row per config of `configs` (name -> config, e.g. the presets) on one mesh.

  Each config, with the dotted-path `overrides` applied ('mesh.fsdp': -1), is planned on
  `num_devices` devices over `num_nodes` nodes of `accelerator_name`. A row is a dict:
  `preset`, `params`, `train_flops_per_token`, `mesh` ('data=1 fsdp=8 tensor=1'),
  `micro_batch_per_device`, the per-device GiB `params_gib`, `gradients_gib` (with the
  accumulation buffer), `optimizer_gib` (AdamW m and v, counters), `activations_gib`
  (saved activations, logits and loss, transient working set) and `total_gib` (their sum,
  `estimate_memory(...).total`), `usable_gib`, `fits`, `to_fit` (the first of
  `suggestions`, as --config flags, when it does not fit; '' when it does), `tokens`
  (`tokens`, default each config's steps x global batch x seq_len) and `days` at `mfu`,
  as `summary` computes them; and `error`: None, or why a run would reject the mesh (the
  memory fields are then None).
  """
  name, peak, memory_gib = accelerator(accelerator_name)
  budget = memory_gib * GIB * usable_fraction
  rows = []
  for preset, config in configs.items():
    config = _with(config, **(overrides or {}))
    m, t = config.model, config.train
    config_tokens = run_tokens(config, tokens)
    row = {
        'preset': preset,
        'params': param_count(m),
        'train_flops_per_token': train_flops_per_token(m, t.seq_len),
        'accelerator': f'{num_devices}x {name}',
        'usable_gib': budget / GIB,
        'tokens': config_tokens,
        'days': training_seconds(m, t.seq_len, config_tokens, num_devices, peak, mfu) / 86400,
        'error': None,
    }
    leaves = state_leaves(config)
    try:
      est = estimate_memory(config, num_devices, num_nodes, leaves)
    except (ConfigError, MeshError) as e:
      row.update(mesh=None, micro_batch_per_device=None, fits=None, to_fit=None,
                 error=str(e), **{k: None for k in ('params_gib', 'gradients_gib',
                                                    'optimizer_gib', 'activations_gib',
                                                    'total_gib')})
      rows.append(row)
      continue
    d = est.degrees
    row.update(
        mesh=f'data={d["data"]} fsdp={d["fsdp"]} tensor={d["tensor"]}',
        micro_batch_per_device=est.micro_batch_per_device, fits=est.total <= budget,
        **_preset_parts(est))
    row['to_fit'] = ''
    if not row['fits']:
      found = suggestions(config, num_devices, num_nodes, budget, leaves)
      row['to_fit'] = (describe_change(found[0][0]) if found else
                       'no single change: use more devices')
    rows.append(row)
  return rows


def format_presets_table(rows):
  """`presets_table` rows as a text table, with what to change (or the error) per preset
  below it."""
  header = (f'{"preset":<8} {"params":>7} {"FLOPs/tok":>9} {"mesh":<24} {"params":>7} '
            f'{"grads":>7} {"optim":>7} {"activ":>7} {"total":>7} {"fits":<4} '
            f'{"tokens":>6} {"days":>9}')
  first = rows[0] if rows else {'accelerator': '?', 'usable_gib': 0}
  lines = [f'Per-device memory in GiB on {first["accelerator"]} '
           f'({first["usable_gib"]:.1f} GiB usable each); days at the assumed MFU.',
           header, '-' * len(header)]
  notes = []

  def gib(x):
    return f'{"-" if x is None else f"{x:.2f}":>7}'

  for r in rows:
    fits = '-' if r['fits'] is None else 'yes' if r['fits'] else 'NO'
    lines.append(
        f'{r["preset"]:<8} {_count(r["params"]):>7} {_count(r["train_flops_per_token"]):>9} '
        f'{r["mesh"] or "-":<24} {gib(r["params_gib"])} {gib(r["gradients_gib"])} '
        f'{gib(r["optimizer_gib"])} {gib(r["activations_gib"])} {gib(r["total_gib"])} '
        f'{fits:<4} {_count(r["tokens"]):>6} {r["days"]:>9.3g}')
    if r['error']:
      notes.append(f'{r["preset"]}: {r["error"]}')
    elif r['to_fit']:
      notes.append(f'{r["preset"]}: to fit, {r["to_fit"]}')
  return '\n'.join(lines + notes)


def scaling_points(configs, device_counts, devices_per_node=8, accelerator_name='h100',
                   mfu=0.4, tokens=None, overrides=None, usable_fraction=USABLE_FRACTION):
  """What `plot_scaling` draws: for each config and each device count, FSDP over all the
  devices (`ceil(devices / devices_per_node)` nodes, mesh.dcn_fsdp across them), with the
  dotted-path `overrides` applied first. A list of dicts: `preset`, `devices`, `nodes`,
  `total_gib` (per device; None when a run would reject the mesh, e.g. a batch the
  devices do not divide), `fits` (None likewise), `usable_gib` and `days` for `tokens`
  (default each config's run) at `mfu`."""
  name, peak, memory_gib = accelerator(accelerator_name)
  budget = memory_gib * GIB * usable_fraction
  points = []
  for preset, config in configs.items():
    config = _with(config, **(overrides or {}))
    leaves = state_leaves(config)
    m, t = config.model, config.train
    config_tokens = run_tokens(config, tokens)
    for devices in device_counts:
      nodes = -(-devices // devices_per_node)
      fsdp = _with(config, **{'mesh.data': 1, 'mesh.fsdp': -1, 'mesh.tensor': 1,
                              'mesh.dcn_data': 1, 'mesh.dcn_fsdp': nodes,
                              'mesh.dcn_tensor': 1})
      try:
        total = estimate_memory(fsdp, devices, nodes, leaves).total
      except (ConfigError, MeshError):
        total = None
      points.append({
          'preset': preset, 'devices': devices, 'nodes': nodes,
          'total_gib': None if total is None else total / GIB,
          'fits': None if total is None else total <= budget,
          'usable_gib': budget / GIB, 'accelerator': name,
          'days': training_seconds(m, t.seq_len, config_tokens, devices, peak, mfu) / 86400,
      })
  return points


def plot_scaling(points, axes=None):
  """Two log-log panels of `scaling_points`: estimated days, and per-device memory with the
  usable memory as a dashed line, against the number of devices, one line per preset.

  Needs matplotlib (the `notebooks` extra), imported only here. `axes`: two matplotlib
  Axes, or None for a new figure. Returns the two Axes; each preset's line is added in the
  order of `points`, over the devices whose mesh a run accepts (`total_gib` not None) in
  both panels, and the points that do not fit are marked again with an 'x' in both.
  """
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  if axes is None:
    _, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
  presets = list(dict.fromkeys(p['preset'] for p in points))
  for preset in presets:
    ok = [p for p in points if p['preset'] == preset and p['total_gib'] is not None]
    if not ok:
      continue
    devices = [p['devices'] for p in ok]
    line, = axes[0].plot(devices, [p['days'] for p in ok], marker='o', label=preset)
    axes[1].plot(devices, [p['total_gib'] for p in ok], marker='o', label=preset,
                 color=line.get_color())
    over = [p for p in ok if not p['fits']]
    for ax, key in zip(axes if over else (), ('days', 'total_gib')):
      ax.plot([p['devices'] for p in over], [p[key] for p in over], linestyle='none',
              marker='x', markersize=10, color='black')
  if points:
    axes[1].axhline(points[0]['usable_gib'], color='black', linestyle='--', linewidth=0.8,
                    label=f'usable on {points[0]["accelerator"]}')
  axes[0].set_ylabel('estimated days')
  axes[1].set_ylabel('memory per device (GiB)')
  axes[0].set_title('time for the token budget (x: does not fit)')
  axes[1].set_title('per-device memory, FSDP over all devices')
  devices = sorted({p['devices'] for p in points})
  for ax in axes:
    ax.set_xscale('log', base=2)
    ax.set_yscale('log')
    ax.set_xticks(devices, [str(d) for d in devices])
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.set_xlabel('devices')
    ax.grid(alpha=0.3, which='both')
    ax.legend()
  return axes


# --------------------------------------------------------------------------- entry point


def main(argv):
  from euro_lm.errors import UserError  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)
  jax.config.update('jax_platforms', 'cpu')  # shapes only: never touch an accelerator
  try:
    print(format_plan(_CONFIG.value, _DEVICES.value, _NODES.value,
                      _MEMORY.value or None, _ACCELERATOR.value or None, _MFU.value,
                      _TOKENS.value or None, config_name=_config_path()))
  except (UserError, MeshError) as e:
    sys.exit(f'error: {e}')


def _parse_flags(argv):
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:  # how ml_collections reports an unknown field
    while e.args and isinstance(e.args[0], Exception):
      e = e.args[0]
    detail = str(e.args[0] if e.args else e).replace('\n', '. ')
    sys.exit(f'error: unknown config field {detail}')


def _config_path():
  for arg in sys.argv:
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
  return ''


if __name__ == '__main__':
  from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  _CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. '
                                            'configs/llama_1b.py.', lock_config=True)
  _DEVICES = flags.DEFINE_integer('devices', 1, 'Total devices (all nodes together).')
  _NODES = flags.DEFINE_integer('nodes', 1, 'Nodes (one process each; the mesh.dcn_* '
                                'degrees must multiply to this when > 1).')
  _MEMORY = flags.DEFINE_float('device_memory_gb', 0.0, 'Memory per device in GiB; '
                               'overrides the accelerator\'s.')
  _ACCELERATOR = flags.DEFINE_string('accelerator', '', 'Accelerator name (h100, a100, '
                                     'mi250x, tpu_v5...): device memory and peak FLOP/s.')
  _MFU = flags.DEFINE_float('mfu', 0.4, 'Assumed model FLOPs utilisation for the time estimate.')
  _TOKENS = flags.DEFINE_float('tokens', 0.0, 'Token budget for the time estimate; 0: '
                               'train.steps x global_batch_size x seq_len.')
  flags.mark_flags_as_required(['config'])
  app.run(main, flags_parser=_parse_flags)
