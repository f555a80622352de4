"""A JAX profiler trace of a few train steps, for TensorBoard's Profile tab or Perfetto."""

import contextlib
import os

import jax


def trace_directory(workdir, process_index):
  """Process 0 traces into the run's TensorBoard directory, beside its scalars; others into
  a run of their own below it. The trace file is named by host, so processes that share a
  host would otherwise overwrite each other's."""
  directory = os.path.join(workdir, 'tensorboard')
  return directory if process_index == 0 else os.path.join(directory, f'process_{process_index}')


class StepProfiler:
  """Traces steps [first, first + count) with `jax.profiler`, each step annotated with its
  number (TensorBoard's step-time view groups device work by it). `first` 0 turns it off.

  Call `step(n)` around each step's dispatch and `after(n, outputs)` once it is dispatched;
  `after` waits for the last traced step's outputs before it stops the trace, so the trace
  holds that step's device work, and returns True then: steps that ran traced are slower,
  so the caller restarts its throughput window. `close()` ends a trace cut short.
  """

  def __init__(self, directory, first, count, start_step, log):
    self.directory, self.first, self.last = directory, first, first + count - 1
    self.active = False
    if first and first <= start_step:
      log(
          f'not profiling: train.profile_start_step={first} is not after the resumed '
          f'step {start_step}'
      )
      self.first = 0
    self._log = log

  def step(self, step):
    if self.first and step == self.first:
      jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
      self.active = True
    if self.active:
      return jax.profiler.StepTraceAnnotation('train', step_num=step)
    return contextlib.nullcontext()

  def after(self, step, outputs):
    if not (self.active and step == self.last):
      return False
    jax.block_until_ready(outputs)
    self.close()
    self._log(
        f'profiled steps {self.first}-{step} into {self.directory}/plugins/profile: '
        "TensorBoard's Profile tab reads it, and ui.perfetto.dev its "
        'perfetto_trace.json.gz'
    )
    return True

  def close(self):
    if self.active:
      self.active = False
      jax.profiler.stop_trace()
