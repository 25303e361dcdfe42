"""The layer-wise train step: each decoder layer is updated inside the backward pass.

``config.step.layerwise=True`` (with ``model.scan_layers=True``). The forward pass runs
the embedding, a ``lax.scan`` over the stacked layers that keeps only each layer's input (the
activation checkpoints), then the final norm, head and loss. The backward pass takes the
head's and norm's gradients, then runs a reverse ``lax.scan`` over the layers: for layer ``i``
it recomputes the layer from its saved input under ``jax.vjp``, gets that layer's parameter
gradient and its input's cotangent, and at once applies layer ``i``'s optimizer update
(params and the layer's slice of the optimizer state are updated in place in the scan carry).
So the gradients of all layers never exist together, and a projector refresh sees one layer's
gradients at a time. The embedding, final norm and head are updated after the scan from their
own state (:class:`golore_jax.layerwise.LayerwiseState`).

Non-finite values: a layer whose gradient is not finite (or any layer when the loss is not
finite) keeps its params and optimizer state; so do the embedding, norm and head when theirs
is not. A step with any of those counts as skipped (``finite`` is False), but it cannot undo
the updates of the layers processed before the bad gradient appeared (the layers above it):
that would need every layer's gradient before any update, which is what this step avoids. A
non-finite cotangent flows down to all lower layers, so in practice those are all skipped.

Activation checkpointing is built in (``model.remat`` changes nothing here): each layer is
recomputed once in the backward pass, as ``remat`` does in the plain step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from golore_jax import layerwise as layerwise_lib
from train import model as model_lib
from train import step as step_lib

# Where model.LlamaForCausalLM keeps its stacked decoder layers (scan_layers=True).
STACK_PATH = ("model", "layers")


class ModelPieces(NamedTuple):
    """LlamaForCausalLM cut at the layer boundaries, as functions of param subtrees."""

    embed: Callable[[Any, jax.Array], jax.Array]  # (embed_tokens params, tokens) -> x
    layer: Callable[[Any, jax.Array, jax.Array], jax.Array]  # (layer params, x, positions)
    head: Callable[[Any, Any, jax.Array], jax.Array]  # (norm, lm_head params, x) -> logits


def model_pieces(config: model_lib.LlamaConfig) -> ModelPieces:
    """The modules of ``LlamaForCausalLM(config)`` applied one by one (same dtypes)."""
    embed = nn.Embed(
        config.vocab_size, config.hidden_size, dtype=config.dtype, param_dtype=config.param_dtype
    )
    layer = model_lib.LlamaDecoderLayer(config)
    norm = model_lib.RMSNorm(config)
    head = model_lib.Dense(
        config.vocab_size, use_bias=False, dtype=config.dtype, param_dtype=config.param_dtype
    )

    def embed_fn(params, tokens):
        x = embed.apply({"params": params}, tokens)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))

    def layer_fn(params, x, positions):
        return layer.apply({"params": params}, x, positions)

    def head_fn(norm_params, head_params, x):
        logits = head.apply({"params": head_params}, norm.apply({"params": norm_params}, x))
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        return logits.astype(jnp.float32)

    return ModelPieces(embed_fn, layer_fn, head_fn)


def _rest_grads(embed, norm, head) -> dict:
    """The gradient tree of the params outside the stack (their structure in the model)."""
    return {"model": {"embed_tokens": embed, "norm": norm}, "lm_head": head}


def _all_finite(tree: Any) -> tuple[Any, jax.Array]:
    """Per-leaf finiteness (a tree of bools) and their conjunction."""
    leaf_ok = jax.tree_util.tree_map(lambda g: jnp.all(jnp.isfinite(g)), tree)
    return leaf_ok, jnp.all(jnp.stack(jax.tree_util.tree_leaves(leaf_ok)))


def _squared_norm(tree: Any) -> jax.Array:
    return sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree_util.tree_leaves(tree))


def make_train_step(
    config: model_lib.LlamaConfig,
    tx: optax.GradientTransformation,
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array],
    apply_updates: Callable[..., Any] | None = None,
    decode: Callable[[Any], Any] | None = None,
) -> Callable[[Any, dict], tuple[Any, dict]]:
    """The fused layer-wise step ``(TrainState, batch) -> (TrainState, metrics)``.

    Args:
      config: the model's config (``scan_layers=True``).
      tx: the per-layer transformation (:func:`golore_jax.layerwise.per_layer_transform`);
        the state's ``opt_state`` is ``golore_jax.layerwise.layerwise(tx_base, STACK_PATH)``'s.
      loss_fn: ``(logits, targets) -> scalar loss``.
      apply_updates: ``(params, updates, step, layer) -> params`` for one group of params (a
        layer, with its index, or the params outside the stack, ``layer=None``), e.g.
        :func:`train.optimizer.update_applier` (stochastic rounding of bf16 params keyed by
        step and layer); default ``optax.apply_updates``.
      decode: ``stored layer params -> float layer params`` (int8 storage,
        train/weight_storage.py): applied to one layer's slice in the forward scan and again
        for its recompute, so no float copy of the whole stack exists; the layer's optimizer
        sees the decoded params and ``apply_updates`` gets the stored ones. Default: none.

    The metrics are those of the plain step: ``loss``, ``grad_norm`` (the global norm, summed
    layer by layer: reported, not used for clipping), ``finite`` and ``leaf_finite`` (one per
    param leaf in the params' leaf order; a stacked leaf is finite when every layer's is).
    """
    pieces = model_pieces(config)
    if decode is None:
        decode = lambda p: p  # noqa: E731
    if apply_updates is None:
        apply_updates = lambda p, u, step, layer=None: optax.apply_updates(p, u)  # noqa: E731

    def update_group(grads, opt_state, params, ok, step, layer=None, decoded=None):
        def apply(operands):
            params, opt_state = operands
            if decoded is None:
                return step_lib.apply_gradients(
                    functools.partial(layerwise_lib.update_layer, tx),
                    grads,
                    opt_state,
                    params,
                    lambda p, u: apply_updates(p, u, step, layer),
                )
            # Stored (int8) layer: the optimizer sees the decoded weights, the update is
            # applied to (and re-quantized into) the stored ones.
            updates, opt_state = layerwise_lib.update_layer(tx, grads, opt_state, decoded)
            return apply_updates(params, updates, step, layer), opt_state

        return lax.cond(ok, apply, lambda operands: operands, (params, opt_state))

    def train_step(state, batch):
        tokens, targets = batch["inputs"], batch["targets"]
        b, length = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
        stack, rest = layerwise_lib.split_stack(state.params, STACK_PATH)
        opt_state = state.opt_state

        # Forward: keep each layer's input only.
        x, embed_vjp = jax.vjp(lambda p: pieces.embed(p, tokens), rest["model"]["embed_tokens"])

        def forward_layer(x, layer_params):
            return pieces.layer(decode(layer_params), x, positions), x

        x, layer_inputs = lax.scan(forward_layer, x, stack)
        loss, head_vjp = jax.vjp(
            lambda n, h, x: loss_fn(pieces.head(n, h, x), targets),
            rest["model"]["norm"],
            rest["lm_head"],
            x,
        )
        loss_ok = jnp.isfinite(loss)
        norm_grad, head_grad, dx = head_vjp(jnp.ones_like(loss))

        # Backward: recompute layer i, take its gradient, update it, pass the cotangent down.
        def backward_layer(carry, xs):
            dx, stack, layer_states, squared = carry
            index, x_in = xs
            take = lambda a: lax.dynamic_index_in_dim(a, index, keepdims=False)  # noqa: E731
            layer_params = jax.tree_util.tree_map(take, stack)
            layer_state = jax.tree_util.tree_map(take, layer_states)
            decoded = decode(layer_params)
            _, layer_vjp = jax.vjp(lambda p, x: pieces.layer(p, x, positions), decoded, x_in)
            grads, dx = layer_vjp(dx)
            leaf_ok, ok = _all_finite(grads)
            layer_params, layer_state = update_group(
                grads,
                layer_state,
                layer_params,
                ok & loss_ok,
                state.step,
                index,
                None if decoded is layer_params else decoded,
            )

            def put(a, v):
                return lax.dynamic_update_index_in_dim(a, v, index, 0)

            stack = jax.tree_util.tree_map(put, stack, layer_params)
            layer_states = jax.tree_util.tree_map(put, layer_states, layer_state)
            return (dx, stack, layer_states, squared + _squared_norm(grads)), leaf_ok

        num_layers = layerwise_lib.num_layers(stack)
        (dx, stack, layers_state, squared), stack_leaf_ok = lax.scan(
            backward_layer,
            (dx, stack, opt_state.layers, jnp.zeros([], jnp.float32)),
            (jnp.arange(num_layers), layer_inputs),
            reverse=True,
        )
        (embed_grad,) = embed_vjp(dx)
        rest_grads = _rest_grads(embed_grad, norm_grad, head_grad)
        if jax.tree_util.tree_structure(rest_grads) != jax.tree_util.tree_structure(rest):
            raise ValueError(
                "layerwise step: the params outside the stack are not embed_tokens, norm and "
                f"lm_head: {jax.tree_util.tree_structure(rest)}"
            )
        rest_leaf_ok, rest_ok = _all_finite(rest_grads)
        rest, rest_state = update_group(
            rest_grads, opt_state.rest, rest, rest_ok & loss_ok, state.step
        )

        stack_leaf_ok = jax.tree_util.tree_map(jnp.all, stack_leaf_ok)
        leaf_finite = jnp.stack(
            jax.tree_util.tree_leaves(
                layerwise_lib.merge_stack(stack_leaf_ok, rest_leaf_ok, STACK_PATH)
            )
        )
        finite = loss_ok & jnp.all(leaf_finite)
        new_state = state._replace(
            step=state.step + 1,
            params=layerwise_lib.merge_stack(stack, rest, STACK_PATH),
            opt_state=layerwise_lib.LayerwiseState(layers=layers_state, rest=rest_state),
            skipped=state.skipped + (~finite).astype(jnp.int32),
        )
        metrics = {
            "loss": loss,
            "grad_norm": jnp.sqrt(squared + _squared_norm(rest_grads)),
            "finite": finite,
            "leaf_finite": leaf_finite,
        }
        return new_state, metrics

    return train_step


def make_loss_fn(
    config: model_lib.LlamaConfig,
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array],
    decode: Callable[[Any], Any],
) -> Callable[[Any, dict], jax.Array]:
    """``(params, batch) -> loss`` of the stacked model, each layer decoded inside the scan
    (evaluation with int8-stored layers: never a float copy of the whole stack)."""
    pieces = model_pieces(config)

    def loss(params, batch):
        tokens = batch["inputs"]
        b, length = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
        stack, rest = layerwise_lib.split_stack(params, STACK_PATH)
        x = pieces.embed(rest["model"]["embed_tokens"], tokens)
        x, _ = lax.scan(lambda x, p: (pieces.layer(decode(p), x, positions), None), x, stack)
        logits = pieces.head(rest["model"]["norm"], rest["lm_head"], x)
        return loss_fn(logits, batch["targets"])

    return loss
