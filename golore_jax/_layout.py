"""How a parameter leaf is seen as a matrix, and which side of it is projected.

The paper (He et al. 2024, arXiv 2410.11289, Algorithm 1) works on an ``m x n`` matrix ``G``:
if ``m <= n`` it projects on the left, ``R = P^T G`` with ``P`` of shape ``m x r``; otherwise on
the right, ``R = G Q`` with ``Q`` of shape ``n x r``. The smaller dimension is always the one
that is compressed, so the optimizer state lives on ``r x n`` (or ``m x r``).

Which side is projected is a choice (``side`` of :func:`make_layout`, :data:`SIDE_RULES`):

* ``"gradient"`` (default): the paper's and GaLore's rule above, compress the smaller dimension;
* ``"state"``: the side whose basis plus inner-optimizer moments hold fewer floats
  (:func:`state_floats`). With ``k`` moments per element (Adam: 2) the left side holds
  ``r (m + k n)`` floats and the right side ``r (n + k m)``; for ``k > 1`` that compresses the
  LARGER dimension, which is ``optax.contrib.galore``'s choice (left when ``m >= n``). Ties go
  to the ``"gradient"`` side, so for ``k <= 1`` it is the ``"gradient"`` rule;
* ``"left"`` / ``"right"``: always that side.

The ``"gradient"`` rule is applied to the array as it is stored. Flax kernels are stored
``(in, out)``, the transpose of PyTorch's ``(out, in)``; for a square kernel the paper's rule
therefore projects the input dimension, which is what GaLore's code does on PyTorch's layout (it
sends square matrices to the right). For non-square kernels both conventions compress the same
dimension. ``optax.contrib.galore`` sends square matrices to the left, as the ``"gradient"``
rule does on the stored array.

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
SIDE_RULES = ("gradient", "state", LEFT, RIGHT)


class MatrixLayout(NamedTuple):
    """Static description of one projected leaf (not a pytree leaf: it never enters jit): the
    leaf seen as an ``m x n`` matrix, the side projected and the rank, as :func:`make_layout`
    and ``golore_jax.subspace_layouts`` give it."""

    shape: tuple[int, ...]  # the leaf's own shape
    rows: int  # m
    cols: int  # n
    side: str  # LEFT (P is m x r) or RIGHT (Q is n x r), chosen by a side rule
    rank: int  # r

    def state_floats(self, moments: int, basis_moments: int = 0) -> int:
        """:func:`state_floats` of this layout."""
        return state_floats(self.rows, self.cols, self.rank, self.side, moments, basis_moments)

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


def state_floats(
    rows: int, cols: int, rank: int, side: str, moments: int, basis_moments: int = 0
) -> int:
    """Floats held for one projected ``rows x cols`` leaf: the basis (``m r`` on the left,
    ``n r`` on the right) plus ``moments`` low-rank moments (``r n`` each on the left, ``m r``
    on the right); ``moments`` is 2 for Adam, 1 for momentum SGD, 0 for plain SGD.
    ``basis_moments``: moments of an optimizer of the basis itself (Online Subspace Descent)."""
    if side == LEFT:
        return (1 + basis_moments) * rank * rows + moments * rank * cols
    if side == RIGHT:
        return (1 + basis_moments) * rank * cols + moments * rows * rank
    raise ValueError(f"side must be {LEFT!r} or {RIGHT!r}, got {side!r}")


def check_side_rule(side: str, where: str) -> None:
    """A one-line error naming ``where`` unless ``side`` is one of :data:`SIDE_RULES`."""
    if side not in SIDE_RULES:
        raise ValueError(f"{where}: side must be one of {SIDE_RULES}, got {side!r}")


def choose_side(
    rows: int, cols: int, rule: str = "gradient", moments: int = 2, basis_moments: int = 0
) -> str:
    """The side a ``rows x cols`` matrix is projected on under ``rule`` (see the module doc);
    ``"state"`` reads ``moments`` and ``basis_moments`` (see :func:`state_floats`)."""
    check_side_rule(rule, "choose_side")
    if rule in (LEFT, RIGHT):
        return rule
    by_gradient = LEFT if rows <= cols else RIGHT
    if rule == "gradient":
        return by_gradient
    left = state_floats(rows, cols, 1, LEFT, moments, basis_moments)
    right = state_floats(rows, cols, 1, RIGHT, moments, basis_moments)
    return by_gradient if left == right else (LEFT if left < right else RIGHT)


def make_layout(
    shape: Sequence[int],
    rank: int,
    split: int | None = None,
    side: str = "gradient",
    moments: int = 2,
    basis_moments: int = 0,
) -> MatrixLayout:
    """Builds the layout of a leaf of ``shape`` projected to ``rank``.

    Args:
      shape: the leaf's shape (at least 2 dimensions).
      rank: the subspace rank ``r``.
      split: rows are ``shape[:split]``; ``None`` picks :func:`most_square_split`.
      side: the side rule (:data:`SIDE_RULES`): ``"gradient"``, ``"state"``, ``"left"`` or
        ``"right"`` (see :func:`choose_side`).
      moments, basis_moments: read by ``"state"``, see :func:`state_floats`.

    >>> lay = make_layout((8, 2, 3), rank=2)  # seen as 8 x 6; the smaller side is projected
    >>> lay.rows, lay.cols, lay.side, lay.basis_shape, lay.low_rank_shape
    (8, 6, 'right', (6, 2), (8, 2))
    """
    shape = tuple(int(d) for d in shape)
    k = most_square_split(shape) if split is None else split
    if not 1 <= k < len(shape):
        raise ValueError(f"split {k} is out of range for a leaf of shape {shape}")
    rows, cols = math.prod(shape[:k]), math.prod(shape[k:])
    return MatrixLayout(
        shape, rows, cols, choose_side(rows, cols, side, moments, basis_moments), int(rank)
    )


def as_matrix(x: jax.Array, layout: MatrixLayout) -> jax.Array:
    return x.reshape(layout.rows, layout.cols)


def projected_rows(g: jax.Array, layout: MatrixLayout) -> jax.Array:
    """The matrix whose rows are the projected dimension (``G`` or ``G^T``); projectors see this."""
    return g if layout.side == LEFT else g.T


def _matmul(a: jax.Array, b: jax.Array, dtype: Any, out_sharding: Any = None) -> jax.Array:
    """``a @ b`` with operands in ``dtype`` (None: as given), accumulated and returned in fp32;
    ``out_sharding`` names the result's sharding on a mesh with Explicit axes (needed when the
    contracting dims are sharded)."""
    if dtype is not None:
        a, b = a.astype(dtype), b.astype(dtype)
    if out_sharding is None:
        return jnp.matmul(a, b, preferred_element_type=jnp.float32)
    return jnp.matmul(a, b, preferred_element_type=jnp.float32, out_sharding=out_sharding)


def project(
    g: jax.Array,
    basis: jax.Array,
    layout: MatrixLayout,
    dtype: Any = None,
    out_sharding: Any = None,
) -> jax.Array:
    """``R = P^T G`` on the left, ``R = G Q`` on the right (Algorithm 1); operands in ``dtype``
    (None: as given), result in fp32 (with ``out_sharding`` on an Explicit mesh)."""
    if layout.side == LEFT:
        return _matmul(basis.T, g, dtype, out_sharding)
    return _matmul(g, basis, dtype, out_sharding)


def back_project(
    n: jax.Array,
    basis: jax.Array,
    layout: MatrixLayout,
    dtype: Any = None,
    out_sharding: Any = None,
) -> jax.Array:
    """``P N`` on the left, ``N Q^T`` on the right, reshaped to the leaf's shape; operands in
    ``dtype`` (None: as given), result in fp32. ``out_sharding`` (Explicit meshes): the
    sharding of the ``rows x cols`` product, for a 2-D leaf the param's."""
    if layout.side == LEFT:
        full = _matmul(basis, n, dtype, out_sharding)
    else:
        full = _matmul(n, basis.T, dtype, out_sharding)
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
