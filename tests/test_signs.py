"""The canonical sign of SVD / eigh bases: one basis whatever the decomposition, jit or sign."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from golore_jax import projectors
from golore_jax._subspace import scale_by_subspace

RANK = 4


def _gradient(key, shape=(10, 24)) -> jax.Array:
    """A gradient with a decaying, well-separated spectrum (gaps >= 25% of each value), so the
    top-RANK singular vectors are well defined and ``g g^T`` resolves them in fp32."""
    k1, k2 = jax.random.split(key)
    u, _ = jnp.linalg.qr(jax.random.normal(k1, (shape[0], shape[0])))
    v, _ = jnp.linalg.qr(jax.random.normal(k2, (shape[1], shape[0])))
    s = 0.75 ** jnp.arange(shape[0])
    return (u * s) @ v.T


def _choose(projector, g):
    return projector(jax.random.key(0), g, jnp.zeros((g.shape[0], RANK)), jnp.int32(0))


def test_canonical_signs_rule():
    """Each column's largest-|x| entry becomes positive; columns are only negated."""
    basis = jnp.array([[0.1, -0.9, 0.0], [-0.8, 0.2, 0.0], [0.3, 0.1, 0.0]])
    out = projectors.canonical_signs(basis)
    np.testing.assert_array_equal(out, basis * jnp.array([-1.0, -1.0, 1.0]))
    batched = projectors.canonical_signs(jnp.stack([basis, -basis]))
    np.testing.assert_array_equal(batched[0], batched[1])


@pytest.mark.parametrize("seed", range(3))
def test_sign_flipped_input_gives_the_same_basis(seed):
    """``-g`` and ``g D`` (``D`` a diagonal of random signs) have the left singular vectors of
    ``g`` up to sign, so the same canonical basis (the raw signs change: next test)."""
    g = _gradient(jax.random.key(seed))
    d_cols = jnp.where(jax.random.bernoulli(jax.random.key(100 + seed), 0.5, (g.shape[1],)), -1, 1)
    base = _choose(projectors.svd(), g)
    for flipped in (-g, g * d_cols[None, :]):
        np.testing.assert_allclose(_choose(projectors.svd(), flipped), base, atol=1e-5)
        np.testing.assert_allclose(_choose(projectors.gram_eigh(), flipped), base, atol=1e-4)


def test_raw_signs_do_flip():
    """Why the convention exists: on some of these inputs the raw LAPACK signs differ between
    ``g`` and ``-g`` or between the SVD and eigh paths (without it, test above would fail)."""
    flips = 0
    for seed in range(3):
        g = _gradient(jax.random.key(seed))
        raw = _choose(projectors.svd(canonical_signs=False), g)
        for other in (
            _choose(projectors.svd(canonical_signs=False), -g),
            _choose(projectors.gram_eigh(canonical_signs=False), g),
        ):
            flips += int(np.any(np.sum(np.asarray(raw) * np.asarray(other), axis=0) < 0))
    assert flips > 0


@pytest.mark.parametrize("seed", range(3))
def test_svd_and_gram_eigh_paths_agree(seed):
    """svd() and gram_eigh() give the same canonical basis (fp32; eigh of g g^T squares the
    condition number, hence 1e-4 on unit vectors with singular-value gaps >= 25%)."""
    g = _gradient(jax.random.key(seed))
    np.testing.assert_allclose(
        _choose(projectors.gram_eigh(), g), _choose(projectors.svd(), g), atol=1e-4
    )
    sub = projectors.subspace_iteration(iterations=2)
    np.testing.assert_allclose(_choose(sub, g), _choose(projectors.svd(), g), atol=1e-4)


@pytest.mark.parametrize("projector", [projectors.svd(), projectors.gram_eigh()])
def test_bases_identical_jit_and_no_jit(projector):
    """scale_by_subspace's refreshed bases are the same under jit and eagerly, and the
    batched (vmapped) refresh gives each leaf the basis its own call gives."""
    params = {"a": _gradient(jax.random.key(1)), "b": _gradient(jax.random.key(2)).T}
    tx = scale_by_subspace(optax.scale_by_adam(), rank=RANK, update_every=2, projector=projector)
    state = tx.init(params)
    _, eager = tx.update(params, state)
    _, jitted = jax.jit(tx.update)(params, state)
    for k in params:
        np.testing.assert_allclose(jitted.bases[k], eager.bases[k], atol=1e-6)
    np.testing.assert_allclose(eager.bases["a"], _choose(projector, params["a"]), atol=1e-6)
    np.testing.assert_allclose(eager.bases["b"], _choose(projector, params["b"].T), atol=1e-6)
    for basis in jax.tree.leaves(eager.bases):
        largest = jnp.take_along_axis(basis, jnp.argmax(jnp.abs(basis), 0)[None], 0)
        assert bool(jnp.all(largest > 0))
