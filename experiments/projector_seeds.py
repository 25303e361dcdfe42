"""Seed-to-seed noise vs the projector's effect on held-out loss (EXPERIMENTS.md, issue 6).

Reads ROOT/{projector}_s{seed}/metrics.jsonl written by `benchmarks/pretrain_compare.sh` and, at
every evaluation step, compares the two projectors run with the same seeds (same init and data
order): each projector's mean and sample std over seeds, and the paired difference with a
two-sided 95% Student-t interval. Prints a markdown table and writes ROOT/summary.json.

python experiments/projector_seeds.py experiments/projector_seeds_60m [--a svd --b gram_eigh]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import statistics

from scipy import stats

TOKENS_PER_LOG_WINDOW = 50 * 128 * 256  # log_every x batch x seq of configs/llama_60m.py


def read_run(path: pathlib.Path) -> tuple[dict[int, float], float]:
    """Held-out loss by step, and seconds spent in training steps (sum over log windows)."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    step_seconds = sum(
        TOKENS_PER_LOG_WINDOW / r["tokens_per_s"] for r in records if "tokens_per_s" in r
    )
    return evals, step_seconds


def load(root: pathlib.Path, projector: str) -> dict[int, tuple[dict[int, float], float]]:
    """Runs of one projector, keyed by seed."""
    runs = {}
    for directory in sorted(root.glob(f"{projector}_s*")):
        match = re.fullmatch(rf"{re.escape(projector)}_s(\d+)", directory.name)
        if match:
            runs[int(match.group(1))] = read_run(directory / "metrics.jsonl")
    if not runs:
        raise FileNotFoundError(f"no {projector}_s<seed>/metrics.jsonl under {root}")
    return runs


def paired_interval(differences: list[float], level: float = 0.95) -> tuple[float, float]:
    """Mean of paired differences and the half-width of its two-sided Student-t interval."""
    n = len(differences)
    if n < 2:
        raise ValueError(f"a paired interval needs at least 2 seeds, got {n}")
    half = stats.t.ppf(0.5 + level / 2, n - 1) * statistics.stdev(differences) / n**0.5
    return statistics.fmean(differences), half


def summarize(root: pathlib.Path, a: str, b: str) -> dict:
    runs_a, runs_b = load(root, a), load(root, b)
    seeds = sorted(set(runs_a) & set(runs_b))
    if len(seeds) < 2:
        raise ValueError(f"{a} and {b} share {len(seeds)} seed(s) under {root}; need >= 2")
    steps = sorted(set.intersection(*(set(runs_a[s][0]) & set(runs_b[s][0]) for s in seeds)))
    rows = []
    for step in steps[1:]:  # step 0 is the shared initialisation
        loss_a = [runs_a[s][0][step] for s in seeds]
        loss_b = [runs_b[s][0][step] for s in seeds]
        diff, half = paired_interval([y - x for x, y in zip(loss_a, loss_b, strict=True)])
        rows.append(
            {
                "step": step,
                f"{a}_mean": statistics.fmean(loss_a),
                f"{a}_std": statistics.stdev(loss_a),
                f"{b}_mean": statistics.fmean(loss_b),
                f"{b}_std": statistics.stdev(loss_b),
                "diff_mean": diff,
                "diff_ci95": half,
            }
        )
    time_a = [runs_a[s][1] for s in seeds]
    time_b = [runs_b[s][1] for s in seeds]
    ratio, ratio_half = paired_interval([tb / ta for ta, tb in zip(time_a, time_b, strict=True)])
    return {
        "seeds": seeds,
        "a": a,
        "b": b,
        "rows": rows,
        f"{a}_step_seconds": time_a,
        f"{b}_step_seconds": time_b,
        "time_ratio_mean": ratio,
        "time_ratio_ci95": ratio_half,
    }


def markdown(summary: dict) -> str:
    a, b = summary["a"], summary["b"]
    lines = [
        f"| step | {a} mean ± std | {b} mean ± std | {b} − {a} (paired mean ± 95% CI) |",
        "|---|---|---|---|",
    ]
    for r in summary["rows"]:
        lines.append(
            f"| {r['step']} | {r[f'{a}_mean']:.4f} ± {r[f'{a}_std']:.4f} "
            f"| {r[f'{b}_mean']:.4f} ± {r[f'{b}_std']:.4f} "
            f"| {r['diff_mean']:+.4f} ± {r['diff_ci95']:.4f} |"
        )
    ta, tb = summary[f"{a}_step_seconds"], summary[f"{b}_step_seconds"]
    lines.append(
        f"\nseeds {summary['seeds']}; seconds in training steps: {a} "
        f"{statistics.fmean(ta):.1f} ± {statistics.stdev(ta):.1f}, {b} "
        f"{statistics.fmean(tb):.1f} ± {statistics.stdev(tb):.1f}; {b}/{a} "
        f"{summary['time_ratio_mean']:.3f} ± {summary['time_ratio_ci95']:.3f} (paired, 95% CI)"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=pathlib.Path)
    parser.add_argument("--a", default="svd", help="reference projector")
    parser.add_argument("--b", default="gram_eigh", help="projector compared against it")
    args = parser.parse_args()
    summary = summarize(args.root, args.a, args.b)
    print(markdown(summary))
    (args.root / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
