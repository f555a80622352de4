"""SIGTERM and SIGINT end a run cleanly: finish the step, save, exit 0.

Schedulers (SLURM, Kubernetes, cloud preemption) send SIGTERM some time before SIGKILL.
With one process a signal handler sets a flag that the loop reads after each step. With
several processes every one must save at the same step, or the collectives of the save
hang: JAX's preemption sync point (set up by `jax.distributed.initialize`, which catches
SIGTERM itself) gives all of them the same answer for each step, so the handler here turns
SIGINT into SIGTERM for it. A second SIGINT interrupts at once, as usual. The sync point
needs only the coordination service, so it works on CPU too: one process's SIGTERM stops
all of them after the same step (tests/test_multiprocess.py).

The watch starts before the run sets anything up. With one process, a signal that comes
during start-up (data, restore, compilation) stops the run at the next phase boundary with a
message and exit code 128 + the signal number (143 for SIGTERM, 130 for SIGINT): there is no
new step to save, and the same command resumes. With several processes JAX holds SIGTERM
until the first step, which then saves and stops as above.

Only process 0 prints the run's messages, so with several processes each one also logs (a
warning, on stderr) the step it stops after: every task's own log shows that it stopped.
"""

import signal

import jax
from absl import logging
from jax.experimental import multihost_utils


class StoppedBySignal(SystemExit):
  """A signal before the first step: exits with 128 + its number, the shell's convention."""


class PreemptionWatch:
  """Context manager: `requested(step)` is True once every process should stop at `step`."""

  def __init__(self):
    self._signal = None
    self._previous = {}
    self._synced = jax.process_count() > 1

  def __enter__(self):
    signals = (signal.SIGINT,) if self._synced else (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum, frame):
    del frame
    if self._signal == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt  # the second Ctrl-C: stop now, without saving
    self._signal = signal.Signals(signum)
    if self._synced:
      signal.raise_signal(signal.SIGTERM)  # JAX's preemption notifier handles it

  @property
  def signal_name(self):
    return self._signal.name if self._signal else 'SIGTERM'

  def stop_if_signalled_before_training(self, log, newest):
    """During start-up, with one process: after a signal, logs that the run stopped and
    raises StoppedBySignal. `newest` says what the newest checkpoint is."""
    if self._synced or self._signal is None:
      return
    log(
        f'stopped by {self.signal_name} during start-up, before the first step: nothing new '
        f'to save. {newest}. Run the same command to resume.'
    )
    raise StoppedBySignal(128 + int(self._signal))

  def requested(self, step):
    if not self._synced:
      return self._signal is not None
    agreed = multihost_utils.reached_preemption_sync_point(step)
    if agreed:
      logging.warning(
          'process %d of %d: all processes stop after step %d (%s)',
          jax.process_index(),
          jax.process_count(),
          step,
          self.signal_name,
      )
    return agreed
