"""The train and eval steps, as module-level functions (one place for the update).

A step is ``(state, batch) -> (state, metrics)`` on a :class:`TrainState`. :func:`train_step`
is the plain full-gradient step; the layer-wise step (``train/layerwise.py``) and the
ReLoRA-like step (``train/relora.py``) are variants that compute their gradients differently
but update through :func:`apply_gradients` and finish through :func:`guarded`, so the
non-finite policy and the metrics are the same for every step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

# (params, batch) -> scalar loss
LossFn = Callable[[Any, dict], jax.Array]
# (params, updates) -> params; or, with stochastic rounding, the step and layer too
ApplyUpdates = Callable[..., Any]


class TrainState(NamedTuple):
    step: jax.Array  # int32, optimizer steps applied or skipped
    params: Any
    opt_state: Any
    skipped: jax.Array  # int32, steps skipped for non-finite loss or gradients
    # ReLoRA-like runs (config.step.relora): A per projected leaf, whose params hold W0.
    adapters: Any = None


def init_state(params: Any, opt_state: Any, adapters: Any = None) -> TrainState:
    """A state at step 0 with nothing skipped."""
    zero = jnp.zeros([], jnp.int32)
    return TrainState(zero, params, opt_state, zero, adapters)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy in fp32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def answer_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    """Cross-entropy averaged over answer tokens only (``weights`` 0 on prompt and padding)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def apply_gradients(
    update: Callable[..., tuple[Any, Any]],
    grads: Any,
    opt_state: Any,
    params: Any,
    apply_updates: Callable[[Any, Any], Any] = optax.apply_updates,
    **extra_args: Any,
) -> tuple[Any, Any]:
    """grads -> ``update`` (a transformation's ``tx.update``) -> ``apply_updates``.

    Returns ``(params, opt_state)``. ``apply_updates`` receives ``(params, updates)``: bind
    the step (stochastic rounding) or the adapters (ReLoRA) with a closure.
    """
    updates, opt_state = update(grads, opt_state, params, **extra_args)
    return apply_updates(params, updates), opt_state


def guarded(
    state: TrainState,
    loss: jax.Array,
    grads: Any,
    apply: Callable[..., tuple[Any, Any, Any]],
    *,
    apply_args: tuple[Any, ...] = (),
    compiler_placed: bool = False,
) -> tuple[TrainState, dict]:
    """Runs ``apply(*apply_args, (params, opt_state, adapters))`` only if loss and gradients
    are finite.

    A non-finite step changes nothing but the counters (the loop's policy 'skip' or 'stop'
    decides what happens next). Returns the new state and the step's metrics: ``loss``,
    ``grad_norm``, ``finite`` and ``leaf_finite`` (one bool per gradient leaf).

    ``compiler_placed`` (a mesh with Explicit axes): the checks and the update run inside
    ``jax.sharding.auto_axes``, their results given the state's explicit types. JAX lowers
    every operation on a typed array with a sharding constraint: an optimizer's per-leaf
    algebra on LLaMA-1B gives ~12k of them (optax's adamw alone ~10k) and a slower compile of
    the same optimised program; here the types hold at the boundary and XLA places the rest,
    as on Auto axes. ``apply`` then gets every array it needs through ``apply_args`` (a
    closed-over typed array cannot enter the Auto region).
    """

    def guard(loss, grads, operands, *args):
        leaf_finite = jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
        finite = jnp.isfinite(loss) & jnp.all(leaf_finite)
        new = jax.lax.cond(finite, lambda ops: apply(*args, ops), lambda ops: ops, operands)
        return new, (finite, leaf_finite, optax.tree.norm(grads))

    operands = (state.params, state.opt_state, state.adapters)
    if compiler_placed:
        types = jax.tree.map(lambda x: jax.typeof(x).sharding, operands)
        scalar = jax.sharding.PartitionSpec()
        guard = jax.sharding.auto_axes(guard, out_sharding=(types, (scalar,) * 3))
    (params, opt_state, adapters), (finite, leaf_finite, grad_norm) = guard(
        loss, grads, operands, *apply_args
    )
    new_state = TrainState(
        state.step + 1,
        params,
        opt_state,
        state.skipped + (~finite).astype(jnp.int32),
        adapters,
    )
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "finite": finite,
        "leaf_finite": leaf_finite,
    }
    return new_state, metrics


def update_step(
    state: TrainState,
    loss: jax.Array,
    grads: Any,
    *,
    tx: optax.GradientTransformation,
    apply_updates: ApplyUpdates | None = None,
    compiler_placed: bool = False,
) -> tuple[TrainState, dict]:
    """The full-gradient step's update of ``state`` by ``grads`` through ``tx``, guarded
    (:func:`train_step` after its gradient; ``train/mechanism.py`` reuses it).
    ``compiler_placed``: see :func:`guarded`."""

    def apply(grads, step, operands):
        params, opt_state, adapters = operands
        applier = optax.apply_updates
        if apply_updates is not None:
            applier = lambda p, u: apply_updates(p, u, step)  # noqa: E731
        params, opt_state = apply_gradients(tx.update, grads, opt_state, params, applier)
        return params, opt_state, adapters

    return guarded(
        state,
        loss,
        grads,
        apply,
        apply_args=(grads, state.step),
        compiler_placed=compiler_placed,
    )


def train_step(
    state: TrainState,
    batch: dict,
    *,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    apply_updates: ApplyUpdates | None = None,
    compiler_placed: bool = False,
) -> tuple[TrainState, dict]:
    """The full-gradient step: ``loss_fn``'s gradient through ``tx``, guarded.

    ``apply_updates`` is ``(params, updates, step) -> params``
    (:func:`train.optimizer.update_applier`); default ``optax.apply_updates``.
    ``compiler_placed``: see :func:`guarded`.
    """
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
    return update_step(
        state, loss, grads, tx=tx, apply_updates=apply_updates, compiler_placed=compiler_placed
    )


def eval_step(params: Any, batch: dict, *, loss_fn: LossFn) -> dict:
    """``{"loss": loss_fn(params, batch)}``."""
    return {"loss": loss_fn(params, batch)}
