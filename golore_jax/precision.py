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

from typing import Any

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
    param_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    update_leaves = treedef.flatten_up_to(updates)
    out = []
    for i, ((path, p), u) in enumerate(zip(param_leaves, update_leaves, strict=True)):
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
