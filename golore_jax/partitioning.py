"""Partition specs for an optimizer state, derived from the params' specs.

Given a ``PartitionSpec`` per parameter (logical axis names or mesh axis names: this module
does not interpret them), :func:`state_partition_specs` returns a spec for every leaf of an
optimizer state, so that projectors and low-rank moments are sharded like the params they
belong to:

* a basis ``P`` (``m x r``, left side) takes the spec of the param's row axis, ``(rows, None)``;
  a basis ``Q`` (``n x r``, right side) takes ``(cols, None)``;
* a low-rank moment takes ``(None, cols)`` on the left (``r x n``) and ``(rows, None)`` on the
  right (``m x r``); given the mesh axis sizes, its rank dim also takes the spec of the param
  dim it replaces when those axes divide ``r``: ``(rows, cols)`` either way. Under FSDP the
  moments are then sharded like the params, not replicated on every device (7B, rank 1024 on
  256 chips: 11.4 GiB of replicated moments per chip otherwise);
* full-shape moments (non-projected leaves, or plain optax states) take the param's spec;
* everything else (counts, keys, hyperparameters) is replicated: ``PartitionSpec()``.

For a leaf with more than two dims flattened to a matrix, a merged axis takes the spec of its
first sharded component (row-major reshapes keep that sharding contiguous).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import optax
from jax.sharding import PartitionSpec

from golore_jax import layout as layout_lib
from golore_jax.online_pca import ScaleByOnlineSubspaceState
from golore_jax.sparse import ScaleBySparseSubspaceState
from golore_jax.subspace import ScaleBySubspaceState


def _merged(spec_entries: tuple[Any, ...]) -> Any:
    """The spec of a merged (flattened) axis: its first sharded component's, else None."""
    return next((e for e in spec_entries if e is not None), None)


def _entries(spec: PartitionSpec, ndim: int) -> tuple[Any, ...]:
    return tuple(spec) + (None,) * (ndim - len(spec))


def _divides(entry: Any, size: int, mesh_axis_sizes: Mapping[str, int] | None) -> bool:
    """Whether a dim of ``size`` can be sharded over the mesh axes of a spec ``entry``."""
    if entry is None or mesh_axis_sizes is None:
        return False
    axes = (entry,) if isinstance(entry, str) else tuple(entry)
    return size % math.prod(mesh_axis_sizes[a] for a in axes) == 0


def _subspace_specs(
    state: ScaleBySubspaceState,
    params: Any,
    param_specs: Any,
    mesh_axis_sizes: Mapping[str, int] | None = None,
) -> Any:
    treedef = jax.tree_util.tree_structure(params)
    param_leaves = treedef.flatten_up_to(params)
    spec_leaves = treedef.flatten_up_to(param_specs)
    basis_leaves = treedef.flatten_up_to(state.bases)
    basis_specs, low_rank_specs = [], []
    for leaf, spec, basis in zip(param_leaves, spec_leaves, basis_leaves, strict=True):
        if isinstance(basis, optax.MaskedNode):
            basis_specs.append(basis)
            low_rank_specs.append(spec)
            continue
        shape = tuple(leaf.shape)
        k = _split_of(shape, tuple(basis.shape))
        lay = layout_lib.make_layout(shape, basis.shape[1], k)
        entries = _entries(spec, len(shape))
        rows, cols = _merged(entries[:k]), _merged(entries[k:])
        rank = basis.shape[1]
        if lay.side == layout_lib.LEFT:
            basis_specs.append(PartitionSpec(rows, None))
            rank_entry = rows if _divides(rows, rank, mesh_axis_sizes) else None
            low_rank_specs.append(PartitionSpec(rank_entry, cols))
        else:
            basis_specs.append(PartitionSpec(cols, None))
            rank_entry = cols if _divides(cols, rank, mesh_axis_sizes) else None
            low_rank_specs.append(PartitionSpec(rows, rank_entry))
    low_rank_tree = treedef.unflatten(low_rank_specs)
    return ScaleBySubspaceState(
        count=PartitionSpec(),
        key=PartitionSpec(),
        bases=treedef.unflatten(basis_specs),
        inner_state=_walk(state.inner_state, treedef, low_rank_tree, None),
    )


def _split_of(shape: tuple[int, ...], basis_shape: tuple[int, int]) -> int:
    """The row/column split that produced ``basis_shape`` (the default one first)."""
    default = layout_lib.most_square_split(shape)
    for k in [default, *range(1, len(shape))]:
        if layout_lib.make_layout(shape, basis_shape[1], k).basis_shape == basis_shape:
            return k
    raise ValueError(f"no split of a leaf of shape {shape} has a basis of shape {basis_shape}")


def _sparse_specs(
    state: ScaleBySparseSubspaceState, params: Any, param_specs: Any, mesh_axis_sizes: Any = None
) -> ScaleBySparseSubspaceState:
    """The k values and indices of a sparsified leaf are replicated (its k positions are
    scattered over the whole matrix); moments of other leaves take their param's spec."""
    treedef = jax.tree_util.tree_structure(params)
    indices = treedef.flatten_up_to(state.indices)
    kept = [isinstance(i, optax.MaskedNode) for i in indices]
    values = [
        spec if k else PartitionSpec()
        for k, spec in zip(kept, treedef.flatten_up_to(param_specs), strict=True)
    ]
    return ScaleBySparseSubspaceState(
        count=PartitionSpec(),
        key=PartitionSpec(),
        indices=treedef.unflatten(
            [i if k else PartitionSpec() for k, i in zip(kept, indices, strict=True)]
        ),
        inner_state=_walk(state.inner_state, treedef, treedef.unflatten(values), None),
    )


def _online_specs(
    state: ScaleByOnlineSubspaceState, params: Any, param_specs: Any, mesh_axis_sizes: Any = None
) -> ScaleByOnlineSubspaceState:
    """Like scale_by_subspace's state; the projector optimizer's moments follow the bases."""
    specs = _subspace_specs(
        ScaleBySubspaceState(state.count, None, state.bases, state.inner_state),
        params,
        param_specs,
        mesh_axis_sizes,
    )
    bases_treedef = jax.tree_util.tree_structure(state.bases)
    return ScaleByOnlineSubspaceState(
        count=PartitionSpec(),
        bases=specs.bases,
        projector_state=_walk(state.projector_state, bases_treedef, specs.bases, None),
        inner_state=specs.inner_state,
    )


def _walk(state: Any, treedef: Any, specs_tree: Any, params_and_specs: Any) -> Any:
    """Specs for ``state``: params-shaped subtrees get ``specs_tree``; the rest replicated."""
    if params_and_specs is not None:
        for state_type, specs_fn in (
            (ScaleBySubspaceState, _subspace_specs),
            (ScaleBySparseSubspaceState, _sparse_specs),
            (ScaleByOnlineSubspaceState, _online_specs),
        ):
            if isinstance(state, state_type):
                return specs_fn(state, *params_and_specs)
    if jax.tree_util.tree_structure(state) == treedef and jax.tree_util.tree_leaves(state):
        return specs_tree
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return type(state)(*(_walk(v, treedef, specs_tree, params_and_specs) for v in state))
    if isinstance(state, tuple | list):
        return type(state)(_walk(v, treedef, specs_tree, params_and_specs) for v in state)
    if isinstance(state, dict):
        return {k: _walk(v, treedef, specs_tree, params_and_specs) for k, v in state.items()}
    if isinstance(state, optax.MaskedNode) or state is None:
        return state
    return PartitionSpec()


def state_partition_specs(
    opt_state: Any,
    params: Any,
    param_specs: Any,
    mesh_axis_sizes: Mapping[str, int] | None = None,
) -> Any:
    """A ``PartitionSpec`` for every leaf of ``opt_state`` (same tree structure).

    Args:
      opt_state: an optimizer state, or its ``jax.eval_shape`` (only shapes are read).
      params: the params (or their shapes) the state was initialised from.
      param_specs: a tree like ``params`` of ``PartitionSpec``.
      mesh_axis_sizes: the mesh's axis sizes (``dict(mesh.shape)``), if the specs name mesh
        axes: low-rank moments then shard their rank dim too, where those sizes divide it.
    """
    treedef = jax.tree_util.tree_structure(params)
    return _walk(opt_state, treedef, param_specs, (params, param_specs, mesh_axis_sizes))
