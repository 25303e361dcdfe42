"""Online Subspace Descent (scale_by_online_subspace): tracking, no SVD after step 0, state."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import golore_jax as gl
from golore_jax import _online_pca as online_pca

M, N, R, T = 16, 40, 3, 300
SIGNAL = np.array([3.0, 2.0, 1.5])
NOISE = 0.3
# sin of the largest principal angle between P and the signal subspace after T steps; the
# stationary value with the default AdamW (lr 1/200) is ~0.02-0.05 at this noise.
ANGLE_TOL = 0.1
ORTHO_TOL = 0.02  # max |P^T P - I| without re-orthonormalisation


def _stream(rng, basis, first_basis):
    """``T`` gradients ``U diag(s) W_t^T + noise`` (column space ``basis``, ``M x N``), except
    the first one, whose column space is ``first_basis``: the initial SVD lands on the wrong
    subspace and online PCA must move to ``basis``."""
    w = rng.standard_normal((T, N, R))
    signal = np.einsum("mr,r,tnr->tmn", basis, SIGNAL, w)
    signal[0] = np.einsum("mr,r,nr->mn", first_basis, SIGNAL, w[0])
    return (signal + NOISE * rng.standard_normal((T, M, N))).astype(np.float32)


def _orth(rng, d):
    return np.linalg.qr(rng.standard_normal((d, R)))[0]


def _sin_max(p, u):
    """sin of the largest principal angle between span(p) and span(u) (u orthonormal)."""
    q = np.linalg.qr(p)[0]
    return np.linalg.norm(q - u @ (u.T @ q), 2)


def _svd_locations(jaxpr, path=()):
    """Where the svd primitive occurs: per occurrence, the ``("cond", branch index)`` pairs of
    the conds enclosing it (other call-like primitives, e.g. nested jit, are looked through)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "svd":
            found.append(path)
        if eqn.primitive.name == "cond":
            for b, branch in enumerate(eqn.params["branches"]):
                found += _svd_locations(branch.jaxpr, (*path, ("cond", b)))
        else:
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                found += _svd_locations(sub, path)  # jit / pjit / custom_jvp: transparent
    return found


@pytest.fixture(scope="module")
def tracking_run():
    rng = np.random.default_rng(0)
    u0, u1, v0, v1 = (_orth(rng, M) for _ in range(4))
    left = _stream(rng, u1, u0)  # (M, N) leaf: left side, P spans the column space
    right = np.swapaxes(_stream(rng, v1, v0), 1, 2)  # (N, M) leaf: right side, row space
    tx = online_pca.scale_by_online_subspace(optax.identity(), rank=R)
    params = {"a": jnp.zeros((M, N)), "b": jnp.zeros((N, M))}

    @jax.jit
    def run(ga, gb):
        def step(state, g):
            _, state = tx.update({"a": g[0], "b": g[1]}, state)
            return state, (state.bases["a"], state.bases["b"])

        return jax.lax.scan(step, tx.init(params), (ga, gb))

    state, (pa, pb) = run(left, right)
    return (u0, u1, v0, v1), state, np.asarray(pa), np.asarray(pb)


def test_tracks_the_signal_subspace(tracking_run):
    """From an SVD of a first gradient in another subspace, P moves to the signal subspace."""
    (u0, u1, v0, v1), _, pa, pb = tracking_run
    assert _sin_max(pa[0], u0) < 0.2 and _sin_max(pa[0], u1) > 0.9  # starts in the wrong place
    assert _sin_max(pb[0], v0) < 0.2 and _sin_max(pb[0], v1) > 0.9
    assert _sin_max(pa[-1], u1) < ANGLE_TOL, _sin_max(pa[-1], u1)
    assert _sin_max(pb[-1], v1) < ANGLE_TOL, _sin_max(pb[-1], v1)
    # The loss alone keeps P near-orthonormal (no QR in the default).
    for p in (pa[-1], pb[-1]):
        np.testing.assert_allclose(p.T @ p, np.eye(R), atol=ORTHO_TOL)


def test_no_svd_outside_the_first_step_branch():
    """Asserted on the jaxpr of ``update``: every svd primitive lies in branch 1 (the True
    branch) of a top-level ``cond``, and that cond's predicate is ``count == 0``; no svd is
    anywhere else (top level, other branches, the PCA step). At run time, a state with
    ``count > 0`` and a hand-set P is used as is (update = P P^T G), so that branch is not taken.
    """
    tx = online_pca.scale_by_online_subspace(optax.identity(), rank=2, orthonormalize_every=5)
    params = {"a": jnp.zeros((6, 10)), "b": jnp.zeros((10, 6)), "c": jnp.zeros(3)}
    grads = jax.tree.map(lambda x: jnp.ones_like(x), params)
    state = tx.init(params)
    closed = jax.make_jaxpr(tx.update)(grads, state)
    locations = _svd_locations(closed.jaxpr)
    assert len(locations) == 2  # one per projected leaf
    assert all(loc == (("cond", 1),) for loc in locations), locations
    # The cond holding them is predicated on count == 0 (an `eq` of the count input and 0).
    count_var = closed.jaxpr.invars[len(jax.tree.leaves(grads))]
    conds = [e for e in closed.jaxpr.eqns if e.primitive.name == "cond"]
    svd_cond = next(e for e in conds if _svd_locations(e.params["branches"][1].jaxpr))
    producers = {v: e for e in closed.jaxpr.eqns for v in e.outvars}
    pred = producers[svd_cond.invars[0]]
    while pred.primitive.name == "convert_element_type":
        pred = producers[pred.invars[0]]
    assert pred.primitive.name == "eq"
    assert pred.invars[0] is count_var and pred.invars[1].val == 0

    p = jnp.asarray(np.linalg.qr(np.random.default_rng(1).standard_normal((6, 2)))[0])
    state = state._replace(count=jnp.asarray(7, jnp.int32), bases={**state.bases, "a": p})
    g = jnp.asarray(np.random.default_rng(2).standard_normal((6, 10)), jnp.float32)
    updates, new_state = jax.jit(tx.update)({**grads, "a": g}, state)
    np.testing.assert_allclose(updates["a"], p @ (p.T @ g), rtol=1e-5, atol=1e-6)
    assert not np.allclose(new_state.bases["a"], p)  # the PCA step moved it


def test_first_step_is_galore_and_state_shapes():
    """Step 0 projects onto the top-r singular vectors of G, with P before any PCA step."""
    rng = np.random.default_rng(3)
    params = {"w": jnp.zeros((8, 12)), "v": jnp.zeros((12, 8)), "bias": jnp.zeros(8)}
    grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
    tx = online_pca.scale_by_online_subspace(optax.scale_by_adam(), rank=3)
    state = tx.init(params)
    assert state.bases["w"].shape == (8, 3) and state.bases["v"].shape == (8, 3)
    assert isinstance(state.bases["bias"], optax.MaskedNode)
    assert state.inner_state.mu["w"].shape == (3, 12)
    assert state.inner_state.mu["v"].shape == (12, 3)
    _, state = jax.jit(tx.update)(grads, state)
    u = np.linalg.svd(np.asarray(grads["w"]))[0][:, :3]
    assert _sin_max(np.asarray(state.bases["w"]), u) < 1e-5  # no PCA step at t = 0
    assert int(state.count) == 1


def test_qr_reorthonormalises():
    """With ``orthonormalize_every=1`` P has orthonormal columns after every step."""
    rng = np.random.default_rng(4)
    tx = online_pca.scale_by_online_subspace(
        optax.identity(),
        rank=2,
        orthonormalize_every=1,
        projector_optimizer=optax.sgd(0.5),  # large steps that would break orthonormality
    )
    params = {"a": jnp.zeros((6, 10))}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(3):
        _, state = update({"a": jnp.asarray(rng.standard_normal((6, 10)), jnp.float32)}, state)
        p = np.asarray(state.bases["a"])
        np.testing.assert_allclose(p.T @ p, np.eye(2), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"update_every": 0}, "update_every"),
        ({"orthonormalize_every": 0}, "orthonormalize_every"),
        ({"scale": float("nan")}, "scale"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        online_pca.scale_by_online_subspace(optax.identity(), rank=2, **kwargs)


def test_rank_error_names_the_leaf():
    tx = online_pca.scale_by_online_subspace(optax.identity(), rank=6)
    with pytest.raises(ValueError, match=r"\['layer'\]\['w'\]"):
        tx.init({"layer": {"w": jnp.zeros((6, 10))}})


def test_a_tree_without_projected_leaves_runs_its_inner_alone():
    """Only vectors (e.g. the norms and embeddings a per-layer optimizer leaves outside the
    layers): the projector step has nothing to fit, and the update is the inner Adam's."""
    params = {"scale": jnp.ones((5,)), "bias": jnp.arange(3.0)}
    grads = {"scale": jnp.linspace(-1.0, 1.0, 5), "bias": jnp.array([0.5, -2.0, 1.0])}
    tx = gl.osd_adamw(0.1, online=gl.Online(rank=2, update_every=1), weight_decay=0.0)
    adam = optax.adam(0.1)
    state, adam_state = tx.init(params), adam.init(params)
    for _ in range(3):  # the projector step runs at counts 1 and 2
        updates, state = jax.jit(tx.update)(grads, state, params)
        want, adam_state = adam.update(grads, adam_state, params)
        for k in params:
            np.testing.assert_allclose(updates[k], want[k], rtol=1e-6)
