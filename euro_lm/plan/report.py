"""The planner's report: the text `python -m euro_lm.plan` prints, and the tables and plots
of notebooks/scaling.ipynb (matplotlib, imported only by `plot_scaling`)."""

from euro_lm.devices import accelerator_device, link
from euro_lm.errors import ConfigError
from euro_lm.model import fp8, lora, param_count, train_flops_per_token
from euro_lm.model.attention import resolve_for_model
from euro_lm.plan import collectives
from euro_lm.plan.memory import (
    GIB,
    USABLE_FRACTION,
    accelerator,
    estimate_memory,
    estimate_with_overrides,
    run_tokens,
    state_leaves,
    suggestions,
    training_seconds,
    with_overrides,
)
from euro_lm.sharding import MESH_AXES, MeshError, mesh_shape


def describe_change(change):
  """A change (dotted path -> value) as the --config flags that make it."""
  return ' '.join(f'--config.{k}={v}' for k, v in change.items())


def summary(
    config,
    num_devices,
    num_nodes=1,
    accelerator_name='h100',
    mfu=0.4,
    tokens=None,
    usable_fraction=USABLE_FRACTION,
):
  """One table row for a notebook: parameters, FLOPs/token, per-device memory (GiB), whether
  it fits on `accelerator_name`, and days for `tokens` (default: the config's run) at `mfu`."""
  name, peak, memory_gib = accelerator(accelerator_name)
  m, t = config.model, config.train
  est = estimate_memory(config, num_devices, num_nodes, device=accelerator_device(name))
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


def format_plan(
    config,
    num_devices,
    num_nodes=1,
    device_memory_gib=None,
    accelerator_name=None,
    mfu=0.4,
    tokens=None,
    usable_fraction=USABLE_FRACTION,
    config_name='',
    node_link='nvlink4',
    network_link='ndr',
):
  """The planner's report as text: mesh, per-device memory, fit verdict with WARNING lines
  naming what to change, the communication per step (`communication_lines`), and (with a
  known accelerator) the time for `tokens` (default the run's train.steps x global batch x
  seq_len) at `mfu`. The attention planned is the one that runs on `accelerator_name`;
  without an accelerator the device is not known, and 'auto' is planned as xla."""
  peak = device = None
  if accelerator_name:
    accelerator_name, peak, memory = accelerator(accelerator_name)
    device_memory_gib = device_memory_gib or memory
    device = accelerator_device(accelerator_name)
  leaves = state_leaves(config)
  est = estimate_memory(config, num_devices, num_nodes, leaves, device=device)
  m, t = config.model, config.train
  d = est.degrees
  ici, dcn = mesh_shape(config.mesh, num_devices, num_nodes)
  runs = resolve_for_model(m, t.seq_len, device)
  runs = runs.impl + (f' {runs.backend}' if runs.backend else '')
  attention = (
      m.attention_impl
      if runs == m.attention_impl
      else (
          f'{m.attention_impl} (runs {runs}'
          + (f' on {accelerator_name})' if device else ': no accelerator named)')
      )
  )
  lines = [
      f'euro_lm plan{" for " + config_name if config_name else ""} '
      '(an estimate from shapes and shardings, not a measurement)',
      f'model: {_count(param_count(m))} params, {m.num_layers} layers, D={m.embed_dim}, '
      f'H={m.num_heads}/K={m.num_kv_heads}, F={m.mlp_dim}, V={m.vocab_size}; compute '
      f'{m.compute_dtype}{" (projections fp8)" if fp8.enabled(m) else ""}, attention '
      f'{attention}, remat {m.remat_policy}',
      *(
          [
              f'LoRA: rank {m.lora_rank} on {",".join(lora.targets(m))}, alpha '
              f'{m.lora_alpha:g}: {_count(lora.adapter_count(m))} trainable params '
              f'({lora.adapter_count(m) / param_count(m):.2%}); the base is frozen'
          ]
          if lora.targets(m)
          else []
      ),
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
    lines.append(
        f'device memory: {device_memory_gib:g} GiB{where}, {usable_fraction:.0%} '
        f'usable = {budget / GIB:.1f} GiB: {verdict} '
        f'({est.total / budget:.0%} of usable)'
    )
    if est.total > budget:
      state = est.params + est.gradients + est.optimizer + est.grad_accumulation
      lines.append(
          f'WARNING: the estimate ({est.total / GIB:.1f} GiB) exceeds the usable '
          f'{budget / GIB:.1f} GiB per device; state (params+grads+optimizer) is '
          f'{state / GIB:.1f} GiB, activations+logits+working '
          f'{(est.activations + est.logits + est.working) / GIB:.1f} GiB.'
      )
      found = suggestions(config, num_devices, num_nodes, budget, leaves, device=device)
      for change, total in found:
        lines.append(
            f'WARNING: to fit, change {describe_change(change)} (estimate {total / GIB:.1f} GiB)'
        )
      if not found:
        lines.append(
            'WARNING: no single change found that fits: use more devices (raise '
            'mesh.fsdp / mesh.dcn_fsdp over them), model.remat_policy=full, a '
            'lower train.global_batch_size or more train.grad_accum_steps'
        )
  else:
    lines.append(
        'device memory: unknown (give --accelerator or --device_memory_gb to check the fit)'
    )
  lines += communication_lines(
      config,
      num_devices,
      num_nodes,
      est.degrees,
      dcn,
      leaves,
      accelerator_name,
      mfu,
      node_link,
      network_link,
      budget=device_memory_gib * GIB * usable_fraction if device_memory_gib else None,
  )
  if peak:
    tokens = run_tokens(config, tokens)
    seconds = training_seconds(m, t.seq_len, tokens, num_devices, peak, mfu)
    lines.append(
        f'time: {_count(tokens)} tokens x {_count(train_flops_per_token(m, t.seq_len))} '
        f'FLOPs/token on {num_devices}x {accelerator_name} '
        f'({peak / 1e12:.0f} TFLOP/s peak) at {mfu:.0%} MFU: {_duration(seconds)}'
    )
  return '\n'.join(lines)


def communication_lines(
    config,
    num_devices,
    num_nodes,
    degrees,
    dcn,
    leaves,
    accelerator_name=None,
    mfu=0.4,
    node_link='nvlink4',
    network_link='ndr',
    budget=None,
):
  """The report's communication lines: bytes each device sends per step per mesh axis
  (`collectives.predicted_bytes`); with an accelerator, their seconds on `node_link` within
  a node and `network_link` across nodes against the step's compute at `mfu`, and the mesh
  of the same devices with the least communication (if none of it overlaps) among those
  that fit `budget` bytes (None: not checked)."""
  sent = collectives.predicted_bytes(config, degrees, leaves)
  lines = [
      'communication per step (closed form of the compiled step, ring model, GB each device '
      'sends): ' + ', '.join(f'{a} {sent[a] / 1e9:.2f}' for a in MESH_AXES)
  ]
  if not accelerator_name or num_devices % num_nodes:
    return lines
  node, network = link(node_link), link(network_link)
  dcn = dict(zip(MESH_AXES, dcn))
  seconds = collectives.step_seconds(sent, dcn, node, network)
  peak = accelerator(accelerator_name)[1]
  compute = collectives.compute_seconds(config, num_devices, peak, mfu)
  lines.append(
      f'communication on {node.name} in a node, {network.name} across nodes: '
      f'{sum(seconds.values()):.3f} s per step if nothing overlaps ('
      + ', '.join(f'{a} {seconds[a]:.3f}' for a in MESH_AXES)
      + f'), compute {compute:.3f} s at {mfu:.0%} MFU'
  )
  options = collectives.mesh_options(
      config,
      num_nodes,
      num_devices // num_nodes,
      accelerator_name,
      node_link,
      network_link,
      mfu,
      leaves,
  )
  device = accelerator_device(accelerator_name)
  fitting = False
  for option in options:
    change = option.overrides
    if budget is not None:
      est = estimate_with_overrides(config, change, num_devices, num_nodes, leaves, device=device)
      if est is None or est.total > budget:
        continue
    fitting = True
    lines.append(
        f'least communication on {num_nodes} node{"s" if num_nodes > 1 else ""}: '
        f'{option.describe()} (in-node x across), {option.comm_seconds:.3f} s per step: '
        + describe_change(change)
    )
    break
  if options and not fitting:
    lines.append(
        f'least communication on {num_nodes} node{"s" if num_nodes > 1 else ""}: '
        f'{options[0].describe()} (in-node x across), {options[0].comm_seconds:.3f} s per '
        'step, but no candidate mesh fits the memory as configured'
    )
  return lines


# --------------------------------------------------------------------------- presets


def _preset_parts(est):
  """An estimate's per-device GiB in the four groups a presets table shows (they add up to
  the total): params; gradients (with the accumulation buffer); optimizer state (with the
  counters and model.fp8's state); activations (saved for backward, logits and loss,
  transient working set)."""
  return {
      'params_gib': est.params / GIB,
      'gradients_gib': (est.gradients + est.grad_accumulation) / GIB,
      'optimizer_gib': (est.optimizer + est.other_state + est.fp8_state) / GIB,
      'activations_gib': (est.activations + est.logits + est.working) / GIB,
      'total_gib': est.total / GIB,
  }


def presets_table(
    configs,
    num_devices,
    num_nodes=1,
    accelerator_name='h100',
    mfu=0.4,
    tokens=None,
    overrides=None,
    usable_fraction=USABLE_FRACTION,
):
  """One row per config of `configs` (name -> config, e.g. the presets) on one mesh.

  Each config, with the dotted-path `overrides` applied ('mesh.fsdp': -1), is planned on
  `num_devices` devices over `num_nodes` nodes of `accelerator_name`. A row is a dict:
  `preset`, `params`, `train_flops_per_token`, `mesh` ('data=1 fsdp=8 tensor=1'),
  `micro_batch_per_device`, the per-device GiB `params_gib`, `gradients_gib` (with the
  accumulation buffer), `optimizer_gib` (AdamW m and v, counters, model.fp8's state),
  `activations_gib` (saved activations, logits and loss, transient working set) and
  `total_gib` (their sum, `estimate_memory(...).total`), `usable_gib`, `fits`, `to_fit`
  (the first of `suggestions`, as --config flags, when it does not fit; '' when it does),
  `tokens` (`tokens`, default each config's steps x global batch x seq_len) and `days` at
  `mfu`, as `summary` computes them; and `error`: None, or why a run would reject the mesh (the
  memory fields are then None).
  """
  name, peak, memory_gib = accelerator(accelerator_name)
  device = accelerator_device(name)
  budget = memory_gib * GIB * usable_fraction
  rows = []
  for preset, config in configs.items():
    config = with_overrides(config, overrides or {})
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
      est = estimate_memory(config, num_devices, num_nodes, leaves, device=device)
    except (ConfigError, MeshError) as e:
      row.update(
          mesh=None,
          micro_batch_per_device=None,
          fits=None,
          to_fit=None,
          error=str(e),
          **{
              k: None
              for k in (
                  'params_gib',
                  'gradients_gib',
                  'optimizer_gib',
                  'activations_gib',
                  'total_gib',
              )
          },
      )
      rows.append(row)
      continue
    d = est.degrees
    row.update(
        mesh=f'data={d["data"]} fsdp={d["fsdp"]} tensor={d["tensor"]}',
        micro_batch_per_device=est.micro_batch_per_device,
        fits=est.total <= budget,
        **_preset_parts(est),
    )
    row['to_fit'] = ''
    if not row['fits']:
      found = suggestions(config, num_devices, num_nodes, budget, leaves, device=device)
      row['to_fit'] = (
          describe_change(found[0][0]) if found else 'no single change: use more devices'
      )
    rows.append(row)
  return rows


def format_presets_table(rows):
  """`presets_table` rows as a text table, with what to change (or the error) per preset
  below it."""
  header = (
      f'{"preset":<8} {"params":>7} {"FLOPs/tok":>9} {"mesh":<24} {"params":>7} '
      f'{"grads":>7} {"optim":>7} {"activ":>7} {"total":>7} {"fits":<4} '
      f'{"tokens":>6} {"days":>9}'
  )
  first = rows[0] if rows else {'accelerator': '?', 'usable_gib': 0}
  lines = [
      f'Per-device memory in GiB on {first["accelerator"]} '
      f'({first["usable_gib"]:.1f} GiB usable each); days at the assumed MFU.',
      header,
      '-' * len(header),
  ]
  notes = []

  def gib(x):
    return f'{"-" if x is None else f"{x:.2f}":>7}'

  for r in rows:
    fits = '-' if r['fits'] is None else 'yes' if r['fits'] else 'NO'
    lines.append(
        f'{r["preset"]:<8} {_count(r["params"]):>7} {_count(r["train_flops_per_token"]):>9} '
        f'{r["mesh"] or "-":<24} {gib(r["params_gib"])} {gib(r["gradients_gib"])} '
        f'{gib(r["optimizer_gib"])} {gib(r["activations_gib"])} {gib(r["total_gib"])} '
        f'{fits:<4} {_count(r["tokens"]):>6} {r["days"]:>9.3g}'
    )
    if r['error']:
      notes.append(f'{r["preset"]}: {r["error"]}')
    elif r['to_fit']:
      notes.append(f'{r["preset"]}: to fit, {r["to_fit"]}')
  return '\n'.join(lines + notes)


def scaling_points(
    configs,
    device_counts,
    devices_per_node=8,
    accelerator_name='h100',
    mfu=0.4,
    tokens=None,
    overrides=None,
    usable_fraction=USABLE_FRACTION,
):
  """What `plot_scaling` draws: for each config and each device count, FSDP over all the
  devices (`ceil(devices / devices_per_node)` nodes, mesh.dcn_fsdp across them), with the
  dotted-path `overrides` applied first. A list of dicts: `preset`, `devices`, `nodes`,
  `total_gib` (per device; None when a run would reject the mesh, e.g. a batch the
  devices do not divide), `fits` (None likewise), `usable_gib` and `days` for `tokens`
  (default each config's run) at `mfu`."""
  name, peak, memory_gib = accelerator(accelerator_name)
  device = accelerator_device(name)
  budget = memory_gib * GIB * usable_fraction
  points = []
  for preset, config in configs.items():
    config = with_overrides(config, overrides or {})
    leaves = state_leaves(config)
    m, t = config.model, config.train
    config_tokens = run_tokens(config, tokens)
    for devices in device_counts:
      nodes = -(-devices // devices_per_node)
      fsdp = {
          'mesh.data': 1,
          'mesh.fsdp': -1,
          'mesh.tensor': 1,
          'mesh.dcn_data': 1,
          'mesh.dcn_fsdp': nodes,
          'mesh.dcn_tensor': 1,
      }
      est = estimate_with_overrides(config, fsdp, devices, nodes, leaves, device=device)
      total = None if est is None else est.total
      points.append(
          {
              'preset': preset,
              'devices': devices,
              'nodes': nodes,
              'total_gib': None if total is None else total / GIB,
              'fits': None if total is None else total <= budget,
              'usable_gib': budget / GIB,
              'accelerator': name,
              'days': training_seconds(m, t.seq_len, config_tokens, devices, peak, mfu) / 86400,
          }
      )
  return points


def plot_scaling(points, axes=None):
  """Two log-log panels of `scaling_points`: estimated days, and per-device memory with the
  usable memory as a dashed line, against the number of devices, one line per preset.

  Needs matplotlib (the `notebooks` extra), imported only here. `axes`: two matplotlib
  Axes, or None for a new figure. Returns the two Axes; each preset's line is added in the
  order of `points`, over the devices whose mesh a run accepts (`total_gib` not None) in
  both panels, and the points that do not fit are marked again with an 'x' in both.
  """
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top

  if axes is None:
    _, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
  presets = list(dict.fromkeys(p['preset'] for p in points))
  for preset in presets:
    ok = [p for p in points if p['preset'] == preset and p['total_gib'] is not None]
    if not ok:
      continue
    devices = [p['devices'] for p in ok]
    (line,) = axes[0].plot(devices, [p['days'] for p in ok], marker='o', label=preset)
    axes[1].plot(
        devices, [p['total_gib'] for p in ok], marker='o', label=preset, color=line.get_color()
    )
    over = [p for p in ok if not p['fits']]
    for ax, key in zip(axes if over else (), ('days', 'total_gib')):
      ax.plot(
          [p['devices'] for p in over],
          [p[key] for p in over],
          linestyle='none',
          marker='x',
          markersize=10,
          color='black',
      )
  if points:
    axes[1].axhline(
        points[0]['usable_gib'],
        color='black',
        linestyle='--',
        linewidth=0.8,
        label=f'usable on {points[0]["accelerator"]}',
    )
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
