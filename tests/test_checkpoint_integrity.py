"""Faults injected into real runs of `python -m euro_lm.train`: flipped bytes in a checkpoint,
a deleted item, a save that fails, a metrics file on a full disk, a torn metrics line, a
half-deleted step and SIGTERM during start-up. Each must end in one `error:` line (or one
note) naming what happened, with no traceback, and lose nothing that was saved.

The reference is one uninterrupted 10-step run (checkpoints at steps 5 and 10).
"""

import contextlib
import glob
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys

import pytest
import xxhash
from run_records import step_records

from euro_lm import checksums
from euro_lm.checkpoint import Checkpointer, CheckpointError, load_params
from euro_lm.metrics import MetricsWriteError, MetricWriter
from euro_lm.results import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 10
FLAGS = [
    '--config=configs/tiny.py',
    '--config.model.num_layers=2',
    '--config.optimizer.warmup_steps=5',
    '--config.train.global_batch_size=8',
    '--config.train.seq_len=64',
    '--config.train.log_every=1',
    '--config.train.eval_every=0',
    '--config.train.checkpoint_every=5',
    # Five languages, not tiny's 36: each run's final validation is 10 batches, not 72.
    '--config.data.languages=deu_Latn,ell_Grek,bul_Cyrl,gle_Latn,fra_Latn',
]


def command(workdir, *extra, steps=STEPS):
  return [
      sys.executable,
      '-m',
      'euro_lm.train',
      *FLAGS,
      f'--config.train.steps={steps}',
      f'--workdir={workdir}',
      *extra,
  ]


def env():
  return dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')


def train(workdir, *extra, steps=STEPS, preexec_fn=None):
  return subprocess.run(
      command(workdir, *extra, steps=steps),
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=600,
      env=env(),
      preexec_fn=preexec_fn,
  )


def error_lines(result):
  """The run's stderr lines but the progress bar's, asserting there is no traceback."""
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  lines = [line.split('\r')[-1].strip() for line in result.stderr.split('\n')]
  return [line for line in lines if line and '%|' not in line]


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """The uninterrupted run; `done` must come only once its last step is on disk."""
  workdir = tmp_path_factory.mktemp('reference')
  process = subprocess.Popen(
      command(workdir),
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=env(),
  )
  committed_at_done = None
  for line in process.stdout:
    if line.startswith('done: step'):
      committed_at_done = checksums.recorded(os.path.join(workdir, 'checkpoints', str(STEPS)))
  assert process.wait() == 0, process.stderr.read()[-3000:]
  assert committed_at_done is True
  return str(workdir), step_records(workdir)


def copy_run(reference, tmp_path, steps=(5, 10)):
  workdir = tmp_path / 'run'
  os.makedirs(workdir / 'checkpoints')
  shutil.copy(os.path.join(reference, 'tokenizer.model'), workdir)
  for step in steps:
    shutil.copytree(
        os.path.join(reference, 'checkpoints', str(step)), workdir / 'checkpoints' / str(step)
    )
  return workdir


def largest_array_file(step_dir):
  files = glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True)
  return max(files, key=os.path.getsize)


def flip_16_bytes(path):
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    data = f.read(16)
    f.seek(-16, os.SEEK_CUR)
    f.write(bytes(b ^ 0xFF for b in data))


def test_every_file_of_a_step_has_its_digests(reference):
  step_dir = os.path.join(reference[0], 'checkpoints', str(STEPS))
  with open(os.path.join(step_dir, checksums.FILE)) as f:
    recorded = json.load(f)['files']
  assert set(recorded) == set(checksums.item_files(step_dir))
  assert {name.split(os.sep)[0] for name in recorded} == {
      'state',
      'data',
      'config',
      'tokenizer',
      'records',
  }
  for name, entry in recorded.items():  # xxh3 of each 64 MiB block, computed here apart
    with open(os.path.join(step_dir, name), 'rb') as f:
      data = f.read()
    assert entry['size'] == len(data)
    blocks = range(0, len(data), checksums.BLOCK_BYTES)
    expected = [xxhash.xxh3_64_intdigest(data[i : i + checksums.BLOCK_BYTES]) for i in blocks]
    assert entry['digests'] == expected


def test_flipped_bytes_are_refused_naming_the_newest_intact_step(reference, tmp_path):
  workdir = copy_run(reference[0], tmp_path)
  damaged = largest_array_file(workdir / 'checkpoints' / '10')
  flip_16_bytes(damaged)
  result = train(workdir, steps=12)
  assert result.returncode == 1
  assert error_lines(result) == [
      f'error: checkpoint step 10 in {workdir}/checkpoints/10 is corrupt: '
      f'{os.path.relpath(damaged, workdir / "checkpoints" / "10")}: content differs from its '
      f'checksum (bytes 0..{os.path.getsize(damaged)}); the newest intact checkpoint is step 5: '
      'set train.resume_fallback=True to resume from it (the corrupt steps are then moved '
      f'to {workdir}/corrupt_checkpoints)'
  ]
  assert os.path.isdir(workdir / 'checkpoints' / '10')  # nothing moved without the flag


def test_the_fallback_resumes_exactly_from_the_newest_intact_step(reference, tmp_path):
  workdir = copy_run(reference[0], tmp_path)
  flip_16_bytes(largest_array_file(workdir / 'checkpoints' / '10'))
  result = train(workdir, '--config.train.resume_fallback=True', steps=STEPS)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Resuming from step 5 instead (train.resume_fallback=True)' in result.stdout
  assert os.path.isdir(workdir / 'corrupt_checkpoints' / '10')  # kept for inspection
  records = step_records(workdir)
  assert [records[s] for s in range(6, STEPS + 1)] == [reference[1][s] for s in range(6, 11)]


def test_a_deleted_tokenizer_item_names_the_step(reference, tmp_path):
  workdir = copy_run(reference[0], tmp_path, steps=(10,))
  shutil.rmtree(workdir / 'checkpoints' / '10' / 'tokenizer')
  result = train(workdir, steps=12)
  assert result.returncode == 1
  (line,) = error_lines(result)
  assert line.startswith(f'error: checkpoint step 10 in {workdir}/checkpoints/10 is corrupt: ')
  assert 'tokenizer/tokenizer.model is missing; no older checkpoint is intact' in line


def limit_file_size():
  resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))  # Python ignores SIGXFSZ


@pytest.mark.parametrize('policy', ['stop', 'retry'])
def test_a_failed_save_stops_the_run_at_the_next_step(reference, tmp_path, policy):
  workdir = copy_run(reference[0], tmp_path, steps=(10,))
  result = train(
      workdir,
      f'--config.train.save_failure={policy}',
      '--config.train.checkpoint_every=2',
      steps=40,
      preexec_fn=limit_file_size,
  )
  assert result.returncode == 1
  lines = error_lines(result)
  assert len(lines) == 1, lines
  (line,) = lines
  assert line.startswith('error: saving checkpoint step 1')
  assert 'File too large' in line and 'B free there' in line
  assert f'step 10 in {workdir}/checkpoints is the newest complete checkpoint and is intact' in line
  stopped = int(line.rsplit('Stopped at step ', 1)[1].rstrip('.'))
  # Step 12's save fails in the background; the run stops once that is known, at the latest
  # when step 14's save waits for it, not a checkpoint interval or the whole run later.
  if policy == 'stop':
    assert line.startswith('error: saving checkpoint step 12 to ') and 12 < stopped <= 14
  else:
    assert 'saving checkpoint step 12 to' in result.stdout
    assert 'Retrying once, with step 1' in result.stdout and 12 < stopped <= 18
  assert max(step_records(workdir)) in (stopped - 1, stopped)
  assert [s for s in os.listdir(workdir / 'checkpoints') if s.isdigit()] == ['10']
  assert checksums.verify(str(workdir / 'checkpoints' / '10')) is None


def test_a_metrics_file_on_a_full_disk_stops_with_a_final_save(reference, tmp_path):
  workdir = copy_run(reference[0], tmp_path, steps=(10,))
  os.symlink('/dev/full', workdir / 'metrics.jsonl')  # every write: ENOSPC, even for root
  result = train(workdir, steps=STEPS + 5)
  assert result.returncode == 1
  (line,) = error_lines(result)
  saved = sorted(int(s) for s in os.listdir(workdir / 'checkpoints') if s.isdigit())
  assert saved[0] == 10 and len(saved) == 2
  assert line == (
      f'error: cannot write {workdir}/metrics.jsonl: No space left on device; stopping at '
      f'step {saved[1]}. The newest checkpoint is step {saved[1]} in {workdir}/checkpoints; '
      'run the same command to resume once the disk has space'
  )
  assert checksums.verify(str(workdir / 'checkpoints' / str(saved[1]))) is None


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  whole = '{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.25}\n'
  path.write_text(whole + '{"step": 3, "lo')
  notes = []
  writer = MetricWriter(str(tmp_path), tensorboard=False, log=notes.append)
  writer.write(3, {'loss': 2.0})
  writer.close()
  assert path.read_text() == whole + '{"step": 3, "loss": 2.0}\n'
  assert notes == [f'{path}: dropped a torn last line (15 bytes) left by a stopped run']
  assert [r['loss'] for r in read_metrics(str(path))] == [2.5, 2.25, 2.0]


def test_a_half_deleted_step_is_cleaned_up_once(reference, tmp_path):
  workdir = copy_run(reference[0], tmp_path)
  step_dir = workdir / 'checkpoints' / '5'
  for name in ('_CHECKPOINT_METADATA', 'state'):  # as a deletion killed midway leaves it
    path = step_dir / name
    shutil.rmtree(path) if path.is_dir() else path.unlink()
  imported = workdir / 'checkpoints' / '0'  # as import_hf writes one: state/ alone, kept
  shutil.copytree(workdir / 'checkpoints' / '10' / 'state', imported / 'state')
  notes = []
  Checkpointer(workdir / 'checkpoints', log=notes.append).close()
  assert notes == [
      f'checkpoint step 5 in {workdir}/checkpoints was being deleted when a run stopped '
      '(no _CHECKPOINT_METADATA): finished deleting it'
  ]
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['0', '10']
  notes.clear()
  checkpointer = Checkpointer(workdir / 'checkpoints', log=notes.append)
  assert checkpointer.all_steps() == [0, 10] and notes == []
  checkpointer.close()


def test_sigterm_during_start_up_exits_143_with_a_message(reference, tmp_path):
  workdir = copy_run(reference[0], tmp_path, steps=(10,))
  process = subprocess.Popen(
      command(workdir, steps=20),
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=env(),
  )
  first = process.stdout.readline()  # printed once the watch is installed
  assert first.startswith('euro_lm: ')
  process.send_signal(signal.SIGTERM)
  out, err = process.communicate(timeout=300)
  assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
  assert 'Traceback' not in err
  assert (
      'stopped by SIGTERM during start-up, before the first step: nothing new to save. The '
      f'newest checkpoint is step 10 in {workdir}/checkpoints. Run the same command to resume.'
  ) in out
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['10']


@contextlib.contextmanager
def tmpfs(path, size):
  """A tmpfs of `size` mounted at `path` (made), or the test skipped where mounting is refused."""
  path.mkdir()
  result = subprocess.run(
      ['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
      capture_output=True,
      text=True,
  )
  if result.returncode:
    pytest.skip(f'cannot mount a small tmpfs here: {result.stderr.strip() or result.returncode}')
  try:
    yield path
  finally:
    subprocess.run(['umount', '-l', str(path)], check=False)


@pytest.fixture
def small_filesystem(tmp_path):
  """48 MB: room for the tokenizer and one checkpoint of the 2-layer model, not two."""
  with tmpfs(tmp_path / 'small', '48m') as path:
    yield path


def test_a_full_disk_ends_in_one_line_and_keeps_the_checkpoint(reference, small_filesystem):
  workdir = copy_run(reference[0], small_filesystem, steps=(10,))
  result = train(workdir, steps=30)
  assert result.returncode == 1
  (line,) = error_lines(result)
  # The save of step 15 or a metrics write finds the disk full first: either is one line.
  assert line.startswith('error: ') and 'No space left on device' in line, line
  assert checksums.verify(str(workdir / 'checkpoints' / '10')) is None


def test_a_damaged_step_without_digests_is_one_line_too(reference, tmp_path):
  """A checkpoint saved before digests existed: Orbax's own read error, in one line, with no
  TensorStore spec and no 'Event loop is closed' from the reads it leaves behind."""
  workdir = copy_run(reference[0], tmp_path)
  os.remove(workdir / 'checkpoints' / '10' / checksums.FILE)
  damaged = largest_array_file(workdir / 'checkpoints' / '10')
  with open(damaged, 'r+b') as f:
    f.truncate(os.path.getsize(damaged) // 2)
  result = train(workdir, steps=12)
  assert result.returncode == 1
  assert 'Event loop is closed' not in result.stderr
  (line,) = error_lines(result)
  assert line.startswith(f'error: checkpoint step 10 in {workdir}/checkpoints/10 cannot be read (')
  assert line.endswith('; if it is damaged, move it away to resume from step 5')
  assert 'checkpoint step 10 has no checksums.json' in result.stdout


def test_init_from_refuses_a_corrupt_checkpoint(reference, tmp_path):
  workdir = copy_run(reference[0], tmp_path, steps=(10,))
  flip_16_bytes(largest_array_file(workdir / 'checkpoints' / '10'))
  with pytest.raises(CheckpointError, match=r'checkpoint \S+/10 is corrupt: state/\S+: content'):
    load_params(str(workdir), abstract_params=None)  # refused before the parameters matter


def read_events(path):
  """(step, {tag: value}) of each whole record of a TensorBoard events file (TFRecord
  framing); a record the full disk cut short is left out, as TensorBoard does."""
  from tensorboardX.proto import event_pb2

  with open(path, 'rb') as f:
    data = f.read()
  events, offset = [], 0
  while offset + 8 <= len(data):
    (length,) = struct.unpack('<Q', data[offset : offset + 8])
    if offset + 12 + length + 4 > len(data):
      break
    event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
    events.append((event.step, {v.tag: v.simple_value for v in event.summary.value}))
    offset += 12 + length + 4
  return events


def test_a_full_tensorboard_disk_is_one_error_naming_it(tmp_path):
  with tmpfs(tmp_path / 'tensorboard', '8k'):
    writer = MetricWriter(str(tmp_path))
    with pytest.raises(MetricsWriteError) as error:
      for step in range(1, 1000):
        writer.write(step, {f'tokens/lang{i}': float(i) for i in range(50)})
    assert str(error.value) == f'cannot write {tmp_path}/tensorboard: No space left on device'
    writer.close()  # the failure was reported once; closing does not raise it again
    (events,) = glob.glob(str(tmp_path / 'tensorboard' / 'events.out.tfevents.*'))
    written = read_events(events)[1:]  # after the file's header event
    assert written and [s for s, _ in written] == list(range(1, len(written) + 1))
    assert written[0][1] == {f'tokens/lang{i}': float(i) for i in range(50)}
  with open(tmp_path / 'metrics.jsonl') as f:
    assert len(f.readlines()) >= len(written)


def test_asyncio_reports_of_orbax_writes_a_failed_save_leaves_are_dropped(tmp_path):
  """A failed save is one error line (above); its other gathered writes fail too, and asyncio
  logs each as a never-retrieved exception that names only the OCDBT database, when it is
  collected (under load, late enough to reach stderr). Other asyncio errors still show."""
  import asyncio  # pylint: disable=import-outside-toplevel
  import logging  # pylint: disable=import-outside-toplevel

  Checkpointer(tmp_path / 'checkpoints').close()  # installs the filters
  seen = []
  handler = logging.Handler()
  handler.emit = seen.append
  logger = logging.getLogger('asyncio')
  logger.addHandler(handler)
  try:
    for message in (
        'OUT_OF_RANGE: Error writing "opt_state.mu/0" in OCDBT database at local file "x/": '
        'Failed to write 7012352 bytes to file 6: File too large',
        'an asyncio error of the user',
    ):
      loop = asyncio.new_event_loop()
      future = loop.create_future()
      future.set_exception(ValueError(message))
      loop.default_exception_handler(
          {
              'message': '_GatheringFuture exception was never retrieved',
              'exception': future.exception(),
              'future': future,
          }
      )
      loop.close()
  finally:
    logger.removeHandler(handler)
  assert [str(r.exc_info[1]) for r in seen] == ['an asyncio error of the user']
