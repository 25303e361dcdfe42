"""Does each memory option change the held-out loss? (EXPERIMENTS.md, issue 19).

LLaMA-60M, GaLore (gram_eigh), 2,000 steps of configs/llama_60m.py's recipe, the same seeds
(init and data order) for every option; each option is compared with the fp32 default run of
the same seed by experiments/projector_seeds.py's method (per-step mean ± std over seeds, and
the paired difference with a two-sided 95% Student-t interval).

    python experiments/memory_options.py run ROOT --seeds 0 1 2 [--work /tmp/w] [--options ...]
        [--config configs/llama_60m.py --steps 2000]
    python experiments/memory_options.py summary ROOT

``run`` takes the (option, seed) pairs in order and skips the ones another runner has claimed
(``ROOT/<option>_s<seed>.claim``), so several runners (one per GPU) can share one list; each
finished run leaves ``ROOT/<option>_s<seed>/metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import projector_seeds


def common(config: str, steps: int) -> list[str]:
    """Every run: the recipe of benchmarks/pretrain_compare.sh (2,000 steps) with GaLore."""
    return [
        f"--config={config}",
        "--config.optimizer.name=galore",
        f"--config.num_steps={steps}",
        f"--config.optimizer.warmup_steps={steps // 10}",
        f"--config.eval_every={max(steps // 4, 1)}",
        f"--config.checkpoint_every={steps}",
        f"--config.log_every={min(50, steps)}",
        "--config.data.eval_fraction=0.05",
    ]


# The layer-wise step cannot clip the global gradient norm (it never holds all gradients):
# each layer's gradient (and the embeddings/norm/head as one group) is clipped to the same 1.0.
LAYERWISE = [
    "--config.model.scan_layers=True",
    "--config.step.layerwise=True",
    "--config.optimizer.grad_clip=0",
    "--config.step.layer_grad_clip=1.0",
]
# The same with each group's clip scaled so that the whole gradient's norm keeps the global bound:
# 9 groups (8 layers of llama_60m + the rest) each clipped to 1/sqrt(9) add up to at most 1.0.
LAYERWISE_SCALED_CLIP = [*LAYERWISE[:-1], f"--config.step.layer_grad_clip={1 / 3}"]
BF16_PARAMS = ["--config.model.param_dtype=bfloat16", "--config.step.stochastic_rounding=True"]
BF16_BASES = ["--config.optimizer.subspace.basis_dtype=bfloat16"]
ADAM_8BIT = ["--config.optimizer.inner.name=adamw8bit"]
# Issue 31: int8 layers (needs the layer-wise step; fp32 rest here, so only the matrices are
# quantized), int4 bases, the lazy layer-adaptive refresh.
INT8 = ["--config.model.weight_storage=int8"]
INT4_BASES = ["--config.optimizer.subspace.basis_dtype=int4"]
LAZY = [f"--config.optimizer.subspace.lazy_threshold={os.environ.get('LAZY_THRESHOLD', '0.9')}"]
OPTIONS = {
    "fp32": [],
    "all": LAYERWISE + BF16_PARAMS + BF16_BASES + ADAM_8BIT,
    "layerwise": LAYERWISE,
    "bf16_params_sr": BF16_PARAMS,
    "adam8bit": ADAM_8BIT,
    "bf16_bases": BF16_BASES,
    "layerwise_scaled_clip": LAYERWISE_SCALED_CLIP,
    "all_scaled_clip": LAYERWISE_SCALED_CLIP + BF16_PARAMS + BF16_BASES + ADAM_8BIT,
    "int8": LAYERWISE_SCALED_CLIP + INT8,
    "int4_bases": INT4_BASES,
    "lazy": LAZY,
    # the 16 GB recipe: every option of issues 19 and 31 together
    "all_16gb": LAYERWISE_SCALED_CLIP + BF16_PARAMS + INT8 + INT4_BASES + ADAM_8BIT + LAZY,
}


def run(
    root: pathlib.Path,
    work: pathlib.Path,
    seeds: list[int],
    options: list[str],
    config: str = "configs/llama_60m.py",
    steps: int = 2000,
    extra: list[str] | None = None,
) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name in options:  # option-major: a cut-short session still has whole comparisons
        for seed in seeds:
            run_name = f"{name}_s{seed}"
            try:
                (root / f"{run_name}.claim").mkdir()
            except FileExistsError:
                continue
            workdir = work / run_name
            shutil.rmtree(workdir, ignore_errors=True)
            command = [
                sys.executable,
                "-m",
                "train",
                f"--workdir={workdir}",
                *common(config, steps),
            ]
            command += [f"--config.seed={seed}", *OPTIONS[name], *(extra or [])]
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            lines = (done.stdout + done.stderr).strip().splitlines()
            # absl's info lines (orbax closing its stores) would hide the result lines.
            tail = [line for line in lines if not re.match(r"[IWE]\d{4} ", line)][-3:]
            print(f"{run_name}: rc {done.returncode}, {seconds:.0f} s | " + " | ".join(tail))
            sys.stdout.flush()
            if done.returncode == 0:
                (root / run_name).mkdir(exist_ok=True)
                shutil.copy(workdir / "metrics.jsonl", root / run_name / "metrics.jsonl")
                info = {"seconds": seconds, "command": command[1:], "device": os.uname().nodename}
                (root / run_name / "run.json").write_text(json.dumps(info, indent=1) + "\n")
            else:
                (root / f"{run_name}.claim").rmdir()  # let a later runner retry it
            shutil.rmtree(workdir, ignore_errors=True)


def summary(root: pathlib.Path, options: list[str]) -> None:
    results = {}
    for name in options:
        if name == "fp32":
            continue
        try:
            results[name] = projector_seeds.summarize(root, "fp32", name)
        except (FileNotFoundError, ValueError) as err:
            print(f"{name}: {err}")
            continue
        print(f"\n### {name} vs fp32\n\n{projector_seeds.markdown(results[name])}")
    (root / "summary.json").write_text(json.dumps(results, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("run", "summary"))
    parser.add_argument("root", type=pathlib.Path)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--options", nargs="*", default=list(OPTIONS), choices=OPTIONS)
    parser.add_argument("--config", default="configs/llama_60m.py")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--work", type=pathlib.Path, default=pathlib.Path("/tmp/memory_options"))
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="every run: --config.KEY"
    )
    args = parser.parse_args()
    if args.mode == "run":
        extra = [f"--config.{item}" for item in args.set]
        run(args.root, args.work, args.seeds, args.options, args.config, args.steps, extra)
    else:
        summary(args.root, args.options)


if __name__ == "__main__":
    main()
