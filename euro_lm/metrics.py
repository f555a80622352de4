"""Metric writers (console, JSONL, TensorBoard) and model-FLOPs utilisation."""

import json
import math
import os

import tqdm

from euro_lm.devices import find_accelerator


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
  """Appends one JSON object per record to `metrics.jsonl` and mirrors scalars to
  TensorBoard. Only the writing process (process 0) should pass `enabled=True`."""

  def __init__(self, workdir, enabled=True, tensorboard=True):
    self.enabled = enabled
    self._jsonl = self._tensorboard = None
    if enabled:
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
      if tensorboard:
        from tensorboardX import SummaryWriter  # imported here: heavy, and only process 0 needs it

        self._tensorboard = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step, scalars):
    if not self.enabled:
      return
    record = {'step': int(step)}
    record.update({k: _jsonable(v) for k, v in scalars.items()})
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    if self._tensorboard is not None:
      for name, value in record.items():
        if name != 'step' and isinstance(value, (int, float)) and math.isfinite(value):
          self._tensorboard.add_scalar(name, value, step)
      self._tensorboard.flush()

  def close(self):
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tensorboard is not None:
      self._tensorboard.close()


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
