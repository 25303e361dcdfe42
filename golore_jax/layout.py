"""How a parameter leaf is seen as a matrix, and which side of it is projected.

The paper (He et al. 2024, arXiv 2410.11289, Algorithm 1) works on an ``m x n`` matrix ``G``:
if ``m <= n`` it projects on the left, ``R = P^T G`` with ``P`` of shape ``m x r``; otherwise on
the right, ``R = G Q`` with ``Q`` of shape ``n x r``. The smaller dimension is always the one
that is compressed, so the optimizer state lives on ``r x n`` (or ``m x r``).

We follow the paper's rule on the array as it is stored. Flax kernels are stored ``(in, out)``,
the transpose of PyTorch's ``(out, in)``; for a square kernel the paper's rule therefore projects
the input dimension, which is what GaLore's code does on PyTorch's layout (it sends square
matrices to the right). For non-square kernels both conventions compress the same dimension.

Leaves with more than two dimensions are flattened to a matrix by splitting their axes into
``shape[:k]`` (rows) and ``shape[k:]`` (columns). The default ``k`` is the split that makes the
matrix closest to square (earliest split on ties): a Flax ``DenseGeneral`` query kernel
``(embed, heads, head_dim)`` becomes ``(embed, heads*head_dim)``, an output kernel
``(heads, head_dim, embed)`` becomes ``(heads*head_dim, embed)`` and a convolution kernel
``(kh, kw, in, out)`` becomes ``(kh*kw*in, out)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

LEFT = "left"
RIGHT = "right"


class MatrixLayout(NamedTuple):
    """Static description of one projected leaf (not a pytree leaf: it never enters jit)."""

    shape: tuple[int, ...]  # the leaf's own shape
    rows: int  # m
    cols: int  # n
    side: str  # LEFT (m <= n) or RIGHT (m > n)
    rank: int  # r

    @property
    def projected_dim(self) -> int:
        """The dimension that is compressed (m on the left, n on the right)."""
        return self.rows if self.side == LEFT else self.cols

    @property
    def basis_shape(self) -> tuple[int, int]:
        """Shape of the orthonormal basis: ``(m, r)`` for P or ``(n, r)`` for Q."""
        return (self.projected_dim, self.rank)

    @property
    def low_rank_shape(self) -> tuple[int, int]:
        """Shape of ``R``: ``(r, n)`` on the left, ``(m, r)`` on the right."""
        return (self.rank, self.cols) if self.side == LEFT else (self.rows, self.rank)


def most_square_split(shape: Sequence[int]) -> int:
    """Axis index ``k`` such that ``(prod(shape[:k]), prod(shape[k:]))`` is closest to square."""
    if len(shape) < 2:
        raise ValueError(f"a matrix needs at least 2 dimensions, got shape {tuple(shape)}")
    best_k, best_ratio = 1, math.inf
    for k in range(1, len(shape)):
        rows, cols = math.prod(shape[:k]), math.prod(shape[k:])
        ratio = max(rows, cols) / max(min(rows, cols), 1)
        if ratio < best_ratio:
            best_k, best_ratio = k, ratio
    return best_k


def make_layout(shape: Sequence[int], rank: int, split: int | None = None) -> MatrixLayout:
    """Builds the layout of a leaf of ``shape`` projected to ``rank``.

    Args:
      shape: the leaf's shape (at least 2 dimensions).
      rank: the subspace rank ``r``.
      split: rows are ``shape[:split]``; ``None`` picks :func:`most_square_split`.
    """
    shape = tuple(int(d) for d in shape)
    k = most_square_split(shape) if split is None else split
    if not 1 <= k < len(shape):
        raise ValueError(f"split {k} is out of range for a leaf of shape {shape}")
    rows, cols = math.prod(shape[:k]), math.prod(shape[k:])
    side = LEFT if rows <= cols else RIGHT
    return MatrixLayout(shape, rows, cols, side, int(rank))


def as_matrix(x: jax.Array, layout: MatrixLayout) -> jax.Array:
    return x.reshape(layout.rows, layout.cols)


def projected_rows(g: jax.Array, layout: MatrixLayout) -> jax.Array:
    """The matrix whose rows are the projected dimension (``G`` or ``G^T``); projectors see this."""
    return g if layout.side == LEFT else g.T


def _matmul(a: jax.Array, b: jax.Array, dtype: Any) -> jax.Array:
    """``a @ b`` with operands in ``dtype`` (None: as given), accumulated and returned in fp32."""
    if dtype is not None:
        a, b = a.astype(dtype), b.astype(dtype)
    return jnp.matmul(a, b, preferred_element_type=jnp.float32)


def project(g: jax.Array, basis: jax.Array, layout: MatrixLayout, dtype: Any = None) -> jax.Array:
    """``R = P^T G`` on the left, ``R = G Q`` on the right (Algorithm 1); operands in ``dtype``
    (None: as given), result in fp32."""
    return _matmul(basis.T, g, dtype) if layout.side == LEFT else _matmul(g, basis, dtype)


def back_project(
    n: jax.Array, basis: jax.Array, layout: MatrixLayout, dtype: Any = None
) -> jax.Array:
    """``P N`` on the left, ``N Q^T`` on the right, reshaped to the leaf's shape; operands in
    ``dtype`` (None: as given), result in fp32."""
    full = _matmul(basis, n, dtype) if layout.side == LEFT else _matmul(n, basis.T, dtype)
    return full.reshape(layout.shape)


def rotate_first_moment(m: jax.Array, change: jax.Array, layout: MatrixLayout) -> jax.Array:
    """Carries a low-rank moment into a new subspace (equation (2) of the paper).

    ``change = P_new^T P_old`` (``r x r``). Left: ``M <- C M``; right: ``M <- M C^T``
    (``= M Q_old^T Q_new``).
    """
    return change @ m if layout.side == LEFT else m @ change.T


def rotate_second_moment(v: jax.Array, change: jax.Array, layout: MatrixLayout) -> jax.Array:
    """Carries an elementwise second moment into a new subspace.

    If the old coordinates were independent with variances ``v``, the new coordinate
    ``sum_k C[i, k] x_k`` has variance ``sum_k C[i, k]^2 v_k``: we apply ``C * C`` in place of
    ``C``. This keeps ``v >= 0``, is exact when the bases share directions (``C`` a signed
    permutation), and reduces to no change when the subspace does not move.
    """
    squared = jnp.square(change)
    return squared @ v if layout.side == LEFT else v @ squared.T
