"""Tests for golore_jax/_aliases.py and _memory.py, and scale_by_subspace inside optax wrappers."""

from __future__ import annotations

import importlib
import inspect
import math
import pathlib
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import golore_jax as gl
from golore_jax import _moved, projectors

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
        subspace=gl.Subspace(rank=rank, update_every=tau, scale=alpha, mask={"L": True, "R": True}),
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
            gl.golore_projector(frac, 100)
    for total in (None, 0):
        with pytest.raises(ValueError, match="needs total_steps"):
            gl.golore_projector(0.5, total)
    with pytest.raises(ValueError, match=r"Subspace\.projector must be None"):
        gl.golore_adamw(1e-3, subspace=gl.Subspace(projector=hyb))


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

    sub = gl.Subspace(rank=r, update_every=10)
    state = jax.eval_shape(gl.galore_adamw(1e-3, subspace=sub).init, params)
    assert gl.optimizer_state_floats(state) == closed
    assert gl.subspace_state_floats(params, rank=r) == closed
    sgd_state = jax.eval_shape(gl.galore_sgd(1e-3, subspace=sub).init, params)
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


def _galore(**subspace):
    sub = gl.Subspace(**{"rank": 2, "update_every": 2, **subspace})
    return gl.galore_adamw(1e-2, subspace=sub, weight_decay=0.0)


class WrapperTest(chex.TestCase):
    def test_inside_chain(self):
        """chain(clip (inactive), scale_by_galore, scale(-lr)) = -lr * scale_by_galore."""
        sub = gl.scale_by_galore(optax.scale_by_adam(), gl.Subspace(rank=2, update_every=2))
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
        sub = gl.scale_by_galore(optax.scale_by_adam(), gl.Subspace(rank=2, update_every=2))
        masked = optax.masked(sub, {"a": True, "b": False, "c": True})
        params, g = _tree(0), _tree(1)
        u, _ = jax.jit(masked.update)(g, masked.init(params), params)
        sub_params = {"a": params["a"], "c": params["c"]}
        want, _ = sub.update({"a": g["a"], "c": g["c"]}, sub.init(sub_params), sub_params)
        chex.assert_trees_all_close(u["a"], want["a"], atol=1e-6)
        chex.assert_trees_all_close(u["c"], want["c"], atol=1e-6)
        chex.assert_trees_all_equal(u["b"], g["b"])

    def test_inject_hyperparams_learning_rate(self):
        """inject_hyperparams(galore_adamw) works under jit with no static_args (the Subspace
        group is static); doubling the lr doubles the step."""
        sub = gl.Subspace(rank=2, update_every=2, projector=projectors.svd(), seed=3)
        opt = optax.inject_hyperparams(gl.galore_adamw)(learning_rate=1e-2, subspace=sub)
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


# --------------------------------------------------------------------------------------------
# The public surface: option groups, one optimizer per family over any optax inner, the 0.1
# spellings kept one release behind a DeprecationWarning
# --------------------------------------------------------------------------------------------

MAX_PARAMETERS = 12  # issue 30: no public signature lists more


def _public_callables():
    """Every public callable: the package's names and the functions of its two namespaces."""
    for name in gl.__all__:
        obj = getattr(gl, name)
        if inspect.ismodule(obj):
            for attr, fn in vars(obj).items():
                if (
                    inspect.isfunction(fn)
                    and not attr.startswith("_")
                    and fn.__module__ == obj.__name__
                ):
                    yield f"{name}.{attr}", fn
        elif callable(obj):
            yield name, obj


def test_no_public_signature_lists_more_than_twelve_parameters():
    sizes = {name: len(inspect.signature(fn).parameters) for name, fn in _public_callables()}
    assert sizes["galore_adamw"] <= MAX_PARAMETERS  # was 24 in 0.1
    assert {n: k for n, k in sizes.items() if k > MAX_PARAMETERS} == {}


def _steps(tx, steps=3):
    """Updates of ``steps`` eager steps on fixed gradients (step 2 refreshes: update_every=2)."""
    params = _tree(0)
    state, outs = tx.init(params), []
    for t in range(steps):
        u, state = tx.update(_tree(10 + t), state, params)
        outs.append(u)
    return outs


_SUB = dict(rank=2, update_every=2)
# (old 0.1 call, the replacement the warning names, its new spelling)
DEPRECATED = {
    "galore_adamw": (
        lambda: gl.galore_adamw(
            0.1,
            rank=2,
            update_every=2,
            scale=0.5,
            mask={"a": True, "b": True, "c": False},
            momentum_projection=True,
            second_moment="project",
            side="left",
            seed=1,
            refresh_batch_size=1,
            projection_dtype=jnp.bfloat16,
            b1=0.8,
        ),
        r"galore_adamw\(\.\.\., subspace=golore_jax\.Subspace\(rank=2, .*execution=",
        lambda: gl.galore_adamw(
            0.1,
            subspace=gl.Subspace(
                rank=2,
                update_every=2,
                scale=0.5,
                mask={"a": True, "b": True, "c": False},
                momentum_projection=True,
                second_moment="project",
                side="left",
                seed=1,
            ),
            execution=gl.Execution(refresh_batch_size=1, projection_dtype=jnp.bfloat16),
            b1=0.8,
        ),
    ),
    "galore_adamw-8bit": (
        lambda: gl.galore_adamw(0.1, **_SUB, quantized_moments=True, b2=0.9),
        r"galore_adamw\(\.\.\., subspace=",
        lambda: gl.galore(
            0.1, gl.scale_by_adam_8bit(b2=0.9), gl.Subspace(**_SUB), weight_decay=1e-4
        ),
    ),
    "golore_adamw": (
        lambda: gl.golore_adamw(0.1, **_SUB),
        r"golore_adamw\(\.\.\., subspace=golore_jax\.Subspace\(rank=2, update_every=2\)\)",
        lambda: gl.golore_adamw(0.1, subspace=gl.Subspace(**_SUB)),
    ),
    "golore_sgd-hybrid": (
        lambda: gl.golore_sgd(0.1, **_SUB, golore_fraction=0.5, total_steps=4),
        r"galore_sgd\(\.\.\., subspace=golore_jax\.Subspace\(.*projector=HybridProjector",
        lambda: gl.galore_sgd(
            0.1, subspace=gl.Subspace(**_SUB, projector=gl.golore_projector(0.5, 4))
        ),
    ),
    "gasare_adamw": (
        lambda: gl.gasare_adamw(0.1, k=5, update_every=2),
        r"gasare_adamw\(\.\.\., sparse=golore_jax\.Sparse\(k=5, update_every=2\)\)",
        lambda: gl.gasare_adamw(0.1, sparse=gl.Sparse(k=5, update_every=2)),
    ),
    "gosare_sgd": (
        lambda: gl.gosare_sgd(0.1, density=0.3, update_every=2, momentum=0.5),
        r"gosare_sgd\(\.\.\., sparse=golore_jax\.Sparse\(density=0\.3, update_every=2\)\)",
        lambda: gl.gosare_sgd(0.1, sparse=gl.Sparse(density=0.3, update_every=2), momentum=0.5),
    ),
    "osd_sgd": (
        lambda: gl.osd_sgd(0.1, rank=2, orthonormalize_every=2),
        r"osd_sgd\(\.\.\., online=golore_jax\.Online\(rank=2, orthonormalize_every=2\)\)",
        lambda: gl.osd_sgd(0.1, online=gl.Online(rank=2, orthonormalize_every=2)),
    ),
    # package-level 0.1 names (their own defaults: scale 1.0, no learning rate)
    "scale_by_subspace": (
        lambda: gl.scale_by_subspace(optax.scale_by_adam(), rank=2, update_every=2),
        r"golore_jax\.scale_by_subspace is deprecated .* use golore_jax\.scale_by_galore",
        lambda: gl.scale_by_galore(optax.scale_by_adam(), gl.Subspace(**_SUB, scale=1.0)),
    ),
    "scale_by_sparse_subspace": (
        lambda: gl.scale_by_sparse_subspace(optax.identity(), k=3, update_every=2),
        r"use golore_jax\.scale_by_gasare",
        lambda: gl.scale_by_gasare(optax.identity(), gl.Sparse(k=3, update_every=2, scale=1.0)),
    ),
    "scale_by_online_subspace": (
        lambda: gl.scale_by_online_subspace(optax.identity(), rank=2),
        r"use golore_jax\.scale_by_osd",
        lambda: gl.scale_by_osd(optax.identity(), gl.Online(rank=2, scale=1.0)),
    ),
}


@pytest.mark.parametrize("case", sorted(DEPRECATED))
def test_deprecated_spelling_warns_and_gives_identical_updates(case):
    """Each 0.1 spelling warns once (DeprecationWarning naming its replacement) and builds the
    same optimizer: three steps (one refresh after the first) give bit-identical updates."""
    old, replacement, new = DEPRECATED[case]
    with pytest.warns(DeprecationWarning, match=replacement):
        old_tx = old()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the new spelling does not warn
        new_tx = new()
    chex.assert_trees_all_equal(_steps(old_tx), _steps(new_tx))


def test_deprecated_spelling_errors():
    """Unknown keywords stay TypeErrors; old keywords beside their new group are refused."""
    with pytest.raises(TypeError, match="unexpected keyword argument 'rnak'"):
        gl.galore_adamw(0.1, rnak=2)
    with pytest.raises(TypeError, match="not both"):
        gl.galore_adamw(0.1, rank=2, subspace=gl.Subspace())
    with pytest.raises(TypeError, match=r"golore_jax\.Sparse"):
        gl.gasare(0.1, None, gl.Subspace())


def test_complete_optimizer_inside_scale_by_galore_is_galore_adamw():
    """``scale_by_galore(optax.adam(lr))`` is GaLore-Adam without decay: equal to
    ``galore_adamw(lr, weight_decay=0)`` up to where ``-lr`` is applied (before or after the
    back-projection and ``scale``): two fp32 roundings apart, rtol 1e-6 (~8 ulps)."""
    sub = gl.Subspace(**_SUB)
    inside = gl.scale_by_galore(optax.adam(0.1), sub)
    dropin = gl.galore_adamw(0.1, subspace=sub, weight_decay=0.0)
    chex.assert_trees_all_close(_steps(inside), _steps(dropin), rtol=1e-6, atol=1e-9)


def test_galore_with_lion_inside_is_the_projected_sign_step():
    """``galore(lr, scale_by_lion())``: Lion's first step is ``sign(R)`` of the projected
    gradient ``R = P^T G`` (its moment starts at 0), so the update of a projected leaf is
    exactly ``-lr * scale * P sign(P^T G)``; unprojected leaves get ``-lr * sign(g)``."""
    params, g = _tree(0), _tree(1)
    sub = gl.Subspace(rank=2, update_every=2, scale=0.5, mask={"a": True, "b": False, "c": False})
    tx = gl.galore(0.1, optax.scale_by_lion(), sub)
    u, state = tx.update(g, tx.init(params), params)
    p = state[0].bases["a"]  # a is 4 x 6: left side, P is 4 x 2
    want = -0.1 * 0.5 * p @ jnp.sign(p.T @ g["a"])
    np.testing.assert_allclose(u["a"], want, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(u["b"], -0.1 * jnp.sign(g["b"]))


def test_state_to_numpy_through_key_data():
    """The GaLore state holds a typed PRNG key, so ``np.asarray`` over its leaves raises (as the
    README and the state's docstring say); with keys taken as ``jax.random.key_data`` every leaf
    converts, and ``jax.random.wrap_key_data`` restores a state that steps identically."""
    tx = _galore(projector=projectors.random())
    params = _tree(0)
    _, state = tx.update(_tree(1), tx.init(params), params)
    with pytest.raises(TypeError, match=r"PRNGKey|key"):
        [np.asarray(x) for x in jax.tree.leaves(state)]

    def is_key(x):
        return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)

    host = jax.tree.map(lambda x: np.asarray(jax.random.key_data(x) if is_key(x) else x), state)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(host))
    restored = jax.tree.map(
        lambda saved, like: jax.random.wrap_key_data(saved) if is_key(like) else jnp.asarray(saved),
        host,
        state,
    )
    want, _ = tx.update(_tree(2), state, params)  # step 2: a random refresh from the key
    got, _ = tx.update(_tree(2), restored, params)
    chex.assert_trees_all_equal(got, want)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: gl.Subspace(rank=0), "golore_jax.Subspace: rank must be a positive int"),
        (lambda: gl.Subspace(update_every=0), "golore_jax.Subspace: update_every must be"),
        (lambda: gl.Subspace(scale=float("nan")), "golore_jax.Subspace: scale must be finite"),
        (lambda: gl.Subspace(second_moment="drop"), "golore_jax.Subspace: second_moment must"),
        (lambda: gl.Subspace(momentum_projection=1), "golore_jax.Subspace: momentum_projection"),
        (lambda: gl.Execution(refresh_batch_size=0), "golore_jax.Execution: refresh_batch_size"),
        (lambda: gl.Sparse(k=3, density=0.5), "golore_jax.Sparse: give k or density, not both"),
        (lambda: gl.Sparse(density=1.5), r"golore_jax.Sparse: density must be in \(0, 1\)"),
        (lambda: gl.Sparse(selector="top"), "golore_jax.Sparse: selector must be one of"),
        (lambda: gl.Online(orthonormalize_every=0), "golore_jax.Online: orthonormalize_every"),
    ],
)
def test_option_groups_name_the_bad_field(build, message):
    """A bad option is a one-line error at construction naming the group and the field."""
    with pytest.raises(ValueError, match=message) as info:
        build()
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------
# The surface: public names listed once; the implementation modules private, their 0.1 paths
# kept one release behind a DeprecationWarning
# --------------------------------------------------------------------------------------------

NAMESPACES = {"projectors", "layerwise", "partitioning"}


def test_public_names_are_listed_once_and_resolve():
    assert len(set(gl.__all__)) == len(gl.__all__)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # no public name is a deprecated one
        modules = {n for n in gl.__all__ if inspect.ismodule(getattr(gl, n))}
    assert modules == NAMESPACES
    assert set(gl.__all__) <= set(dir(gl))
    assert not set(_moved.MODULES) & set(dir(gl)), "an old module path is advertised"


def test_every_library_module_is_a_namespace_or_private():
    files = pathlib.Path(gl.__file__).parent.glob("*.py")
    public = {f.stem for f in files if not f.stem.startswith("_")}
    assert public == NAMESPACES


def _a_name_of(module):
    """A public name the module defines itself (not an import)."""
    return next(
        name
        for name, value in sorted(vars(module).items())
        if not name.startswith("_")
        and getattr(value, "__module__", module.__name__) == module.__name__
        and not inspect.ismodule(value)
    )


@pytest.mark.parametrize("old", _moved.MODULES)
def test_old_module_path_warns_on_use_and_forwards(old):
    """``golore_jax.<old>`` imports without a warning; reading a name from it warns (pointing
    at the reading line) and gives the private module's own object."""
    new = importlib.import_module(f"golore_jax._{old}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        module = importlib.import_module(f"golore_jax.{old}")
    name = _a_name_of(new)
    with pytest.warns(DeprecationWarning, match=rf"^golore_jax\.{old} is deprecated") as record:
        value = getattr(module, name)
    assert value is getattr(new, name)
    assert [w.filename for w in record] == [__file__]
    with pytest.raises(AttributeError, match="no_such_name"):
        module.no_such_name  # noqa: B018


def test_old_module_path_spellings_and_their_advice():
    """The three spellings of 0.1 keep working; the warning names the public spelling, the
    replacement of a 0.1 name, or the private module."""
    import golore_jax.layout
    import golore_jax.subspace

    with pytest.warns(DeprecationWarning, match=r"use golore_jax\.LazyRefresh$") as record:
        from golore_jax.subspace import LazyRefresh
    assert LazyRefresh is gl.LazyRefresh and record[0].filename == __file__
    with pytest.warns(DeprecationWarning, match=r"use golore_jax\.make_layout$"):
        assert golore_jax.layout.make_layout is gl.make_layout
    with pytest.warns(DeprecationWarning, match=r"use golore_jax\.scale_by_galore\(inner"):
        old = golore_jax.subspace.scale_by_subspace
    assert old is importlib.import_module("golore_jax._subspace").scale_by_subspace
    with pytest.warns(DeprecationWarning, match=r"not public API; .* golore_jax\._planning"):
        from golore_jax.planning import low_rank_like  # noqa: F401
    namespace = {}
    with pytest.warns(DeprecationWarning) as record:  # one warning per name imported
        exec("from golore_jax.aliases import *", namespace)
    assert "use golore_jax.galore" in {str(w.message).split(": ", 1)[1] for w in record}
    assert namespace["galore"] is gl.galore and "warnings" not in namespace
