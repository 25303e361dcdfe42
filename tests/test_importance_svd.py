"""The importance-sampled SVD projector (the GoLore authors' ``torch.multinomial(s, rank)``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from golore_jax import projectors

DRAWS = 4000
SINGULAR_VALUES = np.array([5.0, 3.0, 1.5, 0.5])


def _matrix(rng):
    """A 4 x 7 matrix with known singular values and left singular vectors ``u``."""
    u = np.linalg.qr(rng.standard_normal((4, 4)))[0]
    v = np.linalg.qr(rng.standard_normal((7, 4)))[0]
    return u, (u * SINGULAR_VALUES) @ v.T


def _draw(g, rank, draws):
    projector = projectors.importance_svd()
    previous = jnp.zeros((g.shape[0], rank))
    keys = jax.random.split(jax.random.key(0), draws)
    sample = jax.vmap(lambda key: projector(key, jnp.asarray(g, jnp.float32), previous, 0))
    return np.asarray(jax.jit(sample)(keys))


def _chosen_directions(bases, u):
    """Index of the singular direction each basis column equals (up to sign)."""
    overlaps = np.abs(np.einsum("dr,bdk->bkr", u, bases))  # (draws, r, 4)
    assert np.all(np.max(overlaps, axis=-1) > 1 - 1e-4)  # every column is some u_i
    return np.argmax(overlaps, axis=-1)


def test_rank_one_picks_direction_i_with_probability_proportional_to_s_i():
    """r = 1: direction i with probability s_i / sum(s). 4000 vmapped draws; chi-square
    goodness of fit rejected at p < 1e-3, and each frequency within 5 binomial standard errors
    of s_i / sum(s)."""
    u, g = _matrix(np.random.default_rng(0))
    chosen = _chosen_directions(_draw(g, 1, DRAWS), u)[:, 0]
    counts = np.bincount(chosen, minlength=4)
    p = SINGULAR_VALUES / SINGULAR_VALUES.sum()
    assert stats.chisquare(counts, DRAWS * p).pvalue > 1e-3, counts
    stderr = np.sqrt(p * (1 - p) / DRAWS)
    np.testing.assert_array_less(np.abs(counts / DRAWS - p), 5 * stderr)


def test_rank_two_draws_distinct_directions_and_an_orthonormal_basis():
    """r = 2: no repeated direction, orthonormal columns, and the first-pick marginal of
    sampling without replacement: P(i in set) = p_i + sum_{j != i} p_j p_i / (1 - p_j)."""
    u, g = _matrix(np.random.default_rng(1))
    bases = _draw(g, 2, DRAWS)
    np.testing.assert_allclose(
        np.einsum("bdr,bds->brs", bases, bases),
        np.broadcast_to(np.eye(2), (DRAWS, 2, 2)),
        atol=1e-5,
    )
    chosen = _chosen_directions(bases, u)
    assert np.all(chosen[:, 0] != chosen[:, 1])
    p = SINGULAR_VALUES / SINGULAR_VALUES.sum()
    inclusion = p + np.array(
        [sum(p[j] * p[i] / (1 - p[j]) for j in range(4) if j != i) for i in range(4)]
    )
    freq = np.bincount(chosen.ravel(), minlength=4) / DRAWS
    stderr = np.sqrt(inclusion * (1 - inclusion) / DRAWS)
    np.testing.assert_array_less(np.abs(freq - inclusion), 5 * stderr)
