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

Each transform's module registers the rule of its state type
(:func:`register_partition_rule`), so a new transform never edits this module; states without a
rule are walked into (chain tuples, optax wrappers), their params-shaped subtrees taking the
params' specs.

>>> import jax.numpy as jnp, optax
>>> params = {"w": jnp.zeros((8, 4))}
>>> state = optax.adam(1e-3).init(params)
>>> specs = state_partition_specs(state, params, {"w": PartitionSpec("fsdp", None)})
>>> specs[0].mu == {"w": PartitionSpec("fsdp", None)}, specs[0].count == PartitionSpec()
(True, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import optax
from jax.sharding import PartitionSpec

from golore_jax import _layout as layout_lib


class SpecContext(NamedTuple):
    """What a partition rule may read besides the state (see :func:`state_partition_specs`)."""

    params: Any
    param_specs: Any
    mesh_axis_sizes: Mapping[str, int] | None
    stack_path: Any


PartitionRule = Callable[[Any, SpecContext], Any]
_RULES: dict[type, PartitionRule] = {}


def register_partition_rule(state_type: type, rule: PartitionRule) -> None:
    """``rule(state, context) -> specs`` gives the specs of every ``state_type`` state (a tree
    like the state with a ``PartitionSpec`` per leaf). Registered by the module that defines
    the state type, next to its transform."""
    _RULES[state_type] = rule


def merged(spec_entries: tuple[Any, ...]) -> Any:
    """The spec of a merged (flattened) axis: its first sharded component's, else None."""
    return next((e for e in spec_entries if e is not None), None)


def entries(spec: PartitionSpec, ndim: int) -> tuple[Any, ...]:
    """The spec's entries padded with None to ``ndim``."""
    return tuple(spec) + (None,) * (ndim - len(spec))


def _divides(entry: Any, size: int, mesh_axis_sizes: Mapping[str, int] | None) -> bool:
    """Whether a dim of ``size`` can be sharded over the mesh axes of a spec ``entry``."""
    if entry is None or mesh_axis_sizes is None:
        return False
    axes = (entry,) if isinstance(entry, str) else tuple(entry)
    return size % math.prod(mesh_axis_sizes[a] for a in axes) == 0


def basis_specs(bases: Any, inner_state: Any, context: SpecContext) -> tuple[Any, Any]:
    """``(specs of the bases, specs of a low-rank params-like tree)`` for a state holding a
    ``(d, r)`` basis per projected leaf (``optax.MaskedNode()`` elsewhere) and an inner state on
    the low-rank shapes: ``scale_by_subspace``'s and ``scale_by_online_subspace``'s."""
    params, param_specs, mesh_axis_sizes = (
        context.params,
        context.param_specs,
        context.mesh_axis_sizes,
    )
    treedef = jax.tree_util.tree_structure(params)
    param_leaves = treedef.flatten_up_to(params)
    spec_leaves = treedef.flatten_up_to(param_specs)
    basis_leaves = treedef.flatten_up_to(bases)
    moments = _low_rank_shapes(inner_state, treedef, len(param_leaves))
    basis_out, low_rank_out = [], []
    for leaf, spec, basis, moment in zip(
        param_leaves, spec_leaves, basis_leaves, moments, strict=True
    ):
        if isinstance(basis, optax.MaskedNode):
            basis_out.append(basis)
            low_rank_out.append(spec)
            continue
        shape = tuple(leaf.shape)
        _, lay = _layout_of(shape, tuple(basis.shape), moment)
        basis_spec, low_rank_spec = matrix_specs(shape, spec, lay, mesh_axis_sizes)
        basis_out.append(basis_spec)
        low_rank_out.append(low_rank_spec)
    return treedef.unflatten(basis_out), treedef.unflatten(low_rank_out)


def matrix_specs(
    shape: tuple[int, ...],
    spec: PartitionSpec,
    lay: layout_lib.MatrixLayout,
    mesh_axis_sizes: Mapping[str, int] | None,
) -> tuple[PartitionSpec, PartitionSpec]:
    """``(basis spec, low-rank spec)`` of one projected leaf of ``shape`` with param ``spec``,
    seen as a matrix by ``lay``: the rule of this module's docstring, which the subspace
    transforms also apply to the params' types on meshes with Explicit axes."""
    # Rows are shape[:k]: the first k whose product is lay.rows (size-1 dims are never sharded).
    k = next(i for i in range(1, len(shape)) if math.prod(shape[:i]) == lay.rows)
    spec_entries = entries(spec, len(shape))
    rows, cols = merged(spec_entries[:k]), merged(spec_entries[k:])
    if lay.side == layout_lib.LEFT:
        rank_entry = rows if _divides(rows, lay.rank, mesh_axis_sizes) else None
        return PartitionSpec(rows, None), PartitionSpec(rank_entry, cols)
    rank_entry = cols if _divides(cols, lay.rank, mesh_axis_sizes) else None
    return PartitionSpec(cols, None), PartitionSpec(rows, rank_entry)


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


def walk(state: Any, treedef: Any, specs_tree: Any, context: SpecContext | None = None) -> Any:
    """Specs for ``state``: params-shaped subtrees (params of structure ``treedef``) get
    ``specs_tree``, the rest is replicated. With a ``context``, a state whose type has a
    registered rule gets that rule's specs."""
    if context is not None and type(state) in _RULES:
        return _RULES[type(state)](state, context)
    if jax.tree_util.tree_structure(state) == treedef and jax.tree_util.tree_leaves(state):
        return specs_tree
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return type(state)(*(walk(v, treedef, specs_tree, context) for v in state))
    if isinstance(state, tuple | list):
        return type(state)(walk(v, treedef, specs_tree, context) for v in state)
    if isinstance(state, dict):
        return {k: walk(v, treedef, specs_tree, context) for k, v in state.items()}
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

    >>> import golore_jax as gl, jax.numpy as jnp
    >>> params = {"w": jnp.ones((8, 4))}
    >>> tx = gl.galore_adamw(1e-3, subspace=gl.Subspace(rank=2))
    >>> specs = state_partition_specs(tx.init(params), params, {"w": PartitionSpec("data")})
    >>> specs[0].inner_state.mu["w"] == PartitionSpec("data", None)  # moments (8, 2): rows
    True
    """
    treedef = jax.tree_util.tree_structure(params)
    context = SpecContext(params, param_specs, mesh_axis_sizes, stack_path)
    return walk(opt_state, treedef, param_specs, context)
