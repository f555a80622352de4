"""`python -m euro_lm.kernels.bench`: attention TFLOP/s on one GPU, ours against cuDNN and XLA.

For L in {2k, 4k, 8k}, D = 128, bf16, causal, ~16k tokens per batch: checks each
implementation against XLA first (relative error of output and gradients), then times
forward and forward+backward (median of timed runs after warm-up). Causal FLOPs are halved:
forward 2 * 2 * B * H * L^2 * D / 2, backward 2.5x the forward (as FlashAttention counts).
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from euro_lm.kernels import flash_attention

_LENGTHS = flags.DEFINE_list('lengths', ['2048', '4096', '8192'], 'Sequence lengths.')
_HEADS = flags.DEFINE_integer('heads', 16, 'Query heads.')
_KV_HEADS = flags.DEFINE_integer('kv_heads', 16, 'Key/value heads.')
_HEAD_DIM = flags.DEFINE_integer('head_dim', 128, 'Head dimension.')
_TOKENS = flags.DEFINE_integer('tokens', 16384, 'Tokens per batch (batch = tokens / L).')
_SWEEP = flags.DEFINE_bool('sweep', False, 'Time our kernel over SWEEP block sizes instead.')

# Candidates for --sweep: (block_q, block_k, block_q_bwd, block_k_bwd, num_warps, num_stages).
SWEEP = [(128, 64, 64, 64, 8, 2), (128, 128, 64, 64, 8, 2), (128, 64, 64, 64, 4, 3),
         (128, 128, 128, 64, 8, 3), (64, 64, 64, 64, 4, 2), (128, 64, 64, 128, 8, 2),
         (128, 64, 128, 128, 8, 2), (128, 128, 64, 64, 8, 3)]


def implementations():
  def cudnn(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='cudnn')

  def xla(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='xla')

  def ours(q, k, v):
    return flash_attention(q, k, v, causal=True)

  return {'euro_lm pallas': ours, 'cudnn': cudnn, 'xla': xla}


def timed(fn, *args, repeats=10):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def sweep(length):
  """Forward and forward+backward times of our kernel for each SWEEP block size."""
  from euro_lm.kernels import BlockSizes
  batch = max(_TOKENS.value // length, 1)
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (batch, length, _HEADS.value, _HEAD_DIM.value), jnp.bfloat16)
  k, v = (jax.random.normal(x, (batch, length, _KV_HEADS.value, _HEAD_DIM.value), jnp.bfloat16)
          for x in keys[1:3])
  d_out = jax.random.normal(keys[3], q.shape, jnp.bfloat16)
  flops = 2 * 2 * batch * _HEADS.value * length * length * _HEAD_DIM.value / 2
  print('| blocks (q, k, q_bwd, k_bwd, warps, stages) | fwd TFLOP/s | fwd+bwd TFLOP/s |\n|---|---|---|')
  for candidate in SWEEP:
    blocks = BlockSizes(*candidate)
    fn = lambda q, k, v: flash_attention(q, k, v, causal=True, block_sizes=blocks)
    try:
      t_fwd = timed(jax.jit(fn), q, k, v)
      t_all = timed(jax.jit(lambda q, k, v: jax.vjp(fn, q, k, v)[1](d_out)), q, k, v)
      print(f'| {candidate} | {flops / t_fwd / 1e12:.0f} | {3.5 * flops / t_all / 1e12:.0f} |',
            flush=True)
    except Exception as e:  # a tile that does not fit in shared memory
      print(f'| {candidate} | failed: {type(e).__name__}: {str(e)[:60]} | |', flush=True)


def main(argv):
  del argv
  if _SWEEP.value:
    for length in map(int, _LENGTHS.value):
      sweep(length)
    return
  print(f'device: {jax.devices()[0].device_kind}; H={_HEADS.value} K={_KV_HEADS.value} '
        f'D={_HEAD_DIM.value}, bf16, causal')
  print('| L | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | rel err out | '
        'rel err grads |\n|---|---|---|---|---|---|---|---|')
  for length in map(int, _LENGTHS.value):
    batch = max(_TOKENS.value // length, 1)
    keys = jax.random.split(jax.random.key(length), 4)
    q = jax.random.normal(keys[0], (batch, length, _HEADS.value, _HEAD_DIM.value), jnp.bfloat16)
    k, v = (jax.random.normal(x, (batch, length, _KV_HEADS.value, _HEAD_DIM.value), jnp.bfloat16)
            for x in keys[1:3])
    d_out = jax.random.normal(keys[3], q.shape, jnp.bfloat16)
    flops = 2 * 2 * batch * _HEADS.value * length * length * _HEAD_DIM.value / 2
    reference = None
    for name, fn in reversed(list(implementations().items())):  # xla first: the reference
      forward = jax.jit(fn)
      forward_backward = jax.jit(lambda q, k, v, fn=fn: jax.vjp(fn, q, k, v)[1](d_out))
      try:
        out = forward(q, k, v)
        grads = forward_backward(q, k, v)
      except Exception as e:  # an implementation that does not fit or compile here
        print(f'| {length} | {name} | failed: {type(e).__name__}: {str(e)[:80]} |||||||')
        continue
      if reference is None:
        reference = (out, grads)
        errors = ('ref', 'ref')
      else:
        rel = lambda a, b: float(jnp.linalg.norm((a - b).astype(jnp.float32))
                                 / jnp.linalg.norm(b.astype(jnp.float32)))
        errors = (f'{rel(out, reference[0]):.1e}',
                  f'{max(rel(a, b) for a, b in zip(grads, reference[1])):.1e}')
      t_fwd = timed(forward, q, k, v)
      t_all = timed(forward_backward, q, k, v)
      print(f'| {length} | {name} | {1e3 * t_fwd:.2f} | {flops / t_fwd / 1e12:.0f} | '
            f'{1e3 * t_all:.2f} | {3.5 * flops / t_all / 1e12:.0f} | {errors[0]} | {errors[1]} |',
            flush=True)


if __name__ == '__main__':
  app.run(main)
