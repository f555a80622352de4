"""Metric writers (console, JSONL, TensorBoard) and model-FLOPs utilisation."""

import json
import math
import os
import time

import tqdm

from euro_lm.devices import find_accelerator
from euro_lm.errors import UserError


class MetricsWriteError(UserError, OSError):
  """metrics.jsonl or the TensorBoard log cannot be written (a full disk, a lost mount)."""


def drop_torn_last_line(path):
  """Truncates `path` after its last newline: a record a killed run left half-written.
  Returns the number of bytes dropped (0 if the file ends cleanly or does not exist)."""
  try:
    with open(path, 'rb+') as f:
      size = f.seek(0, os.SEEK_END)
      end = size
      while end > 0:  # scan back in blocks for the last newline
        start = max(0, end - 65536)
        f.seek(start)
        block = f.read(end - start)
        newline = block.rfind(b'\n')
        if newline >= 0:
          end = start + newline + 1
          break
        end = start
      if end < size:
        f.truncate(end)
      return size - end
  except FileNotFoundError:
    return 0


def peak_flops_per_device(config, device):
  """The config's peak if set, else the 16-bit datasheet peak of a known accelerator when
  computing in 16 bits, else None (MFU is then omitted)."""
  if config.hardware.peak_flops_per_device:
    return float(config.hardware.peak_flops_per_device)
  if config.model.compute_dtype not in ('bfloat16', 'float16'):
    return None
  known = find_accelerator(device.device_kind)
  return known.peak_flops_16bit if known else None


class MetricWriter:
  """Appends one JSON object per record to `metrics.jsonl` and mirrors scalars to a
  TensorBoard events file, both written and flushed before `write` returns. Only the
  writing process (process 0) should pass `enabled=True`.

  A torn last line (a killed run's) is dropped first, with a note to `log`. A failed write
  raises MetricsWriteError naming the file.
  """

  def __init__(self, workdir, enabled=True, tensorboard=True, log=None):
    self.enabled = enabled
    self._jsonl = self._tensorboard = None
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tensorboard_dir = os.path.join(workdir, 'tensorboard')
    if not enabled:
      return
    try:
      dropped = drop_torn_last_line(self.path)
      if dropped and log:
        log(f'{self.path}: dropped a torn last line ({dropped} bytes) left by a stopped run')
      self._jsonl = open(self.path, 'a', encoding='utf-8')
    except OSError as e:
      raise _write_error(self.path, e) from None
    if tensorboard:
      from tensorboardX.event_file_writer import EventsWriter  # heavy; only process 0 needs it

      try:
        os.makedirs(self._tensorboard_dir, exist_ok=True)
        self._tensorboard = EventsWriter(os.path.join(self._tensorboard_dir, 'events'))
      except OSError as e:
        raise _write_error(self._tensorboard_dir, e) from None

  def write(self, step, scalars):
    if self._jsonl is None:  # disabled, or abandoned after a reported failure
      return
    record = {'step': int(step)}
    record.update({k: _jsonable(v) for k, v in scalars.items()})
    try:
      self._jsonl.write(json.dumps(record) + '\n')
      self._jsonl.flush()
    except OSError as e:
      self._abandon()
      raise _write_error(self.path, e) from None
    if self._tensorboard is not None:
      from tensorboardX.proto import event_pb2
      from tensorboardX.summary import scalar

      # Written here, not by SummaryWriter's thread: a failure is then ours to report.
      event = event_pb2.Event(wall_time=time.time(), step=int(step))
      for name, value in record.items():
        if name != 'step' and isinstance(value, (int, float)) and math.isfinite(value):
          event.summary.value.extend(scalar(name, value).value)
      try:
        self._tensorboard.write_event(event)
        self._tensorboard.flush()
      except OSError as e:
        self._abandon()
        raise _write_error(self._tensorboard_dir, e) from None

  def _abandon(self):
    """After a failed write: closes both files without raising the same error again."""
    for file in (self._jsonl, self._tensorboard):
      try:
        if file is not None:
          file.close()
      except OSError:
        pass  # the write that failed was reported
    self._jsonl = self._tensorboard = None

  def close(self):
    """Closes both files; a failure to flush one is a MetricsWriteError."""
    errors = []
    for path, file in ((self.path, self._jsonl), (self._tensorboard_dir, self._tensorboard)):
      try:
        if file is not None:
          file.close()
      except OSError as e:
        errors.append(_write_error(path, e))
    self._jsonl = self._tensorboard = None
    if errors:
      raise errors[0]


def _write_error(path, error):
  return MetricsWriteError(f'cannot write {path}: {error.strerror or error}')


def _jsonable(value):
  value = value.item() if hasattr(value, 'item') else value
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/inf; keep the record valid
  return value


def format_scalars(scalars, keys):
  parts = []
  for key in keys:
    if key in scalars:
      value = scalars[key]
      parts.append(f'{key}={value:.4g}' if isinstance(value, float) else f'{key}={value}')
  return ' '.join(parts)


def progress_bar(total, initial, enabled):
  return tqdm.tqdm(
      total=total, initial=initial, disable=not enabled, unit='step', dynamic_ncols=True, leave=True
  )
