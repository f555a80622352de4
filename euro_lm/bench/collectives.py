"""`python -m euro_lm.bench.collectives --config=configs/llama_1b.py:gpu [--measure]
[--nodes=2,4,8,16,32,64] [--network_link=ndr] [--mfu=0.4]`

Communication per train step, on paper (`euro_lm.plan.collectives`): for each node count,
every candidate mesh (tensor within a node, fsdp over the rest of it, data or fsdp across
nodes) with the bytes each device sends per step per axis, the seconds they take on the
node's link and the network's, and the step's compute at `--mfu`; least communication
first. `--measure` first compiles the real step for the config's own mesh on
`--simulated_devices` CPU devices (abstract shapes: no weights allocated) and prints its
collectives by kind and axis, and the measured bytes per axis beside the prediction.
`--overlap` (for a GPU session, `--simulated_devices=0`) prints the async collectives'
start/done pairs of the compiled step and how many instructions the schedule puts between
them; XLA:CPU schedules collectives synchronously, so on a CPU there are none.
"""

import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from euro_lm import cli
from euro_lm.plan import collectives, hlo

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_NODES = flags.DEFINE_list('nodes', ['2', '4', '8', '16', '32', '64'], 'Node counts.')
_PER_NODE = flags.DEFINE_integer('devices_per_node', 8, 'Accelerators per node.')
_ACCELERATOR = flags.DEFINE_string('accelerator', 'h100', 'Peak FLOP/s of this accelerator.')
_NODE_LINK = flags.DEFINE_string('node_link', 'nvlink4', 'Link within a node (devices.LINKS).')
_NETWORK_LINK = flags.DEFINE_string('network_link', 'ndr', 'Link across nodes (devices.LINKS).')
_MFU = flags.DEFINE_float('mfu', 0.4, 'Assumed MFU for the compute time.')
_TOP = flags.DEFINE_integer('top', 0, 'Rows per node count (0: every candidate mesh).')
_MEASURE = flags.DEFINE_bool('measure', False, "Compile the config's own mesh and read its HLO.")
_OVERLAP = flags.DEFINE_bool('overlap', False, 'With --measure: async start/done pairs.')
_SIMULATED = flags.DEFINE_integer(
    'simulated_devices', 8, 'CPU devices to simulate for --measure (0: the real devices).'
)


def format_measured(found, trips, predicted_bytes):
  """The measured collectives grouped by (kind, axes, in the layer loop or not)."""
  groups = {}
  for c in found:
    if c.group_size <= 1:
      continue
    key = (c.kind, hlo.axis_label(c.axes), 'layers' if c.in_loop else 'once')
    count, full, sent = groups.get(key, (0, 0, 0.0))
    groups[key] = (count + c.count, full + c.full_bytes * c.count, sent + c.bytes_per_step)
  lines = [
      f'while-loop trip counts: {trips}',
      f'{"kind":<19} {"axes":<12} {"where":<7} {"runs":>5} {"S GB/step":>10} '
      f'{"sent GB/step":>13}',
  ]
  for (kind, axes, where), (count, full, sent) in sorted(groups.items()):
    lines.append(
        f'{kind:<19} {axes:<12} {where:<7} {count:>5} {full / 1e9:>10.4f} {sent / 1e9:>13.4f}'
    )
  measured = hlo.bytes_per_axis(found)
  lines.append('bytes each device sends per step, measured / predicted (GB):')
  for axis in sorted(set(measured) | set(predicted_bytes)):
    got, expected = measured.get(axis, 0) / 1e9, predicted_bytes.get(axis, 0) / 1e9
    lines.append(f'  {axis:<12} {got:10.4f} {expected:10.4f}')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  if not _MEASURE.value or _SIMULATED.value:  # shapes only, or simulated devices
    jax.config.update('jax_platforms', 'cpu')
  if _MEASURE.value:
    if _SIMULATED.value:  # before the backend starts
      os.environ['XLA_FLAGS'] = (
          os.environ.get('XLA_FLAGS', '')
          + f' --xla_force_host_platform_device_count={_SIMULATED.value}'
      ).strip()
    text, shape = collectives.compile_text(config)
    found = hlo.collectives(text, shape)
    degrees = dict(zip(('data', 'fsdp', 'tensor'), shape))
    print(
        f'measured: {config.model.num_layers} layers on {jax.device_count()}x '
        f'{jax.devices()[0].device_kind}, mesh {degrees}'
    )
    print(
        format_measured(found, hlo.trip_counts(text), collectives.predicted_bytes(config, degrees))
    )
    if _OVERLAP.value:
      pairs = hlo.async_pairs(text)
      print('async collectives (kind: pairs, instructions between start and done):')
      for kind, between in sorted(pairs.items()):
        print(f'  {kind}: {len(between)} pairs, {sum(1 for b in between if b)} with work between')
      if not pairs:
        print('  none: every collective is synchronous in this compile')
    print()
  for nodes in map(int, _NODES.value):
    options = collectives.mesh_options(
        config,
        nodes,
        _PER_NODE.value,
        _ACCELERATOR.value,
        _NODE_LINK.value,
        _NETWORK_LINK.value,
        _MFU.value,
    )
    if _TOP.value:
      options = options[: _TOP.value]
    print(
        collectives.format_options(
            options,
            f'{nodes} nodes x {_PER_NODE.value} {_ACCELERATOR.value}, {_NODE_LINK.value} in '
            f'a node, {_NETWORK_LINK.value} across; compute at {_MFU.value:.0%} MFU; '
            'comm: no overlap',
        )
    )
    print()


if __name__ == '__main__':
  cli.run(main)
