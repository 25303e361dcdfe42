"""Tests for golore_jax/aliases.py and memory.py, and scale_by_subspace inside optax wrappers."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import golore_jax as gl
from golore_jax import projectors

SHAPES = {"a": (4, 6), "b": (6, 4), "c": (5,)}


def _tree(seed, shapes=SHAPES, scale=1.0):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(scale * rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}


# --------------------------------------------------------------------------------------------
# 5. the paper's MSGD with momentum projection equals galore_sgd(paper_msgd_hyperparams(...))
# --------------------------------------------------------------------------------------------


def _paper_msgd(x0, noises, lr, b1, alpha, rank, tau, curvature):
    """Algorithm 1 + equation (2) in float64, gradient G = noise_t + curvature * X."""
    x = {k: np.asarray(v, np.float64) for k, v in x0.items()}
    p = {k: None for k in x}
    m = {k: None for k in x}
    for t, noise in enumerate(noises):
        for k in x:
            g = np.asarray(noise[k], np.float64) + curvature * x[k]
            left = g.shape[0] <= g.shape[1]
            if t % tau == 0:
                u, _, vt = np.linalg.svd(g, full_matrices=False)
                new = u[:, :rank] if left else vt[:rank].T
                old = np.zeros_like(new) if p[k] is None else p[k]
                mom = np.zeros((rank, g.shape[1]) if left else (g.shape[0], rank))
                mom = mom if m[k] is None else m[k]
                # M = (1 - b1) P^T P_old M  (left)  /  (1 - b1) M Q_old^T Q  (right)
                m[k] = (new.T @ old @ mom) if left else (mom @ old.T @ new)
                p[k] = new
            r = p[k].T @ g if left else g @ p[k]
            m[k] = (1 - b1) * m[k] + b1 * r
            x[k] = x[k] - lr * alpha * (p[k] @ m[k] if left else m[k] @ p[k].T)
    return x


def test_paper_msgd_equals_galore_sgd_with_mapped_hyperparams():
    """M = (1-b1) M + b1 R, X -= lr*alpha*P M with MP equals galore_sgd(paper_msgd_hyperparams)."""
    lr, b1, alpha, rank, tau, steps, curvature = 0.1, 0.3, 0.5, 2, 3, 8, 0.5
    shapes = {"L": (4, 8), "R": (8, 4)}
    x0 = _tree(0, shapes)
    rng = np.random.default_rng(1)
    noises = [{k: rng.standard_normal(s) for k, s in shapes.items()} for _ in range(steps)]
    opt = gl.galore_sgd(
        **gl.paper_msgd_hyperparams(lr, b1),
        rank=rank,
        update_every=tau,
        scale=alpha,
        mask={"L": True, "R": True},
    )

    @jax.jit
    def step(x, state, noise):
        g = jax.tree.map(lambda n, w: n + curvature * w, noise, x)
        u, state = opt.update(g, state, x)
        return optax.apply_updates(x, u), state

    x, state = x0, opt.init(x0)
    for noise in noises:
        x, state = step(x, state, jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), noise))
    want = _paper_msgd(x0, noises, lr, b1, alpha, rank, tau, curvature)
    for k in shapes:
        assert np.abs(want[k] - np.asarray(x0[k])).max() > 0.1  # it did move
        np.testing.assert_allclose(x[k], want[k], atol=1e-4, rtol=1e-4)


def test_paper_msgd_hyperparams_mapping_and_errors():
    """(lr, b1) -> learning_rate = lr*b1, momentum = 1-b1; b1 outside (0, 1] is refused."""
    assert gl.paper_msgd_hyperparams(0.1, 0.25) == {"learning_rate": 0.025, "momentum": 0.75}
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="beta1"):
            gl.paper_msgd_hyperparams(0.1, bad)


# --------------------------------------------------------------------------------------------
# golore_fraction / hybrid placement
# --------------------------------------------------------------------------------------------


def test_golore_projector_placement_and_errors():
    """golore_fraction=1: random; 0.2 of 1000 steps: hybrid switching at 800; bad values raise."""
    assert isinstance(gl.golore_projector(1.0, None), projectors.RandomProjector)
    hyb = gl.golore_projector(0.2, 1000)
    assert isinstance(hyb, projectors.HybridProjector) and hyb.switch_step == 800
    assert isinstance(hyb.before, projectors.SVDProjector)
    for frac in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="golore_fraction must be in"):
            gl.golore_adamw(1e-3, golore_fraction=frac, total_steps=100)
    for total in (None, 0):
        with pytest.raises(ValueError, match="needs total_steps"):
            gl.golore_sgd(1e-3, golore_fraction=0.5, total_steps=total)


# --------------------------------------------------------------------------------------------
# 6. optimizer-state memory on a LLaMA-shaped tree
# --------------------------------------------------------------------------------------------

H, I, V, LAYERS, RANK = 64, 172, 320, 2, 16


def _llama_shapes():
    layer = {
        "attn": {n: jax.ShapeDtypeStruct((H, H), jnp.float32) for n in ("q", "k", "v", "o")},
        "mlp": {
            "gate": jax.ShapeDtypeStruct((H, I), jnp.float32),
            "up": jax.ShapeDtypeStruct((H, I), jnp.float32),
            "down": jax.ShapeDtypeStruct((I, H), jnp.float32),
        },
        "input_norm": jax.ShapeDtypeStruct((H,), jnp.float32),
        "post_norm": jax.ShapeDtypeStruct((H,), jnp.float32),
    }
    return {
        "embed": jax.ShapeDtypeStruct((V, H), jnp.float32),
        **{f"layers_{i}": layer for i in range(LAYERS)},
        "final_norm": jax.ShapeDtypeStruct((H,), jnp.float32),
        "lm_head": jax.ShapeDtypeStruct((H, V), jnp.float32),
    }


def test_state_floats_llama_closed_form():
    """Measured state floats == subspace_state_floats == hand closed form; < AdamW's 2x params."""
    params = _llama_shapes()
    r = RANK
    attn = 4 * (H * r + 2 * r * H)  # square: left, basis H x r, moments r x H
    gate_up = 2 * (H * r + 2 * r * I)  # (H, I), H < I: left, moments r x I
    down = H * r + 2 * I * r  # (I, H): right, basis H x r, moments I x r
    norms = 2 * 2 * H
    closed = LAYERS * (attn + gate_up + down + norms) + 2 * V * H + 2 * H * V + 2 * H
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))

    state = jax.eval_shape(gl.galore_adamw(1e-3, rank=r, update_every=10).init, params)
    assert gl.optimizer_state_floats(state) == closed
    assert gl.subspace_state_floats(params, rank=r) == closed
    sgd_state = jax.eval_shape(gl.galore_sgd(1e-3, rank=r, update_every=10).init, params)
    assert gl.optimizer_state_floats(sgd_state) == gl.subspace_state_floats(
        params, rank=r, moments=1
    )
    adamw_floats = gl.optimizer_state_floats(jax.eval_shape(optax.adamw(1e-3).init, params))
    assert adamw_floats == 2 * n_params
    assert closed < adamw_floats


# --------------------------------------------------------------------------------------------
# 12. wrappers: chain, inject_hyperparams, MultiSteps, apply_if_finite, masked; jit, pytrees,
# orbax
# --------------------------------------------------------------------------------------------


def _galore(**kw):
    defaults = dict(rank=2, update_every=2, weight_decay=0.0)
    return gl.galore_adamw(1e-2, **{**defaults, **kw})


class WrapperTest(chex.TestCase):
    def test_inside_chain(self):
        """chain(clip (inactive), scale_by_subspace, scale(-lr)) = -lr * scale_by_subspace."""
        sub = gl.scale_by_subspace(optax.scale_by_adam(), rank=2, update_every=2)
        chained = optax.chain(optax.clip_by_global_norm(1e6), sub, optax.scale(-0.1))
        params, g = _tree(0), _tree(1)
        u1, _ = jax.jit(chained.update)(g, chained.init(params), params)
        u2, _ = jax.jit(sub.update)(g, sub.init(params), params)
        chex.assert_trees_all_close(u1, jax.tree.map(lambda x: -0.1 * x, u2), atol=1e-6)

    def test_multisteps_equals_one_step_on_mean_gradient(self):
        """MultiSteps(k=2): the 2nd mini-step applies one galore step on the mean gradient."""
        opt = _galore()
        multi = optax.MultiSteps(opt, every_k_schedule=2)
        params, g1, g2 = _tree(0), _tree(1), _tree(2)
        update = jax.jit(multi.update)
        state = multi.init(params)
        u1, state = update(g1, state, params)
        chex.assert_trees_all_close(u1, jax.tree.map(jnp.zeros_like, u1))
        u2, state = update(g2, state, params)
        mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
        want, _ = jax.jit(opt.update)(mean, opt.init(params), params)
        chex.assert_trees_all_close(u2, want, atol=1e-6)

    def test_apply_if_finite_skips_nan_and_keeps_state(self):
        """apply_if_finite: a NaN gradient gives a zero update and leaves the inner state as is."""
        opt = optax.apply_if_finite(_galore(), max_consecutive_errors=3)
        params = _tree(0)
        update = jax.jit(opt.update)
        _, state = update(_tree(1), opt.init(params), params)
        bad = {**_tree(2), "a": jnp.full(SHAPES["a"], jnp.nan)}
        u, new_state = update(bad, state, params)
        chex.assert_trees_all_close(u, jax.tree.map(jnp.zeros_like, u))
        assert int(new_state.notfinite_count) == 1
        chex.assert_trees_all_equal(new_state.inner_state, state.inner_state)

    def test_masked(self):
        """optax.masked: selected leaves get the subspace update, others pass through."""
        sub = gl.scale_by_subspace(optax.scale_by_adam(), rank=2, update_every=2)
        masked = optax.masked(sub, {"a": True, "b": False, "c": True})
        params, g = _tree(0), _tree(1)
        u, _ = jax.jit(masked.update)(g, masked.init(params), params)
        sub_params = {"a": params["a"], "c": params["c"]}
        want, _ = sub.update({"a": g["a"], "c": g["c"]}, sub.init(sub_params), sub_params)
        chex.assert_trees_all_close(u["a"], want["a"], atol=1e-6)
        chex.assert_trees_all_close(u["c"], want["c"], atol=1e-6)
        chex.assert_trees_all_equal(u["b"], g["b"])

    @parameterized.parameters(
        (("rank", "update_every", "projector"),),
        (("rank", "update_every", "projector", "seed"),),
    )
    def test_inject_hyperparams_learning_rate(self, static_args):
        """inject_hyperparams(galore_adamw) works under jit; doubling the lr doubles the step."""
        opt = optax.inject_hyperparams(gl.galore_adamw, static_args=static_args)(
            learning_rate=1e-2, rank=2, update_every=2, projector=projectors.svd()
        )
        params, g = _tree(0), _tree(1)
        state = opt.init(params)
        update = jax.jit(opt.update)
        u1, _ = update(g, state, params)
        state.hyperparams["learning_rate"] = jnp.asarray(2e-2)
        u2, _ = update(g, state, params)
        chex.assert_trees_all_close(u2, jax.tree.map(lambda x: 2 * x, u1), rtol=1e-5)
        assert float(jnp.abs(u1["a"]).max()) > 0


def test_state_pytree_round_trip_and_jit():
    """The state flattens/unflattens to itself and passes through jit as an argument/result."""
    opt = _galore(projector=projectors.random())
    params = _tree(0)
    _, state = jax.jit(opt.update)(_tree(1), opt.init(params), params)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    assert jax.tree_util.tree_structure(again) == treedef
    chex.assert_trees_all_equal(jax.jit(lambda s: s)(again), state)


def test_orbax_save_restore_with_typed_key(tmp_path):
    """StandardCheckpointer round-trips the state (typed PRNG key included); training resumes
    identically from the restored state."""
    ocp = pytest.importorskip("orbax.checkpoint")
    opt = _galore(projector=projectors.random())
    params = _tree(0)
    update = jax.jit(opt.update)
    _, state = update(_tree(1), opt.init(params), params)
    path = tmp_path / "state"
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, state)
        ckpt.wait_until_finished()
        restored = ckpt.restore(path, state)
    sub, sub_restored = state[0], restored[0]
    assert jax.dtypes.issubdtype(sub_restored.key.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(
        jax.random.key_data(sub_restored.key), jax.random.key_data(sub.key)
    )
    chex.assert_trees_all_equal(sub_restored.bases, sub.bases)
    chex.assert_trees_all_equal(sub_restored.inner_state, sub.inner_state)
    # Two more steps (step 2 is a random refresh, drawn from the key) agree from both states.
    outs = []
    for s in (state, restored):
        for t in (2, 3):
            u, s = update(_tree(t), s, params)
        outs.append((u, s[0].bases))
    chex.assert_trees_all_equal(outs[0], outs[1])
