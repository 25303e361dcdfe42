"""The trainer's train step with the mesh's axes Auto vs Explicit (``mesh.axis_types``).

    python -m benchmarks.axis_types --model llama_1b --json benchmarks/results/axis_types.json
    python -m benchmarks.axis_types --model llama_tiny --seq 64 --rounds 2   # CPU smoke test

Three modes: ``auto``; ``explicit`` (Explicit axes, the default ``mesh.typed_update=False``:
the model and the guarded update inside ``auto_axes``, typed at their boundaries);
``explicit_typed`` (``mesh.typed_update=True``: every operation of the update on explicit
types, the library's Explicit-axis code). For each mode the trainer's train step
(``train.main.build_trainer`` on ``configs/<model>.py``, ``--optimizer`` (GaLore by default,
gram_eigh projector, its config's rank) on one device, at benchmarks/train_step.py's one-GPU
batch, random tokens. ``compile_s``: ``lower`` + ``compile`` of the step, each a fresh
trainer, the median of ``--compiles`` per mode, modes alternating (their order reversed every
other round, a ``gc.collect()`` before each), after one untimed compile (a process's first
compile also pays one-off costs). ``constraints``: sharding constraints in the lowered
StableHLO (JAX lowers one after every operation on an explicit-typed array); ``ops_as_auto``:
whether its other operations are auto's, kind for kind; ``hlo_instructions``: the compiled
program's size (``lower_s``: the tracing and lowering part of ``compile_s``; each ratio
with its 90% bootstrap interval, ``*_ratio_90``). ``--modes``
chooses the modes (``auto`` first). ``--compile-only`` stops there. Then
``--rounds`` rounds of ``--update-every`` steps, the modes alternating round by round (so a
drift of the machine hits all): the first step of a round refreshes the subspace, the others
are steady. ``steady_s`` / ``refresh_s``: medians over the rounds after the first. Ratios are
mode / auto.
"""

from __future__ import annotations

import argparse
import collections
import gc
import importlib
import os
import re
import statistics
import sys
import time
from typing import Any

from benchmarks import report
from benchmarks.train_step import batch_size
from train import xla_flags

MODES = ("auto", "explicit", "explicit_typed")


def build(
    model: str, mode: str, update_every: int, seq: int, optimizer: str = "galore"
) -> tuple[Any, dict]:
    """A fresh trainer of ``mode`` (nothing traced or compiled yet) and a batch."""
    import jax
    import jax.numpy as jnp

    from train import main as main_lib
    from train import sharding as sharding_lib

    config = importlib.import_module(f"configs.{model}").get_config()
    config.mesh.axis_types = "auto" if mode == "auto" else "explicit"
    config.mesh.typed_update = mode == "explicit_typed"
    config.optimizer.name = optimizer
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


def compile_seconds(trainer: Any, batch: dict) -> tuple[Any, float, dict]:
    """``lower`` + ``compile`` of the train step at the trainer's abstract state: the
    executable, seconds, and :func:`program_stats` (taken after the clock stops) with
    ``lower_s``, the part of the seconds spent tracing and lowering."""
    t0 = time.perf_counter()
    lowered = trainer.train_step.lower(trainer.abstract_state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    return compiled, seconds, {"lower_s": t1 - t0, **program_stats(lowered, compiled)}


def program_stats(lowered: Any, compiled: Any) -> dict:
    """``constraints``: sharding constraints in the lowered StableHLO; ``ops``: how many of
    each other operation it has; ``hlo_instructions``: instructions of the compiled HLO."""
    ops = collections.Counter(re.findall(r"= ([a-z_]+\.[a-z_.]+)", lowered.as_text()))
    constraints = ops.pop("sdy.sharding_constraint", 0)
    hlo = compiled.as_text() or ""
    instructions = sum(1 for line in hlo.splitlines() if " = " in line)
    return {"constraints": constraints, "ops": dict(ops), "hlo_instructions": instructions}


def ratio_interval(samples: list[float], baseline: list[float], n: int = 10_000) -> list[float]:
    """The 90% bootstrap interval of median(samples) / median(baseline): each list resampled
    with replacement ``n`` times (a fixed seed), the 5th and 95th percentiles of the ratios.
    A ratio is resolved to within 3% only when this interval is that narrow."""
    import numpy as np

    rng = np.random.default_rng(0)
    medians = [
        np.median(rng.choice(np.asarray(x), (n, len(x))), axis=1) for x in (samples, baseline)
    ]
    return [float(q) for q in np.percentile(medians[0] / medians[1], [5, 95])]


def _progress(line: str) -> None:
    """A progress line on stderr at once (a run cut short by its time limit still shows how
    far it got and what each part took)."""
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def run(
    model: str,
    rounds: int,
    update_every: int,
    seq: int,
    compiles: int,
    optimizer: str,
    compile_only: bool = False,
    modes: tuple[str, ...] = MODES,
) -> dict:
    import jax

    compile_s: dict[str, list[float]] = {m: [] for m in modes}
    lower_s: dict[str, list[float]] = {m: [] for m in modes}
    stats = {}
    trainer, batch = build(model, "auto", update_every, seq, optimizer)
    _progress(f"untimed first compile: {compile_seconds(trainer, batch)[1]:.1f} s")
    last = {}
    for r in range(compiles):  # each a fresh trainer; the last one is run below
        for mode in modes if r % 2 == 0 else modes[::-1]:  # no mode always first
            trainer, batch = build(model, mode, update_every, seq, optimizer)
            gc.collect()  # a collection due in one mode's compile would land on it
            compiled, seconds, stats[mode] = compile_seconds(trainer, batch)
            compile_s[mode].append(seconds)
            lower_s[mode].append(stats[mode].pop("lower_s"))
            _progress(
                f"{mode}: compiled in {seconds:.1f} s (lowered in {lower_s[mode][-1]:.1f} s; "
                f"{stats[mode]['constraints']} constraints)"
            )
            last[mode] = (trainer, compiled, batch)
    row: dict[str, Any] = {
        "model": model,
        "optimizer": optimizer,
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "update_every": update_every,
        "seq": seq,
        "batch": batch_size(model, seq, None),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    row["modes"] = list(modes)
    for mode in modes:
        row[mode] = {
            "compile_s": statistics.median(compile_s[mode]),
            "compile_s_all": compile_s[mode],
            "lower_s": statistics.median(lower_s[mode]),
            "lower_s_all": lower_s[mode],
            **stats[mode],
            # the same operations as auto's program but for the sharding constraints
            "ops_as_auto": stats[mode]["ops"] == stats["auto"]["ops"],
        }
        for key in ("compile_s", "lower_s"):
            row[mode][f"{key}_ratio"] = row[mode][key] / row["auto"][key]
            row[mode][f"{key}_ratio_90"] = ratio_interval(
                row[mode][f"{key}_all"], row["auto"][f"{key}_all"]
            )
    if compile_only:
        return row
    built = {}
    for mode, (trainer, compiled, batch) in last.items():
        built[mode] = (compiled, trainer.init(jax.random.key(0)), batch)
        _progress(f"{mode}: state initialised")
    states = {mode: built[mode][1] for mode in modes}
    times: dict[str, dict[str, list[float]]] = {m: {"refresh": [], "steady": []} for m in modes}
    losses: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(rounds):
        for mode in modes:
            compiled, _, batch = built[mode]
            for i in range(update_every):
                t0 = time.perf_counter()
                states[mode], metrics = compiled(states[mode], batch)
                loss = float(jax.block_until_ready(metrics["loss"]))
                if r > 0:
                    times[mode]["refresh" if i == 0 else "steady"].append(time.perf_counter() - t0)
                losses[mode].append(loss)
            _progress(f"round {r} {mode}: {losses[mode][-update_every:]}")
    row["rounds_timed"] = rounds - 1
    for mode in modes:
        row[mode].update(
            steady_s=statistics.median(times[mode]["steady"]),
            refresh_s=statistics.median(times[mode]["refresh"]),
            steady_s_all=times[mode]["steady"],
            refresh_s_all=times[mode]["refresh"],
            losses=losses[mode],
        )
        for key in ("steady_s", "refresh_s"):
            row[mode][f"{key}_ratio"] = row[mode][key] / row["auto"][key]
            row[mode][f"{key}_ratio_90"] = ratio_interval(
                row[mode][f"{key}_all"], row["auto"][f"{key}_all"]
            )
    return row


def print_table(row: dict) -> None:
    modes = row["modes"]
    print(f"| {row['model']}, {row['optimizer']}, {row['device']} | " + " | ".join(modes) + " |")
    print("|---|" + "---|" * len(modes))
    for key, label in (
        ("steady_s", "steady step, s"),
        ("refresh_s", "refresh step, s"),
        ("compile_s", "compile (lower + compile), s"),
        ("lower_s", "of which lower, s"),
    ):
        if key in row["auto"]:  # --compile-only has no step times
            cells = [f"{row[m][key]:.4f} ({row[m][key + '_ratio']:.3f}x)" for m in modes]
            print(f"| {label} | " + " | ".join(cells) + " |")
        if f"{key}_ratio_90" in row["auto"]:
            cells = ["{:.3f}-{:.3f}".format(*row[m][f"{key}_ratio_90"]) for m in modes]
            print(f"| {label}: ratio's 90% interval (bootstrap) | " + " | ".join(cells) + " |")
    for key, label in (
        ("constraints", "sharding constraints"),
        ("hlo_instructions", "compiled HLO instructions"),
        ("ops_as_auto", "other operations as auto's"),
    ):
        print(f"| {label} | " + " | ".join(str(row[m][key]) for m in modes) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="llama_1b")
    parser.add_argument("--optimizer", default="galore", help="config.optimizer.name")
    parser.add_argument("--rounds", type=int, default=4, help="rounds (the first untimed)")
    parser.add_argument("--update-every", type=int, default=4)
    parser.add_argument("--compiles", type=int, default=1, help="fresh compiles per mode")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument(
        "--compile-only", action="store_true", help="the compiles alone, no steps run"
    )
    parser.add_argument(
        "--modes", default=",".join(MODES), help=f"comma-separated, from {MODES}; auto first"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    modes = tuple(args.modes.split(","))
    if modes[0] != "auto" or not set(modes) <= set(MODES) or len(set(modes)) != len(modes):
        parser.error(f"--modes={args.modes}: distinct names from {MODES}, auto first")
    if args.rounds < 2 and not args.compile_only:
        parser.error("--rounds must be >= 2 (the first round is not timed)")
    xla_flags.apply_defaults()  # before JAX starts a backend
    row = run(
        args.model,
        args.rounds,
        args.update_every,
        args.seq,
        args.compiles,
        args.optimizer,
        args.compile_only,
        modes,
    )
    print_table(row)
    report.write_json(row, args.json)


if __name__ == "__main__":
    main()
