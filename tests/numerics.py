"""Comparisons that hold on any CPU: what a computation determines, at tolerances from an
error model, instead of elementwise compares of quantities a rounding difference can move
far (a basis of a near-degenerate spectrum, Adam's update of an element whose gradient is
cancellation-small).

The model used by the tests:

* fp32 gradient rounding. A gradient entry is a sum over the batch's tokens and a hidden
  dimension; two programs that sum in another order (another fusion, LLVM's vectorised
  loops, Eigen's blocking, which follows the host's cache sizes, or its thread count) differ
  by about ``sqrt(n) * u`` relative to the terms summed, ``u = 2**-24``: ``GRAD_RTOL = 1e-6``
  for the few hundred terms of the tiny models here. Carried through a few steps (each
  step's params feed the next step's gradient, Adam divides by small RMS values) it grows by
  a factor no bound here predicts: ``CARRIED_RTOL = 1e-3`` after the 5-8 steps of a test,
  15x the largest measured (6.5e-5: the final norm's scale, GoLore with MSGD over 8 steps
  on the ReLoRA path, LLVM opt level 1).
* Davis-Kahan / Wedin: a perturbation ``E`` of a matrix moves the span of its top ``r``
  singular vectors by ``sin(theta) <= ||E|| / (sigma_r - sigma_{r+1})`` and each single
  vector by ``||E||`` over the gaps to its neighbours. An elementwise (Adam) inner optimizer
  is not invariant to a rotation inside the subspace, so at each refresh its update moves by
  ``GRAD_RTOL`` over the smallest relative gap among the top ``r + 1`` singular values.
"""

from __future__ import annotations

import jax
import numpy as np

GRAD_RTOL = 1e-6  # relative fp32 rounding of a gradient summed in another order
CARRIED_RTOL = 1e-3  # that rounding carried through a test's 5-8 steps (measured: 6.5e-5)


def update_rtol(gap: float | None = None, refreshes: int = 0) -> float:
    """Relative error of a leaf's total update over a few steps: the rounding carried through
    the steps, plus, for each refresh whose decomposition reads the gradient, a basis rotation
    of ``GRAD_RTOL / gap`` (Davis-Kahan, ``gap`` the smallest relative gap among the top
    ``r + 1`` singular values); ``gap=None`` for a projector that reads no gradient (GoLore's
    random draws)."""
    return CARRIED_RTOL + (0.0 if gap is None else refreshes * GRAD_RTOL / gap)


def relative_gaps(matrix, rank: int) -> np.ndarray:
    """``(sigma_i - sigma_{i+1}) / sigma_1`` for ``i = 1..rank`` of a 2-D matrix (float64)."""
    s = np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)[: rank + 1]
    return -np.diff(s) / s[0]


def min_relative_gap(matrices, rank: int) -> float:
    """The smallest relative gap among the top ``rank + 1`` singular values of every matrix
    in ``matrices`` (arrays of >= 2 dims; leading axes are a stack of matrices)."""
    gaps = []
    for m in matrices:
        m = np.asarray(m, np.float64)
        for matrix in m.reshape((-1, *m.shape[-2:])):
            gaps.append(relative_gaps(matrix, rank).min())
    return float(min(gaps))


def projection(basis) -> np.ndarray:
    """``P P^T`` of an orthonormal ``(d, r)`` basis: the subspace, free of sign and rotation."""
    b = np.asarray(basis, np.float64)
    return b @ b.swapaxes(-1, -2)


def assert_updates_close(got, want, start, rtol: float) -> None:
    """Per leaf, the RMS of ``got - want`` is at most ``rtol`` times the larger of the RMS of
    the leaf's update ``want - start`` and the RMS update of all leaves together.

    Not elementwise: Adam divides each element's moment by its own RMS, so an element whose
    gradient is cancellation-small moves far while its leaf barely does. The floor: a leaf's
    gradient rounds relative to the terms it sums, not to itself; where those cancel (a k_proj
    near initialisation, attention logits near zero) its update is small and its rounding is
    relative to the model's typical update instead."""
    leaves = jax.tree_util.tree_leaves_with_path(want)
    got_leaves = jax.tree_util.tree_leaves(got)
    start_leaves = jax.tree_util.tree_leaves(start)
    assert len(got_leaves) == len(leaves) == len(start_leaves)
    updates = [
        np.asarray(w, np.float64) - np.asarray(s, np.float64)
        for (_, w), s in zip(leaves, start_leaves, strict=True)
    ]
    rms_all = np.sqrt(sum(np.sum(u**2) for u in updates) / sum(u.size for u in updates))
    for (path, w), g, update in zip(leaves, got_leaves, updates, strict=True):
        name = jax.tree_util.keystr(path)
        rms = np.sqrt(np.mean(update**2))
        assert rms > 0, f"{name}: the reference did not update it"
        error = np.sqrt(np.mean((np.asarray(g, np.float64) - np.asarray(w, np.float64)) ** 2))
        error /= max(rms, rms_all)
        assert error <= rtol, f"{name}: relative error {error:.2e} > {rtol:.2e}"
