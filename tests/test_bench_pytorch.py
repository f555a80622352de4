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
  # Each figure is printed rounded (a step of 32 tokens takes milliseconds), hence 5%.
  for row in rows:
    seconds = float(row[1])
    assert abs(float(row[3].rstrip('×')) - seconds / base) <= 0.05 * seconds / base, row
    # The share: the step's model FLOPs over its time, against the matmul rate.
    share = float(row[4].rstrip('%')) / 100
    assert abs(share - step_tflop / seconds / matmul_tflops) <= 0.05 * share, row
