"""Run an optax transformation layer by layer over a stack of identical layers.

A model whose decoder layers are stacked (each parameter of the layers subtree carries a
leading ``num_layers`` axis, e.g. a ``scan`` over layers) can update each layer as soon as its
gradient exists, inside the backward pass, so that the gradients of all layers never exist at
once (GaLore's per-layer updates, Zhao et al. 2024, Section 4.3). This module holds what such a
step needs from the optimizer side:

* :func:`layerwise`: a ``GradientTransformation`` over the whole param tree whose state keeps
  the stack's part with a leading layer axis (``jax.vmap(tx.init)`` over the layers) and the
  other params' part (embeddings, head, norms) on its own. Its ``update`` takes the full
  gradient and updates the layers one after another (``lax.map``): the reference a fused
  backward pass must agree with, and a per-layer optimizer for any stacked model.
* :func:`init_layers` / :func:`update_layer`: the per-layer pieces a fused step calls, e.g.
  in the body of a reverse ``lax.scan`` over the layers.

Each layer runs its own copy of ``tx``: a subspace optimizer refreshes each layer's bases from
that layer's gradient alone (a refresh never holds more than one layer's gradients), and every
PRNG key of a layer's state has the layer index folded in at init, so random projections
(GoLore) draw a distinct stream per layer.

Global gradient-norm clipping cannot run this way: it needs the norm of every gradient before
any update, and here a layer is updated before the next one's gradient exists. ``clip_norm``
clips each group by its own norm instead: each layer's gradient, and the other params'
gradient as one group.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import PartitionSpec

from golore_jax import partitioning

StackPath = Sequence[Any]  # dict keys from the root to the stacked-layers subtree


class LayerwiseState(NamedTuple):
    """State of :func:`layerwise`.

    Attributes:
      layers: the per-layer transform's state, every leaf with a leading layer axis.
      rest: its state for the params outside the stack.
    """

    layers: Any
    rest: Any


def split_stack(tree: Any, path: StackPath) -> tuple[Any, Any]:
    """``(stack, rest)``: the subtree at ``path`` and ``tree`` without it (nested mappings)."""
    path = tuple(path)
    if not path:
        raise ValueError("layerwise: the stack path is empty; name the stacked-layers subtree")
    node = tree
    for depth, key in enumerate(path):
        if not isinstance(node, Mapping) or key not in node:
            where = "".join(f"[{k!r}]" for k in path[:depth])
            raise ValueError(f"layerwise: no subtree {key!r} at {where or 'the root'} of the tree")
        node = node[key]
    return node, _without(tree, path)


def _without(tree: Mapping, path: tuple) -> dict:
    head, *tail = path
    out = {k: v for k, v in tree.items() if k != head}
    if tail:
        out[head] = _without(tree[head], tuple(tail))
    return out


def merge_stack(stack: Any, rest: Any, path: StackPath) -> dict:
    """Inverse of :func:`split_stack`: ``rest`` with ``stack`` put back at ``path``."""
    head, *tail = tuple(path)
    out = dict(rest)
    out[head] = merge_stack(stack, rest[head], tail) if tail else stack
    return out


def num_layers(stack: Any) -> int:
    """The stack's leading axis size; raises unless every leaf has the same one."""
    sizes = {
        jax.tree_util.keystr(p): (jnp.shape(x)[0] if jnp.ndim(x) else None)
        for p, x in jax.tree_util.tree_leaves_with_path(stack)
    }
    if not sizes:
        raise ValueError("layerwise: the stacked-layers subtree has no leaves")
    distinct = set(sizes.values())
    if len(distinct) != 1 or None in distinct:
        raise ValueError(
            f"layerwise: every leaf of the stack needs the same leading (layer) axis, got {sizes}"
        )
    return distinct.pop()


def per_layer_transform(
    tx: optax.GradientTransformation, clip_norm: float | None = None
) -> optax.GradientTransformationExtraArgs:
    """``tx``, behind a clip of the gradient it sees to ``clip_norm`` when given.

    Applied to one layer (or to the params outside the stack), the clip is by that group's
    norm: the only clipping a layer-by-layer update can do.
    """
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"layerwise: clip_norm must be > 0 or None, got {clip_norm!r}")
    tx = optax.with_extra_args_support(tx)
    if clip_norm is None:
        return tx
    return optax.with_extra_args_support(optax.chain(optax.clip_by_global_norm(clip_norm), tx))


def _fold_keys(state: Any, index: jax.Array) -> Any:
    """Every typed PRNG key of ``state`` with ``index`` folded in (other leaves unchanged)."""

    def fold(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.fold_in(x, index)
        return x

    return jax.tree_util.tree_map(fold, state)


def init_layers(tx: optax.GradientTransformation, stack: Any) -> Any:
    """``tx``'s state for each layer of ``stack``, stacked on a leading layer axis.

    Layer ``i``'s PRNG keys are ``fold_in(key, i)``: each layer draws its own stream.
    """
    indices = jnp.arange(num_layers(stack), dtype=jnp.uint32)
    return jax.vmap(lambda i, layer: _fold_keys(tx.init(layer), i))(indices, stack)


def update_layer(
    tx: optax.GradientTransformation,
    grads: Any,
    state: Any,
    params: Any = None,
    **extra_args: Any,
) -> tuple[Any, Any]:
    """One layer's ``tx.update`` on that layer's gradient, state slice and params slice.

    The call a fused backward pass makes for layer ``i`` (inside a ``lax.scan`` body, with the
    ``i``-th slices of :func:`init_layers`'s state and of the stacked params).
    """
    return tx.update(grads, state, params, **extra_args)


def _counters(layers_state: Any) -> list[bool]:
    """Which leaves of a stacked per-layer state hold one integer per layer: step counts, which
    agree across layers when every layer is updated at every call."""
    return [
        jnp.issubdtype(x.dtype, jnp.integer) and jnp.ndim(x) == 1
        for x in jax.tree_util.tree_leaves(layers_state)
    ]


def _update_layers(
    inner: optax.GradientTransformation,
    stack_grads: Any,
    layers_state: Any,
    stack_params: Any,
    layers_per_call: int,
    **extra_args: Any,
) -> tuple[Any, Any]:
    """``inner.update`` on every layer of the stack, ``layers_per_call`` layers at a time.

    Several layers at a time are vmapped. Under ``vmap`` a ``lax.cond`` whose predicate differs
    per layer becomes a select that runs both branches (a subspace optimizer would then refresh
    at every step), so the step counts go in as one value for all the vmapped layers: a refresh
    stays a branch, taken for all of them in one batched decomposition. Where the counts do not
    agree (e.g. an inner ``optax.apply_if_finite`` skipped one layer), the update runs one
    layer after another instead, chosen at run time.
    """

    def map_layers(operands, batch_size=None, share_counters=False):
        grads, state, params = operands
        leaves = jax.tree_util.tree_leaves(state)
        if share_counters:  # one value for all layers, the first layer's, passed unmapped
            shared = [x[0] if c else None for x, c in zip(leaves, counters, strict=True)]
            leaves = [None if c else x for x, c in zip(leaves, counters, strict=True)]

        def one_layer(xs):
            layer_grads, layer_leaves, layer_params = xs
            if share_counters:
                layer_leaves = [
                    v if c else x for x, v, c in zip(layer_leaves, shared, counters, strict=True)
                ]
            layer_state = treedef.unflatten(layer_leaves)
            return update_layer(inner, layer_grads, layer_state, layer_params, **extra_args)

        return lax.map(one_layer, (grads, leaves, params), batch_size=batch_size)

    leaves, treedef = jax.tree_util.tree_flatten(layers_state)
    counters = _counters(layers_state)
    operands = (stack_grads, layers_state, stack_params)
    if layers_per_call == 1:
        return map_layers(operands)
    if not any(counters):  # nothing per layer to turn a branch into a select
        return map_layers(operands, layers_per_call)
    agree = jnp.all(
        jnp.stack([jnp.all(x == x[0]) for x, c in zip(leaves, counters, strict=True) if c])
    )
    return lax.cond(agree, lambda ops: map_layers(ops, layers_per_call, True), map_layers, operands)


def layerwise(
    tx: optax.GradientTransformation,
    stack_path: StackPath,
    *,
    clip_norm: float | None = None,
    layers_per_call: int = 1,
) -> optax.GradientTransformationExtraArgs:
    """Runs ``tx`` on each layer of the stack at ``stack_path`` and on the other params.

    Args:
      tx: any optax transformation; one copy runs per layer (a subspace optimizer chooses
        each layer's bases from that layer's gradient) and one on the params outside the stack.
      stack_path: dict keys from the root of the params to the stacked-layers subtree, e.g.
        ``("model", "layers")``; its leaves share a leading layer axis.
      clip_norm: clip each layer's gradient, and the other params' gradient, by its own norm
        (None: no clip). Global-norm clipping needs every gradient before any update, which a
        layer-by-layer update never has: wrap the result in ``optax.clip_by_global_norm`` only
        when the full gradient exists anyway (this transform's own ``update``).
      layers_per_call: ``update`` updates this many layers at once (vmapped; the last call
        takes the remainder): a subspace optimizer's refresh then decomposes their matrices
        in one batched call instead of one layer's after another (LLaMA-1B on an H200: 4.9 s
        one layer at a time, 1.6 s all 24 at once), but every step then holds that many
        layers' update temporaries at once (there: +11 GiB). 1 (default): one layer at a
        time, the least memory.

    ``update`` takes the full gradient and updates the layers (``lax.map``); a fused backward
    pass gets the same result calling :func:`update_layer` with :func:`per_layer_transform`
    ``(tx, clip_norm)`` on each layer's slices.

    >>> import jax.numpy as jnp
    >>> params = {"layers": {"w": jnp.ones((3, 4, 6))}, "head": jnp.ones(6)}
    >>> tx = layerwise(optax.sgd(0.1), ("layers",))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> updates["layers"]["w"].shape, updates["head"][0].item()
    ((3, 4, 6), -0.10000000149011612)
    """
    stack_path = tuple(stack_path)
    inner = per_layer_transform(tx, clip_norm)
    if isinstance(layers_per_call, bool) or not (
        isinstance(layers_per_call, int) and layers_per_call >= 1
    ):
        raise ValueError(f"layerwise: layers_per_call must be an int >= 1, got {layers_per_call!r}")

    def init_fn(params):
        stack, rest = split_stack(params, stack_path)
        return LayerwiseState(layers=init_layers(inner, stack), rest=inner.init(rest))

    def update_fn(updates, state, params=None, **extra_args):
        stack_grads, rest_grads = split_stack(updates, stack_path)
        stack_params, rest_params = (
            (None, None) if params is None else split_stack(params, stack_path)
        )

        stack_updates, layers_state = _update_layers(
            inner, stack_grads, state.layers, stack_params, layers_per_call, **extra_args
        )
        rest_updates, rest_state = inner.update(rest_grads, state.rest, rest_params, **extra_args)
        return (
            merge_stack(stack_updates, rest_updates, stack_path),
            LayerwiseState(layers=layers_state, rest=rest_state),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _partition_specs(state: LayerwiseState, context: partitioning.SpecContext) -> LayerwiseState:
    """The specs of one layer's state (from one layer's params and specs), behind the layer
    axis's entry; the other params' state from theirs."""
    if context.stack_path is None:
        raise ValueError("state_partition_specs: a LayerwiseState needs stack_path")
    stack, rest = split_stack(context.params, context.stack_path)
    stack_specs, rest_specs = split_stack(context.param_specs, context.stack_path)
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    is_entries = lambda x: isinstance(x, tuple) and not is_spec(x)  # noqa: E731
    stack_entries = jax.tree_util.tree_map(
        lambda x, s: partitioning.entries(s, len(x.shape)), stack, stack_specs, is_leaf=is_spec
    )
    firsts = {e[0] for e in jax.tree_util.tree_leaves(stack_entries, is_leaf=is_entries)}
    layer_axis = firsts.pop() if len(firsts) == 1 else None

    def strip(x):
        return jax.ShapeDtypeStruct(tuple(x.shape)[1:], x.dtype)

    one_layer_specs = partitioning.state_partition_specs(
        jax.tree_util.tree_map(strip, state.layers),
        jax.tree_util.tree_map(strip, stack),
        jax.tree_util.tree_map(lambda e: PartitionSpec(*e[1:]), stack_entries, is_leaf=is_entries),
        context.mesh_axis_sizes,
    )
    return LayerwiseState(
        layers=jax.tree_util.tree_map(
            lambda s: PartitionSpec(layer_axis, *s), one_layer_specs, is_leaf=is_spec
        ),
        rest=partitioning.state_partition_specs(
            state.rest, rest, rest_specs, context.mesh_axis_sizes
        ),
    )


partitioning.register_partition_rule(LayerwiseState, _partition_specs)
