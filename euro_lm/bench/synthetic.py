"""The real sharded train step, compiled ahead of time, on synthetic tokens: what the
benchmarks time without a data pipeline in the way; and the measured matmul rate that CPU
figures are a share of."""

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from euro_lm import devices, host_memory
from euro_lm.config import validate
from euro_lm.model import Decoder
from euro_lm.sharding import global_batch, logical_rules, make_mesh
from euro_lm.train.optimizer import make_optimizer
from euro_lm.train.state import create_train_state
from euro_lm.train.step import make_train_step


def synthetic_batch(config, seed=0):
  t, vocab = config.train, config.model.vocab_size
  rng = np.random.default_rng(seed)
  local = t.global_batch_size // jax.process_count()
  tokens = rng.integers(0, vocab, (local, t.seq_len + 1), dtype=np.int32)
  return {
      'inputs': tokens[:, :-1],
      'targets': tokens[:, 1:],
      'segment_ids': np.ones((local, t.seq_len), np.int32),
      'positions': np.broadcast_to(np.arange(t.seq_len, dtype=np.int32), (local, t.seq_len)).copy(),
  }


def compile_train_step(config):
  """Returns (compiled step, state, batch, mesh, rules, compile seconds)."""
  host_memory.configure_before_backend(config.hardware.keep_freed_host_memory)
  validate(config, jax.device_count(), jax.process_count(), devices.describe())
  mesh, rules = make_mesh(config.mesh), logical_rules(config.mesh)
  model = Decoder(config.model)
  tx, schedule = make_optimizer(config.optimizer, config.train.steps)
  state, shardings = create_train_state(
      model, tx, config.train.seq_len, jax.random.key(0), mesh, rules
  )
  step = make_train_step(
      model, tx, schedule, config.train, config.optimizer.z_loss, mesh, shardings
  )
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    batch = global_batch(synthetic_batch(config), mesh, rules)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    seconds = time.perf_counter() - start
  return compiled, state, batch, mesh, rules, seconds


def measured_matmul_flops(n=2048, repeats=10):
  """FLOP/s of an n x n float32 matmul through XLA on the default device (best of N)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best
