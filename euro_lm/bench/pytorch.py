"""`python -m euro_lm.bench.pytorch --config=configs/llama_125m.py [--config.train.seq_len=512]
[--steps=3] [--torch_compile]`

euro_lm's train step against PyTorch on the same model shape, in float32 on this machine's
CPU: transformers' `LlamaForCausalLM` (the reference Llama; SDPA attention) with the same
weights (exported through euro_lm.hf's mapping), the same batch, cross-entropy over every
token, global-norm clipping and `torch.optim.AdamW(foreach=True)`. The losses of the first
step must agree before anything is timed. Prints one table: median step time and tokens/s
after warm-up steps, the ratio to euro_lm, and each step's model FLOPs
(`train_flops_per_token`) as a share of this machine's measured float32 XLA matmul rate,
which bounds how fast any implementation of the same FLOPs can be. `--torch_compile` adds
a `torch.compile`d PyTorch row (its compile time shown apart).

PyTorch runs in child processes: once with the C library's default malloc settings, as a
user would run it, and once keeping freed memory like euro_lm's own CPU runs
(euro_lm.host_memory), which speeds PyTorch up too; the fair comparison is against the
second row.
"""

import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from absl import flags, logging
from flax import linen as nn
from ml_collections import config_flags

from euro_lm import cli, hf, host_memory
from euro_lm.bench.synthetic import compile_train_step, measured_matmul_flops
from euro_lm.errors import UserError
from euro_lm.model import param_count, train_flops_per_token

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/llama_125m.py', 'Model and batch.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed steps per implementation (after 2 warm-up).')
_TORCH_COMPILE = flags.DEFINE_bool('torch_compile', False, 'Also time torch.compile(model).')
_TORCH_CHILD = flags.DEFINE_string(
    'torch_child',
    None,
    'Internal: run the PyTorch rows on the params and batch pickled in this file.',
)
_TORCH_KEEP_FREED = flags.DEFINE_bool(
    'torch_keep_freed_memory', False, 'Internal: the child keeps freed memory, as euro_lm.'
)
_WARMUP = 2


def time_steps(run_step, steps):
  """(first step's loss, median seconds of `steps` steps after the warm-up)."""
  times, first_loss = [], None
  for i in range(steps + _WARMUP):
    start = time.perf_counter()
    loss = run_step()
    if first_loss is None:
      first_loss = loss
    if i >= _WARMUP:
      times.append(time.perf_counter() - start)
  return first_loss, statistics.median(times)


def euro_lm_step(config):
  compiled, state, batch, mesh, rules, _ = compile_train_step(config)
  params = jax.tree.map(np.asarray, state.params)  # before the donating step consumes it
  holder = {'state': state}
  fragmentation_guard = host_memory.FragmentationGuard(compiled)  # as the train loop runs

  def run():
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      holder['state'], metrics = compiled(holder['state'], batch)
      loss = float(metrics['loss'])  # waits for the step
    fragmentation_guard.after_step()
    return loss

  return params, jax.tree.map(np.asarray, batch), run


def torch_step(config, params, batch, compile_model):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  m, o = config.model.to_dict(), config.optimizer
  torch.manual_seed(0)
  model_config = transformers.LlamaConfig(
      **hf.hf_config(m, bos_token_id=1, eos_token_id=2, dtype='float32')
  )
  model = transformers.LlamaForCausalLM(model_config).float().train()
  state_dict = {}
  for path, template, per_layer in hf.param_table(m):
    leaf = params
    for key in path:
      leaf = leaf[key]
    for i in range(m['num_layers']) if per_layer else [None]:
      state_dict[template.format(i=i)] = torch.from_numpy(
          np.array(hf.to_hf(path, leaf if i is None else leaf[i], m))
      )  # a writable copy
  missing, unexpected = model.load_state_dict(state_dict, strict=False)
  missing = [k for k in missing if not (m['tie_embeddings'] and k == 'lm_head.weight')]
  if missing or unexpected:
    raise RuntimeError(f'weights do not map: missing {missing}, unexpected {unexpected}')
  optimizer = torch.optim.AdamW(
      model.parameters(),
      lr=o.learning_rate,
      betas=(o.b1, o.b2),
      eps=o.eps,
      weight_decay=o.weight_decay,
      foreach=True,
  )
  inputs = torch.from_numpy(batch['inputs']).long()
  targets = torch.from_numpy(batch['targets']).long().reshape(-1)
  forward = torch.compile(model) if compile_model else model

  def run():
    optimizer.zero_grad(set_to_none=True)
    logits = forward(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets)
    loss.backward()
    if o.grad_clip_norm:
      torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip_norm)
    optimizer.step()
    return loss.item()

  return run


def torch_rows(config, params, batch, keep_freed_memory):
  """[(name, first loss, median step s, first call s)] of the PyTorch variants."""
  malloc = 'default malloc'
  if keep_freed_memory:
    if not host_memory.keep_freed_memory():
      raise SystemExit('--torch_keep_freed_memory needs glibc on Linux')
    malloc = 'freed memory kept, as euro_lm'
  import torch  # pylint: disable=import-outside-toplevel

  torch.set_num_threads(os.cpu_count())
  variants = [(f'PyTorch eager (transformers Llama, SDPA), {malloc}', False)]
  if _TORCH_COMPILE.value:
    variants.append((f'PyTorch torch.compile (inductor), {malloc}', True))
  rows = []
  for name, compile_model in variants:
    run = torch_step(config, params, batch, compile_model)
    start = time.perf_counter()
    first_loss = run()  # for torch.compile: the compile; counted apart
    first_call = time.perf_counter() - start
    rows.append((name, first_loss, time_steps(run, _STEPS.value)[1], first_call))
  return rows


def torch_rows_in_child(params, batch, keep_freed_memory):
  """`torch_rows` in a fresh interpreter (same flags), fed through a pickle file."""
  with tempfile.TemporaryDirectory() as tmp:
    inputs = os.path.join(tmp, 'inputs.pkl')
    with open(inputs, 'wb') as f:
      pickle.dump((params, batch), f)
    argv = [
        a for a in sys.argv[1:] if not a.startswith(('--torch_child', '--torch_keep_freed_memory'))
    ]
    out = subprocess.run(
        [
            sys.executable,
            '-m',
            'euro_lm.bench.pytorch',
            *argv,
            f'--torch_child={inputs}',
            f'--torch_keep_freed_memory={keep_freed_memory}',
        ],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
  return [tuple(row) for row in json.loads(out.stdout.strip().splitlines()[-1])]


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  config.model.compute_dtype = 'float32'
  if _TORCH_CHILD.value:
    with open(_TORCH_CHILD.value, 'rb') as f:
      params, batch = pickle.load(f)
    print(json.dumps(torch_rows(config, params, batch, _TORCH_KEEP_FREED.value)))
    return
  if hf.architectures.for_model(config.model.to_dict()) is not hf.llama:
    raise UserError('the PyTorch comparison runs LlamaForCausalLM-shaped models only')
  t = config.train
  tokens = t.global_batch_size * t.seq_len

  params, batch, run_ours = euro_lm_step(config)
  rows = [('euro_lm (JAX, XLA:CPU)', *time_steps(run_ours, _STEPS.value), None)]
  rows += torch_rows_in_child(params, batch, keep_freed_memory=False)
  rows += torch_rows_in_child(params, batch, keep_freed_memory=True)

  ours_loss = rows[0][1]
  for name, loss, _, _ in rows[1:]:
    if not np.isclose(loss, ours_loss, rtol=1e-4):
      raise SystemExit(f'{name}: first loss {loss:.6f} differs from euro_lm {ours_loss:.6f}')
  matmul_flops = measured_matmul_flops()
  step_flops = train_flops_per_token(config.model, t.seq_len) * tokens
  print(
      f'\n{param_count(config.model) / 1e6:.1f}M parameters, batch {t.global_batch_size} x '
      f'{t.seq_len}, float32, {os.cpu_count()} CPU threads; first-step losses agree '
      f'({ours_loss:.6f}); {step_flops / 1e12:.4g} model TFLOP a step, at the measured '
      f'{matmul_flops / 1e12:.4g} TFLOP/s of a float32 matmul at least '
      f'{step_flops / matmul_flops:.2f} s\n'
  )
  print('| implementation | step s | tokens/s | euro_lm speed-up | of matmul rate | first call s |')
  print('|---|---|---|---|---|---|')
  base = rows[0][2]
  for name, _, seconds, first_call in rows:
    first = '' if first_call is None else f'{first_call:.1f}'
    share = step_flops / seconds / matmul_flops
    print(
        f'| {name} | {seconds:.3f} | {tokens / seconds:,.0f} | {seconds / base:.2f}× '
        f'| {share:.1%} | {first} |'
    )


if __name__ == '__main__':
  cli.run(main)
