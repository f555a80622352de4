#!/usr/bin/env bash
# Issue 4's measurements on one GPU, in one call: the block-size sweep at 4k, then the
# table (L = 2k, 4k, 8k against cuDNN and XLA, correctness first) and the packed-documents
# case with the tuned blocks. Usage: bash launch/bench_attention_gpu.sh [OUTDIR]  (~9 min)
set -uo pipefail
out=${1:-bench_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$out/gpu.txt"
# Each part under its own limit, so a hang in one still leaves the others' tables.
timeout 240 python3 -m euro_lm.kernels.bench --lengths=4096 --sweep 2>&1 | grep -v "^W\|^I[0-9]" | tee "$out/sweep_4k.txt"
timeout 300 python3 -m euro_lm.kernels.bench 2>&1 | grep -v "^W\|^I[0-9]" | tee "$out/table.txt"
