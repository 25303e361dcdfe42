"""Batched eigh of Gram matrices: time against batch size, on one device and spread over two.

    python -m benchmarks.eigh_batch --json benchmarks/results/eigh_batch_h200x2.json

Why a refresh spread over 2 GPUs was not 2x faster (issue 6): a batched ``jnp.linalg.eigh``
(cuSOLVER's syevd) of ``b`` matrices costs about ``a + c b`` on a GPU, with a fixed ``a`` per
call, so half the batch on each of two GPUs takes more than half the time. For each LLaMA-7B
Gram stack (``4096 x 4096`` from the attention and ``4096 x 11008`` gradients, the batch sizes of
8 layers) it times, with the Gram products included:

* the whole batch on one device, and half of it (the per-device share on two);
* the batch sharded over two devices on the stacked axis;
* the same from gradients sharded on their rows (FSDP), resharded to the stacked axis inside the
  program (the all-to-all a spread refresh does).

Needs 2 devices for the last two columns (on CPU: ``XLA_FLAGS=--xla_force_host_platform_device_
count=2``, with ``--dim 128``).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from benchmarks import report
from train import xla_flags


def _best_time(fn: Any, *args: Any, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return min(times)


def run(dim: int, batches: list[tuple[int, int]], repeats: int) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax
    from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
    from jax.sharding import PartitionSpec as P

    devices = jax.devices()
    one = SingleDeviceSharding(devices[0])
    mesh = Mesh(np.array(devices[:2]), ("d",)) if len(devices) >= 2 else None

    def top_vectors(g):
        return lax.linalg.eigh(g @ jnp.swapaxes(g, -1, -2))[0]

    rows = []
    for batch, other in batches:

        def normal(key, batch=batch, other=other):
            return jax.random.normal(key, (batch, dim, other), jnp.float32)

        key = jax.random.key(0)
        g = jax.jit(normal, out_shardings=one)(key)
        row = {
            "matrix": f"{dim}x{other}",
            "batch": batch,
            "device": devices[0].device_kind,
            "one_device_s": _best_time(jax.jit(top_vectors), g, repeats=repeats),
            "one_device_half_batch_s": _best_time(
                jax.jit(lambda g, half=batch // 2: top_vectors(g[:half])), g, repeats=repeats
            ),
        }
        del g
        if mesh is not None:
            stacked = NamedSharding(mesh, P("d"))
            g = jax.jit(normal, out_shardings=stacked)(key)
            row["two_devices_s"] = _best_time(jax.jit(top_vectors), g, repeats=repeats)
            g = jax.jit(normal, out_shardings=NamedSharding(mesh, P(None, "d")))(key)
            resharded = jax.jit(
                lambda g, to=stacked: top_vectors(lax.with_sharding_constraint(g, to))
            )
            row["two_devices_from_rows_s"] = _best_time(resharded, g, repeats=repeats)
            del g
            row["speedup_two_devices"] = row["one_device_s"] / row["two_devices_s"]
        row["ms_per_matrix"] = 1e3 * row["one_device_s"] / batch
        row["ms_per_matrix_half_batch"] = 1e3 * row["one_device_half_batch_s"] / (batch // 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    print(
        "| Gram of | batch | 1 device s | ms/matrix | half batch s | ms/matrix | "
        "2 devices s | speed-up | 2 devices from row-sharded s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        two = r.get("two_devices_s")
        print(
            f"| {r['matrix']} | {r['batch']} | {r['one_device_s']:.3f} | "
            f"{r['ms_per_matrix']:.1f} | {r['one_device_half_batch_s']:.3f} | "
            f"{r['ms_per_matrix_half_batch']:.1f} | "
            + (
                f"{two:.3f} | {r['speedup_two_devices']:.2f}x | "
                f"{r['two_devices_from_rows_s']:.3f} |"
                if two is not None
                else "- | - | - |"
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dim", type=int, default=4096, help="Gram size (the projected dim)")
    parser.add_argument(
        "--batches",
        default="32x4096,24x11008",
        help="BATCHxOTHER,...: batch of dim x OTHER gradients (default: 8 LLaMA-7B layers)",
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    xla_flags.apply_defaults()
    batches = [tuple(int(x) for x in b.split("x")) for b in args.batches.split(",")]
    rows = run(args.dim, batches, args.repeats)
    print()
    print_table(rows)
    report.write_json({"config": vars(args), "rows": rows}, args.json)


if __name__ == "__main__":
    main()
