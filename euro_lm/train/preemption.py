"""SIGTERM and SIGINT end a run cleanly: finish the step, save, exit 0.

Schedulers (SLURM, Kubernetes, cloud preemption) send SIGTERM some time before SIGKILL.
With one process a signal handler sets a flag that the loop reads after each step. With
several processes every one must save at the same step, or the collectives of the save
hang: JAX's preemption sync point (set up by `jax.distributed.initialize`, which catches
SIGTERM itself) gives all of them the same answer for each step, so the handler here turns
SIGINT into SIGTERM for it. A second SIGINT interrupts at once, as usual.
"""

import signal

import jax
from jax.experimental import multihost_utils


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

  def requested(self, step):
    if self._synced:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signal is not None
