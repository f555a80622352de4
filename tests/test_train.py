"""The training loop end to end on the embedded corpus: outputs, falling loss, resume."""

import glob
import json
import math
import os
import subprocess
import sys

import jax
import pytest

from configs import tiny
from euro_lm.train.loop import TrainingError, train
from euro_lm.train.profiling import StepProfiler

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fast_tiny(**train_overrides):
  c = tiny.get_config()
  c.model.num_layers = 2
  c.train.update(steps=40, log_every=10, eval_every=20, eval_batches=1, checkpoint_every=20)
  c.train.update(train_overrides)
  c.optimizer.warmup_steps = 5
  return c


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


# fast_tiny()'s settings as command-line overrides of configs/tiny.py.
FAST_TINY_FLAGS = [
    '--config.model.num_layers=2',
    '--config.train.steps=40',
    '--config.train.log_every=10',
    '--config.train.eval_every=20',
    '--config.train.eval_batches=1',
    '--config.train.checkpoint_every=20',
    '--config.optimizer.warmup_steps=5',
]


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  """fast_tiny() trained as the README says, `python -m euro_lm.train --config=configs/tiny.py
  --workdir=DIR --config.a.b=v ...`: (config, workdir, the finished process)."""
  workdir = str(tmp_path_factory.mktemp('tiny'))
  result = subprocess.run(
      [
          sys.executable,
          '-m',
          'euro_lm.train',
          '--config=configs/tiny.py',
          f'--workdir={workdir}',
          *FAST_TINY_FLAGS,
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=600,
      env=dict(os.environ, JAX_PLATFORMS='cpu'),
  )
  return fast_tiny(), workdir, result


def test_run_writes_metrics_checkpoints_tensorboard_and_config(tiny_run):
  config, workdir, result = tiny_run
  assert result.returncode == 0, result.stderr[-3000:]
  records = read_metrics(workdir)
  train_records = [r for r in records if 'loss' in r]
  assert [r['step'] for r in train_records] == [10, 20, 30, 40]
  for record in train_records:
    assert {'step', 'loss', 'learning_rate', 'grad_norm', 'tokens_per_second'} <= record.keys()
    assert record['tokens_per_second'] > 0
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['20', '40']
  assert glob.glob(os.path.join(workdir, 'tensorboard', 'events.out.tfevents.*'))
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f) == json.loads(json.dumps(config.to_dict()))
  assert os.path.exists(os.path.join(workdir, 'tokenizer.model'))


def test_loss_falls_on_the_embedded_corpus(tiny_run):
  config, workdir, _ = tiny_run
  records = read_metrics(workdir)
  uniform = math.log(config.model.vocab_size)  # loss of a model that knows nothing
  train_losses = [r['loss'] for r in records if 'loss' in r]
  evals = [r for r in records if 'valid/loss' in r]
  assert [r['step'] for r in evals] == [0, 20, 40]
  assert train_losses[0] < uniform + 0.5 and train_losses[-1] < uniform - 0.5
  assert abs(evals[0]['valid/loss'] - uniform) < 0.1  # untrained: about uniform
  assert evals[2]['valid/loss'] < evals[1]['valid/loss'] < uniform - 0.5
  languages = {k.split('/')[1] for k in evals[2] if k.count('/') == 2}
  assert {'deu_Latn', 'fra_Latn', 'pol_Latn', 'ell_Grek', 'bul_Cyrl', 'gle_Latn'} <= languages
  for language in languages:
    assert evals[2][f'valid/{language}/perplexity'] == pytest.approx(
        math.exp(evals[2][f'valid/{language}/loss'])
    )
    assert evals[2][f'valid/{language}/loss'] < evals[0][f'valid/{language}/loss'] - 0.5
    assert 0 < evals[2][f'valid/{language}/bpb'] < 10


def test_non_finite_loss_stops_the_run_naming_the_step(tiny_run, tmp_path):
  c = fast_tiny(steps=5, eval_every=0, checkpoint_every=0)
  c.data.tokenizer_path = os.path.join(tiny_run[1], 'tokenizer.model')
  # Finite to validate, infinite in float32: step 1's update makes every parameter infinite.
  c.optimizer.learning_rate = 1e39
  c.optimizer.warmup_steps = 0
  with pytest.raises(
      TrainingError,
      match=r'step 1: learning_rate is inf; non-finite '
      r'parameters after the update: embedding, final_norm/scale, '
      r'layers/attention/wk \(layers 0, 1\), .*; stopping. There is no '
      r'checkpoint yet',
  ):
    train(c, str(tmp_path))
  assert not os.listdir(tmp_path / 'checkpoints')


def test_readme_command_line(tiny_run):
  """The command-line contract: --config, --workdir and --config.a.b=v overrides (the
  fixture's run: its config.json is fast_tiny()'s, test_run_writes_metrics_... checks)."""
  _, workdir, result = tiny_run
  assert result.returncode == 0, result.stderr[-3000:]
  assert [r['step'] for r in read_metrics(workdir) if 'loss' in r] == [10, 20, 30, 40]
  assert 'done: step 40' in result.stdout


def test_profile_traces_the_chosen_steps(tiny_run, tmp_path):
  """train.profile_start_step=2, profile_steps=2: one trace in the TensorBoard directory
  (TensorBoard's and Perfetto's formats), whose annotated steps are 2 and 3 alone, with the
  compiled train step running in it."""
  c = fast_tiny(
      steps=5, log_every=5, eval_every=0, checkpoint_every=0, profile_start_step=2, profile_steps=2
  )
  c.model.num_layers = 1
  c.data.tokenizer_path = os.path.join(tiny_run[1], 'tokenizer.model')
  c.data.languages = 'deu_Latn,ell_Grek,bul_Cyrl'  # a short final validation
  train(c, str(tmp_path))
  runs = glob.glob(str(tmp_path / 'tensorboard' / 'plugins' / 'profile' / '*'))
  assert len(runs) == 1
  assert os.path.exists(os.path.join(runs[0], 'perfetto_trace.json.gz'))
  (xspace,) = glob.glob(os.path.join(runs[0], '*.xplane.pb'))
  events = [
      event
      for plane in jax.profiler.ProfileData.from_file(xspace).planes
      for line in plane.lines
      for event in line.events
  ]
  steps = [dict(event.stats)['step_num'] for event in events if event.name == 'train']
  assert steps == [2, 3]
  assert any('jit_train_step' in event.name for event in events)


def test_profile_window_before_a_resumed_step_is_skipped_with_a_message(tmp_path):
  said = []
  profiler = StepProfiler(str(tmp_path / 'trace'), first=2, count=2, start_step=5, log=said.append)
  with profiler.step(6):
    pass
  assert not profiler.after(6, None)
  profiler.close()
  assert said == ['not profiling: train.profile_start_step=2 is not after the resumed step 5']
  assert not os.path.exists(tmp_path / 'trace')
