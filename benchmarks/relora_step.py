"""ReLoRA-like path vs the plain GaLore step: step time and peak memory, one GPU.

    python -m benchmarks.relora_step --models llama_350m,llama_1b \
        --json benchmarks/results/relora_step.json

Both paths are the trainer's own jitted step (``train.main.build_trainer``), GaLore-AdamW with
the gram_eigh projector, the paper's ranks, no clipping or weight decay (what the ReLoRA-like
path requires), random tokens, bf16 compute and fp32 master weights. Each (model, path) runs in
its own process so the peak device memory is its own. Timed like benchmarks/train_step.py: the
steady step (the low-rank step for ``relora``) and the
refresh step (merge + full gradient + plain update for ``relora``), told apart in one run with
``update_every = 8`` (one compile per path); the amortized step at ``tau = 200`` is
``steady + (refresh - steady) / 200``.

Table 1 of the GoLore paper (MSGD, per ``m x n`` layer, ``b`` tokens): GaLore's forward and
backward take ``6bmn`` FLOPs, the ReLoRA-like ones ``4bmn + 4brm + 6brn``; the table prints that
predicted ratio for the model's projected layers beside the measured one.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time

from benchmarks import report
from benchmarks.train_step import BATCH_AT_SEQ_256
from configs.models import MODELS as SHAPES
from train import xla_flags

PATHS = ("relora", "plain")  # relora first: by default its peak memory is measured


def _config(model_name: str, path: str, update_every: int, seq: int, batch: int, rank: int):
    from configs.base import llama_config

    shape = SHAPES[model_name]
    config = llama_config(
        shape.hidden, shape.intermediate, shape.heads, shape.layers, vocab=shape.vocab
    )
    config.model.max_seq_len = seq
    config.seq_len, config.batch_size = seq, batch
    config.num_steps = 10**6
    opt, sub = config.optimizer, config.optimizer.subspace
    opt.name, opt.grad_clip, opt.weight_decay = "galore", 0.0, 0.0
    sub.projector, sub.rank, sub.update_every, sub.scale = "gram_eigh", rank, update_every, 0.25
    config.step.relora = path == "relora"
    return config


def predicted_dense_ratio(model_name: str, tokens: int, r: int) -> float:
    """Table 1: (4bmn + 4brm + 6brn) / 6bmn summed over one layer's projected matrices."""
    hidden, inter = SHAPES[model_name].hidden, SHAPES[model_name].intermediate
    shapes = [(hidden, hidden)] * 4 + [(hidden, inter)] * 2 + [(inter, hidden)]
    b = tokens
    plain = sum(6 * b * m * n for m, n in shapes)
    relora = sum(4 * b * m * n + 4 * b * r * m + 6 * b * r * n for m, n in shapes)
    return relora / plain


def run_one(
    model_name: str, paths: list[str], seq: int, batch: int | None, steps: int, rank: int | None
) -> list[dict]:
    """Times ``paths`` one after the other in this process.

    The first path's trainer initialises the weights (compiling the init takes minutes at
    350M); later paths start from its weights (``W0 + P A`` merged) and optimizer state. Only
    the first path's peak memory is its own: later rows report None.
    """
    import jax
    import numpy as np

    from train import main as main_lib
    from train import relora as relora_lib
    from train import sharding as sharding_lib

    batch = batch or max(1, BATCH_AT_SEQ_256[model_name] * 256 // seq)
    rank = rank or SHAPES[model_name].rank
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, SHAPES[model_name].vocab, (batch, seq + 1), dtype=np.int32)
    host_batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    tokens_per_step = batch * seq
    # Refreshes happen at steps 0, tau, 2 tau, ...; the others are steady steps.
    tau = 8
    rows, state, previous = [], None, None
    for path in paths:
        config = _config(model_name, path, tau, seq, batch, rank)
        mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:1])
        trainer = main_lib.build_trainer(config, mesh)
        if state is None:
            state = trainer.init(jax.random.key(0))
        else:  # the previous path's weights and optimizer state, at a refresh step
            weights = previous.weights(state)
            opt_state = state.opt_state
            adapters = None
            if config.step.relora:
                adapters = relora_lib.AdapterLayer.for_optimizer(weights, config.optimizer)
                adapters = adapters.init(weights)
            state = main_lib.TrainState(state.step, weights, opt_state, state.skipped, adapters)
            state = jax.device_put(state, trainer.state_sharding)
        device_batch = main_lib.to_global(host_batch, trainer.batch_sharding)
        steady_times, refresh_times = [], []
        for step in range(steps + 2):
            t0 = time.perf_counter()
            state, metrics = trainer.train_step(state, device_batch)
            float(metrics["loss"])
            if step >= 2:  # the first two calls compile (a refresh and a steady step)
                count = int(relora_lib.subspace_state(state.opt_state).count) - 1
                times = refresh_times if count % tau == 0 else steady_times
                times.append(time.perf_counter() - t0)
        previous = trainer
        steady, refresh = statistics.median(steady_times), statistics.median(refresh_times)
        amortized = steady + (refresh - steady) / 200
        stats = jax.devices()[0].memory_stats() or {}
        rows.append(
            {
                "model": model_name,
                "path": path,
                "rank": rank,
                "seq": seq,
                "batch": batch,
                "device": jax.devices()[0].device_kind,
                "steady_step_s": steady,
                "refresh_step_s": refresh,
                "amortized_step_s": amortized,
                "amortized_tokens_per_s": tokens_per_step / amortized,
                "peak_bytes": stats.get("peak_bytes_in_use") if not rows else None,
                "predicted_dense_flops_ratio": predicted_dense_ratio(
                    model_name, tokens_per_step, rank
                ),
                "params_bytes": _nbytes(state.params),
                "opt_state_bytes": _nbytes(state.opt_state),
                "adapter_bytes": _nbytes(state.adapters),
            }
        )
    return rows


def _nbytes(tree) -> int:
    import jax

    return sum(x.nbytes for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "nbytes"))


def _print_table(rows: list[dict]) -> None:
    print(
        "| model | path | rank | seq x batch | steady step ms | refresh step ms | amortized tok/s "
        "(tau=200) | vs plain | Table 1 dense FLOPs ratio | peak GiB | state MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    plain = {(r["model"], r["rank"]): r for r in rows if r["path"] == "plain"}
    for r in rows:
        base = plain.get((r["model"], r["rank"]))
        vs = f"{r['amortized_tokens_per_s'] / base['amortized_tokens_per_s']:.3f}" if base else "-"
        peak = f"{r['peak_bytes'] / 2**30:.2f}" if r["peak_bytes"] else "-"
        state = (r["opt_state_bytes"] + r["adapter_bytes"]) / 2**20
        print(
            f"| {r['model']} | {r['path']} | {r['rank']} | {r['seq']}x{r['batch']} | "
            f"{r['steady_step_s'] * 1e3:.1f} | {r['refresh_step_s'] * 1e3:.1f} | "
            f"{r['amortized_tokens_per_s']:,.0f} | {vs} | "
            f"{r['predicted_dense_flops_ratio']:.3f} | {peak} | {state:.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="llama_350m,llama_1b")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=24, help="timed steps (every 8th refreshes)")
    parser.add_argument("--ranks", default=None, help="comma list; default: GaLore paper's")
    parser.add_argument(
        "--separate",
        action="store_true",
        help="one process per path (each peak memory its own; two inits instead of one)",
    )
    parser.add_argument("--json", default=None)
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    xla_flags.apply_defaults()  # before JAX starts a backend; children inherit it
    if args.one:
        rank = int(args.ranks) if args.ranks else None
        model_name, paths = args.one[0], args.one[1].split("+")
        for row in run_one(model_name, paths, args.seq, args.batch, args.steps, rank):
            report.print_result(row)
        return
    rows = []
    ranks = args.ranks.split(",") if args.ranks else [None]
    groups = [PATHS] if args.separate else [["+".join(PATHS)]]
    for model_name, rank, path in itertools.product(args.models.split(","), ranks, *groups):
        cmd = [sys.executable, "-m", "benchmarks.relora_step", "--one", model_name, path]
        cmd += ["--seq", str(args.seq), "--steps", str(args.steps)]
        cmd += ["--ranks", rank] if rank else []
        if args.batch:
            cmd += ["--batch", str(args.batch)]
        child_rows, error = report.run_child(cmd)
        if not child_rows:
            print(f"{model_name} {path} failed:\n{error}", flush=True)
            continue
        for row in child_rows:
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    _print_table(rows)
    report.write_json(rows, args.json)


if __name__ == "__main__":
    main()
