#!/usr/bin/env bash
# Issue 27, item 5: MaxText's pretraining step against euro_lm's on one GPU, in one call
# (~3-4 min): the shape of configs/llama_1b.py:gpu (bfloat16 compute, float32 params, remat of
# the projections' outputs, tied embeddings, 64k vocabulary) at 8 x 4096 tokens per step on
# synthetic tokens, MaxText 0.2.5 first, then `python3 -m euro_lm.bench`; prints both tokens/s
# and their ratio. MaxText and the packages the device image lacks (euro_lm's own
# ml_collections and grain among them) travel as wheels in .whl/ (git-ignored), installed to
# $SITE with no index; the device's jax, flax and numpy are used as they are.
# Usage: bash launch/bench_maxtext.sh --fetch   (where a package index answers: the wheels, ~29 MiB)
#        bash launch/bench_maxtext.sh [OUTDIR]  (on the device, with .whl carried)
#   SHAPE=1b (default) | 125m (configs/llama_125m.py, float32, 4 x 512: the CPU comparison)
#   | tiny (a CPU dry run of the whole script); HARDWARE=gpu|cpu (default: gpu if nvidia-smi
#   answers); MT_ATTENTION (gpu: cudnn_flash_jax, cpu: dot_product); MT_STEPS, EL_STEPS;
#   MT_TIMEOUT, EL_TIMEOUT (s); MT_ARGS (more MaxText key=value), EL_ARGS (more bench flags);
#   SITE (/tmp/site); SKIP_INSTALL=1 reuses $SITE.
set -uo pipefail
# For CPython 3.12 on x86-64 Linux, tested there with jax 0.11.2 and flax 0.12.12. tokamax
# 0.0.12, not the 0.0.14 MaxText asks for: later ones import xprof (a 32 MB wheel) at start-up.
# pydantic travels with its core, so the two always match.
wheels=(maxtext==0.2.5 aqtp==0.9.0 drjax==0.2.1 einshape==1.0 fastapi==0.141.1
        immutabledict==4.3.1 jaxtyping==0.3.11 wadler_lindig==0.1.8 omegaconf==2.4.0
        pathwaysutils==0.1.13 qwix==0.1.8 starlette==1.10.0 uvicorn==0.55.0 tokamax==0.0.12
        typeguard==2.13.3 sympy==1.14.0 mpmath==1.4.1 pydantic==2.14.4 pydantic_core==2.50.5
        annotated_types==0.8.0 typing_inspection==0.4.5 annotated_doc==0.0.7
        grain==0.2.18 array_record==0.8.6 cloudpickle==3.1.3 portpicker==1.6.0
        ml_collections==1.1.0)  # the last five: euro_lm's own, missing from the device image
if [[ ${1:-} == --fetch ]]; then
  platforms=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
    manylinux1_x86_64 any; do platforms+=(--platform "$p"); done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl "${wheels[@]}" && du -sh .whl
  exit
fi
out=${1:-bench_maxtext_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 DECOUPLE_GCLOUD=TRUE  # MaxText without its Google Cloud clients
shape=${SHAPE:-1b}
if [[ -z ${HARDWARE:-} ]]; then
  nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep . &&
    HARDWARE=gpu || HARDWARE=cpu
fi
[[ ${SKIP_INSTALL:-0} == 1 ]] || ls .whl/maxtext-*.whl >/dev/null 2>&1 ||
  { echo "no .whl/maxtext-*.whl: --fetch, then carry .whl"; exit 1; }
source "$(dirname "$0")/carried_wheels.sh"  # sets $site
python3 -c "import jax, flax, maxtext, tokamax, ml_collections as m
print('jax', jax.__version__, 'flax', flax.__version__, 'maxtext', maxtext.__version__,
      jax.devices())" 2>&1 | grep -v "DECOUPLED\|transformers\]" ||
  { echo "MaxText does not import (above)"; exit 1; }

# The shape, once for both sides: layers, width, heads, kv heads, head dim, MLP, vocabulary,
# sequences x tokens per step.
el_config=configs/llama_1b.py:gpu
case $shape in
  1b) read -r L D H K HD F V B T <<< '16 2048 32 8 64 8192 65536 8 4096';;
  125m) read -r L D H K HD F V B T <<< '12 768 12 12 64 2560 32000 4 512'
        el_config=configs/llama_125m.py;;
  tiny) read -r L D H K HD F V B T <<< '2 128 4 2 32 256 1024 2 128';;
  *) echo "SHAPE is 1b, 125m or tiny"; exit 1;;
esac
mt=(hardware="$HARDWARE" skip_jax_distributed_system=true run_name=bench
    base_output_directory="$(realpath "$out")/maxtext_run" dataset_type=synthetic
    enable_checkpointing=false enable_tensorboard=false enable_dropout=false
    steps="${MT_STEPS:-8}" per_device_batch_size="$B" max_target_length="$T" decoder_block=llama2
    base_num_decoder_layers="$L" base_emb_dim="$D" base_num_query_heads="$H"
    base_num_kv_heads="$K" head_dim="$HD" base_mlp_dim="$F"
    vocab_size="$V" logits_via_embedding=true normalization_layer_epsilon=1e-5 scan_layers=true
    opt_type=adamw adam_b1=0.9 adam_b2=0.95 adam_eps=1e-8 adam_weight_decay=0.1
    gradient_clipping_threshold=1.0 weight_dtype=float32)
attention=${MT_ATTENTION:-dot_product}
[[ $HARDWARE == gpu ]] && attention=${MT_ATTENTION:-cudnn_flash_jax}
el=(--config="$el_config" --config.train.global_batch_size="$B" --steps="${EL_STEPS:-6}")
if [[ $shape == 125m ]]; then  # configs/llama_125m.py: float32, no remat, RoPE base 10k
  mt+=(dtype=float32 remat_policy=none rope_max_timescale=10000 learning_rate=6e-4)
  el+=(--config.train.seq_len="$T")
else  # llama_1b.py:gpu: bfloat16 compute; `minimal` saves q/k/v/o and the MLP's three
  # projections, as euro_lm's dots_no_batch; MaxText's llama3.1 RoPE (its scaling factor is
  # fixed at 8; euro_lm's is 32: the same work)
  mt+=(dtype=bfloat16 remat_policy=minimal rope_type=llama3.1 rope_max_timescale=500000
       learning_rate=3e-4)
fi
if [[ $shape == tiny ]]; then
  el+=(--config.model.num_layers="$L" --config.model.embed_dim="$D" --config.model.num_heads="$H"
       --config.model.num_kv_heads="$K" --config.model.head_dim="$HD" --config.model.mlp_dim="$F"
       --config.model.vocab_size="$V" --config.train.seq_len="$T")
fi
# Both processes may take 90% of the GPU's memory (JAX's default is 75%: 58 GiB on an H100).
[[ $HARDWARE == gpu ]] &&
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
# On a CPU euro_lm keeps freed memory in the process (euro_lm/host_memory.py); MaxText gets the
# same glibc settings through the environment (KEEP_FREED=0: MaxText as it comes).
mt_env=()
[[ $HARDWARE == cpu && ${KEEP_FREED:-1} == 1 ]] &&
  mt_env=(MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=4611686018427387904)

maxtext() {  # attention, timeout in s
  echo "== maxtext: $shape, $B x $T tokens, attention $1"
  env "${mt_env[@]}" timeout "$2" python3 -m maxtext.trainers.pre_train.train \
    "$site/maxtext/configs/base.yml" "${mt[@]}" attention="$1" ${MT_ARGS:-} \
    > "$out/maxtext.txt" 2>&1
  local rc=$?
  grep "completed step" "$out/maxtext.txt" | sed 's/.*completed step/step/' | cut -c1-100
  ((rc)) && { echo "maxtext exit $rc:"; grep -v "^I[0-9]" "$out/maxtext.txt" | tail -12; }
  return $rc
}
start=$SECONDS
maxtext "$attention" "${MT_TIMEOUT:-150}"
# A quick failure of JAX's cuDNN attention (not a timeout) gets one more try with MaxText's
# other GPU kernel, tokamax's Pallas/Triton flash attention.
if (($? && SECONDS - start < 60)) && [[ $attention == cudnn_flash_jax ]]; then
  mv "$out/maxtext.txt" "$out/maxtext_cudnn_flash_jax.txt"
  attention=flash
  maxtext flash 120
fi
echo "== euro_lm: ${el[*]} ${EL_ARGS:-}"
timeout "${EL_TIMEOUT:-110}" python3 -m euro_lm.bench "${el[@]}" ${EL_ARGS:-} 2>&1 |
  grep -v "^W\|^I[0-9]" | tee "$out/euro_lm.txt" | tail -6

python3 - "$out" "$((B * T))" "$attention" <<'PY'
import re, statistics, sys
out, tokens, attention = sys.argv[1], int(sys.argv[2]), sys.argv[3]
steps = [(int(s), float(t)) for s, t in re.findall(
    r'completed step: (\d+), seconds: ([\d.]+)', open(f'{out}/maxtext.txt').read())]
# MaxText times each step from the previous one's end; the first two hold compilation and warm-up.
mt = statistics.median(t for s, t in steps if s >= 2) if len(steps) > 2 else None
row = [l for l in open(f'{out}/euro_lm.txt') if re.match(r'\| \d+x ', l)]
el = float(row[0].split('|')[6].replace(',', '')) if row else None
mt_tps = tokens / mt if mt else None
fmt = lambda x, f='{:,.0f}': f.format(x) if x else 'n/a'
print('\n| tokens/step | MaxText attention | MaxText step ms | MaxText tokens/s | euro_lm tokens/s '
      '| euro_lm / MaxText |\n|---|---|---|---|---|---|')
print(f'| {tokens} | {attention} | {fmt(mt and 1e3 * mt, "{:.1f}")} | {fmt(mt_tps)} | {fmt(el)} '
      f'| {fmt(mt_tps and el and el / mt_tps, "{:.3f}")} |')
PY
echo "total ${SECONDS} s"
