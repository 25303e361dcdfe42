"""Layer-wise updates inside the backward pass (config.optimizer.layerwise, golore_jax.layerwise).

The fused step must give the trajectory of the plain step, shard like it, resume exactly, and
never hold the gradients of all layers at once.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.train_fixtures import tiny_config
from train import data as data_lib
from train import main as main_lib
from train import sharding as sharding_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERWISE = {"optimizer.layerwise": True, "optimizer.grad_clip": 0.0, "model.scan_layers": True}


def _batches(config, steps):
    datasets = data_lib.build_datasets(
        config.data, seq_len=config.seq_len, global_batch_size=config.batch_size, seed=0
    )
    return [next(datasets.train) for _ in range(steps)]


def _reference_step(trainer):
    """The plain step with the layer-wise trainer's own optimizer: the full gradient by
    ``jax.value_and_grad`` of ``model.apply``, then ``tx.update`` (golore_jax.layerwise's
    ``update``: the same per-layer transform, layer after layer, on the full gradient)."""

    def step(state, batch):
        def loss_fn(params):
            logits = trainer.model.apply({"params": params}, batch["inputs"])
            return main_lib.cross_entropy(logits, batch["targets"])

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = trainer.tx.update(grads, state.opt_state, state.params)
        return state._replace(
            params=optax.apply_updates(state.params, updates), opt_state=opt_state
        ), loss

    return jax.jit(step)


@pytest.mark.parametrize("inner", ["adamw", "msgd"])
@pytest.mark.parametrize("name", ["galore", "golore", "hybrid"])
def test_fused_step_follows_the_full_gradient_step(tmp_path, name, inner):
    """The fused backward-pass update against the plain step with the same optimizer.

    Reference: ``value_and_grad`` of the whole model, then the same per-layer transforms
    applied to the full gradient (``golore_jax.layerwise``'s ``update``). Both hold the same
    state, so GoLore's per-layer PRNG streams (the layer index folded into the key) are the
    same in both: the comparison checks the fused backward, not a random draw. 5 steps with a
    refresh every 2 (steps 0, 2, 4: three refreshes), the hybrid switching at step 3; fp32, no
    clipping; losses to rtol 1e-5 and the final params to 1e-4.

    ``momentum_projection=True``: without it, GaLore keeps the first moment in the old basis's
    coordinates, so the update after a refresh depends on the sign the decomposition gives each
    basis vector, and rounding-level differences in the gradient can flip one (seen here: the
    8th vector of a q_proj at the second refresh; the losses still agree to 1e-5, the params to
    ~20% of that leaf's update). Carrying the moment into the new basis makes the update
    independent of those signs, so the params can be compared tightly.
    """
    config = tiny_config(tmp_path, **LAYERWISE)
    config.optimizer.name, config.optimizer.inner = name, inner
    config.optimizer.momentum_projection = True
    trainer = main_lib.build_trainer(config, sharding_lib.make_mesh(config.mesh))
    reference = _reference_step(trainer)
    state = trainer.init(jax.random.key(0))
    expected = jax.tree_util.tree_map(jnp.copy, state)  # the fused step donates its input
    losses, reference_losses = [], []
    for batch in _batches(config, 5):
        batch = main_lib.to_global(batch, trainer.batch_sharding)
        state, metrics = trainer.train_step(state, batch)
        expected, loss = reference(expected, batch)
        assert bool(metrics["finite"]) and metrics["leaf_finite"].shape == (12,)
        losses.append(float(metrics["loss"]))
        reference_losses.append(float(loss))
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
    assert losses[-1] < losses[0]  # it trains
    for got, want in zip(
        jax.tree_util.tree_leaves(state.params),
        jax.tree_util.tree_leaves(expected.params),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
