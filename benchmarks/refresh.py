"""Projector refresh cost and captured energy: jnp SVD, Gram eigh, subspace iteration, random.

    python -m benchmarks.refresh --part shapes --json benchmarks/results/refresh_shapes.json
    python -m benchmarks.refresh --part full --models llama_1b --json .../refresh_1b.json
    python -m benchmarks.refresh --part full --models llama_7b --layers-7b 4 --json ...
    python -m benchmarks.refresh --part full --models llama_1b --devices 1,8 --json ...
    python -m benchmarks.refresh --shapes small --part all      # CPU smoke test
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m benchmarks.refresh \
        --part full --models llama_micro --devices 1,2 --full-methods gram_eigh  # CPU, 2 devices

Part ``shapes``: one ``m x n`` fp32 gradient per LLaMA MLP shape (``m <= n``, the projected
side ``m``) with the GaLore paper's rank. Every projector of :mod:`golore_jax.projectors` is
jitted and timed alone (median of ``--repeats`` runs after a warm-up, ``block_until_ready``),
and ``torch.linalg.svd`` (what galore-torch calls at a refresh) is timed on a gradient built
the same way in a separate ``--backend torch`` process. Captured energy is
``||P^T G||_F^2 / ||U_r^T G||_F^2`` with ``U_r`` the top-``r`` left singular vectors of ``G``
from the exact fp32 SVD (1 for the SVD itself; about ``(r/m) ||G||^2 / ||U_r^T G||^2`` for a
random basis).

The gradient (built on the device): ``G = A diag(s) B^T + noise`` with ``A`` (``m x m``) and
``B`` (``n x m``) the orthonormal Q factors of Gaussian matrices, a power-law spectrum
``s_i = i^-alpha`` (``--alpha``, default 1) and i.i.d. Gaussian noise of spectral norm about
``--noise * s_1``. The realistic refresh: the previous basis is the exact top-``r`` basis of the
gradient ``--perturb`` (relative Frobenius distance) away, ``G_prev = G + perturb ||G|| E/||E||``,
standing in for the gradient ``update_every = 200`` steps earlier; subspace iteration is timed
warm-started from it (2 iterations) and cold-started from a Gaussian (8 iterations), and the
energy of that stale basis itself (no refresh) is reported as ``previous (stale)``.

Part ``full``: one ``scale_by_subspace(optax.scale_by_adam(), rank, update_every=10**6,
projector)`` update on a whole LLaMA param tree (:func:`benchmarks.state_memory.
llama_param_shapes`, Gaussian gradients), through golore_jax's batched same-shape refresh. The
same compiled update is called with ``count = 0`` (refresh: ``lax.cond`` takes the refresh
branch) and ``count = 1`` (no refresh); refresh cost = the difference. The first refresh call is
the warm-up (a cold start for subspace iteration); the timed ones start from its bases (warm).
When the warm-up refresh takes over 10 s (SVD) it is itself the measurement.
7B does not fit one 80 GB GPU with every layer's stacked SVD workspace, so it is measured with
``--layers-7b`` layers (default 4 of 32) and the refresh cost is scaled by ``32 / layers``
(the refresh is a per-layer batch of decompositions, linear in the layer count); the output
says so.

``--devices 1,N`` measures the same full refresh spread over ``N`` devices: the gradients (and
the optimizer state, with :func:`golore_jax.partitioning.state_partition_specs`) are sharded
FSDP-like, each leaf's first axis over a 1-D ``fsdp`` mesh of the first ``N`` devices (replicated
where ``N`` does not divide it), and ``refresh_sharding`` spreads each stack of same-shape
matrices over that mesh, so each device decomposes about ``1/N`` of them. A last table gives the
refresh cost per device count and the speed-up over the 1-device run of the same invocation
(``speedup_vs_1_device`` in the JSON rows, and the ``full_scaling`` list). On CPU the devices
are fake (``XLA_FLAGS=--xla_force_host_platform_device_count=N``) and share the host's cores,
so there the speed-up only checks that the spread runs; ``peak_bytes`` is device 0's.

Each (backend, shape) and each (model, method, devices) runs in its own process.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from benchmarks import report
from configs.models import MODELS, SMOKE_MODELS
from train import xla_flags

SHAPES = {  # name -> list of (m, n, rank): LLaMA MLP shapes, GaLore paper ranks
    "paper": [(512, 1376, 128), (1024, 2736, 256), (2048, 5461, 512), (4096, 11008, 1024)],
    "small": [(64, 172, 16), (128, 344, 32)],
}
JAX_METHODS = (
    "jnp_svd",
    "gram_eigh",
    "subspace_iter_warm",
    "subspace_iter_cold",
    "random_qr",
    "random_polar",
)
TORCH_METHODS = ("torch_svd", "torch_gram_eigh")
# Shapes and GaLore ranks: configs/models.py (llama_micro: its CPU smoke shape).
FULL_MODELS = {
    "llama_1b": MODELS["llama_1b"],
    "llama_7b": MODELS["llama_7b"],
    "llama_micro": SMOKE_MODELS["llama_micro"],
}
FULL_METHODS = ("svd", "gram_eigh", "subspace_iteration", "random")
# Fake CPU devices: pool threads per device, above the same-shape groups (2 for LLaMA) whose
# batched decompositions one device may run at once (see _full_env).
CPU_POOL_PER_DEVICE = 4


def _median_time(
    fn: Callable[[], Any], repeats: int, sync: Callable[[Any], Any]
) -> tuple[float, Any]:
    """Median wall time (s) of ``fn`` over ``repeats`` runs after one warm-up run, and its output.

    When the warm-up run takes more than 2 s, only ``min(repeats, 2)`` timed runs are made.
    """
    t0 = time.perf_counter()
    out = sync(fn())
    if time.perf_counter() - t0 > 2.0:
        repeats = min(repeats, 2)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = sync(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


# ----------------------------------------------------------------------------- shapes, jax


def run_shape_jax(m: int, n: int, rank: int, args: argparse.Namespace) -> list[dict]:
    """Times every golore_jax projector on one ``m x n`` gradient; returns one row per method."""
    import jax
    import jax.numpy as jnp

    import golore_jax as gl

    @jax.jit
    def make(key):
        ka, kb, kn, kp = jax.random.split(key, 4)
        a, _ = jnp.linalg.qr(jax.random.normal(ka, (m, m), jnp.float32))
        b, _ = jnp.linalg.qr(jax.random.normal(kb, (n, m), jnp.float32))
        s = jnp.arange(1, m + 1, dtype=jnp.float32) ** -args.alpha
        noise = jax.random.normal(kn, (m, n), jnp.float32) * (args.noise / (n**0.5 + m**0.5))
        g = (a * s[None, :]) @ b.T + noise
        e = jax.random.normal(kp, (m, n), jnp.float32)
        g_prev = g + args.perturb * jnp.linalg.norm(g) * e / jnp.linalg.norm(e)
        u, _, _ = jnp.linalg.svd(g, full_matrices=False)
        u_prev, _, _ = jnp.linalg.svd(g_prev, full_matrices=False)
        return g, u[:, :rank], u_prev[:, :rank]

    g, u_r, previous = make(jax.random.key(args.seed))
    best = float(jnp.sum((u_r.T @ g) ** 2))
    zeros = jnp.zeros((m, rank), jnp.float32)
    step = jnp.zeros([], jnp.int32)
    key = jax.random.key(1)
    methods: dict[str, tuple[Any, jax.Array]] = {
        "jnp_svd": (gl.projectors.svd(), zeros),
        "gram_eigh": (gl.projectors.gram_eigh(), zeros),
        "subspace_iter_warm": (gl.projectors.subspace_iteration(), previous),
        "subspace_iter_cold": (gl.projectors.subspace_iteration(), zeros),
        "random_qr": (gl.projectors.random("qr"), zeros),
        "random_polar": (gl.projectors.random("polar"), zeros),
    }
    device = jax.devices()[0].device_kind
    base = {"part": "shapes", "m": m, "n": n, "rank": rank, "device": device}
    rows = [
        base
        | {
            "method": "previous (stale)",
            "time_ms": None,
            "energy": float(jnp.sum((previous.T @ g) ** 2)) / best,
            "ortho_err": None,
        }
    ]
    for name in args.methods.split(","):
        if name not in methods:
            continue
        projector, prev = methods[name]
        fn = jax.jit(projector)
        seconds, basis = _median_time(
            lambda fn=fn, prev=prev: fn(key, g, prev, step), args.repeats, jax.block_until_ready
        )
        ortho = float(jnp.max(jnp.abs(basis.T @ basis - jnp.eye(rank))))
        energy = float(jnp.sum((basis.T @ g) ** 2)) / best
        rows.append(
            base | {"method": name, "time_ms": seconds * 1e3, "energy": energy, "ortho_err": ortho}
        )
    return rows


# ----------------------------------------------------------------------------- shapes, torch


def run_shape_torch(m: int, n: int, rank: int, args: argparse.Namespace) -> list[dict]:
    """Times ``torch.linalg.svd`` (galore-torch's refresh) and ``torch.linalg.eigh`` of ``GG^T``.

    The gradient is built as in :func:`run_shape_jax` with torch's RNG (same distribution).
    """
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gen = torch.Generator(device=device).manual_seed(args.seed)

    def normal(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)

    a, _ = torch.linalg.qr(normal(m, m))
    b, _ = torch.linalg.qr(normal(n, m))
    s = torch.arange(1, m + 1, device=device, dtype=torch.float32) ** -args.alpha
    g = (a * s[None, :]) @ b.T + normal(m, n) * (args.noise / (n**0.5 + m**0.5))
    u, _, _ = torch.linalg.svd(g, full_matrices=False)
    u_r = u[:, :rank]
    best = float((u_r.T @ g).square().sum())

    def sync(x):
        if device.type == "cuda":
            torch.cuda.synchronize()
        return x

    def svd_basis():
        return torch.linalg.svd(g, full_matrices=False)[0][:, :rank]

    def eigh_basis():
        return torch.linalg.eigh(g @ g.T)[1].flip(-1)[:, :rank]

    name_kind = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []
    for name, fn in (("torch_svd", svd_basis), ("torch_gram_eigh", eigh_basis)):
        seconds, basis = _median_time(fn, args.repeats, sync)
        eye = torch.eye(rank, device=device)
        rows.append(
            {
                "part": "shapes",
                "m": m,
                "n": n,
                "rank": rank,
                "device": name_kind,
                "method": name,
                "time_ms": seconds * 1e3,
                "energy": float((basis.T @ g).square().sum()) / best,
                "ortho_err": float((basis.T @ basis - eye).abs().max()),
            }
        )
    return rows


# ----------------------------------------------------------------------------- full model


def _fsdp_mesh(devices: int) -> Any:
    """A 1-D ``fsdp`` mesh of the first ``devices`` devices; None for one device."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    if devices == 1:
        return None  # the original single-device path: no mesh, no refresh_sharding
    if jax.device_count() < devices:
        raise SystemExit(
            f"--devices {devices}: only {jax.device_count()} devices; on CPU set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={devices}"
        )
    return Mesh(np.array(jax.devices()[:devices]), ("fsdp",))


def _fsdp_shardings(mesh: Any, tx: Any, shapes: Any) -> tuple[Any, Any]:
    """NamedShardings of the gradients (first axis over ``fsdp`` where it divides) and of
    ``tx``'s state (bases and moments follow their parameter's spec, as in the trainer)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from golore_jax.partitioning import state_partition_specs

    n = mesh.devices.size
    specs = jax.tree_util.tree_map(
        lambda x: PartitionSpec("fsdp") if x.shape[0] % n == 0 else PartitionSpec(), shapes
    )
    state_specs = state_partition_specs(jax.eval_shape(tx.init, shapes), shapes, specs)

    def named(tree):
        return jax.tree_util.tree_map(
            lambda s: NamedSharding(mesh, s),
            tree,
            is_leaf=lambda x: isinstance(x, PartitionSpec),
        )

    return named(specs), named(state_specs)


def run_full(model_name: str, method: str, args: argparse.Namespace) -> dict:
    """Refresh cost of one ``scale_by_subspace`` update over a whole LLaMA param tree,
    on one device or spread over ``args.run_devices`` (FSDP-like, ``refresh_sharding``)."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding, PartitionSpec

    import golore_jax as gl
    from benchmarks.state_memory import model_param_shapes
    from golore_jax._subspace import scale_by_subspace

    shape = FULL_MODELS[model_name]
    layers, rank = shape.layers, shape.rank
    measured_layers = min(layers, args.layers_7b) if model_name == "llama_7b" else layers
    shapes = model_param_shapes(shape, measured_layers)
    dtype = jnp.dtype(args.grad_dtype)
    leaves, treedef = jax.tree_util.tree_flatten(shapes)
    mesh = _fsdp_mesh(args.run_devices)
    projector = {
        "svd": gl.projectors.svd(),
        "gram_eigh": gl.projectors.gram_eigh(),
        "subspace_iteration": gl.projectors.subspace_iteration(),
        "random": gl.projectors.random(),
    }[method]
    tx = scale_by_subspace(
        optax.scale_by_adam(),
        rank=rank,
        update_every=10**6,
        projector=projector,
        # The stacked axis of each same-shape group over the mesh: each device decomposes
        # its share of the matrices.
        refresh_sharding=None if mesh is None else NamedSharding(mesh, PartitionSpec("fsdp")),
    )
    # Explicit shardings only with a mesh: on one device jit keeps its defaults as before.
    grad_jit: dict[str, Any] = {}
    state_jit: dict[str, Any] = {}
    update_jit: dict[str, Any] = {}
    if mesh is not None:
        grad_shardings, state_shardings = _fsdp_shardings(mesh, tx, shapes)
        grad_jit = {"out_shardings": grad_shardings}
        state_jit = {"out_shardings": state_shardings}
        # Same shardings in and out, so the warm state feeds the compiled update again.
        update_jit = {
            "in_shardings": (grad_shardings, state_shardings),
            "out_shardings": (grad_shardings, state_shardings),
        }

    @functools.partial(jax.jit, **grad_jit)
    def make_grads(key):
        keys = jax.random.split(key, len(leaves))
        return treedef.unflatten(
            [jax.random.normal(k, x.shape, dtype) for k, x in zip(keys, leaves, strict=True)]
        )

    grads = make_grads(jax.random.key(args.seed))
    state = jax.jit(tx.init, **state_jit)(grads)
    t0 = time.perf_counter()
    update = jax.jit(tx.update, **update_jit).lower(grads, state).compile()
    compile_s = time.perf_counter() - t0

    def call(count: int, s):
        return update(grads, s._replace(count=jnp.asarray(count, jnp.int32)))

    t0 = time.perf_counter()
    _, warm = jax.block_until_ready(call(0, state))  # warm-up refresh (cold start)
    first_refresh_s = time.perf_counter() - t0
    refresh_times, plain_times = [], []
    if first_refresh_s > 10.0 and method != "subspace_iteration":
        # A refresh this long is dominated by the decompositions, not by first-call overheads:
        # the warm-up call is the measurement (saves minutes of device time for SVD).
        refresh_times.append(first_refresh_s)
    for _ in range(args.full_repeats - len(refresh_times)):
        t0 = time.perf_counter()
        jax.block_until_ready(call(0, warm))
        refresh_times.append(time.perf_counter() - t0)
    jax.block_until_ready(call(1, warm))
    for _ in range(max(3, args.full_repeats)):
        t0 = time.perf_counter()
        jax.block_until_ready(call(1, warm))
        plain_times.append(time.perf_counter() - t0)
    refresh_s = statistics.median(refresh_times)
    plain_s = statistics.median(plain_times)
    if args.profile:
        # One refresh and one plain update, traced after the timings (they stay untraced).
        with jax.profiler.trace(f"{args.profile}/{model_name}_{method}_{args.run_devices}dev"):
            jax.block_until_ready(call(0, warm))
            jax.block_until_ready(call(1, warm))
    scale = layers / measured_layers
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "part": "full",
        "model": model_name,
        "method": method,
        "rank": rank,
        "layers": layers,
        "layers_measured": measured_layers,
        "layer_scale": scale,
        "matrices_measured": 7 * measured_layers,
        "grad_dtype": str(dtype),
        "device": jax.devices()[0].device_kind,
        "devices": args.run_devices,
        "compile_s": compile_s,
        "first_refresh_update_s": first_refresh_s,
        "refresh_update_s": refresh_s,
        "plain_update_s": plain_s,
        "refresh_cost_measured_s": refresh_s - plain_s,
        "refresh_cost_s": (refresh_s - plain_s) * scale,
        "peak_bytes": stats.get("peak_bytes_in_use"),
    }


# ----------------------------------------------------------------------------- driver


def _subprocess(
    cmd: list[str], timeout: float, env: dict[str, str] | None = None
) -> tuple[Any, str]:
    """Runs ``cmd`` and returns (its last result row or None, why there is none)."""
    rows, error = report.run_child(cmd, timeout, env)
    return (rows[-1] if rows else None), error


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_shapes_table(rows: list[dict]) -> None:
    """Markdown table: shape, method, time, speedups vs torch.linalg.svd and jnp svd, energy."""
    print(
        "| shape (m x n, r) | method | time ms | vs torch.linalg.svd | vs jnp svd | energy"
        " | ortho err |"
    )
    print("|---|---|---|---|---|---|---|")
    ref: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r["method"] in ("torch_svd", "jnp_svd") and r["time_ms"]:
            ref.setdefault((r["m"], r["n"], r["rank"]), {})[r["method"]] = r["time_ms"]
    for r in rows:
        key = (r["m"], r["n"], r["rank"])
        t = r["time_ms"]
        torch_t, jnp_t = ref.get(key, {}).get("torch_svd"), ref.get(key, {}).get("jnp_svd")
        vs_torch = f"{torch_t / t:.2f}x" if t and torch_t else "-"
        vs_jnp = f"{jnp_t / t:.2f}x" if t and jnp_t else "-"
        print(
            f"| {r['m']}x{r['n']}, r={r['rank']} | {r['method']} | {_fmt(t, '.2f')} | "
            f"{vs_torch} | {vs_jnp} | {_fmt(r['energy'], '.4f')} | "
            f"{_fmt(r['ortho_err'], '.1e')} |"
        )


def _devices(row: dict) -> int:
    """Devices a full-part row was measured on (rows written before ``--devices``: 1)."""
    return row.get("devices", 1)


def _model_key(row: dict) -> tuple[str, int]:
    return row["model"], _devices(row)


def add_speedups(rows: list[dict]) -> list[dict]:
    """Sets ``speedup_vs_1_device`` on every full row: the 1-device refresh cost of the same
    (model, method) in this run over its own (None without a usable 1-device row)."""
    single = {(r["model"], r["method"]): r["refresh_cost_s"] for r in rows if _devices(r) == 1}
    for r in rows:
        base = single.get((r["model"], r["method"]))
        ok = base is not None and base > 0 and r["refresh_cost_s"] > 0
        r["speedup_vs_1_device"] = base / r["refresh_cost_s"] if ok else None
    return rows


def scaling_summary(rows: list[dict]) -> list[dict]:
    """The device-count table as JSON rows: refresh cost and speed-up per (model, method, N)."""
    keys = ("model", "method", "devices", "refresh_cost_s", "speedup_vs_1_device")
    return [{k: r.get(k, 1 if k == "devices" else None) for k in keys} for r in rows]


def print_devices_table(rows: list[dict]) -> None:
    """Markdown table: refresh cost (full model, s) per device count and speed-up vs 1 device."""
    counts = sorted({_devices(r) for r in rows})
    cost = {(r["model"], r["method"], _devices(r)): r for r in rows}
    others = [n for n in counts if n != 1]
    print(
        "| model | method | "
        + " | ".join(f"refresh s, {n} dev" for n in counts)
        + "".join(f" | speed-up {n} dev" for n in others)
        + " |"
    )
    print("|---|---|" + "---|" * (len(counts) + len(others)))
    for model, method in dict.fromkeys((r["model"], r["method"]) for r in rows):
        mine = {n: cost.get((model, method, n), {}) for n in counts}  # {} where it failed
        times = [_fmt(mine[n].get("refresh_cost_s"), ".4f") for n in counts]
        speedups = [_fmt(mine[n].get("speedup_vs_1_device"), ".2f") for n in others]
        speedups = [x if x == "-" else f"{x}x" for x in speedups]
        print(f"| {model} | {method} | " + " | ".join(times + speedups) + " |")


def print_full_table(rows: list[dict]) -> None:
    """Markdown table of the whole-model refresh cost."""
    print(
        "| model | method | layers measured | plain update ms | refresh update ms"
        " | refresh cost s (full model) | vs svd | amortized over 200 steps ms | peak GiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    svd_cost = {_model_key(r): r["refresh_cost_s"] for r in rows if r["method"] == "svd"}
    for r in rows:
        base = svd_cost.get(_model_key(r))
        vs = f"{base / r['refresh_cost_s']:.1f}x" if base and r["refresh_cost_s"] > 0 else "-"
        layers = f"{r['layers_measured']}/{r['layers']}"
        if r["layer_scale"] != 1:
            layers += f" (cost x{r['layer_scale']:g})"
        peak = _fmt(r["peak_bytes"] and r["peak_bytes"] / 2**30, ".1f")
        model = r["model"] if _devices(r) == 1 else f"{r['model']} ({_devices(r)} devices)"
        print(
            f"| {model} | {r['method']} | {layers} | {r['plain_update_s'] * 1e3:.1f} | "
            f"{r['refresh_update_s'] * 1e3:.1f} | {r['refresh_cost_s']:.3f} | {vs} | "
            f"{r['refresh_cost_s'] / 200 * 1e3:.2f} | {peak} |"
        )
    if any(r["layer_scale"] != 1 for r in rows):
        print(
            "\nRows with 'cost xK' were measured on fewer layers (the full stacked refresh does "
            "not fit one GPU); their refresh cost is the measured difference times K."
        )


def _full_env(device_counts: list[int]) -> dict[str, str] | None:
    """The environment of the full-part processes: with fake CPU devices, a larger CPU pool.

    jaxlib's batched CPU LAPACK kernels (eigh, SVD, QR) split a batch over the intra-op pool
    and block a pool thread until the pieces finish; with one such call per fake device (and
    per same-shape group) in flight, a pool of ``cpu_count`` threads can be exhausted and the
    run deadlocks (seen with 2 fake devices on 2 cores). ``PJRT_NPROC`` sizes that pool; it is
    set the same for every device count of the run so their timings stay comparable.
    """
    env = dict(os.environ)
    fake = "xla_force_host_platform_device_count" in env.get("XLA_FLAGS", "")
    if max(device_counts) == 1 or not fake or "PJRT_NPROC" in env or "NPROC" in env:
        return None  # inherit the environment unchanged
    env["PJRT_NPROC"] = str(max(os.cpu_count() or 1, CPU_POOL_PER_DEVICE * max(device_counts)))
    return env


def _device_counts(text: str) -> list[int]:
    """``--devices 1,8`` -> [1, 8]; each a positive int."""
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise SystemExit(f"--devices must be positive ints separated by commas, got {text!r}")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=("shapes", "full", "all"), default="all")
    parser.add_argument("--shapes", choices=tuple(SHAPES), default="paper")
    parser.add_argument("--methods", default=",".join(JAX_METHODS + TORCH_METHODS))
    parser.add_argument(
        "--models", default=None, help="full part (default llama_1b,llama_7b; small: llama_micro)"
    )
    parser.add_argument("--full-methods", default=",".join(FULL_METHODS))
    parser.add_argument("--layers-7b", type=int, default=4, help="layers measured for 7B")
    parser.add_argument("--grad-dtype", default="float32", help="full part: gradient dtype")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--full-repeats", type=int, default=1)
    parser.add_argument(
        "--devices",
        default="1",
        help="full part: device counts, e.g. 1,8 (FSDP-sharded grads and refresh_sharding)",
    )
    parser.add_argument("--alpha", type=float, default=1.0, help="spectrum s_i = i^-alpha")
    parser.add_argument("--noise", type=float, default=1e-3, help="noise norm / s_1")
    parser.add_argument("--perturb", type=float, default=0.3, help="||G_prev - G|| / ||G||")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if any)")
    parser.add_argument("--timeout", type=float, default=300.0, help="per subprocess, s")
    parser.add_argument("--profile", metavar="DIR", default=None, help="full part: trace")
    parser.add_argument("--json", default=None)
    parser.add_argument("--backend", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--shape", type=int, nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--full", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--run-devices", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    xla_flags.apply_defaults()  # before JAX starts a backend; children inherit it
    if args.models is None:
        args.models = "llama_micro" if args.shapes == "small" else "llama_1b,llama_7b"
    device_counts = _device_counts(args.devices)

    if args.shape:
        run = run_shape_torch if args.backend == "torch" else run_shape_jax
        report.print_result(run(*args.shape, args))
        return
    if args.full:
        report.print_result(run_full(*args.full, args))
        return

    common = [
        "--repeats", str(args.repeats), "--alpha", str(args.alpha), "--noise", str(args.noise),
        "--perturb", str(args.perturb), "--seed", str(args.seed), "--methods", args.methods,
        "--layers-7b", str(args.layers_7b), "--grad-dtype", args.grad_dtype,
        "--full-repeats", str(args.full_repeats),
    ]  # fmt: skip
    if args.device:
        common += ["--device", args.device]
    if args.profile:
        common += ["--profile", args.profile]
    me = [sys.executable, "-m", "benchmarks.refresh"]
    env_note = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
    shape_rows: list[dict] = []
    full_rows: list[dict] = []
    if args.part in ("shapes", "all"):
        wanted = set(args.methods.split(","))
        for m, n, rank in SHAPES[args.shapes]:
            for backend in ("jax", "torch"):
                if backend == "torch" and not wanted & set(TORCH_METHODS):
                    continue
                cmd = [*me, "--backend", backend, "--shape", str(m), str(n), str(rank), *common]
                rows, err = _subprocess(cmd, args.timeout)
                if rows is None:
                    print(f"{m}x{n} r={rank} {backend} failed:\n{err}", flush=True)
                    continue
                rows = [r for r in rows if r["method"] in wanted or r["time_ms"] is None]
                shape_rows += rows
                for r in rows:
                    print(json.dumps(r), flush=True)
    full_env = _full_env(device_counts)
    if args.part in ("full", "all"):
        for model_name in args.models.split(","):
            for method in args.full_methods.split(","):
                for n in device_counts:
                    cmd = [*me, "--full", model_name, method, "--run-devices", str(n), *common]
                    row, err = _subprocess(cmd, args.timeout, full_env)
                    if row is None:
                        print(f"{model_name} {method} {n} devices failed:\n{err}", flush=True)
                        continue
                    full_rows.append(row)
                    print(json.dumps(row), flush=True)
        add_speedups(full_rows)
    if shape_rows:
        print()
        print_shapes_table(shape_rows)
    if full_rows:
        print()
        print_full_table(full_rows)
    if full_rows and device_counts != [1]:
        print()
        print_devices_table(full_rows)
    hidden = ("shape", "full", "backend", "run_devices")
    config = {k: v for k, v in vars(args).items() if k not in hidden}
    config["XLA_PYTHON_CLIENT_MEM_FRACTION"] = env_note
    config["XLA_FLAGS"] = os.environ.get("XLA_FLAGS")  # fake CPU devices are set here
    config["PJRT_NPROC"] = (full_env or os.environ).get("PJRT_NPROC")
    out = {"config": config, "shapes": shape_rows, "full": full_rows}
    if device_counts != [1]:
        out["full_scaling"] = scaling_summary(full_rows)
    report.write_json(out, args.json)


if __name__ == "__main__":
    main()
