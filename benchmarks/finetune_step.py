"""The paper's 7B fine-tuning step on one GPU: step time, peak memory, state bytes, tokens/s.

    python -m benchmarks.finetune_step --model llama_7b --json benchmarks/results/ft_7b.json

The recipe of ``configs/finetune_boolq.py`` on a LLaMA2-7B shape (hidden 4096, MLP 11008, 32
heads, 32 layers, vocab 32000), random weights and tokens: GoLore@20% (the hybrid: the
``gram_eigh`` projector until 80% of the 9,427 steps, then random), MSGD inside, rank 1024,
update_every 500, scale 4, lr 1e-4, batch 1, seq 2048, remat per decoder layer, bf16 compute
over fp32 master params (``--param-dtype bfloat16``: bf16 params, gradients and full-rank
momenta; the low-rank state stays fp32).

The step is ``train.finetune``'s own (the same sharded ``jax.jit``, params and optimizer state
donated), compiled ahead of time, so the timings hold no compilation. The refresh step is a
step whose subspace counter is 0 (``count % update_every == 0``: new bases for every matrix);
it is timed on the first step and again after setting the counter back to 0. Steady steps
follow a warm-up step. ``amortized`` spreads the refresh over ``update_every`` steps.

Memory: ``peak_bytes`` is the device allocator's peak (GPU; None on CPU); ``compiled_*`` is
XLA's buffer assignment of the compiled step (``memory_analysis()``), available on CPU too, and
``--compile-only`` stops there (nothing is allocated: it sizes a step too big to run).
``--refresh per_leaf`` decomposes each matrix on its own instead of stacking the same-shape
gradients (``batch_refresh=False``); ``--refresh batched32`` stacks at most 32 matrices per call,
one call after another (``refresh_batch_size=32``); give several (``--refresh
batched,batched32,per_leaf``) to compare, each in its own process so each peak is its own.

Seen on one H100 80GB (7B, fp32 master weights; params 25.1 GiB, optimizer state 10.5 GiB):
the stacked refresh compiles to a 93.5 GiB step (it does not fit), per-leaf to 63.4 GiB (device
peak 63.7 GiB; refresh step 21.0 s, steady step 0.360 s, 5,098 tokens/s amortized over 500
steps), ``batched16`` to 66.7 GiB (device peak 70.7 GiB: cuSOLVER's workspace is allocated at
run time, outside XLA's buffer assignment; refresh step 17.5 s, 5,198 tokens/s amortized);
``batched32`` fails at run time allocating that workspace. On the 1B the stacked refresh
costs 4-10 GiB more (compiled 19.0 vs 15.0 GiB, device peak 25.1 vs 15.0 GiB) and refreshes
2.5x faster (1.78 vs 4.41 s); steady steps are the same (0.20 s). XLA's CPU memory analysis
does not predict the GPU's (1B: 32 GiB on CPU, 15-19 GiB on the H100).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

from benchmarks import report
from benchmarks.train_step import PEAK_BF16_FLOPS, model_config
from train import xla_flags

MODELS = ("llama_tiny", "llama_1b", "llama_7b")  # shapes: configs/models.py
REFRESH_MODES = ("batched", "per_leaf", "batchedN")  # batchedN: at most N matrices per call
GIB = 2**30
CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"


def refresh_setting(mode: str) -> tuple[bool, int] | None:
    """``(batch_refresh, refresh_batch_size)`` of ``optimizer.subspace`` for a ``--refresh``
    mode, or None if the mode is not one of :data:`REFRESH_MODES`."""
    if mode == "per_leaf":
        return False, 0
    if mode == "batched":
        return True, 0
    size = mode.removeprefix("batched")
    if size != mode and size.isdigit() and int(size) > 0:
        return True, int(size)
    return None


def tree_bytes(tree: Any) -> int:
    """Bytes of every array (or ShapeDtypeStruct) leaf, PRNG keys included."""
    import math

    import jax

    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def compiled_memory(compiled: Any) -> dict[str, int | None]:
    """XLA's buffer assignment of a compiled step; ``compiled_peak`` = args + outputs - aliased
    (donated) + temporaries."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {"compiled_peak": None}
    fields = ("argument", "output", "alias", "temp", "generated_code")
    out = {f"compiled_{f}": int(getattr(stats, f"{f}_size_in_bytes")) for f in fields}
    out["compiled_peak"] = (
        out["compiled_argument"]
        + out["compiled_output"]
        - out["compiled_alias"]
        + out["compiled_temp"]
    )
    return out


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    import jax

    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


def run_one(args: argparse.Namespace, refresh: str) -> dict[str, Any]:
    """Builds, compiles and times one configuration in this process."""
    import jax
    import numpy as np
    import optax

    from configs.finetune_boolq import BOOLQ_TRAIN_EXAMPLES, get_config
    from train import finetune as ft_lib
    from train import model as model_lib

    config = model_config(args.model, args.seq, remat=True, param_dtype=args.param_dtype)
    opt = get_config().optimizer
    opt.subspace.batch_refresh, opt.subspace.refresh_batch_size = refresh_setting(refresh)
    num_steps = BOOLQ_TRAIN_EXAMPLES  # places the hybrid's switch as in the recipe
    ft = ft_lib.build_finetuner(config, opt, num_steps, ft_lib.single_device_mesh())
    row: dict[str, Any] = {
        "model": args.model,
        "refresh": refresh,
        "param_dtype": args.param_dtype,
        "seq": args.seq,
        "batch": args.batch,
        "rank_max": opt.subspace.rank,  # clipped to min(m, n) - 1 per matrix
        "update_every": opt.subspace.update_every,
        "device": jax.devices()[0].device_kind,
        "params": model_lib.count_params(ft.param_shapes),
        "param_bytes": tree_bytes(ft.param_shapes),
        "opt_state_bytes": tree_bytes(ft.opt_shapes),
    }
    start = time.perf_counter()
    compiled = ft.lower_train_step(args.batch, args.seq).compile()
    row["compile_s"] = time.perf_counter() - start
    row.update(compiled_memory(compiled))
    if args.compile_only:
        return row

    state = ft.init_state(ft.init_params(jax.random.key(0)))  # straight onto the device
    row["peak_bytes_after_init"] = _device_peak()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (args.batch, args.seq + 1), np.int32)
    weights = np.zeros((args.batch, args.seq), np.float32)
    weights[:, -2:] = 1.0  # an answer's tokens at the end, as in BoolQ
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights}
    batch = jax.device_put(batch, ft.batch_sharding)

    # Step 0 refreshes (count 0) and warms up; then steady steps; then refreshes again.
    (state, metrics), first = _timed(compiled, state, batch)
    row["peak_bytes_after_refresh"] = _device_peak()
    (state, metrics), _ = _timed(compiled, state, batch)
    steady = []
    for _ in range(args.steps):
        (state, metrics), seconds = _timed(compiled, state, batch)
        steady.append(seconds)
    refreshes = []
    for _ in range(args.refreshes):
        # count % 500 == 0 again
        state = state._replace(opt_state=optax.tree_utils.tree_set(state.opt_state, count=0))
        (state, metrics), seconds = _timed(compiled, state, batch)
        refreshes.append(seconds)
    row["first_step_s"] = first
    row["steady_step_s"] = statistics.median(steady)
    row["refresh_step_s"] = statistics.median(refreshes) if refreshes else first
    row["amortized_step_s"] = (
        row["steady_step_s"]
        + (row["refresh_step_s"] - row["steady_step_s"]) / opt.subspace.update_every
    )
    tokens_per_step = args.batch * args.seq
    row["steady_tokens_per_s"] = tokens_per_step / row["steady_step_s"]
    row["amortized_tokens_per_s"] = tokens_per_step / row["amortized_step_s"]
    peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if k in row["device"]), None)
    flops = model_lib.model_flops_per_token(config, args.seq) * tokens_per_step
    row["mfu_steady"] = flops / row["steady_step_s"] / peak_flops if peak_flops else None
    row["final_loss"] = float(metrics["loss"])
    row["peak_bytes"] = _device_peak()
    row["bytes_limit"] = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    return row


def _device_peak() -> int | None:
    """The allocator's peak so far (None where the backend keeps no statistics, e.g. CPU)."""
    import jax

    return (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")


def _gib(x: int | None) -> str:
    return "-" if x is None else f"{x / GIB:.3f}"


def print_table(rows: list[dict[str, Any]]) -> None:
    """One markdown row per configuration."""
    print(
        "| model | refresh | params | seq x batch | param GiB | opt state GiB | compiled peak GiB"
        " | device peak GiB | refresh step s | steady step s | steady tok/s"
        " | amortized tok/s (tau=500) | MFU |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        timed = "steady_step_s" in r
        mfu = r.get("mfu_steady")
        print(
            f"| {r['model']} | {r['refresh']} | {r['params'] / 1e6:.0f}M {r['param_dtype']} | "
            f"{r['seq']}x{r['batch']} | {_gib(r['param_bytes'])} | {_gib(r['opt_state_bytes'])}"
            f" | {_gib(r['compiled_peak'])} | {_gib(r.get('peak_bytes'))} | "
            + (
                f"{r['refresh_step_s']:.3f} | {r['steady_step_s']:.3f} | "
                f"{r['steady_tokens_per_s']:,.0f} | {r['amortized_tokens_per_s']:,.0f} | "
                if timed
                else "- | - | - | - | "
            )
            + (f"{mfu:.1%} |" if mfu else "- |")
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=MODELS, default="llama_7b")
    parser.add_argument("--steps", type=int, default=5, help="timed steady steps")
    parser.add_argument("--refreshes", type=int, default=2, help="timed refresh steps (>= 0)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--param-dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument(
        "--refresh", default="batched", help=f"comma list of {', '.join(REFRESH_MODES)}"
    )
    parser.add_argument("--compile-only", action="store_true", help="compiled memory only")
    parser.add_argument("--json", default=None)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    xla_flags.apply_defaults()  # before JAX starts a backend; children inherit it
    # Read when jax starts. The step may use the whole card (JAX reserves 75% by default).
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    # CPU only: XLA's default CPU scheduler trades memory for parallelism and keeps every
    # layer's attention alive (4 layers of a 1B: 7.9 GiB of temporaries, remat or not; 3.0 GiB
    # with it off), so the CPU's compiled memory says nothing about a GPU's without this.
    if CPU_SCHEDULER_FLAG not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_SCHEDULER_FLAG}=false"
    modes = args.refresh.split(",")
    if unknown := [m for m in modes if refresh_setting(m) is None]:
        parser.error(f"--refresh: unknown {unknown}; choose from {REFRESH_MODES}")
    if args.steps < 1 or args.refreshes < 0:
        parser.error("--steps must be >= 1 and --refreshes >= 0")
    if len(modes) == 1 or args.one:
        rows = [run_one(args, modes[0])]
        if args.one:
            report.print_result(rows[0])
            return
    else:
        rows = [_in_subprocess(args, mode) for mode in modes]
        rows = [r for r in rows if r is not None]
    print_table(rows)
    report.write_json(rows, args.json)


def _in_subprocess(args: argparse.Namespace, mode: str) -> dict[str, Any] | None:
    """Runs this script for one refresh mode in a fresh process (its own device peak)."""
    cmd = [sys.executable, "-m", "benchmarks.finetune_step", "--one", "--refresh", mode]
    cmd += ["--model", args.model, "--steps", str(args.steps), "--refreshes", str(args.refreshes)]
    cmd += ["--seq", str(args.seq), "--batch", str(args.batch), "--param-dtype", args.param_dtype]
    cmd += ["--compile-only"] if args.compile_only else []
    rows, error = report.run_child(cmd)
    if not rows:
        print(f"--refresh {mode} failed:\n{error}", flush=True)
        return None
    return rows[-1]


if __name__ == "__main__":
    main()
