"""``scale_by_subspace``: project the gradient, run any optax transform on it, project back.

One step of Algorithm 1 of He et al. 2024 (arXiv 2410.11289) for each projected leaf ``G``::

    if t % tau == 0:  P = projector(G_sub)        # refresh, inside jit (lax.cond)
    R = P^T G                                      # or G Q on the right side
    N = inner(R)                                   # any optax GradientTransformation
    update = scale * P N                           # or scale * N Q^T

Leaves that are not projected go through the same ``inner`` at full shape. The state keeps the
step count, a PRNG key, one ``(d, r)`` fp32 basis per projected leaf and the inner state on the
low-rank shapes, which is where the memory saving comes from.

The pieces shared with the other subspace transforms live in :mod:`golore_jax.planning` (mask,
layouts, argument checks), :mod:`golore_jax.refresh` (the batched refresh),
:mod:`golore_jax.rotation` (moments across a refresh) and :mod:`golore_jax.tail` (project, run
``inner``, project back).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import PartitionSpec

from golore_jax import layout as layout_lib
from golore_jax import partitioning, rotation
from golore_jax import projectors as projectors_lib
from golore_jax import refresh as refresh_lib
from golore_jax.finish import decay_and_learning_rate
from golore_jax.layout import MatrixLayout
from golore_jax.planning import (
    DEFAULT_EXCLUDE,
    PROJECTION_DTYPES,
    MaskArg,
    RankRule,
    as_key,
    check_update_leaves,
    count_moments,
    default_mask,
    is_positive_int,
    is_projection_dtype,
    low_rank_like,
    plan_layouts,
    require_finite,
    require_positive_int,
    subspace_layouts,
    zero_bases,
)
from golore_jax.quantized import scale_by_adam_8bit
from golore_jax.rotation import SECOND_MOMENT_POLICIES
from golore_jax.tail import update_in_subspace, update_through

__all__ = [
    "DEFAULT_EXCLUDE",
    "PROJECTION_DTYPES",
    "SECOND_MOMENT_POLICIES",
    "MaskArg",
    "RankRule",
    "ScaleBySubspaceState",
    "count_moments",
    "default_mask",
    "galore_adamw",
    "galore_sgd",
    "golore_adamw",
    "golore_sgd",
    "low_rank_update",
    "scale_by_subspace",
    "subspace_layouts",
    "update_in_subspace",
    "update_through",
]

# Name of the extra arg that tells scale_by_subspace its gradients already are low-rank; only
# low_rank_update passes it (``in_subspace=True`` is its older spelling, still accepted).
LOW_RANK_ARG = "in_subspace"


class ScaleBySubspaceState(NamedTuple):
    """State of :func:`scale_by_subspace`.

    Attributes:
      count: number of updates applied so far (int32); refreshes happen when
        ``count % update_every == 0``.
      key: typed PRNG key, split at every step; a refresh uses a key folded with the leaf index.
      bases: per leaf, the orthonormal ``(d, r)`` fp32 basis (``P`` or ``Q``), or
        ``optax.MaskedNode()`` for leaves that are not projected.
      inner_state: state of the inner transform, initialised on the low-rank shapes.
    """

    count: jax.Array
    key: jax.Array
    bases: Any
    inner_state: Any


def _check_arguments(
    rank,
    update_every,
    scale,
    second_moment,
    projection_dtype,
    basis_dtype,
    refresh_batch_size,
    side,
) -> None:
    """One-line errors at construction for arguments no step can use."""
    owner = "scale_by_subspace"
    require_positive_int(owner, "update_every", update_every)
    if not callable(rank) and not is_positive_int(rank):
        raise ValueError(f"{owner}: rank must be a positive int or a function, got {rank!r}")
    require_finite(owner, "scale", scale)
    if second_moment not in SECOND_MOMENT_POLICIES:
        raise ValueError(
            f"{owner}: second_moment must be one of {SECOND_MOMENT_POLICIES}, got {second_moment!r}"
        )
    for name, value in (("projection_dtype", projection_dtype), ("basis_dtype", basis_dtype)):
        if value is not None and not is_projection_dtype(value):
            raise ValueError(
                f"{owner}: {name} must be one of "
                f"{[d.name for d in PROJECTION_DTYPES]} or None, got {value!r}"
            )
    require_positive_int(owner, "refresh_batch_size", refresh_batch_size, optional=True)
    layout_lib.check_side_rule(side, owner)


def _low_rank_step(
    inner: optax.GradientTransformationExtraArgs,
    layouts: list[MatrixLayout | None],
    treedef: Any,
    scale: float,
    updates: Any,
    state: ScaleBySubspaceState,
    params: Any,
    extra_args: dict[str, Any],
) -> tuple[Any, ScaleBySubspaceState]:
    """``N = inner(R)`` on given low-rank gradients ``R``; ``scale * N`` for them (the update
    of ``A``, not back-projected). No refresh: the bases are kept."""
    grads = treedef.flatten_up_to(updates)
    for i, (g, lay) in enumerate(zip(grads, layouts, strict=True)):
        if lay is not None and tuple(g.shape) != lay.low_rank_shape:
            path = jax.tree_util.keystr(jax.tree_util.tree_leaves_with_path(params)[i][0])
            raise ValueError(
                f"scale_by_subspace: the low-rank gradient of leaf {path} must "
                f"have the low-rank shape {lay.low_rank_shape}, got {tuple(g.shape)}"
            )
    out, inner_state = update_through(
        inner,
        treedef,
        grads,
        [None if lay is None else (lambda g: g.astype(jnp.float32)) for lay in layouts],
        [None if lay is None else (lambda n: n) for lay in layouts],
        state.inner_state,
        params,
        scale,
        extra_args,
    )
    next_key, _ = jax.random.split(state.key)
    new_state = state._replace(
        count=optax.safe_increment(state.count), key=next_key, inner_state=inner_state
    )
    return treedef.unflatten(out), new_state


def scale_by_subspace(
    inner: optax.GradientTransformation,
    *,
    rank: RankRule,
    update_every: int,
    projector: projectors_lib.Projector | None = None,
    scale: float = 1.0,
    mask: MaskArg = None,
    momentum_projection: bool = False,
    second_moment: str = "keep",
    matrix_split: Callable[[str, tuple[int, ...]], int | None] | None = None,
    allow_full_rank: bool = False,
    seed: int | jax.Array = 0,
    refresh_sharding: Any = None,
    batch_refresh: bool = True,
    refresh_batch_size: int | None = None,
    projection_dtype: Any = None,
    basis_dtype: Any = None,
    side: str = "gradient",
) -> optax.GradientTransformationExtraArgs:
    """Runs ``inner`` in a rank-``r`` subspace of each projected leaf (Algorithm 1).

    Args:
      inner: any optax transformation; it sees the low-rank gradients ``R`` of projected leaves
        and the full gradients of the others. It receives no ``params`` (put weight decay outside,
        where it acts on the full weights, as GaLore does).
      rank: ``r``, an int or a function ``(path, (m, n)) -> int | None`` (None: not projected).
      update_every: ``tau``; the subspace is refreshed when ``count % tau == 0`` (from step 0).
      projector: how a subspace is chosen; default :func:`golore_jax.projectors.svd` (GaLore).
      scale: ``alpha``, multiplies the back-projected update of projected leaves.
      mask: which leaves are projected: None (:func:`default_mask`), a bool tree like params, or
        a function of params returning one.
      momentum_projection: at a refresh, carry first moments (those the inner state declares,
        :mod:`golore_jax.rotation`: ``mu``/``trace``/``ema`` of optax's states) into the new
        subspace by equation (2): ``M <- P_new^T P_old M`` (left) or ``M Q_old^T Q_new``
        (right). Off: moments are kept as they are (GaLore's code).
      second_moment: what a refresh does to second moments (declared ones, ``nu``): ``"keep"``
        (GaLore's code), ``"reset"`` to zero, or ``"project"``: ``V <- (C * C) V`` with
        ``C = P_new^T P_old``, the variance of the rotated coordinates if the old ones were
        independent (keeps ``V >= 0``; see :func:`golore_jax.layout.rotate_second_moment`).
      matrix_split: for leaves with > 2 dims, ``(path, shape) -> k`` so rows are ``shape[:k]``;
        default: the most square split (see :mod:`golore_jax.layout`).
      allow_full_rank: permit ``rank == min(m, n)`` (no saving; used for equivalence checks).
      seed: int seed or PRNG key for random projectors.
      batch_refresh: stack same-shape leaves and vmap their projector (one batched kernel per
        shape; for projectors that choose from ``g g^T`` alone, e.g. ``gram_eigh``, one per
        Gram size, across gradient shapes); False decomposes each leaf on its own (no stacked
        copy of the gradients).
      refresh_batch_size: with ``batch_refresh``, at most this many matrices per batched
        call; the calls run one after another (each waits for the previous one's result), so
        the refresh holds the stacked inputs and decomposition workspace of one call at a time
        instead of all of them (a 7B on one GPU). None: no limit. The result is the same as
        without a limit; a smaller size means more calls, each with a fixed cost. With
        ``refresh_sharding``, a multiple of the number of devices keeps every device busy.
      refresh_sharding: where the batched refresh runs: with a sharding on the stacked axis
        (e.g. ``PartitionSpec(("data", "fsdp"))`` under a mesh context, or a
        ``NamedSharding``), each device decomposes its share of the matrices instead of every
        device repeating every decomposition.
      projection_dtype: operand dtype of the two matmuls of every step, ``R = P^T G`` and
        ``P N`` (None: float32). ``jnp.bfloat16`` rounds ``G``, ``P`` and ``N`` to bf16
        (fp32 accumulation; ``R``, the moments and the bases stay fp32): cheaper matmuls on
        accelerators, at bf16 rounding of the update (relative error ~2^-8).
      basis_dtype: storage dtype of the bases in the state (None: float32). ``jnp.bfloat16``
        halves their memory: a refresh still decomposes in fp32 and stores the basis rounded
        to nearest; every use (projections, moment rotations, the next refresh's ``previous``)
        reads it back as fp32 (exact), so the step is the fp32-basis step with the rounded
        basis. The rounded basis is orthonormal to ~2^-8.
      side: which side of each ``m x n`` leaf is projected (:mod:`golore_jax.layout`):
        ``"gradient"`` (the paper's and GaLore's rule: the smaller dimension), ``"state"`` (the
        side whose basis plus ``inner``'s moments hold fewer floats; with Adam this is
        ``optax.contrib.galore``'s choice, left when ``m >= n``), ``"left"`` or ``"right"``.

    Extra args:
      ``subspace_grads``: a gradient tree like ``updates`` used only to choose the subspace
      (large-batch GaLore: the mean of several minibatch gradients).
      Other extra args are passed to ``inner``. Updates always have the shapes of
      ``updates``; gradients that already are low-rank go through :func:`low_rank_update`.

    Example (GaLore's step on one 4x6 matrix, rank 2):

    >>> import jax.numpy as jnp, optax
    >>> params = {"w": jnp.ones((4, 6))}
    >>> tx = scale_by_subspace(optax.scale_by_adam(), rank=2, update_every=10)
    >>> state = tx.init(params)
    >>> state.bases["w"].shape, state.inner_state.mu["w"].shape
    ((4, 2), (2, 6))
    >>> grads = {"w": jnp.arange(24.0).reshape(4, 6)}
    >>> updates, state = tx.update(grads, state, params)
    >>> updates["w"].shape, int(state.count)
    ((4, 6), 1)
    """
    _check_arguments(
        rank,
        update_every,
        scale,
        second_moment,
        projection_dtype,
        basis_dtype,
        refresh_batch_size,
        side,
    )
    stored_basis_dtype = jnp.float32 if basis_dtype is None else jnp.dtype(basis_dtype)
    projector = projector if projector is not None else projectors_lib.svd()
    inner = optax.with_extra_args_support(inner)
    rotates_state = momentum_projection or second_moment != "keep"

    def plan(tree) -> tuple[list[MatrixLayout | None], Any]:
        moments = (count_moments(inner, tree) if side == "state" else 0, 0)
        return plan_layouts(tree, mask, rank, matrix_split, allow_full_rank, side, moments)

    def init_fn(params):
        layouts, treedef = plan(params)
        return ScaleBySubspaceState(
            count=jnp.zeros([], jnp.int32),
            key=as_key(seed),
            bases=treedef.unflatten(zero_bases(layouts, stored_basis_dtype)),
            inner_state=inner.init(
                treedef.unflatten(low_rank_like(treedef.flatten_up_to(params), layouts))
            ),
        )

    def update_fn(updates, state, params=None, *, subspace_grads=None, **extra_args):
        if extra_args.pop(LOW_RANK_ARG, False):
            if params is None:
                raise ValueError(
                    "scale_by_subspace: a low-rank update needs params (the full shapes)"
                )
            layouts, treedef = plan(params)
            return _low_rank_step(
                inner, layouts, treedef, scale, updates, state, params, extra_args
            )
        layouts, treedef = plan(updates)
        grads = treedef.flatten_up_to(updates)
        chooser = grads if subspace_grads is None else treedef.flatten_up_to(subspace_grads)
        old_bases = treedef.flatten_up_to(state.bases)
        check_update_leaves(updates, layouts, old_bases)
        next_key, refresh_key = jax.random.split(state.key)

        def refresh(operands):
            bases, inner_state = operands
            new = refresh_lib.refresh_bases(
                projector,
                layouts,
                bases,
                chooser,
                refresh_key,
                state.count,
                batch=batch_refresh,
                batch_size=refresh_batch_size,
                sharding=refresh_sharding,
                basis_dtype=stored_basis_dtype,
            )
            if rotates_state:
                inner_state = rotation.rotate_moments(
                    inner_state,
                    treedef,
                    layouts,
                    bases,
                    new,
                    first=momentum_projection,
                    second=second_moment,
                )
            return new, inner_state

        is_refresh = state.count % update_every == 0
        new_bases, inner_state = lax.cond(
            is_refresh, refresh, lambda operands: operands, (old_bases, state.inner_state)
        )
        out, inner_state = update_in_subspace(
            inner,
            treedef,
            grads,
            layouts,
            new_bases,
            inner_state,
            params,
            scale,
            extra_args,
            projection_dtype,
        )
        new_state = ScaleBySubspaceState(
            count=optax.safe_increment(state.count),
            key=next_key,
            bases=treedef.unflatten(
                [
                    optax.MaskedNode() if lay is None else b
                    for lay, b in zip(layouts, new_bases, strict=True)
                ]
            ),
            inner_state=inner_state,
        )
        return treedef.unflatten(out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def low_rank_update(
    tx: optax.GradientTransformationExtraArgs,
    low_rank_grads: Any,
    opt_state: Any,
    params: Any,
    **extra_args: Any,
) -> tuple[Any, Any]:
    """One step of ``tx`` (an optimizer holding a :func:`scale_by_subspace`) on gradients that
    already are in the subspace: the ReLoRA-like reparameterisation ``W = W0 + P A``
    (Algorithm 6 of arXiv 2410.11289), where the gradient of ``A`` is ``R = P^T G`` (left) or
    ``G Q`` (right).

    Unlike ``tx.update``, whose updates always have the params' shapes, the projected leaves
    of the result are ``scale * N`` in the low-rank shape: the update of ``A``, not
    back-projected. The other leaves are updated as by ``tx.update``. ``params`` (full
    shapes) give the layouts. No refresh happens: at refresh steps
    (``count % update_every == 0``) the caller sends the full gradient through ``tx.update``.

    >>> import jax.numpy as jnp, optax
    >>> params = {"w": jnp.ones((4, 6))}
    >>> tx = optax.chain(scale_by_subspace(optax.sgd(1.0), rank=2, update_every=2),
    ...                  optax.scale(-0.5))
    >>> state = tx.init(params)
    >>> _, state = tx.update({"w": jnp.arange(24.0).reshape(4, 6)}, state, params)  # refresh
    >>> updates, state = low_rank_update(tx, {"w": jnp.ones((2, 6))}, state, params)
    >>> updates["w"].shape, updates["w"][0, 0].item()
    ((2, 6), 0.5)
    """
    return tx.update(low_rank_grads, opt_state, params, **{LOW_RANK_ARG: True}, **extra_args)


def _alias_projector(
    projector: projectors_lib.Projector | None,
    golore_fraction: float | None,
    total_steps: int | None,
) -> projectors_lib.Projector:
    """``projector`` (default: the exact SVD), or GoLore's random phase after it for the last
    ``golore_fraction`` of ``total_steps`` (:func:`golore_jax.projectors.golore_projector`)."""
    if golore_fraction is None:
        return projector if projector is not None else projectors_lib.svd()
    if golore_fraction == 1.0 and projector is not None:
        raise ValueError(
            "golore_fraction=1.0 draws every subspace at random: projector would be unused "
            "(give golore_fraction < 1 to run it before the random phase)"
        )
    return projectors_lib.golore_projector(golore_fraction, total_steps, before=projector)


def galore_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: RankRule = 128,
    update_every: int = 200,
    scale: float = 0.25,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    weight_decay_mask: Any = None,
    projector: projectors_lib.Projector | None = None,
    golore_fraction: float | None = None,
    total_steps: int | None = None,
    mask: MaskArg = None,
    momentum_projection: bool = False,
    second_moment: str = "keep",
    mu_dtype: Any = None,
    quantized_moments: bool = False,
    seed: int = 0,
    batch_refresh: bool = True,
    refresh_batch_size: int | None = None,
    refresh_sharding: Any = None,
    projection_dtype: Any = None,
    basis_dtype: Any = None,
    side: str = "gradient",
) -> optax.GradientTransformationExtraArgs:
    """GaLore-AdamW: Adam in the top-``rank`` singular subspace, refreshed every ``update_every``.

    Hyperparameters follow optax's conventions (``b1 = 0.9`` is the paper's ``b1 = 0.1``). The
    defaults match GaLore's code: no moment projection, moments kept at a refresh, scale 0.25.
    ``quantized_moments=True`` keeps Adam's moments in 8 bits
    (:func:`golore_jax.quantized.scale_by_adam_8bit`, the paper's Figure 6; ``mu_dtype`` is
    then ignored). ``side="state"`` projects the side ``optax.contrib.galore`` projects (see
    :func:`scale_by_subspace`, which documents the other arguments).
    ``golore_fraction`` (with ``total_steps``): random subspaces for that last fraction of the
    steps, ``projector`` before (GoLore; :func:`golore_adamw` is ``golore_fraction=1.0``).

    >>> import jax.numpy as jnp
    >>> params = {"w": jnp.ones((4, 6)), "b": jnp.ones(6)}
    >>> tx = galore_adamw(1e-3, rank=2, update_every=10)
    >>> updates, state = tx.update(params, tx.init(params), params)
    >>> updates["w"].shape, state[0].bases["w"].shape
    ((4, 6), (4, 2))
    """
    if quantized_moments:
        inner = scale_by_adam_8bit(b1=b1, b2=b2, eps=eps)
    else:
        inner = optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype)
    core = scale_by_subspace(
        inner,
        rank=rank,
        update_every=update_every,
        projector=_alias_projector(projector, golore_fraction, total_steps),
        scale=scale,
        mask=mask,
        momentum_projection=momentum_projection,
        second_moment=second_moment,
        seed=seed,
        batch_refresh=batch_refresh,
        refresh_batch_size=refresh_batch_size,
        refresh_sharding=refresh_sharding,
        projection_dtype=projection_dtype,
        basis_dtype=basis_dtype,
        side=side,
    )
    return optax.chain(
        core, *decay_and_learning_rate(learning_rate, weight_decay, weight_decay_mask)
    )


def galore_sgd(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: RankRule = 128,
    update_every: int = 200,
    scale: float = 0.25,
    momentum: float | None = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    projector: projectors_lib.Projector | None = None,
    golore_fraction: float | None = None,
    total_steps: int | None = None,
    mask: MaskArg = None,
    momentum_projection: bool = True,
    seed: int = 0,
    batch_refresh: bool = True,
    refresh_batch_size: int | None = None,
    refresh_sharding: Any = None,
    projection_dtype: Any = None,
    basis_dtype: Any = None,
    side: str = "gradient",
) -> optax.GradientTransformationExtraArgs:
    """GaLore with (momentum) SGD, optax's momentum convention (``T <- momentum * T + R``).

    Momentum projection (equation (2)) is on by default: the paper's convergence theorems for
    MSGD are proved with it. :func:`golore_jax.aliases.paper_msgd_hyperparams` maps the
    paper's ``(lr, b1)``. ``golore_fraction`` as in :func:`galore_adamw`.

    >>> import jax.numpy as jnp
    >>> params = {"w": jnp.ones((4, 6))}
    >>> tx = galore_sgd(1.0, rank=2, update_every=10, momentum=None, scale=1.0)
    >>> updates, _ = tx.update(params, tx.init(params), params)  # rank-1 G: P P^T G = G
    >>> bool(jnp.allclose(updates["w"], -1.0, atol=1e-5))
    True
    """
    inner = optax.identity() if momentum is None else optax.trace(decay=momentum, nesterov=nesterov)
    core = scale_by_subspace(
        inner,
        rank=rank,
        update_every=update_every,
        projector=_alias_projector(projector, golore_fraction, total_steps),
        scale=scale,
        mask=mask,
        momentum_projection=momentum_projection,
        seed=seed,
        batch_refresh=batch_refresh,
        refresh_batch_size=refresh_batch_size,
        refresh_sharding=refresh_sharding,
        projection_dtype=projection_dtype,
        basis_dtype=basis_dtype,
        side=side,
    )
    return optax.chain(
        core, *decay_and_learning_rate(learning_rate, weight_decay, weight_decay_mask)
    )


# GoLore (random subspaces; ``golore_fraction < 1`` with ``total_steps``: the paper's hybrid
# GoLore@x%, e.g. 0.2 runs GaLore's SVD for the first 80% of the steps).
golore_adamw = functools.partial(galore_adamw, golore_fraction=1.0)
golore_sgd = functools.partial(galore_sgd, golore_fraction=1.0)


def _partition_specs(
    state: ScaleBySubspaceState, context: partitioning.SpecContext
) -> ScaleBySubspaceState:
    """Bases take the spec of the param's projected axis; low-rank moments that of its kept
    axis (see :mod:`golore_jax.partitioning`); count and key are replicated."""
    bases, low_rank = partitioning.basis_specs(state.bases, state.inner_state, context)
    treedef = jax.tree_util.tree_structure(context.params)
    return ScaleBySubspaceState(
        count=PartitionSpec(),
        key=PartitionSpec(),
        bases=bases,
        inner_state=partitioning.walk(state.inner_state, treedef, low_rank),
    )


partitioning.register_partition_rule(ScaleBySubspaceState, _partition_specs)
