"""INT8 storage of the decoder layers' matrices (``config.model.weight_storage='int8'``).

With ``model.scan_layers=True`` and ``step.layerwise=True`` every 2-D kernel of the stacked
layers (``params['model']['layers'][...]['kernel']``, leading layer axis) is kept as a
:class:`golore_jax.Int8Weight`: int8 codes and one fp32 scale per output channel of
each layer's matrix (``(L, in, out)`` codes, ``(L, 1, out)`` scales). The embedding, the head
and all norms stay in ``model.param_dtype`` (bf16).

Nothing ever decodes all layers at once: the layer-wise step (train/layerwise.py) decodes one
layer's slice to ``param_dtype`` inside its forward scan, again for that layer's recompute and
backward, and the update re-quantizes it with unbiased stochastic rounding
(:func:`golore_jax.apply_updates_stochastic`); evaluation decodes layer by layer in
the same scan. The optimizer sees decoded params (its state is built from the float shapes);
checkpoints hold the codes and scales.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

import golore_jax as gl
from train import model as model_lib

STORAGES = ("float", "int8")
STACK_PATH = ("model", "layers")  # train/layerwise.py's


def is_int8(config: Any) -> bool:
    """``config.model.weight_storage == 'int8'``."""
    return config.model.weight_storage == "int8"


def _map_stack_kernels(fn, tree: Any, *others: Any) -> Any:
    """``tree`` with ``fn(kernel, *other kernels)`` at every ``kernel`` leaf under the stack."""
    model = dict(tree["model"])

    def visit(node, *nodes):
        if isinstance(node, dict):
            return {
                k: (
                    fn(v, *(n[k] for n in nodes))
                    if k == "kernel"
                    else visit(v, *(n[k] for n in nodes))
                )
                for k, v in node.items()
            }
        return node

    model["layers"] = visit(tree["model"]["layers"], *(o["model"]["layers"] for o in others))
    return {**tree, "model": model}


def encode(params: Any) -> Any:
    """The stack's kernels as int8 (round to nearest: the initial weights carry no update)."""
    return _map_stack_kernels(lambda k: gl.quantize_int8(k), params)


def init_params(model_config: Any, key: jax.Array, tokens: jax.Array) -> Any:
    """Initial params with int8 layers, never holding the float stack (at 7B that alone is
    12.6 GiB in bf16: a model.init then :func:`encode` peaked at 19.7 GiB on the GPU).

    The embedding, final norm and head come from the same model with one layer (their init
    does not depend on the depth, so they equal ``model.init``'s); each layer is drawn from
    ``fold_in(key, _LAYER_INIT)`` split per layer, initialized alone and quantized before the
    next (a ``lax.map``), with the model's initializers (normal(0.02) kernels, unit norms): the
    same distribution as ``model.init``'s layers, not the same draws.
    """
    shallow = model_lib.LlamaForCausalLM(model_config.replace(num_layers=1))
    params = nn.unbox(shallow.init(key, tokens)["params"])
    layer = model_lib.LlamaDecoderLayer(model_config)
    b, length = tokens.shape
    x = jnp.zeros((b, length, model_config.hidden_size), model_config.dtype)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))

    def one(layer_key):
        float_layer = nn.unbox(layer.init(layer_key, x, positions)["params"])
        return {"layers": float_layer}

    keys = jax.random.split(jax.random.fold_in(key, _LAYER_INIT), model_config.num_layers)
    stack = jax.lax.map(lambda k: encode({"model": one(k)})["model"]["layers"], keys)
    return {**params, "model": {**params["model"], "layers": stack}}


_LAYER_INIT = 0x494E38  # separates the layers' init stream from the model's own


def encode_shapes(param_shapes: Any) -> Any:
    """``jax.ShapeDtypeStruct`` tree of :func:`encode`'s output."""
    return jax.eval_shape(encode, param_shapes)


def encode_shardings(param_sharding: Any) -> Any:
    """Codes sharded like the float kernel; scales like it with the reduced (input) axis
    unsharded (size 1)."""

    def kernel(s: NamedSharding) -> gl.Int8Weight:
        spec = tuple(s.spec) + (None,) * (3 - len(s.spec))
        scale = PartitionSpec(spec[0], None, spec[2])
        return gl.Int8Weight(s, NamedSharding(s.mesh, scale))

    return _map_stack_kernels(kernel, param_sharding)


def decode(params: Any, dtype: Any) -> Any:
    """Every :class:`~golore_jax.Int8Weight` of ``params`` decoded to ``dtype``."""
    return gl.dequantize_int8_tree(params, jnp.dtype(dtype))
