#!/usr/bin/env bash
# Issue 32: the paper's Figure 3 recipe (configs/figure3_sampled.py: LLaMA-60M, 10,000 steps,
# batch 128 x 256, lr 1e-3, rank 128, tau 200) on the endless sampled corpus, one method after
# another, resumable across invocations.
#
#   experiments/figure3_sampled.sh OUTDIR "SEEDS" "METHODS" [--config.key=value ...]
#   e.g. experiments/figure3_sampled.sh runs/fig3 "0" "adamw galore hybrid golore"
#        experiments/figure3_sampled.sh runs/fig3 "1 2" "galore hybrid"
#
# Each (method, seed) trains in OUTDIR/METHOD_sSEED; a finished run (an eval record at the
# last step in its metrics.jsonl) is skipped, an unfinished one resumes from its checkpoint.
# BUDGET_S (seconds, default: none) bounds this invocation: the running job gets SIGTERM when
# it runs out, saves and exits (the trainer's signal handling), and the loop stops; rerun the
# same command to go on. Every invocation of a run appends "start end seconds" to its
# OUTDIR/METHOD_sSEED/wall_s.log (the GPU time each run took, compile and evals included).
# CACHE_DIR (default OUTDIR/cache) holds the tokenizer, tokens, fitted source and floor;
# OUTDIR/xla the compiled steps (a resumed run does not compile again). NUM_STEPS (default
# 10000) is the step at which a run counts as finished: pass the same --config.num_steps.
set -uo pipefail
out=${1:?outdir}; seeds=${2:?seeds}; methods=${3:?methods}; shift 3
cache=${CACHE_DIR:-$out/cache}
python=${PYTHON:-python}
start_all=$(date +%s)
mkdir -p "$out"
for seed in $seeds; do
  for m in $methods; do
    dir="$out/${m}_s$seed"
    if [ -f "$dir/metrics.jsonl" ] && "$python" - "$dir/metrics.jsonl" "${NUM_STEPS:-10000}" <<'PY'
import json, sys
records = [json.loads(x) for x in open(sys.argv[1]) if x.strip()]
steps = [r["step"] for r in records if "eval_loss" in r]
sys.exit(0 if steps and max(steps) >= int(sys.argv[2]) else 1)
PY
    then echo "$dir: finished"; continue; fi
    limit=()
    if [ -n "${BUDGET_S:-}" ]; then
      left=$(( BUDGET_S - ($(date +%s) - start_all) ))
      if [ "$left" -le 30 ]; then echo "budget spent: rerun to resume at $dir"; exit 0; fi
      limit=(timeout --signal=TERM --kill-after=120 "$left")
    fi
    mkdir -p "$dir"
    t0=$(date +%s)
    "${limit[@]}" "$python" -m train --config configs/figure3_sampled.py --workdir "$dir" \
      --config.optimizer.name="$m" --config.seed="$seed" --config.data.cache_dir="$cache" \
      --config.compilation_cache_dir="$out/xla" "$@"
    rc=$?
    t1=$(date +%s)
    echo "$t0 $t1 $(( t1 - t0 ))" >> "$dir/wall_s.log"
    if [ "$rc" -ne 0 ]; then
      echo "$dir: exit $rc (124/143: the budget ran out and the run saved; rerun to resume)"
      exit 0
    fi
  done
done
