"""``scale_by_online_subspace``: Online Subspace Descent (Liang et al. 2024, arXiv 2408.12857).

GaLore recomputes its basis by an SVD every ``tau`` steps. Online Subspace Descent (OSD) instead
tracks the gradient's principal subspace by online PCA: ``P`` (``d x r``, on the side chosen by
:mod:`golore_jax._layout`) is a trainable matrix stepped by its own optimizer on the
reconstruction loss of the normalised gradient ``Ĝ = G / ||G||_F``::

    left:  L(P) = ||P P^T Ĝ - Ĝ||_F^2        right: L(Q) = ||Ĝ Q Q^T - Ĝ||_F^2

(the right side is the left one on ``Ĝ^T``; the authors store ``Q^T``, ``r x n``). One step,
following the authors' code (kyleliang919/Online-Subspace-Descent, ``proj_type continuous*``)::

    if t == 0:  P = top-r left singular vectors of G   # the only SVD, in a lax.cond branch
    R = P^T G;  N = inner(R);  update = scale * P N    # the weight update uses P before its step
    if t > 0 and t % tau == 0:
        P <- projector_optimizer step on grad_P L(P)   # jax.grad; no SVD

Keeping ``P`` near orthonormal. The global minimisers of ``E L(P)`` are the orthonormal bases
of the top-``r`` subspace of ``E[Ĝ Ĝ^T]`` (the tied-weight linear autoencoder of Baldi & Hornik
1989: a column of ``P`` whose norm drifts from 1, or that leaves ``range(Ĝ)``, increases the
loss), so the loss itself pulls ``P^T P`` back to ``I``; this is the authors' mechanism and the
default here. ``orthonormalize_every=N`` additionally replaces ``P`` by the Q factor of its QR
decomposition (signs fixed so ``diag(R) > 0``: a continuous choice) every ``N`` steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import PartitionSpec

from golore_jax import _explicit, partitioning
from golore_jax import _layout as layout_lib
from golore_jax import _refresh as refresh_lib
from golore_jax import projectors as projectors_lib
from golore_jax._layout import MatrixLayout
from golore_jax._planning import (
    RankRule,
    count_moments,
    low_rank_like,
    plan_layouts,
    require_finite,
    require_positive_int,
    zero_bases,
)
from golore_jax._state_shapes import shape_checker
from golore_jax._tail import update_in_subspace

# OSD's code steps P with lr = 1 / update_proj_gap; 200 is GaLore's C4 gap (ALGORITHMS.md).
DEFAULT_PROJECTOR_LEARNING_RATE = 1.0 / 200


class ScaleByOnlineSubspaceState(NamedTuple):
    """State of :func:`scale_by_online_subspace`.

    Attributes:
      count: number of updates applied so far (int32).
      bases: per projected leaf its fp32 ``(d, r)`` basis, or ``optax.MaskedNode()``.
      projector_state: state of ``projector_optimizer`` on the bases.
      inner_state: state of the inner transform on the low-rank shapes.
    """

    count: jax.Array
    bases: Any
    projector_state: Any
    inner_state: Any


def default_projector_optimizer(
    learning_rate: float = DEFAULT_PROJECTOR_LEARNING_RATE,
) -> optax.GradientTransformation:
    """AdamW with ``torch.optim.AdamW``'s defaults, the OSD authors' default projector optimizer.

    ``b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01`` are PyTorch's defaults, which their
    ``get_optim`` does not override.

    >>> import golore_jax as gl
    >>> online = gl.Online(rank=8, projector_optimizer=default_projector_optimizer(1.0 / 50))
    >>> tx = gl.osd_adamw(1e-3, online=online)
    """
    return optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)


def pca_loss(basis: jax.Array, g_rows: jax.Array) -> jax.Array:
    """``||P P^T Ĝ - Ĝ||_F^2`` with ``Ĝ = g_rows / ||g_rows||_F`` (rows: the projected dim).

    A zero or non-finite gradient gives ``Ĝ = 0`` (zero loss and zero gradient).
    """
    # Explicit meshes: the loss on whole matrices (its gradient comes back in basis' sharding).
    basis, g_rows = _explicit.unsharded(basis), _explicit.unsharded(g_rows)
    norm = jnp.linalg.norm(g_rows)
    ok = jnp.isfinite(norm) & (norm > 0)
    g_hat = jnp.where(ok, g_rows / jnp.where(ok, norm, 1.0), 0.0)
    return jnp.sum(jnp.square(basis @ (basis.T @ g_hat) - g_hat))


def orthonormalize(basis: jax.Array) -> jax.Array:
    """The Q factor of ``basis = Q R`` with ``diag(R) >= 0`` (closest to ``basis`` in spirit)."""
    q, r = jnp.linalg.qr(_explicit.unsharded(basis))  # QR needs its operand unsharded
    return _explicit.like(q * jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0)[None, :], basis)


def _rows_of(g: jax.Array, lay: MatrixLayout) -> jax.Array:
    """The fp32 ``d x k`` rows of ``g`` along its projected dim."""
    return layout_lib.projected_rows(layout_lib.as_matrix(g.astype(jnp.float32), lay), lay)


def _pca_step(
    projector_optimizer: optax.GradientTransformation,
    treedef: Any,
    layouts: list[MatrixLayout | None],
    chooser: list[jax.Array],
    bases_tree: Any,
    projector_state: Any,
) -> tuple[Any, Any]:
    """One ``projector_optimizer`` step of the bases on the summed :func:`pca_loss`."""

    def loss(tree):
        leaves = treedef.flatten_up_to(tree)
        return sum(
            (
                pca_loss(b, _rows_of(chooser[i], lay))
                for i, (b, lay) in enumerate(zip(leaves, layouts, strict=True))
                if lay is not None
            ),
            jnp.zeros([], jnp.float32),  # a float even when no leaf is projected
        )

    pca_grads = jax.grad(loss)(bases_tree)
    steps, projector_state = projector_optimizer.update(pca_grads, projector_state, bases_tree)
    return optax.apply_updates(bases_tree, steps), projector_state


def scale_by_online_subspace(
    inner: optax.GradientTransformation,
    *,
    rank: RankRule,
    update_every: int = 1,
    projector_optimizer: optax.GradientTransformation | None = None,
    scale: float = 1.0,
    mask: Any = None,
    orthonormalize_every: int | None = None,
    matrix_split: Callable[[str, tuple[int, ...]], int | None] | None = None,
    side: str = "gradient",
) -> optax.GradientTransformationExtraArgs:
    """Runs ``inner`` in a rank-``r`` subspace tracked by online PCA (Online Subspace Descent).

    Args:
      inner: any optax transformation, run on ``R = P^T G`` (or ``G Q``) of projected leaves and
        on the full gradients of the others; it receives no ``params``.
      rank: ``r``, an int or ``(path, (m, n)) -> int | None``, as in ``scale_by_subspace``.
      update_every: ``P`` takes one optimizer step at steps ``t > 0`` with ``t % tau == 0``
        (default 1: every step, the authors' ``continuous`` projection).
      projector_optimizer: optimizer of the bases; default :func:`default_projector_optimizer`
        (AdamW, lr ``1/200``: the authors' ``1 / update_proj_gap`` with GaLore's gap 200).
      scale: ``alpha``, multiplies the back-projected update of projected leaves.
      mask: which leaves are projected, as in ``scale_by_subspace`` (default ``default_mask``).
      orthonormalize_every: if set, re-orthonormalise ``P`` by QR at steps ``t > 0`` with
        ``t % N == 0`` (after its optimizer step). Default None: the loss alone keeps ``P``
        near-orthonormal, as in the authors' code.
      matrix_split: as in ``scale_by_subspace``, for leaves with more than 2 dims.
      side: as in ``scale_by_subspace``; ``"state"`` also counts ``projector_optimizer``'s
        moments, which live on the bases.

    Extra args:
      ``subspace_grads``: a gradient tree used only for the initial SVD and the PCA loss (a
      larger-batch estimate). Other extra args are passed to ``inner``.

    >>> params = {"w": jnp.ones((4, 6))}
    >>> tx = scale_by_online_subspace(optax.identity(), rank=2)
    >>> updates, state = tx.update(params, tx.init(params), params)  # t = 0: one SVD
    >>> state.bases["w"].shape, bool(jnp.allclose(updates["w"], 1.0, atol=1e-5))
    ((4, 2), True)
    """
    require_positive_int("scale_by_online_subspace", "update_every", update_every)
    require_positive_int(
        "scale_by_online_subspace", "orthonormalize_every", orthonormalize_every, optional=True
    )
    require_finite("scale_by_online_subspace", "scale", scale)
    projector_optimizer = (
        projector_optimizer if projector_optimizer is not None else default_projector_optimizer()
    )
    layout_lib.check_side_rule(side, "scale_by_online_subspace")
    inner = optax.with_extra_args_support(inner)
    initial_svd = projectors_lib.svd()

    def plan(tree) -> tuple[list[MatrixLayout | None], Any]:
        moments = (0, 0)
        if side == "state":
            moments = (
                count_moments(inner, tree),
                count_moments(projector_optimizer, tree),
            )
        return plan_layouts(tree, mask, rank, matrix_split, False, side, moments)

    def init_fn(params):
        layouts, treedef = plan(params)
        leaves = treedef.flatten_up_to(params)
        shardings = _explicit.leaf_shardings(leaves, layouts)
        bases = treedef.unflatten(zero_bases(layouts, jnp.float32, shardings))
        return ScaleByOnlineSubspaceState(
            count=jnp.zeros([], jnp.int32),
            bases=bases,
            projector_state=projector_optimizer.init(bases),
            inner_state=inner.init(treedef.unflatten(low_rank_like(leaves, layouts, shardings))),
        )

    # A leaf whose shape changed since init: one line naming it (checked when tracing).
    check_shapes = shape_checker("scale_by_online_subspace", init_fn)

    def update_fn(updates, state, params=None, *, subspace_grads=None, **extra_args):
        check_shapes(updates, state)
        layouts, treedef = plan(updates)
        grads = treedef.flatten_up_to(updates)
        chooser = grads if subspace_grads is None else treedef.flatten_up_to(subspace_grads)

        def first_bases(bases):
            # The one SVD: runs only in this branch, taken at count == 0.
            return [
                b
                if lay is None
                else _explicit.like(
                    refresh_lib.guarded_choice(
                        initial_svd,
                        jax.random.key(0),
                        _explicit.unsharded(_rows_of(chooser[i], lay)),
                        _explicit.unsharded(b),
                        state.count,
                    ),
                    b,
                )
                for i, (b, lay) in enumerate(zip(bases, layouts, strict=True))
            ]

        bases = lax.cond(
            state.count == 0, first_bases, lambda b: list(b), treedef.flatten_up_to(state.bases)
        )

        out, inner_state = update_in_subspace(
            inner,
            treedef,
            grads,
            layouts,
            bases,
            state.inner_state,
            params,
            scale,
            extra_args,
            shardings=_explicit.leaf_shardings(
                grads if params is None else treedef.flatten_up_to(params), layouts
            ),
        )

        def pca_step(operands):
            return _pca_step(projector_optimizer, treedef, layouts, chooser, *operands)

        bases_tree = treedef.unflatten(
            [
                optax.MaskedNode() if lay is None else b
                for lay, b in zip(layouts, bases, strict=True)
            ]
        )
        stepped = (state.count > 0) & (state.count % update_every == 0)
        bases_tree, projector_state = lax.cond(
            stepped, pca_step, lambda operands: operands, (bases_tree, state.projector_state)
        )
        if orthonormalize_every is not None:
            bases_tree = lax.cond(
                (state.count > 0) & (state.count % orthonormalize_every == 0),
                lambda tree: jax.tree.map(orthonormalize, tree),
                lambda tree: tree,
                bases_tree,
            )
        new_state = ScaleByOnlineSubspaceState(
            count=optax.safe_increment(state.count),
            bases=bases_tree,
            projector_state=projector_state,
            inner_state=inner_state,
        )
        return treedef.unflatten(out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _partition_specs(
    state: ScaleByOnlineSubspaceState, context: partitioning.SpecContext
) -> ScaleByOnlineSubspaceState:
    """As ``scale_by_subspace``'s state; the projector optimizer's moments follow the bases."""
    bases, low_rank = partitioning.basis_specs(state.bases, state.inner_state, context)
    treedef = jax.tree_util.tree_structure(context.params)
    bases_treedef = jax.tree_util.tree_structure(state.bases)
    return ScaleByOnlineSubspaceState(
        count=PartitionSpec(),
        bases=bases,
        projector_state=partitioning.walk(state.projector_state, bases_treedef, bases),
        inner_state=partitioning.walk(state.inner_state, treedef, low_rank),
    )


partitioning.register_partition_rule(ScaleByOnlineSubspaceState, _partition_specs)
