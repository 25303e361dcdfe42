"""Stochastic rounding of bf16 parameters (golore_jax/_precision.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from golore_jax import _precision as precision


def _truncated(x: np.ndarray) -> np.ndarray:
    """The bf16 neighbour of fp32 ``x`` toward zero (its top 16 bits), as fp32."""
    return (x.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)


def _away(x: np.ndarray) -> np.ndarray:
    """The bf16 neighbour of fp32 ``x`` away from zero, as fp32."""
    return ((x.view(np.uint32) & np.uint32(0xFFFF0000)) + np.uint32(0x10000)).view(np.float32)


def _as_f32(x: jax.Array) -> np.ndarray:
    return np.asarray(jnp.asarray(x, jnp.float32))


def test_result_is_one_of_the_two_neighbouring_bf16_values():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(20_000) * 10.0 ** rng.uniform(-30, 30, 20_000)).astype(np.float32)
    out = _as_f32(precision.stochastic_round_to_bf16(x, jax.random.key(0)))
    down, up = _truncated(x), _away(x)
    assert np.all((out == down) | (out == up))
    # both neighbours occur (the rounding is not a fixed truncation)
    assert 0.3 < np.mean(out == up) < 0.7


def test_exact_values_zeros_infinities_and_nan_are_kept():
    exact = np.asarray([0.0, -0.0, 1.0, -2.5, 3.0e38, 1.0e-30], np.float32)
    exact = _truncated(exact)  # make them bf16-representable
    special = np.asarray([np.inf, -np.inf], np.float32)
    for key in range(5):
        k = jax.random.key(key)
        np.testing.assert_array_equal(_as_f32(precision.stochastic_round_to_bf16(exact, k)), exact)
        np.testing.assert_array_equal(
            _as_f32(precision.stochastic_round_to_bf16(special, k)), special
        )
    nan_low_payload = np.asarray([0x7F800001, 0xFFC00000], np.uint32).view(np.float32)
    out = _as_f32(precision.stochastic_round_to_bf16(nan_low_payload, jax.random.key(0)))
    assert np.all(np.isnan(out))


def test_unbiased_mean_of_many_roundings_within_five_sigma():
    # Points between bf16 neighbours at several fractions of the gap, both signs, 3 exponents.
    fractions = np.asarray([0.01, 0.25, 0.5, 0.7, 0.99])
    bases = np.asarray([1.0, -3.0, 1.5e-20, 7.0e20], np.float32)
    ulps = _away(bases) - _truncated(bases)
    x = (_truncated(bases)[:, None] + np.sign(bases)[:, None] * fractions * ulps[:, None]).astype(
        np.float32
    )
    n = 40_000
    samples = _as_f32(
        precision.stochastic_round_to_bf16(
            np.broadcast_to(x[..., None], (*x.shape, n)), jax.random.key(3)
        )
    ).astype(np.float64)
    mean = samples.mean(-1)
    # the fraction actually represented (x is fp32, so the gap fraction is quantised to 2^-16)
    down, gap = _truncated(x).astype(np.float64), (_away(x) - _truncated(x)).astype(np.float64)
    q = np.abs(x - down) / np.abs(gap)
    assert np.all((q > 0) & (q < 1))
    sigma = np.abs(gap) * np.sqrt(q * (1 - q) / n)
    assert np.all(np.abs(mean - x) <= 5 * sigma + 1e-12 * np.abs(x))


def test_deterministic_for_a_key_and_same_under_jit():
    x = jnp.linspace(-3.0, 3.0, 1001, dtype=jnp.float32) + 1e-4
    key = jax.random.key(7)
    eager = precision.stochastic_round_to_bf16(x, key)
    again = precision.stochastic_round_to_bf16(x, key)
    jitted = jax.jit(precision.stochastic_round_to_bf16)(x, key)
    np.testing.assert_array_equal(_as_f32(eager), _as_f32(again))
    np.testing.assert_array_equal(_as_f32(eager), _as_f32(jitted))
    other = precision.stochastic_round_to_bf16(x, jax.random.key(8))
    assert np.any(_as_f32(other) != _as_f32(eager))


def _mixed_tree():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    params = {
        "a": jnp.asarray(w, jnp.bfloat16),
        "b": jnp.asarray(w, jnp.bfloat16),  # same values as "a": its own key must differ
        "norm": jnp.asarray(rng.standard_normal(32), jnp.float32),
    }
    updates = {
        "a": jnp.asarray(1e-3 * rng.standard_normal((64, 32)), jnp.float32),
        "b": jnp.asarray(1e-3 * rng.standard_normal((64, 32)), jnp.float32),
        "norm": jnp.asarray(1e-3 * rng.standard_normal(32), jnp.bfloat16),
    }
    return params, updates


def test_apply_updates_fp32_leaves_equal_optax_and_bf16_leaves_round_per_leaf():
    params, updates = _mixed_tree()
    key = jax.random.key(0)
    out = precision.apply_updates_stochastic(params, updates, key)
    jitted = jax.jit(precision.apply_updates_stochastic)(params, updates, key)
    reference = optax.apply_updates(params, updates)
    assert out["a"].dtype == jnp.bfloat16 and out["norm"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out["norm"]), np.asarray(reference["norm"]))
    for name in ("a", "b"):
        total = _as_f32(params[name]) + np.asarray(updates[name])
        got = _as_f32(out[name])
        assert np.all((got == _truncated(total)) | (got == _away(total)))
        np.testing.assert_array_equal(got, _as_f32(jitted[name]))
    # identical leaves with identical updates round with different noise (key per leaf)
    same = dict(updates, b=updates["a"])
    twin = precision.apply_updates_stochastic(params, same, key)
    assert np.any(_as_f32(twin["a"]) != _as_f32(twin["b"]))


def test_small_updates_accumulate_where_round_to_nearest_loses_them():
    # 1e-3 is below half a bf16 ulp at 1.0 (2^-8 = 0.0039): round-to-nearest never moves.
    p_sr = p_rtn = jnp.ones(4096, jnp.bfloat16)
    u = jnp.full(4096, 1e-3, jnp.float32)
    step = jax.jit(precision.apply_updates_stochastic)
    for t in range(100):
        p_sr = step(p_sr, u, jax.random.fold_in(jax.random.key(0), t))
        p_rtn = optax.apply_updates(p_rtn, u)
    assert np.all(_as_f32(p_rtn) == 1.0)
    # each step adds at most one ulp (2^-7) of zero-mean noise: per-param std <= 0.04,
    # the mean over 4096 params has std <= 0.0007; 0.005 is 7 sigma
    assert abs(float(jnp.mean(p_sr.astype(jnp.float32))) - 1.1) < 5e-3


def test_unsupported_dtype_names_the_leaf():
    params = {"layer": {"w": jnp.ones(3, jnp.float16)}}
    with pytest.raises(TypeError, match=r"\['layer'\]\['w'\].*float16"):
        precision.apply_updates_stochastic(params, params, jax.random.key(0))
