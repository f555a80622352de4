"""Reading a training run's results from Python: metrics.jsonl as records, metric series,
the per-language validation table and plots (what notebooks call).

    records = read_metrics(workdir)             # or the path of a metrics.jsonl
    steps, loss = series(records, 'loss')       # aligned numpy arrays
    print(format_table(validation_table(records)))
    plot_validation(records, metric='bpb')      # matplotlib, imported only here

`euro_lm.train.loop.train` appends three kinds of record to `<workdir>/metrics.jsonl`, each
with its `step`: training records (`loss`, `grad_norm`, `learning_rate`, ...), evaluation
records (`valid/loss`, `valid/bpb`, `valid/<language>/loss`, `valid/<language>/bpb`, ...)
and timing-only records (e.g. the last save's `checkpoint/blocking_seconds`). A resumed run
logs some steps again; the later record of a kind and step replaces the earlier one.

Nothing here needs more than numpy; the plot helpers import matplotlib (the `notebooks`
extra) when called. Tables are lists of dicts: print them with `format_table`, or hand them
to `pandas.DataFrame(rows)`.
"""

import json
import math
import os

import numpy as np

from euro_lm.errors import UserError

METRICS_FILE = 'metrics.jsonl'
KINDS = ('train', 'eval', 'other')  # also the order of a step's records
_NON_FINITE = {'nan': math.nan, 'inf': math.inf, '-inf': -math.inf}  # how the writer stores them


class MetricsError(UserError, ValueError):
  """A metrics.jsonl that cannot be read, or a metric or step it does not have."""


def record_kind(record):
  """'eval' (validation results), 'train' (a logged training step) or 'other'."""
  if any(k.startswith('valid/') for k in record):
    return 'eval'
  return 'train' if 'loss' in record else 'other'


def metrics_path(workdir_or_path):
  """`<workdir>/metrics.jsonl` for a directory, else the path itself."""
  path = os.fspath(workdir_or_path)
  return os.path.join(path, METRICS_FILE) if os.path.isdir(path) else path


def _parse(line, where):
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise MetricsError(f'{where}: not a JSON record ({e}): {line[:80]!r}') from None
  if not isinstance(record, dict):
    raise MetricsError(f'{where}: not a JSON object: {line[:80]!r}')
  step = record.get('step')
  if isinstance(step, bool) or not isinstance(step, int):
    raise MetricsError(f'{where}: no integer "step" in {line[:80]!r}')
  return {k: _NON_FINITE.get(v, v) if isinstance(v, str) else v for k, v in record.items()}


def read_metrics(workdir_or_path):
  """The records of a run's metrics.jsonl (a workdir or the file's path), one per kind
  (`record_kind`) and step, the last one logged winning, sorted by step then kind.

  Non-finite values (stored as "nan", "inf") come back as floats. A malformed line is an
  error naming the file and line number, except an unfinished last line (no newline yet:
  a running training may be writing it), which is left out.
  """
  path = metrics_path(workdir_or_path)
  if not os.path.isfile(path):
    raise MetricsError(f'no {METRICS_FILE} at {path}: has the run logged a step yet?')
  latest = {}
  with open(path, encoding='utf-8') as f:
    lines = f.readlines()
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    where = f'{path}:{number}'
    if not line.endswith('\n'):  # the last line, still being written (or complete)
      try:
        record = _parse(line, where)
      except MetricsError:
        break
    else:
      record = _parse(line, where)
    kind = record_kind(record)
    latest[kind, record['step']] = record
  return [latest[key] for key in sorted(latest, key=lambda k: (k[1], KINDS.index(k[0])))]


def _records(records_or_path):
  if isinstance(records_or_path, (str, os.PathLike)):
    return read_metrics(records_or_path)
  return list(records_or_path)


def series(records, name):
  """(steps, values) of metric `name` over the records that have it, as aligned numpy
  arrays (int64 steps, float64 values), by step."""
  records = _records(records)
  pairs = [(r['step'], r[name]) for r in records if name in r]
  if not pairs:
    names = sorted({k for r in records for k in r if k != 'step'})
    raise MetricsError(f'no metric {name!r} in the records; they have: {", ".join(names)}')
  steps, values = zip(*pairs)
  return np.asarray(steps, np.int64), np.asarray(values, np.float64)


def languages(records):
  """The languages with validation results, sorted."""
  return sorted(
      {
          k.split('/')[1]
          for r in _records(records)
          for k in r
          if k.startswith('valid/') and k.count('/') == 2
      }
  )


def eval_steps(records):
  """The steps with validation results, sorted."""
  return [r['step'] for r in _records(records) if record_kind(r) == 'eval']


def validation_table(records, step=None, metrics=('loss', 'bpb')):
  """Per-language validation results at the last evaluated step (or `step`): one row per
  language, `{'language': ..., 'step': ..., 'loss': ..., 'bpb': ...}`, then a row
  `language='mean'` with the means the run logged. A metric a language lacks is None."""
  records = _records(records)
  evals = {r['step']: r for r in records if record_kind(r) == 'eval'}
  if not evals:
    raise MetricsError(
        'no validation results in the records (train.eval_every=0, or no evaluation yet)'
    )
  if step is None:
    step = max(evals)
  if step not in evals:
    raise MetricsError(
        f'no validation results at step {step}; evaluated steps: '
        f'{", ".join(map(str, sorted(evals)))}'
    )
  record = evals[step]
  rows = []
  for language in languages([record]):
    rows.append(
        {
            'language': language,
            'step': step,
            **{m: record.get(f'valid/{language}/{m}') for m in metrics},
        }
    )
  rows.append({'language': 'mean', 'step': step, **{m: record.get(f'valid/{m}') for m in metrics}})
  return rows


def format_table(rows, floatfmt='.3f'):
  """Rows (dicts with the same keys) as an aligned text table; None prints as '-'."""
  if not rows:
    return ''
  columns = list(rows[0])

  def cell(v):
    if v is None:
      return '-'
    return format(v, floatfmt) if isinstance(v, float) else str(v)

  cells = [columns] + [[cell(r.get(c)) for c in columns] for r in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
  numeric = [
      all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows) for c in columns
  ]
  lines = [
      '  '.join(
          v.rjust(w) if num else v.ljust(w) for v, w, num in zip(row, widths, numeric)
      ).rstrip()
      for row in cells
  ]
  lines.insert(1, '  '.join('-' * w for w in widths))
  return '\n'.join(lines)


# ------------------------------------------------------------------------------ plots


def _axes(ax):
  if ax is not None:
    return ax
  try:
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise UserError("plotting needs matplotlib: pip install 'euro_lm[notebooks]'") from e
  _, ax = plt.subplots()
  return ax


def plot_training(records, ax=None, metric='loss', validation=True):
  """Training `metric` over steps (one line, label 'train'), and with `validation` the
  logged mean validation metric (`valid/<metric>`, label 'validation (mean)') where the run
  evaluated. Returns the matplotlib axes (new ones unless `ax` is given)."""
  records = _records(records)
  steps, values = series(records, metric)
  ax = _axes(ax)
  ax.plot(steps, values, label='train')
  if validation and any(f'valid/{metric}' in r for r in records):
    v_steps, v_values = series(records, f'valid/{metric}')
    ax.plot(v_steps, v_values, marker='o', label='validation (mean)')
  ax.set_xlabel('step')
  ax.set_ylabel(metric)
  ax.set_title(f'training {metric}')
  ax.legend()
  return ax


def plot_validation(records, metric='bpb', ax=None, mean=True):
  """Per-language validation `metric` (bpb, loss or perplexity) over steps, one line per
  language labelled with its tag, and with `mean` the logged mean (dashed, label 'mean')
  when the run logged one. Returns the matplotlib axes."""
  records = _records(records)
  langs = [
      lang for lang in languages(records) if any(f'valid/{lang}/{metric}' in r for r in records)
  ]
  if not langs:
    raise MetricsError(f'no per-language validation {metric!r} in the records')
  ax = _axes(ax)
  for language in langs:
    ax.plot(*series(records, f'valid/{language}/{metric}'), marker='.', label=language)
  if mean and any(f'valid/{metric}' in r for r in records):
    ax.plot(*series(records, f'valid/{metric}'), linestyle='--', color='black', label='mean')
  ax.set_xlabel('step')
  ax.set_ylabel(f'validation {metric}')
  ax.set_title(f'validation {metric} per language')
  ax.legend(fontsize='small', ncol=2)
  return ax
