"""Checkpoints that never lose a run: exact resume after SIGTERM, SIGINT and SIGKILL,
resharding, parameters-only starts, retention, skip/stop policies and bad checkpoints.

The reference is one uninterrupted 20-step run; every interrupted run must log the same
per-step loss, gradient norm and learning rate, bit for bit, on the same mesh.
"""

import glob
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from run_records import step_dirs, step_records
from sentencepiece import sentencepiece_model_pb2

from configs import tiny
from euro_lm.checkpoint import (
    Checkpointer,
    CheckpointError,
    config_differences,
    tokenizer_for_init,
)
from euro_lm.data import dataset
from euro_lm.data.tokenizer import train_sentencepiece
from euro_lm.train.loop import TrainingError, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(REPO, 'tests', 'training_driver.py')
STEPS = 20
BASE = {
    'model.num_layers': 2,
    'optimizer.warmup_steps': 5,
    'train.steps': STEPS,
    'train.global_batch_size': 8,
    'train.seq_len': 64,
    'train.log_every': 1,
    'train.eval_every': 0,
    'train.checkpoint_every': 5,
    # Five languages, not tiny's 36: each run's final validation is 10 batches, not 72.
    'data.languages': 'deu_Latn,ell_Grek,bul_Cyrl,gle_Latn,fra_Latn',
}


def config_with(overrides):
  config = tiny.get_config()
  config.update_from_flattened_dict(overrides)
  return config


def env(devices=8):
  return dict(
      os.environ,
      JAX_PLATFORMS='cpu',
      JAX_THREEFRY_PARTITIONABLE='1',
      XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
  )


def run_driver(workdir, overrides, *flags, devices=8):
  return subprocess.run(
      [sys.executable, DRIVER, str(workdir), json.dumps(overrides), *flags],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=600,
      env=env(devices),
  )


def copy_checkpoints(source, workdir, steps):
  for step in steps:
    shutil.copytree(
        os.path.join(source, 'checkpoints', str(step)),
        os.path.join(workdir, 'checkpoints', str(step)),
    )


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('tokenizer')
  dataset.make_data(config_with(BASE), str(workdir))
  # Named as a user may name it: copies into checkpoints and workdirs still load.
  renamed = workdir / 'euro_lm_32k.model'
  shutil.copyfile(workdir / 'tokenizer.model', renamed)
  return str(renamed)


@pytest.fixture(scope='module')
def overrides(tokenizer):
  return {**BASE, 'data.tokenizer_path': tokenizer}


@pytest.fixture(scope='module')
def straight(tmp_path_factory, overrides):
  """The uninterrupted reference run; it keeps the newest 2 checkpoints and every 10th."""
  workdir = str(tmp_path_factory.mktemp('straight'))
  config = config_with(
      {**overrides, 'train.keep_checkpoints': 2, 'train.keep_checkpoints_every': 10}
  )
  train(config, workdir)
  return workdir, step_records(workdir)


def assert_same_steps(workdir, reference, first_step):
  """Steps first_step..STEPS were logged with exactly the reference's numbers."""
  records = step_records(workdir)
  assert set(range(first_step, STEPS + 1)) <= set(records) and max(records) == STEPS
  for step in range(first_step, STEPS + 1):
    assert records[step] == reference[step], step


def test_retention_and_what_a_checkpoint_holds(straight, overrides):
  workdir, records = straight
  assert sorted(records) == list(range(1, STEPS + 1))
  assert step_dirs(workdir) == ['10', '15', '20']  # newest 2, and every 10th
  step_dir = os.path.join(workdir, 'checkpoints', '20')
  with open(os.path.join(step_dir, 'config', 'metadata')) as f:
    assert json.load(f)['train']['keep_checkpoints_every'] == 10  # human-readable JSON
  with (
      open(os.path.join(step_dir, 'tokenizer', 'tokenizer.model'), 'rb') as f,
      open(overrides['data.tokenizer_path'], 'rb') as g,
  ):
    assert f.read() == g.read()
  data_files = glob.glob(os.path.join(step_dir, 'data', 'process_*-of-*.json'))
  assert len(data_files) == 1


# SIGINT takes SIGTERM's path (one handler): its case runs with `-m slow`.
@pytest.mark.parametrize(
    'sig', [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)]
)
def test_a_signal_saves_and_exits_0_and_the_resumed_run_is_exact(
    sig, straight, overrides, tmp_path
):
  flags = [f'--config.{k}={v}' for k, v in overrides.items()]
  process = subprocess.Popen(
      [
          sys.executable,
          '-m',
          'euro_lm.train',
          '--config=configs/tiny.py',
          f'--workdir={tmp_path}',
          *flags,
      ],
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=env(),
  )
  metrics = tmp_path / 'metrics.jsonl'
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None:
    if metrics.exists() and len(step_records(tmp_path)) >= 3:
      break
    time.sleep(0.05)
  process.send_signal(sig)
  stdout, stderr = process.communicate(timeout=300)
  assert process.returncode == 0, stderr[-3000:]
  stopped = sorted(step_records(tmp_path))[-1]
  assert 3 <= stopped < STEPS
  assert f'stopped by {sig.name} after step {stopped}' in stdout
  assert 'Run the same command to resume' in stdout
  assert step_dirs(tmp_path) == [str(stopped)]

  train(config_with(overrides), str(tmp_path))
  assert_same_steps(tmp_path, straight[1], 1)
  # A finished run started again does nothing: no step and no record is added.
  lines = (tmp_path / 'metrics.jsonl').read_text().count('\n')
  assert train(config_with(overrides), str(tmp_path)) == ({}, {})
  assert (tmp_path / 'metrics.jsonl').read_text().count('\n') == lines


def test_sigkill_in_the_middle_of_an_async_save(straight, overrides, tmp_path):
  """Killed just before step 10's checkpoint commits: the partial step is ignored, the run
  resumes from step 5 and replays steps 6-20 exactly."""
  result = run_driver(tmp_path, overrides, '--kill_at_commit=10')
  assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
  leftovers = os.listdir(tmp_path / 'checkpoints')
  assert '5' in leftovers and '10' not in leftovers
  assert any(name.startswith('10.orbax-checkpoint-tmp') for name in leftovers), leftovers

  result = run_driver(tmp_path, overrides)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'resumed from step 5' in result.stdout
  assert step_dirs(tmp_path) == ['10', '15', '20']  # the partial step 10 was cleaned up
  assert_same_steps(tmp_path, straight[1], 6)


def test_resume_onto_another_mesh_and_device_count(straight, overrides, tmp_path):
  """Saved on 8 devices (data=8), resumed on 4 (fsdp=2 x tensor=2): the state is
  resharded and training continues where it stopped."""
  copy_checkpoints(straight[0], tmp_path, [10])
  result = run_driver(tmp_path, {**overrides, 'mesh.fsdp': 2, 'mesh.tensor': 2}, devices=4)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'resumed from step 10' in result.stdout and '4 cpu device(s)' in result.stdout
  records = step_records(tmp_path)
  assert sorted(records) == list(range(11, STEPS + 1))
  for step in records:  # the same math, reduced in another order
    np.testing.assert_allclose(records[step][:2], straight[1][step][:2], rtol=2e-3)
    assert records[step][2] == straight[1][step][2]


def test_init_from_loads_the_parameters_only(straight, overrides, tmp_path):
  config = config_with(
      {
          **overrides,
          'train.steps': 1,
          'train.init_from': straight[0],
          'optimizer.learning_rate': 0.0,
          'optimizer.schedule': 'constant',
      }
  )
  train(config, str(tmp_path))
  assert sorted(step_records(tmp_path)) == [1]  # a new run: step 1, not 31
  restore = lambda path: ocp.PyTreeCheckpointer().restore(path)
  source = restore(os.path.join(straight[0], 'checkpoints', '20', 'state'))
  started = restore(os.path.join(tmp_path, 'checkpoints', '1', 'state'))
  assert int(started['step']) == 1
  # learning rate 0: the parameters are exactly those of the source's newest step
  jax.tree.map(np.testing.assert_array_equal, started['params'], source['params'])
  counts = [x for x in jax.tree.leaves(started['opt_state']) if np.ndim(x) == 0]
  assert counts and all(int(c) == 1 for c in counts)  # a fresh optimizer: one update

  deeper = config_with({**overrides, 'model.num_layers': 3, 'train.init_from': straight[0]})
  with pytest.raises(CheckpointError, match=r"do not fit this run's model"):
    train(deeper, str(tmp_path / 'deeper'))


def test_init_from_trains_with_the_tokenizer_of_its_parameters(straight, overrides, tmp_path):
  """A run from train.init_from that names no tokenizer takes the checkpoint's (it never
  trains a new one); one that names another tokenizer is refused, naming both."""
  source = os.path.join(straight[0], 'checkpoints', '20', 'tokenizer')
  unnamed = {**overrides, 'data.tokenizer_path': '', 'train.init_from': straight[0]}
  assert tokenizer_for_init(straight[0], '', str(tmp_path / 'run')) == source
  assert os.listdir(tmp_path / 'run' / 'tokenizer') == ['tokenizer.model']
  copied = tmp_path / 'run' / 'tokenizer' / 'tokenizer.model'
  assert copied.read_bytes() == open(overrides['data.tokenizer_path'], 'rb').read()
  other = tmp_path / 'other.model'
  texts = ['Guten Tag, wie geht es Ihnen?', 'Bonjour, comment allez-vous ?'] * 50
  train_sentencepiece(texts, str(other), vocab_size=320)
  config = config_with({**unnamed, 'data.tokenizer_path': str(other)})
  with pytest.raises(
      CheckpointError, match=rf'the tokenizer {other} is not the one .* \({source}\)'
  ):
    train(config, str(tmp_path / 'other_run'))
  assert not (tmp_path / 'other_run' / 'checkpoints' / '1').exists()
  copied.write_bytes(other.read_bytes())  # a different tokenizer already in the workdir
  with pytest.raises(CheckpointError, match=rf'the tokenizer {copied.parent} is not the one'):
    train(config_with(unnamed), str(tmp_path / 'run'))


def test_save_every_minutes(overrides, tmp_path):
  config = config_with(
      {
          **overrides,
          'train.steps': 3,
          'train.checkpoint_every': 0,
          'train.checkpoint_every_minutes': 1e-9,
          'train.keep_checkpoints': 10,
      }
  )
  train(config, str(tmp_path))
  assert step_dirs(tmp_path) == ['1', '2', '3']


def test_skip_policy_keeps_the_state_and_stops_after_too_many(overrides, tmp_path):
  """Every update is over the gradient-norm limit: none is applied, and the run stops once
  more than train.max_skipped_in_a_row are skipped in a row."""
  config = config_with(
      {
          **overrides,
          'train.nonfinite_policy': 'skip',
          'train.skip_grad_norm_above': 1e-6,
          'train.max_skipped_in_a_row': 3,
          'train.checkpoint_every': 2,
      }
  )
  with pytest.raises(
      TrainingError,
      match=r'4 updates in a row skipped, more than '
      r'train.max_skipped_in_a_row=3; stopping. The newest checkpoint is step 2',
  ):
    train(config, str(tmp_path))
  fresh = str(tmp_path / 'fresh')
  train(
      config_with(
          {
              **overrides,
              'train.steps': 1,
              'optimizer.learning_rate': 0.0,
              'optimizer.schedule': 'constant',
          }
      ),
      fresh,
  )
  restore = lambda path: ocp.PyTreeCheckpointer().restore(path)
  skipped = restore(os.path.join(tmp_path, 'checkpoints', '2', 'state'))
  initial = restore(os.path.join(fresh, 'checkpoints', '1', 'state'))
  assert int(skipped['step']) == 2 and int(skipped['skipped_total']) == 2
  jax.tree.map(np.testing.assert_array_equal, skipped['params'], initial['params'])
  counts = [x for x in jax.tree.leaves(skipped['opt_state']) if np.ndim(x) == 0]
  assert all(int(c) == 0 for c in counts)  # the optimizer never stepped


def test_a_damaged_checkpoint_is_reported_and_the_previous_one_still_resumes(
    straight, overrides, tmp_path
):
  copy_checkpoints(straight[0], tmp_path, [10, 15])
  data_files = glob.glob(str(tmp_path / 'checkpoints' / '15' / 'state' / 'd' / '*'))
  assert data_files
  for path in data_files:  # truncated, as by a disk that filled up mid-copy
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(
      CheckpointError,
      match=r'checkpoint step 15 in \S+ is corrupt: state/\S+ has \d+ bytes, \d+ when saved; '
      r'the newest intact checkpoint is step 10: set train.resume_fallback=True',
  ):
    train(config_with(overrides), str(tmp_path))
  shutil.move(str(tmp_path / 'checkpoints' / '15'), str(tmp_path / 'damaged-15'))
  train(config_with(overrides), str(tmp_path))
  assert_same_steps(tmp_path, straight[1], 11)


def test_an_incompatible_config_or_tokenizer_is_named(straight, overrides, tmp_path):
  copy_checkpoints(straight[0], tmp_path, [20])
  wider = config_with({**overrides, 'train.steps': 40, 'model.mlp_dim': 768})
  with pytest.raises(CheckpointError) as error:
    train(wider, str(tmp_path))
  message = str(error.value)
  assert "does not fit this run's config" in message
  assert 'model.mlp_dim: 704 in the checkpoint, 768 in this run' in message
  assert 'params/layers/mlp/w_up: (2, 256, 704) float32 in the checkpoint' in message

  proto = sentencepiece_model_pb2.ModelProto()
  with open(overrides['data.tokenizer_path'], 'rb') as f:
    proto.ParseFromString(f.read())
  proto.pieces[-1].score -= 1.0  # the same vocabulary size, another tokenizer
  other = tmp_path / 'other.model'
  other.write_bytes(proto.SerializeToString())
  with pytest.raises(
      CheckpointError,
      match=r'is not the one checkpoint step 20 .* was trained '
      r'with; set data.tokenizer_path=.*20/tokenizer$',
  ):
    train(
        config_with({**overrides, 'train.steps': 40, 'data.tokenizer_path': str(other)}),
        str(tmp_path),
    )
  assert step_dirs(tmp_path) == ['20']


def test_a_full_disk_fails_the_save_and_keeps_the_previous_checkpoint(
    straight, overrides, tmp_path
):
  copy_checkpoints(straight[0], tmp_path, [10])
  result = run_driver(tmp_path, overrides, f'--file_size_limit={2**20}')
  assert result.returncode == 1, result.stderr[-3000:]
  assert 'error: saving checkpoint step 15 to' in result.stderr
  assert (
      'step 10 in' in result.stderr
      and 'is the newest complete checkpoint and is intact' in result.stderr
  )
  train(config_with(overrides), str(tmp_path))  # no limit: resumes from step 10
  assert_same_steps(tmp_path, straight[1], 11)


def test_non_finite_parameters_are_never_saved(tmp_path):
  from euro_lm.model import Decoder
  from euro_lm.sharding import logical_rules, make_mesh
  from euro_lm.train.optimizer import make_optimizer
  from euro_lm.train.state import create_train_state

  config = config_with({'model.num_layers': 1})
  mesh = make_mesh(config.mesh)
  tx, _ = make_optimizer(config.optimizer, 10)
  state, _ = create_train_state(
      Decoder(config.model), tx, 16, jax.random.key(0), mesh, logical_rules(config.mesh)
  )
  params = dict(state.params)
  params['final_norm'] = {'scale': params['final_norm']['scale'].at[3].set(math.inf)}
  checkpointer = Checkpointer(str(tmp_path), save_every=1)
  with pytest.raises(
      CheckpointError,
      match=r'not saving step 7: non-finite parameters in ' r'final_norm/scale$',
  ):
    checkpointer.save(7, state.replace(params=params), None, config, '')
  checkpointer.close()
  assert os.listdir(tmp_path) == []


def test_a_shape_field_the_checkpoint_predates_counts_as_its_default():
  """A checkpoint whose config was written before a shape field existed (`qkv_bias`) resumes
  under that field's default, and only there."""
  config = tiny.get_config()
  saved = {'model': {k: v for k, v in config.model.to_dict().items() if k != 'qkv_bias'}}
  assert config_differences(saved, config) == []
  config.model.qkv_bias = True
  assert config_differences(saved, config) == [
      'model.qkv_bias: False in the checkpoint, True in this run'
  ]
