"""Planning: which leaves a subspace transform projects, how each is seen as a matrix, and the
argument checks shared by every transform of the family.

Everything here is static (shapes, dtypes, paths, Python arguments): it runs at trace time,
raises one-line errors naming the leaf, and allocates nothing.

>>> import jax.numpy as jnp
>>> params = {"embed": jnp.zeros((10, 4)), "w": jnp.zeros((4, 6)), "b": jnp.zeros(6)}
>>> default_mask(params)
{'b': False, 'embed': False, 'w': True}
>>> subspace_layouts(params, rank=2)["['w']"].low_rank_shape
(2, 6)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from golore_jax import _layout as layout_lib
from golore_jax._layout import MatrixLayout

# Leaves whose path matches this are not projected by the default mask (embeddings, output head).
DEFAULT_EXCLUDE = r"embed|lm_head|wte|wpe|output_head"

RankRule = int | Callable[[str, tuple[int, int]], int | None]
MaskArg = Any  # None | pytree of bools | Callable[[params], pytree of bools]


def default_mask(params: Any, exclude: str = DEFAULT_EXCLUDE) -> Any:
    """Projects floating leaves with >= 2 dims whose path does not match ``exclude``.

    This mirrors GaLore's "galore params" group: attention and MLP matrices are projected;
    embeddings, the output head, norms and biases are not.


    >>> default_mask({"embed": jnp.zeros((10, 4)), "mlp": jnp.zeros((4, 8)), "norm": jnp.ones(4)})
    {'embed': False, 'mlp': True, 'norm': False}
    """
    pattern = re.compile(exclude, re.IGNORECASE)

    def select(path, leaf):
        return (
            jnp.ndim(leaf) >= 2
            and jnp.issubdtype(jnp.result_type(leaf), jnp.floating)
            and not pattern.search(jax.tree_util.keystr(path))
        )

    return jax.tree_util.tree_map_with_path(select, params)


def resolve_mask(mask: MaskArg, params: Any) -> list[bool]:
    """The mask as a list of bools aligned with ``params``' leaves; checks its structure."""
    if mask is None:
        mask = default_mask(params)
    elif callable(mask):
        mask = mask(params)
    param_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    mask_leaves = jax.tree_util.tree_leaves_with_path(mask)
    mask_paths = [jax.tree_util.keystr(p) for p, _ in mask_leaves]
    if mask_paths != param_paths:
        missing = sorted(set(param_paths) - set(mask_paths))[:5]
        extra = sorted(set(mask_paths) - set(param_paths))[:5]
        raise ValueError(
            "scale_by_subspace: the mask's structure does not match the params: "
            f"params leaves missing from the mask: {missing}; mask leaves not in params: {extra}"
        )
    return [bool(m) for _, m in mask_leaves]


def leaf_layout(
    path: str,
    leaf: Any,
    selected: bool,
    rank: RankRule,
    matrix_split: Callable[[str, tuple[int, ...]], int | None] | None,
    allow_full_rank: bool,
    side: str = "gradient",
    moments: tuple[int, int] = (2, 0),
) -> MatrixLayout | None:
    """Validates one leaf and returns its layout (None when it is not projected)."""
    if not selected:
        return None
    shape = tuple(jnp.shape(leaf))
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
        raise TypeError(
            f"scale_by_subspace: leaf {path} is selected for projection but has non-floating "
            f"dtype {jnp.result_type(leaf)}"
        )
    if len(shape) < 2:
        raise ValueError(
            f"scale_by_subspace: leaf {path} of shape {shape} is selected for projection but a "
            "projected leaf needs at least 2 dimensions"
        )
    split = matrix_split(path, shape) if matrix_split is not None else None
    rows_cols = layout_lib.make_layout(shape, 1, split, side, *moments)
    leaf_rank = rank(path, (rows_cols.rows, rows_cols.cols)) if callable(rank) else rank
    if leaf_rank is None:
        return None
    if isinstance(leaf_rank, bool) or not isinstance(leaf_rank, int) or leaf_rank <= 0:
        raise ValueError(
            f"scale_by_subspace: rank for leaf {path} must be a positive int, got {leaf_rank!r}"
        )
    smaller = min(rows_cols.rows, rows_cols.cols)
    if leaf_rank > smaller or (leaf_rank == smaller and not allow_full_rank):
        raise ValueError(
            f"scale_by_subspace: rank {leaf_rank} for leaf {path} (seen as a "
            f"{rows_cols.rows}x{rows_cols.cols} matrix) must be < min(m, n) = {smaller}; "
            "a full-rank projection saves nothing (allow_full_rank=True permits rank == min(m, n))"
        )
    return rows_cols._replace(rank=leaf_rank)


def plan_layouts(
    tree: Any,
    mask: MaskArg,
    rank: RankRule,
    matrix_split: Callable[[str, tuple[int, ...]], int | None] | None,
    allow_full_rank: bool,
    side: str = "gradient",
    moments: tuple[int, int] = (2, 0),
) -> tuple[list[MatrixLayout | None], Any]:
    """Per-leaf layouts (static: they depend only on shapes, dtypes and paths) and the treedef.

    ``moments``: ``(moments, basis_moments)`` of :func:`golore_jax._layout.state_floats`.
    """
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    selected = resolve_mask(mask, tree)
    layouts = [
        leaf_layout(
            jax.tree_util.keystr(path),
            leaf,
            sel,
            rank,
            matrix_split,
            allow_full_rank,
            side,
            moments,
        )
        for (path, leaf), sel in zip(leaves_with_paths, selected, strict=True)
    ]
    return layouts, treedef


def count_moments(inner: optax.GradientTransformation, params: Any) -> int:
    """How many params-shaped trees ``inner``'s state holds (2 for ``optax.scale_by_adam``,
    1 for ``optax.trace``, 0 for ``optax.identity``): the ``moments`` of the ``"state"`` side
    rule. Counted on ``jax.eval_shape`` of ``inner.init``, nothing is allocated. Quantised
    moments (a tuple per leaf, not a float array of its shape) are not counted.

    >>> count_moments(optax.adam(1e-3), {"w": jnp.zeros((4, 6))})
    2
    """
    structs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.float32), params)
    treedef = jax.tree_util.tree_structure(structs)
    shapes = [x.shape for x in jax.tree_util.tree_leaves(structs)]

    def count(state) -> int:
        if (
            shapes
            and jax.tree_util.tree_structure(state) == treedef
            and [jnp.shape(x) for x in jax.tree_util.tree_leaves(state)] == shapes
        ):
            return 1
        if isinstance(state, tuple | list):
            return sum(count(s) for s in state)
        if isinstance(state, dict):
            return sum(count(s) for s in state.values())
        return 0

    return count(jax.eval_shape(inner.init, structs))


def subspace_layouts(
    params: Any,
    *,
    rank: RankRule,
    mask: MaskArg = None,
    matrix_split: Callable[[str, tuple[int, ...]], int | None] | None = None,
    allow_full_rank: bool = False,
    side: str = "gradient",
    moments: int = 2,
    basis_moments: int = 0,
) -> dict[str, MatrixLayout | None]:
    """``{leaf path: MatrixLayout or None}`` (None where not projected), in leaf order.

    ``moments`` (the inner optimizer's :func:`count_moments`) and ``basis_moments`` (those of an
    optimizer of the bases) are read by ``side="state"``.
    Raises the same errors as ``scale_by_subspace(...).init(params)``.

    >>> lays = subspace_layouts({"w": jnp.zeros((8, 4)), "b": jnp.zeros(4)}, rank=2)
    >>> lays["['b']"], lays["['w']"].side, lays["['w']"].basis_shape, lays["['w']"].low_rank_shape
    (None, 'right', (4, 2), (8, 2))
    """
    layout_lib.check_side_rule(side, "subspace_layouts")
    layouts, _ = plan_layouts(
        params, mask, rank, matrix_split, allow_full_rank, side, (moments, basis_moments)
    )
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    return dict(zip(paths, layouts, strict=True))


# Operand dtypes of the per-step projection matmuls (``projection_dtype``).
PROJECTION_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def is_projection_dtype(dtype: Any) -> bool:
    try:
        return jnp.dtype(dtype) in PROJECTION_DTYPES
    except TypeError:  # not a dtype at all, e.g. "bf16"
        return False


def is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def require_positive_int(owner: str, name: str, value: Any, optional: bool = False) -> None:
    """Raises at construction unless ``value`` is a positive int (or None if ``optional``)."""
    require_static(owner, name, value)
    if not (is_positive_int(value) or (optional and value is None)):
        allowed = "a positive int or None" if optional else "a positive int"
        raise ValueError(f"{owner}: {name} must be {allowed}, got {value!r}")


def require_static(owner: str, name: str, value: Any) -> None:
    """Raises a one-line error naming the ``static_args`` to pass when a structural argument
    arrives as an array: ``optax.inject_hyperparams`` turns every int / float argument into a
    (traced) array, and calls every callable one as a schedule (a dtype such as
    ``jnp.bfloat16``, a mask function), unless it is listed in ``static_args``."""
    if isinstance(value, jax.Array | np.ndarray):  # tracers are jax.Arrays too
        raise TypeError(
            f"{owner}: {name} must be a Python value, got an array {type(value).__name__} (under "
            f"optax.inject_hyperparams, pass static_args=({name!r},))"
        )


def check_update_leaves(updates: Any, layouts: list, bases: list) -> None:
    """One-line errors naming the leaf for updates no optimizer can use: a float0 gradient
    (``jax.grad(allow_int=True)`` of an integer param), or a floating update of a leaf that
    ``init`` left unprojected because its param is not floating (e.g. int32)."""
    for (path, update), lay, base in zip(
        jax.tree_util.tree_leaves_with_path(updates), layouts, bases, strict=True
    ):
        where = jax.tree_util.keystr(path)
        if jnp.result_type(update) == jax.dtypes.float0:
            raise TypeError(
                f"scale_by_subspace: leaf {where} has a float0 gradient (an integer param): "
                "leave integer params out of the optimizer (e.g. optax.partition)"
            )
        if lay is not None and isinstance(base, optax.MaskedNode):
            raise TypeError(
                f"scale_by_subspace: leaf {where} gets a {jnp.result_type(update)} update but "
                "was not projected at init (its param is not floating): leave integer params "
                "out of the optimizer (e.g. optax.partition)"
            )


def as_key(seed: int | jax.Array) -> jax.Array:
    """A typed PRNG key from an int seed (possibly traced, e.g. under inject_hyperparams),
    a typed key, or legacy uint32[2] key data."""
    if isinstance(seed, jax.Array) and jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key):
        return seed
    if jnp.ndim(seed) == 1:
        return jax.random.wrap_key_data(jnp.asarray(seed, jnp.uint32))
    return jax.random.key(seed)


def require_finite(owner: str, name: str, value: Any) -> None:
    """Raises at construction if ``value`` is a Python number that is not finite (a traced
    value, e.g. under ``optax.inject_hyperparams``, is not checked)."""
    if isinstance(value, int | float) and not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be finite, got {value!r}")


def _zeros(shape: tuple[int, ...], dtype: Any, sharding: Any) -> jax.Array:
    # out_sharding only on Explicit meshes: elsewhere the same program as before.
    if sharding is None:
        return jnp.zeros(shape, dtype)
    return jnp.zeros(shape, dtype, out_sharding=sharding)


def zero_bases(
    layouts: list[MatrixLayout | None], dtype: Any = jnp.float32, shardings: Any = None
) -> list[Any]:
    """A zero ``(d, r)`` basis per projected leaf, ``optax.MaskedNode()`` for the others: the
    bases before the first refresh. ``shardings``: per leaf, None or the ``(basis, low-rank,
    full)`` shardings of :func:`golore_jax._explicit.matrix_shardings` (Explicit meshes)."""
    shardings = shardings or [None] * len(layouts)
    return [
        optax.MaskedNode() if lay is None else _zeros(lay.basis_shape, dtype, s and s[0])
        for lay, s in zip(layouts, shardings, strict=True)
    ]


def low_rank_like(
    leaves: list[Any], layouts: list[MatrixLayout | None], shardings: Any = None
) -> list[Any]:
    """What the inner transform is initialised on: an fp32 zero of the low-rank shape per
    projected leaf, the leaf itself for the others (``shardings`` as in :func:`zero_bases`)."""
    shardings = shardings or [None] * len(layouts)
    return [
        leaf if lay is None else _zeros(lay.low_rank_shape, jnp.float32, s and s[1])
        for leaf, lay, s in zip(leaves, layouts, shardings, strict=True)
    ]
