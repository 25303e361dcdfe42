"""Tests for golore_jax/_subspace.py: scale_by_subspace's update, state and errors."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st

import golore_jax as gl
from golore_jax import _layout as layout
from golore_jax import projectors
from golore_jax._subspace import ScaleBySubspaceState, scale_by_subspace

RNG_SEED = 0
STEPS = 7  # with update_every=2: refreshes at steps 0, 2, 4, 6

# A tree with projected leaves on both sides and unprojected ones.
SHAPES = {"a": (4, 6), "b": (6, 4), "c": (5,), "d": (3, 5)}
MASK = {"a": True, "b": True, "c": False, "d": False}


def _full_rank(path, mn):
    del path
    return min(mn)


def _grad_sequence(steps=STEPS, shapes=SHAPES, seed=RNG_SEED):
    """Fresh Gaussian gradients, stacked on a leading step axis (numpy: no jax compiles)."""
    rng = np.random.default_rng(seed)
    return {
        k: jnp.asarray(rng.standard_normal((steps, *s)), jnp.float32) for k, s in shapes.items()
    }


def _trajectory(tx, grads_seq):
    """Stacked updates of ``tx`` over the gradient sequence (to be traced inside jit/variant)."""
    params = jax.tree.map(lambda g: jnp.zeros(g.shape[1:], g.dtype), grads_seq)

    def body(state, g):
        u, state = tx.update(g, state, params)
        return state, u

    _, updates = jax.lax.scan(body, tx.init(params), grads_seq)
    return updates


def _subspace(inner, **kw):
    defaults = dict(rank=_full_rank, update_every=2, mask=MASK, allow_full_rank=True)
    return scale_by_subspace(inner, **{**defaults, **kw})


def _top_projection(g, r):
    u, _, _ = np.linalg.svd(np.asarray(g, np.float64), full_matrices=False)
    return u[:, :r] @ u[:, :r].T


# --------------------------------------------------------------------------------------------
# 3. equivalences at full rank
# --------------------------------------------------------------------------------------------


class FullRankEquivalenceTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_identity_projector_equals_inner(self):
        """projectors.identity() at rank = min(m, n) is the inner transform on the full gradient
        (scale_by_adam, trace(0.9), scale_by_lion; MP and second-moment projection on)."""
        grads = _grad_sequence()
        inners = {
            "adam": optax.scale_by_adam,
            "trace": lambda: optax.trace(0.9),
            "lion": optax.scale_by_lion,
        }

        def both(gs):
            out = {}
            for name, make_inner in inners.items():
                sub = _subspace(
                    make_inner(),
                    projector=projectors.identity(),
                    momentum_projection=True,
                    second_moment="project",
                )
                out[name] = (_trajectory(sub, gs), _trajectory(make_inner(), gs))
            return out

        out = self.variant(both)(grads)
        for name, (got, want) in out.items():
            assert np.abs(want["a"]).max() > 0.1, name
            chex.assert_trees_all_close(got, want, atol=1e-6, rtol=1e-6, custom_message=name)

    @parameterized.named_parameters(("svd", projectors.svd()), ("random", projectors.random()))
    def test_orthonormal_full_rank_basis_equals_sgd_and_momentum_with_projection(self, proj):
        """At full rank P P^T = I: sgd equals sgd; trace with momentum projection equals trace."""
        grads = _grad_sequence()

        def run(gs):
            return {
                "sgd": _trajectory(_subspace(optax.identity(), projector=proj), gs),
                "trace_mp": _trajectory(
                    _subspace(optax.trace(0.9), projector=proj, momentum_projection=True), gs
                ),
                "trace_no_mp": _trajectory(_subspace(optax.trace(0.9), projector=proj), gs),
                "ref_sgd": gs,
                "ref_trace": _trajectory(optax.trace(0.9), gs),
            }

        out = jax.jit(run)(grads)
        chex.assert_trees_all_close(out["sgd"], out["ref_sgd"], atol=2e-5, rtol=1e-5)
        chex.assert_trees_all_close(out["trace_mp"], out["ref_trace"], atol=5e-5, rtol=1e-5)
        for leaf in ("a", "b"):
            # Step 0 and 1 use the first basis: equal. From the first basis change (step 2) on,
            # momentum kept in old coordinates is misread in the new basis.
            np.testing.assert_allclose(
                out["trace_no_mp"][leaf][:2], out["ref_trace"][leaf][:2], atol=5e-5
            )
            assert np.abs(out["trace_no_mp"][leaf][2:] - out["ref_trace"][leaf][2:]).max() > 0.1
        for leaf in ("c", "d"):  # unprojected leaves always see the inner transform
            np.testing.assert_allclose(out["trace_no_mp"][leaf], out["ref_trace"][leaf], atol=1e-6)

    def test_full_rank_svd_adam_is_not_full_adam(self):
        """Adam is not rotation-equivariant (elementwise second moment): at full rank with the
        SVD basis it differs from full-gradient Adam, even with MP and projected nu."""
        grads = _grad_sequence()

        def run(gs):
            sub = _subspace(
                optax.scale_by_adam(),
                projector=projectors.svd(),
                momentum_projection=True,
                second_moment="project",
            )
            return _trajectory(sub, gs), _trajectory(optax.scale_by_adam(), gs)

        got, want = jax.jit(run)(grads)
        for leaf in ("a", "b"):
            assert np.abs(got[leaf] - want[leaf]).max() > 1e-2
        for leaf in ("c", "d"):
            np.testing.assert_allclose(got[leaf], want[leaf], atol=1e-6)


# --------------------------------------------------------------------------------------------
# 5. momentum projection, equation (2), on hand-made states
# --------------------------------------------------------------------------------------------

HAND = {"L": (4, 7), "R": (7, 4)}  # left side, right side
HAND_RANK = 2


def _hand_state(tx, inner_state_fn, count):
    """Builds a state by hand: random orthonormal old bases and given inner moments."""
    rng = np.random.default_rng(5)
    params = {k: jnp.zeros(s) for k, s in HAND.items()}
    state = tx.init(params)
    bases = {
        k: jnp.asarray(np.linalg.qr(rng.standard_normal((4, HAND_RANK)))[0], jnp.float32)
        for k in HAND
    }
    lows = {"L": (HAND_RANK, 7), "R": (7, HAND_RANK)}
    m_prev = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in lows.items()}
    v_prev = {k: jnp.asarray(rng.random(s) + 0.1, jnp.float32) for k, s in lows.items()}
    grads = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in HAND.items()}
    state = state._replace(
        count=jnp.asarray(count, jnp.int32),
        bases=bases,
        inner_state=inner_state_fn(state.inner_state, m_prev, v_prev),
    )
    return params, state, grads, m_prev, v_prev


def _rotated(m, c, side, squared=False):
    c = c * c if squared else c
    return c @ m if side == "L" else m @ c.T


def _low(g, p, side):
    return p.T @ g if side == "L" else g @ p


class MomentumProjectionTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((True, 3), (False, 3), (True, 4))
    def test_trace_momentum_projection(self, momentum_projection, count):
        """trace: at a refresh M = 0.9 C M_prev + R (C = P_new^T P_old); kept without MP."""
        tx = scale_by_subspace(
            optax.trace(0.9),
            rank=HAND_RANK,
            update_every=3,
            mask={"L": True, "R": True},
            momentum_projection=momentum_projection,
        )
        params, state, grads, m_prev, _ = _hand_state(
            tx, lambda s, m, v: s._replace(trace=m), count
        )
        _, new = self.variant(tx.update)(grads, state, params)
        refresh = count % 3 == 0
        for side in HAND:
            p_old = np.asarray(state.bases[side], np.float64)
            p_new = np.asarray(new.bases[side], np.float64)
            g = np.asarray(grads[side], np.float64)
            if refresh:  # the new basis is the SVD one of this gradient
                gg = g if side == "L" else g.T
                np.testing.assert_allclose(p_new @ p_new.T, _top_projection(gg, 2), atol=1e-5)
            else:
                np.testing.assert_array_equal(p_new, p_old)
            m = np.asarray(m_prev[side], np.float64)
            if momentum_projection and refresh:
                m = _rotated(m, p_new.T @ p_old, side)
            expected = 0.9 * m + _low(g, p_new, side)
            np.testing.assert_allclose(new.inner_state.trace[side], expected, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("project", "reset", "keep")
    def test_adam_moments_at_refresh(self, second_moment):
        """scale_by_adam: mu <- C mu; nu <- (C*C) nu / 0 / nu for project / reset / keep."""
        b1, b2 = 0.9, 0.99
        tx = scale_by_subspace(
            optax.scale_by_adam(b1=b1, b2=b2),
            rank=HAND_RANK,
            update_every=3,
            mask={"L": True, "R": True},
            momentum_projection=True,
            second_moment=second_moment,
        )
        params, state, grads, m_prev, v_prev = _hand_state(
            tx, lambda s, m, v: s._replace(mu=m, nu=v), 6
        )
        _, new = self.variant(tx.update)(grads, state, params)
        for side in HAND:
            p_old = np.asarray(state.bases[side], np.float64)
            p_new = np.asarray(new.bases[side], np.float64)
            c = p_new.T @ p_old
            assert np.abs(c - np.eye(2)).max() > 0.1  # the basis really moved
            r = _low(np.asarray(grads[side], np.float64), p_new, side)
            mu = b1 * _rotated(np.asarray(m_prev[side], np.float64), c, side) + (1 - b1) * r
            v = np.asarray(v_prev[side], np.float64)
            v = {
                "project": _rotated(v, c, side, squared=True),
                "reset": np.zeros_like(v),
                "keep": v,
            }[second_moment]
            nu = b2 * v + (1 - b2) * r * r
            np.testing.assert_allclose(new.inner_state.mu[side], mu, atol=1e-5)
            np.testing.assert_allclose(new.inner_state.nu[side], nu, atol=1e-5)

    def test_rotate_helpers_match_equation_2(self):
        """layout.rotate_first_moment: left C M, right M C^T = M Q_old^T Q_new."""
        rng = np.random.default_rng(1)
        q_old = np.linalg.qr(rng.standard_normal((6, 2)))[0]
        q_new = np.linalg.qr(rng.standard_normal((6, 2)))[0]
        c = q_new.T @ q_old
        m = rng.standard_normal((5, 2))
        right = layout.make_layout((5, 6), 2)
        assert right.side == layout.LEFT  # 5 <= 6
        lay_r = layout.make_layout((6, 5), 2)
        np.testing.assert_allclose(
            layout.rotate_first_moment(m, c, lay_r), m @ q_old.T @ q_new, atol=1e-12
        )
        mt = m.T
        np.testing.assert_allclose(layout.rotate_first_moment(mt, c, right), c @ mt, atol=1e-12)
        v = rng.random((2, 5))
        np.testing.assert_allclose(layout.rotate_second_moment(v, c, right), (c * c) @ v)


# --------------------------------------------------------------------------------------------
# 7. properties over random shapes, ranks, periods and step counts
# --------------------------------------------------------------------------------------------


@settings(max_examples=10, deadline=None, derandomize=True)
@given(
    m=st.integers(2, 12),
    n=st.integers(2, 12),
    data=st.data(),
    update_every=st.integers(1, 4),
    steps=st.integers(1, 6),
    use_random=st.booleans(),
)
def test_update_properties(m, n, data, update_every, steps, use_random):
    """Updates keep shape and dtype, lie in span(P) (left) / rowspan(Q^T) (right); bases are
    orthonormal; the state's float count equals the closed form."""
    rank = data.draw(st.integers(1, min(m, n) - 1), label="rank")
    proj = projectors.random() if use_random else projectors.svd()
    tx = scale_by_subspace(optax.trace(0.5), rank=rank, update_every=update_every, projector=proj)
    params = {"w": jnp.zeros((m, n)), "bias": jnp.zeros((n,))}
    state = tx.init(params)
    closed = gl.subspace_state_floats(params, rank=rank, moments=1)
    # left: basis m*r + moment r*n; right: basis n*r + moment m*r; bias: n
    assert closed == (m * rank + rank * n if m <= n else n * rank + m * rank) + n
    assert gl.optimizer_state_floats(state) == closed
    rng = np.random.default_rng(m * 100 + n)
    grads = {
        k: jnp.asarray(rng.standard_normal((steps, *v.shape)), jnp.float32)
        for k, v in params.items()
    }

    def body(s, g):
        u, s = tx.update(g, s, params)
        return s, u

    state, updates = jax.jit(lambda s, g: jax.lax.scan(body, s, g))(state, grads)
    assert updates["w"].shape == (steps, m, n) and updates["w"].dtype == jnp.float32
    assert updates["bias"].shape == (steps, n)
    basis = np.asarray(state.bases["w"], np.float64)
    np.testing.assert_allclose(basis.T @ basis, np.eye(rank), atol=1e-5)
    # The last update lies in the current subspace.
    u = np.asarray(updates["w"][-1], np.float64)
    residual = u - basis @ basis.T @ u if m <= n else u - u @ basis @ basis.T
    assert np.abs(residual).max() <= 1e-5 * max(1.0, np.abs(u).max())
    assert gl.optimizer_state_floats(state) == closed


# --------------------------------------------------------------------------------------------
# 8. bad input
# --------------------------------------------------------------------------------------------

BAD_PARAMS = {"layer": {"kernel": jnp.zeros((4, 6)), "bias": jnp.zeros((6,))}}


@pytest.mark.parametrize(
    ("kwargs", "params", "error", "match"),
    [
        (dict(rank=0), None, ValueError, "rank must be a positive int"),
        (dict(rank=-2), None, ValueError, "rank must be a positive int"),
        (dict(rank=4), None, ValueError, r"rank 4 for leaf \['layer'\]\['kernel'\]"),
        (dict(rank=5), None, ValueError, r"leaf \['layer'\]\['kernel'\].*min\(m, n\) = 4"),
        (dict(rank=lambda p, mn: 0), None, ValueError, r"leaf \['layer'\]\['kernel'\]"),
        (dict(rank=2, update_every=0), None, ValueError, "update_every must be a positive"),
        (dict(rank=2, update_every=-1), None, ValueError, "update_every must be a positive"),
        (dict(rank=2, second_moment="rotate"), None, ValueError, "second_moment must be one"),
        (dict(rank=2, scale=float("nan")), None, ValueError, "scale must be finite"),
        (dict(rank=2, projection_dtype=jnp.int8), None, ValueError, "projection_dtype must be"),
        (dict(rank=2, projection_dtype="bf16"), None, ValueError, "projection_dtype must be"),
        (
            dict(rank=1, mask={"layer": {"kernel": True, "bias": True}}),
            None,
            ValueError,
            r"leaf \['layer'\]\['bias'\] of shape \(6,\).*at least 2 dimensions",
        ),
        (
            dict(rank=1, mask={"ids": True}),
            {"ids": jnp.zeros((4, 6), jnp.int32)},
            TypeError,
            r"leaf \['ids'\] .*non-floating dtype int32",
        ),
        (
            dict(rank=1, mask={"layer": {"kernel": True}}),
            None,
            ValueError,
            r"mask's structure does not match.*\['layer'\]\['bias'\]",
        ),
        (
            dict(rank=1, mask={"layer": {"kernel": True, "bias": False, "extra": True}}),
            None,
            ValueError,
            r"mask leaves not in params: \[\"\['layer'\]\['extra'\]\"\]",
        ),
    ],
)
def test_bad_input_raises_with_leaf_path(kwargs, params, error, match):
    """Bad arguments raise at construction or at init, naming the offending leaf."""
    params = BAD_PARAMS if params is None else params
    with pytest.raises(error, match=match):
        kw = {"update_every": 2, **kwargs}
        scale_by_subspace(optax.scale_by_adam(), **kw).init(params)


def test_full_rank_needs_allow_full_rank():
    """rank == min(m, n) is refused unless allow_full_rank=True."""
    with pytest.raises(ValueError, match="allow_full_rank"):
        scale_by_subspace(optax.identity(), rank=4, update_every=1).init(BAD_PARAMS)
    state = scale_by_subspace(optax.identity(), rank=4, update_every=1, allow_full_rank=True).init(
        BAD_PARAMS
    )
    assert state.bases["layer"]["kernel"].shape == (4, 4)


def test_default_mask_selects_matrices_but_not_embeddings():
    """default_mask: floating >= 2-D leaves, except embed/lm_head paths; ints and 1-D skipped."""
    params = {
        "embed": jnp.zeros((10, 4)),
        "lm_head": jnp.zeros((4, 10)),
        "q": jnp.zeros((4, 4)),
        "norm": jnp.zeros((4,)),
        "ids": jnp.zeros((4, 4), jnp.int32),
    }
    mask = gl.default_mask(params)
    assert mask == {"embed": False, "lm_head": False, "q": True, "norm": False, "ids": False}


# --------------------------------------------------------------------------------------------
# 9. bf16, 11. large-batch subspace, and the non-projected path
# --------------------------------------------------------------------------------------------


class DtypeAndLargeBatchTest(chex.TestCase):
    def test_bf16_params_fp32_bases_bf16_updates(self):
        """bf16 params and grads: fp32 bases and moments, bf16 updates, no NaN, close to fp32."""
        tx = scale_by_subspace(optax.trace(0.9), rank=2, update_every=2, mask=MASK)
        grads32 = _grad_sequence(steps=3)
        grads16 = jax.tree.map(lambda g: g.astype(jnp.bfloat16), grads32)
        params16 = jax.tree.map(lambda g: jnp.zeros(g.shape[1:], jnp.bfloat16), grads16)

        def run(gs):
            state = tx.init(params16)
            outs = []
            for t in range(3):
                u, state = tx.update(jax.tree.map(lambda g, t=t: g[t], gs), state, params16)
                outs.append(u)
            return outs, state

        (outs, state), ref = jax.jit(lambda a, b: (run(a), _trajectory(tx, b)))(grads16, grads32)
        for t, u in enumerate(outs):
            for k, leaf in u.items():
                assert leaf.dtype == jnp.bfloat16, k
                assert leaf.shape == SHAPES[k]
                assert bool(jnp.all(jnp.isfinite(leaf))), k
                np.testing.assert_allclose(
                    np.asarray(leaf, np.float32), ref[k][t], atol=0.05, rtol=0.05
                )
        for k in ("a", "b"):
            assert state.bases[k].dtype == jnp.float32
            assert state.inner_state.trace[k].dtype == jnp.float32

    @chex.variants(with_jit=True, without_jit=True)
    def test_subspace_grads_choose_basis_updates_are_projected(self):
        """subspace_grads= picks the basis (its SVD), while the step projects `updates`."""
        tx = scale_by_subspace(optax.identity(), rank=2, update_every=3, mask=MASK)
        rng = np.random.default_rng(9)
        params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
        grads = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in SHAPES.items()}
        big = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in SHAPES.items()}
        u, state = self.variant(tx.update)(grads, tx.init(params), params, subspace_grads=big)
        for k in ("a", "b"):
            p = np.asarray(state.bases[k], np.float64)
            g, b = np.asarray(grads[k], np.float64), np.asarray(big[k], np.float64)
            if k == "a":  # left
                np.testing.assert_allclose(p @ p.T, _top_projection(b, 2), atol=1e-5)
                assert not np.allclose(p @ p.T, _top_projection(g, 2), atol=1e-2)
                np.testing.assert_allclose(u[k], p @ p.T @ g, atol=1e-5)
            else:  # right
                np.testing.assert_allclose(p @ p.T, _top_projection(b.T, 2), atol=1e-5)
                assert not np.allclose(p @ p.T, _top_projection(g.T, 2), atol=1e-2)
                np.testing.assert_allclose(u[k], g @ p @ p.T, atol=1e-5)
        for k in ("c", "d"):
            np.testing.assert_array_equal(u[k], grads[k])


class ProjectionDtypeTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_bf16_operands_fp32_accumulation(self):
        """projection_dtype=bf16: R = P^T G and P N from bf16-rounded operands with fp32 sums
        (the exact formula, on both sides); bases, moments and fp32 updates otherwise unchanged;
        float32 is the default's exact update."""

        def run(**kw):
            tx = scale_by_subspace(
                optax.trace(0.5), rank=2, update_every=2, mask=MASK, scale=0.5, **kw
            )
            params = {k: jnp.zeros(sh) for k, sh in SHAPES.items()}
            grads = _grad_sequence(steps=2)
            state, outs = tx.init(params), []
            for t in range(2):
                u, state = self.variant(tx.update)(
                    jax.tree.map(lambda g, t=t: g[t], grads), state, params
                )
                outs.append(u)
            return outs, state, grads

        ref, ref_state, grads = run()
        same, _, _ = run(projection_dtype=jnp.float32)
        low, state, _ = run(projection_dtype=jnp.bfloat16)

        def bf16(x):
            return np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)

        for k in SHAPES:
            for t in range(2):
                np.testing.assert_array_equal(same[t][k], ref[t][k])
                assert low[t][k].dtype == jnp.float32
        for k in ("a", "b"):  # both refreshes chose from the same gradients: same bases
            np.testing.assert_array_equal(state.bases[k], ref_state.bases[k])
            assert state.inner_state.trace[k].dtype == jnp.float32
            p = np.asarray(state.bases[k], np.float64)
            trace = np.zeros((2, 6) if k == "a" else (6, 2))
            for t in range(2):
                g = np.asarray(grads[k][t], np.float64)
                r = bf16(p).T @ bf16(g) if k == "a" else bf16(g) @ bf16(p)
                trace = 0.5 * trace + r
                full = bf16(p) @ bf16(trace) if k == "a" else bf16(trace) @ bf16(p).T
                np.testing.assert_allclose(low[t][k], 0.5 * full, rtol=1e-5, atol=1e-6)
                # and bf16 is only bf16-close to the fp32 update
                np.testing.assert_allclose(low[t][k], ref[t][k], rtol=0.05, atol=0.05)
        for k in ("c", "d"):
            np.testing.assert_array_equal(low[1][k], ref[1][k])


def test_state_is_a_namedtuple_with_masked_nodes_for_unprojected_leaves():
    """bases hold (d, r) fp32 zeros before the first step and MaskedNode where not projected."""
    tx = scale_by_subspace(optax.scale_by_adam(), rank=2, update_every=2, mask=MASK)
    state = tx.init({k: jnp.zeros(s) for k, s in SHAPES.items()})
    assert isinstance(state, ScaleBySubspaceState)
    assert state.bases["a"].shape == (4, 2) and state.bases["b"].shape == (4, 2)
    assert isinstance(state.bases["c"], optax.MaskedNode)
    assert state.inner_state.mu["a"].shape == (2, 6)
    assert state.inner_state.mu["b"].shape == (6, 2)
    assert state.inner_state.mu["d"].shape == (3, 5)


# --------------------------------------------------------------------------------------------
# low_rank_update: gradients given in the subspace (the ReLoRA-like path of train/relora.py)
# --------------------------------------------------------------------------------------------


class InSubspaceTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_low_rank_gradients_give_the_projected_update_and_state(self):
        """Between refreshes, feeding R = P^T G (left) / G Q (right) to low_rank_update gives
        scale * N with P (scale * N) == the plain update, and the same next state."""
        grads = _grad_sequence(steps=3)
        params = jax.tree.map(lambda g: jnp.zeros(g.shape[1:]), grads)
        tx = scale_by_subspace(optax.scale_by_adam(), rank=2, update_every=3, mask=MASK, scale=0.5)

        lays = gl.subspace_layouts(params, rank=2, mask=MASK)
        lays = {k: lays[f"['{k}']"] for k in SHAPES}

        def run(gs):
            state = tx.init(params)
            _, state = tx.update(jax.tree.map(lambda g: g[0], gs), state, params)  # refresh
            g1 = jax.tree.map(lambda g: g[1], gs)
            plain, plain_state = tx.update(g1, state, params)
            low = {
                k: g if lays[k] is None else layout.project(g, state.bases[k], lays[k])
                for k, g in g1.items()
            }
            got, got_state = gl.low_rank_update(tx, low, state, params)
            return plain, plain_state, got, got_state, state.bases

        plain, plain_state, got, got_state, bases = self.variant(run)(grads)
        for k in SHAPES:
            lay = lays[k]
            back = got[k] if lay is None else layout.back_project(got[k], bases[k], lay)
            if lay is not None:
                assert got[k].shape == lay.low_rank_shape
            np.testing.assert_allclose(back, plain[k], rtol=1e-5, atol=1e-6, err_msg=k)
        assert int(got_state.count) == int(plain_state.count) == 2
        np.testing.assert_array_equal(
            jax.random.key_data(got_state.key), jax.random.key_data(plain_state.key)
        )
        chex.assert_trees_all_close(
            (got_state.bases, got_state.inner_state),
            (plain_state.bases, plain_state.inner_state),
            rtol=1e-5,
            atol=1e-7,
        )

    def test_errors_name_the_leaf(self):
        params = {"a": jnp.zeros((4, 6)), "c": jnp.zeros((5,))}
        tx = scale_by_subspace(optax.identity(), rank=2, update_every=3)
        state = tx.init(params)
        with pytest.raises(ValueError, match="needs params"):
            gl.low_rank_update(tx, params, state, None)
        with pytest.raises(ValueError, match=r"leaf \['a'\] must have the low-rank shape \(2, 6\)"):
            gl.low_rank_update(tx, params, state, params)
