"""euro_lm.results against hand-written metrics.jsonl: duplicate steps after a resume,
malformed and unfinished lines, the validation table, and the plots (Agg backend)."""

import json
import math
import re

import matplotlib
import numpy as np
import pytest

from euro_lm import results
from euro_lm.results import MetricsError

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after the backend on purpose)


def train(step, loss):
  return {'step': step, 'loss': loss, 'grad_norm': loss / 10, 'learning_rate': 1e-3}


def evaluation(step, de, fr):
  """Validation results of two languages as the loop writes them: (loss, bpb) each."""
  return {
      'step': step,
      'valid/deu_Latn/loss': de[0],
      'valid/deu_Latn/perplexity': math.exp(de[0]),
      'valid/deu_Latn/bpb': de[1],
      'valid/fra_Latn/loss': fr[0],
      'valid/fra_Latn/perplexity': math.exp(fr[0]),
      'valid/fra_Latn/bpb': fr[1],
      'valid/loss': (de[0] + fr[0]) / 2,
      'valid/bpb': (de[1] + fr[1]) / 2,
  }


# A run to step 30, preempted after step 30 with its last save at step 20, resumed from 20
# to step 40: steps 30 (train and eval) are logged twice; the resumed records count.
RUN = [
    evaluation(0, (8.0, 4.0), (8.5, 4.5)),
    train(10, 7.0),
    train(20, 6.0),
    evaluation(20, (6.5, 3.0), (7.0, 3.5)),
    train(30, 5.5),
    evaluation(30, (6.0, 2.5), (6.5, 3.0)),
    {'step': 30, 'checkpoint/blocking_seconds': 0.5},
    # resumed from step 20
    train(30, 5.25),
    evaluation(30, (5.75, 2.25), (6.25, 2.75)),
    {'step': 40, 'loss': 'nan', 'grad_norm': 'inf', 'learning_rate': 1e-3},  # stored as text
    {'step': 40, 'checkpoint/blocking_seconds': 0.25},
]


def write(path, records, tail=''):
  path.write_text(''.join(json.dumps(r) + '\n' for r in records) + tail, encoding='utf-8')
  return path


@pytest.fixture
def workdir(tmp_path):
  write(tmp_path / 'metrics.jsonl', RUN)
  return tmp_path


def test_read_metrics_keeps_the_last_record_of_each_kind_and_step(workdir):
  records = results.read_metrics(workdir)
  assert [(r['step'], results.record_kind(r)) for r in records] == [
      (0, 'eval'),
      (10, 'train'),
      (20, 'train'),
      (20, 'eval'),
      (30, 'train'),
      (30, 'eval'),
      (30, 'other'),
      (40, 'train'),
      (40, 'other'),
  ]
  assert records[4] == train(30, 5.25)
  assert records[5] == evaluation(30, (5.75, 2.25), (6.25, 2.75))
  assert records[6] == {'step': 30, 'checkpoint/blocking_seconds': 0.5}
  assert math.isnan(records[7]['loss']) and records[7]['grad_norm'] == math.inf
  # The file's path reads the same as its workdir.
  assert results.read_metrics(str(workdir / 'metrics.jsonl'))[:7] == records[:7]


def test_series_gives_aligned_steps_and_values(workdir):
  records = results.read_metrics(workdir)
  steps, loss = results.series(records, 'loss')
  assert steps.dtype == np.int64 and loss.dtype == np.float64
  assert steps.tolist() == [10, 20, 30, 40]
  assert loss[:3].tolist() == [7.0, 6.0, 5.25] and math.isnan(loss[3])
  steps, bpb = results.series(records, 'valid/fra_Latn/bpb')
  assert steps.tolist() == [0, 20, 30] and bpb.tolist() == [4.5, 3.5, 2.75]
  assert results.languages(records) == ['deu_Latn', 'fra_Latn']
  assert results.eval_steps(records) == [0, 20, 30]
  with pytest.raises(
      MetricsError,
      match=r"no metric 'valid/pol_Latn/bpb'.*they have: "
      r'checkpoint/blocking_seconds, grad_norm, learning_rate, loss, valid/bpb',
  ):
    results.series(records, 'valid/pol_Latn/bpb')


def test_validation_table_at_the_last_and_a_given_step(workdir):
  rows = results.validation_table(workdir)
  assert rows == [
      {'language': 'deu_Latn', 'step': 30, 'loss': 5.75, 'bpb': 2.25},
      {'language': 'fra_Latn', 'step': 30, 'loss': 6.25, 'bpb': 2.75},
      {'language': 'mean', 'step': 30, 'loss': 6.0, 'bpb': 2.5},
  ]
  assert results.validation_table(workdir, step=0)[0] == {
      'language': 'deu_Latn',
      'step': 0,
      'loss': 8.0,
      'bpb': 4.0,
  }
  assert results.format_table(rows) == (
      'language  step   loss    bpb\n'
      '--------  ----  -----  -----\n'
      'deu_Latn    30  5.750  2.250\n'
      'fra_Latn    30  6.250  2.750\n'
      'mean        30  6.000  2.500'
  )
  assert results.format_table([{'language': 'x', 'bpb': None}]).splitlines()[-1] == 'x           -'
  with pytest.raises(
      MetricsError,
      match=r'no validation results at step 10; evaluated ' r'steps: 0, 20, 30',
  ):
    results.validation_table(workdir, step=10)


def test_validation_table_of_a_run_without_evaluation(tmp_path):
  write(tmp_path / 'metrics.jsonl', [train(1, 3.0)])
  with pytest.raises(MetricsError, match=r'no validation results in the records'):
    results.validation_table(tmp_path)


def test_a_missing_metrics_file_is_named(tmp_path):
  missing = re.escape(f'no metrics.jsonl at {tmp_path}/metrics.jsonl')
  with pytest.raises(MetricsError, match=missing):
    results.read_metrics(tmp_path)
  missing = re.escape(f'no metrics.jsonl at {tmp_path}/other.jsonl')
  with pytest.raises(MetricsError, match=missing):
    results.read_metrics(tmp_path / 'other.jsonl')


@pytest.mark.parametrize(
    'line, message',
    [
        ('{"step": 3, "loss": 1.0', r'not a JSON record'),
        ('[1, 2]', r'not a JSON object'),
        ('{"loss": 1.0}', r'no integer "step"'),
        ('{"step": "3", "loss": 1.0}', r'no integer "step"'),
    ],
)
def test_a_malformed_line_is_an_error_naming_file_and_line(tmp_path, line, message):
  path = tmp_path / 'metrics.jsonl'
  write(path, [train(1, 3.0)], tail=line + '\n' + json.dumps(train(2, 2.0)) + '\n')
  with pytest.raises(MetricsError, match=rf'^{re.escape(str(path))}:2: {message}'):
    results.read_metrics(path)


def test_an_unfinished_last_line_is_left_out(tmp_path):
  path = write(tmp_path / 'metrics.jsonl', [train(1, 3.0)], tail='{"step": 2, "lo')
  assert results.read_metrics(path) == [train(1, 3.0)]
  # A complete last record without its newline is read.
  write(path, [train(1, 3.0)], tail=json.dumps(train(2, 2.0)))
  assert results.read_metrics(path) == [train(1, 3.0), train(2, 2.0)]
  # Blank lines are skipped; only the last line may be unfinished.
  write(path, [train(1, 3.0)], tail='\n' + '{"step": 2, "lo\n' + json.dumps(train(3, 1.0)))
  with pytest.raises(MetricsError, match=rf'^{re.escape(str(path))}:3: not a JSON record'):
    results.read_metrics(path)


def line_data(ax):
  return {
      line.get_label(): (line.get_xdata().tolist(), line.get_ydata().tolist())
      for line in ax.get_lines()
  }


def test_plot_training_draws_the_loss_series(workdir):
  records = results.read_metrics(workdir)
  ax = results.plot_training(records)
  try:
    data = line_data(ax)
    assert list(data) == ['train', 'validation (mean)']
    steps, loss = data['train']
    assert steps == [10, 20, 30, 40] and loss[:3] == [7.0, 6.0, 5.25] and math.isnan(loss[3])
    assert data['validation (mean)'] == ([0, 20, 30], [8.25, 6.75, 6.0])
    assert ax.get_xlabel() == 'step' and ax.get_ylabel() == 'loss'
  finally:
    plt.close(ax.figure)


def test_plot_validation_draws_one_line_per_language_on_given_axes(workdir):
  fig, (left, right) = plt.subplots(1, 2)
  try:
    assert results.plot_validation(workdir, ax=left) is left
    assert line_data(left) == {
        'deu_Latn': ([0, 20, 30], [4.0, 3.0, 2.25]),
        'fra_Latn': ([0, 20, 30], [4.5, 3.5, 2.75]),
        'mean': ([0, 20, 30], [4.25, 3.25, 2.5]),
    }
    assert left.get_ylabel() == 'validation bpb'
    results.plot_validation(workdir, metric='loss', ax=right, mean=False)
    assert line_data(right) == {
        'deu_Latn': ([0, 20, 30], [8.0, 6.5, 5.75]),
        'fra_Latn': ([0, 20, 30], [8.5, 7.0, 6.25]),
    }
    with pytest.raises(MetricsError, match=r"no per-language validation 'accuracy'"):
      results.plot_validation(workdir, metric='accuracy', ax=right)
  finally:
    plt.close(fig)


def test_results_does_not_import_matplotlib():
  import os
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = (
      'import sys, euro_lm.results; assert "matplotlib" not in sys.modules, "matplotlib imported"'
  )
  subprocess.run([sys.executable, '-c', code], check=True, cwd=root)
