"""A one-line error naming the leaf whose shape changed between a transform's ``init`` and its
``update``: otherwise the first mismatch surfaces deep in a projection or an inner moment
(``add got incompatible shapes for broadcasting: (4,), (3,)``), naming no leaf.

The check compares the state with ``jax.eval_shape`` of the transform's own ``init`` on the
updates, at trace time, cached per update signature (tree structure, shapes, dtypes): a jitted
step pays nothing per step, an eager one a dict lookup and a shape comparison.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

# Signatures kept per transform: a few shapes (e.g. per-layer and whole-model calls) at most.
_CACHE_SIZE = 16


def _signature(updates: Any) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    return treedef, tuple((tuple(np.shape(x)), str(getattr(x, "dtype", type(x)))) for x in leaves)


def _param_path(state_path: str, param_paths: list[str]) -> str | None:
    """The param leaf a state leaf belongs to: the longest param path its path ends with (the
    bases, the inner moments and their kin mirror the params' tree)."""
    matches = [p for p in param_paths if p and state_path.endswith(p)]
    return max(matches, key=len) if matches else None


def shape_checker(owner: str, init_fn: Callable[[Any], Any]) -> Callable[[Any, Any], None]:
    """``check(updates, state)``: raises ``ValueError`` naming the leaf when ``state`` was made by
    ``init_fn`` for params whose shapes differ from ``updates``'. Structures that differ, or
    updates ``init_fn`` cannot take, are left to the transform's own checks.

    >>> import jax.numpy as jnp, optax
    >>> check = shape_checker("adam", optax.scale_by_adam().init)
    >>> state = optax.scale_by_adam().init({"w": jnp.zeros(3)})
    >>> check({"w": jnp.zeros(3)}, state)  # same shapes: nothing to say
    >>> check({"w": jnp.zeros(4)}, state)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: adam: leaf ['w'] has shape (4,), but the optimizer state was initialised for ...
    """
    expected_by_signature: dict[tuple, Any] = {}

    def check(updates: Any, state: Any) -> None:
        signature = _signature(updates)
        if signature not in expected_by_signature:
            try:
                expected = jax.eval_shape(init_fn, updates)
            except Exception:  # e.g. a float0 leaf: the update's own checks name it
                expected = None
            if len(expected_by_signature) >= _CACHE_SIZE:
                expected_by_signature.pop(next(iter(expected_by_signature)))
            expected_by_signature[signature] = expected
        expected = expected_by_signature[signature]
        if expected is None:
            return
        got, got_def = jax.tree_util.tree_flatten_with_path(state)
        want, want_def = jax.tree_util.tree_flatten_with_path(expected)
        if got_def != want_def:
            return
        for (path, leaf), (_, spec) in zip(got, want, strict=True):
            if tuple(np.shape(leaf)) == tuple(spec.shape):
                continue
            where = jax.tree_util.keystr(path)
            params = [
                (jax.tree_util.keystr(p), u)
                for p, u in jax.tree_util.tree_leaves_with_path(updates)
            ]
            name = _param_path(where, [p for p, _ in params])
            update_shape = dict(params)[name].shape if name is not None else None
            leaf_text = (
                f"leaf {name} has shape {tuple(update_shape)}"
                if name is not None
                else "an update leaf has a new shape"
            )
            raise ValueError(
                f"{owner}: {leaf_text}, but the optimizer state was initialised for another "
                f"shape (state {where}: {tuple(np.shape(leaf))}, this update needs "
                f"{tuple(spec.shape)}); call init again after changing a param's shape"
            )

    return check
