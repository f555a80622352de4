#!/usr/bin/env bash
# Issue 27 on one H100/H200, one call (~9 min): the 1B step with the remat fixes of
# 2026-12-06 (dots_no_batch saving its projections again; dots_and_attention also keeping the
# attention's output and log-sum-exp), the fused loss on top, a per-op profile of that step,
# FP8 against bf16 at the 1B and 7B shapes, and on an H200 the 7B preset's real step at
# micro-batch 2 (part `main`, ~9 min); then Gemma 2's soft-capped scores on the Hopper and
# Triton kernels and xla (`softcap`, ~6 min); then XLA GPU flags against the defaults
# (`flags`, ~3 min).
# Usage: bash launch/bench_mfu.sh [OUTDIR [PART]]   (PART: main, softcap, flags or all, the
# default; each run under its own timeout; on the device machine carry .whl:
# launch/carried_wheels.sh)
set -uo pipefail
out=${1:-bench_mfu_out}
part=${2:-all}
case "$part" in all | main | softcap | flags) ;; *) echo "error: PART=$part: main, softcap, flags or all" >&2; exit 2 ;; esac
want() { [[ "$part" == all || "$part" == "$1" ]]; }
mkdir -p "$out"
export PYTHONUNBUFFERED=1
run() {  # name, timeout in s, then bench arguments
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  timeout "$limit" python3 -m euro_lm.bench "$@" 2>&1 | grep -v "^W\|^I[0-9]" | tee "$out/$name.txt" | tail -3
}
source "$(dirname "$0")/carried_wheels.sh"  # euro_lm's ml_collections and grain, if carried
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "$gpu"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" ||
  { echo "euro_lm's dependencies are missing: pip install -e ., or carry .whl"; exit 1; }
one_b="--config=configs/llama_1b.py:gpu --config.train.global_batch_size=8 --steps=6"
if want main; then
  run 1b_dots_no_batch 150 $one_b
  run 1b_dots_and_attention 150 $one_b --config.model.remat_policy=dots_and_attention
  run 1b_dots_and_attention_chunked 150 $one_b --config.model.remat_policy=dots_and_attention \
    --config.model.loss_chunk_length=512
  echo "== profile: where the step's time goes, op by op (dots_and_attention, fused loss)"
  timeout 150 python3 -m euro_lm.bench.profile --config=configs/llama_1b.py:gpu \
    --config.train.global_batch_size=8 --config.model.remat_policy=dots_and_attention \
    --config.model.loss_chunk_length=512 --steps=3 --top=25 --trace_dir=/tmp/euro_lm_profile 2>&1 |
    grep -v "^W\|^I[0-9]" | tee "$out/profile.txt" | head -12
  echo "== fp8: the step against bf16 at the 1B and 7B shapes (no parity run)"
  timeout 200 python3 launch/bench_fp8.py --out="$out/fp8" --skip=parity 2>&1 | grep -v "^W\|^I[0-9]" |
    tee "$out/fp8.txt" | tail -8
  if [[ "$gpu" == *H200* ]]; then  # 92.5 GiB of float32 state: an H100 cannot hold it
    run 7b_one_h200 200 --config=configs/llama_7b.py:gpu --config.mesh.data=1 --config.mesh.fsdp=1 \
      --config.train.global_batch_size=2 --steps=4
  fi
fi
# Gemma 2's soft-capped scores: the kernels alone against xla (errors and speed), then the
# 1B step on the Hopper kernels (auto's choice since 2026-12-07, second session), the
# Triton kernels and the xla attention (the choice before the kernels capped).
if want softcap; then
  echo "== attention with scores capped at 50: the kernels' errors against xla, and their speed"
  timeout 150 python3 -m euro_lm.bench.attention --lengths=4096 --softcap=50 \
    --impls=xla,pallas,mosaic_gpu --packed_length=0 2>&1 | grep -v "^W\|^I[0-9]" |
    tee "$out/attention_softcap.txt" | tail -5
  run 1b_softcap_hopper 120 $one_b --config.model.attn_logit_softcap=50 \
    --config.model.attention_impl=pallas
  run 1b_softcap_triton 120 $one_b --config.model.attn_logit_softcap=50 \
    --config.model.attention_impl=pallas --config.model.pallas_backend=gpu
  run 1b_softcap_xla 120 $one_b --config.model.attn_logit_softcap=50 \
    --config.model.attention_impl=xla
fi
# XLA GPU flags that recipes for H100s set (NVIDIA's JAX-Toolbox, MaxText), on the 1B step
# as the first run above: cuBLAS for every matmul instead of autotuned Triton GEMMs, and
# no CUDA-graph command buffers. A flag this XLA does not know fails its run alone.
if want flags; then
  XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_triton_gemm=false" \
    run 1b_no_triton_gemm 150 $one_b
  XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_command_buffer=" \
    run 1b_no_command_buffer 150 $one_b
fi
