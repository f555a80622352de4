#!/usr/bin/env bash
# The README's main job on one GPU: the tiny config in bfloat16 with cuDNN attention on the
# embedded corpus, then the same command extended (auto-resume). Usage: bash launch/gpu_smoke.sh DIR
set -euo pipefail
dir=${1:-runs/gpu_smoke}
export PYTHONUNBUFFERED=1
common=(--config=configs/tiny.py --workdir="$dir" --config.model.compute_dtype=bfloat16
        --config.model.attention_impl=cudnn --config.train.eval_every=100)
python3 -m euro_lm.train "${common[@]}" --config.train.steps=200 2>&1 | tr '\r' '\n' | grep -v '%|'
python3 -m euro_lm.train "${common[@]}" --config.train.steps=300 2>&1 | tr '\r' '\n' | grep -v '%|'
python3 - "$dir" <<'PY'
import json, sys
records = [json.loads(l) for l in open(f'{sys.argv[1]}/metrics.jsonl')]
train = [r for r in records if 'loss' in r]
evals = [r for r in records if 'valid/loss' in r]
print('train loss:', [(r['step'], round(r['loss'], 3)) for r in train[::3]])
print('valid loss:', [(r['step'], round(r['valid/loss'], 3)) for r in evals])
print('tokens/s at the end:', round(train[-1]['tokens_per_second']))
PY
