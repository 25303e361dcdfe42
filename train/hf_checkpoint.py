"""Load / export Hugging Face LLaMA checkpoint directories (``config.json`` + safetensors).

Only the ``safetensors`` numpy API is used, so neither torch nor transformers is needed.
Tensors are read one at a time (``safe_open`` memory-maps the file) and, when ``shardings`` is
given, placed straight onto their devices, so a large model never needs a full host copy in
addition to the file, nor a full copy on one device.

Name mapping (torch ``weight`` is ``(out, in)``; our kernels are ``(in, out)``, hence ``.T``)::

    model.embed_tokens.weight                        -> model/embed_tokens/embedding
    model.layers.{i}.input_layernorm.weight          -> model/layers_{i}/input_layernorm/scale
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight -> model/layers_{i}/self_attn/*/kernel (.T)
    model.layers.{i}.post_attention_layernorm.weight
                                     -> model/layers_{i}/post_attention_layernorm/scale
    model.layers.{i}.mlp.{gate,up,down}_proj.weight  -> model/layers_{i}/mlp/*/kernel (.T)
    model.norm.weight                                -> model/norm/scale
    lm_head.weight                                   -> lm_head/kernel (.T)

With ``scan_layers=True`` the per-layer leaves are stacked into ``model/layers/...``.

HF stores q/k projections already permuted for the ``rotate_half`` RoPE convention, which is what
``train.model`` uses, so no head permutation is needed.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import save_file

from train.model import LlamaConfig

Params = dict[str, Any]
PathLike = str | os.PathLike

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
# Buffers some older checkpoints serialise; they are recomputed, so ignore them.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ----------------------------------------------------------------------------------------------
# Config conversion.


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> tuple[LlamaConfig, bool]:
    """Converts an HF ``config.json`` dict; returns ``(config, tie_word_embeddings)``.

    Raises ``ValueError`` naming every feature the model does not implement.
    """
    problems = []
    if hf.get("model_type", "llama") != "llama":
        problems.append(f"model_type={hf.get('model_type')!r} (only 'llama')")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf.get('hidden_act')!r} (only 'silu')")
    if hf.get("rope_scaling"):
        problems.append(f"rope_scaling={hf['rope_scaling']!r} (only plain RoPE)")
    rope_params = hf.get("rope_parameters")  # transformers >= 5 spelling.
    if rope_params and rope_params.get("rope_type", "default") != "default":
        problems.append(f"rope_parameters={rope_params!r} (only plain RoPE)")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            problems.append(f"{flag}=true (no biases)")
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
        problems.append(
            f"head_dim={head_dim} != hidden_size / num_attention_heads "
            f"({hf['hidden_size']} / {hf['num_attention_heads']})"
        )
    if problems:
        raise ValueError("unsupported Hugging Face Llama config: " + "; ".join(problems))

    rope_theta = hf.get("rope_theta")
    if rope_theta is None:
        rope_theta = (rope_params or {}).get("rope_theta", 10000.0)
    fields = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_heads=hf["num_attention_heads"],
        num_layers=hf["num_hidden_layers"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
    )
    fields.update(overrides)
    return LlamaConfig(**fields), bool(hf.get("tie_word_embeddings", False))


def config_to_hf(config: LlamaConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """HF ``config.json`` contents for ``config``."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.kv_heads,
        "num_hidden_layers": config.num_layers,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        # transformers >= 5 spelling of the two keys above / of torch_dtype.
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "dtype": torch_dtype,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": torch_dtype,
    }


# ----------------------------------------------------------------------------------------------
# Name mapping.


def _layer_entries(i: int) -> Iterator[tuple[str, tuple[str, ...], bool]]:
    """``(hf_name, (module path inside a layer), transpose)`` for decoder layer ``i``."""
    pre = f"model.layers.{i}."
    yield pre + "input_layernorm.weight", ("input_layernorm", "scale"), False
    for p in _ATTN:
        yield pre + f"self_attn.{p}.weight", ("self_attn", p, "kernel"), True
    yield pre + "post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), False
    for p in _MLP:
        yield pre + f"mlp.{p}.weight", ("mlp", p, "kernel"), True


def _global_entries() -> list[tuple[str, tuple[str, ...], bool]]:
    return [
        ("model.embed_tokens.weight", ("model", "embed_tokens", "embedding"), False),
        ("model.norm.weight", ("model", "norm", "scale"), False),
        ("lm_head.weight", ("lm_head", "kernel"), True),
    ]


def hf_tensor_names(config: LlamaConfig) -> list[str]:
    """Every tensor name an HF checkpoint of ``config`` holds (untied head)."""
    names = [n for n, _, _ in _global_entries()]
    for i in range(config.num_layers):
        names += [n for n, _, _ in _layer_entries(i)]
    return names


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


# ----------------------------------------------------------------------------------------------
# Loading.


def _tensor_files(path: str) -> dict[str, str]:
    """Maps tensor name -> safetensors file for a single-file or sharded checkpoint."""
    index = os.path.join(path, SAFETENSORS_INDEX_NAME)
    single = os.path.join(path, SAFETENSORS_NAME)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = {name: os.path.join(path, fname) for name, fname in weight_map.items()}
        missing_files = sorted({f for f in files.values() if not os.path.isfile(f)})
        if missing_files:
            raise FileNotFoundError(f"{index} refers to missing shard files: {missing_files}")
        return files
    if os.path.isfile(single):
        with safe_open(single, framework="np") as f:
            return dict.fromkeys(f.keys(), single)
    raise FileNotFoundError(
        f"no safetensors checkpoint in {path!r}: expected {SAFETENSORS_NAME} or "
        f"{SAFETENSORS_INDEX_NAME} (PyTorch .bin checkpoints are not supported; re-save with "
        "safe_serialization=True)"
    )


def load_hf_llama(
    path: PathLike,
    *,
    shardings: Any = None,
    **config_overrides: Any,
) -> tuple[LlamaConfig, Params]:
    """Loads an HF ``LlamaForCausalLM`` checkpoint directory into ``train.model`` params.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` (or a sharded
        ``model.safetensors.index.json`` + shards).
      shardings: optional pytree matching the returned params (``{'model': ..., 'lm_head': ...}``)
        of ``jax.sharding.Sharding`` leaves; each tensor is ``jax.device_put`` to its sharding as
        soon as it is read. Without it leaves go to the default device.
      **config_overrides: ``LlamaConfig`` fields to set beyond what ``config.json`` gives, e.g.
        ``dtype``, ``param_dtype``, ``remat``, ``scan_layers``, ``max_seq_len``.

    Returns:
      ``(config, params)`` where ``params`` is the unboxed ``'params'`` collection, leaves in
      ``config.param_dtype``. A checkpoint with ``tie_word_embeddings`` gets ``lm_head`` as a
      copy of the embedding (the model is untied from then on).
    """
    path = os.fspath(path)
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"no config.json in {path!r}")
    with open(config_file) as f:
        config, tied = config_from_hf(json.load(f), **config_overrides)

    files = _tensor_files(path)
    expected = set(hf_tensor_names(config))
    if tied:
        expected.discard("lm_head.weight")
    available = {n for n in files if not n.endswith(_IGNORED_SUFFIXES)}
    missing = sorted(expected - available)
    if missing:
        raise KeyError(f"checkpoint {path!r} lacks {len(missing)} tensors: {missing}")
    unexpected = sorted(available - expected - {"lm_head.weight"})
    if unexpected:
        raise ValueError(
            f"checkpoint {path!r} has {len(unexpected)} tensors the Llama model does not use "
            f"(unsupported architecture variant?): {unexpected}"
        )

    with contextlib.ExitStack() as stack:
        handles: dict[str, Any] = {}

        def read(name: str, transpose: bool) -> np.ndarray:
            fname = files[name]
            if fname not in handles:
                handles[fname] = stack.enter_context(safe_open(fname, framework="np"))
            x = handles[fname].get_tensor(name)
            x = x.T if transpose else x
            return np.ascontiguousarray(x, dtype=config.param_dtype)

        def place(x: np.ndarray, tree_path: tuple[str, ...]) -> jax.Array:
            if shardings is None:
                return jnp.asarray(x)
            # Each device receives only its slice; also works when the mesh spans hosts.
            return jax.make_array_from_callback(
                x.shape, _get(shardings, tree_path), lambda index: x[index]
            )

        params: Params = {}
        for name, tree_path, transpose in _global_entries():
            if tied and name == "lm_head.weight":
                name, transpose = "model.embed_tokens.weight", True
            _set(params, tree_path, place(read(name, transpose), tree_path))

        if config.scan_layers:
            # Stacked leaves: read layer by layer, stack on host, place once.
            for hf_name0, sub, transpose in _layer_entries(0):
                suffix = hf_name0[len("model.layers.0.") :]
                stacked = np.stack(
                    [
                        read(f"model.layers.{i}.{suffix}", transpose)
                        for i in range(config.num_layers)
                    ]
                )
                tree_path = ("model", "layers", *sub)
                _set(params, tree_path, place(stacked, tree_path))
        else:
            for i in range(config.num_layers):
                for name, sub, transpose in _layer_entries(i):
                    tree_path = ("model", f"layers_{i}", *sub)
                    _set(params, tree_path, place(read(name, transpose), tree_path))
    return config, params


# ----------------------------------------------------------------------------------------------
# Export.


def _to_numpy(x: Any, dtype: Any) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)  # Collective: every host calls.
    return np.asarray(jax.device_get(x)).astype(dtype)


def hf_state_dict(
    config: LlamaConfig, params: Params, dtype: Any = np.float32
) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(hf_name, array)`` in torch ``(out, in)`` layout, one tensor at a time."""
    for name, tree_path, transpose in _global_entries():
        x = _to_numpy(_get(params, tree_path), dtype)
        yield name, x.T if transpose else x
    for i in range(config.num_layers):
        for name, sub, transpose in _layer_entries(i):
            if config.scan_layers:
                x = _to_numpy(_get(params, ("model", "layers", *sub))[i], dtype)
            else:
                x = _to_numpy(_get(params, ("model", f"layers_{i}", *sub)), dtype)
            yield name, x.T if transpose else x


_NP_DTYPES = {
    "float32": np.float32,
    "bfloat16": ml_dtypes.bfloat16,
    "float16": np.float16,
}


def export_hf_llama(
    config: LlamaConfig,
    params: Params,
    path: PathLike,
    *,
    torch_dtype: str = "float32",
) -> None:
    """Writes ``params`` as an HF ``LlamaForCausalLM`` checkpoint directory.

    Creates ``path/config.json`` and a single ``path/model.safetensors`` (loadable with
    ``transformers.LlamaForCausalLM.from_pretrained(path)``). ``params`` may be boxed or unboxed,
    with per-layer or scanned (stacked) layers, and may be sharded (on several hosts, call it on
    every host: leaves are gathered collectively and host 0 writes).

    Args:
      config: the model config.
      params: the ``'params'`` collection (``{'model': ..., 'lm_head': ...}``).
      path: output directory (created if needed).
      torch_dtype: storage dtype, ``'float32'``, ``'bfloat16'`` or ``'float16'``.
    """
    if torch_dtype not in _NP_DTYPES:
        raise ValueError(f"torch_dtype={torch_dtype!r}; expected one of {sorted(_NP_DTYPES)}")
    if "params" in params and "model" not in params:
        params = params["params"]  # Accept the full variables dict too.
    params = nn.unbox(params)  # nn.Partitioned leaves (from model.init) -> arrays.
    path = os.fspath(path)
    np_dtype = _NP_DTYPES[torch_dtype]
    # safetensors' save_file needs the whole dict; the host copy is the size of the file.
    tensors = {name: np.ascontiguousarray(x) for name, x in hf_state_dict(config, params, np_dtype)}
    if jax.process_index() != 0:
        return  # Multi-host: every host joins the gathers above, host 0 writes.
    os.makedirs(path, exist_ok=True)
    # transformers refuses safetensors files without format metadata.
    save_file(tensors, os.path.join(path, SAFETENSORS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(config, torch_dtype), f, indent=2, sort_keys=True)
