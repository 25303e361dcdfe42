"""Compile time: golore_jax's optimizers beside optax.adamw and optax.contrib.galore.

    python -m benchmarks.compile_time --json benchmarks/results/compile_time_cpu.json
    python -m benchmarks.compile_time --train-step --models llama_60m,llama_350m,llama_1b \
        --json benchmarks/results/compile_time_train_step.json          # on the GPU
    python -m benchmarks.compile_time --train-step --models llama_tiny   # CPU smoke test

Default mode: the optimizer's ``update`` alone, on the leaves of ``--layers`` LLaMA decoder
layers of ``--model``'s shape (q, k, v, o, gate, up, down kernels and two norms per layer;
rank from the model), on the default backend (CPU in the issue's figures). ``--train-step``:
the trainer's whole train step (``train.main.build_trainer`` on ``configs/<model>.py``), so the
model's forward and backward are in the program too.

Each figure is ``jax.jit(f).lower(...)`` (trace + StableHLO) and ``.compile()`` (XLA) of a
fresh function, nothing cached: the median over ``--repeats`` compiles in this process, after
one warm-up compile of the first optimizer (XLA's own first-use costs). XLA_FLAGS are recorded;
tests/conftest.py's ``--xla_backend_optimization_level=0`` must not be set for figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from typing import Any

from benchmarks import report
from configs.models import MODELS

# The models of the update-only mode (shapes and GaLore ranks: configs/models.py).
SHAPES = {name: MODELS[name] for name in ("llama_tiny", "llama_60m", "llama_350m", "llama_1b")}
UPDATE_OPTIMIZERS = (
    "optax_adamw",
    "optax_galore",
    "galore_adamw",
    "galore_adamw_gram",
    "golore_sgd",
    "hybrid_adamw",
)
# galore: our GaLore with the SVD projector (optax's); galore_gram: with gram_eigh (the default)
TRAIN_STEP_OPTIMIZERS = ("adamw", "galore", "galore_gram", "optax_galore")


def layer_params(model: str, layers: int) -> dict[str, Any]:
    """The decoder kernels and norms of ``layers`` LLaMA layers as ShapeDtypeStructs."""
    import jax
    import jax.numpy as jnp

    hidden, inter = SHAPES[model].hidden, SHAPES[model].intermediate
    kernels = {
        "q_proj": (hidden, hidden),
        "k_proj": (hidden, hidden),
        "v_proj": (hidden, hidden),
        "o_proj": (hidden, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    layer = {name: {"kernel": shape} for name, shape in kernels.items()}
    layer["input_norm"] = {"scale": (hidden,)}
    layer["post_norm"] = {"scale": (hidden,)}
    tree = {f"layer_{i}": layer for i in range(layers)}
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s, jnp.float32), tree, is_leaf=lambda x: isinstance(x, tuple)
    )


def update_optimizer(name: str, rank: int, update_every: int = 200):
    """The optimizer ``name`` of UPDATE_OPTIMIZERS (lr 1e-3, GaLore's scale 0.25, no decay)."""
    import golore_jax as gl
    from benchmarks import train_step

    lr, sub = 1e-3, gl.Subspace(rank=rank, update_every=update_every, scale=0.25)
    if name in ("optax_adamw", "optax_galore"):
        baseline = "adamw" if name == "optax_adamw" else name
        return train_step.optax_baseline(baseline, rank, update_every, lr)
    projector = {
        "galore_adamw_gram": gl.projectors.gram_eigh(),
        "hybrid_adamw": gl.golore_projector(0.2, 10_000),
    }.get(name)
    if name in ("galore_adamw", "galore_adamw_gram", "hybrid_adamw"):
        sub = dataclasses.replace(sub, projector=projector)
        return gl.galore_adamw(lr, subspace=sub, weight_decay=0.0)
    if name == "golore_sgd":
        return gl.golore_sgd(lr, subspace=sub, weight_decay=0.0)
    raise ValueError(f"--optimizers: unknown optimizer {name!r}; one of {UPDATE_OPTIMIZERS}")


def time_compile(jitted: Any, *args: Any) -> tuple[float, float, float]:
    """Seconds to lower and to compile ``jitted`` at ``args`` (wall clock), and the compile's
    CPU seconds (all threads of this process: less sensitive to a busy machine)."""
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    t1, c1 = time.perf_counter(), time.process_time()
    lowered.compile()
    return t1 - t0, time.perf_counter() - t1, time.process_time() - c1


def measure_update(model: str, layers: int, name: str, repeats: int) -> dict[str, Any]:
    """Lower + compile times of ``update`` for optimizer ``name`` (median of ``repeats``)."""
    import jax

    from train import step as step_lib

    params = layer_params(model, layers)
    tx = update_optimizer(name, SHAPES[model].rank)
    state = jax.eval_shape(tx.init, params)
    times = []
    for _ in range(repeats):
        # a new function each time: nothing traced or compiled before is reused
        def update(grads, state, params):
            return step_lib.apply_gradients(tx.update, grads, state, params)

        times.append(time_compile(jax.jit(update), params, state, params))
    lower, compile_, cpu = (statistics.median(t) for t in zip(*times, strict=True))
    return {
        "mode": "update",
        "model": model,
        "layers": layers,
        "matrices": 7 * layers,
        "optimizer": name,
        "lower_s": lower,
        "compile_s": compile_,
        "compile_cpu_s": cpu,
        "total_s": lower + compile_,
    }


def measure_train_step(model: str, name: str, repeats: int) -> dict[str, Any]:
    """Lower + compile times of the trainer's train step on ``configs/<model>.py``."""
    import importlib

    import jax

    from train import main as main_lib
    from train import sharding as sharding_lib

    if name not in TRAIN_STEP_OPTIMIZERS:
        raise ValueError(f"--optimizers: unknown {name!r}; one of {TRAIN_STEP_OPTIMIZERS}")
    config = importlib.import_module(f"configs.{model}").get_config()
    config.optimizer.name = "galore" if name == "galore_gram" else name
    config.optimizer.subspace.projector = "gram_eigh" if name == "galore_gram" else "svd"
    mesh = sharding_lib.make_mesh(config.mesh)
    times = []
    for _ in range(repeats):
        trainer = main_lib.build_trainer(config, mesh)  # fresh jitted functions
        tokens = jax.ShapeDtypeStruct(
            (config.batch_size, config.seq_len), jax.numpy.int32, sharding=trainer.batch_sharding
        )
        batch = {"inputs": tokens, "targets": tokens}
        times.append(time_compile(trainer.train_step, trainer.abstract_state, batch))
    lower, compile_, cpu = (statistics.median(t) for t in zip(*times, strict=True))
    return {
        "mode": "train_step",
        "model": model,
        "optimizer": name,
        "batch": config.batch_size,
        "seq": config.seq_len,
        "lower_s": lower,
        "compile_s": compile_,
        "compile_cpu_s": cpu,
        "total_s": lower + compile_,
    }


def measure(args: argparse.Namespace, model: str, name: str, repeats: int) -> dict[str, Any]:
    if args.train_step:
        return measure_train_step(model, name, repeats)
    return measure_update(model, args.layers, name, repeats)


def print_table(rows: list[dict]) -> None:
    """Seconds, and the ratio to optax.contrib.galore's total at the same setting."""
    print(
        "| mode | model | optimizer | lower s | compile s | compile CPU s | total s "
        "| vs optax_galore |"
    )
    print("|---|---|---|---|---|---|---|---|")
    ref = {(r["mode"], r["model"]): r["total_s"] for r in rows if r["optimizer"] == "optax_galore"}
    for r in rows:
        base = ref.get((r["mode"], r["model"]))
        vs = f"{r['total_s'] / base:.2f}" if base else "-"
        print(
            f"| {r['mode']} | {r['model']} | {r['optimizer']} | {r['lower_s']:.2f} | "
            f"{r['compile_s']:.2f} | {r['compile_cpu_s']:.2f} | {r['total_s']:.2f} | {vs} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train-step", action="store_true", help="the trainer's train step")
    parser.add_argument("--models", default=None, help="comma-separated (default: llama_60m)")
    parser.add_argument("--optimizers", default=None, help="comma-separated (default: all)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (update mode)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    if args.repeats < 1 or args.layers < 1:
        parser.error("--repeats and --layers must be >= 1")
    models = (args.models or "llama_60m").split(",")
    default = TRAIN_STEP_OPTIMIZERS if args.train_step else UPDATE_OPTIMIZERS
    names = args.optimizers.split(",") if args.optimizers else list(default)
    for model in models:
        if not args.train_step and model not in SHAPES:
            parser.error(f"--models: unknown model {model!r}; one of {sorted(SHAPES)}")

    import jax

    rows = []
    for model in models:
        for i, name in enumerate(names):
            if i == 0:  # warm-up: XLA's first-use costs are nobody's
                measure(args, model, name, 1)
            rows.append(measure(args, model, name, args.repeats))
            rows[-1].update(
                device=jax.devices()[0].device_kind,
                jax=jax.__version__,
                xla_flags=os.environ.get("XLA_FLAGS", ""),
                repeats=args.repeats,
            )
            print(f"{model} {name}: {rows[-1]['total_s']:.2f} s", flush=True)
    print_table(rows)
    report.write_json(rows, args.json)


if __name__ == "__main__":
    main()
