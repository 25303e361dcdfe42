"""The update tail shared by every subspace transform: compress each gradient, run the inner
optax transform once on the compressed tree, expand its output back to the param's shape.

A basis compresses by ``P^T G`` and expands by ``P N`` (:func:`update_in_subspace`, used by
``scale_by_subspace`` and ``scale_by_online_subspace``); a set of entries gathers and scatters
(:mod:`golore_jax._sparse`). Both go through :func:`update_through`.

>>> import jax.numpy as jnp, optax
>>> grads = [jnp.ones((2, 3)), jnp.ones(3)]
>>> treedef = jax.tree_util.tree_structure([0, 0])
>>> out, _ = update_through(optax.scale(-1.0), treedef, grads,
...     [lambda g: g[0], None], [lambda n: jnp.stack([n, n]), None], (), None, 0.5, {})
>>> out[0].tolist(), out[1].tolist()
([[-0.5, -0.5, -0.5], [-0.5, -0.5, -0.5]], [-1.0, -1.0, -1.0])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from golore_jax import _explicit
from golore_jax import _layout as layout_lib
from golore_jax._layout import MatrixLayout


def _without_rank(spec: Any, lay: MatrixLayout) -> Any:
    """A low-rank spec with its rank dim unsharded (``r x n`` on the left, ``m x r`` right)."""
    rows, cols = tuple(spec) + (None,) * (2 - len(spec))
    return type(spec)(None, cols) if lay.side == layout_lib.LEFT else type(spec)(rows, None)


def update_through(
    inner: optax.GradientTransformationExtraArgs,
    treedef: Any,
    grads: list[jax.Array],
    compress: list[Callable[[jax.Array], jax.Array] | None],
    expand: list[Callable[[jax.Array], jax.Array] | None],
    inner_state: Any,
    params: Any,
    scale: float,
    extra_args: dict[str, Any],
) -> tuple[list[jax.Array], Any]:
    """``N = inner(compress(G))``, then ``scale * expand(N)`` in the param dtype, leaf by leaf.

    Leaves whose ``compress`` is None go through ``inner`` at full shape. The one update tail
    of every subspace transform: a basis (``P^T G`` / ``P N``, :func:`update_in_subspace`) or
    a set of entries (gather / scatter, :mod:`golore_jax._sparse`).
    """
    low = [g if c is None else c(g) for g, c in zip(grads, compress, strict=True)]
    inner_updates, inner_state = inner.update(
        treedef.unflatten(low), inner_state, None, **extra_args
    )
    param_leaves = None if params is None else treedef.flatten_up_to(params)
    out = []
    for i, (n, e) in enumerate(zip(treedef.flatten_up_to(inner_updates), expand, strict=True)):
        if e is None:
            out.append(n)
            continue
        dtype = grads[i].dtype if param_leaves is None else param_leaves[i].dtype
        out.append((scale * e(n)).astype(dtype))
    return out, inner_state


def update_in_subspace(
    inner: optax.GradientTransformationExtraArgs,
    treedef: Any,
    grads: list[jax.Array],
    layouts: list[MatrixLayout | None],
    bases: list[Any],
    inner_state: Any,
    params: Any,
    scale: float,
    extra_args: dict[str, Any],
    projection_dtype: Any = None,
    shardings: list[Any] | None = None,
) -> tuple[list[jax.Array], Any]:
    """``R = P^T G``, ``N = inner(R)``, ``scale * P N`` in the param dtype, leaf by leaf.

    Leaves without a layout go through ``inner`` at full shape. Shared by the transforms whose
    subspace is a basis (SVD/random refreshes here, online PCA in :mod:`golore_jax._online_pca`).
    The two matmuls take their operands in ``projection_dtype`` (None: fp32) and accumulate in
    fp32; ``R`` and ``N`` are fp32. ``shardings``: per leaf, None or its ``(basis, low-rank,
    matrix)`` shardings on a mesh with Explicit axes (:mod:`golore_jax._explicit`): ``R`` gets
    the low-rank moments' sharding and ``P N`` the param's.
    """
    operand_dtype = jnp.float32 if projection_dtype is None else projection_dtype
    shardings = shardings or [None] * len(layouts)

    def compress(basis, lay, s):
        return lambda g: layout_lib.project(
            layout_lib.as_matrix(g.astype(operand_dtype), lay),
            basis,
            lay,
            operand_dtype,
            None if s is None else s[1],
        )

    def expand(basis, lay, s, g):
        if s is None:
            return lambda n: layout_lib.back_project(n, basis, lay, operand_dtype)
        # N's rank dim may share a mesh axis with P's rows: gather it first (as Auto meshes do).
        return lambda n: _explicit.like(
            layout_lib.back_project(
                _explicit.reshard_to(n, _without_rank(s[1].spec, lay)),
                basis,
                lay,
                operand_dtype,
                s[2],
            ),
            g,
        )

    triples = list(zip(bases, layouts, shardings, grads, strict=True))
    return update_through(
        inner,
        treedef,
        grads,
        [None if lay is None else compress(b, lay, s) for b, lay, s, _ in triples],
        [None if lay is None else expand(b, lay, s, g) for b, lay, s, g in triples],
        inner_state,
        params,
        scale,
        extra_args,
    )
