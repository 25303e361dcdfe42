"""How a refresh batches its projector calls (golore_jax/_subspace.py ``_refresh_batches``).

Projectors that choose from ``g g^T`` alone (``gram_eigh``, GoLore's hybrid with it) decompose
every Gram matrix of one size in one batched call, also those of gradients of different shapes;
projectors that read the gradient itself (``svd``) get one call per gradient shape. Either way
the bases equal those of a refresh that decomposes each leaf alone.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from golore_jax import projectors
from golore_jax._subspace import scale_by_subspace
from tests.jaxpr_walk import iter_equations

RANK = 3
# projected dim 8 for all: two square leaves, a left (8 x 20) and a right (20 x 8) projection
SHAPES = {"q": (8, 8), "k": (8, 8), "up": (8, 20), "down": (20, 8)}


def _grads(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {name: jnp.asarray(rng.standard_normal(s), jnp.float32) for name, s in SHAPES.items()}


def _tx(projector, batch_refresh: bool = True, update_every: int = 1, batch_size=None):
    return scale_by_subspace(
        optax.scale_by_adam(),
        rank=RANK,
        update_every=update_every,
        projector=projector,
        mask={name: True for name in SHAPES},
        batch_refresh=batch_refresh,
        refresh_batch_size=batch_size,
    )


def _decompositions(projector, batch_size=None) -> list[tuple[str, tuple[int, ...]]]:
    """(primitive, operand shape) of every eigh/SVD in one update's jaxpr."""
    tx = _tx(projector, batch_size=batch_size)
    grads = _grads()
    jaxpr = jax.make_jaxpr(tx.update)(grads, tx.init(grads))
    return [
        (eqn.primitive.name, tuple(eqn.invars[0].aval.shape))
        for eqn in iter_equations(jaxpr.jaxpr)
        if eqn.primitive.name in ("eigh", "svd")
    ]


def test_gram_projector_decomposes_all_shapes_of_one_size_in_one_call():
    assert _decompositions(projectors.gram_eigh()) == [("eigh", (4, 8, 8))]


def test_gradient_reading_projector_gets_one_call_per_gradient_shape():
    calls = _decompositions(projectors.svd())
    assert sorted(shape for _, shape in calls) == [(2, 8, 8), (2, 8, 20)]


@pytest.mark.parametrize(
    ("batch_size", "expected"),
    [
        (1, [(1, 8, 8)] * 4),
        (3, [(3, 8, 8), (1, 8, 8)]),  # q, k, up | down: a call may span gradient shapes
        (4, [(4, 8, 8)]),
        (100, [(4, 8, 8)]),
    ],
)
def test_refresh_batch_size_bounds_each_call(batch_size, expected):
    calls = _decompositions(projectors.gram_eigh(), batch_size)
    assert [shape for _, shape in calls] == expected


def test_refresh_batch_size_splits_calls_per_gradient_shape():
    calls = _decompositions(projectors.svd(), batch_size=1)
    assert sorted(shape for _, shape in calls) == [(1, 8, 8)] * 2 + [(1, 8, 20)] * 2


def test_bounded_calls_run_one_after_another():
    """Each bounded call after the first takes its gradients through an optimization barrier
    together with the previous call's result, so XLA cannot hold two calls' workspaces."""
    tx = _tx(projectors.gram_eigh(), batch_size=1)
    grads = _grads()
    jaxpr = jax.make_jaxpr(tx.update)(grads, tx.init(grads))
    names = [eqn.primitive.name for eqn in iter_equations(jaxpr.jaxpr)]
    assert names.count("optimization_barrier") == 3, names
    unbounded = _tx(projectors.gram_eigh())
    jaxpr = jax.make_jaxpr(unbounded.update)(grads, unbounded.init(grads))
    assert "optimization_barrier" not in [e.primitive.name for e in iter_equations(jaxpr.jaxpr)]


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "8"])
def test_refresh_batch_size_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="refresh_batch_size must be a positive int or None"):
        _tx(projectors.gram_eigh(), batch_size=bad)


@pytest.mark.parametrize(
    ("projector", "expected"),
    [
        (projectors.gram_eigh(), True),
        (projectors.svd(), False),
        (projectors.subspace_iteration(), False),
        (projectors.hybrid(4, projectors.gram_eigh(), projectors.random()), True),
        (projectors.hybrid(4, projectors.svd(), projectors.random()), False),
    ],
)
def test_reads_gram(projector, expected):
    assert projectors.reads_gram(projector) is expected


def _projection(basis: jax.Array) -> np.ndarray:
    """``P P^T``: the subspace, free of the eigenvectors' signs."""
    return np.asarray(basis @ basis.T)


PROJECTORS = {
    "gram_eigh": projectors.gram_eigh(),
    "random": projectors.random(),
    "subspace_iteration": projectors.subspace_iteration(),
    # refreshes at steps 0 (gram_eigh) and 1 (random)
    "hybrid": projectors.hybrid(1, projectors.gram_eigh(), projectors.random()),
}


class MergedRefreshTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_same_bases_as_one_leaf_at_a_time(self):
        for name, projector in PROJECTORS.items():
            batched, per_leaf = _tx(projector, True), _tx(projector, False)
            update_b, update_p = self.variant(batched.update), self.variant(per_leaf.update)
            state_b, state_p = batched.init(_grads()), per_leaf.init(_grads())
            for step in range(2):  # a first (cold) refresh, then a warm one
                grads = _grads(seed=step + 1)
                _, state_b = update_b(grads, state_b)
                _, state_p = update_p(grads, state_p)
                for leaf in SHAPES:
                    np.testing.assert_allclose(
                        _projection(state_b.bases[leaf]),
                        _projection(state_p.bases[leaf]),
                        atol=1e-5,
                        err_msg=f"{name}, step {step}, leaf {leaf}",
                    )

    @chex.variants(with_jit=True, without_jit=True)
    def test_bounded_batches_give_the_unbounded_refresh(self):
        """Same keys per leaf, same decompositions; batches of 3 split q, k, up | down, so one
        bounded call spans two gradient shapes."""
        cases = {"svd": projectors.svd(), "hybrid": PROJECTORS["hybrid"]}  # gram, then random
        for name, projector in cases.items():
            whole, bounded = _tx(projector), _tx(projector, batch_size=3)
            update_w, update_b = self.variant(whole.update), self.variant(bounded.update)
            state_w, state_b = whole.init(_grads()), bounded.init(_grads())
            for step in range(2):
                grads = _grads(seed=step + 1)
                out_w, state_w = update_w(grads, state_w)
                out_b, state_b = update_b(grads, state_b)
                for leaf in SHAPES:
                    msg = f"{name}, step {step}, leaf {leaf}"
                    np.testing.assert_allclose(
                        _projection(state_b.bases[leaf]),
                        _projection(state_w.bases[leaf]),
                        atol=1e-5,
                        err_msg=msg,
                    )
                    np.testing.assert_allclose(
                        out_b[leaf], out_w[leaf], rtol=1e-4, atol=1e-5, err_msg=msg
                    )

    @chex.variants(with_jit=True, without_jit=True)
    def test_subspace_iteration_with_cold_and_warm_leaves_in_one_batch(self):
        """A batch mixing a leaf without a basis (cold: exact) and warm leaves."""
        batched = _tx(projectors.subspace_iteration(), True)
        per_leaf = _tx(projectors.subspace_iteration(), False)
        _, state = batched.update(_grads(seed=1), batched.init(_grads()))
        state = state._replace(bases={**state.bases, "q": jnp.zeros_like(state.bases["q"])})
        grads = _grads(seed=2)
        _, after_b = self.variant(batched.update)(grads, state)
        _, after_p = self.variant(per_leaf.update)(grads, state)
        for leaf in SHAPES:
            np.testing.assert_allclose(
                _projection(after_b.bases[leaf]),
                _projection(after_p.bases[leaf]),
                atol=1e-5,
                err_msg=leaf,
            )
        _, vectors = np.linalg.eigh(np.asarray(grads["q"] @ grads["q"].T, np.float64))
        top = vectors[:, ::-1][:, :RANK]
        np.testing.assert_allclose(_projection(after_b.bases["q"]), top @ top.T, atol=1e-4)

    @chex.variants(with_jit=True, without_jit=True)
    def test_a_bad_leaf_keeps_its_basis_and_the_others_refresh(self):
        tx = _tx(projectors.gram_eigh())
        update = self.variant(tx.update)
        _, state = update(_grads(seed=1), tx.init(_grads()))
        grads = _grads(seed=2)
        grads["up"] = grads["up"].at[0, 0].set(jnp.inf)
        grads["k"] = jnp.zeros_like(grads["k"])
        _, after = update(grads, state)
        for leaf in ("up", "k"):  # non-finite / all-zero gradient: previous basis kept
            np.testing.assert_array_equal(after.bases[leaf], state.bases[leaf], err_msg=leaf)
        for leaf in ("q", "down"):  # refreshed from the new gradient: its top-r eigenvectors
            g = grads[leaf] if leaf == "q" else grads[leaf].T
            _, vectors = np.linalg.eigh(np.asarray(g @ g.T, np.float64))
            top = vectors[:, ::-1][:, :RANK]
            np.testing.assert_allclose(
                _projection(after.bases[leaf]), top @ top.T, atol=1e-4, err_msg=leaf
            )


def test_batched_subspace_iteration_decides_cold_or_warm_once():
    """Under vmap, the cold (exact eigh) and warm (iteration) branches sit in one switch on an
    unbatched index, not side by side with a select between them (a vmapped lax.cond on a
    batched predicate runs both branches)."""
    rng = np.random.default_rng(0)
    g = jnp.asarray(rng.standard_normal((4, 8, 20)), jnp.float32)
    previous = jnp.zeros((4, 8, RANK), jnp.float32)
    batched = jax.vmap(projectors.subspace_iteration(), in_axes=(None, 0, 0, None))
    jaxpr = jax.make_jaxpr(batched)(jax.random.key(0), g, previous, jnp.int32(0))
    top_level = [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns]
    assert "cond" in top_level, top_level
    assert not {"eigh", "householder_product", "geqrf"} & set(top_level), top_level
