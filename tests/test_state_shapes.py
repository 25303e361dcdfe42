"""A leaf whose shape changed between ``init`` and ``update``: one line naming the leaf
(golore_jax/_state_shapes.py), found at trace time, for each subspace transform."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax
import pytest

from golore_jax._online_pca import scale_by_online_subspace
from golore_jax._sparse import scale_by_sparse_subspace
from golore_jax._state_shapes import shape_checker
from golore_jax._subspace import scale_by_subspace

PARAMS = {"a": {"w": jnp.ones((8, 6))}, "b": jnp.ones((3,))}
TRANSFORMS = {
    "scale_by_subspace": lambda: scale_by_subspace(optax.scale_by_adam(), rank=2, update_every=2),
    "scale_by_online_subspace": lambda: scale_by_online_subspace(optax.scale_by_adam(), rank=2),
    "scale_by_sparse_subspace": lambda: scale_by_sparse_subspace(
        optax.scale_by_adam(), density=0.25, update_every=2
    ),
}
CHANGES = {  # leaf -> new shape
    "['a']['w']": ((9, 6), lambda p: {**p, "a": {"w": jnp.ones((9, 6))}}),
    "['a']['w'] columns": ((8, 5), lambda p: {**p, "a": {"w": jnp.ones((8, 5))}}),
    "['b']": ((4,), lambda p: {**p, "b": jnp.ones((4,))}),
}


@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("owner", list(TRANSFORMS))
def test_changed_leaf_shape_is_one_line_naming_the_leaf(owner, change):
    tx = TRANSFORMS[owner]()
    state = tx.init(PARAMS)
    shape, changed = CHANGES[change]
    leaf = change.split(" ")[0]
    updates = changed(PARAMS)
    with pytest.raises(ValueError) as raised:
        jax.jit(tx.update)(updates, state, updates)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"{owner}: leaf {leaf} has shape {shape}, but the optimizer state ")
    assert re.search(r"\(state \.\S+: \([\d, ]*\), this update needs \([\d, ]*\)\)", message)
    # Unchanged shapes: the same update traces and runs.
    out, _ = jax.jit(tx.update)(PARAMS, state, PARAMS)
    assert jax.tree.map(jnp.shape, out) == jax.tree.map(jnp.shape, PARAMS)


def test_the_check_traces_init_once_per_update_signature():
    """Eager updates with one signature trace ``init`` once; a new signature once more."""
    traced = []

    def init(params):
        traced.append(1)
        return {"m": jax.tree.map(jnp.zeros_like, params)}

    check = shape_checker("t", init)
    state = init(PARAMS)
    traced.clear()
    for _ in range(3):
        check(PARAMS, state)
    assert len(traced) == 1
    with pytest.raises(ValueError, match=r"^t: leaf \['b'\] has shape \(4,\)"):
        check(CHANGES["['b']"][1](PARAMS), state)
    assert len(traced) == 2


def test_a_state_of_another_structure_is_left_to_the_transform():
    """Only shapes are this check's business: a state whose tree differs passes through."""
    check = shape_checker("t", lambda p: {"m": p})
    check(PARAMS, {"other": jnp.zeros(2)})
