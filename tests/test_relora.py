"""ReLoRA-like path (train/relora.py): same trajectory as the plain transform, cheaper backward."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import numerics
from tests.jaxpr_walk import iter_equations
from tests.train_fixtures import tiny_config
from train import main as main_lib
from train import relora as relora_lib
from train import sharding as sharding_lib


def _config(tmp_path, **overrides):
    base = {
        "optimizer.grad_clip": 0.0,
        "optimizer.weight_decay": 0.0,
        "optimizer.subspace.update_every": 3,
        "optimizer.subspace.golore_fraction": 0.5,
        "num_steps": 8,
    }
    return tiny_config(tmp_path, **{**base, **overrides})


def _batches(config, n):
    rng = np.random.default_rng(0)
    shape = (config.batch_size, config.seq_len)
    return [
        {
            "inputs": rng.integers(0, config.model.vocab_size, shape, dtype=np.int32),
            "targets": rng.integers(0, config.model.vocab_size, shape, dtype=np.int32),
        }
        for _ in range(n)
    ]


_KERNEL_GRADS = {}


def _kernel_grads(model):
    """The jitted gradients of the attention and MLP kernels (the projected matrices), compiled
    once per model for this module's tests."""
    if repr(model) not in _KERNEL_GRADS:

        @jax.jit
        def kernel_grads(params, batch):
            def loss_fn(params):
                logits = model.apply({"params": params}, batch["inputs"])
                return main_lib.cross_entropy(logits, batch["targets"])

            grads = jax.grad(loss_fn)(params)["model"]
            return [
                g
                for p, g in jax.tree_util.tree_leaves_with_path(grads)
                if jax.tree_util.keystr(p).endswith("['kernel']")
            ]

        _KERNEL_GRADS[repr(model)] = kernel_grads
    return _KERNEL_GRADS[repr(model)]


def _run(config, batches, gaps_rank=None):
    """Train on ``batches``; returns the trainer, the initial params, the final state, the
    losses and, with ``gaps_rank``, the smallest relative gap among the top ``gaps_rank + 1``
    singular values of the projected kernels' gradients at the refresh steps."""
    mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:1])
    trainer = main_lib.build_trainer(config, mesh)
    state = trainer.init(jax.random.key(config.seed))
    start = jax.tree_util.tree_map(np.asarray, state.params)

    losses, gaps = [], []
    for step, batch in enumerate(batches):
        if gaps_rank is not None and step % config.optimizer.subspace.update_every == 0:
            grads = _kernel_grads(trainer.model)(state.params, batch)
            gaps.append(numerics.min_relative_gap(grads, gaps_rank))
        state, metrics = trainer.train_step(
            state, main_lib.to_global(batch, trainer.batch_sharding)
        )
        losses.append(float(metrics["loss"]))
    return trainer, start, state, losses, gaps


@pytest.mark.parametrize(
    "name, inner",
    [
        # .ci/run reruns these two under a second XLA configuration: GaLore's SVD with Adam's
        # elementwise update (the most sensitive to a basis rotation) and the largest carried
        # rounding measured (GoLore, MSGD).
        pytest.param("galore", "adamw", marks=pytest.mark.numerics),
        ("galore", "msgd"),
        ("hybrid", "adamw"),
        pytest.param("golore", "msgd", marks=pytest.mark.numerics),
    ],
)
def test_same_trajectory_as_the_plain_transform(tmp_path, name, inner):
    """8 steps with refreshes at 0, 3, 6 (and the hybrid's switch at step 4): the weights
    W0 + P A equal the plain path's weights and the losses agree, to the error model of
    tests/numerics.py.

    The two paths sum each gradient in another order (relative ``GRAD_RTOL = 1e-6``; carried
    through the 8 steps, ``CARRIED_RTOL = 1e-3``); each refresh (at most 3) adds a basis
    rotation of ``GRAD_RTOL / gap``, ``gap`` the smallest relative gap among the top
    ``r + 1`` singular values of a projected kernel's gradient (measured on the plain path's
    gradients at the refreshes: 5e-4 to 4e-3 on these random tokens). Each leaf's total
    update is compared by RMS, relative to that update (or the model's RMS update, for a leaf
    whose gradient is cancellation-small), not elementwise: the embedding and lm_head rows of
    rare tokens get near-zero gradients, whose round-off Adam's m / sqrt(v) turns into
    changes of up to 8e-5 (lr 1e-2). Losses: the updates' relative error times what the
    updates moved the loss, plus fp32 rounding (1e-6).
    """
    overrides = {
        "optimizer.name": name,
        "optimizer.inner.name": inner,
        # The default gram_eigh (an eigh of G G^T): jaxlib's CPU SVD of the same matrices
        # takes ~0.1 s each (1.4 s a refresh of this model) against 0.3 ms.
        "optimizer.subspace.projector": "gram_eigh",
    }
    config = _config(tmp_path, **overrides)
    rank = config.optimizer.subspace.rank
    batches = _batches(config, config.num_steps)
    _, start, plain, plain_losses, gaps = _run(config, batches, gaps_rank=rank)
    relora_config = _config(tmp_path, **overrides, **{"step.relora": True})
    trainer, relora_start, relora, relora_losses, _ = _run(relora_config, batches)

    jax.tree_util.tree_map(np.testing.assert_array_equal, relora_start, start)  # same W0
    gap = min(gaps)
    assert gap >= 1e-4, gap  # the model's premise: no (near-)degenerate top-r spectrum
    rtol = numerics.update_rtol(None if name == "golore" else gap, refreshes=3)
    plain_losses = np.asarray(plain_losses)
    loss_atol = 1e-6 * plain_losses + rtol * np.abs(plain_losses[0] - plain_losses)
    np.testing.assert_array_less(np.abs(np.asarray(relora_losses) - plain_losses), loss_atol)
    numerics.assert_updates_close(trainer.weights(relora), plain.params, start, rtol)
    # The run really went through the low-rank path: A moved since the last refresh (step 6),
    # and W0 differs from the weights.
    coefs = [a for a in jax.tree_util.tree_leaves(relora.adapters)]
    assert coefs and all(float(jnp.abs(a).max()) > 0 for a in coefs)
    moved = jax.tree_util.tree_map(
        lambda w, w0: float(jnp.abs(w - w0).max()), trainer.weights(relora), relora.params
    )
    assert max(jax.tree_util.tree_leaves(moved)) > 1e-5


def test_low_rank_step_never_forms_a_full_kernel_gradient(tmp_path):
    """Between refreshes no matmul outputs a projected kernel's (in, out) shape (that would be
    x^T dy, the full gradient), while the refresh step does; and the low-rank step compiles to
    fewer FLOPs (Table 1: 4bmn + O(r) instead of 6bmn for the dense layers)."""
    config = _config(tmp_path, **{"step.relora": True, "optimizer.name": "golore"})
    mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:1])
    trainer = main_lib.build_trainer(config, mesh)
    state = trainer.init(jax.random.key(0))
    layouts = relora_lib.layouts_of(state.params, config.optimizer.subspace.rank)
    kernel_shapes = {lay.shape for lay in layouts if lay is not None}
    other_shapes = {
        tuple(x.shape)
        for x, lay in zip(jax.tree_util.tree_leaves(state.params), layouts, strict=True)
        if lay is None
    }
    assert kernel_shapes and not kernel_shapes & other_shapes

    full_step, low_rank_step = relora_lib.make_steps(
        trainer.model.apply, main_lib.cross_entropy, trainer.tx, layouts
    )
    batch = _batches(config, 1)[0]
    low_rank_dots = _dot_output_shapes(jax.make_jaxpr(low_rank_step)(state, batch).jaxpr)
    full_dots = _dot_output_shapes(jax.make_jaxpr(full_step)(state, batch).jaxpr)
    assert kernel_shapes <= full_dots  # the check can see a full gradient when there is one
    assert low_rank_dots and not low_rank_dots & kernel_shapes, low_rank_dots & kernel_shapes

    def flops(fn):
        return jax.jit(fn).lower(state, batch).compile().cost_analysis()["flops"]

    assert flops(low_rank_step) < flops(full_step)


def _dot_output_shapes(jaxpr) -> set:
    """Output shapes of every dot_general, sub-jaxprs (cond, pjit, remat) included."""
    return {
        tuple(eqn.outvars[0].aval.shape)
        for eqn in iter_equations(jaxpr)
        if eqn.primitive.name == "dot_general"
    }


def test_resume_is_exact(tmp_path):
    """A ReLoRA-like run stopped at step 4 (A non-zero, mid-way between refreshes at 3 and 6)
    and resumed from its checkpoint gives the losses of the uninterrupted run; the held-out
    loss is computed on the merged weights W0 + P A."""
    overrides = {"step.relora": True, "num_steps": 7, "eval_every": 7}
    main_lib.train_and_evaluate(_config(tmp_path, **overrides), tmp_path / "full")
    first = main_lib.train_and_evaluate(
        _config(tmp_path, **overrides, run_steps=4), tmp_path / "split"
    )
    assert first["step"] == 4
    second = main_lib.train_and_evaluate(_config(tmp_path, **overrides), tmp_path / "split")
    assert second["step"] == 7

    def records(workdir):
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r.get("loss"), r.get("eval_loss")) for r in map(json.loads, lines)]

    assert records(tmp_path / "split") == records(tmp_path / "full")
