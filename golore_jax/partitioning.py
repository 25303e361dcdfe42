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
from golore_jax.layerwise import LayerwiseState, split_stack
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
    moments = _low_rank_shapes(state.inner_state, treedef, len(param_leaves))
    basis_specs, low_rank_specs = [], []
    for leaf, spec, basis, moment in zip(
        param_leaves, spec_leaves, basis_leaves, moments, strict=True
    ):
        if isinstance(basis, optax.MaskedNode):
            basis_specs.append(basis)
            low_rank_specs.append(spec)
            continue
        shape = tuple(leaf.shape)
        k, lay = _layout_of(shape, tuple(basis.shape), moment)
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


def _low_rank_shapes(inner_state: Any, treedef: Any, n: int) -> list[tuple[int, ...] | None]:
    """Per leaf, the shape of its first params-like moment in ``inner_state`` (None: none)."""

    def find(state):
        if jax.tree_util.tree_structure(state) == treedef and jax.tree_util.tree_leaves(state):
            return [tuple(x.shape) for x in treedef.flatten_up_to(state)]
        children = ()
        if isinstance(state, tuple | list):
            children = state
        elif isinstance(state, dict):
            children = state.values()
        return next((s for s in map(find, children) if s is not None), None)

    shapes = find(inner_state)
    return shapes if shapes is not None else [None] * n


def _layout_of(
    shape: tuple[int, ...], basis_shape: tuple[int, int], low_rank: tuple[int, ...] | None
) -> tuple[int, layout_lib.MatrixLayout]:
    """The split and layout that produced ``basis_shape`` (and the moments' ``low_rank``
    shape, which tells the side of a square matrix): default split and side rule first."""
    default = layout_lib.most_square_split(shape)
    for k in [default, *range(1, len(shape))]:
        for side in ("gradient", layout_lib.LEFT, layout_lib.RIGHT):
            lay = layout_lib.make_layout(shape, basis_shape[1], k, side)
            if lay.basis_shape == basis_shape and low_rank in (None, lay.low_rank_shape):
                return k, lay
    raise ValueError(
        f"no split or side of a leaf of shape {shape} has a basis of shape {basis_shape} "
        f"and moments of shape {low_rank}"
    )


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


def _layerwise_specs(
    state: LayerwiseState,
    params: Any,
    param_specs: Any,
    stack_path: Any,
    mesh_axis_sizes: Mapping[str, int] | None,
) -> LayerwiseState:
    """The specs of one layer's state (from one layer's params and specs), behind the layer
    axis's entry; the other params' state from theirs."""
    if stack_path is None:
        raise ValueError("state_partition_specs: a LayerwiseState needs stack_path")
    stack, rest = split_stack(params, stack_path)
    stack_specs, rest_specs = split_stack(param_specs, stack_path)
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    stack_entries = jax.tree_util.tree_map(
        lambda x, s: _entries(s, len(x.shape)), stack, stack_specs, is_leaf=is_spec
    )
    firsts = {e[0] for e in jax.tree_util.tree_leaves(stack_entries, is_leaf=_is_entries)}
    layer_axis = firsts.pop() if len(firsts) == 1 else None

    def strip(x):
        return jax.ShapeDtypeStruct(tuple(x.shape)[1:], x.dtype)

    one_layer_specs = state_partition_specs(
        jax.tree_util.tree_map(strip, state.layers),
        jax.tree_util.tree_map(strip, stack),
        jax.tree_util.tree_map(lambda e: PartitionSpec(*e[1:]), stack_entries, is_leaf=_is_entries),
        mesh_axis_sizes,
    )
    return LayerwiseState(
        layers=jax.tree_util.tree_map(
            lambda s: PartitionSpec(layer_axis, *s), one_layer_specs, is_leaf=is_spec
        ),
        rest=state_partition_specs(state.rest, rest, rest_specs, mesh_axis_sizes),
    )


def _is_entries(x: Any) -> bool:
    return isinstance(x, tuple) and not isinstance(x, PartitionSpec)


def _walk(state: Any, treedef: Any, specs_tree: Any, params_and_specs: Any) -> Any:
    """Specs for ``state``: params-shaped subtrees get ``specs_tree``; the rest replicated."""
    if params_and_specs is not None:
        if isinstance(state, LayerwiseState):
            return _layerwise_specs(state, *params_and_specs)
        for state_type, specs_fn in (
            (ScaleBySubspaceState, _subspace_specs),
            (ScaleBySparseSubspaceState, _sparse_specs),
            (ScaleByOnlineSubspaceState, _online_specs),
        ):
            if isinstance(state, state_type):
                params, param_specs, _, mesh_axis_sizes = params_and_specs
                return specs_fn(state, params, param_specs, mesh_axis_sizes)
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
    *,
    stack_path: Any = None,
) -> Any:
    """A ``PartitionSpec`` for every leaf of ``opt_state`` (same tree structure).

    Args:
      opt_state: an optimizer state, or its ``jax.eval_shape`` (only shapes are read).
      params: the params (or their shapes) the state was initialised from.
      param_specs: a tree like ``params`` of ``PartitionSpec``.
      mesh_axis_sizes: the mesh's axis sizes (``dict(mesh.shape)``), if the specs name mesh
        axes: low-rank moments then shard their rank dim too, where those sizes divide it.
      stack_path: for a :func:`golore_jax.layerwise.layerwise` state, the path of the stacked
        layers in ``params``: each layer's state is sharded like that layer's params.
    """
    treedef = jax.tree_util.tree_structure(params)
    context = (params, param_specs, stack_path, mesh_axis_sizes)
    return _walk(opt_state, treedef, param_specs, context)
