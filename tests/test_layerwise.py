"""Layer-wise updates inside the backward pass (config.step.layerwise, golore_jax.layerwise).

The fused step must give the trajectory of the plain step, shard like it, resume exactly, and
never hold the gradients of all layers at once.
"""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import golore_jax as gl
from configs import finetune_boolq
from tests import numerics
from tests.child_env import eight_devices_env
from tests.train_fixtures import assert_trees_equal, run_and_resume, tiny_config
from train import checkpoint as checkpoint_lib
from train import data as data_lib
from train import finetune
from train import layerwise as layerwise_lib
from train import main as main_lib
from train import optimizer as optimizer_lib
from train import sharding as sharding_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERWISE = {"step.layerwise": True, "optimizer.grad_clip": 0.0, "model.scan_layers": True}
# The smallest relative gap among the top r + 1 singular values of the projected gradients at
# the refreshes, below which the tolerances of tests/numerics.py are not claimed (measured on
# the tiny model's trajectories here: 8.7e-4).
MIN_GAP = 1e-4


def _batches(config, steps):
    datasets = data_lib.build_datasets(
        config.data, seq_len=config.seq_len, global_batch_size=config.batch_size, seed=0
    )
    return [next(datasets.train) for _ in range(steps)]


def _full_gradient_step(trainer, with_grads=False):
    """The plain step with the layer-wise trainer's own optimizer: the full gradient by
    ``jax.value_and_grad`` of ``model.apply``, then ``tx.update`` (golore_jax.layerwise's
    ``update``: the same per-layer transform, layer after layer, on the full gradient).
    ``with_grads``: also return the stacked layers' gradients (their spectra set the test's
    tolerance)."""

    def step(state, batch):
        def loss_fn(params):
            logits = trainer.model.apply({"params": params}, batch["inputs"])
            return main_lib.cross_entropy(logits, batch["targets"])

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = trainer.tx.update(grads, state.opt_state, state.params)
        new_state = state._replace(
            params=optax.apply_updates(state.params, updates), opt_state=opt_state
        )
        if with_grads:
            return new_state, loss, grads["model"]["layers"]
        return new_state, loss

    return step


@pytest.fixture(scope="module")
def fused_trainer(tmp_path_factory):
    """Fused layer-wise trainers (momentum projection: see the first test) by optimizer name
    and inner optimizer, each built and compiled once for this module: four tests step the
    GaLore one."""
    cache = {}

    def get(name, inner=None):
        if (name, inner) not in cache:
            config = tiny_config(tmp_path_factory.mktemp("fused"), **LAYERWISE)
            config.optimizer.name = name
            if inner is not None:
                config.optimizer.inner.name = inner
            config.optimizer.subspace.momentum_projection = True
            mesh = sharding_lib.make_mesh(config.mesh)
            cache[name, inner] = config, main_lib.build_trainer(config, mesh)
        return cache[name, inner]

    return get


# .ci/run reruns the AdamW cases under a second XLA configuration: MSGD's update is invariant
# to a rotation inside the subspace, so it is the less sensitive half (and CI time is short).
FUSED_CASES = [
    pytest.param(name, inner, marks=[pytest.mark.numerics] if inner == "adamw" else [])
    for name in ("galore", "golore", "hybrid")
    for inner in ("adamw", "msgd")
]


@pytest.mark.parametrize("name, inner", FUSED_CASES)
def test_fused_step_follows_the_full_gradient_step(fused_trainer, name, inner):
    """The fused backward-pass update against the plain step with the same optimizer.

    Reference: ``value_and_grad`` of the whole model, then the same per-layer transforms
    applied to the full gradient (``golore_jax.layerwise``'s ``update``). Both hold the same
    state, so GoLore's per-layer PRNG streams (the layer index folded into the key) are the
    same in both: the comparison checks the fused backward, not a random draw. 5 steps with a
    refresh every 2 (steps 0, 2, 4: three refreshes), the hybrid switching at step 3; fp32, no
    clipping.

    Error model (tests/numerics.py). The two programs may sum each gradient in another order:
    relative ``GRAD_RTOL = 1e-6``. They do on an AMD EPYC host, and here with LLVM's
    optimisation on (``--xla_backend_optimization_level=1``: one element of the embedding,
    [420, 36], moves 0.08% and fails the old elementwise 1e-4, as on that host). Carried
    through the 5 steps: ``CARRIED_RTOL = 1e-3``. Each of the (at most 3) refreshes whose
    decomposition reads the gradient (GaLore's eigh of ``G G^T``) adds a basis rotation of
    ``GRAD_RTOL / gap``, ``gap`` the smallest relative gap among the top ``r + 1`` singular
    values of a projected gradient (Adam's elementwise update is not invariant to a rotation
    inside the subspace), measured on the reference's gradients (about 1e-3). Each leaf's
    total update is compared by RMS, relative to that update (or the model's RMS update,
    for a leaf whose gradient is cancellation-small), not elementwise: Adam divides each
    element's moment by its own RMS, so an element whose gradient is cancellation-small moves
    far while its leaf barely does. Losses: the updates' relative error times what the
    updates moved the loss, plus fp32 rounding (1e-6). Measured at opt level 1: the worst
    leaf 4.2e-5 of its update (an o_proj, GaLore) against the tolerance's 4e-3.

    ``momentum_projection=True``: without it, GaLore keeps the first moment in the old basis's
    coordinates, so the update after a refresh depends on the sign the decomposition gives each
    basis vector, and rounding-level differences in the gradient can flip one (seen here: the
    8th vector of a q_proj at the second refresh; the losses still agree to 1e-5, the params to
    ~20% of that leaf's update). Carrying the moment into the new basis makes the update
    independent of those signs.
    """
    config, trainer = fused_trainer(name, inner)
    rank = config.optimizer.subspace.rank
    reference = jax.jit(_full_gradient_step(trainer, with_grads=True))
    state = trainer.init(jax.random.key(0))
    expected = jax.tree_util.tree_map(jnp.copy, state)  # the fused step donates its input
    start = jax.tree_util.tree_map(np.asarray, state.params)
    losses, reference_losses, gaps = [], [], []
    for step, batch in enumerate(_batches(config, 5)):
        batch = main_lib.to_global(batch, trainer.batch_sharding)
        state, metrics = trainer.train_step(state, batch)
        expected, loss, grads = reference(expected, batch)
        if step % config.optimizer.subspace.update_every == 0:  # a refresh: the SVD's input
            kernels = [g for p, g in _with_paths(grads) if p.endswith("['kernel']")]
            gaps.append(numerics.min_relative_gap(kernels, rank))
        assert bool(metrics["finite"]) and metrics["leaf_finite"].shape == (12,)
        losses.append(float(metrics["loss"]))
        reference_losses.append(float(loss))
    gap = min(gaps)
    assert gap >= MIN_GAP, gap  # the model's premise: no (near-)degenerate top-r spectrum
    # GoLore's bases are random draws: no decomposition reads the gradient.
    rtol = numerics.update_rtol(None if name == "golore" else gap, refreshes=3)
    reference_losses = np.asarray(reference_losses)
    loss_atol = 1e-6 * reference_losses + rtol * np.abs(reference_losses[0] - reference_losses)
    np.testing.assert_array_less(np.abs(np.asarray(losses) - reference_losses), loss_atol)
    assert losses[-1] < losses[0]  # it trains
    numerics.assert_updates_close(state.params, expected.params, start, rtol)


def _with_paths(tree):
    return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)]


@pytest.mark.numerics
def test_fused_galore_follows_the_plain_trainer_on_unstacked_layers(tmp_path, fused_trainer):
    """GaLore (deterministic projector) layer by layer on the stacked model = the plain trainer
    on the same weights unstacked (scan_layers=False: one leaf per layer, updated from the full
    gradient by the unchanged optimizer). 5 steps, refreshes at 0, 2, 4; the losses and each
    leaf's update to the first test's error model."""
    config, fused = fused_trainer("galore", "adamw")
    plain_config = tiny_config(tmp_path, **{"optimizer.grad_clip": 0.0})
    plain_config.optimizer.name = "galore"
    plain_config.optimizer.subspace.momentum_projection = True
    plain = main_lib.build_trainer(plain_config, sharding_lib.make_mesh(plain_config.mesh))
    state = fused.init(jax.random.key(0))
    start = jax.tree_util.tree_map(np.asarray, state.params)
    copy = jax.tree_util.tree_map(jnp.copy, state.params)  # the fused step donates its input
    unstacked = {k: v for k, v in copy["model"].items() if k != "layers"}
    for i in range(config.model.num_layers):
        unstacked[f"layers_{i}"] = jax.tree_util.tree_map(
            lambda a, i=i: a[i], copy["model"]["layers"]
        )
    params = {"model": unstacked, "lm_head": copy["lm_head"]}
    plain_state = main_lib.TrainState(
        jnp.zeros([], jnp.int32), params, plain.tx.init(params), jnp.zeros([], jnp.int32)
    )
    losses, plain_losses, norms, plain_norms = [], [], [], []
    for batch in _batches(config, 5):
        state, metrics = fused.train_step(state, main_lib.to_global(batch, fused.batch_sharding))
        plain_state, plain_metrics = plain.train_step(
            plain_state, main_lib.to_global(batch, plain.batch_sharding)
        )
        losses.append(float(metrics["loss"]))
        plain_losses.append(float(plain_metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
        plain_norms.append(float(plain_metrics["grad_norm"]))
    # The global gradient norm, summed layer by layer: at step 1 (the same weights) they differ
    # by the gradients' summation order alone (GRAD_RTOL, 1e-5 with the norm's own sum).
    assert norms[0] == pytest.approx(plain_norms[0], rel=1e-5)
    # The error model of the first test, with its premise (the smallest gap of the projected
    # gradients' spectra at the refreshes >= MIN_GAP), which it checks on this trajectory.
    # From step 2 the weights differ by up to rtol of what the updates moved them, so losses
    # and gradient norms may differ by rtol of what those moves changed them (to first order),
    # plus fp32 rounding (a loss 1e-6; a norm 1e-5, as at step 1).
    rtol = numerics.update_rtol(MIN_GAP, refreshes=3)
    for got, want, rounding in ((losses, plain_losses, 1e-6), (norms, plain_norms, 1e-5)):
        want = np.asarray(want)
        atol = rounding * want + rtol * np.abs(want[0] - want)
        np.testing.assert_array_less(np.abs(np.asarray(got) - want), atol)
    model = plain_state.params["model"]
    layers = [model[f"layers_{i}"] for i in range(config.model.num_layers)]
    restacked = {k: v for k, v in model.items() if not k.startswith("layers_")}
    restacked["layers"] = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *layers)
    want = {"model": restacked, "lm_head": plain_state.params["lm_head"]}
    numerics.assert_updates_close(state.params, want, start, rtol)


def _host(x):
    """A numpy copy (a PRNG key's data)."""
    return np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)


def test_non_finite_loss_changes_nothing_but_the_counters(tmp_path):
    """A NaN in the top layer's weights makes the loss NaN: no layer, nor the embedding, norm
    or head, is updated; the step counts as skipped and the metrics name the bad leaves."""
    config = tiny_config(tmp_path, **LAYERWISE)
    trainer = main_lib.build_trainer(config, sharding_lib.make_mesh(config.mesh))
    state = trainer.init(jax.random.key(0))
    batch = main_lib.to_global(_batches(config, 1)[0], trainer.batch_sharding)
    state, _ = trainer.train_step(state, batch)  # a finite step first: a nonzero state
    kernel = state.params["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    bad_params = jax.tree_util.tree_map(jnp.copy, state.params)
    bad_params["model"]["layers"]["mlp"]["up_proj"]["kernel"] = kernel.at[1, 0, 0].set(jnp.nan)
    bad = state._replace(params=bad_params)
    before = jax.tree_util.tree_map(_host, (bad.params, bad.opt_state))
    after, metrics = trainer.train_step(bad, batch)
    assert not bool(metrics["finite"]) and not np.isfinite(float(metrics["loss"]))
    assert int(after.step) == 2 and int(after.skipped) == 1
    after_leaves = jax.tree_util.tree_leaves((after.params, after.opt_state))
    for got, want in zip(after_leaves, jax.tree_util.tree_leaves(before), strict=True):
        np.testing.assert_array_equal(_host(got), want)  # NaN == NaN here
    bad_leaves = [
        p for p, ok in zip(trainer.param_paths, metrics["leaf_finite"], strict=True) if not ok
    ]
    assert "['model']['layers']['mlp']['up_proj']['kernel']" in bad_leaves


def test_resume_is_exact(tmp_path):
    """Saving at step 3 and restoring into the trainer's abstract state (built with
    ``eval_shape``: the layer-wise state has a leading layer axis and per-layer keys), then
    3 more steps, gives bit-identical losses and params to 6 uninterrupted steps (refresh every
    2 steps, the hybrid's switch at step 3)."""
    config = tiny_config(tmp_path, **LAYERWISE)
    trainer = main_lib.build_trainer(config, sharding_lib.make_mesh(config.mesh))
    batches = [main_lib.to_global(b, trainer.batch_sharding) for b in _batches(config, 6)]
    state, losses, resumed, resumed_losses, _ = run_and_resume(
        trainer, config, batches, tmp_path / "run"
    )
    assert resumed.opt_state.layers[0].key.shape == (config.model.num_layers,)
    assert resumed_losses == losses
    assert_trees_equal(resumed.params, state.params)


def test_eight_fake_devices_match_one_and_shard_state(tmp_path):
    """Mesh 2x2x2 (data x fsdp x tensor) gives the losses of 1 device; each layer's
    state slice is sharded like that layer's params, behind an unsharded layer axis. The same
    holds for the full-gradient step on the stacked layers with both layers in one vmapped
    optimizer call (``step.layers_per_call=2``; no clip, so the same trajectory)."""
    out = subprocess.run(
        [sys.executable, "-m", "tests.multidevice_check", str(tmp_path), "--layerwise"],
        env=eight_devices_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8
    for name in ("2x2x2", "stacked_2_per_call_2x2x2"):
        # fp32; only the order of cross-device reductions differs.
        assert result["losses"][name] == pytest.approx(result["losses"]["1"], rel=1e-5), name
        specs = result["specs"][name]
        assert specs["q_kernel"] == "P(None, 'fsdp', 'tensor')"
        # Left-projected q (64 x 64): P spans rows (fsdp); the r x n moment keeps cols (tensor)
        # and shards its rank over the rows' axis (fsdp=2 divides r=8), as in the plain step.
        assert specs["q_basis"] == "P(None, 'fsdp', None)"
        assert specs["q_mu"] == "P(None, 'fsdp', 'tensor')"
        assert specs["q_mu_shard_shape"] == [2, 4, 32]  # 2 layers, r=8 over fsdp=2, 64 over 2
        # Right-projected down_proj (128 x 64): Q spans cols (fsdp); the m x r moment keeps the
        # rows (tensor) and shards its rank over fsdp.
        assert specs["down_basis"] == "P(None, 'fsdp', None)"
        assert specs["down_mu"] == "P(None, 'tensor', 'fsdp')"


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            {"step.layerwise": True, "optimizer.grad_clip": 0.0},
            "needs config.model.scan_layers=True",
        ),
        ({**LAYERWISE, "optimizer.grad_clip": 1.0}, "grad_clip=1.0 is a global-norm clip"),
        ({"step.layer_grad_clip": 1.0}, "layer_grad_clip=1.0 needs layerwise=True"),
        ({"step.layers_per_call": 0}, r"step.layers_per_call=0 must be an int >= 1"),
        ({"step.layers_per_call": 2}, "layers_per_call=2 needs config.model.scan_layers=True"),
        (
            {**LAYERWISE, "step.layers_per_call": 2},
            "layers_per_call=2 applies to a subspace optimizer's full-gradient step",
        ),
        (
            {"model.scan_layers": True, "optimizer.name": "adamw", "step.layers_per_call": 2},
            "with step.layerwise=True or optimizer.name='adamw' it must be 1",
        ),
    ],
)
def test_bad_layerwise_config_raises(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        main_lib.validate_config(tiny_config(tmp_path, **overrides))


def _compiled_temp_bytes(num_layers: int, tmp_path, with_plain: bool) -> tuple:
    """Compiled scratch bytes of the fused step and of the full-gradient step (both with
    activation checkpointing per layer, donated state), the stacked layers' fp32 gradient
    bytes and one layer input's bytes, for a tiny model of ``num_layers`` layers (the full-
    gradient step's only ``with_plain``: None otherwise)."""
    config = tiny_config(tmp_path, **LAYERWISE)
    config.model.num_layers, config.model.remat, config.batch_size = num_layers, True, 2
    config.optimizer.name = "galore"
    mesh = sharding_lib.make_mesh(config.mesh)
    trainer = main_lib.build_trainer(config, mesh)
    tx = gl.layerwise.per_layer_transform(
        optimizer_lib.build_optimizer(config.optimizer, config.num_steps)
    )
    fused = layerwise_lib.make_train_step(trainer.model.config, tx, main_lib.cross_entropy)
    plain = _full_gradient_step(trainer)
    batch = {
        k: jax.ShapeDtypeStruct(
            (config.batch_size, config.seq_len), jnp.int32, sharding=trainer.batch_sharding
        )
        for k in ("inputs", "targets")
    }
    temp = {"plain": None}
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.LOGICAL_RULES):
        for name, step in (("fused", fused), ("plain", plain))[: 2 if with_plain else 1]:
            compiled = (
                jax.jit(step, donate_argnums=0).lower(trainer.abstract_state, batch).compile()
            )
            temp[name] = compiled.memory_analysis().temp_size_in_bytes
    stack = trainer.abstract_state.params["model"]["layers"]
    grad_bytes = sum(math.prod(x.shape) * 4 for x in jax.tree_util.tree_leaves(stack))
    input_bytes = config.batch_size * config.seq_len * config.model.hidden_size * 4
    return temp["fused"], temp["plain"], grad_bytes, input_bytes


def test_compiled_step_holds_no_stack_of_layer_gradients(tmp_path):
    """XLA's compiled scratch (``memory_analysis().temp_size_in_bytes``, params and state
    excluded: they are donated in/out buffers) of a 4- and an 8-layer model (hidden 64).

    * The full-gradient step's scratch exceeds the fused step's by at least the stacked
      layers' fp32 gradient (1.3 MB at 8 layers): it holds that gradient (and the updates).
    * Four more layers add to the fused step's scratch no more than their four saved inputs
      (16 KiB each) plus 1 KiB per layer, where one layer's gradient is 164 KB: no buffer
      grows with the number of layers' gradients.
    """
    fused4, _, grad4, input_bytes = _compiled_temp_bytes(4, tmp_path, with_plain=False)
    fused8, plain8, grad8, _ = _compiled_temp_bytes(8, tmp_path, with_plain=True)
    layer_grad = (grad8 - grad4) // 4
    assert layer_grad > 8 * input_bytes  # the bound below tells the two apart
    assert plain8 - fused8 >= grad8, (plain8, fused8, grad8)
    assert fused8 - fused4 <= 4 * (input_bytes + 1024), (fused8, fused4, input_bytes)


def test_checkpoint_fingerprint_tells_layerwise_from_plain(tmp_path):
    """The layer-wise state differs from the plain one: a run refuses the other's checkpoint
    (a clear mismatch, the checkpoint kept) instead of failing to read it. Plain fingerprints
    are unchanged, so older checkpoints stay resumable."""
    plain = checkpoint_lib.fingerprint(tiny_config(tmp_path, **{"model.scan_layers": True}))
    fused = checkpoint_lib.fingerprint(tiny_config(tmp_path, **LAYERWISE))
    assert "step.layerwise" not in plain
    assert fused == {**plain, "step.layerwise": True}


def test_finetune_refuses_layerwise():
    """The fine-tuning schema has no ``step`` block (the layer-wise step is pre-training's):
    its config, locked as the command line loads it, refuses ``step.layerwise``."""
    config = finetune_boolq.get_config()
    config.lock()
    assert "step" not in config
    with pytest.raises(AttributeError, match="step"):
        config.step.layerwise = True
    finetune.validate_config(config)  # the recipe itself passes


@pytest.mark.parametrize("layers_per_call", [1, 2])
def test_stacked_layers_without_layerwise_run_the_optimizer_per_layer(
    tmp_path, fused_trainer, layers_per_call
):
    """``model.scan_layers=True`` with GaLore and the plain full-gradient step: the optimizer
    runs per layer (each layer's matrices projected, the stacked norms left alone), so with
    no clipping it is the fused layer-wise step's trajectory (4 steps, refreshes at 0 and 2,
    losses to the first test's error model), one layer at a time or both layers in one
    vmapped call; with the default global-norm clip it trains with finite steps."""
    stacked = {
        "model.scan_layers": True,
        "optimizer.grad_clip": 0.0,
        "step.layers_per_call": layers_per_call,
    }
    config = tiny_config(tmp_path, **stacked)
    config.optimizer.name = "galore"
    config.optimizer.subspace.momentum_projection = True  # signs: see the first test of this file
    plain = main_lib.build_trainer(config, sharding_lib.make_mesh(config.mesh))
    _, fused = fused_trainer("galore", "adamw")
    assert isinstance(plain.tx.init(plain.abstract_state.params), gl.layerwise.LayerwiseState)
    state = plain.init(jax.random.key(0))
    fused_state = fused.init(jax.random.key(0))
    losses, fused_losses = [], []
    for batch in _batches(config, 4):
        state, metrics = plain.train_step(state, main_lib.to_global(batch, plain.batch_sharding))
        fused_state, fused_metrics = fused.train_step(
            fused_state, main_lib.to_global(batch, fused.batch_sharding)
        )
        losses.append(float(metrics["loss"]))
        fused_losses.append(float(fused_metrics["loss"]))
    # The first test's loss model (its premise, gap >= MIN_GAP, checked on this trajectory).
    rtol = numerics.update_rtol(MIN_GAP, refreshes=2)
    fused_losses = np.asarray(fused_losses)
    loss_atol = 1e-6 * fused_losses + rtol * np.abs(fused_losses[0] - fused_losses)
    np.testing.assert_array_less(np.abs(np.asarray(losses) - fused_losses), loss_atol)
    assert losses[-1] < losses[0]

    if layers_per_call != 1:
        return  # the clipped run below takes the default layers_per_call: once is enough
    clipped = tiny_config(tmp_path, **{"model.scan_layers": True})
    clipped.optimizer.name = "galore"
    assert clipped.optimizer.grad_clip > 0
    trainer = main_lib.build_trainer(clipped, sharding_lib.make_mesh(clipped.mesh))
    state = trainer.init(jax.random.key(0))
    for batch in _batches(clipped, 2):
        state, metrics = trainer.train_step(
            state, main_lib.to_global(batch, trainer.batch_sharding)
        )
        assert bool(metrics["finite"])
