"""LLaMA decoder-only language model in Flax linen.

Mirrors Hugging Face ``LlamaForCausalLM`` (the architecture used by the GaLore / ReLoRA
pre-training code): token embedding, pre-norm decoder blocks (RMSNorm -> causal self-attention
with rotary embeddings and optional grouped-query attention -> residual, RMSNorm -> SwiGLU MLP ->
residual), a final RMSNorm and an untied output head.

Every weight matrix is a 2-D ``kernel`` in Flax ``(in, out)`` layout, i.e. the transpose of
torch's ``(out, in)`` ``weight``, so that matrix optimizers (GaLore/GoLore) see plain matrices.
Parameter tree (``scan_layers=False``), with ``D = num_heads * head_dim`` and
``K = num_kv_heads * head_dim``::

    params['model']['embed_tokens']['embedding']                        (vocab, hidden)
    params['model']['layers_{i}']['input_layernorm']['scale']           (hidden,)
    params['model']['layers_{i}']['self_attn']['q_proj']['kernel']      (hidden, D)
    params['model']['layers_{i}']['self_attn']['k_proj']['kernel']      (hidden, K)
    params['model']['layers_{i}']['self_attn']['v_proj']['kernel']      (hidden, K)
    params['model']['layers_{i}']['self_attn']['o_proj']['kernel']      (D, hidden)
    params['model']['layers_{i}']['post_attention_layernorm']['scale']  (hidden,)
    params['model']['layers_{i}']['mlp']['gate_proj']['kernel']         (hidden, intermediate)
    params['model']['layers_{i}']['mlp']['up_proj']['kernel']           (hidden, intermediate)
    params['model']['layers_{i}']['mlp']['down_proj']['kernel']         (intermediate, hidden)
    params['model']['norm']['scale']                                    (hidden,)
    params['lm_head']['kernel']                                         (hidden, vocab)

With ``scan_layers=True`` the per-layer subtrees are replaced by a single
``params['model']['layers']`` subtree whose leaves carry a leading ``num_layers`` axis.

Logical axis names (for ``nn.logical_to_mesh_axes`` / sharding rules):

* parameters: ``'vocab'``, ``'embed'``, ``'heads'`` (query heads * head_dim),
  ``'kv_heads'`` (key/value heads * head_dim), ``'mlp'``, ``'norm'``, and ``'layers'`` (leading
  axis of stacked params, only with ``scan_layers=True``).
* activations: ``'batch'``, ``'length'``, ``'embed'`` (residual stream), ``'heads'`` /
  ``'kv_heads'`` and ``'head_dim'`` (q and k/v as ``[B, L, heads, head_dim]``), ``'mlp'``
  (MLP hidden), ``'vocab'`` (logits).

Parameter kernels use ``('embed', 'heads')`` etc.:

==========================  ========================
embed_tokens.embedding      ('vocab', 'embed')
q_proj.kernel               ('embed', 'heads')
k_proj.kernel, v_proj       ('embed', 'kv_heads')
o_proj.kernel               ('heads', 'embed')
gate_proj, up_proj          ('embed', 'mlp')
down_proj                   ('mlp', 'embed')
lm_head.kernel              ('embed', 'vocab')
all norms' scale            ('norm',)
==========================  ========================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
DType = Any

_DTYPES = {
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
    "float16": jnp.float16,
    "fp16": jnp.float16,
    "float32": jnp.float32,
    "fp32": jnp.float32,
}


def _to_dtype(value: Any) -> DType:
    """Accepts a dtype or its string name ('bfloat16', 'float32', ...)."""
    if isinstance(value, str):
        try:
            return _DTYPES[value.lower()]
        except KeyError:
            raise ValueError(
                f"unknown dtype {value!r}; expected one of {sorted(_DTYPES)}"
            ) from None
    return jnp.dtype(value).type


ATTENTION_IMPLEMENTATIONS = ("auto", "einsum", "cudnn")
WEIGHT_STORAGES = ("float", "int8")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of the LLaMA model (field names match ``config.model``)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_layers: int
    num_kv_heads: int | None = None  # None -> num_heads; fewer -> grouped-query attention.
    max_seq_len: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    dtype: DType = jnp.bfloat16  # Compute dtype.
    param_dtype: DType = jnp.float32  # Master parameter dtype.
    remat: bool = False  # Activation checkpointing per decoder layer.
    scan_layers: bool = False  # Stack layer params along a leading 'layers' axis and nn.scan.
    # "einsum": our attention (any backend; the reference). "cudnn": cuDNN's fused flash kernel
    # through jax.nn.dot_product_attention (NVIDIA GPUs, bf16/fp16 compute): the [L, L] score
    # matrix is never stored (2.1x the tokens/s of einsum at LLaMA-1B, seq 2048, H100).
    # "auto": cudnn where it can run (see resolve_attention), else einsum.
    attention: str = "auto"
    # How the trainer stores the stacked layers' matrices: "float" (param_dtype) or "int8"
    # (train/weight_storage.py). The modules here always see float kernels: the trainer
    # decodes one layer at a time before applying it.
    weight_storage: str = "float"

    def __post_init__(self):
        # Normalise dtypes given as strings (e.g. from a ConfigDict or JSON).
        object.__setattr__(self, "dtype", _to_dtype(self.dtype))
        object.__setattr__(self, "param_dtype", _to_dtype(self.param_dtype))
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if self.num_heads % self.kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"attention={self.attention!r}; expected one of {ATTENTION_IMPLEMENTATIONS}"
            )
        if self.weight_storage not in WEIGHT_STORAGES:
            raise ValueError(
                f"weight_storage={self.weight_storage!r}; expected one of {WEIGHT_STORAGES}"
            )
        if self.attention == "cudnn" and self.dtype not in (jnp.bfloat16, jnp.float16):
            raise ValueError(
                f"attention='cudnn' needs a bfloat16 or float16 compute dtype, got "
                f"dtype={jnp.dtype(self.dtype).name}"
            )

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (resolves the ``None`` default)."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LlamaConfig:
        """Builds a config from a mapping or an ``ml_collections.ConfigDict``.

        Keys must be field names of this class; unknown keys raise (catches typos).
        """
        if hasattr(d, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict.
            d = d.to_dict()
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown LlamaConfig fields {unknown}; valid fields: {sorted(names)}")
        return cls(**dict(d))

    from_config_dict = from_dict

    def replace(self, **kwargs: Any) -> LlamaConfig:
        return dataclasses.replace(self, **kwargs)


# Variable collection of the ReLoRA-like reparameterisation (see train/relora.py): a dense
# layer that finds ``down`` and ``up`` there computes ``x W0 + (x down) up``.
ADAPTER = "adapter"


class Dense(nn.Dense):
    """``nn.Dense`` plus, when the ``adapter`` collection holds one for this layer, a low-rank
    term ``(x down) up`` (``down`` is ``in x r``, ``up`` is ``r x out``). train/relora.py puts
    ``W = W0 + P A`` there as ``down = P, up = A`` and ``W0 + A Q^T`` as ``down = A,
    up = Q^T``: the backward pass then forms only ``A``'s low-rank gradient, never the
    ``in x out`` one (GoLore paper, Section 6)."""

    def __call__(self, inputs: Array) -> Array:
        y = super().__call__(inputs)
        if not self.has_variable(ADAPTER, "down"):
            return y
        down = jnp.asarray(self.get_variable(ADAPTER, "down"), self.dtype)
        up = jnp.asarray(self.get_variable(ADAPTER, "up"), self.dtype)
        return y + (jnp.asarray(inputs, self.dtype) @ down) @ up


def _dense(features: int, axes: tuple[str, str], config: LlamaConfig, name: str) -> nn.Dense:
    return Dense(
        features,
        use_bias=False,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
        name=name,
    )


class RMSNorm(nn.Module):
    """Root-mean-square norm; statistics in fp32 as in HF ``LlamaRMSNorm``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            (x.shape[-1],),
            cfg.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.rms_norm_eps)
        # HF casts the normalised activations back before multiplying by the weight.
        return x32.astype(cfg.dtype) * jnp.asarray(scale, cfg.dtype)


def rotary_cos_sin(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """HF-Llama rotary tables: ``cos, sin`` of shape ``[..., L, head_dim]`` in fp32.

    ``inv_freq[i] = 1 / theta^(2i / head_dim)``; the frequencies are repeated for the two halves
    of ``head_dim`` (non-interleaved, matching ``rotate_half``).
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: Array) -> Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates ``x[B, L, H, D]`` by position; ``cos``/``sin`` are ``[B, L, D]`` (fp32)."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x32 = x.astype(jnp.float32)
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


class LlamaAttention(nn.Module):
    """Causal multi-head self-attention with RoPE and grouped-query attention."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: Array, positions: Array) -> Array:
        cfg = self.config
        b, length, _ = x.shape
        nh, nkv, hd = cfg.num_heads, cfg.kv_heads, cfg.head_dim

        # 2-D kernels (matrices for the optimizer); heads are split on the activations.
        q = _dense(nh * hd, ("embed", "heads"), cfg, "q_proj")(x).reshape(b, length, nh, hd)
        k = _dense(nkv * hd, ("embed", "kv_heads"), cfg, "k_proj")(x).reshape(b, length, nkv, hd)
        v = _dense(nkv * hd, ("embed", "kv_heads"), cfg, "v_proj")(x).reshape(b, length, nkv, hd)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        k = nn.with_logical_constraint(k, ("batch", "length", "kv_heads", "head_dim"))
        v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "head_dim"))

        cos, sin = rotary_cos_sin(positions, hd, cfg.rope_theta)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        if resolve_attention(cfg) == "cudnn":
            out = cudnn_causal_attention(q, k, v)
        else:
            out = causal_attention(q, k, v)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
        out = out.reshape(b, length, nh * hd)
        return _dense(cfg.hidden_size, ("heads", "embed"), cfg, "o_proj")(out)


def causal_attention(q: Array, k: Array, v: Array) -> Array:
    """Scaled dot-product attention with a causal mask; logits and softmax in fp32.

    Args:
      q: ``[B, L, H, D]`` queries.
      k, v: ``[B, L, K, D]`` keys/values, ``H % K == 0`` (each group of ``H // K`` query heads
        shares one key/value head, as HF's ``repeat_kv``; done by reshaping, not copying).

    Returns:
      ``[B, L, H, D]`` in the dtype of ``q``.
    """
    b, length, nh, hd = q.shape
    nkv = k.shape[2]
    q = q.reshape(b, length, nkv, nh // nkv, hd)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
    scores = scores * (hd**-0.5)
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
    return out.reshape(b, length, nh, hd)


def resolve_attention(config: LlamaConfig) -> str:
    """The attention that ``config`` runs here: ``auto`` is ``cudnn`` on NVIDIA GPUs of compute
    capability >= 8.0 (cuDNN's flash kernel) with a 16-bit compute dtype and a head size that
    kernel takes (<= 128, multiple of 8), else ``einsum``."""
    if config.attention != "auto":
        return config.attention
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)  # CUDA devices only
    # The devices of the mesh being traced for, when one is set: a step compiled ahead of time
    # for a TPU topology (train/compile.py) gets einsum even on a GPU host.
    target = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    platform = device.platform if target is None else target.platform
    fits = (
        platform == "gpu"
        and capability is not None
        and float(capability) >= 8.0
        and config.dtype in (jnp.bfloat16, jnp.float16)
        and config.head_dim <= 128
        and config.head_dim % 8 == 0
    )
    return "cudnn" if fits else "einsum"


def cudnn_causal_attention(q: Array, k: Array, v: Array) -> Array:
    """``causal_attention`` as cuDNN's fused (flash) kernel; same shapes and grouped heads.

    Raises at trace time, naming the backend, when JAX runs on anything but an NVIDIA GPU.
    """
    backend = jax.default_backend()
    if backend != "gpu":
        raise ValueError(
            f"model.attention='cudnn' needs an NVIDIA GPU, but JAX runs on {backend!r}; "
            "use attention='einsum'"
        )
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        gate = _dense(cfg.intermediate_size, ("embed", "mlp"), cfg, "gate_proj")(x)
        up = _dense(cfg.intermediate_size, ("embed", "mlp"), cfg, "up_proj")(x)
        h = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
        return _dense(cfg.hidden_size, ("mlp", "embed"), cfg, "down_proj")(h)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm transformer block."""

    config: LlamaConfig
    scanned: bool = False  # Return ``(carry, None)`` for ``nn.scan``.

    @nn.compact
    def __call__(self, x: Array, positions: Array):
        cfg = self.config
        h = RMSNorm(cfg, name="input_layernorm")(x)
        x = x + LlamaAttention(cfg, name="self_attn")(h, positions)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        h = RMSNorm(cfg, name="post_attention_layernorm")(x)
        x = x + LlamaMLP(cfg, name="mlp")(h)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return (x, None) if self.scanned else x


class LlamaModel(nn.Module):
    """Embedding + decoder stack + final norm (HF ``LlamaModel``)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, tokens: Array, positions: Array) -> Array:
        cfg = self.config
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("vocab", "embed")
            ),
            name="embed_tokens",
        )
        x = embed(tokens)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

        layer_cls = LlamaDecoderLayer
        if cfg.remat:
            # Recompute each block in the backward pass; keep nothing but the block inputs.
            layer_cls = nn.remat(
                layer_cls,
                prevent_cse=not cfg.scan_layers,
                policy=jax.checkpoint_policies.nothing_saveable,
            )
        if cfg.scan_layers:
            stack = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast,),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = stack(cfg, scanned=True, name="layers")(x, positions)
        else:
            for i in range(cfg.num_layers):
                x = layer_cls(cfg, name=f"layers_{i}")(x, positions)
        return RMSNorm(cfg, name="norm")(x)


class LlamaForCausalLM(nn.Module):
    """LLaMA causal LM: ``tokens int32[B, L] -> logits fp32[B, L, vocab]``."""

    config: LlamaConfig

    @nn.compact
    def __call__(
        self, tokens: Array, *, positions: Array | None = None, deterministic: bool = True
    ) -> Array:
        """Computes next-token logits.

        Args:
          tokens: ``int32[B, L]`` token ids, ``L <= config.max_seq_len``.
          positions: optional ``int32[B, L]`` RoPE positions (default ``0..L-1``).
          deterministic: accepted for trainer API compatibility; the model has no dropout.

        Returns:
          ``float32[B, L, vocab]`` logits (computed in ``config.dtype``).
        """
        del deterministic  # No dropout in LLaMA pre-training.
        cfg = self.config
        b, length = tokens.shape
        if length > cfg.max_seq_len:
            raise ValueError(f"sequence length {length} exceeds max_seq_len={cfg.max_seq_len}")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
        x = LlamaModel(cfg, name="model")(tokens, positions)
        logits = _dense(cfg.vocab_size, ("embed", "vocab"), cfg, "lm_head")(x)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        return logits.astype(jnp.float32)


def count_params(params: Any) -> int:
    """Total number of parameter elements (works on boxed or unboxed trees)."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def num_params(config: LlamaConfig, *, include_embedding: bool = True) -> int:
    """Analytic parameter count for ``config`` (equals ``count_params`` of an init)."""
    h, i, hd = config.hidden_size, config.intermediate_size, config.head_dim
    attn = h * config.num_heads * hd * 2 + h * config.kv_heads * hd * 2  # q, o + k, v
    layer = attn + 3 * h * i + 2 * h
    n = config.num_layers * layer + h + h * config.vocab_size  # + final norm + lm_head
    return n + (config.vocab_size * h if include_embedding else 0)


def model_flops_per_token(config: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token for MFU, PaLM appendix B convention: ``6 N + 12 L H Q T``.

    * ``N``: parameters that take part in matmuls, i.e. all parameters except the input
      embedding table (a gather); the untied ``lm_head`` is included. Forward = 2N FLOPs per
      token, backward = 4N.
    * ``12 L H Q T``: attention score and value matmuls (``L`` layers, ``H`` query heads,
      ``Q`` head_dim, ``T`` sequence length), forward + backward, counting the full ``T x T``
      matrix (no discount for the causal mask, as in PaLM).
    """
    n = num_params(config, include_embedding=False)
    return float(6 * n + 12 * config.num_layers * config.num_heads * config.head_dim * seq_len)
