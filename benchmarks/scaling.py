"""Data/FSDP scaling of the sharded train step: 1 vs N devices, same per-device batch.

    python -m benchmarks.scaling --config configs/llama_60m.py --devices 1,2 \
        --per-device-batch 64 --json benchmarks/results/scaling.json

Builds the trainer exactly as ``python -m train`` does (``train.main.build_trainer``) on an
``fsdp=N`` mesh (params and optimizer state sharded), feeds random tokens, and times the steady
step (no refresh) and a refresh step (every projector refreshed) with ``block_until_ready``.
Scaling efficiency = tokens/s on N devices / (N x tokens/s on 1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from benchmarks import report
from train import main as main_lib
from train import sharding as sharding_lib
from train import xla_flags


def _load_config(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def measure(config_path: str, n: int, per_device_batch: int, steps: int, update_every: int):
    config = _load_config(config_path)
    config.batch_size = per_device_batch * n
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, n, 1
    config.optimizer.subspace.update_every = update_every
    mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:n])
    trainer = main_lib.build_trainer(config, mesh)
    state = trainer.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.model.vocab_size, (config.batch_size, config.seq_len + 1))
    batch = main_lib.to_global(
        {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32)},
        trainer.batch_sharding,
    )
    state, metrics = trainer.train_step(state, batch)  # compile (+ the step-0 refresh)
    jax.block_until_ready(metrics["loss"])
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t0)
    return statistics.median(times), config.batch_size * config.seq_len


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/llama_60m.py")
    parser.add_argument("--devices", default="1,2")
    parser.add_argument("--per-device-batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", default=None)
    parser.add_argument("--no-refresh", action="store_true", help="skip the refresh-step timing")
    args = parser.parse_args()
    xla_flags.apply_defaults()  # before JAX starts a backend; children inherit it
    rows = []
    for n in (int(x) for x in args.devices.split(",")):
        steady, tokens = measure(args.config, n, args.per_device_batch, args.steps, 10**6)
        refresh = (
            None if args.no_refresh else measure(args.config, n, args.per_device_batch, 2, 1)[0]
        )
        rows.append(
            {
                "devices": n,
                "device": jax.devices()[0].device_kind,
                "global_batch": tokens // _load_config(args.config).seq_len,
                "steady_step_s": steady,
                "refresh_step_s": refresh,
                "tokens_per_s": tokens / steady,
                "tokens_per_s_per_device": tokens / steady / n,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["tokens_per_s_per_device"]
    print(
        "| devices | global batch | steady step ms | tokens/s | per device | efficiency"
        " | refresh step s |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['devices']} | {r['global_batch']} | {1e3 * r['steady_step_s']:.1f} | "
            f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_device']:,.0f} | "
            f"{r['tokens_per_s_per_device'] / base:.2f} | "
            f"{r['refresh_step_s'] or float('nan'):.3f} |"
        )
    report.write_json(rows, args.json)


if __name__ == "__main__":
    main()
