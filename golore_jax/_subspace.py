"""``scale_by_subspace``: project the gradient, run any optax transform on it, project back.

One step of Algorithm 1 of He et al. 2024 (arXiv 2410.11289) for each projected leaf ``G``::

    if t % tau == 0:  P = projector(G_sub)        # refresh, inside jit (lax.cond)
    R = P^T G                                      # or G Q on the right side
    N = inner(R)                                   # any optax GradientTransformation
    update = scale * P N                           # or scale * N Q^T

Leaves that are not projected go through the same ``inner`` at full shape. The state keeps the
step count, a PRNG key, one ``(d, r)`` fp32 basis per projected leaf and the inner state on the
low-rank shapes, which is where the memory saving comes from.

The pieces shared with the other subspace transforms live in :mod:`golore_jax._planning` (mask,
layouts, argument checks), :mod:`golore_jax._refresh` (the batched refresh),
:mod:`golore_jax._rotation` (moments across a refresh) and :mod:`golore_jax._tail` (project, run
``inner``, project back).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from golore_jax import _explicit, partitioning
from golore_jax import _layout as layout_lib
from golore_jax import _refresh as refresh_lib
from golore_jax import _rotation as rotation
from golore_jax import projectors as projectors_lib
from golore_jax._basis_storage import INT4, Int4Basis, for_use, int4_specs, storage_of, zero_basis
from golore_jax._layout import MatrixLayout
from golore_jax._planning import (
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
from golore_jax._rotation import SECOND_MOMENT_POLICIES
from golore_jax._state_shapes import shape_checker
from golore_jax._tail import update_in_subspace, update_through

__all__ = [
    "DEFAULT_EXCLUDE",
    "PROJECTION_DTYPES",
    "SECOND_MOMENT_POLICIES",
    "LazyRefresh",
    "LazyRefreshState",
    "MaskArg",
    "RankRule",
    "ScaleBySubspaceState",
    "count_moments",
    "default_mask",
    "low_rank_update",
    "refresh_counts",
    "scale_by_subspace",
    "subspace_layouts",
    "update_in_subspace",
    "update_through",
]

# Name of the extra arg that tells scale_by_subspace its gradients already are low-rank; only
# low_rank_update passes it (``in_subspace=True`` is its older spelling, still accepted).
LOW_RANK_ARG = "in_subspace"


@dataclasses.dataclass(frozen=True)
class LazyRefresh:
    """Layer-adaptive lazy refresh (Q-GaLore's idea, arXiv 2407.08296): a leaf whose subspace
    has stopped moving is decomposed less often.

    At each scheduled refresh (``count % update_every == 0``, the ``j``-th one) a leaf is
    *due* when ``j >= next_due``; a leaf that is not due keeps its basis and skips its
    decomposition (its moments are left as they are). When a due leaf is decomposed, the
    overlap of its new basis with the previous one,

        overlap = ||P_old^T P_new||_F^2 / r   in [0, 1],

    the mean squared cosine of the ``r`` principal angles between the two subspaces
    (``= 1 - ||P_old P_old^T - P_new P_new^T||_F^2 / (2 r)``), decides: ``overlap >=
    threshold`` extends the leaf's streak, anything else resets it; ``patience`` in a row
    multiply its period (in scheduled refreshes, starting at 1) by ``growth``, up to
    ``max_period`` (None: no cap), and restart the streak. Its next decomposition is ``period``
    scheduled refreshes later. The measure sees the subspace, not the basis: signs, order and
    rotations within the subspace do not count as movement (Q-GaLore's cosine similarity of
    the flattened matrices does count them).

    With float bases the overlap is at most 1 (to rounding): a ``threshold`` above 1 never
    triggers (every leaf is decomposed at every scheduled refresh, the eager schedule). INT4
    bases are decoded first and are not exactly orthonormal (``||P~^T P~ - I||_2 = 0.17`` for
    a 4096 x 1024 Haar basis): an unmoved subspace then reads ~1.004, and the overlap is
    bounded by ``||P~_old||_2^2 ||P~_new||_F^2 / r`` (~1.4 there), so 2 is a threshold that
    never triggers for either. Random draws (GoLore, and the hybrid after its switch) keep
    their schedule: an independent random ``r``-subspace of ``R^d`` overlaps any other by
    ``r / d`` on average, so the rule could only trigger on a threshold below chance; a
    projector that never reads the gradient is refused, and the hybrid's random phase
    decomposes every leaf at every scheduled refresh.

    Under :func:`golore_jax.layerwise.layerwise` each layer keeps its own schedule; with
    ``layers_per_call > 1`` layers are vmapped together only while their counters agree, so
    once their schedules differ the layers are updated one at a time (every step, not only
    at refreshes).
    """

    threshold: float
    patience: int = 2
    growth: int = 2
    max_period: int | None = None

    def __post_init__(self):
        owner = "LazyRefresh"
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int | float):
            raise ValueError(f"{owner}: threshold must be a number, got {self.threshold!r}")
        if not (self.threshold > 0 and self.threshold < float("inf")):
            raise ValueError(f"{owner}: threshold must be finite and > 0, got {self.threshold!r}")
        require_positive_int(owner, "patience", self.patience)
        if not (is_positive_int(self.growth) and self.growth >= 2):
            raise ValueError(f"{owner}: growth must be an int >= 2, got {self.growth!r}")
        require_positive_int(owner, "max_period", self.max_period, optional=True)


class LazyRefreshState(NamedTuple):
    """The lazy refresh's state (``ScaleBySubspaceState.lazy``).

    Attributes:
      period: per projected leaf (``optax.MaskedNode()`` elsewhere), int32: scheduled
        refreshes between two decompositions of the leaf (1, growth, growth^2, ...).
      next_due: per projected leaf, int32: the index ``count // update_every`` of the
        scheduled refresh at which the leaf is next decomposed.
      streak: per projected leaf, int32: decompositions in a row whose overlap with the
        previous basis reached the threshold.
      done: int32, matrices decomposed so far (every member of a batched call that ran, see
        :func:`golore_jax._refresh.decompositions_done`).
      scheduled: int32, leaf refreshes scheduled so far (projected leaves x scheduled
        refreshes): what the eager schedule decomposes.
    """

    period: Any
    next_due: Any
    streak: Any
    done: jax.Array
    scheduled: jax.Array


class ScaleBySubspaceState(NamedTuple):
    """State of :func:`scale_by_subspace`.

    Attributes:
      count: number of updates applied so far (int32); refreshes happen when
        ``count % update_every == 0``.
      key: typed PRNG key, split at every step; a refresh uses a key folded with the leaf index.
        ``np.asarray`` refuses typed keys: to convert a state to numpy take
        ``jax.random.key_data(key)`` (uint32), and ``jax.random.wrap_key_data`` to restore it.
      bases: per leaf, the orthonormal ``(d, r)`` fp32 basis (``P`` or ``Q``; bf16, or an
        :class:`golore_jax._basis_storage.Int4Basis`, as ``basis_dtype`` says), or
        ``optax.MaskedNode()`` for leaves that are not projected.
      inner_state: state of the inner transform, initialised on the low-rank shapes.
      lazy: the :class:`LazyRefreshState` with ``lazy_refresh``; None without (no leaves).
    """

    count: jax.Array
    key: jax.Array
    bases: Any
    inner_state: Any
    lazy: Any = None


def _zero_bases(layouts: list[MatrixLayout | None], storage: Any, *args: Any) -> list[Any]:
    """:func:`golore_jax._planning.zero_bases`, or INT4 zero bases under ``"int4"``."""
    if not isinstance(storage, str):  # a float dtype (storage_of gives a str for INT4 only)
        return zero_bases(layouts, storage, *args)
    shardings = (args[0] if args else None) or [None] * len(layouts)
    return [
        optax.MaskedNode()
        if lay is None
        else _int4_sharded(zero_basis(lay.basis_shape, INT4), lay, s)
        for lay, s in zip(layouts, shardings, strict=True)
    ]


def _int4_sharded(basis: Int4Basis, lay: MatrixLayout, shardings: Any) -> Int4Basis:
    """On a mesh with Explicit axes, an INT4 basis with the shardings
    :func:`golore_jax._basis_storage.int4_specs` gives it (codes like the basis); as it is
    elsewhere (``shardings`` None)."""
    if shardings is None:
        return basis
    mesh = shardings[0].mesh
    specs = int4_specs(shardings[0].spec, lay.basis_shape[0], dict(mesh.shape))
    return jax.tree.map(
        lambda x, spec: jax.sharding.reshard(x, NamedSharding(mesh, spec)),
        basis,
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def _init_lazy(
    lazy_refresh: LazyRefresh | None, layouts: list[MatrixLayout | None], treedef: Any
) -> LazyRefreshState | None:
    if lazy_refresh is None:
        return None

    def per_leaf(value):
        return treedef.unflatten(
            [
                optax.MaskedNode() if lay is None else jnp.asarray(value, jnp.int32)
                for lay in layouts
            ]
        )

    zero = jnp.zeros([], jnp.int32)
    return LazyRefreshState(per_leaf(1), per_leaf(0), per_leaf(0), zero, zero)


def _reads_gradient_at(projector: projectors_lib.Projector, step: jax.Array) -> jax.Array:
    """Whether the subspace ``projector`` chooses at ``step`` depends on the gradient (False in
    the hybrid's random phase)."""
    if isinstance(projector, projectors_lib.HybridProjector):
        return jnp.where(
            step >= projector.switch_step,
            _reads_gradient_at(projector.after, step),
            _reads_gradient_at(projector.before, step),
        )
    return jnp.asarray(bool(projector.uses_gradient))


def _due(
    lazy: LazyRefreshState | None,
    treedef: Any,
    index: jax.Array,
    random_phase: jax.Array,
) -> list[jax.Array | None] | None:
    """Per leaf, whether this scheduled refresh (the ``index``-th) decomposes it."""
    if lazy is None:
        return None
    return [
        None if isinstance(n, optax.MaskedNode) else (index >= n) | random_phase
        for n in treedef.flatten_up_to(lazy.next_due)
    ]


def _next_lazy(
    rule: LazyRefresh,
    lazy: LazyRefreshState,
    treedef: Any,
    layouts: list[MatrixLayout | None],
    due: list[jax.Array | None],
    old: list[Any],
    new: list[Any],
    index: jax.Array,
    random_phase: jax.Array,
    done: jax.Array,
) -> LazyRefreshState:
    """The lazy state after a scheduled refresh (``old`` / ``new``: the bases, decoded)."""
    leaves = [treedef.flatten_up_to(t) for t in (lazy.period, lazy.next_due, lazy.streak)]
    period_out, next_out, streak_out = [], [], []
    for i, lay in enumerate(layouts):
        period, next_due, streak = (t[i] for t in leaves)
        if lay is None:
            period_out.append(period)
            next_out.append(next_due)
            streak_out.append(streak)
            continue
        f32 = jnp.float32
        change = _explicit.replicated_matmul(new[i].astype(f32).T, old[i].astype(f32))
        overlap = jnp.sum(jnp.square(change)) / lay.rank
        measured = due[i] & ~random_phase  # random draws are not measured
        streak = jnp.where(measured, jnp.where(overlap >= rule.threshold, streak + 1, 0), streak)
        grow = streak >= rule.patience
        longer = period * rule.growth
        if rule.max_period is not None:
            longer = jnp.minimum(longer, rule.max_period)
        period = jnp.where(grow, longer, period)
        period_out.append(period)
        streak_out.append(jnp.where(grow, 0, streak))
        next_out.append(jnp.where(due[i], index + period, next_due))
    scheduled = sum(lay is not None for lay in layouts)
    return LazyRefreshState(
        period=treedef.unflatten(period_out),
        next_due=treedef.unflatten(next_out),
        streak=treedef.unflatten(streak_out),
        done=lazy.done + done,
        scheduled=lazy.scheduled + scheduled,
    )


def refresh_counts(opt_state: Any) -> tuple[jax.Array, jax.Array] | None:
    """``(done, scheduled)``: matrices decomposed and leaf refreshes scheduled so far, summed
    over every :func:`scale_by_subspace` state with a lazy refresh in ``opt_state`` (also the
    per-layer states of :func:`golore_jax.layerwise.layerwise`, summed over layers); None
    when there is none (no lazy refresh: every scheduled refresh decomposes every leaf).

    >>> import jax.numpy as jnp
    >>> import optax
    >>> tx = scale_by_subspace(optax.sgd(0.1), rank=2, update_every=2,
    ...                        lazy_refresh=LazyRefresh(0.9))
    >>> params = {"w": jnp.ones((4, 6))}
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...     _, state = tx.update(params, state, params)
    >>> [int(c) for c in refresh_counts(state)]
    [2, 2]
    """
    states = [
        s.lazy
        for s in jax.tree_util.tree_leaves(
            opt_state, is_leaf=lambda s: isinstance(s, ScaleBySubspaceState)
        )
        if isinstance(s, ScaleBySubspaceState) and s.lazy is not None
    ]
    if not states:
        return None
    done = sum(jnp.sum(s.done) for s in states)
    scheduled = sum(jnp.sum(s.scheduled) for s in states)
    return done, scheduled


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
        int4 = name == "basis_dtype" and isinstance(value, str) and value == INT4
        if value is not None and not is_projection_dtype(value) and not int4:
            extra = ", 'int4'" if name == "basis_dtype" else ""
            raise ValueError(
                f"{owner}: {name} must be one of "
                f"{[d.name for d in PROJECTION_DTYPES]}{extra} or None, got {value!r}"
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
    lazy_refresh: LazyRefresh | None = None,
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
        :mod:`golore_jax._rotation`: ``mu``/``trace``/``ema`` of optax's states) into the new
        subspace by equation (2): ``M <- P_new^T P_old M`` (left) or ``M Q_old^T Q_new``
        (right). Off: moments are kept as they are (GaLore's code).
      second_moment: what a refresh does to second moments (declared ones, ``nu``): ``"keep"``
        (GaLore's code), ``"reset"`` to zero, or ``"project"``: ``V <- (C * C) V`` with
        ``C = P_new^T P_old``, the variance of the rotated coordinates if the old ones were
        independent (keeps ``V >= 0``; see :func:`golore_jax._layout.rotate_second_moment`).
      matrix_split: for leaves with > 2 dims, ``(path, shape) -> k`` so rows are ``shape[:k]``;
        default: the most square split (see :mod:`golore_jax._layout`).
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
        basis. The rounded basis is orthonormal to ~2^-8. ``"int4"``: 4-bit codes packed
        two a byte with an fp32 scale per 64 rows of a column (0.56 bytes an entry, 1/7 of
        fp32; :mod:`golore_jax._basis_storage`: the error bound, and why the decoded basis,
        no longer exactly orthonormal, is used as it is). Decoded for each use, to
        ``projection_dtype`` for the matmuls.
      side: which side of each ``m x n`` leaf is projected (:mod:`golore_jax._layout`):
        ``"gradient"`` (the paper's and GaLore's rule: the smaller dimension), ``"state"`` (the
        side whose basis plus ``inner``'s moments hold fewer floats; with Adam this is
        ``optax.contrib.galore``'s choice, left when ``m >= n``), ``"left"`` or ``"right"``.
      lazy_refresh: a :class:`LazyRefresh`: at a scheduled refresh, leaves whose subspace has
        stopped moving skip their decomposition (None: every leaf at every refresh). The
        state then counts decompositions done and scheduled (:func:`refresh_counts`). A
        batched call (``batch_refresh``) is skipped only when none of its matrices is due:
        ``refresh_batch_size=1`` (or ``batch_refresh=False``) saves every skipped one.

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
    stored_basis_dtype = storage_of(basis_dtype)
    if lazy_refresh is not None:
        if not isinstance(lazy_refresh, LazyRefresh):
            raise ValueError(
                "scale_by_subspace: lazy_refresh must be a LazyRefresh or None, "
                f"got {lazy_refresh!r}"
            )
        if projector is not None and not projector.uses_gradient:
            raise ValueError(
                "scale_by_subspace: lazy_refresh needs a projector that reads the gradient; "
                f"{type(projector).__name__} draws its subspaces at random, which keep their "
                "schedule (a random subspace's overlap with the previous one is ~r/d)"
            )
    projector = projector if projector is not None else projectors_lib.svd()
    inner = optax.with_extra_args_support(inner)
    rotates_state = momentum_projection or second_moment != "keep"

    def plan(tree) -> tuple[list[MatrixLayout | None], Any]:
        moments = (count_moments(inner, tree) if side == "state" else 0, 0)
        return plan_layouts(tree, mask, rank, matrix_split, allow_full_rank, side, moments)

    def init_fn(params):
        layouts, treedef = plan(params)
        leaves = treedef.flatten_up_to(params)
        # Explicit meshes: bases and low-rank moments sharded by the params' types.
        shardings = _explicit.leaf_shardings(leaves, layouts)
        return ScaleBySubspaceState(
            lazy=_init_lazy(lazy_refresh, layouts, treedef),
            count=jnp.zeros([], jnp.int32),
            key=as_key(seed),
            bases=treedef.unflatten(_zero_bases(layouts, stored_basis_dtype, shardings)),
            inner_state=inner.init(treedef.unflatten(low_rank_like(leaves, layouts, shardings))),
        )

    # A leaf whose shape changed since init: one line naming it (checked when tracing).
    check_shapes = shape_checker("scale_by_subspace", init_fn)

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
        check_shapes(updates, state)
        layouts, treedef = plan(updates)
        grads = treedef.flatten_up_to(updates)
        chooser = grads if subspace_grads is None else treedef.flatten_up_to(subspace_grads)
        old_bases = treedef.flatten_up_to(state.bases)
        check_update_leaves(updates, layouts, old_bases)
        next_key, refresh_key = jax.random.split(state.key)

        index = state.count // update_every  # which scheduled refresh this is
        random_phase = ~_reads_gradient_at(projector, state.count)

        def refresh(operands):
            bases, inner_state, lazy = operands
            due = _due(lazy, treedef, index, random_phase)
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
                due=due,
            )
            old_used, new_used = for_use(bases), for_use(new)  # INT4 decoded, fp32
            if rotates_state:
                inner_state = rotation.rotate_moments(
                    inner_state,
                    treedef,
                    layouts,
                    old_used,
                    new_used,
                    first=momentum_projection,
                    second=second_moment,
                    changed=due,
                )
            if lazy is not None:
                done = refresh_lib.decompositions_done(
                    projector, layouts, due, batch=batch_refresh, batch_size=refresh_batch_size
                )
                lazy = _next_lazy(
                    lazy_refresh,
                    lazy,
                    treedef,
                    layouts,
                    due,
                    old_used,
                    new_used,
                    index,
                    random_phase,
                    done,
                )
            return new, inner_state, lazy

        is_refresh = state.count % update_every == 0
        new_bases, inner_state, lazy = lax.cond(
            is_refresh,
            refresh,
            lambda operands: operands,
            (old_bases, state.inner_state, state.lazy),
        )
        out, inner_state = update_in_subspace(
            inner,
            treedef,
            grads,
            layouts,
            for_use(new_bases, jnp.float32 if projection_dtype is None else projection_dtype),
            inner_state,
            params,
            scale,
            extra_args,
            projection_dtype,
            _explicit.leaf_shardings(
                grads if params is None else treedef.flatten_up_to(params), layouts
            ),
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
            lazy=lazy,
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


def _partition_specs(
    state: ScaleBySubspaceState, context: partitioning.SpecContext
) -> ScaleBySubspaceState:
    """Bases take the spec of the param's projected axis; low-rank moments that of its kept
    axis (see :mod:`golore_jax.partitioning`); count and key are replicated."""
    treedef = jax.tree_util.tree_structure(context.params)
    stored = treedef.flatten_up_to(state.bases)
    # INT4 bases: the layout is read from the (d, r) they encode; codes and scales get specs.
    shapes = [
        jax.ShapeDtypeStruct(b.codes.shape[:1] + b.scales.shape[1:], jnp.float32)
        if isinstance(b, Int4Basis)
        else b
        for b in stored
    ]
    bases, low_rank = partitioning.basis_specs(
        treedef.unflatten(shapes), state.inner_state, context
    )
    bases = treedef.unflatten(
        [
            int4_specs(spec, b.codes.shape[0], context.mesh_axis_sizes)
            if isinstance(b, Int4Basis)
            else spec
            for b, spec in zip(stored, treedef.flatten_up_to(bases), strict=True)
        ]
    )
    return ScaleBySubspaceState(
        count=PartitionSpec(),
        key=PartitionSpec(),
        bases=bases,
        inner_state=partitioning.walk(state.inner_state, treedef, low_rank),
        lazy=jax.tree.map(lambda _: PartitionSpec(), state.lazy),
    )


partitioning.register_partition_rule(ScaleBySubspaceState, _partition_specs)
