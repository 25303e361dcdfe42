"""INT4 bases: scale_by_subspace(basis_dtype="int4"), golore_jax/_basis_storage.py."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import golore_jax as gl
from golore_jax import _basis_storage as bs
from golore_jax._memory import optimizer_state_bytes, subspace_basis_bytes
from golore_jax._subspace import scale_by_subspace
from golore_jax.partitioning import state_partition_specs

# Error model of one round trip in fp32: q = round(x / s) with x / s carrying a relative error
# <= 2^-24 (|x / s| <= 7, so an absolute error <= 7 * 2^-24 before rounding), and q * s a
# relative error <= 2^-24 of |q s| <= 7 s: |x - q s| <= s (1/2 + 14 * 2^-24) < s (1/2 + 2^-20).
ROUNDING_SLACK = 2.0**-20


def _haar(key, d, r):
    q, _ = jnp.linalg.qr(jax.random.normal(key, (d, r)))
    return q


def _block_scales(p: np.ndarray) -> np.ndarray:
    """Per entry, its block's absmax / 7 (numpy reference of the code's scales)."""
    out = np.empty_like(p)
    for start in range(0, p.shape[0], bs.INT4_BLOCK):
        rows = slice(start, start + bs.INT4_BLOCK)
        out[rows] = np.max(np.abs(p[rows]), axis=0) / 7.0
    return out


@pytest.mark.parametrize("shape", [(200, 7), (128, 8), (64, 1)])
def test_round_trip_error_is_at_most_half_a_step(shape):
    """Every entry within s/2 of its block's step s = absmax/7 (plus fp32 rounding, above);
    the Frobenius error within (1/2) sqrt(sum over blocks of rows * s^2). d = 200 leaves a
    partial block and r = 7 an odd column (a padded nibble)."""
    d, r = shape
    p = np.array(_haar(jax.random.key(d + r), d, r))
    p[3, 0] = 0.9  # a spike: its block's step is large, the other blocks' are not
    q = bs.encode_int4(jnp.asarray(p))
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (d, math.ceil(r / 2))
    assert q.scales.shape == (math.ceil(d / 64), r)
    back = np.asarray(bs.decode_int4(q))
    # XLA may divide by 7 as a multiplication by 1/7: a scale within 1 ulp of numpy's.
    np.testing.assert_allclose(np.asarray(q.scales), _block_scales(p)[::64], rtol=2.0**-22)
    step = np.repeat(np.asarray(q.scales), 64, axis=0)[:d]
    error = np.abs(back - p)
    assert np.all(error <= step * (0.5 + ROUNDING_SLACK))
    frobenius_bound = 0.5 * math.sqrt(float(np.sum(step.astype(np.float64) ** 2)))
    assert np.linalg.norm(back - p) <= frobenius_bound * (1 + 2 * ROUNDING_SLACK)
    # Codes stay in [-7, 7]: nibbles 1..15, never 0 (no -8).
    nibbles = np.concatenate([np.asarray(q.codes) & 15, np.asarray(q.codes) >> 4], axis=1)
    assert nibbles.min() >= 1 and nibbles.max() <= 15


def test_round_trip_error_follows_the_uniform_rounding_model():
    """A Haar basis (512 x 64): entries away from their block's absmax round with an error
    uniform on [-s/2, s/2], so E||E||_F^2 = sum s^2 / 12 over those entries (the absmax entry
    of each block, 1 in 64, is exact). With 32,704 such entries the ratio of the measured to
    the modelled squared error has a standard deviation of sqrt(0.8 / 32704) ~ 0.5%: +-5%
    is 10 of them. The relative Frobenius error is what a user gets: ~10%."""
    p = np.asarray(_haar(jax.random.key(0), 512, 64), np.float64)
    back = np.asarray(bs.decode_int4(bs.encode_int4(jnp.asarray(p, jnp.float32))), np.float64)
    step = _block_scales(p)
    exact = np.abs(np.abs(p) - 7.0 * step) < 1e-12  # the block's absmax entries
    modelled = np.sum(step[~exact] ** 2) / 12.0
    measured = np.sum((back - p) ** 2)
    assert abs(measured / modelled - 1.0) < 0.05, measured / modelled
    relative = math.sqrt(measured) / np.linalg.norm(p)
    assert 0.05 < relative < 0.15, relative


def test_exact_values_round_trip_exactly_and_zero_is_zero():
    p = jnp.asarray(np.kron(np.eye(3), np.ones((2, 1))) * np.array([1.0, -0.5, 0.25]))  # 6 x 3
    np.testing.assert_array_equal(bs.load_basis(bs.store_basis(p, "int4")), p)
    zero = bs.zero_basis((70, 5), "int4")
    np.testing.assert_array_equal(bs.load_basis(zero), np.zeros((70, 5), np.float32))


def _problem():
    params = {
        "a": jnp.zeros((24, 80)),  # left: P is 24 x 6
        "b": jnp.zeros((80, 24)),  # right: Q is 24 x 6
        "norm": jnp.zeros((24,)),
    }
    leaves, treedef = jax.tree.flatten(params)

    def grads(step):
        return treedef.unflatten(
            [
                jax.random.normal(jax.random.fold_in(jax.random.key(i), step), p.shape)
                for i, p in enumerate(leaves)
            ]
        )

    return params, grads


def _transform(basis_dtype, **kwargs):
    return scale_by_subspace(
        optax.scale_by_adam(),
        rank=6,
        update_every=3,
        projector=gl.projectors.gram_eigh(),
        basis_dtype=basis_dtype,
        **kwargs,
    )


@pytest.mark.parametrize(
    "rotation", [{}, {"momentum_projection": True, "second_moment": "project"}]
)
def test_int4_step_is_the_fp32_step_with_the_decoded_basis(rotation):
    """Between refreshes the INT4 step equals, bit for bit, the fp32-basis step whose bases are
    the decoded INT4 ones, and a refresh stores encode(the fp32 refresh's basis)."""
    params, grads = _problem()
    low, full = _transform("int4", **rotation), _transform(None, **rotation)
    low_state = low.init(params)
    assert isinstance(low_state.bases["a"], bs.Int4Basis)
    low_update, full_update = jax.jit(low.update), jax.jit(full.update)
    for step in range(5):  # refreshes at steps 0 and 3
        decoded = jax.tree.map(
            bs.load_basis, low_state.bases, is_leaf=lambda b: isinstance(b, bs.Int4Basis)
        )
        full_state = low_state._replace(bases=decoded)
        u_low, low_state = low_update(grads(step), low_state, params)
        u_full, full_state = full_update(grads(step), full_state, params)
        if step % 3 == 0:
            for name in ("a", "b"):
                expected = bs.encode_int4(full_state.bases[name])
                np.testing.assert_array_equal(low_state.bases[name].codes, expected.codes)
                np.testing.assert_array_equal(low_state.bases[name].scales, expected.scales)
            continue  # the fp32 update used the unrounded new basis
        for name in params:
            np.testing.assert_array_equal(np.asarray(u_low[name]), np.asarray(u_full[name]))
    assert float(jnp.abs(u_low["a"]).max()) > 1e-4


def test_int4_bases_bytes_measured_and_closed_form():
    """The state's basis bytes equal subspace_basis_bytes; INT4 is d*ceil(r/2) + 4*ceil(d/64)*r
    bytes a basis (under 1/7 of fp32 here, 1/7.1 at LLaMA-7B's 4096 x 1024)."""
    params, _ = _problem()
    sizes = {}
    for dtype in (None, jnp.bfloat16, "int4"):
        state = jax.eval_shape(_transform(dtype).init, params)
        measured = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state.bases))
        assert measured == subspace_basis_bytes(params, rank=6, basis_dtype=dtype)
        sizes[str(dtype)] = measured
    assert sizes["None"] == 2 * 24 * 6 * 4
    assert sizes["int4"] == 2 * (24 * 3 + 4 * 1 * 6)
    real = _transform("int4").init(params)
    assert optimizer_state_bytes(real.bases) == sizes["int4"]
    assert bs.basis_nbytes((4096, 1024), "int4") * 7 < bs.basis_nbytes((4096, 1024), jnp.float32)


def test_int4_partition_specs():
    """Codes take the fp32 basis's spec; scales the same rows' axes where every device holds
    whole 64-row blocks, else replicated."""
    params = {
        "w": jax.ShapeDtypeStruct((256, 512), jnp.float32),  # P: 256 x 4, blocks of 64: 4
        "v": jax.ShapeDtypeStruct((96, 512), jnp.float32),  # P: 96 x 4: 2 blocks, 48 rows each
    }
    specs = {"w": P("x", "y"), "v": P("x", "y")}
    state = jax.eval_shape(
        scale_by_subspace(optax.scale_by_adam(), rank=4, update_every=2, basis_dtype="int4").init,
        params,
    )
    got = state_partition_specs(state, params, specs, {"x": 2, "y": 2})
    assert got.bases["w"] == bs.Int4Basis(codes=P("x", None), scales=P("x", None))
    assert got.bases["v"] == bs.Int4Basis(codes=P("x", None), scales=P(None, None))
    assert got.inner_state.mu["w"] == P("x", "y")  # the low-rank moments as for fp32 bases
    # without the mesh sizes nothing says the blocks align: scales replicated
    bare = state_partition_specs(state, params, specs)
    assert bare.bases["w"] == bs.Int4Basis(codes=P("x", None), scales=P(None, None))


def test_orbax_round_trip_resumes_exactly(tmp_path):
    """StandardCheckpointer saves the uint8 codes and fp32 scales as they are; three more
    steps (one a refresh) from the restored state equal those from the saved one."""
    ocp = pytest.importorskip("orbax.checkpoint")
    params, grads = _problem()
    tx = _transform("int4", lazy_refresh=gl.LazyRefresh(0.1, patience=1), momentum_projection=True)
    update = jax.jit(tx.update)
    state = tx.init(params)
    for step in range(4):
        _, state = update(grads(step), state, params)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "state", state)
        ckpt.wait_until_finished()
        restored = ckpt.restore(tmp_path / "state", state)
    assert restored.bases["a"].codes.dtype == jnp.uint8
    outs = []
    for s in (state, restored):
        for step in range(4, 7):
            u, s = update(grads(step), s, params)
        outs.append(jax.tree.map(np.asarray, (u, s.bases, s.lazy, s.inner_state)))
    jax.tree.map(np.testing.assert_array_equal, outs[0], outs[1])


def test_bad_basis_dtype_names_int4():
    with pytest.raises(ValueError, match=r"basis_dtype must be one of .*'int4' or None"):
        scale_by_subspace(optax.identity(), rank=2, update_every=1, basis_dtype="int8")
