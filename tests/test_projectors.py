"""Tests for golore_jax/projectors.py and golore_jax/_layout.py: bases, Haar sampling, refreshes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

from golore_jax import _layout as layout
from golore_jax import projectors
from golore_jax._subspace import scale_by_subspace

# Haar statistics: N draws of a (M, R) basis.
N_DRAWS, M, R = 4000, 8, 3
# Tolerance for sample means: this many standard errors (p < 1e-8 per statistic for a normal).
N_SE = 6.0


def _top_projection(g: np.ndarray, r: int) -> np.ndarray:
    """``U_r U_r^T`` for the top-r left singular vectors of ``g`` (float64)."""
    u, _, _ = np.linalg.svd(np.asarray(g, np.float64), full_matrices=False)
    return u[:, :r] @ u[:, :r].T


@functools.cache
def _all_draws() -> dict[str, np.ndarray]:
    """N_DRAWS bases from each sampler: Haar by QR, by polar, plain QR.

    One program per sampler, run one after the other: jaxlib's batched LAPACK kernels wait for
    their batch on XLA's intra-op pool, so two of them running at once in one program (the QR
    and the polar factor's eigh) can take both threads of a 2-core machine and wait for each
    other forever (seen: a CI-sized run hung here)."""
    keys = jax.random.split(jax.random.key(1234), N_DRAWS)
    samplers = {
        "qr": lambda key: projectors.haar_stiefel(key, (M, R), method="qr"),
        "polar": lambda key: projectors.haar_stiefel(key, (M, R), method="polar"),
        # QR of the Gaussian WITHOUT the sign fix (the non-Haar reference).
        "plain_qr": lambda key: jnp.linalg.qr(jax.random.normal(key, (M, R), jnp.float32))[0],
        # The Gaussian itself: its conditioning sets the polar factor's rounding.
        "z": lambda key: jax.random.normal(key, (M, R), jnp.float32),
    }
    return {
        name: np.asarray(jax.block_until_ready(jax.jit(jax.vmap(f))(keys)), np.float64)
        for name, f in samplers.items()
    }


def _draws(method: str) -> np.ndarray:
    return _all_draws()[method]


# --------------------------------------------------------------------------------------------
# layout: side rule and the most-square split
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "split", "rows", "cols", "side"),
    [
        ((32, 4, 4), 1, 32, 16, layout.RIGHT),  # DenseGeneral query kernel (embed, heads, hd)
        ((4, 4, 32), 2, 16, 32, layout.LEFT),  # output kernel (heads, head_dim, embed)
        ((3, 3, 16, 32), 3, 144, 32, layout.RIGHT),  # conv kernel (kh, kw, in, out)
        ((2, 4, 2), 1, 2, 8, layout.LEFT),  # tie between k=1 and k=2: earliest split wins
        ((6, 6), 1, 6, 6, layout.LEFT),  # square: left (paper's rule on the stored array)
        ((4, 9), 1, 4, 9, layout.LEFT),
        ((9, 4), 1, 9, 4, layout.RIGHT),
    ],
)
def test_most_square_split_and_side_rule(shape, split, rows, cols, side):
    """The default split makes the matrix closest to square; the smaller side is projected."""
    assert layout.most_square_split(shape) == split
    lay = layout.make_layout(shape, rank=2)
    assert (lay.rows, lay.cols, lay.side) == (rows, cols, side)
    assert lay.basis_shape == (min(rows, cols), 2)
    assert lay.low_rank_shape == ((2, cols) if side == layout.LEFT else (rows, 2))


def test_most_square_split_rejects_vectors():
    """A 1-D shape cannot be a matrix."""
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        layout.most_square_split((5,))


# --------------------------------------------------------------------------------------------
# svd projector: one update with inner = identity is scale * U_r U_r^T G (or G V_r V_r^T)
# --------------------------------------------------------------------------------------------


# name: (shape, rank, shape seen as a matrix by the most-square split)
SVD_CASES = {
    "left_wide": ((5, 9), 2, (5, 9)),
    "right_tall": ((9, 5), 2, (9, 5)),
    "square_left": ((6, 6), 3, (6, 6)),
    "query_kernel_3d": ((8, 2, 3), 2, (8, 6)),  # (embed, heads, head_dim) -> 8 x 6, right
    "out_kernel_3d": ((2, 3, 8), 2, (6, 8)),  # (heads, head_dim, embed) -> 6 x 8, left
    "conv_4d": ((3, 3, 8, 16), 3, (72, 16)),  # (kh, kw, in, out) -> 72 x 16, right
}


class SVDUpdateTest(parameterized.TestCase):
    def test_svd_update_is_top_r_projection(self):
        """One GaLore step with an identity inner transform equals scale * U_r U_r^T G."""
        scale = 0.7
        names = sorted(SVD_CASES)
        rng = np.random.default_rng(0)
        grads = {n: jnp.asarray(rng.standard_normal(SVD_CASES[n][0]), jnp.float32) for n in names}
        tx = scale_by_subspace(
            optax.identity(),
            rank=lambda path, _: SVD_CASES[path[2:-2]][1],  # path is "['name']"
            update_every=5,
            projector=projectors.svd(),
            scale=scale,
            mask=lambda p: jax.tree.map(lambda _: True, p),
        )
        params = jax.tree.map(jnp.zeros_like, grads)
        updates, state = _jit_update(tx)(grads, tx.init(params), params)
        for name in names:
            shape, rank, (rows, cols) = SVD_CASES[name]
            gm = np.asarray(grads[name], np.float64).reshape(rows, cols)
            if rows <= cols:
                expected = scale * _top_projection(gm, rank) @ gm
                assert state.bases[name].shape == (rows, rank), name
            else:
                expected = scale * gm @ _top_projection(gm.T, rank)
                assert state.bases[name].shape == (cols, rank), name
            assert updates[name].shape == shape
            np.testing.assert_allclose(
                np.asarray(updates[name]).reshape(rows, cols),
                expected,
                atol=2e-5,
                rtol=1e-5,
                err_msg=name,
            )


def _jit_update(tx):
    return jax.jit(tx.update)


def test_svd_projector_returns_top_singular_vectors():
    """SVDProjector(g) spans the top-r left singular subspace of g, orthonormal columns."""
    g = jnp.asarray(np.random.default_rng(3).standard_normal((7, 11)), jnp.float32)
    basis = projectors.svd()(None, g, jnp.zeros((7, 3)), jnp.int32(0))
    np.testing.assert_allclose(basis.T @ basis, np.eye(3), atol=1e-5)
    np.testing.assert_allclose(basis @ basis.T, _top_projection(g, 3), atol=1e-5)


# --------------------------------------------------------------------------------------------
# random projector: Haar on the Stiefel manifold
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["qr", "polar"])
def haar_draws(request):
    return request.param, _draws(request.param)


@pytest.mark.numerics
def test_random_bases_are_orthonormal(haar_draws):
    """Every draw has P^T P = I to its fp32 rounding.

    QR (Householder, backward stable): ``|P^T P - I| <= c M u`` (``u = 2^-24``), well inside
    1e-5. The polar factor ``Z (Z^T Z)^{-1/2}`` forms the Gram matrix, so each of its fp32
    products (``Z^T Z``: M terms; ``V diag(w^-1/2) V^T`` and ``Z @``: R each) errs by up to
    its length times ``u`` relative to ``sigma_max(Z)^2`` and the inverse square root divides
    by ``sigma_min(Z)^2``: ``(M + 2R) u kappa(Z)^2``, doubled for eigh's own backward error.
    The worst of the 4000 draws (kappa 16) reaches 11.5 u kappa^2 = 1.2e-5 with LLVM's
    optimisation on and 7.3e-6 without: a flat 1e-5 held only in one summation order.
    """
    method, p = haar_draws
    gram = np.einsum("nij,nik->njk", p, p)
    error = np.abs(gram - np.eye(R)).max(axis=(1, 2))
    if method == "qr":
        bound = np.full(error.shape, 1e-5)
    else:
        s = np.linalg.svd(_draws("z"), compute_uv=False)
        bound = 2 * (M + 2 * R) * 2.0**-24 * (s[:, 0] / s[:, -1]) ** 2
    assert np.all(error <= bound), (error / bound).max()


def test_random_mean_projection_is_isotropic(haar_draws):
    """E[P P^T] = (r/m) I, each entry within N_SE standard errors of its sample mean."""
    _, p = haar_draws
    proj = np.einsum("nij,nkj->nik", p, p)
    mean = proj.mean(0)
    se = proj.std(0, ddof=1) / np.sqrt(N_DRAWS)
    # Diagonal entries are Beta(r/2, (m-r)/2): std = sqrt(ab / ((a+b)^2 (a+b+1))) ~ 0.217, so
    # SE ~ 0.0034 and the bound is ~0.02; off-diagonal SE is smaller.
    assert np.all(np.abs(mean - (R / M) * np.eye(M)) <= N_SE * se)
    assert N_SE * se.max() < 0.03  # the test is sharp enough to see a 0.03 bias


def test_random_projected_norm_is_beta(haar_draws):
    """||P^T e||^2 for a fixed unit e is Beta(r/2, (m-r)/2) (Kolmogorov-Smirnov)."""
    stats = pytest.importorskip("scipy.stats")
    _, p = haar_draws
    e = np.ones(M) / np.sqrt(M)
    sq = np.sum(np.einsum("nij,i->nj", p, e) ** 2, axis=1)
    a, b = R / 2, (M - R) / 2
    assert stats.kstest(sq, "beta", args=(a, b)).pvalue > 1e-3
    # The KS test has power here: the neighbouring rank's law is rejected.
    assert stats.kstest(sq, "beta", args=((R + 1) / 2, (M - R - 1) / 2)).pvalue < 1e-6
    # Moments: mean a/(a+b) = r/m, var ab/((a+b)^2 (a+b+1)).
    var = a * b / ((a + b) ** 2 * (a + b + 1))
    assert abs(sq.mean() - R / M) < N_SE * np.sqrt(var / N_DRAWS)


def test_random_sign_statistic_is_centered(haar_draws):
    """Haar is invariant under P -> -P column-wise, so E[tr P[:r, :r]] = 0 within N_SE SE."""
    _, p = haar_draws
    stat = np.trace(p[:, :R, :R], axis1=1, axis2=2)
    se = stat.std(ddof=1) / np.sqrt(N_DRAWS)
    assert abs(stat.mean()) < N_SE * se


def test_plain_qr_without_sign_fix_is_not_haar():
    """QR without the sign fix fails the sign statistic by many SE (LAPACK's diag(R) convention).

    Householder QR (LAPACK geqrf) makes R[j, j] = -sign(z_jj) * norm, so Q[j, j] is biased
    negative: E[tr Q[:r, :r]] ~ -0.8 here instead of 0. Note E[P P^T] and ||P^T e||^2 cannot see
    this (they are invariant to column signs), which is why a sign-sensitive statistic is used.
    """
    q = _draws("plain_qr")
    stat = np.trace(q[:, :R, :R], axis1=1, axis2=2)
    se = stat.std(ddof=1) / np.sqrt(N_DRAWS)
    assert abs(stat.mean()) > 20 * N_SE * se
    # Column signs do not change P P^T: the plain QR passes the isotropy test, as stated above.
    proj = np.einsum("nij,nkj->nik", q, q)
    assert np.abs(proj.mean(0) - (R / M) * np.eye(M)).max() < 0.03


def test_random_projector_depends_on_key_not_gradient():
    """The GoLore basis changes with the key and ignores the gradient and the step."""
    proj = projectors.random()
    prev = jnp.zeros((6, 2))

    @jax.jit
    def three():
        a = proj(jax.random.key(0), jnp.ones((6, 4)), prev, jnp.int32(0))
        b = proj(jax.random.key(0), jnp.zeros((6, 4)), prev, jnp.int32(5))
        c = proj(jax.random.key(1), jnp.ones((6, 4)), prev, jnp.int32(0))
        return a, b, c

    a, b, c = three()
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert not proj.uses_gradient and projectors.svd().uses_gradient


def test_random_projector_rejects_bad_method():
    """method must be 'qr' or 'polar'."""
    with pytest.raises(ValueError, match="'qr' or 'polar'"):
        projectors.random("householder")


def test_hybrid_rejects_negative_switch():
    """switch_step < 0 is refused."""
    with pytest.raises(ValueError, match="switch_step"):
        projectors.hybrid(-1)


# --------------------------------------------------------------------------------------------
# refresh schedule and the hybrid switch, seen through state.bases
# --------------------------------------------------------------------------------------------

TAU = 3


def _run_bases(projector, steps: int, shape=(5, 8), rank=2):
    """Runs scale_by_subspace(identity) on fresh Gaussian gradients; returns grads and bases."""
    tx = scale_by_subspace(
        optax.identity(),
        rank=rank,
        update_every=TAU,
        projector=projector,
        mask={"w": True},
        seed=7,
    )
    params = {"w": jnp.zeros(shape)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    grads, bases = [], []
    rng = np.random.default_rng(100)
    for _ in range(steps):
        g = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        _, state = update({"w": g}, state)
        grads.append(np.asarray(g))
        bases.append(np.asarray(state.bases["w"]))
    return grads, bases


def _is_svd_basis(basis, g, rank) -> bool:
    return np.allclose(basis @ basis.T, _top_projection(g, rank), atol=1e-4)


@pytest.mark.parametrize("projector", [projectors.svd(), projectors.random("qr")], ids=str)
def test_basis_changes_exactly_at_refresh_steps(projector):
    """Bases are equal between refreshes and change at steps 0, tau, 2 tau, ..."""
    steps = 3 * TAU + 1
    grads, bases = _run_bases(projector, steps)
    for t in range(1, steps):
        same = np.array_equal(bases[t], bases[t - 1])
        assert same == (t % TAU != 0), t
    for t in range(steps):
        np.testing.assert_allclose(bases[t].T @ bases[t], np.eye(2), atol=1e-5)
        if projector.uses_gradient:  # SVD of the gradient seen at the last refresh
            assert _is_svd_basis(bases[t], grads[t - t % TAU], 2), t


@pytest.mark.parametrize(("switch_step", "first_random"), [(6, 6), (4, 6)])
def test_hybrid_switches_at_first_refresh_at_or_after_switch_step(switch_step, first_random):
    """hybrid(switch_step): SVD bases at refreshes before the switch, random ones from then on."""
    grads, bases = _run_bases(projectors.hybrid(switch_step), 4 * TAU)
    for t in range(0, 4 * TAU, TAU):
        assert _is_svd_basis(bases[t], grads[t], 2) == (t < first_random), t
        np.testing.assert_allclose(bases[t].T @ bases[t], np.eye(2), atol=1e-5)
    # Between refreshes nothing changes, before or after the switch.
    for t in range(1, 4 * TAU):
        if t % TAU:
            np.testing.assert_array_equal(bases[t], bases[t - 1])


# --------------------------------------------------------------------------------------------
# non-finite and zero gradients at a refresh keep the previous basis
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("projector", [projectors.svd(), projectors.random()], ids=str)
def test_bad_gradient_at_refresh_keeps_previous_basis(projector):
    """A NaN/inf/all-zero gradient at a refresh never writes a bad basis into the state.

    SVD keeps the previous basis; the random projector ignores the gradient and refreshes.
    (An inf entry once hung LAPACK's SVD: this test would then never finish.)
    """
    tx = scale_by_subspace(
        optax.identity(), rank=2, update_every=2, projector=projector, mask={"w": True}
    )
    shape = (4, 6)
    params = {"w": jnp.zeros(shape)}
    update = jax.jit(tx.update)
    g0 = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    _, state = update({"w": g0}, tx.init(params))
    _, state = update({"w": g0}, state)
    bad = {"nan": jnp.full(shape, jnp.nan), "inf": g0.at[0, 0].set(jnp.inf)}
    bad["zero"] = jnp.zeros(shape)
    for name, g_bad in bad.items():
        before = np.asarray(state.bases["w"])
        _, new_state = update({"w": g_bad}, state)  # step 2: a refresh step
        after = np.asarray(new_state.bases["w"])
        assert np.all(np.isfinite(after)), name
        if projector.uses_gradient:
            np.testing.assert_array_equal(after, before, err_msg=name)
        else:
            assert not np.allclose(after, before), name
            np.testing.assert_allclose(after.T @ after, np.eye(2), atol=1e-5, err_msg=name)
