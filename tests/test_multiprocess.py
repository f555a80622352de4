"""Two-process training on CPU: `python -m euro_lm.train` twice, joined by
jax.distributed (gloo collectives), with 2 fake devices each and the batch split across
the processes (mesh.dcn_data=2).

The reference is one uninterrupted 2-process run. A SIGTERM to process 1 alone must stop
both processes after the same step, with one checkpoint, exit 0 on both, and the resumed
2-process run must log the reference's per-step numbers bit for bit. A SIGINT (Ctrl-C) to
one process must do the same.
"""

import glob
import itertools
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest
from run_records import step_dirs, step_records

from configs import tiny
from euro_lm.data import dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 20
BASE = {
    'model.num_layers': 2,
    'optimizer.warmup_steps': 5,
    'train.steps': STEPS,
    'train.global_batch_size': 8,
    'train.seq_len': 64,
    'train.log_every': 1,
    'train.eval_every': 0,
    'train.eval_batches': 1,
    'mesh.dcn_data': 2,
    # Five languages, not tiny's 36: each run's final validation is 10 batches, not 72.
    'data.languages': 'deu_Latn,ell_Grek,bul_Cyrl,gle_Latn,fra_Latn',
}
TIMEOUT = 240  # seconds for a whole run; a hung collective fails the test instead


def data_files(workdir, step):
  pattern = os.path.join(workdir, 'checkpoints', str(step), 'data', 'process_*-of-*.json')
  return sorted(os.path.basename(p) for p in glob.glob(pattern))


class TwoProcesses:
  """Both processes of one `python -m euro_lm.train` run, output in
  <workdir>.<n>.p<i>.out and .err; leaving the `with` kills whichever still runs."""

  _count = itertools.count()

  def __init__(self, workdir, overrides, env):
    self.logs = f'{workdir}.{next(self._count)}'
    port = portpicker.pick_unused_port()
    flags = [f'--config.{k}={v}' for k, v in overrides.items()]
    self.processes = []
    try:
      for i in range(2):
        with open(f'{self.logs}.p{i}.out', 'w') as out, open(f'{self.logs}.p{i}.err', 'w') as err:
          self.processes.append(
              subprocess.Popen(
                  [
                      sys.executable,
                      '-m',
                      'euro_lm.train',
                      '--config=configs/tiny.py',
                      f'--workdir={workdir}',
                      *flags,
                      '--config.distributed.initialize=always',
                      f'--config.distributed.coordinator_address=localhost:{port}',
                      '--config.distributed.num_processes=2',
                      f'--config.distributed.process_id={i}',
                  ],
                  cwd=REPO,
                  stdout=out,
                  stderr=err,
                  env=env,
              )
          )
    except BaseException:
      self.__exit__()
      raise

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    for p in self.processes:
      if p.poll() is None:
        p.kill()
      p.wait()

  def finish(self, timeout=TIMEOUT):
    """[(returncode, stdout, stderr)] of both processes once both exited (returncode None
    for one still running at the timeout)."""
    deadline = time.time() + timeout
    for p in self.processes:
      try:
        p.wait(timeout=max(deadline - time.time(), 0.1))
      except subprocess.TimeoutExpired:
        pass  # reported by the caller, with the output so far
    results = []
    for i, p in enumerate(self.processes):
      with open(f'{self.logs}.p{i}.out') as out, open(f'{self.logs}.p{i}.err') as err:
        results.append((p.poll(), out.read(), err.read()))
    return results


def assert_exited_0(results):
  for i, (returncode, _, stderr) in enumerate(results):
    assert returncode == 0, f'process {i} exited {returncode}:\n{stderr[-3000:]}'


def run_two(workdir, overrides, env):
  with TwoProcesses(workdir, overrides, env) as run:
    return run.finish()


@pytest.fixture(scope='module')
def env():
  # The runs share the session's compilation cache (conftest.py) through os.environ.
  return dict(
      os.environ,
      JAX_PLATFORMS='cpu',
      JAX_THREEFRY_PARTITIONABLE='1',
      XLA_FLAGS='--xla_force_host_platform_device_count=2',
  )


@pytest.fixture(scope='module')
def overrides(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('tokenizer')
  config = tiny.get_config()
  config.update_from_flattened_dict(BASE)
  dataset.make_data(config, str(workdir))  # one tokenizer, not one per run
  return {**BASE, 'data.tokenizer_path': str(workdir / 'tokenizer.model')}


@pytest.fixture(scope='module')
def reference(tmp_path_factory, overrides, env):
  """The uninterrupted 2-process run: (workdir, per-step records, process outputs)."""
  workdir = str(tmp_path_factory.mktemp('reference') / 'run')
  results = run_two(workdir, overrides, env)
  return workdir, step_records(workdir), results


def preempt(workdir, overrides, env, sig):
  """Starts a 2-process run and sends `sig` to process 1 alone once step 3 is logged;
  returns both processes' results."""
  with TwoProcesses(workdir, overrides, env) as run:
    deadline = time.time() + TIMEOUT
    while len(step_records(workdir)) < 3:
      running = [p.poll() is None for p in run.processes]
      if not all(running) or time.time() > deadline:
        results = run.finish(timeout=0)
        pytest.fail(
            f'no step 3 before a process ended or the deadline; running: {running}\n'
            + '\n'.join(err[-2000:] for _, _, err in results)
        )
      time.sleep(0.05)
    run.processes[1].send_signal(sig)  # process 0 gets no signal
    return run.finish()


def assert_stopped_together(workdir, results, sig):
  """Both exited 0 after the same step, with one checkpoint of it; returns the step."""
  assert_exited_0(results)
  stopped = max(step_records(workdir))
  assert 3 <= stopped < STEPS
  assert f'stopped by SIGTERM after step {stopped}: saved' in results[0][1]
  for i, (_, _, stderr) in enumerate(results):
    name = sig.name if i == 1 else 'SIGTERM'  # the others learn of it as JAX's SIGTERM
    assert f'process {i} of 2: all processes stop after step {stopped} ({name})' in stderr
  assert step_dirs(workdir) == [str(stopped)]
  assert data_files(workdir, stopped) == ['process_0-of-2.json', 'process_1-of-2.json']
  return stopped


def test_two_processes_train_and_save_one_checkpoint(reference):
  workdir, records, results = reference
  assert_exited_0(results)
  assert '4 cpu device(s), mesh data=4 x fsdp=1 x tensor=1' in results[0][1]
  assert f'done: step {STEPS}' in results[0][1]
  assert 'done:' not in results[1][1]  # only process 0 prints the run's messages
  assert sorted(records) == list(range(1, STEPS + 1))
  assert all(math.isfinite(x) for r in records.values() for x in r)
  assert records[STEPS][0] < records[1][0] - 0.5  # it learns
  assert step_dirs(workdir) == [str(STEPS)]
  assert data_files(workdir, STEPS) == ['process_0-of-2.json', 'process_1-of-2.json']


def test_sigterm_to_one_process_stops_all_at_one_step_and_the_resume_is_exact(
    reference, overrides, env, tmp_path
):
  workdir = str(tmp_path / 'run')
  stopped = assert_stopped_together(
      workdir, preempt(workdir, overrides, env, signal.SIGTERM), signal.SIGTERM
  )

  results = run_two(workdir, overrides, env)
  assert_exited_0(results)
  assert f'resumed from step {stopped}' in results[0][1]
  records, expected = step_records(workdir), reference[1]
  assert sorted(records) == list(range(1, STEPS + 1))
  for step in range(1, STEPS + 1):  # before the stop and after the resume
    assert records[step] == expected[step], step


@pytest.mark.slow  # SIGTERM above takes the same path; one process's SIGINT: test_checkpoint
def test_sigint_to_one_process_stops_all_at_one_step(overrides, env, tmp_path):
  """Ctrl-C in one process's terminal: its handler passes it on as JAX's SIGTERM."""
  workdir = str(tmp_path / 'run')
  assert_stopped_together(workdir, preempt(workdir, overrides, env, signal.SIGINT), signal.SIGINT)


# ------------------------------------------------- launch/local.sh and start-up errors

LOCAL_STEPS = 6


def local_run(workdir, overrides, env, processes, cpu_devices, extra=()):
  flags = {**overrides, 'train.steps': LOCAL_STEPS, **dict(extra)}
  argv = [
      'bash',
      os.path.join(REPO, 'launch', 'local.sh'),
      '--processes',
      str(processes),
      '--cpu-devices',
      str(cpu_devices),
      '--',
      '--config=configs/tiny.py',
      f'--workdir={workdir}',
      *[f'--config.{k}={v}' for k, v in flags.items()],
  ]
  result = subprocess.run(
      argv,
      cwd=REPO,
      env=dict(env, PYTHON=sys.executable),
      capture_output=True,
      text=True,
      timeout=TIMEOUT,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result


@pytest.mark.slow  # two whole runs; local.sh's command lines are checked in test_launch
def test_local_sh_two_processes_of_4_devices_log_the_losses_of_one_process_of_8(
    overrides, env, tmp_path
):
  one = {k: v for k, v in overrides.items() if k != 'mesh.dcn_data'}
  single = local_run(str(tmp_path / 'one'), one, env, processes=1, cpu_devices=8)
  double = local_run(str(tmp_path / 'two'), overrides, env, processes=2, cpu_devices=4)
  assert '8 cpu device(s), mesh data=8 x fsdp=1 x tensor=1' in single.stdout
  assert '8 cpu device(s), mesh data=8 x fsdp=1 x tensor=1' in double.stdout
  assert os.path.exists(tmp_path / 'two' / 'logs' / 'process_1.log')
  want, got = step_records(str(tmp_path / 'one')), step_records(str(tmp_path / 'two'))
  assert sorted(want) == sorted(got) == list(range(1, LOCAL_STEPS + 1))
  for step in want:  # the same global batch and mesh; only the collectives' order differs
    np.testing.assert_allclose(got[step], want[step], rtol=1e-6, err_msg=f'step {step}')


def test_an_unreachable_coordinator_is_named_with_the_rank(env, tmp_path):
  port = portpicker.pick_unused_port()  # nobody listens there
  result = subprocess.run(
      [
          sys.executable,
          '-m',
          'euro_lm.train',
          '--config=configs/tiny.py',
          f'--workdir={tmp_path}',
          '--config.distributed.initialize=always',
          f'--config.distributed.coordinator_address=127.0.0.1:{port}',
          '--config.distributed.num_processes=2',
          '--config.distributed.process_id=1',
          '--config.distributed.initialization_timeout=2',
      ],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert result.returncode == 1
  assert (
      f'error: process 1 of 2 could not reach the coordinator 127.0.0.1:{port} within '
      '2 s (distributed.initialization_timeout)'
  ) in result.stderr


def test_processes_with_different_device_counts_are_refused(overrides, env, tmp_path):
  port = portpicker.pick_unused_port()
  processes = [
      subprocess.Popen(
          [
              sys.executable,
              '-m',
              'euro_lm.train',
              '--config=configs/tiny.py',
              f'--workdir={tmp_path}',
              '--config.distributed.initialize=always',
              f'--config.distributed.coordinator_address=127.0.0.1:{port}',
              '--config.distributed.num_processes=2',
              f'--config.distributed.process_id={i}',
          ],
          cwd=REPO,
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
          env=dict(env, XLA_FLAGS=f'--xla_force_host_platform_device_count={n}'),
      )
      for i, n in enumerate((4, 2))
  ]
  try:
    results = [p.communicate(timeout=120) for p in processes]
  finally:
    for p in processes:
      p.kill()
  for p, (_, stderr) in zip(processes, results):
    assert p.returncode == 1, stderr[-2000:]
    assert (
        'error: the processes see different numbers of devices (process 0: 4, process 1: 2)'
    ) in stderr
  assert not os.path.exists(tmp_path / 'checkpoints')
