"""The trainer with bf16 parameters + stochastic rounding and bf16 bases."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import golore_jax as gl
from tests.train_fixtures import tiny_config
from train import main as main_lib
from train import optimizer as optimizer_lib
from train import sharding as sharding_lib

LOW_PRECISION = {
    "model.param_dtype": "bfloat16",
    "step.stochastic_rounding": True,
    "optimizer.subspace.basis_dtype": "bfloat16",
}


def _losses(workdir: pathlib.Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def test_low_precision_resume_is_exact_and_loss_falls(tmp_path):
    """The rounding key is derived from (seed, step): stopping at step 3 and resuming gives
    the uninterrupted run's losses bit for bit (the resumed part crosses a refresh)."""
    full = tiny_config(tmp_path, **LOW_PRECISION)
    result = main_lib.train_and_evaluate(full, tmp_path / "full")
    assert result["eval_loss"] < result["first_eval_loss"] - 0.5
    split = tiny_config(tmp_path, run_steps=3, **LOW_PRECISION)
    main_lib.train_and_evaluate(split, tmp_path / "split")
    split.run_steps = None
    main_lib.train_and_evaluate(split, tmp_path / "split")
    assert _losses(tmp_path / "split") == _losses(tmp_path / "full")


LAYERWISE = {
    "model.scan_layers": True,
    "step.layerwise": True,
    "optimizer.grad_clip": 0.0,
}


def _bases(opt_state):
    states = jax.tree_util.tree_leaves(
        opt_state, is_leaf=lambda s: isinstance(s, gl.ScaleBySubspaceState)
    )
    subspace = [s for s in states if isinstance(s, gl.ScaleBySubspaceState)]
    return [b for s in subspace for b in jax.tree.leaves(s.bases)]


@pytest.mark.parametrize(("stochastic", "layerwise"), [(True, False), (False, False), (True, True)])
def test_updates_below_half_a_bf16_ulp_move_params_only_with_stochastic_rounding(
    tmp_path, stochastic, layerwise
):
    """bf16 params, lr 1e-6 (Adam's step ~1e-6, far below half an ulp of the ~0.02 weights):
    round-to-nearest changes no entry, stochastic rounding moves some (about |u| / ulp), in
    the plain and in the layer-wise step."""
    overrides = dict(LOW_PRECISION, **{"step.stochastic_rounding": stochastic})
    if layerwise:
        overrides.update(LAYERWISE)
    config = tiny_config(tmp_path, **overrides, **{"optimizer.learning_rate": 1e-6})
    trainer = main_lib.build_trainer(config, sharding_lib.make_mesh(config.mesh))
    state = trainer.init(jax.random.key(0))
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(state.params))
    bases = _bases(state.opt_state)
    assert len(bases) == (7 if layerwise else 2 * 7)  # stacked: one leaf per kind of matrix
    assert all(b.dtype == jnp.bfloat16 for b in bases)
    tokens = jax.random.randint(jax.random.key(1), (8, 33), 0, config.model.vocab_size)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    state, _ = trainer.train_step(state, batch)  # step 0: lr 0 in the warmup
    before = [np.asarray(p, np.float32) for p in jax.tree.leaves(state.params)]
    state, metrics = trainer.train_step(state, batch)
    assert bool(metrics["finite"])
    after = [np.asarray(p, np.float32) for p in jax.tree.leaves(state.params)]
    # entries >= 2^-8 in size: half an ulp there is >= 2^-16 = 1.5e-5, over 10x the step
    large = [np.abs(b) >= 2.0**-8 for b in before]
    changed = sum(int(np.sum((a != b) & m)) for a, b, m in zip(after, before, large, strict=True))
    total = sum(int(m.sum()) for m in large)
    if stochastic:
        assert 1e-3 * total < changed < 0.2 * total
    else:
        assert changed == 0


def test_update_applier_keys_by_seed_and_step(tmp_path):
    params = {"w": jnp.full((256,), 1.0, jnp.bfloat16), "b": jnp.ones((4,), jnp.float32)}
    updates = {"w": jnp.full((256,), 1e-3), "b": jnp.full((4,), 1e-3)}
    plain = optimizer_lib.update_applier(tiny_config(tmp_path).step, 0)
    rounding = optimizer_lib.update_applier(tiny_config(tmp_path, **LOW_PRECISION).step, 0)
    other_seed = optimizer_lib.update_applier(tiny_config(tmp_path, **LOW_PRECISION).step, 1)
    np.testing.assert_array_equal(np.asarray(plain(params, updates, 3)["w"], np.float32), 1.0)
    step3 = np.asarray(rounding(params, updates, jnp.int32(3))["w"], np.float32)
    np.testing.assert_array_equal(
        step3, np.asarray(jax.jit(rounding)(params, updates, jnp.int32(3))["w"], np.float32)
    )
    for other in (rounding(params, updates, 4), other_seed(params, updates, 3)):
        assert np.any(np.asarray(other["w"], np.float32) != step3)
    assert 0 < np.mean(step3 != 1.0) < 0.5  # 1e-3 / ulp(1) = 0.128 of the entries move up
    # the layer-wise update applies each layer's subtree alone: each layer gets its own noise
    by_layer = [
        np.asarray(rounding(params, updates, 3, layer)["w"], np.float32) for layer in (0, 1)
    ]
    assert np.any(by_layer[0] != by_layer[1]) and np.any(by_layer[0] != step3)
    np.testing.assert_array_equal(
        by_layer[1], np.asarray(rounding(params, updates, 3, jnp.int32(1))["w"], np.float32)
    )


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"step.stochastic_rounding": True}, r"stochastic_rounding=True needs .*param_dtype"),
        ({"optimizer.subspace.basis_dtype": "bf16"}, "optimizer.subspace.basis_dtype"),
        (
            {"optimizer.subspace.basis_dtype": "bfloat16", "optimizer.name": "osd"},
            r"basis_dtype='bfloat16' applies to the basis projectors .* not to name='osd'",
        ),
        (
            dict(LOW_PRECISION, **{"step.relora": True, "optimizer.grad_clip": 0.0}),
            "stochastic_rounding=True is not supported with config.step.relora",
        ),
    ],
)
def test_bad_low_precision_config_raises(tmp_path, overrides, match):
    config = tiny_config(tmp_path, **overrides)
    with pytest.raises(ValueError, match=match):
        main_lib.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
