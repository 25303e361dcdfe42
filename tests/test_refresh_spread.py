"""The batched refresh with ``refresh_sharding``: each of 8 devices decomposes only its share.

The proof is in the compiled (SPMD-partitioned) HLO: the LAPACK custom call of the projector
(``lapack_ssyevd_ffi`` for ``gram_eigh``, ``lapack_sgesdd_ffi`` for ``svd`` on CPU) takes a
per-device batch of ``k / 8`` matrices. Without ``refresh_sharding`` the same FSDP-sharded
update gathers the stack and every device decomposes all ``k`` (the control, so the test can
fail). The bases also equal those of a one-device run.

The device count is fixed when jax starts, so the 8-device part runs in a subprocess:
``XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.test_refresh_spread svd``
prints one JSON object.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import re
import subprocess
import sys

import pytest

from tests.child_env import eight_devices_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEVICES = 8  # those of tests.child_env.eight_devices_env
LEAVES = 8  # same-shape projected leaves: one stack of k = 8 matrices
SHAPE = (16, 40)  # m <= n: left projection, the projector sees 16 x 40 (Gram: 16 x 16)
RANK = 4
# CPU LAPACK targets of jnp.linalg.eigh / jnp.linalg.svd (gesvd if jax ever switches algorithm).
DECOMPOSITIONS = r"syevd|heevd|gesdd|gesvd"


def decomposition_calls(hlo: str) -> list[dict]:
    """Every eigh/SVD custom call in ``hlo``: its target and its operand's shape."""
    calls = []
    for line in hlo.splitlines():
        target = re.search(r'custom_call_target="([^"]+)"', line)
        if target is None or not re.search(DECOMPOSITIONS, target.group(1)):
            continue
        operand = re.search(r"operand_layout_constraints=\{\w+\[([\d,]*)\]", line)
        shape = [int(d) for d in operand.group(1).split(",")] if operand else None
        calls.append({"target": target.group(1), "operand_shape": shape})
    return calls


# ----------------------------------------------------------------------------- subprocess side


def _run_projector(projector_name: str) -> dict:
    """Compiles the refresh step on an 8-device mesh with and without ``refresh_sharding``."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    import golore_jax as gl
    from golore_jax._subspace import scale_by_subspace

    projector = {"gram_eigh": gl.projectors.gram_eigh, "svd": gl.projectors.svd}[projector_name]
    keys = jax.random.split(jax.random.key(0), LEAVES)
    grads = {f"w{i}": jax.random.normal(k, SHAPE, jnp.float32) for i, k in enumerate(keys)}
    mesh = Mesh(np.array(jax.devices()[:DEVICES]), ("fsdp",))

    def build(refresh_sharding):
        tx = scale_by_subspace(
            optax.scale_by_adam(),
            rank=RANK,
            update_every=10,
            projector=projector(),
            refresh_sharding=refresh_sharding,
        )
        return tx, tx.init(grads)  # count 0: the compiled update takes the refresh branch

    def compile_update(refresh_sharding, placed, mesh_context=None):
        tx, state = build(refresh_sharding)
        with mesh_context or contextlib.nullcontext():
            return jax.jit(tx.update).lower(placed, state).compile(), state

    # FSDP-like: each gradient's rows over the 8 devices, as the trainer places them.
    fsdp_grads = jax.device_put(grads, NamedSharding(mesh, PartitionSpec("fsdp")))
    # The trainer's form: a PartitionSpec on the stacked axis under a mesh context.
    spread, state = compile_update(PartitionSpec(("fsdp",)), fsdp_grads, jax.set_mesh(mesh))
    compiled = {"spread": spread, "control": compile_update(None, fsdp_grads)[0]}
    if projector_name == "gram_eigh":  # a NamedSharding needs no mesh context (one is enough)
        named = NamedSharding(mesh, PartitionSpec("fsdp"))
        compiled["named"], _ = compile_update(named, fsdp_grads)
    out: dict = {name: decomposition_calls(c.as_text()) for name, c in compiled.items()}
    control_in = compiled["control"].input_shardings[0][0]["w0"]
    out["control_is_partitioned"] = (
        len(control_in.device_set) == DEVICES and not control_in.is_fully_replicated
    )
    _, spread_state = spread(fsdp_grads, state)

    # Reference: the same update on one device, no mesh.
    tx, state = build(None)
    _, single_state = jax.jit(tx.update)(jax.device_put(grads, jax.devices()[0]), state)
    spread_bases = [np.asarray(spread_state.bases[k]) for k in grads]
    single_bases = [np.asarray(single_state.bases[k]) for k in grads]
    out["bases_max_abs_diff"] = max(
        float(np.max(np.abs(a - b))) for a, b in zip(spread_bases, single_bases, strict=True)
    )
    out["bases_min_norm"] = min(float(np.linalg.norm(b)) for b in single_bases)
    return out


def _run(projector_name: str) -> dict:
    import jax

    return {"devices": jax.device_count()} | _run_projector(projector_name)


# ----------------------------------------------------------------------------- pytest side


def _eight_device_run(projector_name: str) -> dict:
    """Runs :func:`_run` in a subprocess with 8 fake CPU devices; returns its JSON."""
    # LLVM -O0 halves the time of the 4 compiles; the partitioned HLO read is the same.
    # JAX_PLATFORMS: fake host devices; the op names checked are CPU LAPACK's.
    env = eight_devices_env(JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-m", "tests.test_refresh_spread", projector_name],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["gram_eigh", "svd"])
def test_each_device_decomposes_only_its_share(name):
    """One process per projector (xdist runs them side by side), three checks:

    with refresh_sharding the eigh/SVD custom call sees k/8 matrices per device; without it
    (the control, same FSDP-sharded gradients) it sees all k; the bases equal one device's.
    """
    result = _eight_device_run(name)
    assert result["devices"] == DEVICES
    matrix = [SHAPE[0], SHAPE[0]] if name == "gram_eigh" else list(SHAPE)
    # PartitionSpec under set_mesh (the trainer's form); NamedSharding (gram_eigh only).
    for variant in ("spread", "named") if name == "gram_eigh" else ("spread",):
        calls = result[variant]
        assert calls, f"{variant}: no eigh/SVD custom call found in the compiled HLO"
        shapes = [c["operand_shape"] for c in calls]
        assert shapes == [[LEAVES // DEVICES, *matrix]], (variant, calls)

    assert result["control_is_partitioned"]  # an 8-device program, its gradients sharded
    assert [c["operand_shape"] for c in result["control"]] == [[LEAVES, *matrix]], result

    assert result["bases_min_norm"] > 1.0  # rank-4 orthonormal bases: norm 2, not zeros
    assert result["bases_max_abs_diff"] < 1e-5


if __name__ == "__main__":
    print(json.dumps(_run(sys.argv[1])))
