"""How a subspace transform stores its bases: fp32, bf16, or INT4 with block scales.

``scale_by_subspace(basis_dtype=...)`` keeps each ``(d, r)`` basis in the state as

* ``None`` / ``jnp.float32``: fp32, as decomposed;
* ``jnp.bfloat16`` (or ``jnp.float16``): rounded to nearest (halves the bytes);
* ``"int4"``: an :class:`Int4Basis`, 4-bit codes packed two a byte with an fp32 scale per
  block of :data:`INT4_BLOCK` rows of one column (about 0.56 bytes an entry, 1/7 of fp32).

Every use (the projections ``P^T G`` and ``P N``, the moment rotation at a refresh, the next
refresh's ``previous``) reads the basis back as fp32 through :func:`load_basis`; a refresh
decomposes in fp32 and stores its result with :func:`store_basis`.

INT4 code. Block ``b`` of column ``j`` (rows ``64 b .. 64 b + 63``) has the scale
``s = max |P[rows, j]| / 7``; each entry is stored as ``q = round(P / s)`` in ``[-7, 7]``
(symmetric: a basis's entries have no preferred sign, and a column's sign is arbitrary), and
read back as ``q s``. Rounding to nearest bounds every entry's error by half a step:

    |decode(encode(P)) - P| <= s / 2 = absmax_of_its_block / 14      (elementwise),
    ||decode(encode(P)) - P||_F <= (1/2) sqrt(sum over blocks of rows_in_block * s^2).

A block of 64 rows: a column of an orthonormal basis has entries of size ~1/sqrt(d) with a
few larger ones (the directions a gradient concentrates on); a scale per 64 entries follows
them, where one scale per column (absmax over all ``d`` rows) would make the step, hence the
error, as large as the column's largest entry everywhere (for Gaussian-like columns the
absmax of 4096 entries is ~1.6x that of 64). The scales cost 4 bytes per 64 entries, 1/8 of
the codes' bytes. Blocks run along ``d`` inside one column, so a basis sharded on its rows
(like its param) keeps each block on one device when the shard size is a multiple of 64.

Orthonormality. The decoded ``P~ = P + E`` is not exactly orthonormal, and nothing restores
it (a QR at every step would cost ``O(d r^2)`` per matrix per step): the step is the fp32-basis
step with ``P~`` in place of ``P``. ``P~ P~^T`` is still positive semi-definite, so the
projected gradient ``P~ P~^T G`` is still a descent direction (``<G, P~ P~^T G> =
||P~^T G||^2 >= 0``); what changes is the subspace and its scale, by
``||P~ P~^T - P P^T||_2 <= 2 ||E||_2 + ||E||_2^2``. For a column whose entries are spread
evenly the rounding error is about ``s / sqrt(12)`` an entry, a relative Frobenius error of
roughly 10% (measured in tests/test_int4_bases.py).

>>> import jax.numpy as jnp
>>> p = jnp.eye(4, 2)
>>> q = store_basis(p, "int4")
>>> q.codes.dtype.name, q.codes.shape, q.scales.shape, basis_shape(q)
('uint8', (4, 1), (1, 2), (4, 2))
>>> bool(jnp.array_equal(load_basis(q), p))
True
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

INT4 = "int4"
INT4_BLOCK = 64  # rows of one column sharing a scale
INT4_LEVELS = 7  # codes q in [-7, 7]: symmetric, -8 unused
_OFFSET = 8  # a nibble holds q + 8 in [1, 15]


class Int4Basis(NamedTuple):
    """A ``(d, r)`` basis in 4 bits.

    Attributes:
      codes: ``(d, ceil(r / 2))`` uint8; column ``2k`` in the low nibble, ``2k + 1`` in the
        high one, each as ``q + 8`` with ``q`` in ``[-7, 7]`` (an odd ``r`` pads a zero code).
      scales: ``(ceil(d / 64), r)`` fp32; ``max |P|`` of each block of 64 rows of a column / 7.
    """

    codes: jax.Array
    scales: jax.Array


def is_int4(basis_dtype: Any) -> bool:
    return isinstance(basis_dtype, str) and basis_dtype == INT4


def storage_of(basis_dtype: Any) -> Any:
    """What ``basis_dtype`` stores: ``"int4"``, or a float dtype (None: float32)."""
    if is_int4(basis_dtype):
        return INT4
    return jnp.dtype(jnp.float32 if basis_dtype is None else basis_dtype)


def encode_int4(p: jax.Array) -> Int4Basis:
    """``p`` (``(d, r)``) in 4 bits with a scale per :data:`INT4_BLOCK` rows of a column."""
    d, r = p.shape
    block = INT4_BLOCK
    n_blocks = -(-d // block)
    p = p.astype(jnp.float32)
    blocks = jnp.pad(p, ((0, n_blocks * block - d), (0, 0))).reshape(n_blocks, block, r)
    scales = jnp.max(jnp.abs(blocks), axis=1) / INT4_LEVELS
    safe = jnp.where(scales > 0, scales, 1.0)
    q = jnp.clip(jnp.round(blocks / safe[:, None, :]), -INT4_LEVELS, INT4_LEVELS)
    nibbles = (q.reshape(n_blocks * block, r)[:d] + _OFFSET).astype(jnp.uint8)
    if r % 2:
        nibbles = jnp.pad(nibbles, ((0, 0), (0, 1)), constant_values=_OFFSET)
    codes = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    return Int4Basis(codes=codes, scales=scales)


def decode_int4(basis: Int4Basis) -> jax.Array:
    """The fp32 ``(d, r)`` basis ``q s`` of :func:`encode_int4`'s output."""
    codes, scales = basis.codes, basis.scales
    d, r = codes.shape[0], scales.shape[1]
    n_blocks, block = scales.shape[0], INT4_BLOCK
    low = (codes & 15).astype(jnp.float32) - _OFFSET
    high = (codes >> 4).astype(jnp.float32) - _OFFSET
    q = jnp.stack([low, high], axis=-1).reshape(d, -1)[:, :r]
    q = jnp.pad(q, ((0, n_blocks * block - d), (0, 0))).reshape(n_blocks, block, r)
    return (q * scales[:, None, :]).reshape(n_blocks * block, r)[:d]


def store_basis(p: jax.Array, storage: Any) -> Any:
    """``p`` (fp32) as the state keeps it under ``storage`` (:func:`storage_of`)."""
    return encode_int4(p) if is_int4(storage) else p.astype(storage)


def load_basis(basis: Any, dtype: Any = jnp.float32) -> jax.Array:
    """A stored basis back in ``dtype`` (fp32: exact for fp32 / bf16 storage; an INT4 basis
    is decoded in fp32, then cast)."""
    if isinstance(basis, Int4Basis):
        return decode_int4(basis).astype(dtype)
    return jnp.asarray(basis).astype(dtype)


def float_bases(bases: Any, dtype: Any = jnp.float32) -> Any:
    """A state's ``bases`` tree (``ScaleBySubspaceState.bases``) with every basis a ``dtype``
    array, whichever ``Execution.basis_dtype`` stored it (an INT4 basis decoded).

    >>> import jax.numpy as jnp
    >>> p = jnp.eye(4, 2)
    >>> stored = {"w": encode_int4(p), "v": p.astype(jnp.bfloat16)}
    >>> bases = float_bases(stored)
    >>> bases["w"].dtype.name, bool(jnp.all(bases["w"] == p)), bases["v"].dtype.name
    ('float32', True, 'float32')
    """
    return jax.tree_util.tree_map(
        lambda b: load_basis(b, dtype), bases, is_leaf=lambda b: isinstance(b, Int4Basis)
    )


def for_use(bases: list[Any], dtype: Any = jnp.float32) -> list[Any]:
    """INT4 bases decoded to ``dtype`` for the projection matmuls; other entries as they are
    (a float basis is cast by the matmul itself, so its program is unchanged)."""
    return [load_basis(b, dtype) if isinstance(b, Int4Basis) else b for b in bases]


def int4_specs(basis_spec: Any, d: int, mesh_axis_sizes: Mapping[str, int] | None) -> Int4Basis:
    """Partition specs of an :class:`Int4Basis` whose ``(d, r)`` basis has ``basis_spec``
    (``PartitionSpec(rows, None)``): the codes take it (their rows are the basis's rows); the
    scales take the rows' mesh axes only where each device's rows are whole blocks (``d`` a
    multiple of 64 times those axes' size), so a device holds the scales of its own rows,
    and are replicated otherwise (1/16 of an fp32 basis)."""
    entry = next(iter(basis_spec), None)
    aligned = False
    if entry is not None and mesh_axis_sizes is not None:
        axes = (entry,) if isinstance(entry, str) else tuple(entry)
        aligned = d % (INT4_BLOCK * math.prod(mesh_axis_sizes[a] for a in axes)) == 0
    return Int4Basis(codes=basis_spec, scales=type(basis_spec)(entry if aligned else None, None))


def zero_basis(shape: tuple[int, int], storage: Any) -> Any:
    """The ``(d, r)`` zero basis (before the first refresh) under ``storage``."""
    return store_basis(jnp.zeros(shape, jnp.float32), storage)


def basis_shape(basis: Any) -> tuple[int, int]:
    """The ``(d, r)`` shape of a stored basis (an array, its shape struct, or an Int4Basis)."""
    if isinstance(basis, Int4Basis):
        return (int(basis.codes.shape[-2]), int(basis.scales.shape[-1]))
    return tuple(int(n) for n in basis.shape[-2:])


def basis_nbytes(shape: tuple[int, int], storage: Any) -> int:
    """Bytes of one stored ``(d, r)`` basis (closed form).

    >>> basis_nbytes((4096, 1024), "int4") / (4096 * 1024)  # bytes an entry: 1/2 + 4/64
    0.5625
    """
    d, r = shape
    if is_int4(storage):
        return d * math.ceil(r / 2) + 4 * math.ceil(d / INT4_BLOCK) * r
    return d * r * np.dtype(storage).itemsize
