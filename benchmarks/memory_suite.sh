#!/usr/bin/env bash
# Issue 19's memory table in ONE GPU call (<= 9 min wall on one H200): our trainer's rows
# (benchmarks/memory.py) and galore-torch's (benchmarks/galore_torch_step.py), one row per
# process, one after the other, most important first.
#
#   bash benchmarks/memory_suite.sh                      # from the repository root
#   OUT=/tmp/mem SUITE_BUDGET_S=300 bash benchmarks/memory_suite.sh
#   SUITE_SMOKE=1 bash benchmarks/memory_suite.sh        # CPU: tiny shapes, checks the plumbing
#
# Writes under $OUT (default benchmarks/results/memory_suite): memory_7b.json, memory_1b.json,
# galore_torch_7b.json, galore_torch_1b.json, galore_torch_1b_plain.json, skipped.txt and
# suite.log (every row's JSON line too: stdout shows progress, errors and the final tables).
# A row that runs out of memory is recorded as "OOM", one that errs as "failed", and the
# suite goes on. A row is skipped (listed in skipped.txt) when less than its usual time is
# left in SUITE_BUDGET_S (default 530 s), so the call ends in time.
#
# Every row: seq 256, batch 16, random tokens, no gradient clipping (galore-torch's per-layer
# mode cannot clip globally either). galore-torch comes from .whl/galore_torch-1.0-*.whl (carry
# .whl to the GPU machine) or the environment; at 7B its SVD is replaced by a random
# orthonormal basis (memory; every row says which projector ran).
set -u
export PYTHONUNBUFFERED=1  # the log keeps what a row printed even if the call is cut short
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/memory_suite}
BUDGET=${SUITE_BUDGET_S:-530}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
: >"$OUT/skipped.txt"
LOG="$OUT/suite.log"
echo "memory suite $(date -u +%FT%TZ) budget ${BUDGET}s host $(hostname)" | tee "$LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee -a "$LOG"

if [ "${SUITE_SMOKE:-0}" = 1 ]; then  # CPU plumbing check: tiny model, few steps
  C7=configs/llama_tiny.py C1=configs/llama_tiny.py
  SHAPE=(--set batch_size=2 --set seq_len=32 --set model.num_layers=2 --set optimizer.subspace.rank=8)
  TORCH=(--device cpu --tiny --warmup 1 --steps 2 --refresh-steps 1)
  STEADY=2
else
  C7=configs/llama_7b.py C1=configs/llama_1b.py
  SHAPE=(--set batch_size=16 --set seq_len=256)
  TORCH=(--batch 16 --seq 256 --warmup 2 --steps 10 --refresh-steps 1)
  STEADY=5
fi
COMMON=(--set optimizer.grad_clip=0.0)
# All memory options: bf16 params + stochastic rounding, bf16 bases, 8-bit moments,
# remat, and (SUITE_LAYERWISE, "" to leave out) stacked layers with the layer-wise update
# fused into the backward pass.
LAYERWISE=${SUITE_LAYERWISE-model.scan_layers=True step.layerwise=True}
LOWMEM="model.param_dtype=bfloat16 step.stochastic_rounding=True \
optimizer.subspace.basis_dtype=bfloat16 optimizer.inner.name=adamw8bit model.remat=True $LAYERWISE"

# 7B: one matrix per decomposition call inside the layer-wise refresh (same bases; -1.3 GiB).
ONE_PER_CALL="optimizer.subspace.refresh_batch_size=1"
# 1B without the layer-wise step: the options alone, stacked layers (refresh per layer) or
# unstacked (one batched refresh over all layers, bounded to 32 matrices a call).
NOLW="model.param_dtype=bfloat16 step.stochastic_rounding=True \
optimizer.subspace.basis_dtype=bfloat16 optimizer.inner.name=adamw8bit model.remat=True"

left() { echo $((BUDGET - SECONDS)); }
# stdout keeps progress and errors; every row's JSON line and table go to the log only
progress() { grep -v -e '^{' -e '^|' -e '^Method:' -e '^Projector:' -e '^$'; }

# ours NEED_S JSON CONFIG "LABEL: KEY=VALUE ...": one trainer row (benchmarks/memory.py)
ours() {
  local need=$1 json=$2 config=$3 row=$4
  if [ "$(left)" -lt "$need" ]; then
    echo "skipped (needs ~${need}s, $(left)s left): $row" | tee -a "$OUT/skipped.txt" "$LOG"
    return
  fi
  echo "== ours ($config) $row [$(left)s left]" | tee -a "$LOG"
  "$PY" -m benchmarks.memory --config "$config" "${SHAPE[@]}" "${COMMON[@]}" --row "$row" \
    --steady-steps "$STEADY" --timeout "$(left)" --json "$OUT/$json" --append 2>&1 |
    tee -a "$LOG" | progress
}

# theirs NEED_S JSON MODEL OPTIMIZER [ARGS...]: one galore-torch row
theirs() {
  local need=$1 json=$2 model=$3 opt=$4
  shift 4
  if [ "$(left)" -lt "$need" ]; then
    echo "skipped (needs ~${need}s, $(left)s left): galore-torch $model $opt" |
      tee -a "$OUT/skipped.txt" "$LOG"
    return
  fi
  echo "== galore-torch $model $opt $* [$(left)s left]" | tee -a "$LOG"
  "$PY" -m benchmarks.galore_torch_step --models "$model" --optimizers "$opt" "${TORCH[@]}" \
    --timeout "$(left)" --json "$OUT/$json" "$@" 2>&1 | tee -a "$LOG" | progress
}

# Most important first: the 7B headline (ours and galore-torch per-layer), then the 1B pair,
# then GoLore and the hybrid.
ours 120 memory_7b.json "$C7" "7b galore lowmem: optimizer.name=galore $LOWMEM $ONE_PER_CALL"
theirs 80 galore_torch_7b.json llama_7b galore_torch_per_layer --random-basis
ours 70 memory_1b.json "$C1" "1b galore plain: optimizer.name=galore"
ours 70 memory_1b.json "$C1" "1b galore lowmem: optimizer.name=galore $LOWMEM"
theirs 100 galore_torch_1b.json llama_1b galore_torch_per_layer
ours 90 memory_7b.json "$C7" "7b golore lowmem: optimizer.name=golore $LOWMEM"
ours 120 memory_7b.json "$C7" "7b hybrid lowmem: optimizer.name=hybrid $LOWMEM $ONE_PER_CALL"
ours 60 memory_1b.json "$C1" "1b golore lowmem: optimizer.name=golore $LOWMEM"
ours 70 memory_1b.json "$C1" "1b hybrid lowmem: optimizer.name=hybrid $LOWMEM"
ours 90 memory_1b.json "$C1" "1b galore options stacked: optimizer.name=galore $NOLW model.scan_layers=True"
ours 200 memory_1b.json "$C1" "1b galore options unstacked: optimizer.name=galore $NOLW optimizer.subspace.refresh_batch_size=32"
ours 200 memory_1b.json "$C1" "1b hybrid options unstacked: optimizer.name=hybrid $NOLW optimizer.subspace.refresh_batch_size=32"
theirs 100 galore_torch_1b_plain.json llama_1b galore_torch

echo "== tables [$(left)s left]" | tee -a "$LOG"
"$PY" - "$OUT" <<'EOF' 2>&1 | tee -a "$LOG"
import json, pathlib, sys
from benchmarks import galore_torch_step, memory
out = pathlib.Path(sys.argv[1])
ours = [r for f in sorted(out.glob("memory_*.json")) for r in json.loads(f.read_text())]
theirs = [r for f in sorted(out.glob("galore_torch_*.json")) for r in json.loads(f.read_text())]
if ours:
    memory.print_table(ours)
if theirs:
    print()
    galore_torch_step.print_table(theirs)
skipped = (out / "skipped.txt").read_text().strip()
print("\nskipped:\n" + skipped if skipped else "\nnothing skipped")
EOF
echo "done in ${SECONDS}s" | tee -a "$LOG"
