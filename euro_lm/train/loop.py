"""The training loop: data -> sharded train step -> metrics, evaluation, checkpoints."""

import json
import math
import os
import time

import jax
import tqdm
from flax import linen as nn

from euro_lm import devices, host_memory
from euro_lm.checkpoint import (
    CORRUPT_DIRECTORY,
    Checkpointer,
    CheckpointError,
    CorruptCheckpointError,
    SaveFailedError,
    init_model_config,
    load_params,
    tokenizer_for_init,
)
from euro_lm.config import model_from, validate
from euro_lm.data import dataset
from euro_lm.errors import UserError
from euro_lm.evaluation.held_out import language_scores
from euro_lm.finite import describe_nonfinite
from euro_lm.inference import Run
from euro_lm.metrics import (
    MetricsWriteError,
    MetricWriter,
    format_scalars,
    peak_flops_per_device,
    progress_bar,
)
from euro_lm.model import Decoder, lora, train_flops_per_token
from euro_lm.records import RunRecords, read_records
from euro_lm.sharding import global_batch, logical_rules, make_mesh
from euro_lm.train.optimizer import make_optimizer
from euro_lm.train.preemption import PreemptionWatch
from euro_lm.train.profiling import StepProfiler, trace_directory
from euro_lm.train.state import (
    abstract_train_state,
    create_train_state,
    train_state_from_params,
    with_fresh_adapters,
)
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
  try:
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump(config.to_dict(), f, indent=2, default=str)
    os.replace(tmp, path)
  except OSError as e:
    raise TrainingError(f'cannot write {path}: {e.strerror or e}') from None


def _nonfinite_report(step, metrics, flags):
  """'step 3: loss is nan; non-finite gradients: ...', or '' if the step was finite."""
  parts = [
      f'{k} is {metrics[k]}'
      for k in ('loss', 'grad_norm', 'learning_rate')
      if not math.isfinite(metrics[k])
  ]
  for what, key in (
      ('gradients', 'grads_finite'),
      ('parameters after the update', 'params_finite'),
  ):
    names = describe_nonfinite(flags[key])
    if names:
      more = f' and {len(names) - 8} more' if len(names) > 8 else ''
      parts.append(f'non-finite {what}: {", ".join(names[:8])}{more}')
  return f'step {step}: ' + '; '.join(parts) if parts else ''


def _start(config, model, tx, mesh, rules, checkpointer, train_iterator, tokenizer, log):
  """(state, shardings, start step): resumed from the workdir's newest checkpoint, else
  fresh, with the parameters of `train.init_from` if set."""
  t = config.train
  start_step = checkpointer.latest_step() or 0
  if start_step:
    started = time.perf_counter()
    abstract_state, shardings = abstract_train_state(model, tx, t.seq_len, mesh, rules)
    try:
      state = checkpointer.restore(start_step, abstract_state, train_iterator, config, tokenizer)
    except CorruptCheckpointError as e:
      if e.intact_step is None:
        raise
      if not t.resume_fallback:
        aside = os.path.join(os.path.dirname(checkpointer.directory), CORRUPT_DIRECTORY)
        raise CheckpointError(
            f'{e}: set train.resume_fallback=True to resume from it (the corrupt steps are '
            f'then moved to {aside})'
        ) from None
      corrupt = [s for s in checkpointer.all_steps() if s > e.intact_step]
      aside = checkpointer.set_aside(corrupt)
      log(
          f'{e}. Resuming from step {e.intact_step} instead (train.resume_fallback=True); '
          f'moved step(s) {", ".join(map(str, corrupt))} to {aside}'
      )
      start_step = e.intact_step
      state = checkpointer.restore(start_step, abstract_state, train_iterator, config, tokenizer)
    log(
        f'resumed from step {start_step} in {checkpointer.directory} '
        f'({time.perf_counter() - started:.1f}s)'
    )
    return state, shardings, start_step
  if t.init_from:
    abstract_state, shardings = abstract_train_state(model, tx, t.seq_len, mesh, rules)
    base, adapters = lora.split(abstract_state.params)  # a base checkpoint has none
    params, source = load_params(t.init_from, base)
    params = with_fresh_adapters(
        params, model, t.seq_len, jax.random.key(t.seed), mesh, rules, shardings.params
    )
    new = f'; new LoRA adapters: {lora.count(params)[0]:,} parameters to train' if adapters else ''
    log(f'parameters from {source}; the optimizer state, step and data start fresh{new}')
    return train_state_from_params(params, tx, shardings, abstract_state.fp8), shardings, 0
  state, shardings = create_train_state(model, tx, t.seq_len, jax.random.key(t.seed), mesh, rules)
  return state, shardings, 0


def _close(closable, failing):
  """Closes the checkpointer (waiting for the save in flight) or the metric writer; while
  another error propagates, does not mask it."""
  try:
    closable.close()
  except (CheckpointError, MetricsWriteError) as e:
    if not failing:
      raise
    tqdm.tqdm.write(f'also: {e}')


def train(config, workdir):
  """Trains `config` in `workdir`, resuming from its newest checkpoint if there is one.

  SIGTERM or SIGINT ends the run after the current step with a checkpoint (before the
  first step: see euro_lm.train.preemption). Returns the last logged training metrics and
  the last validation results.
  """
  host_memory.configure_before_backend(config.hardware.keep_freed_host_memory)
  with PreemptionWatch() as preemption:
    return _train(config, workdir, preemption)


def _train(config, workdir, preemption):
  started = time.perf_counter()
  t = config.train
  process_index, process_count = jax.process_index(), jax.process_count()
  is_chief = process_index == 0
  if t.model_from_init and t.init_from:
    config = model_from(config, init_model_config(t.init_from))
  degrees = validate(config, jax.device_count(), process_count, devices.describe())
  workdir = prepare_workdir(workdir)
  log = tqdm.tqdm.write if is_chief else (lambda *a, **k: None)  # prints around the bar

  mesh = make_mesh(config.mesh)
  rules = logical_rules(config.mesh)
  log(
      f'euro_lm: {jax.device_count()} {jax.devices()[0].platform} device(s), mesh '
      + ' x '.join(f'{a}={s}' for a, s in degrees.items())
      + f', workdir {workdir}'
  )
  checkpointer = Checkpointer(
      os.path.join(workdir, 'checkpoints'),
      save_every=t.checkpoint_every,
      save_every_minutes=t.checkpoint_every_minutes,
      keep=t.keep_checkpoints,
      keep_every=t.keep_checkpoints_every,
      log=log,
  )
  try:
    if t.init_from and not checkpointer.latest_step():
      # Before make_data, which would otherwise train a tokenizer of its own.
      tokenizer_for_init(t.init_from, config.data.tokenizer_path, workdir)
    data = dataset.make_data(
        config, workdir, process_index=process_index, process_count=process_count
    )
    preemption.stop_if_signalled_before_training(log, _newest(checkpointer))
    model = Decoder(config.model)
    tx, schedule = make_optimizer(config.optimizer, t.steps)
    train_iterator = iter(data.train)
    state, shardings, start_step = _start(
        config, model, tx, mesh, rules, checkpointer, train_iterator, data.tokenizer, log
    )
    preemption.stop_if_signalled_before_training(log, _newest(checkpointer))
    records = RunRecords(
        read_records(checkpointer.step_directory(start_step)) if start_step else None,
        config,
        data.sizes,
        start_step=start_step,
        devices=jax.devices(),
        processes=process_count,
        started=started,
    )
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    if is_chief:
      _write_config(workdir, config)
  except BaseException:
    _close(checkpointer, failing=True)
    raise
  log(
      f'model: {num_params / 1e6:.1f}M parameters; {len(data.languages)} languages; '
      f'{t.global_batch_size} x {t.seq_len} tokens per step'
  )
  if start_step >= t.steps:
    log(
        f'nothing to do: the newest checkpoint is step {start_step} and train.steps={t.steps} '
        '(raise --config.train.steps to train further)'
    )
    checkpointer.close()
    return {}, {}
  try:
    writer = MetricWriter(workdir, enabled=is_chief, log=log)
  except BaseException:
    _close(checkpointer, failing=True)
    raise

  train_step = make_train_step(model, tx, schedule, t, config.optimizer.z_loss, mesh, shardings)
  eval_step = make_eval_step(model, mesh, shardings.params)
  flops_per_token = train_flops_per_token(config.model, t.seq_len)
  peak = peak_flops_per_device(config, jax.devices()[0])
  profiler = StepProfiler(
      trace_directory(workdir, process_index),
      t.profile_start_step,
      t.profile_steps,
      start_step,
      log,
  )
  bar = progress_bar(t.steps, start_step, enabled=is_chief)
  last_metrics, last_eval = {}, {}
  pending_timings = {}  # written with the next logged metrics

  def report(step, metrics_future):
    """Reads a finished step's metrics (the next step is already dispatched)."""
    nonlocal last_metrics, window_start, window_step
    host = jax.device_get(metrics_future)
    flags = {k: host.pop(k) for k in ('grads_finite', 'params_finite')}
    metrics = {k: float(v) for k, v in host.items()}
    # The step flags which weights' gradients and new values are not finite, so a bad step
    # is named precisely; it stops the run (or is skipped) before any save.
    problem = _nonfinite_report(step, metrics, flags)
    if t.nonfinite_policy == 'skip' and math.isfinite(metrics['learning_rate']):
      in_a_row = int(metrics['skipped_in_a_row'])
      if in_a_row:
        reason = problem or (
            f'step {step}: grad_norm {metrics["grad_norm"]:.4g} > '
            f'train.skip_grad_norm_above={t.skip_grad_norm_above}'
        )
        log(f'skipped the update of {reason} ({in_a_row} in a row)')
      if in_a_row > t.max_skipped_in_a_row:
        raise TrainingError(
            f'{in_a_row} updates in a row skipped, more than '
            f'train.max_skipped_in_a_row={t.max_skipped_in_a_row}; stopping. '
            + _newest(checkpointer)
        )
    elif problem:
      raise TrainingError(f'{problem}; stopping. {_newest(checkpointer)}')
    bar.update(1)
    if step == start_step + 1:  # start-up cost: data, restore, compile and one step
      pending_timings['time/to_first_step'] = time.perf_counter() - started
    if step % t.log_every and step != t.steps:
      return
    metrics.update(pending_timings)
    pending_timings.clear()
    now = time.perf_counter()
    seconds = (now - window_start) / (step - window_step)
    metrics['step_time'] = seconds
    metrics['tokens_per_second'] = t.global_batch_size * t.seq_len / seconds
    if peak:
      metrics['mfu'] = flops_per_token * metrics['tokens_per_second'] / (peak * jax.device_count())
    window_start, window_step = now, step
    # The realised mixture: tokens per language in this process's rows so far.
    metrics.update(
        {
            f'tokens/{language}': n
            for language, n in sorted(train_iterator.tokens_by_language().items())
        }
    )
    metrics.update({f'packing/{k}': v for k, v in train_iterator.packing_stats().items()})
    writer.write(step, metrics)
    bar.set_postfix_str(format_scalars(metrics, ('loss', 'grad_norm', 'tokens_per_second')))
    last_metrics = metrics

  harness = None
  if t.harness_tasks:  # lm-eval is an optional extra, imported only for this
    from euro_lm.evaluation.harness import TrainingHarness  # pylint: disable=import-outside-toplevel

    run = Run(config, model, None, data.tokenizer, '', shardings.params)
    harness = TrainingHarness(config, run, mesh, rules, workdir)

  def run_harness(step, state):
    started = time.perf_counter()
    results = harness(state.params)
    writer.write(step, results)
    log(
        f'step {step} lm-eval ({time.perf_counter() - started:.0f}s): '
        + ' '.join(f'{k.removeprefix("harness/")}={v:.4f}' for k, v in results.items())
    )

  def run_eval(step, state):
    results = language_scores(eval_step, state.params, data.valid, mesh, rules)
    writer.write(step, results)
    log(
        f'step {step} validation loss: '
        + ' '.join(
            f'{k.removeprefix("valid/").removesuffix("/loss")}={v:.3f}'
            for k, v in results.items()
            if k.endswith('/loss') and k != 'valid/loss'
        )
        + f' | mean={results["valid/loss"]:.3f}'
    )
    return results

  retried_step = None  # the step whose save retries a failed one (train.save_failure)

  def on_save_failure(error, step):
    """Stops the run, or with train.save_failure='retry' lets it save `step` instead (once
    per failure: a failed retry stops it)."""
    nonlocal retried_step
    if t.save_failure != 'retry' or error.step == retried_step:
      raise SaveFailedError(f'{error} Stopped at step {step}.', error.step) from None
    log(f'{error} Retrying once, with step {step} (train.save_failure=retry).')
    retried_step = step

  def save(step, state):
    save_start = time.perf_counter()
    try:
      checkpointer.save(step, state, train_iterator, config, data.tokenizer, records.at(step))
    except SaveFailedError as e:  # the previous save's failure, or this one's start
      on_save_failure(e, step)
      checkpointer.save(step, state, train_iterator, config, data.tokenizer, records.at(step))
    pending_timings['checkpoint/blocking_seconds'] = time.perf_counter() - save_start

  def final_save(step, state):
    """After metrics could not be written: saves `step` if it is new; says what is saved."""
    try:
      checkpointer.wait()
      if step > start_step and checkpointer.latest_step() != step:
        checkpointer.save(step, state, train_iterator, config, data.tokenizer, records.at(step))
        checkpointer.wait()
      return f'{_newest(checkpointer)}; run the same command to resume once the disk has space'
    except CheckpointError as e:
      return f'The final save failed too: {e}'

  failing = True
  step = start_step
  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      try:
        if t.eval_every and start_step == 0:
          run_eval(0, state)  # the untrained baseline: about log(vocab_size) per language
        batch = global_batch(next(train_iterator), mesh, rules)
        compile_start = time.perf_counter()
        train_step = train_step.lower(state, batch).compile()
        log(f'compiled the train step in {time.perf_counter() - compile_start:.1f}s')
        preemption.stop_if_signalled_before_training(log, _newest(checkpointer))
        fragmentation_guard = host_memory.FragmentationGuard(train_step)
        window_start, window_step = time.perf_counter(), start_step
        pending = None
        for step in range(start_step + 1, t.steps + 1):
          if step > start_step + 1:
            batch = global_batch(next(train_iterator), mesh, rules)
          with profiler.step(step):
            state, metrics_future = train_step(state, batch)
          fragmentation_guard.after_step()
          profiled = profiler.after(step, metrics_future)
          save_now = False
          try:  # a failed asynchronous save surfaces here, at the first step after it
            checkpointer.check_save(step)
          except SaveFailedError as e:
            on_save_failure(e, step)
            save_now = True
          if pending:
            report(*pending)
          pending = (step, metrics_future)
          is_last = step == t.steps
          preempted = preemption.requested(step)
          do_eval = is_last or (t.eval_every and step % t.eval_every == 0)
          do_harness = harness and (is_last or (t.harness_every and step % t.harness_every == 0))
          do_save = is_last or preempted or save_now or checkpointer.should_save(step)
          if do_eval or do_harness or do_save:  # never evaluate or save an unchecked step
            report(*pending)
            pending = None
          if do_eval:
            last_eval = run_eval(step, state)
          if do_harness:
            run_harness(step, state)
          if do_save:
            save(step, state)
          if preempted:
            checkpointer.wait()
            log(
                f'stopped by {preemption.signal_name} after step {step}: saved '
                f'{checkpointer.step_directory(step)}. Run the same command to resume.'
            )
            break
          if do_eval or do_save or profiled:  # keep evaluation, saving and tracing out of
            window_start, window_step = time.perf_counter(), step  # the throughput window
        else:
          checkpointer.wait()  # "done" only once the last save is on disk
          if pending_timings:  # the last save's blocking time
            writer.write(step, pending_timings)
          log(
              f'done: step {t.steps}, checkpoints in {checkpointer.directory}, metrics in '
              f'{writer.path}, TensorBoard logs in {os.path.join(workdir, "tensorboard")}'
          )
      except MetricsWriteError as e:
        raise TrainingError(f'{e}; stopping at step {step}. {final_save(step, state)}') from None
    failing = False
  finally:
    profiler.close()
    bar.close()
    _close(checkpointer, failing)
    _close(writer, failing)
  return last_metrics, last_eval


def _newest(checkpointer):
  saved = checkpointer.latest_step()
  return (
      f'The newest checkpoint is step {saved} in {checkpointer.directory}'
      if saved
      else 'There is no checkpoint yet'
  )
