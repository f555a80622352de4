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
# A cold cache each session, so nothing carries over between runs.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache = tempfile.mkdtemp(prefix='euro_lm_tests_jax_cache_')
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.3')

import jax  # noqa: E402  (after XLA_FLAGS on purpose)

jax.config.update('jax_threefry_partitionable', True)
