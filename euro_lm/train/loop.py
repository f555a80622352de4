"""The training loop: data -> sharded train step -> metrics, evaluation, checkpoints."""

import json
import math
import os
import time

import jax
import numpy as np
import tqdm
from flax import linen as nn

from euro_lm import data as data_lib
from euro_lm.checkpoint import Checkpointer
from euro_lm.config import validate
from euro_lm.errors import UserError
from euro_lm.metrics import MetricWriter, format_scalars, peak_flops_per_device, progress_bar
from euro_lm.model import Decoder, train_flops_per_token
from euro_lm.sharding import global_batch, logical_rules, make_mesh
from euro_lm.train.optimizer import make_optimizer
from euro_lm.train.state import abstract_train_state, create_train_state
from euro_lm.train.step import make_eval_step, make_train_step


class TrainingError(UserError, RuntimeError):
  """A run that cannot go on (a non-finite loss, an unusable workdir)."""


def prepare_workdir(workdir):
  """Creates the workdir if needed and proves it writable without touching its contents."""
  workdir = os.path.abspath(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_test_{jax.process_index()}_{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise TrainingError(f'workdir {workdir} is not usable: {e.strerror or e}') from None
  return workdir


def _write_config(workdir, config):
  path = os.path.join(workdir, 'config.json')
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(config.to_dict(), f, indent=2, default=str)
  os.replace(tmp, path)


def evaluate(eval_step, params, valid, mesh, rules):
  """Per-language validation loss (nats/token), perplexity and bits per byte, plus the
  means of loss and bits per byte over languages."""
  results = {}
  for language, batches in valid.items():
    totals = {}
    for batch in batches:
      sums = jax.device_get(eval_step(params, global_batch(batch, mesh, rules)))
      for k, v in sums.items():
        totals[k] = totals.get(k, 0.0) + float(v)
    loss = totals['loss_sum'] / max(totals['tokens'], 1.0)
    results[f'valid/{language}/loss'] = loss
    results[f'valid/{language}/perplexity'] = math.exp(min(loss, 700.0))  # no float overflow
    if totals.get('bytes'):
      results[f'valid/{language}/bpb'] = totals['loss_sum'] / math.log(2) / totals['bytes']
  for metric in ('loss', 'bpb'):
    values = [v for k, v in results.items() if k.endswith('/' + metric)]
    if values:
      results[f'valid/{metric}'] = float(np.mean(values))
  return results


def train(config, workdir):
  """Trains `config` in `workdir`, resuming from its newest checkpoint if there is one.

  Returns the last logged training metrics and the last validation results.
  """
  t = config.train
  process_index, process_count = jax.process_index(), jax.process_count()
  is_chief = process_index == 0
  degrees = validate(config, jax.device_count(), process_count, jax.devices()[0].platform)
  workdir = prepare_workdir(workdir)
  log = tqdm.tqdm.write if is_chief else (lambda *a, **k: None)  # prints around the bar

  mesh = make_mesh(config.mesh)
  rules = logical_rules(config.mesh)
  log(f'euro_lm: {jax.device_count()} {jax.devices()[0].platform} device(s), mesh '
      + ' x '.join(f'{a}={s}' for a, s in degrees.items()) + f', workdir {workdir}')
  data = data_lib.make_data(config, workdir, process_index=process_index,
                            process_count=process_count)
  model = Decoder(config.model)
  tx, schedule = make_optimizer(config.optimizer, t.steps)
  checkpointer = Checkpointer(os.path.join(workdir, 'checkpoints'),
                              save_every=t.checkpoint_every, keep=t.keep_checkpoints)
  train_iterator = iter(data.train)
  start_step = checkpointer.latest_step() or 0
  if start_step:
    abstract_state, shardings = abstract_train_state(model, tx, t.seq_len, mesh, rules)
    state = checkpointer.restore(start_step, abstract_state, train_iterator)
    log(f'resumed from step {start_step} in {checkpointer.directory}')
  else:
    state, shardings = create_train_state(model, tx, t.seq_len, jax.random.key(t.seed), mesh,
                                          rules)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  if is_chief:
    _write_config(workdir, config)
  log(f'model: {num_params / 1e6:.1f}M parameters; {len(data.languages)} languages; '
      f'{t.global_batch_size} x {t.seq_len} tokens per step')
  if start_step >= t.steps:
    log(f'nothing to do: the newest checkpoint is step {start_step} and train.steps={t.steps} '
        '(raise --config.train.steps to train further)')
    checkpointer.close()
    return {}, {}

  train_step = make_train_step(model, tx, schedule, t, config.optimizer.z_loss, mesh, shardings)
  eval_step = make_eval_step(model, mesh, shardings.params)
  flops_per_token = train_flops_per_token(config.model, t.seq_len)
  peak = peak_flops_per_device(config, jax.devices()[0])
  writer = MetricWriter(workdir, enabled=is_chief)
  bar = progress_bar(t.steps, start_step, enabled=is_chief)
  last_metrics, last_eval = {}, {}

  def report(step, metrics_future):
    """Reads a finished step's metrics (the next step is already dispatched)."""
    nonlocal last_metrics, window_start, window_step
    metrics = {k: float(v) for k, v in jax.device_get(metrics_future).items()}
    # A finite loss, gradient norm and learning rate mean the step's update is finite too,
    # so the state that is saved next is never poisoned.
    bad = [f'{k} is {v}' for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
      saved = checkpointer.latest_step()
      raise TrainingError(
          f'{", ".join(bad)} at step {step}; stopping. The newest checkpoint is '
          + (f'step {saved} in {checkpointer.directory}' if saved else 'none (no checkpoint yet)'))
    bar.update(1)
    if step % t.log_every and step != t.steps:
      return
    now = time.perf_counter()
    seconds = (now - window_start) / (step - window_step)
    metrics['step_time'] = seconds
    metrics['tokens_per_second'] = t.global_batch_size * t.seq_len / seconds
    if peak:
      metrics['mfu'] = flops_per_token * metrics['tokens_per_second'] / (peak * jax.device_count())
    window_start, window_step = now, step
    # The realised mixture: tokens per language in this process's rows so far.
    metrics.update({f'tokens/{language}': n
                    for language, n in sorted(train_iterator.tokens_by_language().items())})
    metrics.update({f'packing/{k}': v for k, v in train_iterator.packing_stats().items()})
    writer.write(step, metrics)
    bar.set_postfix_str(format_scalars(metrics, ('loss', 'grad_norm', 'tokens_per_second')))
    last_metrics = metrics

  def run_eval(step, state):
    results = evaluate(eval_step, state.params, data.valid, mesh, rules)
    writer.write(step, results)
    log(f'step {step} validation loss: ' + ' '.join(
        f'{k.split("/")[1]}={v:.3f}' for k, v in results.items()
        if k.endswith('/loss') and k != 'valid/loss') + f' | mean={results["valid/loss"]:.3f}')
    return results

  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      if t.eval_every and start_step == 0:
        run_eval(0, state)  # the untrained baseline: about log(vocab_size) per language
      batch = global_batch(next(train_iterator), mesh, rules)
      compile_start = time.perf_counter()
      train_step = train_step.lower(state, batch).compile()
      log(f'compiled the train step in {time.perf_counter() - compile_start:.1f}s')
      window_start, window_step = time.perf_counter(), start_step
      pending = None
      for step in range(start_step + 1, t.steps + 1):
        if step > start_step + 1:
          batch = global_batch(next(train_iterator), mesh, rules)
        state, metrics_future = train_step(state, batch)
        if pending:
          report(*pending)
        pending = (step, metrics_future)
        is_last = step == t.steps
        do_eval = is_last or (t.eval_every and step % t.eval_every == 0)
        do_save = is_last or checkpointer.should_save(step)
        if do_eval or do_save:  # never evaluate or save a step whose loss is unchecked
          report(*pending)
          pending = None
        if do_eval:
          last_eval = run_eval(step, state)
        if do_save:
          checkpointer.save(step, state, train_iterator, config)
        if do_eval or do_save:  # keep evaluation and saving out of the throughput window
          window_start, window_step = time.perf_counter(), step
  finally:
    bar.close()
    checkpointer.close()
    writer.close()
  log(f'done: step {t.steps}, checkpoints in {checkpointer.directory}, metrics in '
      f'{os.path.join(workdir, "metrics.jsonl")}, TensorBoard logs in '
      f'{os.path.join(workdir, "tensorboard")}')
  return last_metrics, last_eval
