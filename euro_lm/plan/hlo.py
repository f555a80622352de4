"""A compiled step's optimized HLO text, read: its instructions by computation
(`computations`), how many times one step runs each computation (`runs_per_step`), and its
collectives.

`collectives(hlo_text, mesh_shape)` lists every all-reduce, all-gather, reduce-scatter,
all-to-all and collective-permute (and their async `-start` forms; `-done` carries no
data), with its result shapes, dtypes, group size, the mesh axes its replica groups span,
and how many times one step runs it: the trip count (`known_trip_count`) of every while
loop around it, so a collective in the layer scan counts once per layer.

Bytes are what each device sends (and receives) under the ring-algorithm cost model, for a
full buffer of S bytes over a group of n devices: all-reduce 2(n-1)/n x S; all-gather,
reduce-scatter and all-to-all (n-1)/n x S; collective-permute S. S is the all-gather's
result, the reduce-scatter's operand (result x n), the all-reduce's and all-to-all's
operand. Device ids in replica groups are logical ids (use_global_device_ids), the
position in `Mesh.devices.flat`, so axis attribution needs only the mesh's shape.
"""

import dataclasses
import math
import re

import numpy as np

from euro_lm.sharding import MESH_AXES

KINDS = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')

_ITEMSIZE = {'pred': 1, 'token': 0, 'c64': 8, 'c128': 16}
_COMPUTATION = re.compile(r'^(ENTRY\s+)?%(\S+)\s.*\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(ROOT\s+)?%(\S+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$')
_ARRAY = re.compile(r'\b([a-z]+[0-9a-z]*)\[([\d,]*)\]')
_CALLS = re.compile(
    r'\b(?:to_apply|calls|body|condition|true_computation|false_computation)=%([\w.\-]+)'
)
_BRANCHES = re.compile(r'branch_computations=\{([^}]*)\}')
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def itemsize(dtype):
  """Bytes per element of an HLO element type ('f32', 'bf16', 's32', 'pred', 'f8e4m3fn')."""
  if dtype in _ITEMSIZE:
    return _ITEMSIZE[dtype]
  bits = re.match(r'[a-z]+(\d+)', dtype)
  if not bits:
    raise ValueError(f'unknown HLO element type {dtype!r}')
  return max(int(bits.group(1)) // 8, 1)


def arrays(shape_text):
  """`[(dtype, dims)]` of every array in an HLO shape (a tuple gives several)."""
  return [
      (dtype, tuple(int(d) for d in dims.split(',') if d))
      for dtype, dims in _ARRAY.findall(shape_text)
  ]


def nbytes(array_list):
  return sum(math.prod(dims) * itemsize(dtype) for dtype, dims in array_list)


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction of the compiled step."""

  name: str
  kind: str  # one of KINDS
  opcode: str  # as written: 'all-gather-start' is an async all-gather
  shapes: tuple  # ((dtype, dims), ...) of the data it moves (results; for -start the outputs)
  group_size: int  # n: devices in each replica group (2 for a permute)
  axes: tuple  # mesh axes (of MESH_AXES) the groups span; () when a group is one device
  full_bytes: int  # S: the full buffer (see the module docstring)
  count: int  # times one step runs it: the product of the enclosing loops' trip counts
  in_loop: bool  # inside a while loop (the layer scan)
  op_name: str  # the JAX op it came from (metadata), for reading the table

  @property
  def bytes_per_run(self):
    """What each device sends per execution under the ring model."""
    n = self.group_size
    if n <= 1:
      return 0.0
    if self.kind == 'all-reduce':
      return 2 * (n - 1) / n * self.full_bytes
    if self.kind == 'collective-permute':
      return float(self.full_bytes)
    return (n - 1) / n * self.full_bytes

  @property
  def bytes_per_step(self):
    return self.bytes_per_run * self.count


def _iota(dims, perm, total):
  """Device ids of XLA's iota tile assignment `[dims]T(perm)`, flattened."""
  ids = np.arange(total).reshape(dims)
  return ids.transpose(perm).reshape(-1) if perm else ids.reshape(-1)


def _ints(text):
  return [int(x) for x in re.findall(r'\d+', text)]


def replica_groups(attrs, num_devices):
  """The replica groups of a collective's attribute text as lists of logical device ids;
  None when it has none (a collective-permute)."""
  explicit = re.search(r'replica_groups=\{((?:\{[\d,]*\},?)*)\}', attrs)
  if explicit:
    groups = [_ints(g) for g in re.findall(r'\{([\d,]*)\}', explicit.group(1))]
    return groups or [list(range(num_devices))]
  iota = re.search(r'replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?', attrs)
  if iota:
    count, size, dims, perm = iota.groups()
    ids = _iota(_ints(dims), _ints(perm) if perm else None, math.prod(_ints(dims)))
    return ids.reshape(int(count), int(size)).tolist()
  mesh = re.search(
      r'replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))?'
      r'\s*\{([^}]*)\}',
      attrs,
  )
  if mesh:
    sizes_text, dims, perm, spanned = mesh.groups()
    names = re.findall(r"'(\w+)'=(\d+)", sizes_text)
    sizes = [int(s) for _, s in names]
    total = math.prod(sizes)
    ids = (
        _iota(_ints(dims), _ints(perm) if perm else None, total) if dims else np.arange(total)
    ).reshape(sizes)
    spanned = set(re.findall(r"'(\w+)'", spanned))
    group_axes = [i for i, (n, _) in enumerate(names) if n in spanned]
    other_axes = [i for i in range(len(names)) if i not in group_axes]
    grouped = ids.transpose(other_axes + group_axes)
    size = math.prod(sizes[i] for i in group_axes)
    return grouped.reshape(-1, size).tolist()
  if 'replica_groups=' in attrs:
    raise ValueError(f'unparsed replica groups: {attrs[:200]}')
  return None


def spanned_axes(groups, mesh_shape):
  """The mesh axes along which members of the groups differ, in MESH_AXES order."""
  axes = set()
  for group in groups:
    coords = np.array([np.unravel_index(i, mesh_shape) for i in group])
    axes |= {MESH_AXES[a] for a in range(len(mesh_shape)) if len(set(coords[:, a])) > 1}
  return tuple(a for a in MESH_AXES if a in axes)


@dataclasses.dataclass(frozen=True)
class Instruction:
  """One HLO instruction: `%name = shape opcode(rest`, rest holding operands and attributes."""

  root: bool  # its computation's result
  name: str
  shape: str
  opcode: str
  rest: str

  @property
  def operands(self):
    """Names of the instructions it reads, in order."""
    return re.findall(r'%([\w.\-]+)', self.rest.split(')', 1)[0])

  @property
  def callees(self):
    """The computations it calls: fusion bodies, reducers, loop bodies and conditions,
    branches."""
    names = _CALLS.findall(self.rest)
    for branches in _BRANCHES.findall(self.rest):
      names += re.findall(r'%([\w.\-]+)', branches)
    return names

  @property
  def op_name(self):
    """The JAX name stack it came from (metadata); '' where XLA kept none."""
    match = re.search(r'op_name="([^"]*)"', self.rest)
    return match.group(1) if match else ''


def computations(hlo_text):
  """`({computation: [Instruction]}, the entry computation's name)` of HLO text."""
  found, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    match = _COMPUTATION.match(line)
    if match and not line.startswith(' '):
      current = match.group(2)
      found[current] = []
      if match.group(1):
        entry = current
    elif line.startswith('}'):
      current = None
    elif current is not None and (instruction := _INSTRUCTION.match(line)):
      root, *fields = instruction.groups()
      found[current].append(Instruction(bool(root), *fields))
  return found, entry


_PASS_THROUGH = ('bitcast', 'copy', 'reshape', 'transpose')


def carried_dtype(instructions, computations_by_name, name):
  """The element type of the values an instruction's result holds. XLA:CPU computes 16-bit
  floats in float32: a bfloat16 weight gathered for a bf16 matmul is gathered there as
  float32, fed by `convert(convert(w, bf16), f32)`. Its values are bfloat16, and a GPU moves
  them as bfloat16; this returns 'bf16' for it, else the result's own element type (None
  for a name the module lacks)."""
  if name not in instructions:
    return None
  instruction, inner = instructions[name], instructions
  own = arrays(instruction.shape)[0][0]
  while True:
    if instruction.opcode == 'fusion':
      (body,) = instruction.callees
      instruction = next(i for i in computations_by_name[body] if i.root)
      inner = {i.name: i for i in computations_by_name[body]}
    elif instruction.opcode in _PASS_THROUGH and instruction.operands[0] in inner:
      instruction = inner[instruction.operands[0]]
    elif instruction.opcode == 'convert' and instruction.operands[0] in inner:
      source = arrays(inner[instruction.operands[0]].shape)[0][0]
      return source if itemsize(source) < itemsize(own) and source[0] in 'bf' else own
    else:
      return own


def runs_per_step(hlo_text):
  """`{computation: (runs per step, inside a loop)}` of the computations one step runs."""
  return _counts(*computations(hlo_text))


def _counts(computations_by_name, entry):
  """`{computation: (runs per step, inside a loop)}` over the call graph from the entry: the
  sum over its call sites of the caller's runs, times the loop's known trip count for a
  while body."""
  sites = {}  # callee -> [(caller, factor, is a loop body)]
  for caller, instructions in computations_by_name.items():
    for instruction in instructions:
      callees = instruction.callees
      if not callees:
        continue
      trip = _TRIP.search(instruction.rest)
      body = re.search(r'\bbody=%([\w.\-]+)', instruction.rest)
      for callee in callees:
        loop = body is not None and callee == body.group(1)
        if loop and not trip:
          raise ValueError(f'a while loop without a known trip count: {instruction.rest[:200]}')
        sites.setdefault(callee, []).append((caller, int(trip.group(1)) if loop else 1, loop))
  runs = {entry: (1, False)}

  def count(name):
    if name not in runs:
      runs[name] = (0, False)  # not reachable through itself: HLO has no recursion
      total, in_loop = 0, False
      for caller, factor, loop in sites.get(name, ()):
        caller_runs, caller_in_loop = count(caller)
        if caller_runs:
          total += caller_runs * factor
          in_loop |= caller_in_loop or loop
      runs[name] = (total, in_loop)
    return runs[name]

  for name in computations_by_name:
    count(name)
  return {name: value for name, value in runs.items() if value[0]}


def trip_counts(hlo_text):
  """The known trip count of every while loop in the module, in order."""
  return [int(n) for n in _TRIP.findall(hlo_text)]


def collectives(hlo_text, mesh_shape):
  """Every collective of the module with its per-step count (see the module docstring).

  `mesh_shape`: the sizes of MESH_AXES ('data', 'fsdp', 'tensor') of the mesh it was
  compiled for."""
  mesh_shape = tuple(mesh_shape)
  num_devices = math.prod(mesh_shape)
  by_name, entry = computations(hlo_text)
  by_instruction = {i.name: i for instructions in by_name.values() for i in instructions}
  runs = _counts(by_name, entry)
  found = []
  for computation, instructions in by_name.items():
    if computation not in runs:
      continue
    count, in_loop = runs[computation]
    for instruction in instructions:
      opcode = instruction.opcode
      kind = opcode.removesuffix('-start')
      if kind not in KINDS or opcode.endswith('-done'):
        continue
      moved = [a for a in arrays(instruction.shape) if a[1] or kind != 'collective-permute']
      if opcode.endswith('-start') and kind in ('all-gather', 'collective-permute'):
        moved = [a for a in moved if a[1]]  # (operands, outputs, [u32 contexts])
        moved = moved[len(moved) // 2 :]
      if kind == 'all-gather':  # gathered values keep their type; XLA:CPU's may be promoted
        carried = [carried_dtype(by_instruction, by_name, o) for o in instruction.operands]
        moved = [(c or dtype, dims) for c, (dtype, dims) in zip(carried, moved)]
      groups = replica_groups(instruction.rest, num_devices)
      if groups is None:  # a permute: the axes its moving pairs cross
        pairs = [p for p in re.findall(r'\{(\d+),(\d+)\}', instruction.rest) if p[0] != p[1]]
        groups = [[int(a), int(b)] for a, b in pairs]
        size = 2 if groups else 1
      else:
        size = len(groups[0])
      full = nbytes(moved) * (size if kind == 'reduce-scatter' else 1)
      found.append(
          Collective(
              name=instruction.name,
              kind=kind,
              opcode=opcode,
              shapes=tuple(moved),
              group_size=size,
              axes=spanned_axes(groups, mesh_shape) if size > 1 else (),
              full_bytes=full,
              count=count,
              in_loop=in_loop,
              op_name=instruction.op_name,
          )
      )
  return found


def axis_label(axes):
  return '+'.join(axes) if axes else 'none'


def bytes_per_axis(found):
  """`{axis label: bytes each device sends per step}` ('fsdp', 'data+fsdp', ...)."""
  totals = {}
  for c in found:
    if c.group_size > 1:
      label = axis_label(c.axes)
      totals[label] = totals.get(label, 0.0) + c.bytes_per_step
  return totals


def async_pairs(hlo_text):
  """For a GPU compile: per async collective kind, the `-start`/`-done` pairs and how many
  instructions the schedule puts between each start and its done (0: nothing overlaps).
  CPU XLA schedules every collective synchronously, so on a CPU this is empty."""
  result = {}
  for instructions in computations(hlo_text)[0].values():
    position = {}
    for i, instruction in enumerate(instructions):
      name, opcode, rest = instruction.name, instruction.opcode, instruction.rest
      if opcode.endswith('-start'):
        position[name] = (i, opcode.removesuffix('-start'))
      elif opcode.endswith('-done'):
        operand = re.match(r'\s*%([\w.\-]+)', rest)
        if operand and operand.group(1) in position:
          start, kind = position.pop(operand.group(1))
          result.setdefault(kind, []).append(i - start - 1)
  return result
