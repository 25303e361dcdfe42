"""Tests of golore_jax._quantized: 8-bit block-wise quantised Adam (Dettmers et al. 2022)."""

from __future__ import annotations

import functools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import golore_jax
from golore_jax import _quantized as q
from golore_jax._quantized import (
    SIGNED_LEVELS,
    UNSIGNED_LEVELS,
    QuantizedArray,
    dequantize_blockwise,
    quantize_blockwise,
    scale_by_adam_8bit,
    state_nbytes,
)

SIGNED_BOUND = 253.0 / (2 * 127**2)  # half the largest gap of sign(c) (c/127)^2
UNSIGNED_BOUND = (1.0 - (254.0 / 255.0) ** 4) / 2.0  # half the largest gap of (c/255)^4
SLACK = 1e-6  # fp32 rounding of the division by absmax and of the levels


def test_maps_and_stated_bounds() -> None:
    assert SIGNED_LEVELS.shape == (255,) and UNSIGNED_LEVELS.shape == (256,)
    assert np.all(np.diff(SIGNED_LEVELS) > 0) and np.all(np.diff(UNSIGNED_LEVELS) > 0)
    assert SIGNED_LEVELS[0] == -1 and SIGNED_LEVELS[127] == 0 and SIGNED_LEVELS[-1] == 1
    assert UNSIGNED_LEVELS[0] == 0 and UNSIGNED_LEVELS[-1] == 1
    assert q.max_error_fraction(SIGNED_LEVELS) == pytest.approx(SIGNED_BOUND, rel=1e-6)
    assert q.max_error_fraction(UNSIGNED_LEVELS) == pytest.approx(UNSIGNED_BOUND, rel=1e-6)
    assert SIGNED_BOUND < 1 / 127 and UNSIGNED_BOUND < 1 / 127


def _block_errors(x: np.ndarray, levels: np.ndarray, block_size: int) -> tuple[np.ndarray, ...]:
    """(|x - deq(q(x))| per element, absmax of its block per element), both padded/flattened."""
    back, qa = _round_trip(levels, x, block_size)
    back = np.asarray(back)
    err = np.abs(x.astype(np.float64) - back).ravel()
    n_blocks = qa.absmax.shape[0]
    padded = np.zeros(n_blocks * block_size)
    padded[: x.size] = np.abs(x.ravel())
    absmax = padded.reshape(n_blocks, block_size).max(axis=1)
    np.testing.assert_allclose(np.asarray(qa.absmax), absmax, rtol=0)
    per_elem = np.repeat(absmax, block_size)[: x.size]
    return err, per_elem, qa


@pytest.mark.parametrize("block_size", [1, 7, 64, 256])
def test_round_trip_error_bound_random(block_size: int) -> None:
    for seed in range(3):
        rng = np.random.default_rng(seed)
        # heavy-tailed, mixed scales across blocks (1e-6 .. 1e2), exact zeros included
        scale = 10.0 ** rng.integers(-6, 3, size=(37, 1))
        x = (rng.standard_t(2, size=(37, 29)) * scale).astype(np.float32)
        x[3, :] = 0.0
        err, absmax, qa = _block_errors(x, SIGNED_LEVELS, block_size)
        assert qa.codes.dtype == jnp.int8
        assert np.all(err <= absmax * (SIGNED_BOUND + SLACK))
        v = np.square(x)
        err, absmax, qa = _block_errors(v, UNSIGNED_LEVELS, block_size)
        assert qa.codes.dtype == jnp.uint8
        assert np.all(err <= absmax * (UNSIGNED_BOUND + SLACK))


@functools.cache
def _jitted(levels_name: str, block_size: int):
    """jit(x -> (deq(q(x)), codes, absmax)): one compile per map and block size."""
    levels = SIGNED_LEVELS if levels_name == "signed" else UNSIGNED_LEVELS

    @jax.jit
    def f(x):
        qa = quantize_blockwise(x, levels, block_size)
        return dequantize_blockwise(qa, levels, x.shape), qa

    return f


def _round_trip(levels: np.ndarray, x: np.ndarray, block_size: int):
    name = "signed" if levels[0] < 0 else "unsigned"
    return _jitted(name, block_size)(jnp.asarray(x))


def test_exact_levels_zero_blocks_and_small_values() -> None:
    # Every level times a block absmax round-trips exactly; zero blocks stay zero.
    for levels in (SIGNED_LEVELS, UNSIGNED_LEVELS):
        x = np.concatenate([levels, np.zeros(1, np.float32)]) * np.float32(2.0)
        back, _ = _round_trip(levels, x, 256)
        np.testing.assert_array_equal(np.asarray(back), x)
    back, z = _round_trip(UNSIGNED_LEVELS, np.zeros(12, np.float32), 4)
    assert np.all(np.asarray(z.absmax) == 0) and np.all(np.asarray(z.codes) == 0)
    assert np.all(np.asarray(back) == 0)
    # small values keep relative precision (the point of the non-linear maps)
    small = np.array([1.0, 1e-3, -1e-3, 3e-4], np.float32)
    back = np.asarray(_round_trip(SIGNED_LEVELS, small, 4)[0])
    # a linear int8 map (step 1/127) would round all three to 0
    assert np.all(back[1:] != 0)
    np.testing.assert_allclose(back[1:], small[1:], rtol=0.2)
    tiny = np.array([1.0, 1e-8, 1e-6, 0.0], np.float32)
    back = np.asarray(_round_trip(UNSIGNED_LEVELS, tiny, 4)[0])
    # (c/255)^4 has relative gaps ~4/c near small codes: the order of magnitude is kept
    assert np.all(back[1:3] > tiny[1:3] / 3) and np.all(back[1:3] < tiny[1:3] * 3)


_floats = st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False, width=32)


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, (50,), elements=_floats))
def test_round_trip_error_bound_hypothesis(x: np.ndarray) -> None:
    for name, bound, data in (
        ("signed", SIGNED_BOUND, x),
        ("unsigned", UNSIGNED_BOUND, np.abs(x)),
    ):
        back, qa = _jitted(name, 16)(jnp.asarray(data))
        per_elem = np.repeat(np.asarray(qa.absmax, np.float64), 16)[: data.size]
        err = np.abs(data.astype(np.float64) - np.asarray(back, np.float64))
        assert np.all(err <= per_elem * (bound + SLACK))


def _grads(key: jax.Array, shapes: dict[str, tuple[int, ...]]) -> dict[str, jax.Array]:
    keys = jax.random.split(key, len(shapes))
    return {
        n: jax.random.normal(k, s) * (1.0 + i)
        for i, ((n, s), k) in enumerate(zip(shapes.items(), keys, strict=True))
    }


def _rel(a: jax.Array, b: jax.Array) -> float:
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


SHAPES = {"w": (64, 96), "b": (300,), "small": (5, 3)}


def test_matches_fp32_adam_one_and_twenty_steps() -> None:
    params = {n: jnp.zeros(s) for n, s in SHAPES.items()}
    opt8 = scale_by_adam_8bit(block_size=64, min_size=100)  # "small" (15 elems) stays fp32
    ref = optax.scale_by_adam()
    s8, sr = opt8.init(params), ref.init(params)
    assert isinstance(s8.mu_q["w"], QuantizedArray) and isinstance(s8.nu_q["b"], QuantizedArray)
    assert s8.mu_q["small"].dtype == jnp.float32 and s8.mu_q["small"].shape == (5, 3)
    step8, stepr = jax.jit(opt8.update), jax.jit(ref.update)
    key = jax.random.key(0)
    for t in range(20):
        g = _grads(jax.random.fold_in(key, t), SHAPES)
        u8, s8 = step8(g, s8)
        ur, sr = stepr(g, sr)
        for n in SHAPES:
            # step 1: the update uses fp32 moments before storage, so it equals Adam's
            tol = 1e-6 if t == 0 else 2e-2
            assert _rel(u8[n], ur[n]) < tol, (t, n, _rel(u8[n], ur[n]))
            assert u8[n].dtype == g[n].dtype
    np.testing.assert_allclose(s8.mu_q["small"], sr.mu["small"], rtol=1e-5, atol=1e-7)


def test_quadratic_converges_like_fp32_adam() -> None:
    d = 4096
    scales = jnp.logspace(-2, 1, d)
    target = jax.random.normal(jax.random.key(1), (d,))

    def loss(x: jax.Array) -> jax.Array:
        return 0.5 * jnp.sum(scales * (x - target) ** 2)

    def run(tx: optax.GradientTransformation) -> float:
        x = jnp.zeros(d)
        state = tx.init(x)

        def body(carry, _):
            x, state = carry
            u, state = tx.update(jax.grad(loss)(x), state)
            return (optax.apply_updates(x, u), state), None

        (x, _), _ = jax.lax.scan(body, (x, state), None, length=300)
        return float(loss(x))

    lr = -0.05
    l0 = float(loss(jnp.zeros(d)))
    l8 = run(optax.chain(scale_by_adam_8bit(), optax.scale(lr)))
    l32 = run(optax.chain(optax.scale_by_adam(), optax.scale(lr)))
    assert l32 < 1e-2 * l0
    assert l8 < 1e-2 * l0
    assert abs(l8 - l32) < 0.1 * l32 + 1e-3 * l0, (l8, l32, l0)


def test_state_memory_formula() -> None:
    block = 256
    params = {"w": jnp.zeros((512, 1376)), "odd": jnp.zeros((1000, 7))}
    state = jax.eval_shape(scale_by_adam_8bit(block_size=block).init, params)
    fp32 = jax.eval_shape(optax.scale_by_adam().init, params)

    def nbytes(tree) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))

    n = 512 * 1376
    n_blocks = n // block  # 2752, no padding
    w8 = nbytes((state.mu_q["w"], state.nu_q["w"]))
    assert w8 == 2 * n + 8 * n_blocks == 1_431_040
    w32 = nbytes((fp32.mu["w"], fp32.nu["w"]))
    assert w32 == 8 * n
    ratio = w8 / w32
    assert ratio == pytest.approx(0.25 + 1 / block, abs=1e-12)  # 0.25390625
    odd_blocks = -(-7000 // block)  # padding to 28 blocks
    assert nbytes((state.mu_q["odd"], state.nu_q["odd"])) == 2 * odd_blocks * block + 8 * odd_blocks
    # real arrays agree with the shapes (count: 4 bytes)
    real = scale_by_adam_8bit(block_size=block).init(params)
    assert state_nbytes(real) == w8 + 2 * odd_blocks * block + 8 * odd_blocks + 4


def test_inside_scale_by_subspace_under_jit() -> None:
    shapes = {"w": (64, 128), "v": (96, 48)}
    params = {n: jnp.zeros(s) for n, s in shapes.items()}
    sub = golore_jax.Subspace(rank=8, update_every=5, scale=1.0)
    tx8 = golore_jax.scale_by_galore(scale_by_adam_8bit(block_size=64, min_size=0), sub)
    txr = golore_jax.scale_by_galore(optax.scale_by_adam(), sub)
    s8, sr = tx8.init(params), txr.init(params)
    inner = s8.inner_state
    assert inner.mu_q["w"].codes.dtype == jnp.int8  # low-rank (8, 128): 1024 = 16 blocks of 64
    assert inner.mu_q["w"].codes.shape == (16, 64)
    assert inner.nu_q["v"].codes.shape == (12, 64)  # (96, 48) projected to (96, 8): 12 blocks
    assert inner.nu_q["v"].codes.dtype == jnp.uint8
    step8, stepr = jax.jit(tx8.update), jax.jit(txr.update)
    # a fixed low-rank-dominated gradient + noise, so the SVD bases are well separated
    key = jax.random.key(3)
    base = {
        n: jax.random.normal(jax.random.fold_in(key, i), s)
        for i, (n, s) in enumerate(shapes.items())
    }
    for t in range(8):
        g = {
            n: base[n] + 0.1 * jax.random.normal(jax.random.fold_in(key, 100 + t), base[n].shape)
            for n in base
        }
        u8, s8 = step8(g, s8)
        ur, sr = stepr(g, sr)
        for n in shapes:
            assert _rel(u8[n], ur[n]) < 3e-2, (t, n, _rel(u8[n], ur[n]))
    assert bool(jnp.all(s8.inner_state.nu_q["w"].absmax > 0))


@pytest.mark.parametrize("block_size", [0, -3, 2.5, True])
def test_bad_block_size_raises(block_size) -> None:
    with pytest.raises(ValueError, match="block_size"):
        scale_by_adam_8bit(block_size=block_size)


def test_bad_min_size_raises() -> None:
    with pytest.raises(ValueError, match="min_size"):
        scale_by_adam_8bit(min_size=-1)


def test_exported() -> None:
    assert golore_jax.scale_by_adam_8bit is scale_by_adam_8bit


def test_galore_with_the_8bit_adam_inner() -> None:
    """``galore(lr, scale_by_adam_8bit())`` runs the 8-bit inner (int8/uint8 codes in the
    state) and its updates stay within 3e-2 of the fp32-moment alias on the same gradients."""
    params = {"w": jnp.zeros((128, 256))}  # low-rank (16, 256) = 4096 values: quantised
    sub = golore_jax.Subspace(rank=16, update_every=4)
    tx8 = golore_jax.galore(1e-2, golore_jax.scale_by_adam_8bit(), sub)
    txr = golore_jax.galore_adamw(1e-2, subspace=sub, weight_decay=0.0)
    s8, sr = tx8.init(params), txr.init(params)
    codes = [x for x in jax.tree_util.tree_leaves(s8) if x.dtype in (jnp.int8, jnp.uint8)]
    assert len(codes) == 2
    key = jax.random.key(0)
    base = jax.random.normal(key, (128, 8)) @ jax.random.normal(jax.random.key(1), (8, 256))
    step8, stepr = jax.jit(tx8.update), jax.jit(txr.update)
    for t in range(6):
        g = {"w": base + 0.1 * jax.random.normal(jax.random.fold_in(key, t), base.shape)}
        u8, s8 = step8(g, s8, params)
        ur, sr = stepr(g, sr, params)
        assert _rel(u8["w"], ur["w"]) < 3e-2, (t, _rel(u8["w"], ur["w"]))
