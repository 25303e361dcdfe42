# Call B of BENCHMARKS section 11 (one H200, 2026-12-06, the tree of 8778de6), exactly as run;
# `python -m benchmarks.axis_types --compile-only --compiles 5` now runs the same loop (plus a
# gc.collect() before each compile and the program statistics).
python3 -c "
import statistics, time, json, os
from benchmarks.axis_types import build, compile_seconds, MODES
from train import xla_flags
xla_flags.apply_defaults()
t, b = build('llama_1b', 'auto', 4, 256); print('warm', compile_seconds(t, b)[1], flush=True)
res = {m: [] for m in MODES}
for r in range(5):
    for m in (MODES if r % 2 == 0 else MODES[::-1]):
        t, b = build('llama_1b', m, 4, 256)
        _, s, n = compile_seconds(t, b); res[m].append(s); print(r, m, round(s, 2), n, flush=True)
        json.dump(res, open(os.environ['OUT'] + '/compiles.json', 'w'))
for m in MODES: print(m, 'median', statistics.median(res[m]), 'ratio', statistics.median(res[m]) / statistics.median(res['auto']))
"
