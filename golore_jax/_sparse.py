"""``scale_by_sparse_subspace``: GaSare and GoSare (Appendix C, Algorithm 5 of arXiv 2410.11289).

Instead of a low-rank projection ``P^T G``, sparse subspace optimization keeps ``S * G`` for a
0/1 mask ``S`` with ``k`` ones, refreshed every ``tau`` steps:

* GaSare (``selector="topk"``): ``S = Top_k(|G|)``, the ``k`` largest entries of the gradient;
* GoSare (``selector="random"``): ``S ~ U(S_k)``, ``k`` positions uniformly at random.

Algorithm 5 masks the moments with the current ``S`` at every step (paper convention, ``b1``
weighting the new gradient)::

    M <- (1 - b1) S * M + b1 S * G,     V <- (1 - b2) S * V + b2 (S * G)^2.

Between refreshes ``M`` and ``V`` are already supported on ``S``, so the mask only matters at a
change: entries at positions that stay selected carry over, entries at newly selected positions
start at 0, entries that leave the mask are dropped. Here the mask is stored as ``k`` sorted flat
indices per leaf and the inner optax transform runs on the ``k`` selected values (a ``(k,)``
vector), so the state holds ``k`` int32 indices plus the inner state on ``k`` values, never a
dense ``m x n`` array. At a refresh every moment the inner state declares
(:mod:`golore_jax._rotation`: ``mu``, ``nu``, ``trace``, ``ema`` of optax's states) is remapped
by that rule: with optax's ``ema`` of decay ``1 - b1`` (undebiased) as ``inner`` the
back-projected update is exactly Algorithm 5's ``M``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import PartitionSpec

from golore_jax import _explicit, partitioning
from golore_jax import _rotation as rotation
from golore_jax._planning import as_key, require_finite, require_positive_int, resolve_mask
from golore_jax._state_shapes import shape_checker
from golore_jax._tail import update_through

SELECTORS = ("topk", "random")

CountRule = int | Callable[[str, tuple[int, ...]], int | None]


class ScaleBySparseSubspaceState(NamedTuple):
    """State of :func:`scale_by_sparse_subspace`.

    Attributes:
      count: number of updates applied so far (int32); refreshes when ``count % tau == 0``.
      key: typed PRNG key, split at every step (GoSare's draws; a leaf folds in its index).
        To numpy: ``jax.random.key_data(key)`` (``np.asarray`` refuses typed keys).
      indices: per selected leaf, its ``k`` flat positions (int32, sorted ascending), or
        ``optax.MaskedNode()`` for leaves that are not sparsified.
      inner_state: state of the inner transform on the ``(k,)`` value vectors (full shapes for
        the other leaves).
    """

    count: jax.Array
    key: jax.Array
    indices: Any
    inner_state: Any


def _leaf_count(
    path: str, leaf: Any, selected: bool, k: CountRule | None, density: float | None
) -> int | None:
    """Validates one leaf and returns its ``k`` (None when it is not sparsified)."""
    if not selected:
        return None
    shape = tuple(jnp.shape(leaf))
    size = math.prod(shape)
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
        raise TypeError(
            f"scale_by_sparse_subspace: leaf {path} is selected but has non-floating dtype "
            f"{jnp.result_type(leaf)}"
        )
    if size >= 2**31:  # indices are int32
        raise ValueError(
            f"scale_by_sparse_subspace: leaf {path} of shape {shape} has {size} >= 2^31 entries"
        )
    if density is not None:
        count = max(1, round(density * size))
    else:
        count = k(path, shape) if callable(k) else k
        if count is None:
            return None
    if isinstance(count, bool) or not isinstance(count, int) or not 0 < count < size:
        raise ValueError(
            f"scale_by_sparse_subspace: k for leaf {path} of shape {shape} must be an int with "
            f"0 < k < {size} (its size), got {count!r}"
        )
    return count


def _plan(tree: Any, mask: Any, k: CountRule | None, density: float | None):
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    selected = resolve_mask(mask, tree)
    counts = [
        _leaf_count(jax.tree_util.keystr(path), leaf, sel, k, density)
        for (path, leaf), sel in zip(leaves_with_paths, selected, strict=True)
    ]
    return counts, treedef


def select_indices(selector: str, key: jax.Array, g: jax.Array, k: int) -> jax.Array:
    """``k`` sorted distinct flat positions of ``g``: Top-k of ``|g|`` or uniform at random.

    Random: the ``k`` largest of i.i.d. uniform scores form a uniformly random ``k``-subset
    (every ordering of the scores is equally likely), in fixed shapes under jit.
    """
    flat = g.reshape(-1)
    if selector == "topk":
        scores = jnp.where(jnp.isfinite(flat), jnp.abs(flat), 0.0)
    else:
        scores = jax.random.uniform(key, flat.shape)
    _, idx = lax.top_k(scores, k)
    return jnp.sort(idx).astype(jnp.int32)


def remap_values(values: jax.Array, old: jax.Array, new: jax.Array) -> jax.Array:
    """Values stored at sorted positions ``old``, moved to sorted positions ``new``.

    A position in both keeps its value; a position only in ``new`` gets 0 (Algorithm 5's
    ``S_new * M_prev``, with ``M_prev`` supported on ``S_old``). O(k log k) by binary search.
    """
    pos = jnp.clip(jnp.searchsorted(old, new), 0, old.shape[0] - 1)
    found = old[pos] == new
    return jnp.where(found, values[pos], jnp.zeros_like(values))


def refresh_indices(
    selector: str,
    counts: list[int | None],
    indices: list[Any],
    chooser: list[jax.Array],
    key: jax.Array,
) -> list[Any]:
    """The new positions of each sparsified leaf ``i`` (``counts[i]`` of them), chosen from
    ``chooser[i]`` with ``key`` folded with ``i``. Top-k never chooses from a non-finite or
    all-zero gradient: that leaf keeps its old positions."""
    new = list(indices)
    for i, c in enumerate(counts):
        if c is None:
            continue
        g = _explicit.unsharded(chooser[i])  # top_k needs its (flattened) operand unsharded
        candidate = select_indices(selector, jax.random.fold_in(key, i), g.astype(jnp.float32), c)
        if selector == "topk":
            ok = jnp.all(jnp.isfinite(g)) & jnp.any(g != 0)
            candidate = jnp.where(ok, candidate, indices[i])
        new[i] = candidate
    return new


def remap_state(
    inner_state: Any, treedef: Any, counts: list[int | None], old: list[Any], new: list[Any]
) -> Any:
    """Every moment the inner state declares (:mod:`golore_jax._rotation`, both kinds), moved
    from positions ``old`` to ``new`` by :func:`remap_values`."""

    def remap(tree):
        leaves = treedef.flatten_up_to(tree)
        return treedef.unflatten(
            [
                x if c is None else remap_values(x, old[i], new[i])
                for i, (x, c) in enumerate(zip(leaves, counts, strict=True))
            ]
        )

    return rotation.map_moments(inner_state, treedef, lambda kind: remap)


def gather(g: jax.Array, idx: jax.Array) -> jax.Array:
    """``S * G`` in compressed form: the fp32 values of ``g`` at ``idx`` (on a mesh with
    Explicit axes, gathered from the whole ``g``: flat positions cross its shards)."""
    return _explicit.unsharded(g).reshape(-1)[idx].astype(jnp.float32)


def scatter(
    values: jax.Array, idx: jax.Array, shape: tuple[int, ...], like: Any = None
) -> jax.Array:
    """The dense array that is ``values`` at ``idx`` and 0 elsewhere (with the sharding type
    of ``like`` on a mesh with Explicit axes)."""
    dense = jnp.zeros(math.prod(shape), values.dtype).at[idx].set(values).reshape(shape)
    return dense if like is None else _explicit.like(dense, like)


def scale_by_sparse_subspace(
    inner: optax.GradientTransformation,
    *,
    k: CountRule | None = None,
    density: float | None = None,
    update_every: int,
    selector: str = "topk",
    scale: float = 1.0,
    mask: Any = None,
    remap_moments: bool = True,
    seed: int | jax.Array = 0,
) -> optax.GradientTransformationExtraArgs:
    """Runs ``inner`` on ``k`` entries of each selected leaf (GaSare / GoSare, Algorithm 5).

    Args:
      inner: any optax transformation; it sees the ``(k,)`` vectors ``S * G`` of selected
        leaves (compressed) and the full gradients of the others, and receives no ``params``.
      k: entries kept per leaf: an int, or ``(path, shape) -> int | None`` (None: not
        sparsified). Exactly one of ``k`` and ``density`` must be given.
      density: fraction of each selected leaf's entries kept, ``k = max(1, round(density*size))``.
      update_every: ``tau``; the mask is refreshed when ``count % tau == 0`` (from step 0).
      selector: ``"topk"`` (GaSare: the ``k`` largest ``|G|``) or ``"random"`` (GoSare).
      scale: ``alpha``, multiplies the scattered update of selected leaves.
      mask: which leaves are sparsified, as ``golore_jax.Subspace.mask`` (default
        :func:`golore_jax.default_mask`: matrices other than embeddings and head).
      remap_moments: at a refresh, remap the inner state's moments to the new mask by
        Algorithm 5 (kept positions carry over, new ones start at 0). Off: the moment vectors are
        kept as they are, slot by slot (the analogue of GaLore's code keeping Adam's moments).
      seed: int seed or PRNG key for GoSare.

    Extra args:
      ``subspace_grads``: a gradient tree like ``updates`` used only to choose the mask
      (Algorithm 5's large-batch variant). Other extra args are passed to ``inner``.

    >>> params = {"w": jnp.arange(24.0).reshape(4, 6)}
    >>> tx = scale_by_sparse_subspace(optax.identity(), k=3, update_every=10)
    >>> updates, state = tx.update(params, tx.init(params), params)
    >>> state.indices["w"].tolist(), jnp.flatnonzero(updates["w"]).tolist()
    ([21, 22, 23], [21, 22, 23])
    """
    require_positive_int("scale_by_sparse_subspace", "update_every", update_every)
    if (k is None) == (density is None):
        raise ValueError(
            f"scale_by_sparse_subspace: give exactly one of k and density, got k={k!r}, "
            f"density={density!r}"
        )
    if density is not None and not 0.0 < density < 1.0:
        raise ValueError(f"scale_by_sparse_subspace: density must be in (0, 1), got {density!r}")
    if selector not in SELECTORS:
        raise ValueError(
            f"scale_by_sparse_subspace: selector must be one of {SELECTORS}, got {selector!r}"
        )
    require_finite("scale_by_sparse_subspace", "scale", scale)
    inner = optax.with_extra_args_support(inner)

    def plan(tree):
        return _plan(tree, mask, k, density)

    def init_fn(params):
        counts, treedef = plan(params)
        leaves = treedef.flatten_up_to(params)
        # Distinct placeholder positions: a refresh that keeps them (all-zero first gradient)
        # still holds a valid mask.
        indices = [
            optax.MaskedNode() if c is None else jnp.arange(c, dtype=jnp.int32) for c in counts
        ]
        values = [
            leaf if c is None else jnp.zeros((c,), jnp.float32)
            for leaf, c in zip(leaves, counts, strict=True)
        ]
        return ScaleBySparseSubspaceState(
            count=jnp.zeros([], jnp.int32),
            key=as_key(seed),
            indices=treedef.unflatten(indices),
            inner_state=inner.init(treedef.unflatten(values)),
        )

    # A leaf whose shape changed since init: one line naming it (checked when tracing).
    check_shapes = shape_checker("scale_by_sparse_subspace", init_fn)

    def update_fn(updates, state, params=None, *, subspace_grads=None, **extra_args):
        check_shapes(updates, state)
        counts, treedef = plan(updates)
        grads = treedef.flatten_up_to(updates)
        chooser = grads if subspace_grads is None else treedef.flatten_up_to(subspace_grads)
        old_indices = treedef.flatten_up_to(state.indices)
        next_key, refresh_key = jax.random.split(state.key)

        def refresh(operands):
            indices, inner_state = operands
            new = refresh_indices(selector, counts, indices, chooser, refresh_key)
            if remap_moments:
                inner_state = remap_state(inner_state, treedef, counts, indices, new)
            return new, inner_state

        is_refresh = state.count % update_every == 0
        new_indices, inner_state = lax.cond(
            is_refresh, refresh, lambda operands: operands, (old_indices, state.inner_state)
        )

        def compress(idx):
            return lambda g: gather(g, idx)

        def expand(idx, g):
            return lambda n: scatter(n, idx, g.shape, g)

        selected = list(zip(counts, new_indices, grads, strict=True))
        out, inner_state = update_through(
            inner,
            treedef,
            grads,
            [None if c is None else compress(idx) for c, idx, _ in selected],
            [None if c is None else expand(idx, g) for c, idx, g in selected],
            inner_state,
            params,
            scale,
            extra_args,
        )
        new_state = ScaleBySparseSubspaceState(
            count=optax.safe_increment(state.count),
            key=next_key,
            indices=treedef.unflatten(
                [
                    optax.MaskedNode() if c is None else idx
                    for c, idx in zip(counts, new_indices, strict=True)
                ]
            ),
            inner_state=inner_state,
        )
        return treedef.unflatten(out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _partition_specs(
    state: ScaleBySparseSubspaceState, context: partitioning.SpecContext
) -> ScaleBySparseSubspaceState:
    """The k values and indices of a sparsified leaf are replicated (its k positions are
    scattered over the whole matrix); moments of other leaves take their param's spec."""
    treedef = jax.tree_util.tree_structure(context.params)
    indices = treedef.flatten_up_to(state.indices)
    kept = [isinstance(i, optax.MaskedNode) for i in indices]
    values = [
        spec if k else PartitionSpec()
        for k, spec in zip(kept, treedef.flatten_up_to(context.param_specs), strict=True)
    ]
    return ScaleBySparseSubspaceState(
        count=PartitionSpec(),
        key=PartitionSpec(),
        indices=treedef.unflatten(
            [i if k else PartitionSpec() for k, i in zip(kept, indices, strict=True)]
        ),
        inner_state=partitioning.walk(state.inner_state, treedef, treedef.unflatten(values)),
    )


partitioning.register_partition_rule(ScaleBySparseSubspaceState, _partition_specs)
