"""`python -m euro_lm.bench.attention`: attention TFLOP/s on one GPU, ours against cuDNN and XLA.

For L in {2k, 4k, 8k}, D = 128, bf16, causal, ~16k tokens per batch: checks each
implementation against XLA first (relative error of output and gradients), then times
forward and forward+backward (per call, back to back, after warm-up). Ours run as the Triton
kernels and as the Hopper kernels (`backend='mosaic_gpu'`, both forward layouts); JAX's own
Mosaic GPU forward is timed next to them as a yardstick. Causal FLOPs are halved:
forward 2 * 2 * B * H * L^2 * D / 2, backward 2.5x the forward (as FlashAttention counts).

Then the packed-documents case: rows of `--packed_length` tokens packed with documents of
about `--doc_length` tokens, our kernel timed with and without the segment ids, next to the
fraction of (query block, key block) pairs the segment ids leave to visit. Block skipping
works if the time ratio follows that fraction.

`--softcap=50` runs the table with Gemma 2's capped scores (euro_lm's kernels against its
own xla attention; cuDNN and JAX's Hopper kernel do not cap).

`--sweep` times our Triton kernels over SWEEP_FORWARD and SWEEP_BACKWARD instead, and on a
Hopper GPU the Hopper kernels over SWEEP_HOPPER_FORWARD and SWEEP_HOPPER_BACKWARD.
"""

import dataclasses
import functools
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from euro_lm import cli, devices
from euro_lm.kernels import (
    BlockSizes,
    default_backend,
    flash_attention,
    gpu_block_sizes,
    tpu_block_sizes,
)
from euro_lm.kernels.flash import mosaic_gpu as hopper
from euro_lm.kernels.flash.blocks import Static, key_ranges
from euro_lm.model.attention import attention as euro_lm_attention

_LENGTHS = flags.DEFINE_list('lengths', ['2048', '4096', '8192'], 'Sequence lengths.')
_HEADS = flags.DEFINE_integer('heads', 16, 'Query heads.')
_KV_HEADS = flags.DEFINE_integer('kv_heads', 16, 'Key/value heads.')
_HEAD_DIM = flags.DEFINE_integer('head_dim', 128, 'Head dimension.')
_TOKENS = flags.DEFINE_integer('tokens', 16384, 'Tokens per batch (batch = tokens / L).')
_SWEEP = flags.DEFINE_bool('sweep', False, 'Time our kernel over the SWEEP_* block sizes instead.')
_SWEEP_SETS = flags.DEFINE_list(
    'sweep_sets',
    ['triton', 'hopper'],
    'With --sweep: the kernel sets to sweep (hopper: on sm90 only).',
)
_PACKED_LENGTH = flags.DEFINE_integer(
    'packed_length', 8192, 'Row length of the packed case; 0 skips it.'
)
_DOC_LENGTH = flags.DEFINE_integer('doc_length', 1024, 'Mean document length of the packed case.')
_SOFTCAP = flags.DEFINE_float(
    'softcap',
    0.0,
    "> 0: scores soft-capped as Gemma 2's (cap * tanh(s / cap); 50 in its releases), in "
    "euro_lm's kernels and the xla reference (euro_lm's, jax.nn's takes no cap); cuDNN and "
    "JAX's Hopper kernel, which do not cap, are left out.",
)
_IMPLS = flags.DEFINE_list(
    'impls',
    ['xla', 'cudnn', 'mosaic_gpu', 'pallas'],
    'Implementations in the table, in order (xla, the reference, always runs first): pallas '
    '(our Triton kernels), mosaic_gpu and mosaic_gpu_one_group (our Hopper kernels, two or '
    'one compute warpgroups in the forward), mosaic_gpu_bwd2 (mosaic_gpu with the two-group '
    "backward kernels, backward blocks of 128), jax_mosaic_gpu (JAX's Hopper forward, forward "
    'only), cudnn, xla. The packed case runs for pallas and mosaic_gpu when listed. The '
    "default is the issue's table; the Hopper rows run on sm90 GPUs (H100/H200) only.",
)

# --sweep candidates. The forward and backward kernels have their own settings, so each is
# swept alone: forward (block_q, block_k, num_warps, num_stages), timed forward only; backward
# (block_q_bwd, block_k_bwd, num_warps_bwd, num_stages_bwd), timed forward+backward with the
# default forward. 14 compiles per length, against 16 when the two were swept together.
SWEEP_FORWARD = [
    (64, 64, 4, 2),
    (128, 64, 8, 2),
    (128, 64, 8, 3),
    (128, 128, 8, 2),
    (128, 128, 8, 3),
    (128, 128, 4, 3),
]
# The Hopper forward on an sm90 GPU: (block_q, block_k); 2 K/V stages, so block_k 256 at
# head_dim 128 would not fit in shared memory.
SWEEP_HOPPER_FORWARD = [(128, 64), (128, 128), (64, 64), (64, 128)]
# The Hopper backward on an sm90 GPU: (block_q_bwd, block_k_bwd), each 64 (one warpgroup
# per CTA) or 128 (two compute warpgroups and a producer), timed forward+backward with the
# default Hopper forward.
SWEEP_HOPPER_BACKWARD = [(64, 64), (64, 128), (128, 64), (128, 128)]
SWEEP_BACKWARD = [
    (64, 64, 4, 2),
    (64, 64, 4, 3),
    (64, 64, 8, 2),
    (64, 64, 2, 2),
    (128, 64, 4, 2),
    (64, 128, 4, 2),
    (128, 64, 8, 3),
    (128, 128, 8, 2),
]


def implementations(softcap=0.0):
  """The table's implementations by name; with a soft cap, those that take it."""

  def cudnn(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='cudnn')

  def xla(q, k, v):
    if softcap:  # jax.nn's attention takes no cap: euro_lm's own xla attention
      return euro_lm_attention(q, k, v, impl='xla', softcap=softcap)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='xla')

  ours_with = functools.partial(flash_attention, causal=True, softcap=softcap)

  def ours(q, k, v):  # the Triton kernels, also on a Hopper GPU
    return ours_with(q, k, v, backend='gpu')

  def ours_hopper(q, k, v):  # two compute warpgroups and a producer
    return ours_with(q, k, v, backend='mosaic_gpu')

  def ours_hopper_one_group(q, k, v):
    blocks = dataclasses.replace(
        gpu_block_sizes(q.shape[-1]), block_q=hopper.ROWS, block_k=hopper.BLOCK_K
    )
    return ours_with(q, k, v, backend='mosaic_gpu', block_sizes=blocks)

  def ours_hopper_two_group_backward(q, k, v):  # both backward kernels in FA3's layout
    blocks = BlockSizes(
        block_q=hopper.BLOCK_Q,
        block_k=hopper.BLOCK_K,
        block_q_bwd=2 * hopper.ROWS,
        block_k_bwd=2 * hopper.ROWS,
    )
    return ours_with(q, k, v, backend='mosaic_gpu', block_sizes=blocks)

  capping = {
      'pallas': ours,
      'mosaic_gpu': ours_hopper,
      'mosaic_gpu_one_group': ours_hopper_one_group,
      'mosaic_gpu_bwd2': ours_hopper_two_group_backward,
      'xla': xla,
  }
  return capping if softcap else capping | {'jax_mosaic_gpu': jax_hopper_forward, 'cudnn': cudnn}


def jax_hopper_forward(q, k, v):
  """JAX's own Hopper attention (`pallas.ops.gpu.attention_mgpu`): a yardstick for what
  Mosaic GPU reaches. It takes float16 only (a bf16 call fails), and its backward does not
  take a causal mask."""
  from jax.experimental.pallas.ops.gpu import attention_mgpu  # pylint: disable=g-import-not-at-top

  config = attention_mgpu.TuningConfig(
      block_q=64, block_kv=128, max_concurrent_steps=2, causal=True
  )
  q, k, v = (x.astype(jnp.float16) for x in (q, k, v))
  return attention_mgpu.attention(q, k, v, config).astype(jnp.bfloat16)


def timed(fn, *args, repeats=7, calls=10):
  """Seconds per call: the median over `repeats` rounds of `calls` back-to-back calls, each
  round awaited once. This is the device's throughput, as in a training step, where the host
  queues the next kernels while the device runs; awaiting each call alone adds its launch
  latency (BENCHMARKS.md has its size on an H100)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(calls):
      result = fn(*args)
    jax.block_until_ready(result)
    times.append((time.perf_counter() - start) / calls)
  return float(np.median(times))


def with_grads(fn):
  """jit of `fn`'s forward+backward, called with (q, k, v, dO). dO is an argument: closed
  over, it would be a constant that XLA folds (transposes) while compiling, work that the
  timed call would then skip."""
  return jax.jit(lambda q, k, v, d_out: jax.vjp(fn, q, k, v)[1](d_out))


def relative_error(a, b):
  """|a - b| / |b| in float32 (Frobenius norms)."""
  return float(
      jnp.linalg.norm((a - b).astype(jnp.float32)) / jnp.linalg.norm(b.astype(jnp.float32))
  )


def random_inputs(batch, length, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (batch, length, _HEADS.value, _HEAD_DIM.value), jnp.bfloat16)
  k, v = (
      jax.random.normal(x, (batch, length, _KV_HEADS.value, _HEAD_DIM.value), jnp.bfloat16)
      for x in keys[1:3]
  )
  d_out = jax.random.normal(keys[3], q.shape, jnp.bfloat16)
  return q, k, v, d_out


def _time_ours(q, k, v, d_out, **kwargs):
  """(forward, forward+backward) seconds of our kernel."""
  fn = lambda q, k, v: flash_attention(q, k, v, causal=True, **kwargs)
  return (timed(jax.jit(fn), q, k, v), timed(with_grads(fn), q, k, v, d_out))


def sweep(length):
  """Block-size sweeps: the Triton kernels' (forward over SWEEP_FORWARD, backward over
  SWEEP_BACKWARD) and, on a Hopper GPU, the Hopper kernels' (`--sweep_sets`)."""
  batch = max(_TOKENS.value // length, 1)
  q, k, v, d_out = random_inputs(batch, length)
  flops = 2 * 2 * batch * _HEADS.value * length * length * _HEAD_DIM.value / 2
  print(f'L = {length}')
  if 'hopper' in _SWEEP_SETS.value:
    if default_backend(q.dtype, length, _HEAD_DIM.value) == 'mosaic_gpu':
      hopper_forward_sweep(q, k, v, flops)
      hopper_backward_sweep(q, k, v, d_out, flops)
    else:
      print('(no Hopper sweep: not an sm90 GPU, or a shape its kernels do not take)')
  if 'triton' in _SWEEP_SETS.value:
    triton_sweep(q, k, v, d_out, flops)


def triton_sweep(q, k, v, d_out, flops):
  """Forward times over SWEEP_FORWARD, forward+backward times over SWEEP_BACKWARD."""
  default = gpu_block_sizes(_HEAD_DIM.value)
  print('\n| forward (q, k, warps, stages) | fwd TFLOP/s |\n|---|---|')
  for q_block, k_block, warps, stages in SWEEP_FORWARD:
    _forward_row(
        (q_block, k_block, warps, stages),
        q,
        k,
        v,
        flops,
        block_sizes=dataclasses.replace(
            default, block_q=q_block, block_k=k_block, num_warps=warps, num_stages=stages
        ),
    )
  t_fwd = _time_ours(q, k, v, d_out, block_sizes=default)[0]
  print(
      '\n| backward (q, k, warps, stages), default forward | fwd+bwd TFLOP/s | bwd TFLOP/s |'
      '\n|---|---|---|'
  )
  for q_block, k_block, warps, stages in SWEEP_BACKWARD:
    _backward_row(
        (q_block, k_block, warps, stages),
        t_fwd,
        q,
        k,
        v,
        d_out,
        flops,
        block_sizes=dataclasses.replace(
            default,
            block_q_bwd=q_block,
            block_k_bwd=k_block,
            num_warps_bwd=warps,
            num_stages_bwd=stages,
        ),
    )


def hopper_forward_sweep(q, k, v, flops):
  """Forward times of the Hopper kernels over SWEEP_HOPPER_FORWARD."""
  print('\n| Hopper forward (q, k) | fwd TFLOP/s |\n|---|---|')
  for q_block, k_block in SWEEP_HOPPER_FORWARD:
    _forward_row(
        (q_block, k_block),
        q,
        k,
        v,
        flops,
        backend='mosaic_gpu',
        block_sizes=BlockSizes(block_q=q_block, block_k=k_block),
    )


def hopper_backward_sweep(q, k, v, d_out, flops):
  """Forward+backward times of the Hopper kernels over SWEEP_HOPPER_BACKWARD."""
  t_fwd = _time_ours(q, k, v, d_out, backend='mosaic_gpu')[0]
  print(
      '\n| Hopper backward (q, k), default forward | fwd+bwd TFLOP/s | bwd TFLOP/s |'
      '\n|---|---|---|'
  )
  for q_block, k_block in SWEEP_HOPPER_BACKWARD:
    _backward_row(
        (q_block, k_block),
        t_fwd,
        q,
        k,
        v,
        d_out,
        flops,
        backend='mosaic_gpu',
        block_sizes=BlockSizes(
            block_q=hopper.BLOCK_Q, block_k=hopper.BLOCK_K, block_q_bwd=q_block, block_k_bwd=k_block
        ),
    )


def _forward_row(label, q, k, v, flops, **kwargs):
  """One row of a forward sweep: our kernel with `kwargs`, forward TFLOP/s."""
  fn = jax.jit(lambda q, k, v: flash_attention(q, k, v, causal=True, **kwargs))
  try:
    print(f'| {label} | {flops / timed(fn, q, k, v) / 1e12:.0f} |', flush=True)
  except Exception as e:  # a tile or ring that does not fit in shared memory
    print(f'| {label} | failed: {type(e).__name__}: {str(e)[:60]} |', flush=True)


def _backward_row(label, t_fwd, q, k, v, d_out, flops, **kwargs):
  """One row of a backward sweep: forward+backward TFLOP/s and, less the default forward's
  `t_fwd`, the backward's."""
  fn = lambda q, k, v: flash_attention(q, k, v, causal=True, **kwargs)
  try:
    t_all = timed(with_grads(fn), q, k, v, d_out)
    print(
        f'| {label} | {3.5 * flops / t_all / 1e12:.0f} | '
        f'{2.5 * flops / max(t_all - t_fwd, 1e-9) / 1e12:.0f} |',
        flush=True,
    )
  except Exception as e:  # a tile that does not fit in shared memory
    print(f'| {label} | failed: {type(e).__name__}: {str(e)[:60]} | |', flush=True)
    if kwargs.get('backend') == 'mosaic_gpu':  # the Hopper kernels' first runs: say where
      traceback.print_exc(file=sys.stderr)


def packed_segment_ids(batch, length, doc_length, seed=0):
  """int32 `[batch, length]`: each row packed with documents of doc_length / 2 to
  3 * doc_length / 2 tokens (the last one cut at the row's end), ids counting from 1."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(batch):
    sizes = []
    while sum(sizes) < length:
      sizes.append(int(rng.integers(doc_length // 2, doc_length * 3 // 2 + 1)))
    sizes[-1] -= sum(sizes) - length
    rows.append(np.repeat(np.arange(1, len(sizes) + 1), sizes))
  return np.stack(rows).astype(np.int32)


def visited_fraction(segment_ids, block_q, block_k):
  """Of the (query block, key block) pairs a causal kernel visits, the fraction it still
  visits when it also skips across documents: the time ratio that skipping can reach."""

  def pairs(ids):
    static = Static(causal=True, scale=1.0, window=None, blocks=BlockSizes(), interpret=True)
    ranges = key_ranges(static, jnp.asarray(ids, jnp.int32), block_q, block_k)
    return int(jnp.sum(ranges.hi - ranges.lo))

  return pairs(segment_ids) / pairs(np.ones_like(segment_ids))


def packed(length, doc_length, triton=True, hopper=True):
  """Our kernels on packed rows, with and without their segment ids."""
  batch = max(_TOKENS.value // length, 1)
  q, k, v, d_out = random_inputs(batch, length, seed=1)
  segment_ids = packed_segment_ids(batch, length, doc_length)
  print(
      f'\nPacked rows: B={batch} L={length}, documents of ~{doc_length} tokens '
      f'({len(np.unique(segment_ids[0]))} in row 0), causal'
  )
  print('| kernel, mask | fwd ms | fwd+bwd ms | blocks visited |\n|---|---|---|---|')
  if triton:
    packed_triton(q, k, v, d_out, segment_ids)
  if hopper and jax.default_backend() != 'tpu':
    packed_hopper(q, k, v, d_out, segment_ids)


def packed_triton(q, k, v, d_out, segment_ids):
  """The packed case for our default kernels (Triton, or Mosaic on a TPU)."""
  length = q.shape[1]
  if jax.default_backend() == 'tpu':
    blocks = tpu_block_sizes(_HEAD_DIM.value, length)
  else:
    blocks = gpu_block_sizes(_HEAD_DIM.value)
  # The forward's blocks; the backward's are the same size on GPUs and 2x smaller on TPUs.
  fraction = visited_fraction(segment_ids, blocks.block_q, blocks.block_k)
  backend = 'tpu' if jax.default_backend() == 'tpu' else 'gpu'
  causal = _time_ours(q, k, v, d_out, backend=backend)
  docs = _time_ours(q, k, v, d_out, backend=backend, segment_ids=jnp.asarray(segment_ids))
  _packed_rows('pallas', causal, docs, f'{fraction:.3f}')


def packed_hopper(q, k, v, d_out, segment_ids):
  """The packed case for the Hopper kernels (`backend='mosaic_gpu'`)."""
  try:
    causal = _time_ours(q, k, v, d_out, backend='mosaic_gpu')
    docs = _time_ours(q, k, v, d_out, backend='mosaic_gpu', segment_ids=jnp.asarray(segment_ids))
  except Exception as e:  # not a Hopper GPU
    print(f'| mosaic_gpu | failed: {type(e).__name__}: {str(e)[:80]} |||')
    traceback.print_exc(file=sys.stderr)
    return
  # The forward's blocks are ROWS x BLOCK_K, the backward's ROWS x ROWS.
  fraction = (
      f'{visited_fraction(segment_ids, hopper.ROWS, hopper.BLOCK_K):.3f} fwd, '
      f'{visited_fraction(segment_ids, hopper.ROWS, hopper.ROWS):.3f} bwd'
  )
  _packed_rows('mosaic_gpu', causal, docs, fraction)


def _packed_rows(name, causal, docs, fraction):
  """The packed table's rows for one kernel set: (forward, forward+backward) seconds with
  the causal mask alone and with the documents, and their ratio."""
  print(f'| {name}, causal | {1e3 * causal[0]:.2f} | {1e3 * causal[1]:.2f} | 1 |')
  print(
      f'| {name}, causal + documents | {1e3 * docs[0]:.2f} | {1e3 * docs[1]:.2f} | ' f'{fraction} |'
  )
  print(
      f'| {name}, ratio | {docs[0] / causal[0]:.3f} | {docs[1] / causal[1]:.3f} | ' f'{fraction} |',
      flush=True,
  )


def main(argv):
  del argv
  # In interpret mode (a smoke run on a CPU), each simulated warpgroup holds one of XLA:CPU's
  # client threads, as many as cores by default, while it waits at a barrier. Under jit, on
  # a few cores, a warpgroup can then wait forever for a thread. XLA sizes that pool from
  # NPROC, read when the backend starts.
  os.environ.setdefault('NPROC', str(max(8, os.cpu_count() or 1)))
  if _SWEEP.value:
    for length in map(int, _LENGTHS.value):
      sweep(length)
    return
  if not _SOFTCAP.value >= 0:
    raise app.UsageError(f'--softcap={_SOFTCAP.value}: must be >= 0 (0: none)')
  known, available = implementations(), implementations(_SOFTCAP.value)
  unknown = set(_IMPLS.value) - set(known)
  if unknown:
    raise app.UsageError(f'--impls: unknown {sorted(unknown)}; known: {sorted(known)}')
  impls = _IMPLS.value
  if _SOFTCAP.value:
    uncapped = [n for n in impls if n not in available]
    if uncapped:
      print(f'(soft cap {_SOFTCAP.value:g}: leaving out {", ".join(uncapped)}, which do not cap)')
    impls = [n for n in impls if n in available]
  if not devices.describe().hopper:
    hopper_only = [n for n in impls if 'mosaic_gpu' in n]
    if hopper_only:
      print(f'(not an sm90 GPU: leaving out {", ".join(hopper_only)})')
    impls = [n for n in impls if n not in hopper_only]
  print(
      f'device: {jax.devices()[0].device_kind}; H={_HEADS.value} K={_KV_HEADS.value} '
      f'D={_HEAD_DIM.value}, bf16, causal'
      + (f', scores soft-capped at {_SOFTCAP.value:g}' if _SOFTCAP.value else '')
  )
  print(
      '| L | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | rel err out | '
      'rel err grads |\n|---|---|---|---|---|---|---|---|'
  )
  for length in map(int, _LENGTHS.value):
    batch = max(_TOKENS.value // length, 1)
    q, k, v, d_out = random_inputs(batch, length, seed=length)
    flops = 2 * 2 * batch * _HEADS.value * length * length * _HEAD_DIM.value / 2
    reference = None
    for name in ['xla'] + [n for n in impls if n != 'xla']:  # xla: the reference
      fn = available[name]
      forward = jax.jit(fn)
      forward_backward = with_grads(fn)
      try:
        out = forward(q, k, v)
      except Exception as e:  # an implementation that does not fit or compile here
        print(f'| {length} | {name} | failed: {type(e).__name__}: {str(e)[:80]} |||||||')
        traceback.print_exc(file=sys.stderr)  # whole, for a kernel's first run on a GPU
        continue
      try:
        grads = forward_backward(q, k, v, d_out)
      except Exception:  # a forward-only yardstick
        if name != 'jax_mosaic_gpu':
          traceback.print_exc(file=sys.stderr)
        grads = None
      if reference is None:
        reference = (out, grads)
        errors = ('ref', 'ref')
      else:
        errors = (
            f'{relative_error(out, reference[0]):.1e}',
            'n/a'
            if grads is None
            else f'{max(relative_error(a, b) for a, b in zip(grads, reference[1])):.1e}',
        )
      t_fwd = timed(forward, q, k, v)
      both = '| n/a | n/a'
      if grads is not None:
        t_all = timed(forward_backward, q, k, v, d_out)
        both = f'| {1e3 * t_all:.2f} | {3.5 * flops / t_all / 1e12:.0f}'
      print(
          f'| {length} | {name} | {1e3 * t_fwd:.2f} | {flops / t_fwd / 1e12:.0f} {both} | '
          f'{errors[0]} | {errors[1]} |',
          flush=True,
      )
  if _PACKED_LENGTH.value:
    packed(
        _PACKED_LENGTH.value,
        _DOC_LENGTH.value,
        triton='pallas' in impls,
        hopper='mosaic_gpu' in impls,
    )


if __name__ == '__main__':
  cli.run(main)
