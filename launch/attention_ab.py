"""A/B and profile of the Hopper attention kernels at the issue's case (4k, D 128, causal,
bf16, B 4), in one process, so that run-to-run spread between processes does not decide.

  python launch/attention_ab.py snapshot REV [DIR]  # here, with git: REV's kernels,
                                 # renamed euro_lm_before, into DIR (default .ab/, ignored)
  python launch/attention_ab.py ab     # on the GPU (carry .ab): cuDNN, REV's kernels, the
                                       # current ones and their two-group backward, in turns
  python launch/attention_ab.py sweep  # the current Hopper kernels' block sweeps
  ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv \
      python3 launch/attention_ab.py prof   # one forward+backward each of ours and cuDNN's

Each row is checked against XLA first. Times are per call, back to back (as
`euro_lm.bench.attention`), next to the median of calls awaited one at a time. On a CPU it
is a smoke run: tiny shapes, the kernels interpreted, no cuDNN.
"""

import ast
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parent.parent
SNAPSHOT = ROOT / '.ab'


def snapshot(rev, parent=SNAPSHOT):
  """Writes `rev`'s euro_lm/kernels, and the euro_lm modules they import, to
  `parent`/euro_lm_before, imports renamed. Any layout: kernels/*.py or kernels/flash/."""
  target = pathlib.Path(parent) / 'euro_lm_before'
  shutil.rmtree(target, ignore_errors=True)  # no files left from an earlier snapshot
  with tempfile.TemporaryDirectory() as tmp:
    archive = subprocess.run(
        ['git', '-C', str(ROOT), 'archive', rev, 'euro_lm'], check=True, capture_output=True
    ).stdout
    subprocess.run(['tar', '-x', '-C', tmp], input=archive, check=True)
    package = pathlib.Path(tmp, 'euro_lm')
    for source in _with_imports(package, sorted(package.glob('kernels/**/*.py'))):
      text = re.sub(r'\beuro_lm(?=[.\s])', 'euro_lm_before', source.read_text())
      destination = target / source.relative_to(package)
      destination.parent.mkdir(parents=True, exist_ok=True)
      destination.write_text(text)
    (target / '__init__.py').write_text('')
  print(f'{rev} kernels -> {target}')


def _with_imports(package, sources):
  """`sources` and every module of `package` they import, directly or not, with the
  `__init__.py` of the packages between (the top one excepted)."""
  found, todo = set(), list(sources)
  while todo:
    source = todo.pop()
    if source in found or not source.exists():
      continue
    found.add(source)
    parent = source.parent
    while parent != package:
      todo.append(parent / '__init__.py')
      parent = parent.parent
    for node in ast.walk(ast.parse(source.read_text())):
      if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [node.module] + [f'{node.module}.{a.name}' for a in node.names]
      elif isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      else:
        continue
      for name in names:
        parts = name.split('.')
        if parts[0] == 'euro_lm' and len(parts) > 1:
          path = package.joinpath(*parts[1:])
          todo += [path.with_suffix('.py'), path / '__init__.py']
  return sorted(found)


if sys.argv[1] == 'snapshot':
  snapshot(*sys.argv[2:4])
  sys.exit()

os.environ.setdefault('NPROC', '8')  # the Mosaic GPU interpreter's warpgroups, on a CPU
sys.path[:0] = [str(ROOT), str(SNAPSHOT)]
import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from euro_lm.bench.attention import relative_error as rel  # noqa: E402
from euro_lm.bench.attention import with_grads  # noqa: E402
from euro_lm.kernels import BlockSizes, flash_attention  # noqa: E402

gpu = jax.default_backend() == 'gpu'
B, L, H, D = (4, 4096, 16, 128) if gpu else (1, 256, 2, 64)
keys = jax.random.split(jax.random.key(0), 4)
q = jax.random.normal(keys[0], (B, L, H, D), jnp.bfloat16)
k, v = (jax.random.normal(x, (B, L, H, D), jnp.bfloat16) for x in keys[1:3])
d_out = jax.random.normal(keys[3], q.shape, jnp.bfloat16)
FLOPS = 2 * 2 * B * H * L * L * D / 2
print(f'{jax.devices()[0].device_kind}: B={B} L={L} H=K={H} D={D} bf16 causal', flush=True)


def timed(fn, args, rounds=7, calls=10):
  """(median of single awaited calls, median per call of `calls` back-to-back calls), s."""
  rounds, calls = (rounds, calls) if gpu else (1, 1)
  jax.block_until_ready(fn(*args))
  single, back_to_back = [], []
  for _ in range(rounds):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    single.append(time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(calls):
      result = fn(*args)
    jax.block_until_ready(result)
    back_to_back.append((time.perf_counter() - start) / calls)
  return float(np.median(single)), float(np.median(back_to_back))


def pair(fn):
  """jit of fn's forward, and of its forward+backward taking dO as an argument."""
  return jax.jit(fn), with_grads(fn)


def hopper(attention, **blocks):
  sizes = BlockSizes(**blocks) if blocks else None
  return lambda q, k, v: attention(q, k, v, causal=True, backend='mosaic_gpu', block_sizes=sizes)


def dot_product_attention(implementation):
  return lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation=implementation
  )


reference = [
    f(*args) for f, args in zip(pair(dot_product_attention('xla')), ((q, k, v), (q, k, v, d_out)))
]


def check(name, fns, backward=True):
  """Prints the row's error against XLA; False if it fails to compile or run."""
  try:
    out = fns[0](q, k, v)
    grads = fns[1](q, k, v, d_out) if backward else None
  except Exception as e:  # pylint: disable=broad-except
    print(f'{name}: failed: {type(e).__name__}: {str(e)[:300]}', flush=True)
    traceback.print_exc()
    return False
  grad_error = f'{max(rel(a, b) for a, b in zip(grads, reference[1])):.1e}' if backward else 'n/a'
  print(f'{name}: rel err out {rel(out, reference[0]):.1e}, grads {grad_error}', flush=True)
  return True


def row(name, fns, forward=True, backward=True):
  cells = []
  for on, fn, args, flops in (
      (forward, fns[0], (q, k, v), FLOPS),
      (backward, fns[1], (q, k, v, d_out), 3.5 * FLOPS),
  ):
    if on:
      single, back_to_back = timed(fn, args)
      cells.append(
          f'{1e3 * single:.3f} | {1e3 * back_to_back:.3f} | ' f'{flops / back_to_back / 1e12:.0f}'
      )
    else:
      cells.append(' | | ')
  print(f'| {name} | ' + ' | '.join(cells) + ' |', flush=True)


HEADER = (
    '| impl | fwd ms (awaited alone) | fwd ms (back to back) | fwd TFLOP/s | '
    'fwd+bwd ms (awaited alone) | fwd+bwd ms (back to back) | fwd+bwd TFLOP/s |\n'
    '|---|---|---|---|---|---|---|'
)
cudnn = {'cudnn': pair(dot_product_attention('cudnn'))} if gpu else {}

if sys.argv[1] == 'ab':
  impls = {**cudnn, 'current': pair(hopper(flash_attention))}
  try:
    from euro_lm_before.kernels import flash_attention as before  # pylint: disable=g-import-not-at-top

    impls['before'] = pair(hopper(before))
  except ImportError:
    print('(no .ab/euro_lm_before: run `snapshot REV` first; timing the current code only)')
  impls['current, two-group backward'] = pair(
      hopper(flash_attention, block_q=128, block_k=128, block_q_bwd=128, block_k_bwd=128)
  )
  impls = {name: fns for name, fns in impls.items() if check(name, fns)}
  print(HEADER)
  for _ in range(3 if gpu else 1):
    for name, fns in impls.items():
      row(name, fns)
elif sys.argv[1] == 'sweep':
  print(HEADER)
  for name, fns in cudnn.items():
    row(name, fns)
  for bq, bk in [(128, 128), (128, 64), (64, 128), (64, 64)]:
    fns = pair(hopper(flash_attention, block_q=bq, block_k=bk, block_q_bwd=64, block_k_bwd=64))
    if check(f'fwd ({bq}, {bk})', fns, backward=False):
      row(f'fwd ({bq}, {bk})', fns, backward=False)
  for bq, bk in [(64, 128), (128, 64), (128, 128), (64, 64)]:
    fns = pair(hopper(flash_attention, block_q=128, block_k=128, block_q_bwd=bq, block_k_bwd=bk))
    if check(f'bwd ({bq}, {bk})', fns):
      row(f'bwd ({bq}, {bk})', fns, forward=False)
elif sys.argv[1] == 'prof':  # under ncu --profile-from-start off
  import cupy  # pylint: disable=g-import-not-at-top  # in the GPU image; for cudaProfilerStart

  grads = {'current': pair(hopper(flash_attention))[1], **{n: f[1] for n, f in cudnn.items()}}
  for fn in grads.values():
    jax.block_until_ready(fn(q, k, v, d_out))
  for name, fn in grads.items():
    print('profiling', name, flush=True)
    cupy.cuda.runtime.profilerStart()
    jax.block_until_ready(fn(q, k, v, d_out))
    cupy.cuda.runtime.profilerStop()
else:
  sys.exit(f'unknown mode {sys.argv[1]!r}: snapshot REV, ab, sweep or prof')
