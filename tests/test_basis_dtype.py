"""bf16 storage of the bases (scale_by_subspace(basis_dtype=...))."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import golore_jax as gl
from golore_jax._subspace import scale_by_subspace


def _problem():
    params = {
        "a": jnp.zeros((24, 40)),  # left side: P is 24 x 6
        "b": jnp.zeros((40, 24)),  # right side: Q is 24 x 6
        "c": jnp.zeros((24, 40)),
        "norm": jnp.zeros((24,)),
    }
    leaves, treedef = jax.tree.flatten(params)

    def grads(step):
        return treedef.unflatten(
            [
                jax.random.normal(jax.random.fold_in(jax.random.key(i), step), p.shape)
                for i, p in enumerate(leaves)
            ]
        )

    return params, grads


def _optimizer(basis_dtype, **subspace):
    return gl.galore_adamw(
        1e-2,
        subspace=gl.Subspace(
            rank=6, update_every=3, projector=gl.projectors.gram_eigh(), **subspace
        ),
        execution=gl.Execution(basis_dtype=basis_dtype),
        weight_decay=0.0,
    )


def _bases(state):
    return state[0].bases


@pytest.mark.parametrize("momentum_projection", [False, True])
def test_bf16_bases_give_the_fp32_step_with_the_rounded_basis(momentum_projection):
    params, grads = _problem()
    low = _optimizer(jnp.bfloat16, momentum_projection=momentum_projection)
    full = _optimizer(None, momentum_projection=momentum_projection)
    low_state, full_state = low.init(params), full.init(params)
    assert _bases(low_state)["a"].dtype == jnp.bfloat16
    assert _bases(full_state)["a"].dtype == jnp.float32
    low_update, full_update = jax.jit(low.update), jax.jit(full.update)
    for step in range(5):  # refreshes at steps 0 and 3 (the second rotates the moments)
        # the fp32 optimizer starts each step from the bf16 one's state, bases as fp32
        rounded = jax.tree.map(lambda b: b.astype(jnp.float32), _bases(low_state))
        full_state = (low_state[0]._replace(bases=rounded), *low_state[1:])
        u_low, low_state = low_update(grads(step), low_state, params)
        u_full, full_state = full_update(grads(step), full_state, params)
        if step % 3 == 0:
            # a refresh decomposes in fp32 and stores the result rounded to nearest
            for name in ("a", "b", "c"):
                np.testing.assert_array_equal(
                    np.asarray(_bases(low_state)[name]),
                    np.asarray(_bases(full_state)[name].astype(jnp.bfloat16)),
                )
            continue  # this step's fp32 update used the unrounded new basis
        for name in params:
            np.testing.assert_array_equal(np.asarray(u_low[name]), np.asarray(u_full[name]))
    assert float(jnp.abs(u_low["a"]).max()) > 1e-4


def test_bf16_bases_halve_the_basis_bytes():
    params, _ = _problem()

    def basis_bytes(state):
        return sum(x.nbytes for x in jax.tree.leaves(_bases(state)))

    def state_bytes(state):
        return sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))

    low = jax.eval_shape(_optimizer(jnp.bfloat16).init, params)
    full = jax.eval_shape(_optimizer(None).init, params)
    low_b, full_b = (
        sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(_bases(s)))
        for s in (low, full)
    )
    assert full_b == 3 * 24 * 6 * 4 and low_b * 2 == full_b
    real_low, real_full = _optimizer(jnp.bfloat16).init(params), _optimizer(None).init(params)
    assert basis_bytes(real_low) * 2 == basis_bytes(real_full)
    assert state_bytes(real_full) - state_bytes(real_low) == full_b // 2


def test_bad_basis_dtype_is_rejected():
    with pytest.raises(ValueError, match="basis_dtype"):
        scale_by_subspace(optax.identity(), rank=2, update_every=1, basis_dtype="bf16")
