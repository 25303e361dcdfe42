"""bf16 parameters without losing small updates: stochastic rounding of ``params + updates``.

With bf16 parameters, ``optax.apply_updates`` rounds ``p + u`` to the nearest bf16 value. A bf16
has 8 significant bits, so any update below half a unit in the last place of ``p`` (``|u| <
2^-9 |p|``, e.g. a 1e-3-scale Adam step on a weight of 1) is lost every time, and training
stalls. :func:`apply_updates_stochastic` adds in fp32 and rounds each bf16 parameter up or down
at random with the probabilities that make the result unbiased, ``E[round(x)] = x``: small
updates survive on average.

Why stochastic rounding and not a compensated (Kahan-style) sum. A compensated sum keeps a
second bf16 tree with each parameter's rounding error and adds it back next step: exact in the
long run, but 4 bytes per parameter, as much as fp32 master weights. Stochastic rounding keeps
2 bytes per parameter (the point of bf16 storage: 12.6 GiB instead of 25 GiB of weights at 7B)
and only adds noise of at most one bf16 ulp per step, zero in expectation. It needs a PRNG key
per step; derive it from the step count so a resumed run rounds exactly as before.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


def stochastic_round_to_bf16(x: jax.Array, key: jax.Array) -> jax.Array:
    """``x`` (fp32) rounded to one of its two neighbouring bf16 values, unbiased.

    A bf16 is the top 16 bits of an fp32. Adding a uniform random 16-bit integer to the low 16
    bits, then truncating, rounds up exactly when the noise reaches past the discarded part:
    with probability (discarded part) / 2^16, which makes ``E[result] = x``. The carry runs into
    the exponent where it should (the next bf16 is one larger). Exact bf16 values, zeros and
    infinities are unchanged; NaN stays NaN. Values within one bf16 ulp below the largest
    finite fp32 may round to infinity, with the unbiased probability.

    >>> import jax, jax.numpy as jnp
    >>> x = jnp.full(20_000, 1.0 + 2.0**-9)  # a quarter of the way from 1 to the next bf16
    >>> r = stochastic_round_to_bf16(x, jax.random.key(0)).astype(jnp.float32)
    >>> sorted(set(r.tolist())), round(float(r.mean()) - 1.0, 3)  # E[r] = x
    ([1.0, 1.0078125], 0.002)
    """
    x = jnp.asarray(x, jnp.float32)
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    noise = jax.random.bits(key, x.shape, jnp.uint32) >> 16
    high = ((bits + noise) >> 16).astype(jnp.uint16)
    rounded = lax.bitcast_convert_type(high, jnp.bfloat16)
    # A NaN whose payload sits in the low bits would truncate to infinity; keep it NaN.
    return jnp.where(jnp.isnan(x), jnp.asarray(jnp.nan, jnp.bfloat16), rounded)


def apply_updates_stochastic(params: Any, updates: Any, key: jax.Array) -> Any:
    """``params + updates`` with bf16 leaves stochastically rounded (``optax.apply_updates``'s
    drop-in for bf16 parameters).

    Each leaf is added in fp32. bf16 leaves are rounded with :func:`stochastic_round_to_bf16`,
    each with its own key (``fold_in(key, leaf index)``); fp32 leaves get exactly
    ``optax.apply_updates``' result. Leaves of other dtypes (fp16, fp64, ints) raise: their
    rounding is not implemented here. ``None`` updates leave the leaf unchanged.
    :class:`Int8Weight` leaves (int8 storage) get ``codes * scale + update`` in fp32, re-quantized
    with :func:`quantize_int8`'s stochastic rounding (fresh scales, same reduced axis); their
    update is an array of the decoded shape.

    Args:
      params: a tree of parameters (bf16 and/or fp32 leaves).
      updates: a tree like ``params`` (any float dtype; e.g. the optimizer's output).
      key: a typed PRNG key; use a fresh one every step, e.g. ``fold_in(key(seed), step)``.

    >>> import jax, jax.numpy as jnp
    >>> params = {"w": jnp.ones(3, jnp.bfloat16), "b": jnp.ones(3)}
    >>> updates = {"w": jnp.ones(3), "b": jnp.ones(3)}
    >>> new = apply_updates_stochastic(params, updates, jax.random.key(0))
    >>> new["w"].dtype.name, new["w"].tolist(), new["b"].tolist()
    ('bfloat16', [2.0, 2.0, 2.0], [2.0, 2.0, 2.0])
    """
    param_leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_int8)
    update_leaves = treedef.flatten_up_to(updates)
    out = []
    for i, ((path, p), u) in enumerate(zip(param_leaves, update_leaves, strict=True)):
        if _is_int8(p):  # int8 storage: add in fp32, re-quantize unbiased (new scales)
            if u is None:
                out.append(p)
                continue
            total = dequantize_int8(p) + jnp.asarray(u).astype(jnp.float32)
            out.append(quantize_int8(total, jax.random.fold_in(key, i), axis=_scale_axis(p)))
            continue
        dtype = jnp.result_type(p)
        if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
            raise TypeError(
                f"apply_updates_stochastic: leaf {jax.tree_util.keystr(path)} has dtype "
                f"{dtype}; only bfloat16 (rounded stochastically) and float32 are supported"
            )
        if u is None:
            out.append(p)
        elif dtype == jnp.float32:
            out.append(jnp.asarray(p + u).astype(dtype))  # optax.apply_updates' sum
        else:
            total = p.astype(jnp.float32) + jnp.asarray(u).astype(jnp.float32)
            out.append(stochastic_round_to_bf16(total, jax.random.fold_in(key, i)))
    return treedef.unflatten(out)


# --- INT8 storage of weight matrices ------------------------------------------------------------
#
# Why per-output-channel (per-column of a Flax ``(in, out)`` kernel) absmax scales and not blocks
# (Q-GaLore uses blocks of 256). A column's scale multiplies one output of ``x @ W``: the decode
# is ``codes * scale[None, :]``, which a matmul can also apply to its result, and the scales cost
# ``out`` floats per matrix (0.03% of the codes at 7B). Blocks would be finer where a column has
# a few large entries, but for the roughly Gaussian columns of a pre-trained LLaMA's matrices the
# absmax of a 4096-entry column is ~3.9 standard deviations against ~2.9 for a 256-entry block:
# at most ~1.35x coarser steps, for no extra layout in the matmul. Stochastic rounding makes
# the stored value unbiased either way; the step size only sets the rounding noise.

INT8_LEVELS = 127  # symmetric codes in [-127, 127] (-128 unused, so negation is exact)


class Int8Weight(NamedTuple):
    """A float array stored as int8 codes with one fp32 scale per slice along ``axis``.

    For a matrix ``(..., in, out)`` quantized over ``axis=-2``: ``codes`` int8 of the same
    shape, ``scale`` fp32 ``(..., 1, out)`` (one per output channel, the reduced axis kept as 1
    so that leading axes such as a layer stack slice the same way in both). The value is
    ``codes * scale``.
    """

    codes: jax.Array
    scale: jax.Array


def int8_scale(x: jax.Array, axis: int = -2) -> jax.Array:
    """``max|x| / 127`` over ``axis`` (kept as a size-1 axis), in fp32."""
    return jnp.max(jnp.abs(jnp.asarray(x, jnp.float32)), axis=axis, keepdims=True) / INT8_LEVELS


def quantize_int8(x: jax.Array, key: jax.Array | None = None, axis: int = -2) -> Int8Weight:
    """``x`` as :class:`Int8Weight` with absmax scales over ``axis``.

    With ``key``: unbiased stochastic rounding, ``codes = floor(x / scale + u)``, ``u ~ U[0, 1)``
    (24 random bits per entry), so ``E[codes * scale] = x`` for the scale ``x`` itself gives
    (the scale is deterministic: each slice's largest entry maps to +-127 exactly). One rounding
    has error ``< scale`` and standard deviation ``<= scale / 2``. Without ``key``: round to
    nearest (error ``<= scale / 2``), e.g. for the initial weights.

    Non-finite entries make their slice's codes meaningless (the caller must not store them;
    the trainer's step applies only finite updates). An all-zero slice gets scale 0 and codes 0.

    >>> import jax, jax.numpy as jnp
    >>> w = quantize_int8(jnp.asarray([[1.0], [0.5], [-0.25]]))
    >>> w.codes[:, 0].tolist(), round(float(w.scale[0, 0]) * 127, 6)
    ([127, 64, -32], 1.0)
    """
    x = jnp.asarray(x, jnp.float32)
    scale = int8_scale(x, axis)
    y = x / jnp.where(scale > 0, scale, 1.0)
    if key is None:
        q = jnp.round(y)
    else:
        u = (jax.random.bits(key, x.shape, jnp.uint32) >> 8).astype(jnp.float32) * 2.0**-24
        q = jnp.floor(y + u)
    # |y| <= 127 up to one rounding of the division; the clip only catches that last ulp.
    codes = jnp.clip(q, -INT8_LEVELS, INT8_LEVELS).astype(jnp.int8)
    return Int8Weight(codes, scale)


def dequantize_int8(w: Int8Weight, dtype: Any = jnp.float32) -> jax.Array:
    """``codes * scale`` in ``dtype`` (computed in fp32, then cast)."""
    return (w.codes.astype(jnp.float32) * w.scale).astype(dtype)


def _scale_axis(w: Int8Weight) -> int:
    """The axis ``w``'s scales were reduced over (size 1 in the scale, not in the codes); -2
    when none is (a size-1 axis: any reduction over it gives the same scales)."""
    for axis, (n, m) in enumerate(zip(w.scale.shape, w.codes.shape, strict=True)):
        if n == 1 != m:
            return axis
    return -2


def _is_int8(x: Any) -> bool:
    return isinstance(x, Int8Weight)


def dequantize_int8_tree(tree: Any, dtype: Any) -> Any:
    """``tree`` with every :class:`Int8Weight` decoded to a ``dtype`` array (others unchanged).

    >>> import jax.numpy as jnp
    >>> params = {"w": quantize_int8(jnp.asarray([[1.0], [-1.0]])), "b": jnp.ones(1)}
    >>> decoded = dequantize_int8_tree(params, jnp.bfloat16)
    >>> decoded["w"].dtype.name, decoded["w"][:, 0].tolist(), decoded["b"].dtype.name
    ('bfloat16', [1.0, -1.0], 'float32')
    """
    return jax.tree_util.tree_map(
        lambda x: dequantize_int8(x, dtype) if _is_int8(x) else x, tree, is_leaf=_is_int8
    )
