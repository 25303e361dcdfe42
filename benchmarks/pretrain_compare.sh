#!/usr/bin/env bash
# Issue 8: LLaMA-60M, the paper's recipe (configs/llama_60m.py), one run per method, same seed
# and data order. Usage: benchmarks/pretrain_compare.sh OUTDIR STEPS "adamw galore hybrid golore"
# Extra --config overrides may follow the method list.
set -euo pipefail
out=${1:?outdir}; steps=${2:?steps}; methods=${3:-"adamw galore hybrid golore"}; shift 3 || true
warmup=$(( steps / 10 ))
for m in $methods; do
  python -m train --config configs/llama_60m.py --workdir "$out/$m" \
    --config.optimizer.name="$m" --config.num_steps="$steps" \
    --config.optimizer.warmup_steps="$warmup" --config.eval_every=$(( steps / 4 )) \
    --config.checkpoint_every="$steps" --config.log_every=50 "$@" 2>&1 \
    | grep -vE "^I1|^W1|it/s|step/s" | tail -n 3
done
