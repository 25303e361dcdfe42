"""Optimizer-state size: measured on a state, and in closed form for a param tree (floats;
the bases' bytes under each ``basis_dtype``, INT4 included)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from golore_jax import _basis_storage as basis_storage
from golore_jax._planning import MaskArg, RankRule, subspace_layouts


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

    Per projected leaf ``m x n`` (``side`` rule of :mod:`golore_jax._layout`): the basis
    (``m*r`` on the left, ``n*r`` on the right) plus ``moments`` low-rank moments of ``r*n``
    (left) or ``m*r`` (right) floats (:func:`golore_jax._layout.state_floats`); per other leaf,
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


def optimizer_state_bytes(state: Any) -> int:
    """Bytes held by the numeric arrays of an optimizer state (floats, ints and the uint8 codes
    of INT4 bases or 8-bit moments; PRNG keys excluded).

    >>> import optax
    >>> optimizer_state_bytes(optax.adam(1e-3).init({"w": jnp.zeros((4, 6))}))  # + the count
    196
    """
    return sum(
        math.prod(jnp.shape(x)) * jnp.dtype(jnp.result_type(x)).itemsize
        for x in jax.tree_util.tree_leaves(state)
        if jnp.issubdtype(jnp.result_type(x), jnp.number)
        or jnp.issubdtype(jnp.result_type(x), jnp.bool_)
    )


def subspace_basis_bytes(
    params: Any,
    *,
    rank: RankRule,
    mask: MaskArg = None,
    side: str = "gradient",
    basis_dtype: Any = None,
    moments: int = 2,
) -> int:
    """Closed form of the bytes of ``scale_by_subspace(basis_dtype=...)``'s bases: per
    projected leaf ``d x r`` entries of 4 (fp32), 2 (bf16) or, for ``"int4"``,
    ``d * ceil(r / 2)`` code bytes plus an fp32 scale per 64 rows of a column
    (:func:`golore_jax._basis_storage.basis_nbytes`). ``moments`` is read by ``side="state"``.

    >>> shapes = {"w": jax.ShapeDtypeStruct((4096, 11008), jnp.float32)}
    >>> [subspace_basis_bytes(shapes, rank=1024, basis_dtype=d) // 2**20
    ...  for d in (None, jnp.bfloat16, "int4")]  # MiB
    [16, 8, 2]
    """
    layouts = subspace_layouts(params, rank=rank, mask=mask, side=side, moments=moments)
    storage = basis_storage.storage_of(basis_dtype)
    return sum(
        basis_storage.basis_nbytes(lay.basis_shape, storage)
        for lay in layouts.values()
        if lay is not None
    )
