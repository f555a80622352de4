"""`python -m euro_lm.bench.hf [--config=configs/llama_1b.py] [--dir=/tmp/euro_lm_bench_hf]`

Hugging Face import and export on this machine: a random float32 folder of the architecture
that exports the config's model (Llama; Qwen2 with `--config.model.qkv_bias=True`, Qwen3
with `qk_norm`, Mistral with `sliding_window`, SmolLM3 with `nope_interval`, Apertus with
`mlp_activation=xielu` and `qk_norm`, ...), in its shape (written tensor by tensor, no
torch), is imported with `python -m euro_lm.import_hf`, then exported again with
`python -m euro_lm.export_hf --dtype=float32`, each in its own process. Prints one table:
wall time, throughput and peak host memory (the child's maximum RSS), next to a process
that only imports the libraries. Checks that the export equals the input, tensor by
tensor, before printing.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from absl import flags
from ml_collections import config_flags

from euro_lm import cli, hf

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/llama_1b.py', 'Model shape.')
_DIR = flags.DEFINE_string('dir', '/tmp/euro_lm_bench_hf', 'Scratch directory (replaced).')
_SHARD_GB = flags.DEFINE_float('shard_gb', 2.0, 'Shard size of the input and the export.')

_LIBRARIES = 'import jax, orbax.checkpoint, tensorstore, euro_lm.hf, euro_lm.checkpoint'


def write_random_hf(model, directory, shard_bytes, seed=0):
  """A random float32 HF folder (config.json + shards); returns its bytes."""
  os.makedirs(directory)
  arch = hf.architectures.for_model(model)
  shapes = arch.expected_hf_shapes(model)
  writer = hf.ShardWriter(directory, [(n, s, np.float32) for n, s in shapes.items()], shard_bytes)
  rng = np.random.default_rng(seed)
  for name, shape in shapes.items():
    writer.add(name, rng.standard_normal(shape, np.float32) * np.float32(0.02))
  writer.close()
  config = arch.hf_config(model, bos_token_id=2, eos_token_id=3, pad_token_id=0, dtype='float32')
  with open(os.path.join(directory, hf.CONFIG_FILE), 'w', encoding='utf-8') as f:
    json.dump(config, f)
  return sum(int(np.prod(s)) * 4 for s in shapes.values())


def arch_name(model):
  """The HF class the model exports as."""
  config = hf.architectures.for_model(model).hf_config(model, bos_token_id=2, eos_token_id=3)
  return config['architectures'][0]


def measure(argv):
  """(wall seconds, peak RSS bytes) of one child process; fails loudly if it fails."""
  start = time.perf_counter()
  process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  _, status, usage = os.wait4(process.pid, 0)
  wall = time.perf_counter() - start
  output = process.stdout.read().decode(errors='replace')
  process.stdout.close()
  process.returncode = os.waitstatus_to_exitcode(status)
  if process.returncode:
    sys.exit(f'{" ".join(argv)} failed ({process.returncode}):\n{output}')
  return wall, usage.ru_maxrss * 1024  # Linux reports KiB


def main(argv):
  del argv
  model = _CONFIG.value.model.to_dict()
  root = _DIR.value
  shutil.rmtree(root, ignore_errors=True)
  source, run, output = (os.path.join(root, d) for d in ('hf', 'run', 'export'))
  shard_bytes = int(_SHARD_GB.value * 2**30)
  size = write_random_hf(model, source, shard_bytes)
  py = sys.executable
  rows = [('import the libraries only', *measure([py, '-c', _LIBRARIES]))]
  rows.append(
      (
          'import (safetensors → Orbax)',
          *measure([py, '-m', 'euro_lm.import_hf', f'--hf={source}', f'--workdir={run}']),
      )
  )
  rows.append(
      (
          f'export (Orbax → safetensors, {_SHARD_GB.value:g} GiB shards)',
          *measure(
              [
                  py,
                  '-m',
                  'euro_lm.export_hf',
                  f'--workdir={run}',
                  f'--output={output}',
                  '--dtype=float32',
                  f'--shard_gb={_SHARD_GB.value}',
              ]
          ),
      )
  )

  original, exported = hf.SafetensorsFolder(source), hf.SafetensorsFolder(output)
  assert exported.names() == original.names()
  for name in original.names():
    np.testing.assert_array_equal(exported.get(name), original.get(name), err_msg=name)

  params = size // 4
  print(
      f'\n{arch_name(model)}: {params / 1e9:.3f}B parameters, {size / 1e9:.2f} GB in float32; '
      'the export equals the input, tensor by tensor\n'
  )
  print('| step | wall | throughput | peak host RSS | vs model size |')
  print('|---|---|---|---|---|')
  for name, wall, rss in rows:
    rate = '' if name.startswith('import the') else f'{size / wall / 1e6:.0f} MB/s'
    print(f'| {name} | {wall:.1f} s | {rate} | {rss / 1e9:.2f} GB | {rss / size:.2f}× |')


if __name__ == '__main__':
  cli.run(main)
