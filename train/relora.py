"""ReLoRA-like training: each projected layer runs as ``W0 + P A`` (GoLore paper, Section 6).

Appendix D (Algorithm 6, Table 1) of He et al. 2024 (arXiv 2410.11289) reparameterises a
projected kernel as ``W = W0 + P A`` (left side, ``P`` is ``in x r`` and ``A`` is ``r x out``)
or ``W0 + A Q^T`` (right side), with the basis frozen and ``A`` trainable. The gradient of ``A``
is exactly ``P^T grad_W`` (or ``grad_W Q``), the low-rank gradient GaLore/GoLore feed their
inner optimizer, so optimising ``A`` with the same inner optimizer follows the same trajectory
as the plain ``golore_jax`` transform; but the layer computes ``(x P) A`` and its backward pass
forms only ``A``'s ``r x out`` gradient, never the ``in x out`` one (Table 1: ``4bmn`` instead
of ``6bmn`` backward+forward FLOPs for a batch of ``b`` tokens).

A refresh needs the full gradient once: at steps where the optimizer refreshes
(``count % update_every == 0``) we merge ``W0 <- W0 + P A``, reset ``A = 0``, take the full
gradient and run the plain transform (which chooses the new basis). Every other step runs the
cheap path and calls the same transform through ``gl.low_rank_update``. Both paths are branches of
one ``lax.cond``, so the loop, checkpoints and shardings stay those of the plain trainer; the
state carries ``A`` beside the params (``W0`` for projected leaves). Bases live in the optimizer
state, where the plain transform keeps them.

Limits (checked by ``train.optimizer.validate_step``): basis projectors only (galore, golore,
hybrid, importance), no gradient clipping (the global norm of the low-rank gradients is not the
full one) and no weight decay (it acts on the full ``W``, which this path never forms).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec

import golore_jax as gl
from train import optimizer as optimizer_lib
from train import step as step_lib
from train.model import ADAPTER

Layouts = list[gl.MatrixLayout | None]  # aligned with the params' leaves


def layouts_of(params: Any, rank: int, side: str = "gradient") -> Layouts:
    """The optimizer's layout of every leaf (None: not projected), as ``build_optimizer`` makes
    it (default mask, one rank, ``side`` not ``"state"``); projected leaves must be Dense
    ``kernel``s."""
    by_path = gl.subspace_layouts(params, rank=rank, side=side)
    for path, lay in by_path.items():
        if lay is not None and (len(lay.shape) != 2 or not path.endswith("['kernel']")):
            raise ValueError(
                f"relora: projected leaf {path} of shape {lay.shape} is not a 2-D Dense kernel; "
                "the ReLoRA-like path needs scan_layers=False"
            )
    return list(by_path.values())


def subspace_state(opt_state: Any) -> gl.ScaleBySubspaceState:
    """The (single) ``scale_by_subspace`` state inside an optimizer state."""
    found = [
        s
        for s in jax.tree_util.tree_leaves(
            opt_state, is_leaf=lambda s: isinstance(s, gl.ScaleBySubspaceState)
        )
        if isinstance(s, gl.ScaleBySubspaceState)
    ]
    if len(found) != 1:
        raise ValueError(
            f"relora: expected one scale_by_subspace state in the optimizer, found {len(found)}"
        )
    return found[0]


def init_adapters(params: Any, layouts: Layouts) -> Any:
    """``A = 0`` per projected leaf (fp32, the low-rank shape); None elsewhere."""
    treedef = jax.tree_util.tree_structure(params)
    return treedef.unflatten(
        [None if lay is None else jnp.zeros(lay.low_rank_shape, jnp.float32) for lay in layouts]
    )


def adapter_shardings(param_shardings: Any, layouts: Layouts) -> Any:
    """``A`` is sharded like the param's kept axis: ``(None, out)`` left, ``(in, None)`` right."""
    treedef = jax.tree_util.tree_structure(param_shardings)
    out = []
    for sharding, lay in zip(treedef.flatten_up_to(param_shardings), layouts, strict=True):
        if lay is None:
            out.append(None)
            continue
        rows, cols = tuple(sharding.spec) + (None,) * (2 - len(sharding.spec))
        spec = PartitionSpec(None, cols) if lay.side == "left" else PartitionSpec(rows, None)
        out.append(NamedSharding(sharding.mesh, spec))
    return treedef.unflatten(out)


def merge(params: Any, adapters: Any, bases: Any, layouts: Layouts) -> Any:
    """The weights ``W0 + P A`` (left) / ``W0 + A Q^T`` (right) in the params' dtype."""
    treedef = jax.tree_util.tree_structure(params)
    leaves = treedef.flatten_up_to(params)
    coefs, basis = treedef.flatten_up_to(adapters), treedef.flatten_up_to(bases)
    return treedef.unflatten(
        [
            w if lay is None else (w + _product(*_factors(lay, p, a))).astype(w.dtype)
            for w, a, p, lay in zip(leaves, coefs, basis, layouts, strict=True)
        ]
    )


def _factors(lay: gl.MatrixLayout, p: jax.Array, a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``W - W0`` as ``down @ up``: ``P A`` on the left, ``A Q^T`` on the right."""
    return (p, a) if lay.side == "left" else (a, p.T)


def _product(down: jax.Array, up: jax.Array) -> jax.Array:
    return jnp.matmul(down, up, preferred_element_type=jnp.float32)  # fp32, as the optimizer's


def _module_path(path: tuple[Any, ...]) -> tuple[str, ...]:
    """``('model', ..., 'q_proj', 'kernel')`` -> the module's path ``('model', ..., 'q_proj')``."""
    return tuple(str(getattr(k, "key", k)) for k in path[:-1])


def adapter_variables(paths: list[tuple], layouts: Layouts, bases: list, coefs: list) -> dict:
    """The model's ``adapter`` collection: ``{module path: {'down': ..., 'up': ...}}``, the
    low-rank factors of ``W - W0`` in the order the layer multiplies them: ``P, A`` on the
    left, ``A, Q^T`` on the right (so the model needs no side rule)."""
    flat = {}
    for path, lay, p, a in zip(paths, layouts, bases, coefs, strict=True):
        if lay is not None:
            down, up = _factors(lay, p, a)
            flat[(*_module_path(path), "down")] = down
            flat[(*_module_path(path), "up")] = up
    return traverse_util.unflatten_dict(flat)


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity (jit keys)
class AdapterLayer:
    """The ``A`` of every projected leaf of a model: its shapes, shardings, merge and step."""

    layouts: Layouts  # aligned with the params' leaves
    update_every: int  # the optimizer's refresh period (tau)

    @classmethod
    def for_optimizer(cls, params: Any, opt: Any) -> AdapterLayer:
        """The layer the optimizer block ``opt`` projects ``params`` (shapes suffice) with."""
        rank, side, update_every = optimizer_lib.relora_settings(opt)
        return cls(layouts_of(params, rank, side), update_every)

    def init(self, params: Any) -> Any:
        return init_adapters(params, self.layouts)

    def shardings(self, param_shardings: Any) -> Any:
        return adapter_shardings(param_shardings, self.layouts)

    def weights(self, state: step_lib.TrainState) -> Any:
        """The model's weights ``W0 + P A`` of a state."""
        bases = subspace_state(state.opt_state).bases
        return merge(state.params, state.adapters, bases, self.layouts)

    def train_step(
        self,
        apply_model: Callable[[dict, jax.Array], jax.Array],
        loss_of_logits: Callable[[jax.Array, jax.Array], jax.Array],
        tx: optax.GradientTransformationExtraArgs,
    ) -> Callable[[Any, dict], tuple[Any, dict]]:
        return make_train_step(apply_model, loss_of_logits, tx, self.layouts, self.update_every)


def make_train_step(
    apply_model: Callable[[dict, jax.Array], jax.Array],
    loss_of_logits: Callable[[jax.Array, jax.Array], jax.Array],
    tx: optax.GradientTransformationExtraArgs,
    layouts: Layouts,
    update_every: int,
) -> Callable[[Any, dict], tuple[Any, dict]]:
    """The ReLoRA-like train step ``(TrainState, batch) -> (TrainState, metrics)``.

    Args:
      apply_model: ``(variables, tokens) -> logits`` (the Flax model's ``apply``).
      loss_of_logits: ``(logits, targets) -> scalar loss``.
      tx: the optimizer (contains one ``scale_by_subspace``).
      layouts: :func:`layouts_of` the params.
      update_every: the optimizer's ``tau``.

    Non-finite steps are skipped as in the plain step (:func:`train.step.guarded`); between
    refreshes the metrics' ``grad_norm`` is that of the low-rank gradients.
    """
    full_step, low_rank_step = make_steps(apply_model, loss_of_logits, tx, layouts)

    def train_step(state, batch):
        refresh = subspace_state(state.opt_state).count % update_every == 0
        return jax.lax.cond(refresh, full_step, low_rank_step, state, batch)

    return train_step


def make_steps(
    apply_model: Callable[[dict, jax.Array], jax.Array],
    loss_of_logits: Callable[[jax.Array, jax.Array], jax.Array],
    tx: optax.GradientTransformationExtraArgs,
    layouts: Layouts,
) -> tuple[Callable, Callable]:
    """The two branches of :func:`make_train_step`: the refresh step (merge, full gradient,
    plain transform) and the low-rank step (gradient of ``A`` only)."""

    def full_step(state, batch):
        bases = subspace_state(state.opt_state).bases
        weights = merge(state.params, state.adapters, bases, layouts)

        def loss_fn(params):
            return loss_of_logits(
                apply_model({"params": params}, batch["inputs"]), batch["targets"]
            )

        loss, grads = jax.value_and_grad(loss_fn)(weights)

        def apply(operands):
            _, opt_state, adapters = operands
            params, opt_state = step_lib.apply_gradients(tx.update, grads, opt_state, weights)
            return params, opt_state, jax.tree_util.tree_map(jnp.zeros_like, adapters)

        return step_lib.guarded(state, loss, grads, apply)

    def low_rank_step(state, batch):
        treedef = jax.tree_util.tree_structure(state.params)
        paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]]
        frozen = treedef.flatten_up_to(state.params)
        bases = treedef.flatten_up_to(subspace_state(state.opt_state).bases)
        coefs = treedef.flatten_up_to(state.adapters)
        # Differentiated: A for projected leaves, the param itself elsewhere. W0 is closed over,
        # so its in x out gradient is never computed.
        trainable = [
            w if lay is None else a for w, a, lay in zip(frozen, coefs, layouts, strict=True)
        ]

        def loss_fn(trainable):
            params = [
                w if lay is None else f
                for w, f, lay in zip(trainable, frozen, layouts, strict=True)
            ]
            variables = {
                "params": treedef.unflatten(params),
                ADAPTER: adapter_variables(paths, layouts, bases, trainable),
            }
            return loss_of_logits(apply_model(variables, batch["inputs"]), batch["targets"])

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        grads = treedef.unflatten(grads)

        def apply(operands):
            params, opt_state, adapters = operands

            def apply_low_rank(params, updates):
                # Non-projected leaves move as usual; projected ones keep W0 and move A instead.
                updates = treedef.flatten_up_to(updates)
                new_params = [
                    w if lay is not None else (w + u).astype(w.dtype)
                    for w, u, lay in zip(
                        treedef.flatten_up_to(params), updates, layouts, strict=True
                    )
                ]
                new_adapters = [
                    None if lay is None else a + u.astype(a.dtype)
                    for a, u, lay in zip(
                        treedef.flatten_up_to(adapters), updates, layouts, strict=True
                    )
                ]
                return treedef.unflatten(new_params), treedef.unflatten(new_adapters)

            (params, adapters), opt_state = step_lib.apply_gradients(
                functools.partial(gl.low_rank_update, tx), grads, opt_state, params, apply_low_rank
            )
            return params, opt_state, adapters

        return step_lib.guarded(state, loss, grads, apply)

    return full_step, low_rank_step
