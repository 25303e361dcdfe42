"""Tests for train/model.py (tiny configs; CPU)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from train import model as model_lib
from train.model import LlamaConfig, LlamaForCausalLM

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_heads=4, num_layers=2)
AXIS_NAMES = {"vocab", "embed", "heads", "kv_heads", "mlp", "norm", "layers"}
# Our fp32 model vs transformers fp32 eager: observed ~3e-7 on CPU; 1e-4 leaves margin for
# summation-order differences across BLAS back-ends.
HF_ATOL = 1e-4


def _config(**kw) -> LlamaConfig:
    return LlamaConfig(**{**TINY, "dtype": jnp.float32, **kw})


def _tokens(b=2, length=12, vocab=256, seed=0) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (b, length), 0, vocab, dtype=jnp.int32)


def _init(cfg: LlamaConfig, tokens: jax.Array, seed: int = 0):
    """Random unboxed params, filled on the host from the init's shapes (no init compile).

    Larger than the 0.02 init (and random norm scales) so that mistakes cannot hide.
    """
    shapes = jax.eval_shape(LlamaForCausalLM(cfg).init, jax.random.key(0), tokens)["params"]
    rng = np.random.default_rng(seed)

    def fill(x):
        v = rng.normal(0.0, 0.1, x.shape)
        return jnp.asarray(1.0 + v if x.ndim == 1 else v, x.dtype)

    return jax.tree.map(fill, nn.unbox(shapes))


@functools.cache
def _forward(cfg: LlamaConfig):
    # One compile per config: far cheaper than eager op-by-op for a fresh config.
    model = LlamaForCausalLM(cfg)
    return jax.jit(lambda p, t, pos: model.apply({"params": p}, t, positions=pos))


def _apply(cfg: LlamaConfig, params, tokens, positions=None) -> jax.Array:
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return _forward(cfg)(params, tokens, positions)


def test_param_tree_shapes_dtypes():
    cfg = LlamaConfig(**TINY, num_kv_heads=2)  # Default bf16 compute, fp32 params.
    tokens = _tokens()
    # An 'rbg' key only because its init compiles faster than threefry's.
    init = jax.jit(LlamaForCausalLM(cfg).init)
    params = nn.unbox(init(jax.random.key(0, impl="rbg"), tokens)["params"])
    shapes = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree.leaves_with_path(params)}
    h, i, v = 64, 128, 256
    expected = {
        "['lm_head']['kernel']": (h, v),
        "['model']['embed_tokens']['embedding']": (v, h),
        "['model']['norm']['scale']": (h,),
    }
    for layer in range(2):
        pre = f"['model']['layers_{layer}']"
        expected |= {
            f"{pre}['input_layernorm']['scale']": (h,),
            f"{pre}['post_attention_layernorm']['scale']": (h,),
            f"{pre}['self_attn']['q_proj']['kernel']": (h, 64),
            f"{pre}['self_attn']['k_proj']['kernel']": (h, 32),  # 2 kv heads * head_dim 16.
            f"{pre}['self_attn']['v_proj']['kernel']": (h, 32),
            f"{pre}['self_attn']['o_proj']['kernel']": (64, h),
            f"{pre}['mlp']['gate_proj']['kernel']": (h, i),
            f"{pre}['mlp']['up_proj']['kernel']": (h, i),
            f"{pre}['mlp']['down_proj']['kernel']": (i, h),
        }
    assert shapes == expected
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    assert model_lib.count_params(params) == model_lib.num_params(cfg)
    # HF-style init: N(0, 0.02) matrices, ones for norms.
    np.testing.assert_array_equal(params["model"]["norm"]["scale"], np.ones(h))
    assert abs(float(jnp.std(params["lm_head"]["kernel"])) - 0.02) < 2e-3

    logits = _apply(cfg, params, tokens)
    assert logits.shape == (2, 12, v) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    # bf16 compute stays close to fp32 compute.
    ref = _apply(cfg.replace(dtype=jnp.float32), params, tokens)
    assert float(jnp.max(jnp.abs(logits - ref))) < 5e-2


@pytest.mark.parametrize("scan_layers", [False, True])
def test_every_param_has_logical_axes(scan_layers):
    cfg = _config(num_kv_heads=2, scan_layers=scan_layers)
    # eval_shape keeps the boxes (names) without running the init.
    variables = jax.eval_shape(LlamaForCausalLM(cfg).init, jax.random.key(0), _tokens())
    specs = nn.get_partition_spec(variables)["params"]
    leaves = jax.tree.leaves(variables["params"])
    spec_leaves = jax.tree.leaves(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )
    assert len(leaves) == len(spec_leaves) == (12 if scan_layers else 21)
    for x, spec in zip(leaves, spec_leaves, strict=True):
        assert isinstance(spec, jax.sharding.PartitionSpec)
        assert len(spec) == x.ndim and set(spec) <= AXIS_NAMES, spec
    sa = specs["model"]["layers" if scan_layers else "layers_0"]["self_attn"]
    prefix = ("layers",) if scan_layers else ()
    assert tuple(sa["q_proj"]["kernel"]) == (*prefix, "embed", "heads")
    assert tuple(sa["k_proj"]["kernel"]) == (*prefix, "embed", "kv_heads")
    assert tuple(sa["o_proj"]["kernel"]) == (*prefix, "heads", "embed")
    assert tuple(specs["model"]["embed_tokens"]["embedding"]) == ("vocab", "embed")
    assert tuple(specs["lm_head"]["kernel"]) == ("embed", "vocab")


def test_logical_constraints_trace_under_mesh():
    # Activation constraints resolve under sharding rules (1-device mesh on CPU).
    cfg = _config(num_kv_heads=2)
    tokens = _tokens()
    params = _init(cfg, tokens)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "tensor"))
    rules = (("batch", "data"), ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"))
    rules += (("vocab", "tensor"),)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        logits = jax.jit(lambda p, t: LlamaForCausalLM(cfg).apply({"params": p}, t))(params, tokens)
    np.testing.assert_allclose(logits, _apply(cfg, params, tokens), atol=1e-5)


def test_causality():
    cfg = _config()
    tokens = _tokens()
    params = _init(cfg, tokens)
    t = 6
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % cfg.vocab_size)
    a, b = _apply(cfg, params, tokens), _apply(cfg, params, changed)
    np.testing.assert_array_equal(a[:, :t], b[:, :t])
    assert float(jnp.max(jnp.abs(a[:, t:] - b[:, t:]))) > 1e-4


def test_rope_scores_depend_only_on_relative_offset():
    hd, theta = 16, 10000.0
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, hd)), jnp.float32) for _ in range(2))

    @jax.jit
    def rotate(x, pos):
        cos, sin = model_lib.rotary_cos_sin(jnp.reshape(pos, (1, 1)), hd, theta)
        return model_lib.apply_rotary(x, cos, sin)

    def score(m, n):  # <RoPE(q, m), RoPE(k, n)>
        return float(jnp.sum(rotate(q, m) * rotate(k, n)))

    for offset in (0, 1, 5):
        ref = score(offset, 0)
        for base in (3, 17, 100):
            assert score(base + offset, base) == pytest.approx(ref, abs=1e-4)
    assert score(5, 0) != pytest.approx(score(1, 0), abs=1e-3)
    # Position 0 is the identity, and rotations preserve norms.
    np.testing.assert_allclose(rotate(q, 0), q, atol=1e-7)
    np.testing.assert_allclose(jnp.linalg.norm(rotate(q, 7)), jnp.linalg.norm(q), rtol=1e-6)


def test_position_shift_invariance():
    # A causal model with RoPE only sees relative positions: shifting all positions is a no-op.
    cfg = _config(num_kv_heads=2)
    tokens = _tokens()
    params = _init(cfg, tokens)
    positions = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32) + 37, tokens.shape)
    shifted = _apply(cfg, params, tokens, positions=positions)
    np.testing.assert_allclose(shifted, _apply(cfg, params, tokens), atol=2e-5)


def test_gqa_equals_mha_with_repeated_kv():
    gqa = _config(num_kv_heads=2)
    tokens = _tokens()
    params = _init(gqa, tokens)
    # Each kv head serves num_heads // num_kv_heads consecutive query heads (HF repeat_kv).
    mha_params = jax.tree.map(lambda x: x, params)
    for layer in range(gqa.num_layers):
        attn = mha_params["model"][f"layers_{layer}"]["self_attn"]
        for name in ("k_proj", "v_proj"):
            w = attn[name]["kernel"].reshape(64, 2, 1, 16)
            attn[name]["kernel"] = jnp.broadcast_to(w, (64, 2, 2, 16)).reshape(64, 64)
    mha = _config()
    np.testing.assert_allclose(
        _apply(gqa, params, tokens), _apply(mha, mha_params, tokens), atol=1e-5
    )


def test_remat_gives_identical_logits_and_grads():
    cfg = _config(num_kv_heads=2, num_layers=1)  # One layer keeps the two compiles cheap.
    tokens = _tokens()
    params = _init(cfg, tokens)

    def loss_and_grad(cfg):
        def loss(p):
            logits = LlamaForCausalLM(cfg).apply({"params": p}, tokens)
            targets = jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0]
            return jnp.mean(jax.nn.logsumexp(logits, -1) - targets), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (ref_loss, ref_logits), ref_grad = loss_and_grad(cfg)
    (loss, logits), grad = loss_and_grad(cfg.replace(remat=True))
    # Same math; XLA may fuse the recomputed forward differently, so allow fp32 rounding.
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grad, ref_grad)


def test_scan_layers_matches_unrolled():
    base = _config(num_kv_heads=2)
    tokens = _tokens()
    params = _init(base, tokens)
    layers = [params["model"][f"layers_{i}"] for i in range(base.num_layers)]
    stacked = {
        "lm_head": params["lm_head"],
        "model": {
            "embed_tokens": params["model"]["embed_tokens"],
            "norm": params["model"]["norm"],
            "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers),
        },
    }
    # Stacked params compute the same function (here with remat inside the scan too).
    scan = base.replace(scan_layers=True, remat=True)
    np.testing.assert_allclose(
        _apply(scan, stacked, tokens), _apply(base, params, tokens), atol=1e-5
    )


def test_config_from_dict():
    d = ml_collections.ConfigDict(
        dict(TINY, num_kv_heads=2, dtype="bfloat16", param_dtype="float32")
    )
    cfg = LlamaConfig.from_dict(d)
    assert cfg.dtype == jnp.bfloat16 and cfg.param_dtype == jnp.float32
    assert cfg.kv_heads == 2 and cfg.head_dim == 16
    assert LlamaConfig.from_dict(dict(TINY)).kv_heads == 4
    with pytest.raises(ValueError, match="unknown LlamaConfig fields"):
        LlamaConfig.from_dict(dict(TINY, hiden_size=3))
    with pytest.raises(ValueError, match="divisible"):
        LlamaConfig(**{**TINY, "num_kv_heads": 3})
    with pytest.raises(ValueError, match="max_seq_len"):
        cfg = _config(max_seq_len=8)
        jax.eval_shape(LlamaForCausalLM(cfg).init, jax.random.key(0), _tokens(length=9))


def test_attention_option_is_validated_early():
    with pytest.raises(ValueError, match="attention='flash'; expected one of"):
        _config(attention="flash")
    with pytest.raises(
        ValueError, match="needs a bfloat16 or float16 compute dtype, got dtype=float32"
    ):
        _config(attention="cudnn")  # _config computes in fp32
    # auto: cuDNN only where its kernel runs (never for fp32 compute; never on CPU)
    assert model_lib.resolve_attention(_config()) == "einsum"
    assert model_lib.resolve_attention(_config(attention="einsum", dtype=jnp.bfloat16)) == "einsum"
    if jax.default_backend() != "gpu":
        assert model_lib.resolve_attention(_config(dtype=jnp.bfloat16)) == "einsum"
        cfg = _config(attention="cudnn", dtype=jnp.bfloat16)
        with pytest.raises(ValueError, match="needs an NVIDIA GPU, but JAX runs on 'cpu'"):
            jax.eval_shape(LlamaForCausalLM(cfg).init, jax.random.key(0), _tokens())


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_cudnn_attention_matches_einsum(num_kv_heads):
    # bf16 compute both ways; cuDNN accumulates in fp32 in a different order (flash tiles), so
    # the logits agree to bf16 rounding, and so do the gradients.
    cfg = _config(dtype=jnp.bfloat16, num_kv_heads=num_kv_heads)
    tokens = _tokens(length=64)
    params = _init(cfg, tokens)

    def loss_and_grad(cfg):
        def loss(p):
            logits = LlamaForCausalLM(cfg).apply({"params": p}, tokens).astype(jnp.float32)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    assert model_lib.resolve_attention(cfg.replace(attention="auto")) == "cudnn"
    (ref_loss, ref_logits), ref_grad = loss_and_grad(cfg.replace(attention="einsum"))
    (loss, logits), grad = loss_and_grad(cfg.replace(attention="cudnn"))
    scale = float(jnp.abs(ref_logits).max())
    np.testing.assert_allclose(logits, ref_logits, atol=2e-2 * scale)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-2)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad), strict=True):
        np.testing.assert_allclose(a, b, atol=3e-2 * float(jnp.abs(b).max()) + 1e-6)


def test_model_flops_per_token():
    cfg = _config()
    n = model_lib.count_params(_init(cfg, _tokens())) - cfg.vocab_size * cfg.hidden_size
    assert model_lib.model_flops_per_token(cfg, 128) == 6 * n + 12 * 2 * 4 * 16 * 128


# ----------------------------------------------------------------------------------------------
# Equivalence with transformers.LlamaForCausalLM.


@pytest.mark.parametrize("num_kv_heads", [4, 2], ids=["mha", "gqa"])
def test_matches_transformers(tmp_path, num_kv_heads):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from train.hf_checkpoint import load_hf_llama

    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        num_hidden_layers=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        rope_theta=500.0,  # Non-default, so a wrong theta would show.
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():  # Larger random weights (incl. norms) than the 0.02 init.
        for p in hf_model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf_model.save_pretrained(tmp_path)

    cfg, params = load_hf_llama(tmp_path, dtype="float32")
    assert cfg.kv_heads == num_kv_heads and cfg.rope_theta == 500.0
    tokens = np.random.RandomState(0).randint(0, 256, size=(2, 24))
    with torch.no_grad():
        ref = hf_model(torch.from_numpy(tokens)).logits.numpy()
    ours = np.asarray(_apply(cfg, params, jnp.asarray(tokens, jnp.int32)))
    assert np.max(np.abs(ours - ref)) < HF_ATOL, np.max(np.abs(ours - ref))
