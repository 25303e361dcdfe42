"""GaSare / GoSare (scale_by_sparse_subspace): masks, uniformity, state size, Algorithm 5."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from golore_jax import _sparse as sparse


def _grad(rng, shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def test_topk_picks_exactly_the_k_largest():
    """GaSare's mask is the set of the k largest |G| (distinct magnitudes), on both leaves."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.zeros((6, 9)), "conv": jnp.zeros((2, 3, 4, 5)), "b": jnp.zeros(9)}
    grads = {k: _grad(rng, v.shape) for k, v in params.items()}
    tx = sparse.scale_by_sparse_subspace(optax.identity(), k=7, update_every=3)
    updates, state = jax.jit(tx.update)(grads, tx.init(params))
    for name in ("w", "conv"):
        flat = np.abs(np.asarray(grads[name]).ravel())
        expected = np.sort(np.argsort(-flat)[:7])
        np.testing.assert_array_equal(state.indices[name], expected)
        # The update is S * G (identity inner, scale 1): the kept entries, zero elsewhere.
        dense = np.zeros_like(flat)
        dense[expected] = np.asarray(grads[name]).ravel()[expected]
        np.testing.assert_array_equal(np.asarray(updates[name]).ravel(), dense)
    assert isinstance(state.indices["b"], optax.MaskedNode)  # 1-D: not in the default mask
    np.testing.assert_array_equal(updates["b"], grads["b"])


def test_random_k_is_uniform_over_subsets():
    """GoSare: every k-subset equally likely. N=6 positions, k=2: 15 subsets, 4000 vmapped
    draws (one seed each), chi-square goodness of fit against uniform, rejected at p < 1e-3;
    and per position the inclusion frequency is within 5 binomial standard errors of k/N."""
    draws, n, k = 4000, 6, 2
    params = {"w": jnp.zeros((2, 3))}
    grads = {"w": jnp.arange(6.0).reshape(2, 3)}  # Top-k would always pick {4, 5}

    def indices(key):
        tx = sparse.scale_by_sparse_subspace(
            optax.identity(), k=k, update_every=1, selector="random", seed=key
        )
        return tx.update(grads, tx.init(params))[1].indices["w"]

    idx = np.asarray(jax.jit(jax.vmap(indices))(jax.random.split(jax.random.key(0), draws)))
    assert np.all(idx[:, 0] < idx[:, 1])  # sorted and distinct
    subsets = list(itertools.combinations(range(n), k))
    counts = np.array([np.sum((idx[:, 0] == a) & (idx[:, 1] == b)) for a, b in subsets])
    assert counts.sum() == draws
    assert stats.chisquare(counts).pvalue > 1e-3, counts
    inclusion = np.bincount(idx.ravel(), minlength=n) / draws
    stderr = np.sqrt((k / n) * (1 - k / n) / draws)
    np.testing.assert_array_less(np.abs(inclusion - k / n), 5 * stderr)


def test_state_holds_k_values_and_k_indices():
    """Adam inside: per sparsified leaf k int32 indices and 2k floats (mu, nu); other leaves
    full-size moments; plus the int32 counts and the key. No m x n array anywhere."""
    params = {"w": jnp.zeros((64, 48)), "v": jnp.zeros((3, 4, 5)), "b": jnp.zeros(48)}
    tx = sparse.scale_by_sparse_subspace(optax.scale_by_adam(), density=0.1, update_every=10)
    state = tx.init(params)
    k_w, k_v = round(0.1 * 64 * 48), round(0.1 * 60)
    leaves = jax.tree.leaves(state)
    floats = sum(x.size for x in leaves if jnp.issubdtype(x.dtype, jnp.floating))
    ints = sum(x.size for x in leaves if jnp.issubdtype(x.dtype, jnp.integer))
    keys = [x for x in leaves if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]
    assert floats == 2 * (k_w + k_v) + 2 * 48
    assert ints == k_w + k_v + 2  # indices + the two counts (ours and Adam's)
    assert len(keys) == 1 and keys[0].size == 1
    assert state.indices["w"].shape == (k_w,) and state.indices["w"].dtype == jnp.int32
    assert max(x.size for x in leaves) == k_w


def _algorithm5(grads, masks, b1):
    """Algorithm 5's MSGD momentum, dense, in the paper's convention (b1 weights G)."""
    m = np.zeros_like(grads[0])
    out = []
    for g, s in zip(grads, masks, strict=True):
        m = s * ((1 - b1) * m) + b1 * s * g
        out.append(m.copy())
    return out


@pytest.mark.parametrize("selector", ["topk", "random"])
def test_masked_momentum_is_algorithm5(selector):
    """With optax.ema(1 - b1) (undebiased: the paper's M <- (1-b1) M + b1 R) as inner, the
    update equals Algorithm 5's M_t on hand-made gradients, masks changing every 2 steps; and
    optax.trace(1 - b1) gives M_t / b1 (the paper_msgd_hyperparams mapping)."""
    b1, steps, shape = 0.3, 7, (3, 4)
    rng = np.random.default_rng(1)
    grads = [rng.standard_normal(shape).astype(np.float32) for _ in range(steps)]
    params = {"x": jnp.zeros(shape)}
    outs = {}
    for name, inner in [("ema", optax.ema(1 - b1, debias=False)), ("trace", optax.trace(1 - b1))]:
        tx = sparse.scale_by_sparse_subspace(inner, k=5, update_every=2, selector=selector, seed=3)
        state, update = tx.init(params), jax.jit(tx.update)
        ups, masks = [], []
        for g in grads:
            u, state = update({"x": jnp.asarray(g)}, state)
            ups.append(np.asarray(u["x"]))
            mask = np.zeros(12, np.float32)
            mask[np.asarray(state.indices["x"])] = 1
            masks.append(mask.reshape(shape))
        outs[name] = (ups, masks)
    ups, masks = outs["ema"]
    assert all(np.array_equal(a, b) for a, b in zip(outs["trace"][1], masks, strict=True))
    for t in range(steps):
        if t % 2:  # the mask only changes at refreshes
            np.testing.assert_array_equal(masks[t], masks[t - 1])
        if selector == "topk" and t % 2 == 0:
            top = np.argsort(-np.abs(grads[t]).ravel())[:5]
            np.testing.assert_array_equal(np.flatnonzero(masks[t].ravel()), np.sort(top))
    assert any(not np.array_equal(masks[t], masks[t - 2]) for t in range(2, steps, 2))
    expected = _algorithm5(grads, masks, b1)
    for t in range(steps):
        np.testing.assert_allclose(ups[t], expected[t], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(outs["trace"][0][t], expected[t] / b1, rtol=1e-5, atol=1e-6)


def test_remap_values_by_hand():
    """Kept positions carry their value to their new slot; new positions start at 0."""
    old = jnp.array([1, 4, 7, 9])
    new = jnp.array([0, 4, 8, 9])
    values = jnp.array([10.0, 40.0, 70.0, 90.0])
    np.testing.assert_array_equal(sparse.remap_values(values, old, new), [0.0, 40.0, 0.0, 90.0])


def test_large_batch_grads_choose_the_mask_and_nonfinite_keeps_it():
    params = {"w": jnp.zeros((4, 5))}
    step = jnp.zeros((4, 5)).at[0, 0].set(1.0)
    chooser = jnp.zeros((4, 5)).at[3, 4].set(1.0).at[2, 2].set(-2.0)
    tx = sparse.scale_by_sparse_subspace(optax.identity(), k=2, update_every=1)
    update = jax.jit(tx.update)
    _, state = update({"w": step}, tx.init(params), subspace_grads={"w": chooser})
    np.testing.assert_array_equal(state.indices["w"], [12, 19])
    _, state = update({"w": jnp.full((4, 5), jnp.nan)}, state)
    np.testing.assert_array_equal(state.indices["w"], [12, 19])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one of k and density"),
        ({"k": 3, "density": 0.1}, "exactly one of k and density"),
        ({"density": 1.0}, "density"),
        ({"k": 3, "selector": "bottomk"}, "selector"),
        ({"k": 3, "update_every": 0}, "update_every"),
    ],
)
def test_bad_arguments(kwargs, match):
    kwargs = {"update_every": 5, **kwargs}
    with pytest.raises(ValueError, match=match):
        sparse.scale_by_sparse_subspace(optax.identity(), **kwargs)


def test_k_too_large_names_the_leaf():
    tx = sparse.scale_by_sparse_subspace(optax.identity(), k=20, update_every=5)
    with pytest.raises(ValueError, match=r"\['layer'\]\['w'\].*0 < k < 20"):
        tx.init({"layer": {"w": jnp.zeros((4, 5))}})


def test_counter_example_gasare_stalls_gosare_converges():
    """Theorem 9 on the minimal instance of Theorem 1 (diagonal noise, k = n - 1 < n): the Top-k
    mask holds only noise entries, so GaSare's ||grad f||^2 stays at L^2 lambda^2 exactly, while
    GoSare's random masks reach the (1, 1) entry and reduce it by >= 10^3 (MSGD, 3 seeds)."""
    from configs import quadratic as quadratic_config
    from experiments import quadratic

    config = quadratic_config.get_config()
    config.update(problem="minimal", num_steps=3000, sparse_k=config.n - 1)
    runs = quadratic.run_methods(config, [("msgd", "gasare"), ("msgd", "gosare")])
    problem = quadratic.problem_from_config(config)
    floor = (problem.smoothness * problem.lam) ** 2
    np.testing.assert_allclose(runs["msgd", "gasare"]["grad_norm_sq"], floor, rtol=1e-6)
    gosare = runs["msgd", "gosare"]["grad_norm_sq"]
    assert np.all(gosare[:, -1] <= 1e-3 * gosare[:, 0]), gosare[:, -1]
