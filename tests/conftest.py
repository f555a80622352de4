"""Test setup: 8 fake CPU devices, so sharded code runs on meshes like (2, 2, 2), and one
persistent compilation cache for the session."""

import atexit
import os
import shutil
import tempfile

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Many tests, and the training processes they start (which inherit the environment),
# compile the same tiny model's steps: from the second time on, they load the executable.
# Every executable, however quick to compile: a training process also compiles ~80 small
# ones (initialisation, checkpoint saves), ~3 s of each process's start on 2 cores.
# A cold cache each session, so nothing carries over between runs.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache = tempfile.mkdtemp(prefix='euro_lm_tests_jax_cache_')
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

import jax  # noqa: E402  (after XLA_FLAGS on purpose)

jax.config.update('jax_threefry_partitionable', True)

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def small_run(tmp_path_factory):
  """A two-step run of a 1-layer, 64-wide model on en, fr and de (sequences of 32 tokens),
  checkpointed at step 2, whose final validation covers every held-out document
  (eval_batches=0): tests/test_evaluate.py scores it, tests/test_generate.py samples it."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from euro_lm.train.loop import train  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path_factory.mktemp('small_run'))
  config = tiny.get_config()
  config.update_from_flattened_dict(
      {
          'model.num_layers': 1,
          'model.vocab_size': 1024,
          'model.embed_dim': 64,
          'model.mlp_dim': 128,
          'data.languages': 'en,fr,de',
          'train.steps': 2,
          'train.global_batch_size': 8,
          'train.seq_len': 32,
          'train.log_every': 1,
          'train.eval_every': 2,
          'train.eval_batches': 0,
          'train.checkpoint_every': 2,
          'optimizer.warmup_steps': 1,
      }
  )
  train(config, workdir)
  return workdir
