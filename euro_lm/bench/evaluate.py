"""`python -m euro_lm.bench.evaluate [--config=configs/tiny.py] [--requests=64]`

Evaluation against training on the same model, batch shape and devices: a short run of the
config on the embedded corpus makes a checkpoint; then
  - training: tokens per second of the compiled train step (synthetic tokens);
  - evaluate: tokens per second of `python -m euro_lm.evaluate`'s scoring of the run's own
    validation text (packing on the host included; the second pass, after compiling);
  - harness: lm-eval loglikelihood requests (context of 3/4 of a row, 4 continuation
    tokens) through `EuroLM`, per request, against the bare scoring step per row: the
    harness's overhead per request.
Prints one table.
"""

import json
import os
import tempfile
import time

import jax
import numpy as np
from absl import app, flags, logging
from flax import linen as nn
from ml_collections import config_flags

from euro_lm.bench.synthetic import compile_train_step, synthetic_batch
from euro_lm.data import corpus
from euro_lm.data.prepare.sources import TextSource
from euro_lm.sharding import global_batch

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Model and batch shape.')
_REQUESTS = flags.DEFINE_integer('requests', 64, 'lm-eval loglikelihood requests to time.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed train steps.')


def train_tokens_per_second(config, steps):
  compiled, state, batch, mesh, rules, _ = compile_train_step(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, metrics = compiled(state, batch)  # warm
    jax.block_until_ready(metrics['loss'])
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics['loss'])
  t = config.train
  return steps * t.global_batch_size * t.seq_len / (time.perf_counter() - start)


def make_run(config, workdir):
  from euro_lm.train.loop import train  # pylint: disable=import-outside-toplevel

  config = config.copy_and_resolve_references()
  config.unlock()
  config.train.update(steps=1, checkpoint_every=1, eval_every=0, log_every=1)
  config.optimizer.warmup_steps = 0
  train(config, workdir)
  return config


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from euro_lm.evaluation import harness, held_out  # pylint: disable=import-outside-toplevel

  config = _CONFIG.value
  t = config.train
  rows = []
  training = train_tokens_per_second(config, _STEPS.value)
  rows.append(('training (train step)', training, ''))
  with tempfile.TemporaryDirectory() as root:
    workdir = os.path.join(root, 'run')
    make_run(config, workdir)
    docs = corpus.select_languages(corpus.load_embedded_corpus(), config.data.languages)
    _, valid = corpus.split_train_valid(docs, config.data.valid_fraction)
    path = os.path.join(root, 'valid.jsonl')
    with open(path, 'w', encoding='utf-8') as f:
      for language, texts in valid.items():
        f.writelines(json.dumps({'text': x, 'lang': language}) + '\n' for x in texts)
    source = TextSource(language_field='lang')
    quiet = lambda *_: None  # noqa: E731
    held_out.evaluate_workdir(workdir, [path], source, log=quiet)  # compiles
    result = held_out.evaluate_workdir(workdir, [path], source, log=quiet)
    seconds = result['seconds']
    tokens = sum(s['tokens'] for s in result['languages'].values())
    rows.append(
        (
            'evaluate (held-out text)',
            result['tokens_per_second'],
            f'{tokens} tokens; packing on the host {seconds["packing"]:.2f} s, '
            f'scoring {seconds["scoring"]:.2f} s ({tokens / seconds["scoring"]:.0f} tokens/s)',
        )
    )

    model = harness.EuroLM(workdir, batch_size=t.global_batch_size, max_length=t.seq_len)
    rng = np.random.default_rng(0)
    context = t.seq_len * 3 // 4
    requests = [
        (
            None,
            list(rng.integers(4, config.model.vocab_size, context)),
            list(rng.integers(4, 99, 4)),
        )
        for _ in range(_REQUESTS.value)
    ]
    model._loglikelihood_tokens(requests[: t.global_batch_size])  # pylint: disable=protected-access
    start = time.perf_counter()
    model._loglikelihood_tokens(requests)  # pylint: disable=protected-access
    per_request = (time.perf_counter() - start) / len(requests)
    bare = synthetic_batch(config)
    mesh, rules = model.mesh, model.rules
    batch = global_batch(bare, mesh, rules)
    args = (model.run.params, batch['inputs'], batch['targets'], batch['segment_ids'])
    score = model.score_rows
    jax.block_until_ready(score(*args, batch['positions']))
    start = time.perf_counter()
    for _ in range(3):
      out = score(*args, batch['positions'])
    jax.block_until_ready(out)
    per_row = (time.perf_counter() - start) / 3 / t.global_batch_size
    rows.append(
        (
            'harness loglikelihood',
            (context + 4) / per_request,
            f'{per_request * 1e3:.2f} ms/request, bare step {per_row * 1e3:.2f} ms/row: '
            f'overhead {(per_request - per_row) * 1e3:.2f} ms/request',
        )
    )
  print(
      f'{t.global_batch_size} x {t.seq_len} tokens per batch, {jax.device_count()} '
      f'{jax.devices()[0].platform} device(s), {config.model.compute_dtype}'
  )
  print(f'{"what":<28} {"tokens/s":>10} {"vs training":>12}  notes')
  for name, rate, note in rows:
    print(f'{name:<28} {rate:>10.0f} {rate / training:>11.2f}x  {note}')


if __name__ == '__main__':
  app.run(main)
