"""Fast GaLore projectors capture the exact top-r energy; what they guarantee on hard inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from golore_jax import projectors

FAST = {
    "gram_eigh": projectors.gram_eigh(),
    "subspace_iteration": projectors.subspace_iteration(),
}


def _gradient(d: int, k: int, spectrum: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(d, d)))
    v, _ = np.linalg.qr(rng.normal(size=(k, d)))
    return ((u * spectrum) @ v.T).astype(np.float32)


def _energy_ratio(basis, g: np.ndarray, rank: int) -> float:
    """||P^T G||^2 / ||U_r^T G||^2 with U_r from a float64 SVD."""
    u = np.linalg.svd(g.astype(np.float64))[0][:, :rank]
    captured = np.linalg.norm(np.asarray(basis, np.float64).T @ g) ** 2
    return captured / np.linalg.norm(u.T @ g) ** 2


def _choose(projector, g, previous):
    return jax.jit(projector)(jax.random.key(0), jnp.asarray(g), previous, jnp.int32(0))


@pytest.mark.parametrize("name", sorted(FAST))
@pytest.mark.parametrize("decay", ["power", "exponential"])
def test_decaying_spectrum_energy_at_least_0999(name, decay):
    """Realistic gradients (decaying spectra): >= 0.999 of the exact top-r energy, cold and warm."""
    d, k, r = 48, 120, 8
    i = np.arange(1, d + 1)
    spectrum = i**-1.0 if decay == "power" else np.exp(-i / 6.0)
    g = _gradient(d, k, spectrum)
    cold = _choose(FAST[name], g, jnp.zeros((d, r)))
    assert _energy_ratio(cold, g, r) >= 0.999
    np.testing.assert_allclose(np.asarray(cold.T @ cold), np.eye(r), atol=1e-5)
    # Warm start: the previous basis is the exact one of a perturbed gradient (an older step).
    rng = np.random.default_rng(1)
    older = g + 0.3 * np.linalg.norm(g) * rng.normal(size=g.shape).astype(np.float32) / np.sqrt(
        g.size
    )
    warm_start = jnp.asarray(np.linalg.svd(older)[0][:, :r], jnp.float32)
    warm = _choose(FAST[name], g, warm_start)
    if name == "subspace_iteration" and decay == "power":
        # What it guarantees: the error falls like (s_{r+1}/s_r)^(2q) with q iterations. With
        # s_i = 1/i at r = 8 the gap is 8/9, so the default q = 2 gives >= 0.998 (measured
        # 0.9984) from this stale start, and q = 6 reaches 0.999.
        assert _energy_ratio(warm, g, r) >= 0.998
        more = _choose(projectors.subspace_iteration(iterations=6), g, warm_start)
        assert _energy_ratio(more, g, r) >= 0.999
    else:
        assert _energy_ratio(warm, g, r) >= 0.999


@pytest.mark.parametrize("name", sorted(FAST))
def test_flat_spectrum_any_orthonormal_r_subset_is_optimal(name):
    """Flat spectrum: the top-r subspace is not unique; every orthonormal r-basis inside the
    spectrum's span is optimal, so the guarantee is energy == r/d of the total (exact)."""
    d, k, r = 32, 80, 6
    g = _gradient(d, k, np.ones(d))
    basis = _choose(FAST[name], g, jnp.zeros((d, r)))
    np.testing.assert_allclose(_energy_ratio(basis, g, r), 1.0, rtol=2e-3)


@pytest.mark.parametrize("name", sorted(FAST))
def test_rank_deficient_gradient_spans_its_range(name):
    """Rank(G) = 3 < r = 6: the basis captures all of G's energy and stays orthonormal (the
    extra directions are arbitrary, as for the SVD)."""
    d, k, r = 32, 80, 6
    spectrum = np.zeros(d)
    spectrum[:3] = [3.0, 2.0, 1.0]
    g = _gradient(d, k, spectrum)
    basis = np.asarray(_choose(FAST[name], g, jnp.zeros((d, r))), np.float64)
    np.testing.assert_allclose(np.linalg.norm(basis.T @ g) ** 2, np.linalg.norm(g) ** 2, rtol=1e-4)
    np.testing.assert_allclose(basis.T @ basis, np.eye(r), atol=1e-4)


@pytest.mark.parametrize("name", sorted(FAST))
def test_bf16_gradient_is_decomposed_in_fp32(name):
    """bf16 input: computed in fp32, so the energy matches the exact basis of the bf16 values."""
    d, k, r = 48, 120, 8
    g = _gradient(d, k, np.arange(1, d + 1) ** -1.0).astype(jnp.bfloat16)
    basis = _choose(FAST[name], g, jnp.zeros((d, r), jnp.float32))
    assert basis.dtype == jnp.float32
    assert _energy_ratio(basis, np.asarray(g, np.float32), r) >= 0.999


def test_polar_sampler_is_haar_like_qr():
    """Z (Z^T Z)^(-1/2): orthonormal, E[P P^T] = (r/m) I, and the sign-sensitive statistic
    E[tr P[:r, :r]] is 0 (4,000 draws; tolerances are 6 standard errors)."""
    m, r, n = 8, 3, 4000
    keys = jax.random.split(jax.random.key(0), n)
    p = jax.vmap(lambda k: projectors.haar_stiefel(k, (m, r), method="polar"))(keys)
    p = np.asarray(p, np.float64)
    np.testing.assert_allclose(
        np.einsum("bij,bik->bjk", p, p), np.broadcast_to(np.eye(r), (n, r, r)), atol=1e-5
    )
    mean_ppt = np.einsum("bij,bkj->ik", p, p) / n
    # Var of (P P^T)_ii is below 1/4, so 6 standard errors are < 6 * 0.5 / sqrt(n).
    np.testing.assert_allclose(mean_ppt, (r / m) * np.eye(m), atol=6 * 0.5 / np.sqrt(n))
    trace = np.trace(p[:, :r, :r], axis1=1, axis2=2)
    assert abs(trace.mean()) < 6 * trace.std() / np.sqrt(n)
