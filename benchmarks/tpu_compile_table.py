"""docs/tpu_compile.md's table: ``python -m train.compile`` for each model x optimizer x topology.

``python -m benchmarks.tpu_compile_table [--only llama_1b] [--timeout 1800]`` runs the compiles
one after another (each a ``nice -n 10`` subprocess; a report already in ``--results`` is kept)
and prints the markdown table of every report found. ``--table`` only prints the table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

MODELS = ("llama_1b", "llama_7b")
OPTIMIZERS = ("adamw", "galore", "golore")
# Variants beyond the table's grid, run only when asked for (--variants): name -> (optimizer,
# extra flags). The layer-wise step refreshes one layer at a time inside the backward scan
# (the memory-lean path; per-layer gradient clipping, since the global norm never exists).
VARIANTS = {
    "galore_layerwise": (
        "galore",
        [
            "--config.model.scan_layers=True",
            "--config.step.layerwise=True",
            "--config.optimizer.grad_clip=0",
            "--config.step.layer_grad_clip=1.0",
        ],
    ),
}
# Name on the docs table -> libtpu topology (chips per axis).
TOPOLOGIES = {"v5e-16": "v5e:4x4", "v5e-256": "v5e:16x16", "v5p-128": "v5p:4x4x4"}
# Global batch (sequences of config.seq_len = 256 tokens): GaLore's pre-training batch; every
# run recomputes activations per layer (config.model.remat=True, as configs/llama_7b.py).
BATCH_SIZE = 512


def mesh_for(model: str, topology: str) -> str:
    """7B: FSDP over every chip (its fp32 params, gradients and AdamW moments, 108 GB, must be
    split over all chips of a 16 GiB v5e). 1B: FSDP over 16 chips, data parallel across those
    groups: the state fits 16 ways, and each all-gather spans 16 chips, not the whole pod."""
    chips = {"v5e:4x4": 16, "v5e:16x16": 256, "v5p:4x4x4": 64}[topology]
    if model == "llama_7b":
        return f"fsdp={chips}"
    return f"data={chips // 16},fsdp=16"


def report_path(results: pathlib.Path, model: str, optimizer: str, name: str) -> pathlib.Path:
    return results / f"{model}_{optimizer}_{name}.json"


def run_one(model: str, optimizer: str, name: str, out: pathlib.Path, timeout: float) -> str:
    topology = TOPOLOGIES[name]
    optimizer, extra = VARIANTS.get(optimizer, (optimizer, []))
    command = [
        "nice",
        "-n",
        "10",
        sys.executable,
        "-m",
        "train.compile",
        f"--config=configs/{model}.py",
        f"--topology={topology}",
        f"--mesh={mesh_for(model, topology)}",
        f"--config.optimizer.name={optimizer}",
        f"--config.batch_size={BATCH_SIZE}",
        "--config.model.remat=True",
        *extra,
        f"--out={out}",
    ]
    start = time.perf_counter()
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    status = f"exit {run.returncode} in {time.perf_counter() - start:.0f} s"
    if run.returncode not in (0, 1) or not out.exists():  # 1: compiled, does not fit
        tail = run.stderr.strip().splitlines()[-1:] or [""]
        return f"{status}: {tail[0][:300]}"
    return status


COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def table(results: pathlib.Path) -> str:
    lines = [
        "| model | optimizer | topology | mesh | HBM per chip (GiB) | state + batch per chip "
        "(GiB) | fits | TFLOPs per chip (HLO / model) | " + " / ".join(COLLECTIVES) + " | "
        "compile (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model in MODELS:
        for optimizer in OPTIMIZERS + tuple(VARIANTS):
            for name in TOPOLOGIES:
                path = report_path(results, model, optimizer, name)
                if not path.exists() and optimizer in VARIANTS:
                    continue  # a variant lists only the compiles that were run
                if not path.exists():
                    lines.append(f"| {model} | {optimizer} | {name} | | not run | | | | | |")
                    continue
                r = json.loads(path.read_text())
                mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items() if v > 1)
                bound = ">= " if r.get("hbm_is_lower_bound") else ""
                hbm = f"{bound}{r['hbm_gib']:.2f} of {r['hbm_capacity_gib']}"
                if "collectives" in r:
                    coll = " / ".join(str(r["collectives"][k]) for k in COLLECTIVES)
                    flops = f"{r['hlo_tflops_per_chip']:.1f} / {r['model_tflops_per_chip']:.1f}"
                else:  # the TPU compiler stopped at its HBM check
                    coll, flops = "(compiler: out of HBM)", ""
                fits = "yes" if r["fits"] else "**no**"
                lines.append(
                    f"| {model} | {optimizer} | {name} | {mesh} | {hbm} | "
                    f"{r['state_and_batch_gib']:.2f} | {fits} | {flops} | {coll} | "
                    f"{r['compile_s']:.0f} |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="benchmarks/results/tpu_compile")
    parser.add_argument("--only", nargs="*", default=list(MODELS), choices=MODELS)
    parser.add_argument("--optimizers", nargs="*", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    parser.add_argument("--topologies", nargs="*", default=list(TOPOLOGIES), choices=TOPOLOGIES)
    parser.add_argument("--variants", nargs="*", default=[], choices=VARIANTS)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per compile")
    parser.add_argument("--table", action="store_true", help="only print the table")
    args = parser.parse_args()
    results = pathlib.Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    if not args.table:
        # 7B first, v5e-256 first: the rows a slow machine should not leave out.
        for model in sorted(args.only, reverse=True):
            for name in ("v5e-256", "v5e-16", "v5p-128"):
                for optimizer in ("galore", "adamw", "golore", *VARIANTS):
                    wanted = args.variants if optimizer in VARIANTS else args.optimizers
                    if name not in args.topologies or optimizer not in wanted:
                        continue
                    out = report_path(results, model, optimizer, name)
                    if out.exists():
                        continue
                    status = run_one(model, optimizer, name, out, args.timeout)
                    print(f"{model} {optimizer} {name}: {status}", flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
