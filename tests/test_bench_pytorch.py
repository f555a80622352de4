"""`python -m euro_lm.bench.pytorch`: euro_lm's step against transformers' Llama in PyTorch."""

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_table_compares_the_same_first_loss_and_shares_of_the_matmul_rate():
  out = subprocess.run(
      [
          sys.executable,
          '-m',
          'euro_lm.bench.pytorch',
          '--config=configs/tiny.py',
          '--config.model.num_layers=1',
          '--config.train.global_batch_size=2',
          '--config.train.seq_len=32',
          '--steps=1',
      ],
      cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=''),
      capture_output=True,
      text=True,
      check=True,  # the script fails when PyTorch's first loss differs from euro_lm's
  ).stdout
  number = r'([\d.]+(?:e-?\d+)?)'
  header = re.search(
      rf'batch 2 x 32, float32.*first-step losses agree \({number}\); {number} model TFLOP a '
      rf'step, at the measured {number} TFLOP/s of a float32 matmul at least {number} s',
      out,
  )
  assert header, out
  lines = out.splitlines()
  rows = [line.split(' | ') for line in lines[lines.index('|---|---|---|---|---|---|') + 1 :]]
  assert [r[0] for r in rows] == [
      '| euro_lm (JAX, XLA:CPU)',
      '| PyTorch eager (transformers Llama, SDPA), default malloc',
      '| PyTorch eager (transformers Llama, SDPA), freed memory kept, as euro_lm',
  ], out
  base = float(rows[0][1])
  step_tflop, matmul_tflops = float(header[2]), float(header[3])
  # Each figure is printed rounded: step seconds to 0.0005 (a step of 32 tokens takes
  # milliseconds), speed-ups to 0.005, shares to 0.05 points, FLOPs to 4 digits. The
  # tolerances are those roundings carried through, no more.
  for row in rows:
    seconds = float(row[1])
    ratio = seconds / base
    assert (
        abs(float(row[3].rstrip('×')) - ratio)
        <= 0.005 + ratio * (0.0005 / seconds + 0.0005 / base) + 1e-9
    ), row
    # The share: the step's model FLOPs over its time, against the matmul rate.
    share = step_tflop / seconds / matmul_tflops
    assert (
        abs(float(row[4].rstrip('%')) / 100 - share)
        <= 0.0005 + share * (1e-3 + 0.0005 / seconds) + 1e-9
    ), row
