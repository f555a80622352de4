"""The planner's memory model: the per-device bytes of a train step on a mesh.

Shapes come from `jax.eval_shape` of the real model init and shardings from the config's
logical-axis rules, divided out arithmetically: nothing runs on an accelerator.

What the estimate models (all per device; it is an estimate, not a measurement):

- **Train state** (exact up to XLA padding): every leaf of the real `TrainState` from
  `jax.eval_shape` of the init (params float32; AdamW's m and v float32 sharded like the
  params; the optimizer's and the state's int32 counters), each dimension divided by the
  product of the mesh axes its logical axis maps to (rounded up, as a sharded array pads).
- **FP8** (`model.fp8`): the scales and amax histories (`TrainState.fp8`, replicated) in the
  state, and a copy of them kept for the backward. Flax's fp8 dot keeps, per layer, each
  projection's input and weight quantized to float8_e4m3fn (one byte an element; q, k, v
  and gate, up each quantize their shared input on their own): saved with remat `none`,
  else recomputed one layer at a time (in the working set). They are not dots, so `dots`
  policies save only the dots' bfloat16 outputs, which the activations already count.
- **Gradients**: float32, sharded like the params. With `train.grad_accum_steps > 1` the
  accumulation carry is a second params-sized float32 buffer.
- **LoRA** (`model.lora_rank` > 0): the state's optimizer leaves are the adapters' (the
  frozen base has no moments), and gradients and the accumulation buffer cover the adapters
  alone; each targeted projection adds its `[B, L, r]` adapter input to the activations.
- **Activations saved for the backward pass**, for one micro-batch of
  `global_batch_size / grad_accum_steps` sequences split over the batch mesh axes
  (data x fsdp, ICI and DCN). Per layer, what is kept depends on `model.remat_policy`:
  `none` keeps every residual (the residual stream, the norms' float32 intermediates, q/k/v,
  the attention output and its per-head float32 log-sum-exp (no attention impl keeps the
  L x L probabilities), the MLP's gate/up/hidden); `full` keeps only each layer's input;
  `dots` the matmul outputs; `dots_no_batch` the weight-matmul outputs;
  `save_attention_out` the layer input and the attention output and log-sum-exp;
  `dots_and_attention` what `dots_no_batch` and `save_attention_out` keep.
  Activations are in `model.compute_dtype`, norms and softmax in float32. Each activation
  is divided by the mesh axes of its logical axes (batch, heads, mlp, vocab), like the
  params.
- **Logits and loss**: `[B, L, V]` float32 logits and their float32 gradient (plus a
  compute-dtype copy of the gradient for the output matmul when computing in 16 bits).
  With `model.loss_chunk_length = C`, the same for `[B, C, V]`, plus what the fused loss
  keeps from its forward: the hidden-state gradient and a float32 head-gradient partial
  per device (split over tensor, not fsdp). Soft-capped logits (`model.final_logit_softcap`)
  without the fused loss keep two more `[B, L, V]` float32 arrays for autodiff's tanh
  (measured, BENCHMARKS.md); the fused loss takes the cap in its pass.
- **Working set**: transients not in the above: with any remat policy the recomputed
  residuals of the one layer being differentiated; where the xla attention runs, the
  float32 scores of its largest query chunk, recomputed in the backward; one layer's weights
  gathered over fsdp in the compute dtype and their float32 gradients before the
  reduce-scatter; the backward residual stream. Runtime and framework reserves (CUDA
  context, NCCL buffers, XLA's fragmentation) are not modelled: hence `usable_fraction`
  (`USABLE_FRACTION`) of the device memory is what a plan may use.

Which attention runs is what `euro_lm.model.attention.resolve` says for the config on the
planned `device` (a `euro_lm.devices.Device`, e.g. `devices.accelerator_device('h100')`);
where the device is not known (None), 'auto' resolves as on a CPU, to xla.

How close the estimate comes to XLA's own memory analysis of the compiled step is in
BENCHMARKS.md; tests/test_plan.py checks it.
"""

import copy
import dataclasses
import math

import jax
from flax import linen as nn
from jax.sharding import AbstractMesh

from euro_lm import devices
from euro_lm.config import validate
from euro_lm.errors import ConfigError
from euro_lm.model import Decoder, fp8, lora, train_flops_per_token
from euro_lm.model.attention import head_dim, resolve_for_model, xla_query_chunks
from euro_lm.sharding import (
    MESH_AXES,
    MeshError,
    batch_mesh_axes,
    logical_rules,
    mesh_axes_size,
    mesh_shape,
)
from euro_lm.train.optimizer import make_optimizer
from euro_lm.train.state import init_boxed

GIB = 2**30

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


def training_seconds(model_config, seq_len, tokens, num_devices, peak_flops_per_device, mfu=0.4):
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


def mesh_degrees(config, num_devices, num_nodes=1, *, device=None):
  """`{'data', 'fsdp', 'tensor'}` degrees (ICI x DCN) of the config's mesh on
  `num_devices` devices like `device` (None: not known) over `num_nodes` nodes (one process
  per node, each a DCN granule).

  Raises MeshError / ConfigError with the message naming the field, as a run would.
  """
  try:
    mesh_shape(config.mesh, num_devices, num_nodes)
  except MeshError as e:
    if num_nodes > 1 and 'slices' in str(e):
      raise MeshError(
          f'{e} (nodes): with {num_nodes} nodes set the mesh.dcn_* degrees to '
          f'multiply to {num_nodes}, e.g. --config.mesh.dcn_fsdp={num_nodes} or '
          f'--config.mesh.dcn_data={num_nodes}'
      ) from None
    raise
  return validate(config, num_devices, num_nodes, device)


def _abstract_mesh(degrees):
  """An abstract mesh (no devices) with these `{'data', 'fsdp', 'tensor'}` degrees, for the
  sharding helpers that take a mesh."""
  return AbstractMesh(tuple(degrees[axis] for axis in MESH_AXES), MESH_AXES)


def per_device_elements(shape, logical_axes, rules, degrees):
  """Elements of one shard of an array of `shape` whose dims carry `logical_axes`: each
  dim divided (rounded up) by the mesh axes its logical name maps to under `rules`, with
  Flax's rule semantics (a mesh axis used by an earlier dim is not reused)."""
  mesh_spec = nn.logical_to_mesh_axes(tuple(logical_axes), rules)
  mesh = _abstract_mesh(degrees)
  return math.prod(
      -(-size // mesh_axes_size(mesh, axes))
      for size, axes in zip(shape, tuple(mesh_spec) + (None,) * len(shape))
  )


@dataclasses.dataclass(frozen=True)
class StateLeaf:
  path: str
  part: str  # 'params' | 'optimizer' | 'fp8' (model.fp8's scales, histories) | 'other'
  shape: tuple
  itemsize: int
  logical_axes: tuple  # one name or None per dim
  frozen: bool = False  # a param that LoRA leaves untrained


def state_leaves(config):
  """Every leaf of the real train state (params, optimizer state, fp8 state, counters) with
  its shape, dtype size and logical axes, from `jax.eval_shape` of the init: no memory used."""
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
  has_adapters = bool(lora.targets(config.model))
  flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
  for (path, shape), spec in zip(flat_shapes, flat_specs):
    name = jax.tree_util.keystr(path)
    part = (
        'params'
        if name.startswith('.params')
        else 'optimizer'
        if name.startswith('.opt_state')
        else 'fp8'
        if name.startswith('.fp8')
        else 'other'
    )
    axes = tuple(spec) + (None,) * (len(shape.shape) - len(spec))
    frozen = has_adapters and part == 'params' and lora.SUFFIX + "'" not in name
    leaves.append(StateLeaf(name, part, tuple(shape.shape), shape.dtype.itemsize, axes, frozen))
  return leaves


def leaf_bytes(leaf, rules, degrees):
  return per_device_elements(leaf.shape, leaf.logical_axes, rules, degrees) * leaf.itemsize


# --------------------------------------------------------------------------- activations


def _layer_terms(m, b, seq_len, policy, cs, fp8_weights=()):
  """Per-layer activation terms `(logical axes, global shape, bytes per element)`.

  Returns `(saved, recompute)`: what the backward keeps for every layer under `policy`,
  and the full residual set of one layer (recomputed, transiently, under any remat).
  `fp8_weights`: with `model.fp8`, one layer's projection weights as terms (`_fp8_weights`).
  """
  L, D, H, K, hd, F = seq_len, m.embed_dim, m.num_heads, m.num_kv_heads, head_dim(m), m.mlp_dim
  BLD = (('batch', 'length', 'embed'), (b, L, D))
  BL = (('batch', 'length'), (b, L))
  BLHd = (('batch', 'length', 'heads', 'head_dim'), (b, L, H, hd))
  BLKd = (('batch', 'length', 'kv_heads', 'head_dim'), (b, L, K, hd))
  BLF = (('batch', 'length', 'mlp'), (b, L, F))
  BHL = (('batch', 'heads', 'length'), (b, H, L))
  f32_copy = cs != 4  # a float32 upcast that is a separate buffer only in 16-bit compute
  gated = lora.has_gate(m)  # else no gate projection (xIELU)

  def norm(axes_shape, width=1):
    terms = [(*axes_shape, 4)] * width  # normalised float32 output
    if f32_copy:
      terms.append((*axes_shape, 4))  # float32 upcast of the input
    return terms + [(*BL, 4)]  # the reciprocal rms

  # LoRA: each adapter's x A, the input of its B matmul (a dot output, kept by 'dots').
  adapters = [(('batch', 'length', None), (b, L, m.lora_rank), cs)] * len(lora.targets(m))
  layer_input = [(*BLD, cs)]
  # model.post_norms: the attention and MLP outputs normed before each residual add.
  post_norm = norm(BLD) + [(*BLD, cs)] if m.get('post_norms', False) else []
  everything = (
      layer_input
      + norm(BLD)
      + [(*BLD, cs)]  # attention norm -> h
      + [(*BLHd, cs), (*BLKd, cs), (*BLKd, cs)]  # q, k, v (after RoPE)
      + (norm(BLHd) + norm(BLKd) if m.qk_norm else [])
      + [(*BHL, 4)]  # log-sum-exp
      + [(*BLHd, cs), (*BLD, cs)]  # attention out, residual
      + post_norm
      + norm(BLD)
      + [(*BLD, cs)]  # mlp norm -> h
      + [(*BLF, cs)] * (3 if gated else 2)  # gate, up, hidden
      + post_norm
      + adapters
  )
  if fp8.enabled(m):
    # Flax's fp8 dot keeps each projection's input and weight quantized to float8_e4m3fn
    # for its backward; q, k, v (and gate, up) quantize the same input each with its own
    # scale. Not dots: remat recomputes them (the dot outputs stay what `dots` saves).
    fp8_inputs = (
        [BLD] * 3 + [BLHd] + [BLD] * (2 if gated else 1) + [BLF]
    )  # q, k, v, o, gate, up, down
    everything += [(*axes_shape, 1) for axes_shape in fp8_inputs] + list(fp8_weights)
  attention = [(*BLHd, cs), (*BHL, 4)]  # output and log-sum-exp (`kernels.OUT_NAME`, ...)
  if policy == 'none':
    return everything, []
  if policy == 'full':
    saved = layer_input
  elif policy == 'save_attention_out':
    saved = layer_input + attention
  elif policy in ('dots', 'dots_no_batch', 'dots_and_attention'):
    saved = (
        layer_input
        + [(*BLHd, cs), (*BLKd, cs), (*BLKd, cs)]  # q, k, v projections
        + [(*BLD, cs)]
        + [(*BLF, cs)] * (2 if gated else 1)
        + [(*BLD, cs)]
        + adapters
    )  # o, gate, up, down
    if policy == 'dots_and_attention':
      saved += attention
  else:
    raise ConfigError(f'model.remat_policy={policy!r} is unknown')
  return saved, everything


def _fp8_weights(leaves):
  """One layer's projection weights (`lora.TARGETS`), one byte each: the float8_e4m3fn
  copies `model.fp8` quantizes, sharded like the params (quantized before XLA gathers)."""
  names = {f".params['layers']['{module}']['{name}']" for module, name in lora.TARGETS.values()}
  # The stacked 'layers' axis dropped.
  return [(x.logical_axes[1:], x.shape[1:], 1) for x in leaves if x.path in names]


def _attention_transient(m, b, seq_len, cs):
  """The xla attention's largest query chunk, in its backward: float32 scores, probabilities
  and their gradient (and a compute-dtype copy in 16 bits); soft-capped scores
  (`model.attn_logit_softcap`) stay beside them for the cap's gradient. cudnn/pallas work
  in blocks."""
  chunks = xla_query_chunks(seq_len, causal=True)
  BHQL = (('batch', 'heads', 'length', None), (b, m.num_heads, seq_len // chunks, seq_len))
  float32 = 4 if m.get('attn_logit_softcap', 0.0) else 3
  return [(*BHQL, 4)] * float32 + ([(*BHQL, cs)] if cs != 4 else [])


def _runs_xla_attention(config, device):
  """Whether the attention that runs for `config` on `device` is the xla one."""
  return resolve_for_model(config.model, config.train.seq_len, device).impl == 'xla'


def _bytes(terms, rules, degrees):
  return sum(per_device_elements(shape, axes, rules, degrees) * size for axes, shape, size in terms)


# --------------------------------------------------------------------------- the estimate


@dataclasses.dataclass
class MemoryEstimate:
  """Per-device bytes of each part of a train step, and what they were computed for."""

  degrees: dict  # mesh degrees data/fsdp/tensor (ICI x DCN)
  num_devices: int
  num_nodes: int
  micro_batch_per_device: float  # sequences per device per micro-batch
  params: int
  gradients: int  # of the trainable params
  optimizer: int
  grad_accumulation: int
  other_state: int  # counters: step, skip counts, optimizer counts
  activations: int  # saved for the backward pass, all layers
  logits: int  # logits and loss
  working: int  # transient working set
  frozen_params: int = 0  # the part of `params` that LoRA leaves untrained
  fp8_state: int = 0  # model.fp8's scales and amax histories (replicated)

  @property
  def state(self):
    """Params + optimizer state + fp8 state + counters: the train step's donated arguments."""
    return self.params + self.optimizer + self.fp8_state + self.other_state

  @property
  def total(self):
    return (
        self.state
        + self.gradients
        + self.grad_accumulation
        + self.activations
        + self.logits
        + self.working
    )

  def rows(self):
    if self.frozen_params:
      params = [
          ('params, frozen base (float32)', self.frozen_params),
          ('params, LoRA adapters (float32)', self.params - self.frozen_params),
      ]
      trained = ', adapters only'
    else:
      params, trained = [('params (float32)', self.params)], ''
    return params + [
        (f'gradients (float32{trained})', self.gradients),
        (f'optimizer state (AdamW m, v float32{trained})', self.optimizer + self.other_state),
        *([('fp8 scales and amax histories', self.fp8_state)] if self.fp8_state else []),
        ('gradient accumulation buffer', self.grad_accumulation),
        ('activations saved for backward', self.activations),
        ('logits and loss (float32)', self.logits),
        ('transient working set', self.working),
    ]


def estimate_memory(config, num_devices, num_nodes=1, leaves=None, *, device=None):
  """Per-device memory estimate of the train step of `config` on `num_devices` devices
  like `device` (a `euro_lm.devices.Device`; None: not known) over `num_nodes` nodes.
  `leaves` (from `state_leaves(config)`) saves re-tracing the init when only
  batch/remat/mesh settings change. Raises MeshError/ConfigError for a mesh or config a run
  would reject."""
  degrees = mesh_degrees(config, num_devices, num_nodes, device=device)
  rules = logical_rules(config.mesh)
  leaves = state_leaves(config) if leaves is None else leaves
  parts = {'params': 0, 'optimizer': 0, 'fp8': 0, 'other': 0}
  frozen = 0
  for leaf in leaves:
    parts[leaf.part] += leaf_bytes(leaf, rules, degrees)
    frozen += leaf_bytes(leaf, rules, degrees) if leaf.frozen else 0
  params = parts['params']
  trainable = params - frozen

  m, t = config.model, config.train
  cs = jax.numpy.dtype(m.compute_dtype).itemsize
  micro = t.global_batch_size // t.grad_accum_steps  # global sequences per micro-batch
  batch_ways = mesh_axes_size(_abstract_mesh(degrees), batch_mesh_axes(rules))
  fp8_weights = _fp8_weights(leaves) if fp8.enabled(m) else ()
  saved, recompute = _layer_terms(m, micro, t.seq_len, m.remat_policy, cs, fp8_weights)
  activations = m.num_layers * _bytes(saved, rules, degrees)
  activations += parts['fp8']  # model.fp8: the backward keeps the new scales and histories
  BLD = (('batch', 'length', 'embed'), (micro, t.seq_len, m.embed_dim))
  # Embedding output, final norm (as in a layer), final hidden state.
  activations += _bytes([(*BLD, cs), (*BLD, 4), (*BLD, cs)], rules, degrees)
  chunk = min(m.loss_chunk_length, t.seq_len) or t.seq_len
  BCV = (('batch', 'length', 'vocab'), (micro, chunk, m.vocab_size))
  logits = _bytes([(*BCV, 4), (*BCV, 4)] + ([(*BCV, cs)] if cs != 4 else []), rules, degrees)
  if m.get('final_logit_softcap', 0.0) and not m.loss_chunk_length:
    logits += _bytes([(*BCV, 4), (*BCV, 4)], rules, degrees)  # the uncapped logits and tanh
  if m.loss_chunk_length:
    # The fused loss: the hidden states regrouped by chunk, dX kept from its forward, and
    # each device's float32 dW partial (split over tensor only; reduced after the chunks).
    partial_dW = (('vocab', None), (m.vocab_size, m.embed_dim), 4)
    logits += _bytes([(*BLD, cs), (*BLD, cs), partial_dW], rules, degrees)

  # One layer's weights, gathered over fsdp (tensor-sharded only), in the compute dtype,
  # and the float32 gradients of the trainable ones before the reduce-scatter.
  gathered = dict(degrees, fsdp=1, data=1)
  layer_params = [
      leaf for leaf in leaves if leaf.part == 'params' and leaf.path.startswith(".params['layers']")
  ]

  def per_layer_elements(leaves):
    elements = sum(per_device_elements(x.shape, x.logical_axes, rules, gathered) for x in leaves)
    return elements / max(m.num_layers, 1)

  working = int(
      per_layer_elements(layer_params) * cs
      + per_layer_elements([x for x in layer_params if not x.frozen]) * 4
  )
  if _runs_xla_attention(config, device):
    recompute = recompute + _attention_transient(m, micro, t.seq_len, cs)
  working += _bytes(recompute, rules, degrees)
  working += _bytes([(*BLD, 4), (*BLD, cs)], rules, degrees)  # backward residual stream
  return MemoryEstimate(
      degrees=degrees,
      num_devices=num_devices,
      num_nodes=num_nodes,
      micro_batch_per_device=micro / batch_ways,
      params=params,
      gradients=trainable,
      optimizer=parts['optimizer'],
      grad_accumulation=trainable if t.grad_accum_steps > 1 else 0,
      other_state=parts['other'],
      activations=activations,
      logits=logits,
      working=working,
      frozen_params=frozen,
      fp8_state=parts['fp8'],
  )


def with_overrides(config, overrides):
  """A copy of `config` with the dotted-path `overrides` ({'model.remat_policy': 'full'})."""
  config = copy.deepcopy(config)
  for path, value in overrides.items():
    section, field = path.split('.')
    config[section][field] = value
  return config


def estimate_with_overrides(
    config, overrides, num_devices, num_nodes=1, leaves=None, *, device=None
):
  """`estimate_memory` of `config` with the dotted-path `overrides`, or None where a run
  would reject the changed config or its mesh (what the planner's candidates skip)."""
  try:
    return estimate_memory(
        with_overrides(config, overrides), num_devices, num_nodes, leaves, device=device
    )
  except (ConfigError, MeshError):
    return None


# What the planner suggests for `model.loss_chunk_length`: [B, 512, V] blocks keep the
# output matmuls large (B x 512 rows per device) while holding a fraction of the logits.
LOSS_CHUNK_LENGTH = 512


def suggestions(config, num_devices, num_nodes, budget_bytes, leaves=None, *, device=None):
  """Changes that make the plan fit in `budget_bytes`: a list of `(description, total
  bytes)` for each single change (and, if none fits alone, the combination) that a run on
  devices like `device` (None: not known) would accept, smallest total first among those
  that fit."""
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
  if _runs_xla_attention(config, device):
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
    est = estimate_with_overrides(config, change, num_devices, num_nodes, leaves, device=device)
    if (
        est is None
    ):  # a run would reject it (e.g. the Hopper kernels named for heads of 256): not combined
      continue
    if 'train.grad_accum_steps' not in change:
      combined.update(change)
    total = est.total
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
    for accum in [t.grad_accum_steps] + [2**i for i in range(1, 11)]:
      change = dict(combined, **{'train.grad_accum_steps': accum})
      if accum < t.grad_accum_steps:
        continue
      est = estimate_with_overrides(config, change, num_devices, num_nodes, leaves, device=device)
      if est is not None and est.total <= budget_bytes:
        return [(change, est.total)]
  return []
