"""Optimizer-state size: measured on a state, and in closed form for a param tree."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from golore_jax.planning import MaskArg, RankRule, subspace_layouts


def optimizer_state_floats(state: Any) -> int:
    """Number of floating-point elements held in an optimizer state (ints and keys excluded).

    >>> import optax
    >>> optimizer_state_floats(optax.adam(1e-3).init({"w": jnp.zeros((4, 6))}))  # mu and nu
    48
    """
    return sum(
        math.prod(jnp.shape(x))
        for x in jax.tree_util.tree_leaves(state)
        if jnp.issubdtype(jnp.result_type(x), jnp.floating)
    )


def subspace_state_floats(
    params: Any,
    *,
    rank: RankRule,
    moments: int = 2,
    mask: MaskArg = None,
    side: str = "gradient",
) -> int:
    """Closed form of the floats in ``scale_by_subspace(inner, side=side)``'s state.

    Per projected leaf ``m x n`` (``side`` rule of :mod:`golore_jax.layout`): the basis
    (``m*r`` on the left, ``n*r`` on the right) plus ``moments`` low-rank moments of ``r*n``
    (left) or ``m*r`` (right) floats (:func:`golore_jax.layout.state_floats`); per other leaf,
    ``moments`` full-size moments. For Adam ``moments=2``, for momentum SGD 1.

    >>> subspace_state_floats({"w": jax.ShapeDtypeStruct((4, 6), jnp.float32)}, rank=2)
    32
    """
    layouts = subspace_layouts(params, rank=rank, mask=mask, side=side, moments=moments)
    total = 0
    for leaf, lay in zip(jax.tree_util.tree_leaves(params), layouts.values(), strict=True):
        if lay is None:
            total += moments * math.prod(jnp.shape(leaf))
        else:
            total += lay.state_floats(moments)
    return total
