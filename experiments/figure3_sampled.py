"""Summarise experiments/figure3_sampled.sh's runs (issue 32): held-out loss and its excess
over the source at fixed steps, paired GaLore - GoLore@20% differences over seeds, the curves,
the gradient noise-to-signal ratio and the subspace overlap over training.

python experiments/figure3_sampled.py OUTDIR [--steps 2500,5000,7500,10000]

Writes OUTDIR/summary.json and OUTDIR/figure3_sampled.png and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import re
from collections import defaultdict

import numpy as np

LABELS = {"adamw": "AdamW (full)", "galore": "GaLore", "hybrid": "GoLore@20%", "golore": "GoLore"}
# Two-sided 95% Student t quantiles, df = 1..10 (for intervals over a few seeds).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def read_runs(root: pathlib.Path) -> dict[str, dict[int, list[dict]]]:
    """method -> seed -> metrics.jsonl records, for every OUTDIR/METHOD_sSEED."""
    runs: dict[str, dict[int, list[dict]]] = defaultdict(dict)
    for path in sorted(root.glob("*_s*/metrics.jsonl")):
        match = re.fullmatch(r"(\w+)_s(\d+)", path.parent.name)
        if match:
            records = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            runs[match[1]][int(match[2])] = records
    return runs


def evals(records: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in records if "eval_loss" in r}


def wall_seconds(root: pathlib.Path, method: str, seed: int) -> int | None:
    log = root / f"{method}_s{seed}" / "wall_s.log"
    if not log.is_file():
        return None
    return sum(int(line.split()[2]) for line in log.read_text().splitlines() if line.strip())


def paired(a: list[float], b: list[float]) -> dict:
    """Mean of a - b over paired seeds with its 95% t interval (None with one seed)."""
    d = np.asarray(a) - np.asarray(b)
    out = {"n": int(d.size), "mean": float(d.mean())}
    if d.size >= 2:
        half = T975[min(d.size - 1, len(T975)) - 1] * d.std(ddof=1) / math.sqrt(d.size)
        out["ci95"] = [float(d.mean() - half), float(d.mean() + half)]
    return out


def summarise(root: pathlib.Path, steps: list[int]) -> dict:
    runs = read_runs(root)
    table = {}
    for method, seeds in runs.items():
        rows = {}
        for step in steps:
            values = [evals(r)[step] for r in seeds.values() if step in evals(r)]
            if values:
                rows[step] = {
                    "seeds": len(values),
                    "eval_loss": float(np.mean([v["eval_loss"] for v in values])),
                    "eval_excess": float(np.mean([v.get("eval_excess", math.nan) for v in values])),
                }
        table[method] = {
            "at": rows,
            "seeds": sorted(seeds),
            "wall_s": {s: wall_seconds(root, method, s) for s in sorted(seeds)},
            "floor": next(
                (r["eval_floor"] for rs in seeds.values() for r in rs if "eval_floor" in r), None
            ),
        }
    comparison = {}
    if "galore" in runs and "hybrid" in runs:
        for step in steps:
            common = [
                s
                for s in runs["galore"]
                if s in runs["hybrid"]
                and step in evals(runs["galore"][s])
                and step in evals(runs["hybrid"][s])
            ]
            if common:
                comparison[step] = paired(
                    [evals(runs["galore"][s])[step]["eval_loss"] for s in common],
                    [evals(runs["hybrid"][s])[step]["eval_loss"] for s in common],
                )
    return {"table": table, "galore_minus_hybrid": comparison}


def plot(root: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = read_runs(root)
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    for method, seeds in runs.items():
        label = LABELS.get(method, method)
        for i, (_seed, records) in enumerate(sorted(seeds.items())):
            kw = {"label": label if i == 0 else None, "color": f"C{list(LABELS).index(method)}"}
            ev = sorted((s, r) for s, r in evals(records).items() if s > 0)
            axes[0].plot(
                [s for s, _ in ev],
                [r.get("eval_excess", r["eval_loss"]) for _, r in ev],
                "o-",
                **kw,
            )
            train = [r for r in records if "loss" in r]
            axes[1].plot([r["step"] for r in train], [r["loss"] for r in train], **kw)
            noise = [r for r in records if "noise_to_signal" in r]
            axes[2].plot(
                [r["grad_noise_step"] for r in noise], [r["noise_to_signal"] for r in noise], **kw
            )
            overlap = [r for r in records if "subspace_overlap_mean" in r]
            axes[3].plot(
                [r["subspace_overlap_step"] for r in overlap],
                [r["subspace_overlap_mean"] for r in overlap],
                "o-",
                **kw,
            )
    axes[0].set(title="held-out loss - source's loss (excess, nats)", xlabel="step")
    axes[1].set(title="train loss", xlabel="step", yscale="log")
    axes[2].set(
        title="noise / signal of the step's gradient (all matrices)", xlabel="step", yscale="log"
    )
    axes[3].set(title="subspace overlap at refresh (mean over matrices)", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("LLaMA-60M on the sampled trigram corpus (batch 128 x 256, lr 1e-3, rank 128)")
    fig.tight_layout()
    fig.savefig(root / "figure3_sampled.png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=pathlib.Path)
    parser.add_argument("--steps", default="2500,5000,7500,10000")
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    summary = summarise(args.root, steps)
    (args.root / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(args.root)
    print(
        "| method | seeds | " + " | ".join(f"step {s}: loss / excess" for s in steps) + " | GPU s |"
    )
    print("|---|---|" + "---|" * len(steps) + "---|")
    for method in [m for m in LABELS if m in summary["table"]]:
        row = summary["table"][method]
        cells = [
            f"{row['at'][s]['eval_loss']:.4f} / {row['at'][s]['eval_excess']:.4f}"
            if s in row["at"]
            else "-"
            for s in steps
        ]
        wall = sum(w for w in row["wall_s"].values() if w)
        print(f"| {LABELS[method]} | {len(row['seeds'])} | " + " | ".join(cells) + f" | {wall} |")
    for step, d in summary["galore_minus_hybrid"].items():
        print(f"GaLore - GoLore@20% at step {step}: {d}")


if __name__ == "__main__":
    main()
