"""The trainer's train step with the mesh's axes Auto vs Explicit (``mesh.axis_types``).

    python -m benchmarks.axis_types --model llama_1b --json benchmarks/results/axis_types.json
    python -m benchmarks.axis_types --model llama_tiny --rounds 2       # CPU smoke test

For each mode the trainer's train step (``train.main.build_trainer`` on ``configs/<model>.py``:
GaLore, gram_eigh projector, its config's rank) on one device, at benchmarks/train_step.py's
one-GPU batch (seq 256), random tokens. ``compile_s``: ``lower`` + ``compile`` of the step,
nothing cached (each a fresh trainer), the median of ``--compiles`` per mode, alternating.
Then ``--rounds`` rounds of ``--update-every`` steps, the two modes alternating round by round
(so a drift of the machine hits both): the first step of a round refreshes the subspace
(``count % update_every == 0``), the others are steady. ``steady_s`` / ``refresh_s``: medians
over the rounds after the first (the first includes first-run costs). Ratios are explicit /
auto.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
from typing import Any

from benchmarks import report
from benchmarks.train_step import batch_size
from train import xla_flags

MODES = ("auto", "explicit")


def build(model: str, mode: str, update_every: int, seq: int) -> tuple[Any, dict]:
    """A fresh trainer of ``mode`` (nothing traced or compiled yet) and a batch."""
    import jax
    import jax.numpy as jnp

    from train import main as main_lib
    from train import sharding as sharding_lib

    config = importlib.import_module(f"configs.{model}").get_config()
    config.mesh.axis_types = mode
    config.optimizer.name = "galore"
    config.optimizer.subspace.update_every = update_every
    config.seq_len = seq
    config.batch_size = batch_size(model, seq, None)
    main_lib.validate_config(config)
    mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:1])
    trainer = main_lib.build_trainer(config, mesh)
    tokens = jax.random.randint(
        jax.random.key(1), (config.batch_size, seq), 0, config.model.vocab_size, jnp.int32
    )
    batch = jax.device_put({"inputs": tokens, "targets": tokens}, trainer.batch_sharding)
    return trainer, batch


def compile_seconds(trainer: Any, batch: dict) -> tuple[Any, float]:
    """``lower`` + ``compile`` of the train step at the trainer's abstract state (seconds)."""
    t0 = time.perf_counter()
    compiled = trainer.train_step.lower(trainer.abstract_state, batch).compile()
    return compiled, time.perf_counter() - t0


def _progress(line: str) -> None:
    """A progress line on stderr at once (a run cut short by its time limit still shows how
    far it got and what each part took)."""
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def run(model: str, rounds: int, update_every: int, seq: int, compiles: int) -> dict:
    import jax

    compile_s: dict[str, list[float]] = {m: [] for m in MODES}
    last = {}
    for _ in range(compiles):  # alternating, each a fresh trainer; the last one is timed
        for mode in MODES:
            trainer, batch = build(model, mode, update_every, seq)
            compiled, seconds = compile_seconds(trainer, batch)
            compile_s[mode].append(seconds)
            _progress(f"{mode}: compiled in {seconds:.1f} s")
            last[mode] = (trainer, compiled, batch)
    built = {}
    for mode, (trainer, compiled, batch) in last.items():
        built[mode] = (compiled, trainer.init(jax.random.key(0)), batch)
        _progress(f"{mode}: state initialised")
    states = {mode: built[mode][1] for mode in MODES}
    times: dict[str, dict[str, list[float]]] = {m: {"refresh": [], "steady": []} for m in MODES}
    losses: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(rounds):
        for mode in MODES:
            compiled, _, batch = built[mode]
            for i in range(update_every):
                t0 = time.perf_counter()
                states[mode], metrics = compiled(states[mode], batch)
                loss = float(jax.block_until_ready(metrics["loss"]))
                if r > 0:
                    times[mode]["refresh" if i == 0 else "steady"].append(time.perf_counter() - t0)
                losses[mode].append(loss)
            _progress(f"round {r} {mode}: {losses[mode][-update_every:]}")
    row: dict[str, Any] = {
        "model": model,
        "device": jax.devices()[0].device_kind,
        "update_every": update_every,
        "rounds_timed": rounds - 1,
        "seq": seq,
        "batch": batch_size(model, seq, None),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    for mode in MODES:
        row[mode] = {
            "compile_s": statistics.median(compile_s[mode]),
            "compile_s_all": compile_s[mode],
            "steady_s": statistics.median(times[mode]["steady"]),
            "refresh_s": statistics.median(times[mode]["refresh"]),
            "steady_s_all": times[mode]["steady"],
            "refresh_s_all": times[mode]["refresh"],
            "losses": losses[mode],
        }
    for key in ("compile_s", "steady_s", "refresh_s"):
        row[f"{key}_ratio"] = row["explicit"][key] / row["auto"][key]
    return row


def print_table(row: dict) -> None:
    print(f"| {row['model']}, {row['device']} | auto | explicit | explicit / auto |")
    print("|---|---|---|---|")
    for key, label in (
        ("steady_s", "steady step, s"),
        ("refresh_s", "refresh step, s"),
        ("compile_s", "compile (lower + compile), s"),
    ):
        print(
            f"| {label} | {row['auto'][key]:.4f} | {row['explicit'][key]:.4f} | "
            f"{row[key + '_ratio']:.3f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="llama_1b")
    parser.add_argument("--rounds", type=int, default=4, help="rounds (the first untimed)")
    parser.add_argument("--update-every", type=int, default=4)
    parser.add_argument("--compiles", type=int, default=1, help="fresh compiles per mode")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be >= 2 (the first round is not timed)")
    xla_flags.apply_defaults()  # before JAX starts a backend
    row = run(args.model, args.rounds, args.update_every, args.seq, args.compiles)
    print_table(row)
    report.write_json(row, args.json)


if __name__ == "__main__":
    main()
