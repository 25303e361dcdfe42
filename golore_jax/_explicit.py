"""Shardings in types: what the subspace transforms do on meshes with Explicit axes.

On a mesh whose axes are ``jax.sharding.AxisType.Explicit`` (``jax.make_mesh``'s default), an
array's sharding is part of its type (``jax.typeof(x).sharding``) and every operation checks
it while tracing: a decomposition (``svd``, ``eigh``, ``qr``, ``top_k``) needs its operand
unsharded on the decomposed dims, a matmul whose contracting dims are sharded needs its
output's sharding named, and the two branches of a ``lax.cond`` must return the same types.
The helpers here do exactly that and nothing else: on an array whose type names no Explicit
mesh axis (no mesh, or Auto axes, where XLA chooses shardings itself) each one returns its
input untouched, so that code traces to the same program as before.

The state's shardings follow the params' types by the rule of
:func:`golore_jax.partitioning.matrix_specs`, the same rule ``state_partition_specs`` applies
to Auto meshes: a basis takes the spec of the param dim it spans, a low-rank moment that of
the dim it keeps.

>>> import jax.numpy as jnp
>>> from jax.sharding import PartitionSpec as P
>>> from golore_jax._layout import make_layout
>>> g = jnp.ones((4, 8))
>>> unsharded(g) is g, like(g, g) is g  # no mesh: the input itself
(True, True)
>>> mesh = jax.make_mesh((1,), ("fsdp",))  # Explicit axes (the default)
>>> w = jax.device_put(g, NamedSharding(mesh, P("fsdp", None)))
>>> basis, low_rank, _ = matrix_shardings(w, make_layout(w.shape, 2))  # P: 4 x 2, R: 2 x 8
>>> basis.spec, low_rank.spec  # R's rank dim takes P's rows' axis (its size 1 divides r = 2)
(P('fsdp', None), P('fsdp', None))
>>> unsharded(w).sharding.spec
P(None, None)
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from golore_jax import partitioning
from golore_jax._layout import MatrixLayout


def sharding_of(x: Any) -> NamedSharding | None:
    """``x``'s sharding type when its mesh has an Explicit axis; None otherwise (no mesh, Auto
    axes only, or not an array)."""
    try:
        sharding = jax.typeof(x).sharding
    except (TypeError, AttributeError):
        return None
    if not isinstance(sharding, NamedSharding):
        return None
    if AxisType.Explicit not in tuple(sharding.mesh.axis_types):
        return None
    return sharding


def _entries(spec: PartitionSpec, ndim: int) -> tuple[Any, ...]:
    return partitioning.entries(spec, ndim)


def reshard_to(x: jax.Array, spec: PartitionSpec, like: Any = None) -> jax.Array:
    """``x`` resharded to ``spec`` on the Explicit mesh of ``x`` (or of ``like``); ``x`` itself
    if neither has Explicit axes or ``x`` already has that spec."""
    own = sharding_of(x)
    ref = own if like is None else sharding_of(like)
    if ref is None:
        return x
    ndim = jnp.ndim(x)
    if own is not None and _entries(own.spec, ndim) == _entries(spec, ndim):
        return x
    return jax.sharding.reshard(x, NamedSharding(ref.mesh, spec))


def unsharded(x: jax.Array) -> jax.Array:
    """``x`` replicated over its Explicit axes: the operand a decomposition needs."""
    own = sharding_of(x)
    if own is None or not any(e is not None for e in own.spec):
        return x
    return reshard_to(x, PartitionSpec())


def like(x: jax.Array, ref: Any) -> jax.Array:
    """``x`` with the sharding type of ``ref`` (a ``lax.cond`` branch's result matching the
    other branch's, a result going back into the state); ``x`` where ``ref`` has no Explicit
    axes."""
    sharding = sharding_of(ref)
    if sharding is None:
        return x
    return reshard_to(x, sharding.spec, like=ref)


def replicated_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` for a small result (an ``r x r`` change of basis) whose contraction may run
    over sharded dims: on an Explicit mesh the result is replicated (a sum across devices),
    elsewhere the plain product."""
    if sharding_of(a) is None and sharding_of(b) is None:
        return a @ b
    return jnp.matmul(a, b, out_sharding=named(a if sharding_of(a) else b, PartitionSpec()))


def like_tree(tree: Any, ref: Any) -> Any:
    """:func:`like` leaf by leaf (``ref`` a tree of the same structure)."""
    return jax.tree.map(like, tree, ref)


def named(x: Any, spec: PartitionSpec | None) -> NamedSharding | None:
    """``spec`` on the Explicit mesh of ``x`` (None where ``x`` has no Explicit axes)."""
    sharding = sharding_of(x)
    if sharding is None or spec is None:
        return None
    return NamedSharding(sharding.mesh, spec)


def matrix_shardings(
    leaf: Any, layout: MatrixLayout | None
) -> tuple[NamedSharding, NamedSharding, NamedSharding] | None:
    """``(basis, low-rank, matrix)`` shardings of a projected leaf whose type has Explicit axes,
    from its spec (:func:`golore_jax.partitioning.matrix_specs`); None where ``layout`` is None
    or the leaf has no Explicit axes."""
    sharding = sharding_of(leaf)
    if layout is None or sharding is None:
        return None
    shape = tuple(jnp.shape(leaf))
    basis, low_rank = partitioning.matrix_specs(
        shape, sharding.spec, layout, dict(sharding.mesh.shape)
    )
    if len(shape) == 2:
        full = sharding.spec
    else:  # the rows x cols view of a flattened leaf (its merged axes' first sharded entry)
        k = next(i for i in range(1, len(shape)) if math.prod(shape[:i]) == layout.rows)
        spec = partitioning.entries(sharding.spec, len(shape))
        full = PartitionSpec(partitioning.merged(spec[:k]), partitioning.merged(spec[k:]))
    return tuple(NamedSharding(sharding.mesh, s) for s in (basis, low_rank, full))


def stacked_spec(sharding: Any, size: int, ndim: int, x: Any) -> PartitionSpec:
    """The spec of a stack of ``size`` matrices decomposed on an Explicit mesh under
    ``refresh_sharding``: its leading entry where its mesh axes divide ``size`` (each device
    then decomposes its share), else replicated; never sharded on the decomposed dims."""
    spec = sharding.spec if isinstance(sharding, NamedSharding) else sharding
    lead = next(iter(spec), None) if spec is not None else None
    own = sharding_of(x)
    if lead is None or own is None:
        return PartitionSpec()
    axes = (lead,) if isinstance(lead, str) else tuple(lead)
    if size % math.prod(own.mesh.shape[a] for a in axes):
        return PartitionSpec()
    return PartitionSpec(lead, *([None] * (ndim - 1)))


def leaf_shardings(leaves: list[Any], layouts: list[MatrixLayout | None]) -> list | None:
    """Per leaf, its :func:`matrix_shardings`; None when no leaf has Explicit axes (then
    callers build the same program as without a mesh)."""
    shardings = [matrix_shardings(x, lay) for x, lay in zip(leaves, layouts, strict=True)]
    return shardings if any(s is not None for s in shardings) else None
