"""`python -m euro_lm.bench.profile --config=configs/llama_1b.py:gpu [--steps=3]`

Where the train step's time goes, op by op. Traces a few steps of the real compiled step on
synthetic tokens (as `euro_lm.bench`) with `jax.profiler`, matches each traced op to its
instruction in the compiled HLO, and prints three tables per step:

- by kind of work: matmuls, attention kernels, collectives, other fusions, copies;
- by part of the step: each part of the model (attention projections and core, MLP, norms,
  embedding, logits and loss) in its forward, recompute (remat) and backward, then the
  optimizer; the model's named scopes (`jax.named_scope`) give the parts;
- the ops that take longest.

The fused loss (`model.loss_chunk_length`) computes its gradients in its forward, so they
count there. Op times are summed, so on a CPU, whose threads run ops side by side, they can
add up to more than the step. `device busy` is the union of the ops' intervals; the rest of
the step's wall time is the host's dispatch and the gaps between ops. The trace stays in
`--trace_dir` for TensorBoard's Profile tab or Perfetto.
"""

import collections
import dataclasses
import glob
import os
import re
import statistics
import tempfile

import jax
from absl import flags, logging
from flax import linen as nn
from ml_collections import config_flags

from euro_lm import cli
from euro_lm.bench.synthetic import compile_train_step
from euro_lm.errors import ArgumentError
from euro_lm.plan import hlo

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 3, 'Traced steps (after 2 warm-up steps).')
_TOP = flags.DEFINE_integer('top', 15, 'Rows of the longest ops.')
_TRACE_DIR = flags.DEFINE_string('trace_dir', None, 'Where the trace goes (default: a temp dir).')

MATMUL, ATTENTION, COLLECTIVE, FUSION, COPY, OTHER = (
    'matmuls',
    'attention kernels',
    'collectives',
    'other fusions (elementwise, reductions)',
    'copies and layout',
    'other',
)
_CONTAINERS = {'while', 'conditional', 'call'}  # their ops are traced on their own
_LAYOUT = {
    'copy',
    'transpose',
    'bitcast',
    'reshape',
    'slice',
    'dynamic-slice',
    'dynamic-update-slice',
    'concatenate',
    'pad',
    'broadcast',
    'parameter',
    'constant',
    'tuple',
    'get-tuple-element',
    'copy-start',
    'copy-done',
}
_MATMUL_CALLS = ('gemm', 'matmul', 'cublas')
_ATTENTION_CALLS = ('fmha', 'triton', 'mosaic', 'pallas')
# Kernel names, for device ops the trace does not tie to an HLO instruction.
_KERNEL_KINDS = (
    (COLLECTIVE, ('nccl',)),
    (ATTENTION, ('fmha', 'flash', 'attention', 'cudnn')),
    (MATMUL, ('gemm', 'xmma', 'cutlass', 'nvjet', 'cublas', 'sm90_', 'wgmma')),
)
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_DEVICE_PLANE = re.compile(r'^/device:(?:GPU|TPU):(\d+)$')
_SCAN_SLICES = {'dynamic_index_in_dim', 'dynamic_update_index_in_dim'}
_SCOPE = re.compile(r'^(?:\w+\()+|\)+$')  # 'transpose(jvp(Decoder))' -> 'Decoder'


class Classifier:
  """Kind of work and part of the step of the compiled module's instructions."""

  def __init__(self, hlo_text):
    by_computation, _ = hlo.computations(hlo_text)
    self.instructions = {i.name: i for c in by_computation.values() for i in c}
    self.computations = {c: [i.name for i in ops] for c, ops in by_computation.items()}
    self._described = {}

  def describe(self, name):
    """`(kind, part)` of an instruction, worked out once: a trace runs each op many times.
    The kind is None for a name the module lacks."""
    if name not in self._described:
      kind = self.kind(name)
      self._described[name] = (kind, part(self.op_name(name)) if kind else None)
    return self._described[name]

  def _inside(self, name, seen=None):
    """The instructions a fusion or async op runs, transitively."""
    seen = set() if seen is None else seen
    for computation in self.instructions[name].callees:
      if computation in seen:
        continue
      seen.add(computation)
      for inner in self.computations.get(computation, ()):
        yield self.instructions[inner]
        yield from self._inside(inner, seen)

  def is_container(self, name):
    return name in self.instructions and self.instructions[name].opcode in _CONTAINERS

  def kind(self, name):
    """The kind of work of an instruction; None for a name the module lacks."""
    if name not in self.instructions:
      return None
    ops = [self.instructions[name], *self._inside(name)]
    targets = [t.lower() for op in ops for t in _TARGET.findall(op.rest)]
    if any(op.opcode.startswith(hlo.KINDS) for op in ops):
      return COLLECTIVE
    if any(key in t for t in targets for key in _ATTENTION_CALLS):
      return ATTENTION
    if any(op.opcode in ('dot', 'convolution') for op in ops) or any(
        key in t for t in targets for key in _MATMUL_CALLS
    ):
      return MATMUL
    if all(op.opcode in _LAYOUT for op in ops):
      return COPY
    if ops[0].opcode == 'fusion':
      return FUSION
    return OTHER

  def _own_op_name(self, name):
    ops = (self.instructions[name], *self._inside(name))
    return next((op.op_name for op in ops if op.op_name), '')

  def op_name(self, name):
    """The instruction's JAX name stack, else that of an op inside it; where XLA dropped
    both, that of an instruction it reads."""
    if name not in self.instructions:
      return ''
    operands = self.instructions[name].operands
    candidates = (name, *(o for o in operands if o in self.instructions))
    return next(filter(None, map(self._own_op_name, candidates)), '')


def part(op_name):
  """Part of the step an op belongs to, from its JAX name stack."""
  if not op_name:
    return 'unattributed'
  scopes = [_SCOPE.sub('', s) for s in op_name.split('/')]
  if 'optimizer' in scopes:
    return 'optimizer'
  if 'attention_core' in scopes:
    module = 'attention core'
  elif 'attention' in scopes:
    module = 'attention projections'
  elif 'mlp' in scopes:
    module = 'MLP'
  elif any(s.endswith('_norm') for s in scopes):
    module = 'norms'
  elif 'embed' in scopes:
    module = 'embedding'
  elif 'logits' in scopes or 'loss' in scopes:
    module = 'logits and loss'
  elif 'while' in scopes and _SCAN_SLICES & set(scopes):
    module = "layer scan (each layer's weights and saved activations in and out)"
  else:
    module = 'rest of the step'
  if 'rematted_computation' in scopes:
    return f'{module}, recompute'
  if 'transpose(' in op_name:
    return f'{module}, backward'
  if 'jvp(' in op_name or module != 'rest of the step':  # an undifferentiated mask: forward
    return f'{module}, forward'
  return module


def kernel_kind(name):
  lowered = name.lower()
  for kind, keys in _KERNEL_KINDS:
    if any(key in lowered for key in keys):
      return kind
  return OTHER


@dataclasses.dataclass
class Op:
  name: str  # HLO instruction, or the kernel's name where the trace gives none
  start_ns: float
  duration_ns: float
  kind: str
  part: str


def traced_ops(profile, module, classifier):
  """The module's ops on the trace's first device: its kernels on a GPU/TPU (the streams'
  lines, not the profiler's derived ones), the runtime's ops of device 0 on CPUs."""
  planes = sorted(
      (int(match.group(1)), plane)
      for plane in profile.planes
      if (match := _DEVICE_PLANE.match(plane.name))
  )
  on_cpu = not planes
  chosen = [p for p in profile.planes if p.name == '/host:CPU'] if on_cpu else [planes[0][1]]
  ops = []
  for plane in chosen:
    lines = list(plane.lines)
    streams = [line for line in lines if 'stream' in line.name.lower()]
    for event in (event for line in streams or lines for event in line.events):
      stats = dict(event.stats)
      hlo_op = stats.get('hlo_op')
      if hlo_op is None and on_cpu:
        continue  # the runtime's own events, not ops
      if hlo_op is not None and not str(stats.get('hlo_module', module)).startswith(module):
        continue
      if on_cpu and stats.get('device_ordinal', 0) != 0:
        continue
      if classifier.is_container(hlo_op):
        continue
      kind, where = classifier.describe(hlo_op)
      if kind is None:  # a kernel the trace does not tie to the module's HLO
        ops.append(
            Op(
                event.name,
                event.start_ns,
                event.duration_ns,
                kernel_kind(event.name),
                'unattributed',
            )
        )
      else:
        ops.append(Op(hlo_op, event.start_ns, event.duration_ns, kind, where))
  return ops


def _steps(profile):
  """(start_ns, end_ns) of each traced step, from its `StepTraceAnnotation`."""
  spans = []
  for plane in profile.planes:
    for line in plane.lines:
      for event in line.events:
        if event.name == 'train' and 'step_num' in dict(event.stats):
          spans.append((event.start_ns, event.start_ns + event.duration_ns))
  return sorted(spans)


def _union_ns(intervals):
  total, end = 0.0, float('-inf')
  for start, stop in sorted(intervals):
    if stop > end:
      total += stop - max(start, end)
      end = stop
  return total


def breakdown(profile, hlo_text, module):
  """Per-step totals of a trace: `{'step_ms', 'busy_ms', 'kinds', 'parts', 'ops',
  'attributed', ...}`, in ms per step (`ops` by HLO instruction or kernel name); `step_ms`
  runs from the first step's start to where its last step's host or device work ends."""
  classifier = Classifier(hlo_text)
  steps = _steps(profile)
  if not steps:
    raise ValueError('the trace holds no step annotated "train"')
  # The trace starts after the warm-up's work is done, so every op in it is a traced step's.
  ops = traced_ops(profile, module, classifier)
  if not ops:
    raise ValueError(f'the trace holds no op of {module}')
  n = len(steps)
  per_step = lambda ns: ns / 1e6 / n
  totals = {
      'kinds': collections.Counter(),
      'parts': collections.Counter(),
      'ops': collections.Counter(),
  }
  for op in ops:
    totals['kinds'][op.kind] += op.duration_ns
    totals['parts'][op.part] += op.duration_ns
    totals['ops'][(op.name, op.kind, op.part)] += op.duration_ns
  first = min(steps[0][0], *(op.start_ns for op in ops))
  window_ns = max(steps[-1][1], *(op.start_ns + op.duration_ns for op in ops)) - first
  all_ns = sum(op.duration_ns for op in ops)
  attributed_ns = sum(op.duration_ns for op in ops if op.part != 'unattributed')
  return {
      'steps': n,
      'step_ms': per_step(window_ns),
      'step_ms_median': statistics.median((b - a) / 1e6 for a, b in steps),
      'busy_ms': per_step(_union_ns((op.start_ns, op.start_ns + op.duration_ns) for op in ops)),
      'op_ms': per_step(all_ns),
      'attributed': attributed_ns / all_ns,
      **{key: {k: per_step(v) for k, v in c.most_common()} for key, c in totals.items()},
  }


def read_trace(directory):
  """The newest trace `jax.profiler` wrote under `directory`."""
  files = glob.glob(os.path.join(directory, 'plugins', 'profile', '*', '*.xplane.pb'))
  if not files:
    raise FileNotFoundError(f'no *.xplane.pb under {directory}/plugins/profile')
  return jax.profiler.ProfileData.from_file(max(files, key=os.path.getmtime))


def trace_steps(config, steps, directory):
  """Compiles the step, runs 2 warm-up steps, traces `steps` more into `directory`;
  returns the compiled step."""
  compiled, state, batch, mesh, rules, _ = compile_train_step(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for _ in range(2):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    jax.profiler.start_trace(directory)
    for i in range(steps):
      with jax.profiler.StepTraceAnnotation('train', step_num=i):
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
    jax.profiler.stop_trace()
  return compiled


def module_name(hlo_text):
  match = re.search(r'^HloModule\s+([\w.\-]+)', hlo_text, re.MULTILINE)
  if not match:
    raise ValueError('the compiled text names no HloModule')
  return match.group(1)


def _share(ms, total):
  return f'{ms:.2f} | {100 * ms / total:.1f}%'


def format_tables(result, top):
  total = result['op_ms']
  lines = [
      f'step {result["step_ms"]:.2f} ms over {result["steps"]} traced steps (median annotated '
      f'step {result["step_ms_median"]:.2f} ms); device busy {result["busy_ms"]:.2f} ms '
      f'({100 * result["busy_ms"] / result["step_ms"]:.1f}%); ops summed {total:.2f} ms; '
      f'{100 * result["attributed"]:.1f}% of op time tied to a part of the model',
      '',
      '| kind of work | ms per step | share of op time |',
      '|---|---|---|',
      *(f'| {k} | {_share(v, total)} |' for k, v in result['kinds'].items()),
      '',
      '| part of the step | ms per step | share of op time |',
      '|---|---|---|',
      *(f'| {k} | {_share(v, total)} |' for k, v in result['parts'].items()),
      '',
      '| op | kind | part | ms per step | share of op time |',
      '|---|---|---|---|---|',
  ]
  for (name, kind, where), ms in list(result['ops'].items())[:top]:
    lines.append(f'| `{name}` | {kind} | {where} | {_share(ms, total)} |')
  return '\n'.join(lines)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  if _STEPS.value < 1 or _TOP.value < 0:
    raise ArgumentError(
        f'--steps must be at least 1 and --top at least 0, got {_STEPS.value} and {_TOP.value}'
    )
  directory = _TRACE_DIR.value or tempfile.mkdtemp(prefix='euro_lm_profile_')
  compiled = trace_steps(config, _STEPS.value, directory)
  hlo_text = compiled.as_text()
  result = breakdown(read_trace(directory), hlo_text, module_name(hlo_text))
  device = jax.devices()[0]
  print(f'{device.device_kind}, device 0 of {jax.device_count()}; trace in {directory}\n')
  print(format_tables(result, _TOP.value))


if __name__ == '__main__':
  cli.run(main)
