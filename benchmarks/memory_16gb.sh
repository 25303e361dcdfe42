#!/usr/bin/env bash
# Issue 31's table in ONE GPU call (<= 6 min on one H100): LLaMA-7B, seq 256, batch 16, our
# 16 GB recipe (GaLore rank 1024; GoLore rank 256) beside galore-torch 1.0 per-layer, each row a
# fresh process, most important first.
#
#   ANCHORS=DIR GALORE_TORCH_PATH=DIR bash benchmarks/memory_16gb.sh
#   SUITE_SMOKE=1 bash benchmarks/memory_16gb.sh      # CPU: tiny shapes, our rows only
#
# ANCHORS holds galore_torch_7b_memory.py and galore_torch_7b_refresh.py (the session's
# ../shared/anchors); GALORE_TORCH_PATH the unzipped galore-torch 1.0 wheel. Writes under $OUT
# (default benchmarks/results/memory_16gb): memory_7b.json (our rows, benchmarks/memory.py),
# galore_torch.jsonl (the anchors' lines), summary.json (the ratios) and suite.log.
#
# galore-torch's refresh is timed with its own SVD on REFRESH_LAYERS layers (default 3: 21
# matrices) and scaled by 32 / REFRESH_LAYERS (one SVD per matrix, all layers alike).
set -u
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/memory_16gb}
BUDGET=${SUITE_BUDGET_S:-340}
PY=${PYTHON:-python3}
ANCHORS=${ANCHORS:-../shared/anchors}
export GALORE_TORCH_PATH=${GALORE_TORCH_PATH:-$ANCHORS/gt}
REFRESH_LAYERS=${REFRESH_LAYERS:-3}
LAZY=${LAZY:-}  # e.g. "optimizer.subspace.lazy_threshold=0.9": the lazy refresh's keys
mkdir -p "$OUT"
LOG="$OUT/suite.log"
echo "memory 16gb $(date -u +%FT%TZ) budget ${BUDGET}s" | tee "$LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee -a "$LOG"

if [ "${SUITE_SMOKE:-0}" = 1 ]; then
  CONFIG=configs/llama_tiny.py
  SHAPE=(--set batch_size=2 --set seq_len=32 --set model.num_layers=2)
  R1024=8 R256=4 STEADY=2
else
  CONFIG=configs/llama_7b.py
  SHAPE=(--set batch_size=16 --set seq_len=256)
  R1024=1024 R256=256 STEADY=5
fi
# The 16 GB recipe: int8 layers (bf16 embedding/head/norms, stochastic rounding), int4 bases,
# 8-bit moments, remat, the layer-wise update inside the backward pass; no global clip (the
# layer-wise step cannot clip globally; galore-torch per-layer cannot either).
RECIPE="model.weight_storage=int8 model.param_dtype=bfloat16 step.stochastic_rounding=True \
optimizer.subspace.basis_dtype=${BASES:-int4} optimizer.inner.name=adamw8bit model.remat=True \
model.scan_layers=True step.layerwise=True optimizer.grad_clip=0.0"
left() { echo $((BUDGET - SECONDS)); }

ours() {  # ours "LABEL: KEY=VALUE ..."
  echo "== ours $1 [$(left)s left]" | tee -a "$LOG"
  "$PY" -m benchmarks.memory --config "$CONFIG" "${SHAPE[@]}" --row "$1" \
    --steady-steps "$STEADY" --timeout "$(left)" --json "$OUT/memory_7b.json" --append \
    >>"$LOG" 2>&1
  tail -n 1 "$OUT/memory_7b.json" >/dev/null 2>&1
}
theirs() {  # theirs SCRIPT ARGS...: one anchor process, its JSON line into galore_torch.jsonl
  local script=$1
  shift
  echo "== galore-torch $script $* [$(left)s left]" | tee -a "$LOG"
  timeout "$(left)" "$PY" "$ANCHORS/$script" "$@" 2>>"$LOG" | tee -a "$LOG" |
    grep -E '^\{.*"(step_times|tokens_per_s)"' | sed "s|^{|{\"script\": \"$script\", \"args\": \"$*\", |" >>"$OUT/galore_torch.jsonl"
}

ours "7b galore r1024 16gb: optimizer.name=galore optimizer.subspace.rank=$R1024 \
optimizer.subspace.refresh_batch_size=1 $RECIPE $LAZY"
if [ "${SUITE_SMOKE:-0}" != 1 ]; then
  theirs galore_torch_7b_memory.py 16 256 layerwise
  theirs galore_torch_7b_refresh.py 16 256 "$REFRESH_LAYERS" 3 4
fi
ours "7b golore r256 16gb: optimizer.name=golore optimizer.subspace.rank=$R256 $RECIPE"

echo "== summary [$(left)s left]" | tee -a "$LOG"
"$PY" - "$OUT" "$REFRESH_LAYERS" <<'EOF' 2>&1 | tee -a "$LOG"
import json, pathlib, sys
out, layers = pathlib.Path(sys.argv[1]), int(sys.argv[2])
ours = json.loads((out / "memory_7b.json").read_text()) if (out / "memory_7b.json").exists() else []
lines = (out / "galore_torch.jsonl").read_text().splitlines() if (out / "galore_torch.jsonl").exists() else []
theirs = [json.loads(x) for x in lines if x.strip()]
summary = {"ours": [], "galore_torch": theirs, "refresh_layers": layers, "tau": 500}
mem = next((t for t in theirs if "tokens_per_s" in t), None)
ref = next((t for t in theirs if "step_times" in t), None)
if mem and ref:
    times = ref["step_times"]
    # refreshes at steps 0 and 3: the second one (no first-call costs) minus a steady step
    extra = (times[3] - min(times[1], times[2])) * 32 / layers
    summary["galore_torch_refresh_s_7b"] = extra
    summary["galore_torch_amortized_tokens_per_s"] = 16 * 256 / (mem["step_s"] + extra / 500)
for r in ours:
    row = {k: r.get(k) for k in ("label", "status", "device", "peak_bytes", "peak_step_bytes",
                                 "steady_tokens_per_s", "refresh_step_s",
                                 "amortized_tokens_per_s", "refreshes_done",
                                 "refreshes_scheduled", "params_bytes", "state_bytes",
                                 "compiled_temp_bytes")}
    row["peak_GiB"] = (r.get("peak_bytes") or 0) / 2**30
    if mem and r.get("steady_tokens_per_s"):
        row["steady_vs_galore_torch"] = r["steady_tokens_per_s"] / mem["tokens_per_s"]
    if "galore_torch_amortized_tokens_per_s" in summary and r.get("amortized_tokens_per_s"):
        row["amortized_vs_galore_torch"] = (
            r["amortized_tokens_per_s"] / summary["galore_torch_amortized_tokens_per_s"])
    summary["ours"].append(row)
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print(json.dumps(summary, indent=1))
EOF
echo "done in ${SECONDS}s" | tee -a "$LOG"
