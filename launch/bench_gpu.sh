#!/usr/bin/env bash
# Train-step benchmarks on one GPU: the 1B preset at 4k context in a few variants, plus
# 125M. Usage: bash launch/bench_gpu.sh [OUTDIR]   (prints markdown tables; ~7-8 min on H100)
set -uo pipefail
out=${1:-bench_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
run() {  # name, then bench arguments
  local name=$1; shift
  echo "== $name: $*"
  timeout 240 python3 -m euro_lm.bench "$@" 2>&1 | grep -v "^W\|^I[0-9]" | tee "$out/$name.txt" | tail -4
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
python3 -c "import jax, flax, optax, ml_collections; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" ||
  { echo "euro_lm's dependencies are missing: pip install -e . (from the repository root)"; exit 1; }
# Correctness first: cuDNN attention (packed segments, GQA) against the XLA reference.
python3 - <<'PY'
import jax, jax.numpy as jnp, numpy as np
from euro_lm.model.attention import attention
ks = jax.random.split(jax.random.key(0), 4)
q = jax.random.normal(ks[0], (2, 1024, 16, 128), jnp.bfloat16)
k, v = (jax.random.normal(x, (2, 1024, 4, 128), jnp.bfloat16) for x in ks[1:3])
seg = jnp.concatenate([jnp.ones((2, 300), jnp.int32), jnp.full((2, 724), 2, jnp.int32)], 1)
def f(impl):
  fn = lambda q, k, v: (attention(q, k, v, segment_ids_BL=seg, impl=impl).astype(jnp.float32) * v.mean()).sum()
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))(q, k, v)
(lx, gx), (lc, gc) = f('xla'), f('cudnn')
rel = lambda a, b: float(jnp.linalg.norm((a - b).astype(jnp.float32)) / jnp.linalg.norm(b.astype(jnp.float32)))
print('cudnn vs xla: loss rel err', abs(float(lc - lx)) / abs(float(lx)), 'grad rel err', [round(rel(a, b), 5) for a, b in zip(gc, gx)])
PY
b=--config.train.global_batch_size
# euro_lm's own attention kernels (on an H100/H200: the Hopper ones) against cuDNN's, at the
# same batch; the pallas kernels skip the blocks that document edges hide, where cuDNN gets a
# dense [B, 1, L, L] mask.
run 1b_pallas_dots --config=configs/llama_1b.py:gpu --config.model.attention_impl=pallas $b=8 --steps=8
cudnn=--config.model.attention_impl=cudnn  # the :gpu preset's auto runs our kernels on Hopper
run 1b_cudnn_noremat --config=configs/llama_1b.py:gpu $cudnn --config.model.remat_policy=none $b=4 --steps=8
run 1b_cudnn_dots --config=configs/llama_1b.py:gpu $cudnn $b=8 --steps=8
# The xla attention (the fallback where cuDNN is missing, as on AMD GPUs), in query chunks
# since 6f4a512: it ran out of memory before that.
run 1b_xla_noremat --config=configs/llama_1b.py:gpu --config.model.attention_impl=xla --config.model.remat_policy=none $b=4 --steps=8
# The fused, chunked loss (model.loss_chunk_length): same batch (A/B), then the batch of 16
# that needs 91 GiB without it (H200) and should fit an H100 with it.
chunk=--config.model.loss_chunk_length=512
run 1b_cudnn_dots_chunked --config=configs/llama_1b.py:gpu $cudnn $chunk $b=8 --steps=8
run 1b_cudnn_dots_b16_chunked --config=configs/llama_1b.py:gpu $cudnn $chunk $b=16 --steps=6
run 125m_cudnn --config=configs/llama_125m.py:bf16 --config.model.attention_impl=cudnn $b=16 --steps=10 --compile_layers=4,32
