"""FP8 against bfloat16 on one GPU (issue 27, item 2), one command:

  python launch/bench_fp8.py [--out=fp8_out]          # ~8 min on an H100 (budgeted)
  python launch/bench_fp8.py --tiny                    # CPU: tiny shapes, a few steps

1. The train step (`euro_lm.bench.train_step.benchmark`, synthetic tokens) with
   `model.fp8` off and on at the 1B preset's shape (`configs/llama_1b.py:gpu`, 8 x 4096)
   and at the 7B width (`configs/llama_7b.py:gpu` cut to `--layers_7b` layers, 4 x 4096):
   step time, tokens/s and the fp8 / bf16 ratio (target >= 1.3x at the 7B shape).
2. Loss parity: the same short run on the embedded corpus (same tokenizer, same batches)
   with fp8 off and on; the mean training loss of the last tenth of the steps and the final
   validation loss (which runs in bfloat16 both times), and their difference in % (target
   within 1%).
"""

import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import llama_1b, llama_7b, tiny  # noqa: E402
from euro_lm.bench.train_step import benchmark  # noqa: E402
from euro_lm.data import dataset  # noqa: E402
from euro_lm.train.loop import train  # noqa: E402

_OUT = flags.DEFINE_string('out', 'fp8_out', 'Folder for the parity runs and results.json.')
_TINY = flags.DEFINE_bool('tiny', False, 'Tiny shapes and few steps (a CPU check).')
_LAYERS_7B = flags.DEFINE_integer('layers_7b', 4, 'Layers of the 7B width to time.')
_PARITY_STEPS = flags.DEFINE_integer('parity_steps', 300, 'Steps of each parity run.')
_SKIP = flags.DEFINE_list('skip', [], 'Parts to leave out: 1b, 7b, parity.')


def step_configs(tiny_shapes):
  """{name: config} of the shapes whose step is timed."""
  if tiny_shapes:
    c = tiny.get_config()
    c.model.compute_dtype, c.train.global_batch_size, c.train.seq_len = 'bfloat16', 8, 64
    return {'tiny': c}
  c1 = llama_1b.get_config('gpu')
  c1.train.global_batch_size = 8
  c7 = llama_7b.get_config('gpu')
  c7.model.num_layers, c7.train.global_batch_size = _LAYERS_7B.value, 4
  return {'1b': c1, f'7b_width_{_LAYERS_7B.value}_layers': c7}


def parity_config(tiny_shapes, steps):
  """A small model on the embedded corpus: the same run but for `model.fp8`."""
  c = tiny.get_config()
  c.model.compute_dtype = 'bfloat16'
  if not tiny_shapes:  # ~50M parameters, 32 x 512 tokens per step
    c.model.num_layers, c.model.embed_dim, c.model.mlp_dim = 8, 512, 1408
    c.model.num_heads, c.model.num_kv_heads, c.model.head_dim = 8, 4, 64
    c.train.global_batch_size, c.train.seq_len = 32, 512
    c.model.attention_impl = 'auto'
  else:
    c.train.global_batch_size, c.train.seq_len = 8, 64
  c.train.steps, c.train.log_every = steps, 1
  c.train.eval_every, c.train.checkpoint_every = 0, 0
  c.optimizer.warmup_steps = max(steps // 10, 1)
  return c


def mean_tail_loss(workdir, steps):
  """The mean training loss of the last tenth of the steps, from metrics.jsonl."""
  losses = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      record = json.loads(line)
      if 'loss' in record:
        losses[record['step']] = record['loss']
  tail = [losses[s] for s in sorted(losses) if s > steps - max(steps // 10, 1)]
  return sum(tail) / len(tail)


def main(argv):
  del argv
  os.makedirs(_OUT.value, exist_ok=True)
  results = {}
  print('| shape | matmuls | step ms | tokens/s | MFU | peak mem GiB | loss |')
  print('|---|---|---|---|---|---|---|')
  for name, config in step_configs(_TINY.value).items():
    if name.split('_')[0] in _SKIP.value:
      continue
    rows = {}
    for fp8 in (False, True):
      c = config.copy_and_resolve_references()
      c.model.fp8 = fp8
      r = benchmark(c, flags.FLAGS.steps)  # train_step's --steps: timed steps
      rows[fp8] = r
      mfu = f'{100 * r["mfu"]:.1f}%' if r['mfu'] is not None else 'n/a'
      print(
          f'| {name} | {"fp8" if fp8 else "bf16"} | {1e3 * r["step_s"]:.1f} | '
          f'{r["tokens_per_s"]:,.0f} | {mfu} | {r["peak_memory_gib"]:.2f} | {r["loss"]:.4f} |',
          flush=True,
      )
    speedup = rows[False]['step_s'] / rows[True]['step_s']
    print(f'| {name} | fp8 / bf16 | {speedup:.3f}x | | | | |', flush=True)
    results[name] = {'bf16': rows[False], 'fp8': rows[True], 'speedup': speedup}

  if 'parity' not in _SKIP.value:
    steps = 4 if _TINY.value else _PARITY_STEPS.value
    base = parity_config(_TINY.value, steps)
    tokenizer_dir = os.path.join(_OUT.value, 'tokenizer')
    dataset.make_data(base, tokenizer_dir)  # one tokenizer for both runs
    base.data.tokenizer_path = os.path.join(tokenizer_dir, 'tokenizer.model')
    parity = {}
    for fp8 in (False, True):
      c = base.copy_and_resolve_references()
      c.model.fp8 = fp8
      workdir = os.path.join(_OUT.value, f'parity_{"fp8" if fp8 else "bf16"}_{int(time.time())}')
      started = time.perf_counter()
      _, valid = train(c, workdir)
      parity['fp8' if fp8 else 'bf16'] = {
          'train_loss_tail': mean_tail_loss(workdir, steps),
          'valid_loss': valid['valid/loss'],
          'seconds': time.perf_counter() - started,
      }
    diff = lambda key: 100 * (parity['fp8'][key] / parity['bf16'][key] - 1)
    print(f'\nparity, {steps} steps on the embedded corpus:')
    print('| matmuls | train loss (last tenth) | valid loss | run s |\n|---|---|---|---|')
    for name, p in parity.items():
      print(f'| {name} | {p["train_loss_tail"]:.4f} | {p["valid_loss"]:.4f} | {p["seconds"]:.0f} |')
    print(f'| fp8 vs bf16 | {diff("train_loss_tail"):+.2f}% | {diff("valid_loss"):+.2f}% | |')
    results['parity'] = {**parity, 'train_diff_pct': diff('train_loss_tail')}
    results['parity']['valid_diff_pct'] = diff('valid_loss')
  with open(os.path.join(_OUT.value, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1, default=str)


if __name__ == '__main__':
  app.run(main)
