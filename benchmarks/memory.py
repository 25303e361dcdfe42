"""Peak device memory and tokens/s of the trainer's own step, over steady AND refresh steps.

    python -m benchmarks.memory --config configs/llama_7b.py --set batch_size=16 \
        --row "galore bf16+SR: optimizer.name=galore model.param_dtype=bfloat16 \
               step.stochastic_rounding=True optimizer.subspace.basis_dtype=bfloat16" \
        --row "golore: optimizer.name=golore" --json benchmarks/results/memory_7b.json
    python -m benchmarks.memory --config configs/llama_tiny.py           # CPU smoke test

Every row is built by ``train.main.build_trainer(config, mesh)`` from a config file, the
``--set KEY=VALUE`` overrides and the row's own ``KEY=VALUE`` overrides (any config key:
``optimizer.name``, ``optimizer.inner.name=adamw8bit``, ``step.layerwise``,
``model.param_dtype``, ``model.remat``, ``model.scan_layers``, ``batch_size``, ...), so what is
measured is what ``python -m train`` runs. Random tokens (no corpus).

Method (printed with the table and stored in every JSON row):

* Each row runs in a fresh process (``subprocess``), with ``XLA_PYTHON_CLIENT_PREALLOCATE=false``
  (JAX does not reserve 75% of the GPU up front: the allocator grows as buffers are asked for,
  and its peak is what the step needed).
* The step is compiled ahead of time from the trainer's abstract state
  (``train_step.lower(...).compile()``): ``memory_analysis()`` gives XLA's figures (arguments,
  outputs, aliased, temporaries; peak estimate = arguments + temporaries + outputs - aliased).
  XLA:GPU autotunes kernels while compiling and allocates its scratch from the same allocator:
  the device peak is read right after compiling (``peak_after_compile``), before anything else
  exists, so that scratch can be told apart from the step's own peak.
* Phases, in order: init (params + optimizer state), step 0 (a refresh: the projectors are
  chosen at ``count % update_every == 0``), ``--steady-steps`` steady steps, one more refresh
  (the run uses ``update_every = steady_steps + 1``; the config's own ``update_every`` is used
  only to amortize). After each phase the allocator's ``peak_bytes_in_use`` (cumulative since
  the process started: JAX cannot reset it) and ``bytes_in_use`` are read. The row's peak is
  the maximum over all phases, refresh steps included.
* The state is donated to the step (the trainer's ``donate_argnums=0``); the benchmark keeps no
  other copy of params or state, only one batch of tokens.
* On XLA:CPU ``memory_stats()`` is None: only the compiled figures are reported.

Tokens/s: steady = batch x seq / median steady step; amortized over the config's
``update_every`` = batch x seq / (steady + (refresh - steady) / update_every), the refresh
being the second refresh step (the first one also pays first-execution costs).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import pathlib
import shlex
import statistics
import sys
import time
import traceback
from typing import Any

from benchmarks import report
from benchmarks.train_step import memory_figures, throughput
from train import xla_flags

PREALLOCATE = "false"  # XLA_PYTHON_CLIENT_PREALLOCATE of every row's process
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM")
METHOD = {
    "process": "one fresh process per row",
    "XLA_PYTHON_CLIENT_PREALLOCATE": PREALLOCATE,
    "peak": "allocator peak_bytes_in_use (cumulative) after compile, init, refresh step 0, "
    "steady steps and a second refresh step; row peak = max over them",
    "autotuning_scratch": "XLA:GPU autotunes while compiling, from the same allocator: "
    "peak_after_compile is read before init, so it shows that scratch alone",
    "compiled": "jit(train_step).lower(abstract state, batch).compile().memory_analysis()",
    "extra_copies": "none: the state is donated to the step; one batch of random tokens kept",
}


def load_config(path: str, overrides: list[str]) -> Any:
    """``get_config()`` of a config file, with ``KEY=VALUE`` overrides (dotted keys).

    Values are Python literals (``16``, ``True``, ``1e-3``) or else strings (``galore``).
    A key that does not exist is an error naming it.
    """
    spec = importlib.util.spec_from_file_location("benchmark_config", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"--config {path}: not a Python config file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not KEY=VALUE")
        *parents, leaf = key.split(".")
        target = config
        for part in parents:
            target = target[part]
        if leaf not in target:
            raise KeyError(f"override {item!r}: config has no key {key!r}")
        try:
            value = ast.literal_eval({"true": "True", "false": "False"}.get(text, text))
        except (ValueError, SyntaxError):
            value = text
        target[leaf] = value
    return config


def parse_row(text: str) -> tuple[str, list[str]]:
    """``"LABEL: k=v k=v"`` -> (label, overrides); a row without ``:`` is all overrides."""
    label, sep, rest = text.partition(":")
    if not sep:
        return text, shlex.split(text)
    return label.strip(), shlex.split(rest)


def _gib(x: float | None, digits: int = 1) -> str:
    return f"{x / 2**30:.{digits}f}" if x is not None else "-"


def _is_oom(error: BaseException | str) -> bool:
    return any(marker in str(error) for marker in OOM_MARKERS)


def _failure_status(error: str) -> str:
    """Why a row's process reported nothing: ``OOM``, ``timeout`` or ``failed``."""
    if _is_oom(error):
        return "OOM"
    return "timeout" if error.startswith("timed out") else "failed"


def run_row(config_path: str, overrides: list[str], label: str, steady_steps: int) -> dict:
    """Measures one row in this process (see the module docstring for the phases)."""
    import jax
    import jax.numpy as jnp

    import golore_jax as gl
    from train import main as main_lib
    from train import model as model_lib
    from train import sharding as sharding_lib

    config = load_config(config_path, overrides)
    amortize_every = int(config.optimizer.subspace.update_every)
    config.optimizer.subspace.update_every = (
        steady_steps + 1
    )  # refreshes at step 0 and after steady
    main_lib.validate_config(config)
    device = jax.devices()[0]
    row: dict[str, Any] = {
        "label": label,
        "config": config_path,
        "overrides": overrides,
        "device": device.device_kind,
        "platform": device.platform,
        "seq": config.seq_len,
        "batch": config.batch_size,
        "optimizer": config.optimizer.name,
        "inner": config.optimizer.inner.name,
        "rank": config.optimizer.subspace.rank,
        "param_dtype": config.model.param_dtype,
        "remat": config.model.remat,
        "scan_layers": config.model.scan_layers,
        "layerwise": bool(config.step.layerwise),
        "stochastic_rounding": bool(config.step.stochastic_rounding),
        "basis_dtype": config.optimizer.subspace.basis_dtype,
        "weight_storage": config.model.weight_storage,
        "lazy_threshold": config.optimizer.subspace.lazy_threshold,
        "update_every_amortized": amortize_every,
        "steady_steps": steady_steps,
        "method": METHOD,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "status": "ok",
    }

    def stats() -> dict:
        return device.memory_stats() or {}

    phases: dict[str, dict] = {}

    def record(phase: str) -> None:
        s = stats()
        phases[phase] = {"peak": s.get("peak_bytes_in_use"), "in_use": s.get("bytes_in_use")}

    row["phases"] = phases
    row["bytes_limit"] = stats().get("bytes_limit")
    if not stats():
        row["note"] = f"{device.platform}: memory_stats() is None; compiled figures only"
    try:
        mesh = sharding_lib.make_mesh(config.mesh)
        trainer = main_lib.build_trainer(config, mesh)
        abstract = trainer.abstract_state
        row["params"] = sum(x.size for x in jax.tree_util.tree_leaves(abstract.params))
        row["params_bytes"] = sum(
            x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(abstract.params)
        )
        row["state_bytes"] = sum(
            x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(abstract.opt_state)
        )
        row["state_floats"] = gl.optimizer_state_floats(abstract.opt_state)
        tokens_shape = (config.batch_size, config.seq_len)
        abstract_batch = {
            k: jax.ShapeDtypeStruct(tokens_shape, jnp.int32, sharding=trainer.batch_sharding)
            for k in ("inputs", "targets")
        }
        t0 = time.perf_counter()
        compiled = trainer.train_step.lower(abstract, abstract_batch).compile()
        row["compile_s"] = time.perf_counter() - t0
        row.update(memory_figures(compiled))
        record("compile")

        state = trainer.init(jax.random.key(config.seed))
        tokens = jax.random.randint(
            jax.random.key(1), (config.batch_size, config.seq_len + 1), 0, config.model.vocab_size
        )
        batch = main_lib.to_global(
            {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, trainer.batch_sharding
        )
        del tokens
        jax.block_until_ready((state, batch))
        record("init")

        def step(state):
            t = time.perf_counter()
            state, metrics = compiled(state, batch)
            loss = float(metrics["loss"])  # waits for the step
            return state, time.perf_counter() - t, loss

        state, row["refresh0_step_s"], loss = step(state)
        record("refresh0")
        times = []
        for _ in range(steady_steps):
            state, dt, loss = step(state)
            times.append(dt)
        record("steady")
        state, row["refresh_step_s"], loss = step(state)
        record("refresh1")
        row["final_loss"] = loss
        counts = getattr(gl, "refresh_counts", lambda _: None)(state.opt_state)
        if counts is not None:  # lazy refresh: matrices decomposed / leaf refreshes scheduled
            row["refreshes_done"], row["refreshes_scheduled"] = (int(c) for c in counts)
        row["skipped"] = int(state.skipped)
        row["steady_step_s"] = statistics.median(times)
    except Exception as e:  # an OOM row is a result, not a crash
        row["status"] = "OOM" if _is_oom(e) else "error"
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:500]}"
        if row["status"] == "error":
            traceback.print_exc()
    peaks = [p["peak"] for p in phases.values() if p["peak"] is not None]
    row["peak_bytes"] = max(peaks) if peaks else None
    row["peak_step_bytes"] = (
        max(phases[p]["peak"] for p in ("refresh0", "steady", "refresh1"))
        if all(
            phases.get(p, {}).get("peak") is not None for p in ("refresh0", "steady", "refresh1")
        )
        else None
    )
    if "steady_step_s" in row:
        row.update(
            throughput(
                row["steady_step_s"],
                row["refresh_step_s"],
                amortize_every,
                model_lib.LlamaConfig.from_dict(config.model),
                config.batch_size,
                config.seq_len,
                device.device_kind,
            )
        )
    return row


def print_table(rows: list[dict]) -> None:
    print(
        "| row | model config | seq x batch | status | state GiB | compiled peak GiB | "
        "device peak GiB (step / compile) | steady tok/s | refresh s | amortized tok/s | MFU |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        phases = r.get("phases", {})
        compile_peak = phases.get("compile", {}).get("peak")
        tok = r.get("steady_tokens_per_s")
        amort = r.get("amortized_tokens_per_s")
        refresh = r.get("refresh_step_s")
        mfu = r.get("mfu_steady")
        print(
            f"| {r['label']} | {pathlib.Path(r['config']).stem} | "
            f"{r.get('seq', '-')}x{r.get('batch', '-')} "
            f"| {r['status']} | {_gib(r.get('state_bytes'), 2)} | "
            f"{_gib(r.get('compiled_peak_estimate_bytes'))} | "
            f"{_gib(r.get('peak_step_bytes'))} / {_gib(compile_peak)} | "
            f"{f'{tok:,.0f}' if tok else '-'} | {f'{refresh:.2f}' if refresh else '-'} | "
            f"{f'{amort:,.0f}' if amort else '-'} (tau={r.get('update_every_amortized', '-')}) | "
            f"{f'{mfu:.1%}' if mfu else '-'} |"
        )
    print(
        "\nMethod: "
        + "; ".join(f"{k}: {v}" for k, v in METHOD.items())
        + ". Device peak = max of the allocator's peak after refresh step 0, the steady steps "
        "and a second refresh step (cumulative, so init is included if larger)."
    )


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = PREALLOCATE
    return env


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/llama_tiny.py")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="for every row"
    )
    parser.add_argument(
        "--row",
        action="append",
        default=[],
        metavar='"LABEL: KEY=VALUE ..."',
        help="one measured row (repeatable); default: one row of the config as it is",
    )
    parser.add_argument("--steady-steps", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=None, help="seconds per row")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--append", action="store_true", help="add to the --json file's rows")
    parser.add_argument("--one", metavar="LABEL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steady_steps < 1:
        parser.error("--steady-steps must be >= 1")
    xla_flags.apply_defaults()  # before JAX starts a backend; children inherit it
    if args.one is not None:
        report.print_result(run_row(args.config, args.set, args.one, args.steady_steps))
        return
    rows_spec = [parse_row(r) for r in args.row] or [("default", [])]
    rows = []
    if args.append and args.json and pathlib.Path(args.json).exists():
        rows = json.loads(pathlib.Path(args.json).read_text())
    for label, overrides in rows_spec:
        cmd = [sys.executable, "-m", "benchmarks.memory", "--one", label]
        cmd += ["--config", args.config, "--steady-steps", str(args.steady_steps)]
        for item in [*args.set, *overrides]:
            cmd += ["--set", item]
        child_rows, error = report.run_child(cmd, args.timeout, env=_child_env())
        if child_rows:
            row = child_rows[-1]
        else:  # the process died (killed for memory, timed out, crashed) before reporting
            lines = [ln for ln in error.strip().splitlines() if ln.strip()]
            row = {
                "label": label,
                "config": args.config,
                "overrides": [*args.set, *overrides],
                "status": _failure_status(error),
                "error": lines[-1] if lines else "no output",
                "stderr_tail": error[-1500:],
                "method": METHOD,
            }
        rows.append(row)
        print(json.dumps(row), flush=True)
        report.write_json(rows, args.json)  # after every row: a later crash loses nothing
    print()
    print_table(rows)


if __name__ == "__main__":
    main()
