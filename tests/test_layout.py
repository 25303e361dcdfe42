"""The matrix view of a leaf: side rule and the split rule for > 2-D leaves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from golore_jax import _layout as layout


@pytest.mark.parametrize(
    ("shape", "rows", "cols"),
    [
        ((512, 8, 64), 512, 512),  # DenseGeneral query kernel (embed, heads, head_dim)
        ((8, 64, 512), 512, 512),  # output kernel (heads, head_dim, embed)
        ((3, 3, 64, 128), 576, 128),  # conv kernel (kh, kw, in, out)
        ((6, 10), 6, 10),
    ],
)
def test_most_square_split(shape, rows, cols):
    """The default split gives the matrix closest to square (the documented rule)."""
    lay = layout.make_layout(shape, 2)
    assert (lay.rows, lay.cols) == (rows, cols)


def test_side_rule():
    """m <= n projects on the left (P is m x r), m > n on the right (Q is n x r)."""
    left, square, right = (layout.make_layout(s, 3) for s in [(6, 10), (7, 7), (10, 6)])
    assert (left.side, left.basis_shape, left.low_rank_shape) == ("left", (6, 3), (3, 10))
    assert (square.side, square.basis_shape) == ("left", (7, 3))
    assert (right.side, right.basis_shape, right.low_rank_shape) == ("right", (6, 3), (10, 3))


def test_project_back_project_is_orthogonal_projection():
    """back_project(project(G)) == P P^T G (left) and G Q Q^T (right)."""
    key = jax.random.key(0)
    for shape in [(5, 9), (9, 5)]:
        lay = layout.make_layout(shape, 2)
        g = jax.random.normal(key, shape)
        basis, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(1), lay.basis_shape))
        out = layout.back_project(layout.project(g, basis, lay), basis, lay)
        expected = basis @ basis.T @ g if lay.side == "left" else g @ basis @ basis.T
        np.testing.assert_allclose(out, expected, atol=1e-5)


def test_bad_split_and_1d():
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        layout.most_square_split((5,))
    with pytest.raises(ValueError, match="out of range"):
        layout.make_layout((4, 5), 2, split=2)
