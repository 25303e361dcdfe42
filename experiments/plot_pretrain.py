"""Plot the LLaMA-60M pre-training comparison (EXPERIMENTS.md) from the runs' metrics.jsonl.

python experiments/plot_pretrain.py experiments/pretrain_60m
"""

from __future__ import annotations

import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

LABELS = {"adamw": "AdamW (full)", "galore": "GaLore", "hybrid": "GoLore@20%", "golore": "GoLore"}


def main(root: pathlib.Path) -> None:
    fig, (train_ax, eval_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for method, label in LABELS.items():
        records = [
            json.loads(x) for x in (root / method / "metrics.jsonl").read_text().split("\n") if x
        ]
        train = [r for r in records if "loss" in r]
        evals = [r for r in records if "eval_loss" in r and r["step"] > 0]
        train_ax.plot([r["step"] for r in train], [r["loss"] for r in train], label=label)
        eval_ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label=label)
    train_ax.set(title="train loss", xlabel="step", ylabel="cross-entropy", yscale="log")
    eval_ax.set(title="held-out loss", xlabel="step", ylabel="cross-entropy")
    for ax in (train_ax, eval_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("LLaMA-60M on GCIDE (4.8M tokens), batch 128 x 256, lr 1e-3, rank 128, tau 200")
    fig.tight_layout()
    fig.savefig(root / "loss_curves.png", dpi=120)


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
