"""`python -m euro_lm.bench.checkpoint --config=configs/llama_125m.py [--config.a.b=v ...]`

What checkpointing costs a run, measured on the real sharded train step and the real
`Checkpointer` (Orbax, async), on synthetic tokens. Prints one table:
- step: median train step time without saving;
- blocking: how long `save()` holds the training loop (the finiteness check and the copy of
  the state off the devices), alone and as a share of one step;
- write: seconds from `save()` until the checkpoint is complete on disk, and MB/s, with
  nothing else running; then the time of a step taken while a save is being written (the
  step and the writer share the host);
- restore: seconds and MB/s onto the abstract state, as a resumed run does;
- resume to first step: restore + compile + one step, the part of a resumed run's start-up
  that grows with the model (process start and the data pipeline come on top);
- checksums: recording (CRC-32 of every file, part of each save) and verifying them (part
  of each restore), each timed alone on the last saved step and as a share of the save
  until on disk and of the restore.
"""

import os
import statistics
import tempfile
import time

import jax
import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from euro_lm import checksums, cli
from euro_lm.bench.synthetic import compile_train_step
from euro_lm.checkpoint import Checkpointer
from euro_lm.data.streams import PackedStreams
from euro_lm.model import Decoder
from euro_lm.train.optimizer import make_optimizer
from euro_lm.train.state import abstract_train_state

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps without a save (after 1 warm-up step).')
_SAVES = flags.DEFINE_integer('saves', 3, 'Timed saves (the first is also timed: no warm-up).')
_DIRECTORY = flags.DEFINE_string('directory', None, 'Where to write (default: a temp dir).')


def data_iterator(config):
  """A real PackedStreams over random documents: the data item a checkpoint carries."""
  rng = np.random.default_rng(0)
  docs = [rng.integers(3, config.model.vocab_size, 200, dtype=np.int32) for _ in range(50)]
  batch = config.train.global_batch_size // jax.process_count()
  return PackedStreams(
      {'eng_Latn': docs},
      lambda step: {'eng_Latn': 1.0},
      mean_document_tokens={'eng_Latn': 200.0},
      seq_len=config.train.seq_len,
      num_streams=batch,
      streams=range(batch),
      seed=0,
      bos_id=1,
      eos_id=2,
  )


def run(config, directory):
  compiled, state, batch, mesh, rules, compile_seconds = compile_train_step(config)
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  iterator = data_iterator(config)

  def step(state):
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    return state

  def timed_steps(state, n):
    times = []
    for _ in range(n):
      start = time.perf_counter()
      state = step(state)
      times.append(time.perf_counter() - start)
    return state, statistics.median(times)

  state = step(state)  # warm-up
  state, step_seconds = timed_steps(state, _STEPS.value)
  checkpointer = Checkpointer(os.path.join(directory, 'checkpoints'), keep=2)
  blocking, writing = [], []
  for i in range(_SAVES.value):  # the write alone: its rate with the host otherwise idle
    start = time.perf_counter()
    checkpointer.save(i + 1, state, iterator, config)
    blocking.append(time.perf_counter() - start)
    checkpointer.wait()
    writing.append(time.perf_counter() - start)
  checkpointer.save(_SAVES.value + 1, state, iterator, config)
  state, step_while_writing = timed_steps(state, 1)  # as in the loop: train on meanwhile
  checkpointer.close()
  model = Decoder(config.model)
  tx, _ = make_optimizer(config.optimizer, config.train.steps)
  abstract, _ = abstract_train_state(model, tx, config.train.seq_len, mesh, rules)
  restorer = Checkpointer(os.path.join(directory, 'checkpoints'))
  start = time.perf_counter()
  restored = restorer.restore(restorer.latest_step(), abstract, data_iterator(config), config, None)
  jax.block_until_ready(restored)
  restore_seconds = time.perf_counter() - start
  restorer.close()
  first_step = timed_steps(restored, 1)[1]
  step_dir = restorer.step_directory(restorer.latest_step())
  start = time.perf_counter()
  checksums.digest(step_dir, checksums.item_files(step_dir))
  record_seconds = time.perf_counter() - start
  start = time.perf_counter()
  assert checksums.verify(step_dir) is None
  verify_seconds = time.perf_counter() - start

  block = statistics.median(blocking)
  write = statistics.median(writing)
  mb = state_bytes / 1e6
  checksum_mb = (
      sum(os.path.getsize(os.path.join(step_dir, f)) for f in checksums.item_files(step_dir)) / 1e6
  )
  rows = [
      ('state size', f'{mb:,.0f} MB'),
      ('step (no save)', f'{step_seconds:.3f} s'),
      ('save: blocking', f'{block:.3f} s = {100 * block / step_seconds:.1f}% of a step'),
      ('save: until on disk', f'{write:.2f} s = {mb / write:,.0f} MB/s'),
      ('step while a save is written', f'{step_while_writing:.3f} s'),
      ('restore', f'{restore_seconds:.2f} s = {mb / restore_seconds:,.0f} MB/s'),
      (
          'resume to first step',
          f'{restore_seconds + compile_seconds + first_step:.1f} s '
          f'(restore {restore_seconds:.1f} + compile {compile_seconds:.1f} + step '
          f'{first_step:.1f})',
      ),
      (
          'checksums: record (in each save)',
          f'{record_seconds:.3f} s for {checksum_mb:,.0f} MB = '
          f'{100 * record_seconds / write:.1f}% of the save until on disk',
      ),
      (
          'checksums: verify (in each restore)',
          f'{verify_seconds:.3f} s = {100 * verify_seconds / restore_seconds:.1f}% of the restore',
      ),
  ]
  print(
      f'\n{jax.device_count()} x {jax.devices()[0].device_kind}, '
      f'{config.train.global_batch_size} x {config.train.seq_len} tokens per step, '
      f'{_SAVES.value} saves\n'
  )
  print('| measure | value |\n|---|---|')
  for name, value in rows:
    print(f'| {name} | {value} |')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if _DIRECTORY.value:
    os.makedirs(_DIRECTORY.value, exist_ok=True)
    run(_CONFIG.value, _DIRECTORY.value)
  else:
    with tempfile.TemporaryDirectory() as directory:
      run(_CONFIG.value, directory)


if __name__ == '__main__':
  cli.run(main)
