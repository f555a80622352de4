"""The launch scripts (launch/): syntax, dry runs, and the SLURM requeue logic.

SLURM runs against a fake environment: SLURM_* variables set by hand, and fake `scontrol`
(expands `lrdn[0001-0002]`, logs its arguments) and `srun` (runs $FAKE_TRAIN) on PATH.
"""

import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = REPO / 'launch'
SBATCH = LAUNCH / 'slurm' / 'train.sbatch'

FAKE_SCONTROL = f"""#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG"
if [[ $1 == show && $2 == hostnames ]]; then
  exec {sys.executable} -c 'import re, sys
m = re.fullmatch(r"(\\w+)\\[(\\d+)-(\\d+)\\]", sys.argv[1])
print("\\n".join(f"{{m[1]}}{{i:0{{len(m[2])}}d}}" for i in range(int(m[2]), int(m[3]) + 1))
      if m else sys.argv[1].replace(",", "\\n"))' "$3"
fi
"""
FAKE_SRUN = """#!/usr/bin/env bash
echo "srun $*" >> "$FAKE_LOG"
exec bash "$FAKE_TRAIN"
"""
# A training stand-in: exits 0 on SIGTERM (like a checkpointing run), or by itself after
# $FAKE_STEPS_SECONDS when that is set (a run that reaches train.steps).
FAKE_TRAIN = """trap 'echo "fake training: SIGTERM, saved"; exit 0' TERM
touch "$FAKE_STARTED"
end=$((SECONDS + ${FAKE_STEPS_SECONDS:-60}))
while ((SECONDS < end)); do sleep 0.05; done
echo "fake training: finished"
"""


@pytest.fixture
def fake_slurm(tmp_path):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for name, text in (('scontrol', FAKE_SCONTROL), ('srun', FAKE_SRUN)):
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  (tmp_path / 'train.sh').write_text(FAKE_TRAIN)
  env = {
      k: v
      for k, v in os.environ.items()
      if not k.startswith(('SLURM_', 'CUDA_', 'ROCR_', 'HIP_', 'CONTAINER', 'MACHINE'))
  }
  env.update(
      PATH=f'{bin_dir}:{env["PATH"]}',
      SLURM_JOB_ID='1234',
      SLURM_JOB_NODELIST='lrdn[0001-0002]',
      SLURM_NNODES='2',
      SLURM_JOB_NUM_NODES='2',
      SLURM_GPUS_ON_NODE='4',
      SLURM_CPUS_ON_NODE='32',
      SLURM_SUBMIT_DIR=str(REPO),
      FAKE_LOG=str(tmp_path / 'calls.log'),
      FAKE_TRAIN=str(tmp_path / 'train.sh'),
      FAKE_STARTED=str(tmp_path / 'started'),
  )
  return env


def run(cmd, env=None, **kwargs):
  result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, **kwargs)
  assert result.returncode == 0, result.stdout + result.stderr
  return result.stdout


def dry_run_sbatch(env, *flags, **settings):
  env = dict(env, DRY_RUN='1', **settings)
  return run(['bash', str(SBATCH), 'configs/llama_1b.py', '/scratch/run1', *flags], env=env)


def test_scripts_parse():
  scripts = sorted(LAUNCH.rglob('*.sh')) + sorted(LAUNCH.rglob('*.sbatch'))
  assert len(scripts) >= 9
  for script in scripts:
    run(['bash', '-n', str(script)])


# JAX's port for job 1234: 1234 % 4096 + 61440 (jax/_src/clusters/slurm_cluster.py).
COORDINATOR = 'lrdn0001:62674'


def test_slurm_dry_run_one_process_per_node(fake_slurm):
  out = dry_run_sbatch(fake_slurm, '--config.train.steps=10', MACHINE='leonardo')
  assert 'machine: leonardo (cuda)' in out
  assert (
      f'job 1234: 2 node(s) x 1 process(es) (node mode), 4 GPU(s) per node, 2 processes, '
      f'coordinator {COORDINATOR}'
  ) in out
  assert (
      f'srun command: srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --cpus-per-task=32 '
      f'--kill-on-bad-exit=1 bash {REPO}/launch/slurm/rank.sh python3 -m euro_lm.train '
      f'--config=configs/llama_1b.py --workdir=/scratch/run1 --config.train.steps=10'
  ) in out
  for rank, node in ((0, 'lrdn0001'), (1, 'lrdn0002')):
    assert (
        f'rank {rank} of 2: node {node}, local rank 0, coordinator {COORDINATOR}, '
        f'CUDA_VISIBLE_DEVICES=0,1,2,3 JAX_LOCAL_DEVICE_IDS=0,1,2,3'
    ) in out
    assert (
        f'rank {rank} command: python3 -m euro_lm.train --config=configs/llama_1b.py '
        f'--workdir=/scratch/run1 --config.train.steps=10'
    ) in out
  assert len(re.findall(r'^rank \d+ command: ', out, re.M)) == 2
  assert (
      pathlib.Path(fake_slurm['FAKE_LOG']).read_text() == 'show hostnames lrdn[0001-0002]\n'
  )  # nothing else: no srun, no requeue


def test_slurm_dry_run_one_process_per_gpu(fake_slurm):
  out = dry_run_sbatch(fake_slurm, PROCS_PER_NODE='gpu')
  assert '2 node(s) x 4 process(es) (gpu mode), 4 GPU(s) per node, 8 processes' in out
  assert '--nodes=2 --ntasks=8 --ntasks-per-node=4 --cpus-per-task=8 ' in out
  for rank in range(8):
    node, local = ('lrdn0001', 'lrdn0002')[rank // 4], rank % 4
    assert (
        f'rank {rank} of 8: node {node}, local rank {local}, coordinator {COORDINATOR}, '
        f'CUDA_VISIBLE_DEVICES={local} JAX_LOCAL_DEVICE_IDS=0'
    ) in out
  assert len(re.findall(r'^rank \d+ command: ', out, re.M)) == 8


def test_slurm_dry_run_partial_node(fake_slurm):
  env = dict(
      fake_slurm,
      SLURM_GPUS_ON_NODE='',
      SLURM_GPUS_PER_NODE='a100:2',
      SLURM_CPUS_ON_NODE='16',
      CUDA_VISIBLE_DEVICES='2,3',
  )
  out = dry_run_sbatch(env, PROCS_PER_NODE='gpu')
  assert '2 node(s) x 2 process(es) (gpu mode), 2 GPU(s) per node, 4 processes' in out
  assert '--ntasks=4 --ntasks-per-node=2 --cpus-per-task=8 ' in out
  assert 'rank 1 of 4: node lrdn0001, local rank 1' in out
  assert 'CUDA_VISIBLE_DEVICES=3 JAX_LOCAL_DEVICE_IDS=0' in out
  out = dry_run_sbatch(env)
  assert 'rank 1 of 2: node lrdn0002, local rank 0, coordinator ' in out
  assert 'CUDA_VISIBLE_DEVICES=2,3 JAX_LOCAL_DEVICE_IDS=0,1' in out


def test_slurm_dry_run_container_and_lumi(fake_slurm):
  env = dict(fake_slurm, SLURM_GPUS_ON_NODE='8', SLURM_CPUS_ON_NODE='56')
  out = dry_run_sbatch(env, MACHINE='lumi', CONTAINER='/images/euro_lm.sif', BIND='/data')
  assert 'machine: lumi (rocm)' in out
  assert (
      f'rank 1 of 2: node lrdn0002, local rank 0, coordinator {COORDINATOR}, '
      f'ROCR_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7'
  ) in out
  assert (
      f'rank 1 command: apptainer exec --rocm --bind {REPO},/scratch/run1,/data '
      f'--pwd {REPO} /images/euro_lm.sif python3 -m euro_lm.train'
  ) in out
  out = dry_run_sbatch(env, MACHINE='lumi', PROCS_PER_NODE='gpu')
  assert 'ROCR_VISIBLE_DEVICES=7 JAX_LOCAL_DEVICE_IDS=0' in out
  out = dry_run_sbatch(fake_slurm, MACHINE='jupiter', CONTAINER='/i.sif')
  assert 'rank 0 command: apptainer exec --nv --bind ' in out


def test_slurm_submit_dry_run(fake_slurm):
  submit = str(LAUNCH / 'slurm' / 'submit.sh')
  args = [submit, 'marenostrum5', '--nodes=4', 'configs/llama_1b.py', '/scratch/run1']
  result = subprocess.run(args, env=fake_slurm, capture_output=True, text=True)
  assert result.returncode == 2 and 'set ACCOUNT' in result.stderr  # the placeholders
  env = dict(fake_slurm, DRY_RUN='1', ACCOUNT='ehpc01', QOS='acc_ehpc')
  assert run(args, env=env).strip() == (
      f'sbatch --partition=acc --account=ehpc01 --qos=acc_ehpc --gpus-per-node=4 '
      f'--export=ALL,MACHINE=marenostrum5 --nodes=4 {SBATCH} configs/llama_1b.py /scratch/run1'
  )


def start_batch_job(env, tmp_path):
  job = subprocess.Popen(
      ['bash', str(SBATCH), 'configs/tiny.py', str(tmp_path / 'run')],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
  )
  deadline = time.time() + 30
  while not os.path.exists(env['FAKE_STARTED']):
    assert job.poll() is None and time.time() < deadline, job.communicate()[0]
    time.sleep(0.05)
  return job


def test_slurm_requeue_on_time_limit_signal(fake_slurm, tmp_path):
  job = start_batch_job(fake_slurm, tmp_path)
  job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends
  out, _ = job.communicate(timeout=30)
  assert job.returncode == 0, out
  assert 'fake training: SIGTERM, saved' in out
  calls = pathlib.Path(fake_slurm['FAKE_LOG']).read_text().splitlines()
  assert calls[-1] == 'requeue 1234'
  assert any(call.startswith('srun --nodes=2 --ntasks=2 ') for call in calls)


def test_slurm_no_requeue_when_training_finishes(fake_slurm, tmp_path):
  job = start_batch_job(dict(fake_slurm, FAKE_STEPS_SECONDS='1'), tmp_path)
  out, _ = job.communicate(timeout=30)
  assert job.returncode == 0, out
  assert 'fake training: finished' in out
  calls = pathlib.Path(fake_slurm['FAKE_LOG']).read_text().splitlines()
  assert not any(call.startswith('requeue') for call in calls), calls


def test_local_dry_run(tmp_path):
  out = run(
      [
          str(LAUNCH / 'local.sh'),
          '--processes',
          '3',
          '--cpu-devices',
          '4',
          '--dry-run',
          '--',
          '--config=configs/tiny.py',
          f'--workdir={tmp_path}',
      ],
      env=dict(os.environ, PYTHON=sys.executable, XLA_FLAGS=''),
  )
  lines = out.strip().splitlines()
  assert len(lines) == 3
  addresses = set()
  for i, line in enumerate(lines):
    log = 'stdout' if i == 0 else f'{tmp_path}/logs/process_{i}.log'
    assert line.startswith(
        f'process {i} ({log}): env PYTHONUNBUFFERED=1 JAX_PLATFORMS=cpu '
        f'XLA_FLAGS=--xla_force_host_platform_device_count=4 '
        f'{sys.executable} -m euro_lm.train --config=configs/tiny.py '
    )
    assert line.endswith(
        ' --config.distributed.num_processes=3 ' f'--config.distributed.process_id={i}'
    )
    assert '--config.distributed.initialize=always' in line
    addresses.add(line.split('coordinator_address=')[1].split()[0])
  assert len(addresses) == 1 and addresses.pop().startswith('127.0.0.1:')


def test_local_needs_workdir():
  result = subprocess.run(
      [str(LAUNCH / 'local.sh'), '--dry-run', '--', '--config=x.py'], capture_output=True, text=True
  )
  assert result.returncode == 2 and '--workdir' in result.stderr


def test_tpu_vm_dry_run():
  tpu_vm = str(LAUNCH / 'tpu_vm.sh')
  flags = ['--', '--config=configs/llama_1b.py', '--workdir=gs://bucket/run1']
  out = run(
      [tpu_vm, '--tpu', 'v5p', '--zone', 'us-east5-a', '--dry-run', *flags],
      env=dict(os.environ, PYTHON='python3'),
  )
  assert out == (
      'gcloud compute tpus tpu-vm ssh v5p --zone=us-east5-a --worker=all '
      "--command='cd ~/euro_lm && PYTHONUNBUFFERED=1 python3 -m euro_lm.train "
      "--config=configs/llama_1b.py --workdir=gs://bucket/run1'\n"
  )
  out = run(
      [tpu_vm, '--tpu', 'qr', '--zone', 'z', '--slices', '2', '--dry-run', *flags],
      env=dict(os.environ, PYTHON='python3'),
  )
  lines = out.strip().splitlines()
  assert [line.split()[5] for line in lines] == ['qr-0', 'qr-1']
  assert all(line.endswith("gs://bucket/run1 --config.mesh.dcn_data=2'") for line in lines)
  out = run(
      [
          tpu_vm,
          '--tpu',
          'qr',
          '--zone',
          'z',
          '--slices',
          '2',
          '--dry-run',
          *flags,
          '--config.mesh.dcn_fsdp=2',
      ],
      env=dict(os.environ, PYTHON='python3'),
  )
  assert 'dcn_data' not in out


# A stand-in for the interpreter: `python -m euro_lm.train ... --config.distributed.process_id=I`
# fails with status 3 when I is in $FAIL_IDS, else waits for SIGTERM and exits 0.
FAKE_PYTHON = """#!/usr/bin/env bash
args="$*"
id=${args##*process_id=}
trap 'echo "process $id: SIGTERM"; exit 0' TERM
touch "$STARTED_DIR/$id"
[[ " $FAIL_IDS " == *" $id "* ]] && exit 3
for ((i = 0; i < 600; i++)); do sleep 0.05; done
"""


def start_local(tmp_path, **env):
  python = tmp_path / 'python'
  python.write_text(FAKE_PYTHON)
  python.chmod(0o755)
  (tmp_path / 'started').mkdir()
  env = dict(
      os.environ, PYTHON=str(python), PORT='12345', STARTED_DIR=str(tmp_path / 'started'), **env
  )
  return subprocess.Popen(
      [str(LAUNCH / 'local.sh'), '--processes', '3', '--', f'--workdir={tmp_path}/run'],
      env=env,
      text=True,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
  )


def test_local_one_failure_stops_all(tmp_path):
  job = start_local(tmp_path, FAIL_IDS='1')
  out, _ = job.communicate(timeout=30)
  assert job.returncode == 3, out
  assert 'process 1 failed (exit status 3)' in out


def test_local_forwards_sigterm(tmp_path):
  job = start_local(tmp_path, FAIL_IDS='')
  deadline = time.time() + 20
  while len(os.listdir(tmp_path / 'started')) < 3:
    assert time.time() < deadline
    time.sleep(0.05)
  job.send_signal(signal.SIGTERM)
  out, _ = job.communicate(timeout=30)
  assert job.returncode == 0, out
  assert 'process 0: SIGTERM' in out
  assert 'process 2: SIGTERM' in (tmp_path / 'run' / 'logs' / 'process_2.log').read_text()


def test_attention_ab_snapshot_is_a_self_contained_working_copy(tmp_path):
  """`attention_ab.py snapshot` renames a revision's kernels to euro_lm_before: importing
  them loads nothing of euro_lm (so the A/B times two different kernels), and they agree
  with a float64 reference."""
  subprocess.run(
      [sys.executable, str(LAUNCH / 'attention_ab.py'), 'snapshot', 'HEAD', str(tmp_path)],
      check=True,
      cwd=REPO,
      capture_output=True,
  )
  check = """
import sys
import numpy as np, jax, jax.numpy as jnp
from euro_lm_before.kernels import flash_attention
q, k, v = (jax.random.normal(key, (1, 128, 2, 64), jnp.float32)
           for key in jax.random.split(jax.random.key(0), 3))
out = flash_attention(q, k, v, causal=True, backend='gpu')
qd, kd, vd = (np.asarray(x, np.float64) for x in (q, k, v))
scores = np.einsum('bqhd,bkhd->bhqk', qd, kd) / 8 + np.triu(np.full((128, 128), -np.inf), 1)
p = np.exp(scores - scores.max(-1, keepdims=True))
expected = np.einsum('bhqk,bkhd->bqhd', p / p.sum(-1, keepdims=True), vd)
np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=2e-5)
assert not [m for m in sys.modules if m == 'euro_lm' or m.startswith('euro_lm.')]
print('ok')
"""
  result = subprocess.run(
      [sys.executable, '-c', check],
      cwd=tmp_path,
      capture_output=True,
      text=True,
      env={**os.environ, 'PYTHONPATH': str(tmp_path)},
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().endswith('ok')
