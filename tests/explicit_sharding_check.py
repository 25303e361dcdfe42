"""Every alias of the contract table on meshes of 8 fake CPU devices, against one device.

``XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.explicit_sharding_check``
prints one JSON object: per alias and mesh case, the largest relative difference of the
updates from the unsharded single-device updates (``|u - u_ref| / |u_ref|`` per leaf and step),
and the state leaves whose sharding type differs from the params'-derived specs
(:func:`golore_jax.partitioning.state_partition_specs`) after ``jit(tx.init)`` and after the
last ``jit(tx.update)``. Arguments: the rows to run (all by default). tests/test_alias_contract.py
runs it in subprocesses (the device count is fixed when jax starts), half the rows each.

Cases (params "a" 6x4, "b" (4,), sharded as the trainer shards its weights):
* ``explicit_2x2``: ``jax.make_mesh((2, 2), ("data", "model"))`` (Explicit axes, the default),
  "a" tensor-parallel over both axes;
* ``explicit_2x2x2``: (data, fsdp, tensor) Explicit, "a" ``P("fsdp", "tensor")`` (the trainer's
  fsdp x tensor layout), "b" ``P("tensor")``, replicated over data;
* ``mixed``: (data Explicit, model Auto), "a" ``P("data", "model")``;
* ``shard_map``: the 2x2 Explicit mesh, the update inside ``jax.shard_map`` over ``data``
  (the gradient ``pmean``-ed there), "a" sharded over the (still Explicit) ``model`` axis.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import golore_jax as gl
from golore_jax.partitioning import entries, state_partition_specs
from tests.test_alias_contract import ALIASES, LEARNING_RATE, STEPS, _make, _tree

E, A = AxisType.Explicit, AxisType.Auto
CASES: dict[str, tuple[tuple[int, ...], tuple[str, ...], tuple[Any, ...], dict]] = {
    "explicit_2x2": ((2, 2), ("data", "model"), (E, E), {"a": P("model", "data"), "b": P()}),
    "explicit_2x2x2": (
        (2, 2, 2),
        ("data", "fsdp", "tensor"),
        (E, E, E),
        {"a": P("fsdp", "tensor"), "b": P("tensor")},
    ),
    "mixed": ((2, 2), ("data", "model"), (E, A), {"a": P("data", "model"), "b": P("data")}),
    "shard_map": ((2, 2), ("data", "model"), (E, E), {"a": P(None, "model"), "b": P()}),
}


# Beyond the alias table: the state options with their own refresh paths (a lazy refresh's
# skipped leaves and overlap; INT4-stored bases), refreshing at every step.
EXTRA = {
    "galore_adamw_lazy": lambda: gl.galore_adamw(
        LEARNING_RATE,
        subspace=gl.Subspace(rank=2, update_every=1, lazy_refresh=gl.LazyRefresh(0.5)),
    ),
    "galore_adamw_int4": lambda: gl.galore_adamw(
        LEARNING_RATE,
        subspace=gl.Subspace(rank=2, update_every=1),
        execution=gl.Execution(basis_dtype="int4"),
    ),
}


def _tx(name: str):
    return EXTRA[name]() if name in EXTRA else _make(name)


def _grads(t: int) -> dict:
    return _tree(10 + t)


def _relative(u: Any, ref: Any) -> float:
    """The largest per-leaf ``|u - ref| / |ref|`` (Frobenius norms)."""
    worst = 0.0
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(ref), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        worst = max(worst, float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)))
    return worst


def _spec_mismatches(state: Any, params: Any, specs: dict, mesh: Any) -> list[str]:
    """State leaves whose sharding type (its Explicit axes) is not the params'-derived spec."""
    want = state_partition_specs(state, params, specs, dict(mesh.shape))
    explicit = {n for n, t in zip(mesh.axis_names, mesh.axis_types, strict=True) if t == E}
    bad = []
    flat_want = jax.tree_util.tree_structure(state).flatten_up_to(want)
    for (path, leaf), spec in zip(
        jax.tree_util.tree_leaves_with_path(state), flat_want, strict=True
    ):
        have = entries(leaf.sharding.spec, leaf.ndim)

        def keep(e):  # the Explicit axes of a spec entry (Auto axes are XLA's choice)
            axes = (e,) if isinstance(e, str) else tuple(e or ())
            axes = tuple(a for a in axes if a in explicit)
            return axes or None

        if tuple(map(keep, have)) != tuple(map(keep, entries(spec, leaf.ndim))):
            bad.append(f"{jax.tree_util.keystr(path)}: {leaf.sharding.spec} != {spec}")
    return bad


def run_case(name: str, case: str, reference: list) -> dict:
    shape, axes, types, specs = CASES[case]
    mesh = jax.make_mesh(
        shape, axes, axis_types=types, devices=jax.devices()[: int(np.prod(shape))]
    )
    tx = _tx(name)
    with jax.set_mesh(mesh):
        put = {k: NamedSharding(mesh, s) for k, s in specs.items()}
        params = jax.device_put(_tree(0), put)
        state = jax.jit(tx.init)(params)
        init_bad = _spec_mismatches(state, params, specs, mesh)
        if case == "shard_map":

            def step(g, s, p):
                return tx.update(jax.lax.pmean(g, "data"), s, p)

            state_specs = jax.tree.map(lambda _: P(), state)
            update = jax.jit(
                jax.shard_map(
                    step,
                    mesh=mesh,
                    in_specs=(P(), state_specs, P()),
                    out_specs=(P(), state_specs),
                    axis_names={"data"},
                )
            )
        else:
            update = jax.jit(tx.update)
        worst = 0.0
        for t in range(STEPS):
            u, state = update(jax.device_put(_grads(t), put), state, params)
            worst = max(worst, _relative(u, reference[t]))
        update_bad = _spec_mismatches(state, params, specs, mesh)
    return {"relative": worst, "init_specs": init_bad, "update_specs": update_bad}


def run(names: list[str]) -> dict:
    out: dict[str, Any] = {"devices": jax.device_count()}
    for name in names:
        tx = _tx(name)
        params = _tree(0)
        state, reference = tx.init(params), []
        update = jax.jit(tx.update)
        for t in range(STEPS):
            u, state = update(_grads(t), state, params)
            reference.append(jax.tree.map(np.asarray, u))
        out[name] = {}
        for case in CASES:
            try:
                out[name][case] = run_case(name, case, reference)
            except Exception as e:  # reported per case: one failure does not hide the others
                out[name][case] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
    return out


if __name__ == "__main__":
    names = sys.argv[1:] or [*ALIASES, *EXTRA]
    jnp.zeros(())  # start the backend before printing anything
    print(json.dumps(run(names)))
