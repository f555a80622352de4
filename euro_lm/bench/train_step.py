"""`python -m euro_lm.bench --config=configs/llama_125m.py [--config.a.b=v ...]`

Times the real sharded train step on synthetic tokens (no data pipeline in the way) and
prints one table: compile time, step time, tokens/s, model TFLOP/s per device, MFU and
the compiled step's peak memory; then the host's peak resident memory. On a CPU, MFU is
against the measured rate of a large float32 XLA matmul on the same machine; on GPUs/TPUs
against the 16-bit datasheet peak (`hardware.peak_flops_per_device` overrides).
`--compile_layers=4,32` adds a compile-time sweep over depth (scan over layers keeps it
flat). `--config.model.lora_rank=16` times a LoRA step (the model FLOPs then leave out the
frozen weights' gradients, which the step does not compute).
"""

import resource
import statistics
import time

import jax
from absl import flags, logging
from flax import linen as nn
from ml_collections import config_flags

from euro_lm import cli, devices, host_memory
from euro_lm.bench.synthetic import compile_train_step, measured_matmul_flops
from euro_lm.metrics import peak_flops_per_device
from euro_lm.model import lora, param_count, train_flops_per_token
from euro_lm.model.attention import resolve_for_model

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps (after 2 warm-up steps).')
_COMPILE_LAYERS = flags.DEFINE_list('compile_layers', [], 'Also time compilation at these depths.')


def peak_memory_bytes(compiled):
  """Peak device memory of the compiled step: arguments + outputs + temporaries - aliased."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  return (
      m.argument_size_in_bytes
      + m.output_size_in_bytes
      + m.temp_size_in_bytes
      - m.alias_size_in_bytes
  )


def benchmark(config, steps):
  compiled, state, batch, mesh, rules, compile_seconds = compile_train_step(config)
  times = []
  fragmentation_guard = host_memory.FragmentationGuard(compiled)  # as the train loop runs
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for i in range(steps + 2):
      start = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
      fragmentation_guard.after_step()
      if i >= 2:
        times.append(time.perf_counter() - start)
  step_time = statistics.median(times)
  tokens_per_second = config.train.global_batch_size * config.train.seq_len / step_time
  model_flops = train_flops_per_token(config.model, config.train.seq_len)
  flops_per_second = model_flops * tokens_per_second
  device = jax.devices()[0]
  if device.platform == 'cpu' and not config.hardware.peak_flops_per_device:
    peak, peak_source = measured_matmul_flops() / jax.device_count(), 'measured f32 matmul'
  else:
    peak, peak_source = peak_flops_per_device(config, device), 'datasheet'
  per_device = flops_per_second / jax.device_count()
  # The same run in PaLM's and TorchTitan's count: causal attention in full.
  per_device_full = per_device * (
      train_flops_per_token(config.model, config.train.seq_len, causal_half=False) / model_flops
  )
  attention = resolve_for_model(config.model, config.train.seq_len, devices.describe(device))
  trainable, _ = lora.count(state.params)
  return {
      'device': f'{jax.device_count()}x {device.device_kind}',
      'attention': attention.impl + (f' ({attention.backend})' if attention.backend else ''),
      'params': param_count(config.model),
      'trainable_params': trainable,
      'optimizer_state_gib': sum(x.nbytes for x in jax.tree.leaves(state.opt_state)) / 2**30,
      'tokens_per_step': config.train.global_batch_size * config.train.seq_len,
      'compile_s': compile_seconds,
      'step_s': step_time,
      'tokens_per_s': tokens_per_second,
      'tflops_per_device': per_device / 1e12,
      'mfu': per_device / peak if peak else None,
      'mfu_attention_in_full': per_device_full / peak if peak else None,
      'peak': f'{peak / 1e12:.3g} TFLOP/s ({peak_source})' if peak else 'unknown',
      'peak_memory_gib': (peak_memory_bytes(compiled) or 0) / 2**30,
      'loss': float(metrics['loss']),
      'host_peak_gib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
      'host_memory_trims': fragmentation_guard.trims,
  }


def format_row(r):
  mfu, full = (f'{100 * r[k]:.1f}%' if r[k] is not None else 'n/a' for k in MFU_KEYS)
  return (
      f'| {r["device"]} | {r["params"] / 1e6:.0f}M | {r["tokens_per_step"]} | '
      f'{r["compile_s"]:.1f} | {1e3 * r["step_s"]:.1f} | {r["tokens_per_s"]:,.0f} | '
      f'{r["tflops_per_device"]:.3g} | {mfu} | {full} | {r["peak"]} | '
      f'{r["peak_memory_gib"]:.2f} |'
  )


MFU_KEYS = ('mfu', 'mfu_attention_in_full')
HEADER = (
    '| device | params | tokens/step | compile s | step ms | tokens/s | TFLOP/s/device '
    '| MFU | MFU, attention in full | peak | peak mem GiB |\n'
    '|---|---|---|---|---|---|---|---|---|---|---|'
)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  result = benchmark(config, _STEPS.value)
  print(HEADER)
  print(format_row(result))
  kept = host_memory.keep_freed_memory_applied()
  print(
      f'\nattention: {result["attention"]}; host: peak resident memory '
      f'{result["host_peak_gib"]:.2f} GiB; freed memory kept: '
      f'{"yes" if kept else "no"}' + (f', {result["host_memory_trims"]} trims' if kept else '')
  )
  print(
      f'trainable: {result["trainable_params"] / 1e6:.1f}M params'
      + (' (LoRA adapters)' if lora.targets(config.model) else '')
      + f'; optimizer state {result["optimizer_state_gib"]:.3f} GiB'
  )
  if _COMPILE_LAYERS.value:
    print('\n| layers | compile s |\n|---|---|')
    for layers in map(int, _COMPILE_LAYERS.value):
      swept = config.copy_and_resolve_references()
      swept.model.num_layers = layers
      print(f'| {layers} | {compile_train_step(swept)[-1]:.2f} |')


if __name__ == '__main__':
  cli.run(main)
