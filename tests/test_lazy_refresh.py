"""Lazy, layer-adaptive refresh: scale_by_subspace(lazy_refresh=LazyRefresh(...)), its counters,
its specs, the layer-wise paths, and the trainer's optimizer.subspace.lazy_* keys."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import golore_jax as gl
from golore_jax._subspace import LazyRefresh, refresh_counts, scale_by_subspace
from golore_jax.partitioning import state_partition_specs
from tests.child_env import eight_devices_env
from tests.train_fixtures import run_and_resume, tiny_config
from train import data as data_lib
from train import main as main_lib
from train import optimizer as optimizer_lib
from train import sharding as sharding_lib
from train.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _random_grads(params, step):
    leaves, treedef = jax.tree.flatten(params)
    return treedef.unflatten(
        [
            jax.random.normal(jax.random.fold_in(jax.random.key(i), step), p.shape)
            for i, p in enumerate(leaves)
        ]
    )


def _raw(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(x)
    return np.asarray(x)


def _same(a, b):
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(_raw, a), jax.tree.map(_raw, b))


def _close(a, b):
    """Floats to fp32 summation order (rtol 1e-5, atol 1e-6), everything else exactly."""

    def check(x, y):
        if np.issubdtype(x.dtype, np.floating):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(x, y)

    jax.tree.map(check, jax.tree.map(_raw, a), jax.tree.map(_raw, b))


@pytest.mark.parametrize(
    "projector",
    [
        gl.projectors.gram_eigh(),
        gl.projectors.golore_projector(0.5, 8, before=gl.projectors.svd()),  # hybrid
    ],
    ids=["galore", "hybrid"],
)
@pytest.mark.parametrize("basis_dtype", [None, "int4"])
def test_a_threshold_that_never_triggers_is_the_eager_refresh(projector, basis_dtype):
    """threshold 2 > 1 >= every overlap: updates and states equal the eager run's bit for
    bit for 8 steps (4 refreshes; the hybrid's random phase from step 4), with the moments
    rotated and the second moment reset (what a lazy leaf must not get), two same-shape
    leaves in one batched call; every scheduled refresh is done."""
    params = {"a": jnp.zeros((16, 40)), "b": jnp.zeros((40, 16)), "c": jnp.zeros((16, 40))}

    def make(lazy):
        return scale_by_subspace(
            optax.scale_by_adam(),
            rank=4,
            update_every=2,
            projector=projector,
            momentum_projection=True,
            second_moment="reset",
            basis_dtype=basis_dtype,
            lazy_refresh=lazy,
        )

    eager, lazy = make(None), make(LazyRefresh(threshold=2.0, patience=1))
    eager_state, lazy_state = eager.init(params), lazy.init(params)
    assert eager_state.lazy is None and refresh_counts(eager_state) is None
    for step in range(8):
        grads = _random_grads(params, step)
        want, eager_state = jax.jit(eager.update)(grads, eager_state, params)
        got, lazy_state = jax.jit(lazy.update)(grads, lazy_state, params)
        _same(got, want)
    _same(lazy_state._replace(lazy=None), eager_state)
    assert [int(c) for c in refresh_counts(lazy_state)] == [12, 12]  # 3 leaves x 4 refreshes


def _quadratic(lazy, projector=None, **kwargs):
    """Two 16 x 24 leaves: ``fixed`` minimises 0.5 ||W - W*||^2 with W* of rank 2, so its
    gradient W - W* stays in span(W*)'s column space (W starts at 0 and moves in the subspace):
    its top-2 subspace never moves (overlap 1). ``moving`` gets a fresh Gaussian gradient every
    step: its top-2 subspace is a new random one (overlap ~ r/d = 2/16)."""
    u, v = (
        jnp.linalg.qr(jax.random.normal(jax.random.key(k), s))[0]
        for k, s in ((0, (16, 2)), (1, (24, 2)))
    )
    target = u @ jnp.diag(jnp.array([3.0, 2.0])) @ v.T
    tx = optax.chain(
        scale_by_subspace(
            optax.identity(),
            rank=2,
            update_every=2,
            projector=projector or gl.projectors.svd(),
            lazy_refresh=lazy,
            **kwargs,
        ),
        optax.scale(-0.2),
    )

    def grads(params, step):
        return {
            "fixed": params["fixed"] - target,
            "moving": jax.random.normal(jax.random.fold_in(jax.random.key(2), step), (16, 24)),
        }

    def run(steps=40):
        params = {"fixed": jnp.zeros((16, 24)), "moving": jnp.zeros((16, 24))}
        state = tx.init(params)
        update = jax.jit(tx.update)
        history = []
        for step in range(steps):
            updates, state = update(grads(params, step), state, params)
            params = optax.apply_updates(params, updates)
            history.append(state[0])
        loss = 0.5 * float(jnp.sum(jnp.square(params["fixed"] - target)))
        return loss, history

    return run, 0.5 * float(jnp.sum(jnp.square(target)))


def test_a_stable_subspace_skips_its_decompositions_and_still_converges():
    """threshold 0.9, patience 2, growth 2, one call per leaf (refresh_batch_size=1), 40
    steps = 20 scheduled refreshes (j = 0..19). ``fixed``: j=0 (overlap with the zero basis:
    0), j=1 (streak 1), j=2 (streak 2: period 2), 4, 6 (period 4), 10, 14 (period 8; next 22):
    7 decompositions. ``moving`` (overlap ~0.125) all 20. Loss of ``fixed``: 0.8^2 a step
    (the gradient lies in the kept subspace), as the eager run's."""
    run, initial = _quadratic(LazyRefresh(0.9, patience=2, growth=2), refresh_batch_size=1)
    loss, history = run()
    eager_loss, _ = _quadratic(None, refresh_batch_size=1)[0]()
    final = history[-1].lazy
    assert [int(c) for c in refresh_counts(history[-1])] == [27, 40]
    assert int(final.period["fixed"]) == 8 and int(final.period["moving"]) == 1
    assert int(final.next_due["fixed"]) == 22
    np.testing.assert_allclose(loss, initial * 0.8**80, rtol=1e-3)
    np.testing.assert_allclose(loss, eager_loss, rtol=1e-3)
    # At a scheduled refresh the fixed leaf skipped (j = 3: step 6), its basis is kept bit for bit.
    np.testing.assert_array_equal(history[6].bases["fixed"], history[5].bases["fixed"])
    assert not np.array_equal(history[6].bases["moving"], history[5].bases["moving"])


def test_max_period_caps_the_interval():
    """max_period 2: fixed decomposes at j = 0, 1, then every other refresh: 0,1,2,4,...,18 =
    11; moving 20."""
    run, _ = _quadratic(LazyRefresh(0.9, patience=2, max_period=2), refresh_batch_size=1)
    _, history = run()
    assert [int(c) for c in refresh_counts(history[-1])] == [31, 40]
    assert int(history[-1].lazy.period["fixed"]) == 2


def test_a_batched_call_runs_while_any_member_is_due_and_keeps_the_lazy_one():
    """Both leaves in one batched SVD call (same shape): the call runs at every refresh
    (``moving`` is always due), so 2 x 20 decompositions are done, but ``fixed`` keeps the
    schedule and the bases of the per-leaf run: the result does not depend on the batching."""
    run, _ = _quadratic(LazyRefresh(0.9, patience=2))
    _, batched = run()
    _, single = _quadratic(LazyRefresh(0.9, patience=2), refresh_batch_size=1)[0]()
    assert [int(c) for c in refresh_counts(batched[-1])] == [40, 40]
    chex.assert_trees_all_equal(batched[-1].lazy.period, single[-1].lazy.period)
    np.testing.assert_array_equal(batched[6].bases["fixed"], batched[5].bases["fixed"])
    # one batched SVD against two single ones: the same bases to fp32 rounding
    chex.assert_trees_all_close(batched[-1].bases, single[-1].bases, atol=1e-5)


def test_the_hybrids_random_phase_keeps_its_schedule():
    """GoLore@50% of 40 steps: until step 20 (j < 10) ``fixed`` is lazy (j = 0, 1, 2, 4, 6),
    from then on every leaf is drawn at every scheduled refresh (10 each): 5 + 10 + 20."""
    projector = gl.projectors.golore_projector(0.5, 40, before=gl.projectors.svd())
    run, _ = _quadratic(LazyRefresh(0.9), refresh_batch_size=1, projector=projector)
    _, history = run()
    assert [int(c) for c in refresh_counts(history[-1])] == [35, 40]
    assert int(history[-1].lazy.period["fixed"]) == 4  # the random phase does not measure


def test_golore_and_bad_lazy_arguments_are_refused():
    with pytest.raises(ValueError, match="lazy_refresh needs a projector that reads the gradient"):
        scale_by_subspace(
            optax.sgd(1.0),
            rank=2,
            update_every=2,
            projector=gl.projectors.random(),
            lazy_refresh=LazyRefresh(0.5),
        )
    for kwargs, match in [
        ({"threshold": 0.0}, "threshold must be finite and > 0"),
        ({"threshold": float("nan")}, "threshold must be finite and > 0"),
        ({"threshold": True}, "threshold must be a number"),
        ({"threshold": 0.5, "patience": 0}, "patience must be a positive int"),
        ({"threshold": 0.5, "growth": 1}, "growth must be an int >= 2"),
        ({"threshold": 0.5, "max_period": 0}, "max_period must be a positive int or None"),
    ]:
        with pytest.raises(ValueError, match=f"LazyRefresh: {match}"):
            LazyRefresh(**kwargs)
    with pytest.raises(ValueError, match="lazy_refresh must be a LazyRefresh or None"):
        scale_by_subspace(optax.sgd(1.0), rank=2, update_every=2, lazy_refresh=0.5)


def test_partition_specs_of_the_lazy_state():
    """The per-leaf counters and the totals are replicated (scalars); unprojected leaves keep
    their MaskedNode; under golore_jax.layerwise they get the layer axis's entry."""
    params = {
        "w": jax.ShapeDtypeStruct((8, 16), jnp.float32),
        "n": jax.ShapeDtypeStruct((8,), jnp.float32),
    }
    specs = {"w": P("x", None), "n": P("x")}
    tx = scale_by_subspace(
        optax.scale_by_adam(), rank=2, update_every=2, lazy_refresh=LazyRefresh(0.5)
    )
    state = jax.eval_shape(tx.init, params)
    got = state_partition_specs(state, params, specs)
    assert got.lazy.period["w"] == P() and got.lazy.done == P() and got.lazy.scheduled == P()
    assert isinstance(got.lazy.streak["n"], optax.MaskedNode)
    stacked = {"layers": {"w": jax.ShapeDtypeStruct((3, 8, 16), jnp.float32)}}
    layerwise = gl.layerwise.layerwise(tx, ("layers",))
    state = jax.eval_shape(layerwise.init, stacked)
    got = state_partition_specs(
        state, stacked, {"layers": {"w": P("stage", "x", None)}}, stack_path=("layers",)
    )
    assert got.layers.lazy.next_due["w"] == P("stage")
    assert got.layers.bases["w"] == P("stage", "x", None)


def test_layerwise_runs_each_layer_lazily_with_int4_bases():
    """golore_jax.layerwise over 3 layers (layer 1's gradient a fixed rank-2 direction, the
    others random): each layer keeps its own schedule (layer 1 lazy), the updates equal each
    layer's transform run alone, and calls of 3 layers (vmapped while the layers' counters
    agree, one at a time once they do not) equal one layer at a time: the vmapped program may
    sum in another order (XLA:CPU's element-wise emitter did, by up to 8e-8 of updates ~0.1),
    so floats to fp32 summation order (rtol 1e-5, atol 1e-6 for elements near zero, as
    tests/test_layerwise_lib.py), and the integer state (int4 codes, counters, the lazy
    schedule) exactly."""
    rank2 = jnp.outer(jnp.arange(12.0), jnp.ones(20)) + jnp.outer(jnp.ones(12), jnp.arange(20.0))

    def tx():
        return scale_by_subspace(
            optax.scale_by_adam(),
            rank=2,
            update_every=1,
            projector=gl.projectors.gram_eigh(),
            basis_dtype="int4",
            lazy_refresh=LazyRefresh(0.9, patience=1),
        )

    params = {"layers": {"w": jnp.zeros((3, 12, 20))}}

    def grads(step):
        noise = jax.random.normal(jax.random.key(step), (3, 12, 20))
        return {"layers": {"w": noise.at[1].set(rank2 * (1.0 + step))}}

    one = gl.layerwise.layerwise(tx(), ("layers",))
    many = gl.layerwise.layerwise(tx(), ("layers",), layers_per_call=3)
    state_one, state_many = one.init(params), many.init(params)
    alone = [jax.tree.map(lambda x, i=i: x[i], state_one.layers) for i in range(3)]
    one_update, many_update, alone_update = (jax.jit(t.update) for t in (one, many, tx()))
    for step in range(6):
        g = grads(step)
        want, state_one = one_update(g, state_one, params)
        got, state_many = many_update(g, state_many, params)
        _close(got, want)
        for i in range(3):
            layer = {"w": g["layers"]["w"][i]}
            u, alone[i] = alone_update(layer, alone[i], {"w": params["layers"]["w"][i]})
            # lax.map's layer against a plain call: as tests/test_layerwise_lib.py's tolerance
            np.testing.assert_allclose(want["layers"]["w"][i], u["w"], rtol=1e-5, atol=1e-6)
    _close(state_many, state_one)
    period = state_one.layers.lazy.period["w"]
    assert int(period[1]) > 1 and int(period[0]) == 1 and int(period[2]) == 1
    done, scheduled = refresh_counts(state_one)
    assert int(scheduled) == 18 and int(done) < 18
    assert state_one.layers.bases["w"].codes.shape == (3, 12, 1)


LAYERWISE = {"step.layerwise": True, "optimizer.grad_clip": 0.0, "model.scan_layers": True}
OPTIONS = {
    "optimizer.name": "galore",
    "optimizer.subspace.basis_dtype": "int4",
    "optimizer.subspace.lazy_threshold": 0.05,  # below r/d = 8/64: even the noise triggers it
    "optimizer.subspace.lazy_patience": 1,
}


def test_trainer_layerwise_with_int4_and_lazy_resumes_exactly(tmp_path):
    """step.layerwise with INT4 bases and the lazy refresh: 6 steps (refresh every 2) train,
    and a checkpoint at step 3 (orbax: uint8 codes, the lazy counters) resumed for 3 steps
    gives bit-identical losses; the lazy rule skipped some decompositions."""
    config = tiny_config(tmp_path, **LAYERWISE, **OPTIONS)
    trainer = main_lib.build_trainer(config, sharding_lib.make_mesh(config.mesh))
    datasets = data_lib.build_datasets(
        config.data, seq_len=config.seq_len, global_batch_size=config.batch_size, seed=0
    )
    batches = [main_lib.to_global(next(datasets.train), trainer.batch_sharding) for _ in range(6)]
    state, losses, resumed, resumed_losses, _ = run_and_resume(
        trainer, config, batches, tmp_path / "run"
    )
    assert losses[-1] < losses[0]
    layers = state.opt_state.layers[0]
    assert {x.dtype for x in jax.tree.leaves(layers.bases)} == {np.dtype("uint8"), np.dtype("f4")}
    done, scheduled = refresh_counts(state.opt_state)
    assert 0 < int(done) < int(scheduled)
    assert resumed_losses == losses
    assert [int(c) for c in refresh_counts(resumed.opt_state)] == [int(done), int(scheduled)]


def test_metrics_log_the_refresh_counts(tmp_path):
    """metrics.jsonl's train records carry refreshes_done / refreshes_scheduled."""
    config = tiny_config(tmp_path, **OPTIONS, num_steps=4, eval_every=4, checkpoint_every=4)
    main_lib.train_and_evaluate(config, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    train = [r for r in records if "refreshes_done" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    # 14 projected matrices (2 layers x 7), refreshes at steps 0 and 2
    assert [r["refreshes_scheduled"] for r in train] == [14, 14, 28, 28]
    assert all(0 < r["refreshes_done"] <= r["refreshes_scheduled"] for r in train)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"optimizer.subspace.lazy_threshold": -0.1}, "optimizer.subspace.lazy_threshold"),
        ({"optimizer.subspace.lazy_patience": 0}, "optimizer.subspace.lazy_patience"),
        ({"optimizer.subspace.lazy_growth": 1}, "optimizer.subspace.lazy_growth"),
        ({"optimizer.subspace.lazy_max_period": -1}, "optimizer.subspace.lazy_max_period"),
        (
            {"optimizer.name": "golore", "optimizer.subspace.lazy_threshold": 0.5},
            "lazy_threshold=0.5 applies to .* not 'golore': GoLore's random subspaces",
        ),
        ({"optimizer.subspace.basis_dtype": "int8"}, "optimizer.subspace.basis_dtype"),
        (
            {"optimizer.subspace.basis_dtype": "int4", "optimizer.name": "osd"},
            "basis_dtype='int4' applies to the basis projectors",
        ),
    ],
)
def test_bad_lazy_and_int4_keys_are_config_errors(tmp_path, overrides, match):
    config = tiny_config(tmp_path, **overrides)
    with pytest.raises(ConfigError, match=match):
        optimizer_lib.validate(config.optimizer)


def test_relora_refuses_int4_bases(tmp_path):
    config = tiny_config(
        tmp_path,
        **{
            "step.relora": True,
            "optimizer.grad_clip": 0.0,
            "optimizer.subspace.basis_dtype": "int4",
        },
    )
    with pytest.raises(ConfigError, match=r"step.relora=True needs .*basis_dtype .* got 'int4'"):
        optimizer_lib.validate(config.optimizer, step=config.step)


def test_eight_fake_devices_match_one_device(tmp_path):
    """The layer-wise step with INT4 bases and the lazy refresh on a 2x2x2 mesh: the losses of
    1 device (fp32; only the order of cross-device reductions differs: rel 1e-5), the same
    decompositions skipped, the INT4 codes sharded like an fp32 basis (rows over fsdp) behind
    the layer axis, the scales replicated (64 rows: one block, not whole blocks per device)."""
    out = subprocess.run(
        [sys.executable, "-m", "tests.lazy_int4_devices_check", str(tmp_path)],
        env=eight_devices_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8
    assert result["losses"]["2x2x2"] == pytest.approx(result["losses"]["1"], rel=1e-5)
    assert result["counts"]["2x2x2"] == result["counts"]["1"]
    done, scheduled = result["counts"]["1"]
    assert scheduled == 3 * 14 and done < scheduled  # refreshes at steps 0, 2, 4
    specs = result["specs"]["2x2x2"]
    assert specs["q_codes"] == "P(None, 'fsdp', None)"
    assert specs["q_scales"] == "P(None, None, None)"
    assert specs["down_codes"] == "P(None, 'fsdp', None)"
    assert specs["period"] == "P(None,)"
