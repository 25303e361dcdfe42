"""The refresh scheduler of ``scale_by_subspace``: which projector calls a refresh makes, and
those calls, guarded so that a refresh never writes NaN into the state.

Same-shape leaves are stacked and their projector is vmapped (one batched kernel per shape, or
per Gram size for projectors that read ``g g^T`` alone); ``max_size`` cuts a batch into
consecutive calls that run one after another.

>>> from golore_jax._layout import make_layout
>>> a, b = make_layout((8, 4), 2, None, "gradient"), make_layout((8, 6), 2, None, "gradient")
>>> lays = [a, None, a, b]
>>> refresh_batches(lays, batch=True, by_projected_dim=False)
[[[0, 2]], [[3]]]
>>> refresh_batches(lays, batch=True, by_projected_dim=False, max_size=1)
[[[0]], [[2]], [[3]]]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from golore_jax import _basis_storage as basis_storage
from golore_jax import _explicit, partitioning
from golore_jax import _layout as layout_lib
from golore_jax import projectors as projectors_lib
from golore_jax._layout import MatrixLayout


def same_shape_groups(layouts: list[MatrixLayout | None], batch: bool) -> list[list[int]]:
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


def refresh_batches(
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
    groups = same_shape_groups(layouts, batch)
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
    return [chunk for b in batches for chunk in split_batch(b, max_size)]


def split_batch(batch: list[list[int]], max_size: int) -> list[list[list[int]]]:
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


def input_kind(projector: projectors_lib.Projector) -> str:
    """What a refresh hands ``projector`` per leaf: the gradient's ``d x k`` rows (``"rows"``);
    its ``d x d`` Gram matrix, for projectors that choose from ``g g^T`` alone (``"gram"``); or
    nothing, ``d x 0``, for those that ignore ``g`` (``"none"``)."""
    if not projector.uses_gradient:
        return "none"
    return "gram" if projectors_lib.reads_gram(projector) else "rows"


def projector_input(g: jax.Array, kind: str) -> jax.Array:
    """The (stacked) input of gradient rows ``g`` for a ``"rows"`` or ``"gram"`` projector
    (see :func:`input_kind`), with non-finite entries zeroed."""
    g = jnp.where(jnp.isfinite(g), g, 0.0)  # the guard rejects those; LAPACK can hang on inf
    return g @ jnp.swapaxes(g, -1, -2) if kind == "gram" else g


def usable_gradient(g: jax.Array) -> jax.Array:
    """A gradient a projector may choose from: finite and not all zero.

    One reduction, ``max |g|`` (NaN if any entry is NaN: XLA's max propagates NaN), instead of
    ``all(isfinite(g)) & any(g != 0)``: the same answer, and on a stacked refresh the two
    reductions cost about 0.7 s of XLA:CPU compile time at LLaMA-60M (benchmarks/compile_time).
    """
    largest = jnp.max(jnp.abs(g))
    return jnp.isfinite(largest) & (largest > 0)


def guarded(
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


def guarded_choice(
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
    usable = usable_gradient(g) if projector.uses_gradient else jnp.asarray(True)
    return guarded(projector, key, projector_input(g, "rows"), previous, step, usable)


def _constrain(x: jax.Array, sharding: Any) -> jax.Array:
    """``refresh_sharding`` on a stack of matrices: a sharding constraint (no mesh, Auto axes),
    or on a mesh with Explicit axes a reshard of the stacked axis alone where its mesh axes
    divide it (replicated otherwise), never of the decomposed dims."""
    if _explicit.sharding_of(x) is None:
        return lax.with_sharding_constraint(x, sharding)
    return _explicit.reshard_to(x, _explicit.stacked_spec(sharding, x.shape[0], x.ndim, x))


def _decompose(choose, keys, x, previous, step, usable, members, due) -> jax.Array:
    """The vmapped, guarded projector call of one batch; with ``due``, skipped (the previous
    bases returned) when none of ``members`` is due."""

    def run(x, keys, previous, usable):
        return jax.vmap(guarded, in_axes=(None, 0, 0, 0, None, 0))(
            choose, keys, x, previous, step, usable
        )

    if due is None:
        return run(x, keys, previous, usable)
    any_due = jnp.any(jnp.stack([due[i] for i in members]))
    return lax.cond(any_due, run, lambda x, k, previous, u: previous, x, keys, previous, usable)


def _kept(chosen: jax.Array, old: Any, basis_dtype: Any, due: Any, i: int) -> Any:
    """``chosen`` stored as ``basis_dtype``, or the stored ``old`` where leaf ``i`` is not due."""
    stored = basis_storage.store_basis(chosen, basis_dtype)
    if due is None:
        return stored
    # Explicit meshes: both select cases in the stored basis' sharding.
    return jax.tree.map(lambda n, o: jnp.where(due[i], _explicit.like(n, o), o), stored, old)


def refresh_bases(
    projector: projectors_lib.Projector,
    layouts: list[MatrixLayout | None],
    bases: list[Any],
    sources: list[jax.Array],
    key: jax.Array,
    step: jax.Array,
    *,
    batch: bool = True,
    batch_size: int | None = None,
    sharding: Any = None,
    basis_dtype: Any = jnp.float32,
    due: list[jax.Array | None] | None = None,
) -> list[Any]:
    """The new bases of a refresh: per projected leaf ``i``, ``projector`` chooses from
    ``sources[i]`` with ``key`` folded with ``i``; unprojected leaves keep ``bases[i]``.

    ``batch``, ``batch_size`` and ``sharding`` are ``scale_by_subspace``'s ``batch_refresh``,
    ``refresh_batch_size`` and ``refresh_sharding``; new bases are stored as ``basis_dtype``
    says (a float dtype or ``"int4"``, :mod:`golore_jax._basis_storage`) and read back through
    :func:`golore_jax._basis_storage.load_basis`.

    ``due`` (lazy refresh): per projected leaf a bool scalar; a leaf that is not due keeps its
    stored basis as it is, and a batched call none of whose members is due is skipped
    (``lax.cond``), which is where the saving is (:func:`decompositions_done`). A call with
    some members due decomposes all of them and keeps the results of the due ones only, so
    the bases do not depend on how the leaves are batched.
    """
    kind = input_kind(projector)
    choose = projector.from_gram if kind == "gram" else projector
    new = list(bases)
    sources = list(sources)
    previous_chosen = None
    for call in refresh_batches(layouts, batch, kind != "rows", batch_size):
        # One vmapped projector call per batch of leaves: a refresh is a few large
        # batched kernels, and the stacked axis can be spread over devices.
        members = [i for group in call for i in group]
        if batch_size is not None and previous_chosen is not None:
            # This call's inputs become available only once the previous call's result
            # exists: XLA cannot run the calls side by side, so one call's stack and
            # workspace are dead before the next one's are allocated.
            previous_chosen, picked = lax.optimization_barrier(
                (previous_chosen, [sources[i] for i in members])
            )
            for i, g in zip(members, picked, strict=True):
                sources[i] = g
        inputs, usable = [], []
        for group in call:
            if kind == "none":  # the projector ignores g: nothing to stack
                d = layouts[group[0]].projected_dim
                inputs.append(jnp.zeros((len(group), d, 0), jnp.float32))
                usable.append(jnp.ones(len(group), bool))
                continue
            g = jnp.stack(
                [
                    layout_lib.projected_rows(
                        # Explicit meshes: each matrix whole on every device (a decomposition
                        # needs its dims unsharded), then split by refresh_sharding below.
                        _explicit.unsharded(
                            layout_lib.as_matrix(sources[i].astype(jnp.float32), layouts[i])
                        ),
                        layouts[i],
                    )
                    for i in group
                ]
            )
            if sharding is not None:
                g = _constrain(g, sharding)
            inputs.append(projector_input(g, kind))
            usable.append(jax.vmap(usable_gradient)(g))
        if len(inputs) > 1:  # Explicit meshes: groups split unalike are joined whole
            inputs = [_explicit.unsharded(a) for a in inputs]
            usable = [_explicit.unsharded(a) for a in usable]
        x = jnp.concatenate(inputs) if len(inputs) > 1 else inputs[0]
        previous = jnp.stack(
            [_explicit.unsharded(basis_storage.load_basis(bases[i])) for i in members]
        )
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
            key, jnp.asarray(members, jnp.uint32)
        )
        usable = jnp.concatenate(usable)
        if sharding is not None:
            x = _constrain(x, sharding)
            previous = _constrain(previous, sharding)
            stacked = _explicit.sharding_of(x)
            if stacked is not None:  # every batched operand of the vmap split alike
                lead = PartitionSpec(*partitioning.entries(stacked.spec, 1)[:1])
                keys, usable = (_explicit.reshard_to(a, lead) for a in (keys, usable))
        chosen = _decompose(choose, keys, x, previous, step, usable, members, due)
        for j, i in enumerate(members):
            # Back in the state's sharding (both lax.cond branches then agree).
            new[i] = jax.tree.map(
                _explicit.like, _kept(chosen[j], bases[i], basis_dtype, due, i), bases[i]
            )
        previous_chosen = chosen
    return new


def decompositions_done(
    projector: projectors_lib.Projector,
    layouts: list[MatrixLayout | None],
    due: list[jax.Array | None],
    *,
    batch: bool = True,
    batch_size: int | None = None,
) -> jax.Array:
    """How many matrices :func:`refresh_bases` with this ``due`` decomposes (int32): every
    member of each call with at least one member due. With one call per leaf
    (``batch_size=1`` or ``batch=False``) exactly the due leaves."""
    kind = input_kind(projector)
    done = jnp.zeros([], jnp.int32)
    for call in refresh_batches(layouts, batch, kind != "rows", batch_size):
        members = [i for group in call for i in group]
        run = jnp.any(jnp.stack([due[i] for i in members]))
        done = done + run.astype(jnp.int32) * len(members)
    return done
