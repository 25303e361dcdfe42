"""Moments of an inner optimizer's state, declared per state type, and their change of basis.

A refresh of a subspace transform moves the inner optimizer's moments from the old subspace to
the new one (``scale_by_subspace``'s ``momentum_projection`` and ``second_moment``; the mask
remap of :mod:`golore_jax._sparse`). Which fields of a state are moments, and of which kind, is
declared by the state's type: :func:`register_moments` (optax's moment-holding states are
registered below). A state type that declares nothing is walked into but never changed, which
is how an 8-bit state (:mod:`golore_jax._quantized`) keeps its codes as they are.

>>> import jax.numpy as jnp, optax
>>> declared_moments(optax.ScaleByAdamState(0, {}, {}))
{'mu': 'first', 'nu': 'second'}
>>> state = optax.ScaleByAdamState(jnp.zeros([]), {"w": jnp.ones(2)}, {"w": jnp.ones(2)})
>>> treedef = jax.tree_util.tree_structure({"w": 0})
>>> doubled = map_moments(state, treedef, lambda kind: (lambda t: jax.tree.map(lambda x: 2 * x, t))
...                       if kind == FIRST else None)
>>> doubled.mu["w"].tolist(), doubled.nu["w"].tolist()
([2.0, 2.0], [1.0, 1.0])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
import optax.contrib

from golore_jax import _explicit
from golore_jax import _layout as layout_lib
from golore_jax._layout import MatrixLayout

FIRST = "first"  # a first moment (a mean of gradients): rotates like the gradient
SECOND = "second"  # a second moment (a mean of squared gradients)
MOMENT_KINDS = (FIRST, SECOND)
SECOND_MOMENT_POLICIES = ("keep", "project", "reset")

_MOMENTS: dict[type, dict[str, str]] = {}


def register_moments(state_type: type, fields: Mapping[str, str]) -> None:
    """Declares which fields of ``state_type`` (a NamedTuple) hold moments, and their kind
    (:data:`FIRST` or :data:`SECOND`). An empty mapping declares a state with no moment a
    change of basis may touch. A field is changed only where it holds a params-shaped tree.
    """
    unknown = sorted(set(fields) - set(getattr(state_type, "_fields", ())))
    if unknown:
        raise ValueError(f"register_moments: {state_type.__name__} has no fields {unknown}")
    bad = {name: kind for name, kind in fields.items() if kind not in MOMENT_KINDS}
    if bad:
        raise ValueError(f"register_moments: kinds must be one of {MOMENT_KINDS}, got {bad}")
    _MOMENTS[state_type] = dict(fields)


def declared_moments(state: Any) -> Mapping[str, str]:
    """``{field: kind}`` declared for ``type(state)`` (empty when nothing is declared)."""
    return _MOMENTS.get(type(state), {})


def map_moments(state: Any, treedef: Any, fn_for_kind: Callable[[str], Callable | None]) -> Any:
    """Applies ``fn_for_kind(kind)`` (None: leave it) to every declared moment field holding a
    params-shaped tree, inside any nesting of states: chain tuples, ``inject_hyperparams``,
    ``MultiSteps`` and other wrappers are walked into."""
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        declared = declared_moments(state)
        values = {}
        for name, value in zip(state._fields, state, strict=True):
            fn = fn_for_kind(declared[name]) if name in declared else None
            if fn is not None and jax.tree_util.tree_structure(value) == treedef:
                values[name] = fn(value)
            else:
                values[name] = map_moments(value, treedef, fn_for_kind)
        return type(state)(**values)
    if isinstance(state, tuple | list):
        return type(state)(map_moments(s, treedef, fn_for_kind) for s in state)
    if isinstance(state, dict):
        return {k: map_moments(v, treedef, fn_for_kind) for k, v in state.items()}
    return state


def rotate_moments(
    inner_state: Any,
    treedef: Any,
    layouts: list[MatrixLayout | None],
    old: list[Any],
    new: list[Any],
    *,
    first: bool,
    second: str,
    changed: list[jax.Array | None] | None = None,
) -> Any:
    """Moves the moments of ``inner_state`` from the ``old`` bases to the ``new`` ones.

    ``first``: rotate first moments by equation (2), ``M <- C M`` with ``C = P_new^T P_old``
    (:func:`golore_jax._layout.rotate_first_moment`). ``second``: ``"keep"``, ``"reset"`` to
    zero, or ``"project"`` (:func:`golore_jax._layout.rotate_second_moment`). ``changed``
    (lazy refresh): per leaf a bool scalar (None: changed); where False the leaf kept its
    basis and its moments are left exactly as they are (``C = P^T P`` is not exactly ``I``,
    and a reset would zero them).
    """
    f32 = jnp.float32
    # On a mesh with Explicit axes the small r x r change is replicated (its d-long contraction
    # sums over the bases' sharded rows) and each rotated moment keeps its own sharding;
    # elsewhere _explicit's helpers return their input (the same program as before).
    changes = [
        None if lay is None else _explicit.replicated_matmul(n.astype(f32).T, o.astype(f32))
        for lay, o, n in zip(layouts, old, new, strict=True)
    ]

    def per_leaf(rotate):
        def apply(tree):
            leaves = treedef.flatten_up_to(tree)
            return treedef.unflatten(
                [
                    x if lay is None else _explicit.like(rotate(x, c, lay).astype(x.dtype), x)
                    for x, c, lay in zip(leaves, changes, layouts, strict=True)
                ]
            )

        return apply if changed is None else _where_changed(apply, treedef, changed)

    rules = {
        FIRST: per_leaf(layout_lib.rotate_first_moment) if first else None,
        SECOND: {
            "keep": None,
            "reset": per_leaf(lambda v, c, lay: jnp.zeros_like(v)),
            "project": per_leaf(layout_lib.rotate_second_moment),
        }[second],
    }
    return map_moments(inner_state, treedef, rules.get)


def _where_changed(
    apply: Callable[[Any], Any], treedef: Any, changed: list[jax.Array | None]
) -> Callable[[Any], Any]:
    """``apply`` on a params-like tree, its result kept only for the leaves ``changed`` says
    (the others as they were)."""

    def masked(tree):
        out = treedef.flatten_up_to(apply(tree))
        leaves = treedef.flatten_up_to(tree)
        return treedef.unflatten(
            [
                y if c is None else jnp.where(c, y, x)
                for x, y, c in zip(leaves, out, changed, strict=True)
            ]
        )

    return masked


def _register_optax_states() -> None:
    """optax's states holding moments: their ``mu``/``trace``/``ema`` fields are first
    moments, their ``nu`` fields second moments (the fields the rotation used to find by
    name)."""
    states = [
        (optax.TraceState, {"trace": FIRST}),
        (optax.EmaState, {"ema": FIRST}),
        (optax.ScaleByAdamState, {"mu": FIRST, "nu": SECOND}),
        (optax.ScaleByAmsgradState, {"mu": FIRST, "nu": SECOND}),
        (optax.ScaleByBeliefState, {"mu": FIRST, "nu": SECOND}),
        (optax.ScaleByLionState, {"mu": FIRST}),
        (optax.ScaleByNovogradState, {"mu": FIRST, "nu": SECOND}),
        (optax.ScaleByRmsState, {"nu": SECOND}),
        (optax.ScaleByRStdDevState, {"mu": FIRST, "nu": SECOND}),
        (optax.ScaleBySM3State, {"mu": FIRST, "nu": SECOND}),
        (optax.contrib.MuonState, {"mu": FIRST}),
        (optax.contrib.ScaleByAdemamixState, {"nu": SECOND}),
        (optax.contrib.SophiaState, {"mu": FIRST, "nu": SECOND}),
    ]

    # The bias-corrected RMS / stddev states are not exported by optax: take their types from
    # the public constructors, traced abstractly (an eager init would start the XLA backend at
    # import time, before a multi-process run may call jax.distributed.initialize).
    def state_type(transform: optax.GradientTransformation) -> type:
        return type(jax.eval_shape(transform.init, {}))

    states.append((state_type(optax.scale_by_rms(bias_correction=True)), {"nu": SECOND}))
    states.append(
        (state_type(optax.scale_by_stddev(bias_correction=True)), {"mu": FIRST, "nu": SECOND})
    )
    for state_type, fields in states:
        register_moments(state_type, fields)


_register_optax_states()
