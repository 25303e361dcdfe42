"""``scale_by_subspace``: project the gradient, run any optax transform on it, project back.

One step of Algorithm 1 of He et al. 2024 (arXiv 2410.11289) for each projected leaf ``G``::

    if t % tau == 0:  P = projector(G_sub)        # refresh, inside jit (lax.cond)
    R = P^T G                                      # or G Q on the right side
    N = inner(R)                                   # any optax GradientTransformation
    update = scale * P N                           # or scale * N Q^T

Leaves that are not projected go through the same ``inner`` at full shape. The state keeps the
step count, a PRNG key, one ``(d, r)`` fp32 basis per projected leaf and the inner state on the
low-rank shapes, which is where the memory saving comes from.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from golore_jax import layout as layout_lib
from golore_jax import projectors as projectors_lib
from golore_jax.layout import MatrixLayout

# Fields of optax states that hold a first or a second moment of the gradient.
FIRST_MOMENT_FIELDS = frozenset({"mu", "trace", "ema", "momentum"})
SECOND_MOMENT_FIELDS = frozenset({"nu"})
SECOND_MOMENT_POLICIES = ("keep", "project", "reset")

# Leaves whose path matches this are not projected by the default mask (embeddings, output head).
DEFAULT_EXCLUDE = r"embed|lm_head|wte|wpe|output_head"

RankRule = int | Callable[[str, tuple[int, int]], int | None]
MaskArg = Any  # None | pytree of bools | Callable[[params], pytree of bools]


class ScaleBySubspaceState(NamedTuple):
    """State of :func:`scale_by_subspace`.

    Attributes:
      count: number of updates applied so far (int32); refreshes happen when
        ``count % update_every == 0``.
      key: typed PRNG key, split at every step; a refresh uses a key folded with the leaf index.
      bases: per leaf, the orthonormal ``(d, r)`` fp32 basis (``P`` or ``Q``), or
        ``optax.MaskedNode()`` for leaves that are not projected.
      inner_state: state of the inner transform, initialised on the low-rank shapes.
    """

    count: jax.Array
    key: jax.Array
    bases: Any
    inner_state: Any


def default_mask(params: Any, exclude: str = DEFAULT_EXCLUDE) -> Any:
    """Projects floating leaves with >= 2 dims whose path does not match ``exclude``.

    This mirrors GaLore's "galore params" group: attention and MLP matrices are projected;
    embeddings, the output head, norms and biases are not.
    """
    pattern = re.compile(exclude, re.IGNORECASE)

    def select(path, leaf):
        return (
            jnp.ndim(leaf) >= 2
            and jnp.issubdtype(jnp.result_type(leaf), jnp.floating)
            and not pattern.search(jax.tree_util.keystr(path))
        )

    return jax.tree_util.tree_map_with_path(select, params)


def _resolve_mask(mask: MaskArg, params: Any) -> list[bool]:
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


def _leaf_layout(
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


def _plan(
    tree: Any,
    mask: MaskArg,
    rank: RankRule,
    matrix_split: Callable[[str, tuple[int, ...]], int | None] | None,
    allow_full_rank: bool,
    side: str = "gradient",
    moments: tuple[int, int] = (2, 0),
) -> tuple[list[MatrixLayout | None], Any]:
    """Per-leaf layouts (static: they depend only on shapes, dtypes and paths) and the treedef.

    ``moments``: ``(moments, basis_moments)`` of :func:`golore_jax.layout.state_floats`.
    """
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    selected = _resolve_mask(mask, tree)
    layouts = [
        _leaf_layout(
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
    moments (a tuple per leaf, not a float array of its shape) are not counted."""
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
    """
    layout_lib.check_side_rule(side, "subspace_layouts")
    layouts, _ = _plan(
        params, mask, rank, matrix_split, allow_full_rank, side, (moments, basis_moments)
    )
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    return dict(zip(paths, layouts, strict=True))


def _map_moments(state: Any, treedef: Any, fn_for_field: Callable[[str], Callable | None]) -> Any:
    """Applies ``fn_for_field(name)`` to every NamedTuple field holding a params-shaped tree.

    This finds the moments inside any (nested) optax state: chain tuples, inject_hyperparameters
    and MultiSteps wrappers included, by their field names (``mu``, ``nu``, ``trace``, ...).
    """
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        values = {}
        for name, value in zip(state._fields, state, strict=True):
            fn = fn_for_field(name)
            if fn is not None and jax.tree_util.tree_structure(value) == treedef:
                values[name] = fn(value)
            else:
                values[name] = _map_moments(value, treedef, fn_for_field)
        return type(state)(**values)
    if isinstance(state, tuple | list):
        return type(state)(_map_moments(s, treedef, fn_for_field) for s in state)
    if isinstance(state, dict):
        return {k: _map_moments(v, treedef, fn_for_field) for k, v in state.items()}
    return state


# Operand dtypes of the per-step projection matmuls (``projection_dtype``).
PROJECTION_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _is_projection_dtype(dtype: Any) -> bool:
    try:
        return jnp.dtype(dtype) in PROJECTION_DTYPES
    except TypeError:  # not a dtype at all, e.g. "bf16"
        return False


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
    a set of entries (gather / scatter, :mod:`golore_jax.sparse`).
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
) -> tuple[list[jax.Array], Any]:
    """``R = P^T G``, ``N = inner(R)``, ``scale * P N`` in the param dtype, leaf by leaf.

    Leaves without a layout go through ``inner`` at full shape. Shared by the transforms whose
    subspace is a basis (SVD/random refreshes here, online PCA in :mod:`golore_jax.online_pca`).
    The two matmuls take their operands in ``projection_dtype`` (None: fp32) and accumulate in
    fp32; ``R`` and ``N`` are fp32.
    """
    operand_dtype = jnp.float32 if projection_dtype is None else projection_dtype

    def compress(basis, lay):
        return lambda g: layout_lib.project(
            layout_lib.as_matrix(g.astype(operand_dtype), lay), basis, lay, operand_dtype
        )

    def expand(basis, lay):
        return lambda n: layout_lib.back_project(n, basis, lay, operand_dtype)

    pairs = list(zip(bases, layouts, strict=True))
    return update_through(
        inner,
        treedef,
        grads,
        [None if lay is None else compress(b, lay) for b, lay in pairs],
        [None if lay is None else expand(b, lay) for b, lay in pairs],
        inner_state,
        params,
        scale,
        extra_args,
    )


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _require_positive_int(owner: str, name: str, value: Any, optional: bool = False) -> None:
    """Raises at construction unless ``value`` is a positive int (or None if ``optional``)."""
    if not (_is_positive_int(value) or (optional and value is None)):
        allowed = "a positive int or None" if optional else "a positive int"
        raise ValueError(f"{owner}: {name} must be {allowed}, got {value!r}")


def _check_update_leaves(updates: Any, layouts: list, bases: list) -> None:
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


def _as_key(seed: int | jax.Array) -> jax.Array:
    """A typed PRNG key from an int seed (possibly traced, e.g. under inject_hyperparams),
    a typed key, or legacy uint32[2] key data."""
    if isinstance(seed, jax.Array) and jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key):
        return seed
    if jnp.ndim(seed) == 1:
        return jax.random.wrap_key_data(jnp.asarray(seed, jnp.uint32))
    return jax.random.key(seed)


def _same_shape_groups(layouts: list[MatrixLayout | None], batch: bool) -> list[list[int]]:
    """Indices of projected leaves grouped by (projected dim, other dim, rank), in leaf order
    (each leaf alone when ``batch`` is False)."""
    if not batch:
        return [[i] for i, lay in enumerate(layouts) if lay is not None]
    groups: dict[tuple[int, int, int], list[int]] = {}
    for i, lay in enumerate(layouts):
        if lay is not None:
            other = lay.cols if lay.side == layout_lib.LEFT else lay.rows
            groups.setdefault((lay.projected_dim, other, lay.rank), []).append(i)
    return list(groups.values())


def _refresh_batches(
    layouts: list[MatrixLayout | None],
    batch: bool,
    by_projected_dim: bool,
    max_size: int | None = None,
) -> list[list[list[int]]]:
    """The projector calls of a refresh: each a list of same-shape groups decided together.

    With ``by_projected_dim`` (the projector's input does not depend on the gradient's other
    dim), groups of equal (projected dim, rank) share one batched call. ``max_size`` splits a
    call into consecutive calls of at most that many matrices.
    """
    groups = _same_shape_groups(layouts, batch)
    if not (batch and by_projected_dim):
        batches = [[group] for group in groups]
    else:
        merged: dict[tuple[int, int], list[list[int]]] = {}
        for group in groups:
            lay = layouts[group[0]]
            merged.setdefault((lay.projected_dim, lay.rank), []).append(group)
        batches = list(merged.values())
    if max_size is None:
        return batches
    return [chunk for b in batches for chunk in _split_batch(b, max_size)]


def _split_batch(batch: list[list[int]], max_size: int) -> list[list[list[int]]]:
    """Consecutive pieces of ``batch`` holding at most ``max_size`` matrices each, in order."""
    chunks: list[list[list[int]]] = []
    current: list[list[int]] = []
    size = 0
    for group in batch:
        while group:
            take, group = group[: max_size - size], group[max_size - size :]
            current.append(take)
            size += len(take)
            if size == max_size:
                chunks.append(current)
                current, size = [], 0
    if current:
        chunks.append(current)
    return chunks


def _input_kind(projector: projectors_lib.Projector) -> str:
    """What a refresh hands ``projector`` per leaf: the gradient's ``d x k`` rows (``"rows"``);
    its ``d x d`` Gram matrix, for projectors that choose from ``g g^T`` alone (``"gram"``); or
    nothing, ``d x 0``, for those that ignore ``g`` (``"none"``)."""
    if not projector.uses_gradient:
        return "none"
    return "gram" if projectors_lib.reads_gram(projector) else "rows"


def _projector_input(g: jax.Array, kind: str) -> jax.Array:
    """The (stacked) input of gradient rows ``g`` for a ``"rows"`` or ``"gram"`` projector
    (see :func:`_input_kind`), with non-finite entries zeroed."""
    g = jnp.where(jnp.isfinite(g), g, 0.0)  # the guard rejects those; LAPACK can hang on inf
    return g @ jnp.swapaxes(g, -1, -2) if kind == "gram" else g


def _usable_gradient(g: jax.Array) -> jax.Array:
    """A gradient a projector may choose from: finite and not all zero.

    One reduction, ``max |g|`` (NaN if any entry is NaN: XLA's max propagates NaN), instead of
    ``all(isfinite(g)) & any(g != 0)``: the same answer, and on a stacked refresh the two
    reductions cost about 0.7 s of XLA:CPU compile time at LLaMA-60M (benchmarks/compile_time).
    """
    largest = jnp.max(jnp.abs(g))
    return jnp.isfinite(largest) & (largest > 0)


def _guarded(
    choose: Callable[..., jax.Array],
    key: jax.Array,
    x: jax.Array,
    previous: jax.Array,
    step: jax.Array,
    usable: jax.Array,
) -> jax.Array:
    """``choose(key, x, previous, step)``, or ``previous`` if the input is not ``usable`` or
    the candidate is not finite: a refresh never writes NaN into the state."""
    candidate = choose(key, x, previous, step)
    return jnp.where(jnp.all(jnp.isfinite(candidate)) & usable, candidate, previous)


def _guarded_choice(
    projector: projectors_lib.Projector,
    key: jax.Array,
    g: jax.Array,
    previous: jax.Array,
    step: jax.Array,
) -> jax.Array:
    """``projector(key, g, previous, step)``, keeping ``previous`` if the choice is unusable.

    Never writes NaN into the state: a non-finite candidate, or (for projectors that read the
    gradient) a non-finite or all-zero gradient, keeps the previous basis.
    """
    usable = _usable_gradient(g) if projector.uses_gradient else jnp.asarray(True)
    return _guarded(projector, key, _projector_input(g, "rows"), previous, step, usable)


def scale_by_subspace(
    inner: optax.GradientTransformation,
    *,
    rank: RankRule,
    update_every: int,
    projector: projectors_lib.Projector | None = None,
    scale: float = 1.0,
    mask: MaskArg = None,
    momentum_projection: bool = False,
    second_moment: str = "keep",
    matrix_split: Callable[[str, tuple[int, ...]], int | None] | None = None,
    allow_full_rank: bool = False,
    seed: int | jax.Array = 0,
    refresh_sharding: Any = None,
    batch_refresh: bool = True,
    refresh_batch_size: int | None = None,
    projection_dtype: Any = None,
    basis_dtype: Any = None,
    side: str = "gradient",
) -> optax.GradientTransformationExtraArgs:
    """Runs ``inner`` in a rank-``r`` subspace of each projected leaf (Algorithm 1).

    Args:
      inner: any optax transformation; it sees the low-rank gradients ``R`` of projected leaves
        and the full gradients of the others. It receives no ``params`` (put weight decay outside,
        where it acts on the full weights, as GaLore does).
      rank: ``r``, an int or a function ``(path, (m, n)) -> int | None`` (None: not projected).
      update_every: ``tau``; the subspace is refreshed when ``count % tau == 0`` (from step 0).
      projector: how a subspace is chosen; default :func:`golore_jax.projectors.svd` (GaLore).
      scale: ``alpha``, multiplies the back-projected update of projected leaves.
      mask: which leaves are projected: None (:func:`default_mask`), a bool tree like params, or
        a function of params returning one.
      momentum_projection: at a refresh, carry first moments (``mu``/``trace``/``ema`` fields of
        the inner state) into the new subspace by equation (2): ``M <- P_new^T P_old M``
        (left) or ``M Q_old^T Q_new`` (right). Off: moments are kept as they are (GaLore's code).
      second_moment: what a refresh does to second moments (``nu`` fields): ``"keep"`` (GaLore's
        code), ``"reset"`` to zero, or ``"project"``: ``V <- (C * C) V`` with
        ``C = P_new^T P_old``, the variance of the rotated coordinates if the old ones were
        independent (keeps ``V >= 0``; see :func:`golore_jax.layout.rotate_second_moment`).
      matrix_split: for leaves with > 2 dims, ``(path, shape) -> k`` so rows are ``shape[:k]``;
        default: the most square split (see :mod:`golore_jax.layout`).
      allow_full_rank: permit ``rank == min(m, n)`` (no saving; used for equivalence checks).
      seed: int seed or PRNG key for random projectors.
      batch_refresh: stack same-shape leaves and vmap their projector (one batched kernel per
        shape; for projectors that choose from ``g g^T`` alone, e.g. ``gram_eigh``, one per
        Gram size, across gradient shapes); False decomposes each leaf on its own (no stacked
        copy of the gradients).
      refresh_batch_size: with ``batch_refresh``, at most this many matrices per batched
        call; the calls run one after another (each waits for the previous one's result), so
        the refresh holds the stacked inputs and decomposition workspace of one call at a time
        instead of all of them (a 7B on one GPU). None: no limit. The result is the same as
        without a limit; a smaller size means more calls, each with a fixed cost. With
        ``refresh_sharding``, a multiple of the number of devices keeps every device busy.
      refresh_sharding: where the batched refresh runs: with a sharding on the stacked axis
        (e.g. ``PartitionSpec(("data", "fsdp"))`` under a mesh context, or a
        ``NamedSharding``), each device decomposes its share of the matrices instead of every
        device repeating every decomposition.
      projection_dtype: operand dtype of the two matmuls of every step, ``R = P^T G`` and
        ``P N`` (None: float32). ``jnp.bfloat16`` rounds ``G``, ``P`` and ``N`` to bf16
        (fp32 accumulation; ``R``, the moments and the bases stay fp32): cheaper matmuls on
        accelerators, at bf16 rounding of the update (relative error ~2^-8).
      basis_dtype: storage dtype of the bases in the state (None: float32). ``jnp.bfloat16``
        halves their memory: a refresh still decomposes in fp32 and stores the basis rounded
        to nearest; every use (projections, moment rotations, the next refresh's ``previous``)
        reads it back as fp32 (exact), so the step is the fp32-basis step with the rounded
        basis. The rounded basis is orthonormal to ~2^-8.
      side: which side of each ``m x n`` leaf is projected (:mod:`golore_jax.layout`):
        ``"gradient"`` (the paper's and GaLore's rule: the smaller dimension), ``"state"`` (the
        side whose basis plus ``inner``'s moments hold fewer floats; with Adam this is
        ``optax.contrib.galore``'s choice, left when ``m >= n``), ``"left"`` or ``"right"``.

    Extra args:
      ``subspace_grads``: a gradient tree like ``updates`` used only to choose the subspace
      (large-batch GaLore: the mean of several minibatch gradients).
      ``in_subspace``: True when the projected leaves of ``updates`` already are the low-rank
      gradients ``R`` (``P^T G`` or ``G Q``), as in the ReLoRA-like reparameterisation
      ``W = W0 + P A`` (Algorithm 6), where ``R`` is the gradient of ``A``. Then ``params``
      (full shapes) is required, the projected leaves of the result are ``scale * N`` in the
      low-rank shape (the update of ``A``, not back-projected), and no refresh happens: the
      caller sends the full gradient (``in_subspace=False``) at refresh steps
      (``count % update_every == 0``).
      Other extra args are passed to ``inner``.
    """
    _require_positive_int("scale_by_subspace", "update_every", update_every)
    if not callable(rank) and not _is_positive_int(rank):
        raise ValueError(
            f"scale_by_subspace: rank must be a positive int or a function, got {rank!r}"
        )
    if isinstance(scale, int | float) and not math.isfinite(scale):  # traced under inject
        raise ValueError(f"scale_by_subspace: scale must be finite, got {scale!r}")
    if second_moment not in SECOND_MOMENT_POLICIES:
        raise ValueError(
            f"scale_by_subspace: second_moment must be one of {SECOND_MOMENT_POLICIES}, "
            f"got {second_moment!r}"
        )
    if projection_dtype is not None and not _is_projection_dtype(projection_dtype):
        raise ValueError(
            f"scale_by_subspace: projection_dtype must be one of "
            f"{[d.name for d in PROJECTION_DTYPES]} or None, got {projection_dtype!r}"
        )
    if basis_dtype is not None and not _is_projection_dtype(basis_dtype):
        raise ValueError(
            f"scale_by_subspace: basis_dtype must be one of "
            f"{[d.name for d in PROJECTION_DTYPES]} or None, got {basis_dtype!r}"
        )
    stored_basis_dtype = jnp.float32 if basis_dtype is None else jnp.dtype(basis_dtype)
    _require_positive_int(
        "scale_by_subspace", "refresh_batch_size", refresh_batch_size, optional=True
    )
    layout_lib.check_side_rule(side, "scale_by_subspace")
    projector = projector if projector is not None else projectors_lib.svd()
    inner = optax.with_extra_args_support(inner)
    rotates_state = momentum_projection or second_moment != "keep"
    input_kind = _input_kind(projector)
    choose = projector.from_gram if input_kind == "gram" else projector

    def plan(tree) -> tuple[list[MatrixLayout | None], Any]:
        moments = (count_moments(inner, tree) if side == "state" else 0, 0)
        return _plan(tree, mask, rank, matrix_split, allow_full_rank, side, moments)

    def init_fn(params):
        layouts, treedef = plan(params)
        leaves = treedef.flatten_up_to(params)
        bases = [
            optax.MaskedNode() if lay is None else jnp.zeros(lay.basis_shape, stored_basis_dtype)
            for lay in layouts
        ]
        low_rank = [
            leaf if lay is None else jnp.zeros(lay.low_rank_shape, jnp.float32)
            for leaf, lay in zip(leaves, layouts, strict=True)
        ]
        key = _as_key(seed)
        return ScaleBySubspaceState(
            count=jnp.zeros([], jnp.int32),
            key=key,
            bases=treedef.unflatten(bases),
            inner_state=inner.init(treedef.unflatten(low_rank)),
        )

    def change_of_basis(inner_state, treedef, layouts, old, new):
        """Rotates the inner state's moments from the old subspaces to the new ones."""
        f32 = jnp.float32
        changes = [
            None if lay is None else n.astype(f32).T @ o.astype(f32)
            for lay, o, n in zip(layouts, old, new, strict=True)
        ]

        def per_leaf(rotate):
            def apply(tree):
                leaves = treedef.flatten_up_to(tree)
                return treedef.unflatten(
                    [
                        x if lay is None else rotate(x, c, lay).astype(x.dtype)
                        for x, c, lay in zip(leaves, changes, layouts, strict=True)
                    ]
                )

            return apply

        reset = per_leaf(lambda v, c, lay: jnp.zeros_like(v))
        second = {
            "keep": None,
            "reset": reset,
            "project": per_leaf(layout_lib.rotate_second_moment),
        }[second_moment]
        first = per_leaf(layout_lib.rotate_first_moment) if momentum_projection else None

        def fn_for_field(name):
            if name in FIRST_MOMENT_FIELDS:
                return first
            if name in SECOND_MOMENT_FIELDS:
                return second
            return None

        return _map_moments(inner_state, treedef, fn_for_field)

    def update_fn(
        updates, state, params=None, *, subspace_grads=None, in_subspace=False, **extra_args
    ):
        if in_subspace:
            if params is None:
                raise ValueError(
                    "scale_by_subspace: in_subspace=True needs params (the full shapes)"
                )
            return low_rank_update(updates, state, params, extra_args)
        layouts, treedef = plan(updates)
        grads = treedef.flatten_up_to(updates)
        chooser = grads if subspace_grads is None else treedef.flatten_up_to(subspace_grads)
        old_bases = treedef.flatten_up_to(state.bases)
        _check_update_leaves(updates, layouts, old_bases)
        next_key, refresh_key = jax.random.split(state.key)

        def refresh(operands):
            bases, inner_state = operands
            new = list(bases)
            sources = list(chooser)
            previous_chosen = None
            for batch in _refresh_batches(
                layouts, batch_refresh, input_kind != "rows", refresh_batch_size
            ):
                # One vmapped projector call per batch of leaves: a refresh is a few large
                # batched kernels, and the stacked axis can be spread over devices.
                members = [i for group in batch for i in group]
                if refresh_batch_size is not None and previous_chosen is not None:
                    # This call's inputs become available only once the previous call's
                    # result exists: XLA cannot run the calls side by side, so one call's
                    # stack and workspace are dead before the next one's are allocated.
                    previous_chosen, picked = lax.optimization_barrier(
                        (previous_chosen, [sources[i] for i in members])
                    )
                    for i, g in zip(members, picked, strict=True):
                        sources[i] = g
                inputs, usable = [], []
                for group in batch:
                    if input_kind == "none":  # the projector ignores g: nothing to stack
                        d = layouts[group[0]].projected_dim
                        inputs.append(jnp.zeros((len(group), d, 0), jnp.float32))
                        usable.append(jnp.ones(len(group), bool))
                        continue
                    g = jnp.stack(
                        [
                            layout_lib.projected_rows(
                                layout_lib.as_matrix(sources[i].astype(jnp.float32), layouts[i]),
                                layouts[i],
                            )
                            for i in group
                        ]
                    )
                    if refresh_sharding is not None:
                        g = lax.with_sharding_constraint(g, refresh_sharding)
                    inputs.append(_projector_input(g, input_kind))
                    usable.append(jax.vmap(_usable_gradient)(g))
                x = jnp.concatenate(inputs) if len(inputs) > 1 else inputs[0]
                previous = jnp.stack([bases[i] for i in members]).astype(jnp.float32)
                if refresh_sharding is not None:
                    x = lax.with_sharding_constraint(x, refresh_sharding)
                    previous = lax.with_sharding_constraint(previous, refresh_sharding)
                keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
                    refresh_key, jnp.asarray(members, jnp.uint32)
                )
                chosen = jax.vmap(_guarded, in_axes=(None, 0, 0, 0, None, 0))(
                    choose, keys, x, previous, state.count, jnp.concatenate(usable)
                )
                for j, i in enumerate(members):
                    new[i] = chosen[j].astype(stored_basis_dtype)
                previous_chosen = chosen
            if rotates_state:
                inner_state = change_of_basis(inner_state, treedef, layouts, bases, new)
            return new, inner_state

        is_refresh = state.count % update_every == 0
        new_bases, inner_state = lax.cond(
            is_refresh, refresh, lambda operands: operands, (old_bases, state.inner_state)
        )

        out, inner_state = update_in_subspace(
            inner,
            treedef,
            grads,
            layouts,
            new_bases,
            inner_state,
            params,
            scale,
            extra_args,
            projection_dtype,
        )
        new_state = ScaleBySubspaceState(
            count=optax.safe_increment(state.count),
            key=next_key,
            bases=treedef.unflatten(
                [
                    optax.MaskedNode() if lay is None else b
                    for lay, b in zip(layouts, new_bases, strict=True)
                ]
            ),
            inner_state=inner_state,
        )
        return treedef.unflatten(out), new_state

    def low_rank_update(updates, state, params, extra_args):
        """``N = inner(R)`` on given low-rank gradients; returns ``scale * N`` for them."""
        layouts, treedef = plan(params)
        grads = treedef.flatten_up_to(updates)
        for i, (g, lay) in enumerate(zip(grads, layouts, strict=True)):
            if lay is not None and tuple(g.shape) != lay.low_rank_shape:
                path = jax.tree_util.keystr(jax.tree_util.tree_leaves_with_path(params)[i][0])
                raise ValueError(
                    f"scale_by_subspace: with in_subspace=True the update of leaf {path} must "
                    f"have the low-rank shape {lay.low_rank_shape}, got {tuple(g.shape)}"
                )
        # R is given: no projection; N is the update of A (low-rank shape), not back-projected.
        out, inner_state = update_through(
            inner,
            treedef,
            grads,
            [None if lay is None else (lambda g: g.astype(jnp.float32)) for lay in layouts],
            [None if lay is None else (lambda n: n) for lay in layouts],
            state.inner_state,
            params,
            scale,
            extra_args,
        )
        next_key, _ = jax.random.split(state.key)
        new_state = state._replace(
            count=optax.safe_increment(state.count), key=next_key, inner_state=inner_state
        )
        return treedef.unflatten(out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
