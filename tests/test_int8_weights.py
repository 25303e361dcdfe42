"""INT8 storage of the stacked layers' matrices (model.weight_storage='int8',
golore_jax._precision.Int8Weight, train/weight_storage.py)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from golore_jax import _precision as precision
from golore_jax import layerwise as layerwise_lib
from tests.child_env import eight_devices_env
from tests.train_fixtures import assert_trees_equal, run_and_resume, tiny_config
from train import checkpoint as checkpoint_lib
from train import data as data_lib
from train import main as main_lib
from train import optimizer as optimizer_lib
from train import sharding as sharding_lib
from train import weight_storage

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERWISE = {"step.layerwise": True, "optimizer.grad_clip": 0.0, "model.scan_layers": True}
# The 16 GB recipe's options: int8 layers, bf16 rest with stochastic rounding, int4 bases, the
# lazy refresh (threshold 0.5 of the overlap ||P_old^T P_new||_F^2 / r), 8-bit moments, remat.
RECIPE = {
    **LAYERWISE,
    "model.weight_storage": "int8",
    "model.param_dtype": "bfloat16",
    "step.stochastic_rounding": True,
    "optimizer.subspace.basis_dtype": "int4",
    "optimizer.subspace.lazy_threshold": 0.5,
    "optimizer.inner.name": "adamw8bit",
    "model.remat": True,
}
# fp32 everywhere else: the fused and the reference step then differ by fp32 rounding only.
INT8_FP32 = {**LAYERWISE, "model.weight_storage": "int8"}


# --- the library: quantize_int8 / dequantize_int8 / apply_updates_stochastic -------------------


def test_nearest_rounding_error_and_scales():
    """Round to nearest: |error| <= scale / 2 (+ fp32 rounding of the division, 127 * 2^-24 of a
    step); each column's absmax maps to +-127; an all-zero column gets scale 0, codes 0."""
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, 48, 5)), np.float32) * 0.02
    x[1, :, 3] = 0.0
    w = precision.quantize_int8(x)
    assert w.codes.dtype == jnp.int8 and w.scale.shape == (2, 1, 5)
    scale = np.abs(x).max(axis=1, keepdims=True) / 127
    np.testing.assert_allclose(w.scale, scale, rtol=1e-7)
    err = np.abs(np.asarray(precision.dequantize_int8(w)) - x)
    assert np.all(err <= scale * (0.5 + 1e-5))
    top = np.abs(np.asarray(w.codes, np.int32)).max(axis=1)
    assert np.all(np.delete(top.ravel(), 5 + 3) == 127)  # all but the zero column [1, :, 3]
    assert np.all(np.asarray(w.codes)[1, :, 3] == 0) and float(w.scale[1, 0, 3]) == 0.0


def test_stochastic_rounding_is_unbiased_within_five_sigma():
    """Mean of N = 20,000 stochastic roundings (independent keys) = the fp32 value.

    Error model: one rounding is floor or floor+1 (in steps), the upper one with probability
    f = frac(x / scale) (24-bit noise: bias <= 2^-24 step), so its std is
    scale * sqrt(f (1 - f)) <= scale / 2 and the mean of N has std <= scale / (2 sqrt N). Every
    entry must be within 5 of those (plus 1e-6 step for the fp32 division and the 2^-24 noise
    grid); 160 entries at 5 sigma: a false failure has probability ~1e-4."""
    x = jax.random.normal(jax.random.key(1), (32, 5), jnp.float32) * 0.02
    n = 20_000
    keys = jax.random.split(jax.random.key(2), n)
    decode = jax.jit(jax.vmap(lambda k: precision.dequantize_int8(precision.quantize_int8(x, k))))
    samples = np.asarray(decode(keys), np.float64)
    step = np.asarray(precision.int8_scale(x), np.float64)
    lower = np.floor(np.asarray(x, np.float64) / step) * step
    # each rounding is one of the two neighbouring grid points
    assert np.all(
        np.isclose(samples, lower, atol=1e-6 * step)
        | np.isclose(samples, lower + step, atol=1e-6 * step)
    )
    bound = 5 * step / (2 * np.sqrt(n)) + 1e-6 * step
    assert np.all(np.abs(samples.mean(0) - np.asarray(x, np.float64)) <= bound)
    # both neighbours occur (not a fixed rounding)
    assert 0.2 < np.mean(np.isclose(samples, lower + step, atol=1e-6 * step)) < 0.8


def test_updates_below_a_step_survive_in_expectation():
    """apply_updates_stochastic on an Int8Weight leaf: an update of 0.1 step moves ~10% of the
    codes by one (round to nearest would move none), the rest of the tree is unchanged in
    type, and the same key gives the same result under jit."""
    x = jax.random.normal(jax.random.key(3), (64, 32), jnp.float32) * 0.02
    params = {"w": precision.quantize_int8(x), "b": jnp.ones(3, jnp.float32)}
    u = 0.1 * params["w"].scale * jnp.ones_like(x)
    u = u.at[jnp.argmax(jnp.abs(x), axis=0), jnp.arange(32)].set(0.0)  # keep each absmax
    new = precision.apply_updates_stochastic(params, {"w": u, "b": jnp.ones(3)}, jax.random.key(4))
    again = jax.jit(precision.apply_updates_stochastic)(
        params, {"w": u, "b": jnp.ones(3)}, jax.random.key(4)
    )
    np.testing.assert_array_equal(new["w"].codes, again["w"].codes)
    assert isinstance(new["w"], precision.Int8Weight) and new["w"].codes.dtype == jnp.int8
    np.testing.assert_allclose(new["w"].scale, params["w"].scale, rtol=1e-6)
    moved = np.asarray(new["w"].codes, np.int32) - np.asarray(params["w"].codes, np.int32)
    assert set(np.unique(moved)) <= {0, 1}
    # 2048 entries, P(move) = 0.1: mean 0.1, std 0.0066; 5 sigma
    assert abs(moved.mean() - 0.1) < 5 * np.sqrt(0.1 * 0.9 / moved.size)
    np.testing.assert_array_equal(new["b"], 2.0)


# --- the trainer ---------------------------------------------------------------------------------


def _batches(config, steps):
    datasets = data_lib.build_datasets(
        config.data, seq_len=config.seq_len, global_batch_size=config.batch_size, seed=0
    )
    return [next(datasets.train) for _ in range(steps)]


def _trainer(config):
    return main_lib.build_trainer(config, sharding_lib.make_mesh(config.mesh))


def test_int8_state_holds_codes_and_the_rest_in_param_dtype(tmp_path):
    trainer = _trainer(tiny_config(tmp_path, **RECIPE))
    state = trainer.init(jax.random.key(0))
    layers = state.params["model"]["layers"]
    q = layers["self_attn"]["q_proj"]["kernel"]
    assert isinstance(q, precision.Int8Weight)
    assert q.codes.shape == (2, 64, 64) and q.codes.dtype == jnp.int8
    assert q.scale.shape == (2, 1, 64) and q.scale.dtype == jnp.float32
    assert layers["input_layernorm"]["scale"].dtype == jnp.bfloat16
    assert state.params["lm_head"]["kernel"].dtype == jnp.bfloat16
    # the optimizer state was built from the float shapes; the metrics name the float leaves
    assert len(trainer.param_paths) == 12
    abstract_q = trainer.abstract_state.params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert abstract_q.codes.dtype == jnp.int8


def test_fused_int8_step_follows_a_full_gradient_reference(tmp_path):
    """The fused step with int8 layers against a reference that decodes ALL layers (test
    only), takes the full gradient of ``model.apply``, runs the same per-layer optimizer
    (golore_jax.layerwise's update) and applies each layer's update to its int8 slice with the
    trainer's applier (same keys: seed, step, layer). Hybrid GaLore/GoLore, refresh every 2, 5
    steps, fp32 compute and fp32 embedding/head, weight decay 0.1 (the layer's optimizer
    must get the decoded weights, not the codes).

    Each step starts both from the fused step's state (copied before it runs).
    Error model: the two programs' gradients differ by fp32 summation order (~1e-6 relative),
    and so do the updates; a stochastic rounding decision flips only when the noise falls
    within that difference of a threshold, probability ~1e-6 * |update| / step per entry
    (|update| / step <~ 10 here): ~1 expected flip among the 5 x 81,920 rounded codes. So
    the losses agree to 1e-5 and at most 1e-4 of a step's codes may differ (by one step).
    Run on, one flipped code would move its weight by a whole step, 1e5 times the summation
    difference: the trajectories would part (a flip at step 2 became 263 by step 5 when
    XLA:CPU's element-wise emitter summed one program in another order), hence the restart
    from one state at every step."""
    config = tiny_config(tmp_path, **INT8_FP32)
    config.optimizer.subspace.momentum_projection = True  # sign-independent (test_layerwise)
    config.optimizer.weight_decay = 0.1  # the optimizer must see the decoded weights
    trainer = _trainer(config)
    step_config = config.step.copy_and_resolve_references()
    step_config.stochastic_rounding = True
    applier = optimizer_lib.update_applier(step_config, config.seed)
    dtype = trainer.model.config.param_dtype

    @jax.jit
    def reference(state, batch):
        decoded = weight_storage.decode(state.params, dtype)

        def loss_fn(params):
            logits = trainer.model.apply({"params": params}, batch["inputs"])
            return main_lib.cross_entropy(logits, batch["targets"])

        loss, grads = jax.value_and_grad(loss_fn)(decoded)
        updates, opt_state = trainer.tx.update(grads, state.opt_state, decoded)
        stack, rest = layerwise_lib.split_stack(state.params, ("model", "layers"))
        stack_u, rest_u = layerwise_lib.split_stack(updates, ("model", "layers"))
        layers = []
        for i in range(config.model.num_layers):
            take = lambda a, i=i: a[i]  # noqa: E731
            layers.append(
                applier(jax.tree.map(take, stack), jax.tree.map(take, stack_u), state.step, i)
            )
        stack = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
        rest = applier(rest, rest_u, state.step)
        params = layerwise_lib.merge_stack(stack, rest, ("model", "layers"))
        return state._replace(step=state.step + 1, params=params, opt_state=opt_state), loss

    codes = lambda t: [  # noqa: E731
        np.asarray(w.codes, np.int32)
        for w in jax.tree.leaves(t, is_leaf=lambda x: isinstance(x, precision.Int8Weight))
        if isinstance(w, precision.Int8Weight)
    ]
    state = trainer.init(jax.random.key(0))
    losses, reference_losses = [], []
    for batch in _batches(config, 5):
        batch = main_lib.to_global(batch, trainer.batch_sharding)
        expected = jax.tree.map(jnp.copy, state)  # the fused step donates its input
        state, metrics = trainer.train_step(state, batch)
        expected, loss = reference(expected, batch)
        assert bool(metrics["finite"])
        losses.append(float(metrics["loss"]))
        reference_losses.append(float(loss))
        got, want = codes(state.params), codes(expected.params)
        assert len(got) == 7
        differ = sum(int(np.sum(a != b)) for a, b in zip(got, want, strict=True))
        assert differ <= 1e-4 * sum(a.size for a in got), (len(losses), differ)
        assert all(np.abs(a - b).max() <= 1 for a, b in zip(got, want, strict=True))
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
    assert losses[-1] < losses[0]


def test_int8_recipe_trains_and_resume_is_exact(tmp_path):
    """All the memory options together (int8 layers, bf16 rest with stochastic rounding, int4
    bases, the lazy refresh, 8-bit moments, remat, layer-wise; the hybrid GaLore/GoLore): the
    loss falls; saving at step 3 (orbax: codes and scales) and restoring into the trainer's
    abstract state, then 3 more steps, gives the uninterrupted run's losses and params bit for
    bit (refreshes scheduled at 0, 2, 4)."""
    config = tiny_config(tmp_path, **RECIPE)
    trainer = _trainer(config)
    batches = [main_lib.to_global(b, trainer.batch_sharding) for b in _batches(config, 6)]
    state, losses, resumed, resumed_losses, metrics = run_and_resume(
        trainer, config, batches, tmp_path / "run"
    )
    assert all(bool(m["finite"]) for m in metrics)
    assert losses[-1] < losses[0]
    q = resumed.params["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert isinstance(q, precision.Int8Weight) and q.codes.dtype == jnp.int8
    assert resumed_losses == losses
    assert_trees_equal(resumed.params, state.params)
    # eval decodes layer by layer: the same loss as the float model on the decoded weights
    batch = batches[0]
    decoded = weight_storage.decode(state.params, jnp.bfloat16)
    logits = trainer.model.apply({"params": decoded}, batch["inputs"])
    want = float(main_lib.cross_entropy(logits, batch["targets"]))
    got = float(trainer.eval_step(trainer.weights(state), batch)["loss"])
    assert got == pytest.approx(want, rel=1e-3)  # bf16 compute, different fusion


def test_checkpoint_fingerprint_tells_int8_from_float(tmp_path):
    """An int8 checkpoint does not resume a float run; a checkpoint from before the key
    existed (no weight_storage in its fingerprint) still resumes a float run."""
    float_fp = checkpoint_lib.fingerprint(tiny_config(tmp_path, **LAYERWISE))
    int8_fp = checkpoint_lib.fingerprint(tiny_config(tmp_path, **INT8_FP32))
    assert checkpoint_lib.comparable(float_fp) != checkpoint_lib.comparable(int8_fp)
    assert "weight_storage" not in float_fp["model"]  # as in checkpoints from before the key
    assert int8_fp["model"]["weight_storage"] == "int8"
    explicit = json.loads(json.dumps(float_fp))
    explicit["model"]["weight_storage"] = "float"
    assert checkpoint_lib.comparable(explicit) == checkpoint_lib.comparable(float_fp)


def test_eight_fake_devices_match_one_with_int8_layers(tmp_path):
    """Mesh 2x2x2 with int8 layers gives the 1-device losses (fp32 rest: only the order of
    cross-device reductions differs, ~1e-6, so stochastic-rounding flips are ~1e-6 rare); the
    codes are sharded like the float kernel, the scales likewise with their size-1 input axis
    unsharded."""
    out = subprocess.run(
        [sys.executable, "-m", "tests.multidevice_check", str(tmp_path), "--layerwise", "--int8"],
        env=eight_devices_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8
    losses = result["losses"]
    assert losses["int8_2x2x2"] == pytest.approx(losses["int8_1"], rel=1e-5)
    specs = result["specs"]["int8_2x2x2"]
    assert specs["q_codes"] == "P(None, 'fsdp', 'tensor')"
    assert specs["q_scale"] == "P(None, None, 'tensor')"
    assert specs["down_codes"] == "P(None, 'tensor', 'fsdp')"
    assert specs["down_scale"] == "P(None, None, 'fsdp')"


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"model.weight_storage": "int4"}, r"model.weight_storage='int4'; expected one of"),
        (
            {"model.weight_storage": "int8", "model.scan_layers": True},
            "weight_storage='int8' needs config.model.scan_layers=True and "
            "config.step.layerwise=True",
        ),
        (
            {**INT8_FP32, "model.param_dtype": "bfloat16"},
            "needs config.step.stochastic_rounding=True",
        ),
    ],
)
def test_bad_int8_config_raises(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        main_lib.validate_config(tiny_config(tmp_path, **overrides))


def _compiled_temp_bytes(num_layers: int, tmp_path) -> tuple[int, int, int, int]:
    """The int8 trainer step's and init's compiled scratch bytes (params and state are
    donated in/out buffers or outputs, not scratch), one decoded bf16 layer's bytes and one
    saved layer input's bytes."""
    config = tiny_config(tmp_path, **RECIPE)
    config.model.num_layers, config.batch_size = num_layers, 2
    trainer = _trainer(config)
    batch = {
        k: jax.ShapeDtypeStruct(
            (config.batch_size, config.seq_len), jnp.int32, sharding=trainer.batch_sharding
        )
        for k in ("inputs", "targets")
    }
    compiled = trainer.train_step.lower(trainer.abstract_state, batch).compile()
    init = trainer.init.lower(jax.random.key(0)).compile().memory_analysis().temp_size_in_bytes
    codes = [
        w.codes
        for w in jax.tree.leaves(
            trainer.abstract_state.params["model"]["layers"],
            is_leaf=lambda x: isinstance(x, precision.Int8Weight),
        )
        if isinstance(w, precision.Int8Weight)
    ]
    layer_bf16 = sum(c.size * 2 for c in codes) // num_layers
    input_bytes = config.batch_size * config.seq_len * config.model.hidden_size * 4
    return compiled.memory_analysis().temp_size_in_bytes, init, layer_bf16, input_bytes


def test_no_float_copy_of_all_layers_exists(tmp_path):
    """Four more int8 layers add to the compiled step's scratch no more than their four saved
    inputs (fp32 compute here: 16 KiB each) plus 1 KiB per layer, where one decoded bf16 layer
    is 80 KiB: the decode (forward, recompute, update) holds one layer at a time, never the
    stack. The init's scratch grows by less than one such layer in all (it draws and quantizes
    one layer at a time: a model.init then encode held the float stack, 19.7 GiB at 7B)."""
    temp4, init4, layer_bf16, input_bytes = _compiled_temp_bytes(4, tmp_path)
    temp8, init8, _, _ = _compiled_temp_bytes(8, tmp_path)
    assert init8 - init4 < layer_bf16, (init8, init4, layer_bf16)
    assert layer_bf16 > 4 * (input_bytes + 1024)  # the bound below tells the two apart
    assert temp8 - temp4 <= 4 * (input_bytes + 1024), (temp8, temp4, input_bytes, layer_bf16)


def test_the_16gb_recipe_config_validates(tmp_path):
    """configs/recipe_7b_16gb.py (README "Memory") passes the trainer's checks with every
    option on, and keeps the global clip's bound with one clip per layer group."""
    from configs import recipe_7b_16gb

    config = recipe_7b_16gb.get_config()
    config.lock()
    main_lib.validate_config(config)
    assert config.model.weight_storage == "int8"
    assert config.optimizer.subspace.basis_dtype == "int4"
    assert config.optimizer.subspace.lazy_threshold > 0
    groups = config.model.num_layers + 1
    assert config.step.layer_grad_clip == pytest.approx(1 / groups**0.5)
