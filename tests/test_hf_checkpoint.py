"""Tests for train/hf_checkpoint.py: HF LLaMA checkpoint load / export (tiny models, CPU)."""

from __future__ import annotations

import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

pytest.importorskip("safetensors")
from safetensors.numpy import load_file, save_file

from tests.hf_fixtures import tiny_hf_llama
from train import hf_checkpoint
from train.hf_checkpoint import export_hf_llama, load_hf_llama
from train.model import LlamaConfig, LlamaForCausalLM

# fp32 model vs transformers fp32 eager: observed ~3e-7 on CPU.
ATOL = 1e-4
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_heads=4, num_layers=2)
TOKENS = np.random.RandomState(0).randint(0, 256, size=(2, 16))


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def transformers(torch):
    return pytest.importorskip("transformers")


def _hf_logits(torch, model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(TOKENS)).logits.float().numpy()


@functools.cache
def _forward(config: LlamaConfig):
    model = LlamaForCausalLM(config)
    return jax.jit(lambda p, t: model.apply({"params": p}, t))


def _our_logits(config: LlamaConfig, params) -> np.ndarray:
    return np.asarray(_forward(config)(params, jnp.asarray(TOKENS, jnp.int32)))


def _boxed_shapes(config: LlamaConfig):
    """The boxed (logically named) params as shapes, without running the init."""
    init = LlamaForCausalLM(config).init
    return jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]


def _random_params(config: LlamaConfig, seed=0):
    """Random params (random norm scales too, so a swapped or untransposed tensor shows)."""
    rng = np.random.default_rng(seed)

    def fill(x):
        v = rng.normal(0.0, 0.1, x.shape)
        return jnp.asarray(1.0 + v if x.ndim == 1 else v, jnp.float32)

    return jax.tree.map(fill, nn.unbox(_boxed_shapes(config)))


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def test_load_matches_transformers(tmp_path, torch, transformers):
    model = tiny_hf_llama(transformers, torch, rope_theta=500.0)
    model.save_pretrained(tmp_path)
    config, params = load_hf_llama(tmp_path, dtype="float32")
    assert (config.num_kv_heads, config.rope_theta, config.max_seq_len) == (2, 500.0, 64)
    assert config.param_dtype == jnp.float32
    assert _max_diff(_our_logits(config, params), _hf_logits(torch, model)) < ATOL


def test_export_roundtrip_through_transformers(tmp_path, torch, transformers):
    config = LlamaConfig(**TINY, num_kv_heads=2, rope_theta=1000.0, dtype=jnp.float32)
    params = _random_params(config)
    export_hf_llama(config, params, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    hf_config = json.loads((tmp_path / "config.json").read_text())
    assert hf_config["architectures"] == ["LlamaForCausalLM"]
    assert hf_config["tie_word_embeddings"] is False

    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert model.config.num_key_value_heads == 2
    assert _max_diff(_our_logits(config, params), _hf_logits(torch, model.eval())) < ATOL

    # And back: identical params.
    config2, params2 = load_hf_llama(tmp_path, dtype="float32")
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_export_scanned_boxed_and_bf16(tmp_path):
    config = LlamaConfig(**TINY, dtype=jnp.float32)
    params = _random_params(config)
    export_hf_llama(config, params, tmp_path / "ref")
    ref = load_file(str(tmp_path / "ref" / "model.safetensors"))

    # Scanned (stacked) + boxed params export to the same tensors.
    scan_config = config.replace(scan_layers=True)
    boxed = _boxed_shapes(scan_config)
    layers = [params["model"][f"layers_{i}"] for i in range(config.num_layers)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    boxed = jax.tree.map(
        lambda box, x: box.replace_boxed(x),
        boxed,
        {**params, "model": {**_non_layers(params["model"]), "layers": stacked}},
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )
    export_hf_llama(scan_config, boxed, tmp_path / "scan")
    scanned = load_file(str(tmp_path / "scan" / "model.safetensors"))
    assert scanned.keys() == ref.keys()
    for name in ref:
        np.testing.assert_array_equal(scanned[name], ref[name])

    # Loading into a scanned model stacks the layers again.
    scan_config2, scan_params = load_hf_llama(tmp_path / "ref", scan_layers=True, dtype="float32")
    assert scan_config2.scan_layers
    np.testing.assert_allclose(
        _our_logits(scan_config2, scan_params), _our_logits(config, params), atol=1e-5
    )

    # bf16 storage.
    export_hf_llama(config, params, tmp_path / "bf16", torch_dtype="bfloat16")
    bf16 = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert bf16["lm_head.weight"].dtype == ml_dtypes.bfloat16
    _, loaded = load_hf_llama(tmp_path / "bf16")
    want = jnp.asarray(params["lm_head"]["kernel"]).astype(jnp.bfloat16).astype(jnp.float32)
    np.testing.assert_array_equal(loaded["lm_head"]["kernel"], want)
    assert loaded["lm_head"]["kernel"].dtype == jnp.float32  # param_dtype, not storage dtype.


def _non_layers(tree):
    return {k: v for k, v in tree.items() if not k.startswith("layers")}


def test_sharded_index_checkpoint(tmp_path, torch, transformers):
    model = tiny_hf_llama(transformers, torch)
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    files = os.listdir(tmp_path / "sharded")
    assert hf_checkpoint.SAFETENSORS_INDEX_NAME in files
    assert sum(f.endswith(".safetensors") for f in files) > 1

    config, single = load_hf_llama(tmp_path / "single")
    config2, sharded = load_hf_llama(tmp_path / "sharded")
    assert config == config2
    jax.tree.map(np.testing.assert_array_equal, sharded, single)


def test_load_with_shardings(tmp_path):
    config = LlamaConfig(**TINY, dtype=jnp.float32)
    params = _random_params(config)
    export_hf_llama(config, params, tmp_path)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tensor"))
    specs = nn.logical_to_mesh(
        nn.get_partition_spec(_boxed_shapes(config)),
        (("embed", "fsdp"), ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor")),
    )
    shardings = jax.tree.map(
        lambda s: jax.sharding.NamedSharding(mesh, s),
        specs,
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec),
    )
    _, loaded = load_hf_llama(tmp_path, shardings=shardings)
    q = loaded["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding == shardings["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_tied_embeddings_are_copied(tmp_path, torch, transformers):
    model = tiny_hf_llama(transformers, torch, tie_word_embeddings=True, num_key_value_heads=4)
    model.save_pretrained(tmp_path)
    config, params = load_hf_llama(tmp_path, dtype="float32")
    np.testing.assert_array_equal(
        params["lm_head"]["kernel"], params["model"]["embed_tokens"]["embedding"].T
    )
    assert _max_diff(_our_logits(config, params), _hf_logits(torch, model)) < ATOL


# ----------------------------------------------------------------------------------------------
# Errors.


def _export_tiny(path):
    config = LlamaConfig(**TINY)
    export_hf_llama(config, _random_params(config), path)
    return config


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config\.json in .*empty"):
        load_hf_llama(tmp_path / "empty")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(
        json.dumps(hf_checkpoint.config_to_hf(LlamaConfig(**TINY)))
    )
    with pytest.raises(FileNotFoundError, match=r"no safetensors checkpoint in .*noweights"):
        load_hf_llama(tmp_path / "noweights")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"model_type": "mistral"}, "model_type"),
        ({"head_dim": 32}, "head_dim"),
    ],
)
def test_unsupported_config(tmp_path, change, message):
    _export_tiny(tmp_path)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf_config, **change}))
    with pytest.raises(ValueError, match=f"unsupported Hugging Face Llama config: .*{message}"):
        load_hf_llama(tmp_path)


def test_missing_and_unexpected_tensors(tmp_path):
    _export_tiny(tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(str(weights))
    del tensors["model.layers.1.mlp.up_proj.weight"], tensors["model.norm.weight"]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(KeyError, match=r"lacks 2 tensors.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf_llama(tmp_path)

    tensors = load_file(str(weights))
    tensors["model.norm.weight"] = np.ones(64, np.float32)
    tensors["model.layers.1.mlp.up_proj.weight"] = np.ones((128, 64), np.float32)
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(8, np.float32)  # Ignored.
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"does not use .*q_proj\.bias"):
        load_hf_llama(tmp_path)


def test_export_rejects_unknown_dtype(tmp_path):
    config = LlamaConfig(**TINY)
    with pytest.raises(ValueError, match="torch_dtype"):
        export_hf_llama(config, _random_params(config), tmp_path, torch_dtype="int8")
