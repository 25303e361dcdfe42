"""The public optimizers: option groups, one transform and one optimizer per family, drop-ins.

Three families, each a ``scale_by_*`` core (what ``optax.contrib.scale_by_galore`` is to
``optax.contrib.galore``) and an optimizer taking ANY optax transformation as its inner
``base_optimizer`` (``chain(core, add_decayed_weights, scale_by_learning_rate)``):

* :func:`galore` / :func:`scale_by_galore`: a basis per matrix chosen by a projector (GaLore's
  SVD, GoLore's random subspaces, the hybrid ...), options in :class:`Subspace` and
  :class:`Execution`;
* :func:`gasare` / :func:`scale_by_gasare`: ``k`` entries per matrix (GaSare / GoSare), options
  in :class:`Sparse`;
* :func:`osd` / :func:`scale_by_osd`: Online Subspace Descent, options in :class:`Online`.

The drop-ins (``galore_adamw``, ``golore_sgd``, ``gasare_adamw``, ``osd_sgd``, ...) fix the
inner to Adam or (momentum) SGD, like ``optax.adamw`` / ``optax.sgd``. The option groups are
frozen dataclasses, so ``optax.inject_hyperparams`` keeps them static (only the learning rate,
betas and weight decay become hyperparameters).

Momentum conventions. The paper (He et al. 2024, Algorithm 1) writes momentum as
``M <- (1 - b1) M + b1 R`` (``b1`` weights the NEW gradient). optax's ``scale_by_adam`` uses
``mu <- b1 mu + (1 - b1) g``, so the paper's Adam ``b1 = 0.1`` is optax's ``b1 = 0.9`` (same for
``b2``). For MSGD, optax's ``trace`` is ``T <- m T + g``; with ``m = 1 - b1`` it holds
``T = M / b1``, so the paper's MSGD with learning rate ``lr`` equals ``galore_sgd`` with
``momentum = 1 - b1`` and ``learning_rate = lr * b1`` (see :func:`paper_msgd_hyperparams`).

Typed PRNG keys. The GaLore and GaSare states hold a typed key (``state.key``), which
``np.asarray`` refuses; to convert a state to numpy (pickle, ``np.savez``) take its key data,
``jax.random.key_data(key)``, and restore it with ``jax.random.wrap_key_data`` (README, "The
library").
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import jax
import optax

from golore_jax import _online_pca as online_lib
from golore_jax import _sparse as sparse_lib
from golore_jax import _subspace as subspace_lib
from golore_jax import projectors as projectors_lib
from golore_jax._finish import decay_and_learning_rate
from golore_jax._layout import SIDE_RULES
from golore_jax._planning import (
    MaskArg,
    RankRule,
    is_positive_int,
    require_finite,
    require_positive_int,
    require_static,
)
from golore_jax._quantized import scale_by_adam_8bit
from golore_jax._rotation import SECOND_MOMENT_POLICIES
from golore_jax.projectors import golore_projector

_Transform = optax.GradientTransformationExtraArgs


def _check_group(group: Any, **choices: tuple[Any, ...]) -> None:
    """One-line errors at construction naming the group's field (``golore_jax.Subspace:
    update_every must be a positive int, got 0``): the checks every group shares."""
    owner = f"golore_jax.{type(group).__name__}"
    fields = {f.name: getattr(group, f.name) for f in dataclasses.fields(group)}
    for name in ("update_every", "refresh_batch_size", "orthonormalize_every"):
        if name in fields:
            require_positive_int(owner, name, fields[name], optional=name != "update_every")
    if "rank" in fields and not (callable(fields["rank"]) or is_positive_int(fields["rank"])):
        raise ValueError(
            f"{owner}: rank must be a positive int or a function, got {fields['rank']!r}"
        )
    if "scale" in fields:
        require_finite(owner, "scale", fields["scale"])
    for name, allowed in choices.items():
        value = fields[name]  # by type too: 1 is not True
        if not any(value is a or (type(value) is type(a) and value == a) for a in allowed):
            raise ValueError(f"{owner}: {name} must be one of {allowed}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Subspace:
    """Which rank-``r`` subspace each projected matrix runs in, and how it changes.

    Attributes:
      rank: ``r``, an int or ``(path, (m, n)) -> int | None`` (None: that leaf is not projected).
      update_every: ``tau``; the subspace is refreshed when ``count % tau == 0``.
      scale: ``alpha``, multiplies the back-projected update of projected leaves.
      projector: how a basis is chosen (:mod:`golore_jax.projectors`); None: the exact SVD
        (GaLore).
      mask: which leaves are projected: None (:func:`golore_jax.default_mask`: matrices but the
        embeddings and head), a bool tree like params, or a function of params returning one.
      side: which side of each ``m x n`` matrix is projected: ``"gradient"`` (the smaller
        dimension, the paper's rule), ``"state"`` (fewer state floats; ``optax.contrib.galore``'s
        choice with Adam), ``"left"`` or ``"right"``.
      matrix_split: for leaves with more than 2 dims, ``(path, shape) -> k`` so rows are
        ``shape[:k]``; None: the most square split.
      seed: int seed or PRNG key for random projectors.
      momentum_projection: at a refresh, carry first moments into the new subspace (equation
        (2)). None: the optimizer's default (off, as GaLore's code; on for the SGD drop-ins,
        whose convergence theorems assume it).
      second_moment: what a refresh does to second moments: ``"keep"``, ``"reset"`` or
        ``"project"``.
      allow_full_rank: permit ``rank == min(m, n)`` (no saving; for equivalence checks).
      lazy_refresh: a :class:`golore_jax.LazyRefresh` rule: a matrix whose subspace stopped
        moving is decomposed less often (Q-GaLore); None: every scheduled refresh decomposes.

    >>> Subspace(rank=4, update_every=10).rank
    4
    """

    rank: RankRule = 128
    update_every: int = 200
    scale: float = 0.25
    projector: projectors_lib.Projector | None = None
    mask: MaskArg = None
    side: str = "gradient"
    matrix_split: Callable[[str, tuple[int, ...]], int | None] | None = None
    seed: int | jax.Array = 0
    momentum_projection: bool | None = None
    second_moment: str = "keep"
    allow_full_rank: bool = False
    lazy_refresh: subspace_lib.LazyRefresh | None = None

    def __post_init__(self):
        _check_group(
            self,
            side=SIDE_RULES,
            second_moment=SECOND_MOMENT_POLICIES,
            momentum_projection=(None, True, False),
        )


@dataclasses.dataclass(frozen=True)
class Execution:
    """How GaLore's refresh and projections run: memory, devices and dtypes, not the method.

    Attributes:
      batch_refresh: stack same-shape matrices and decompose them in one batched call.
      refresh_batch_size: at most this many matrices per batched call (bounds the refresh's
        memory); None: no limit.
      refresh_sharding: a sharding (or ``PartitionSpec`` under a mesh) of the stacked axis, so
        each device decomposes its share of the matrices.
      projection_dtype: operand dtype of ``P^T G`` and ``P N`` (None: float32).
      basis_dtype: storage dtype of the bases (None: float32; ``bfloat16`` halves them).

    >>> Execution(refresh_batch_size=16).batch_refresh
    True
    """

    batch_refresh: bool = True
    refresh_batch_size: int | None = None
    refresh_sharding: Any = None
    projection_dtype: Any = None
    basis_dtype: Any = None

    def __post_init__(self):
        _check_group(self, batch_refresh=(True, False))


@dataclasses.dataclass(frozen=True)
class Sparse:
    """GaSare / GoSare's options: which ``k`` entries of each selected matrix are kept.

    Attributes:
      density: fraction of each matrix's entries kept; None with ``k`` None: 0.25 (as many
        values as GaLore's rank 128 on 512-wide matrices). Give at most one of the two.
      k: entries kept per matrix: an int, or ``(path, shape) -> int | None`` (None: dense).
      update_every: ``tau``; the entries are chosen again when ``count % tau == 0``.
      scale: ``alpha``, multiplies the scattered update of selected leaves.
      selector: ``"topk"`` (GaSare: the ``k`` largest ``|G|``) or ``"random"`` (GoSare).
      mask: which leaves are sparsified, as :attr:`Subspace.mask`.
      seed: int seed or PRNG key for GoSare's draws.
      remap_moments: at a refresh, carry moments of entries that stay, zero the new ones
        (Algorithm 5); off: moment slots are kept as they are.

    >>> Sparse(k=5).density is None
    True
    """

    density: float | None = None
    k: sparse_lib.CountRule | None = None
    update_every: int = 200
    scale: float = 0.25
    selector: str = "topk"
    mask: Any = None
    seed: int | jax.Array = 0
    remap_moments: bool = True

    def __post_init__(self):
        _check_group(self, selector=sparse_lib.SELECTORS, remap_moments=(True, False))
        if self.k is not None and self.density is not None:
            raise ValueError(
                f"golore_jax.Sparse: give k or density, not both (k={self.k!r}, "
                f"density={self.density!r})"
            )
        if self.density is not None and not 0.0 < self.density < 1.0:
            raise ValueError(f"golore_jax.Sparse: density must be in (0, 1), got {self.density!r}")


_DEFAULT_DENSITY = 0.25


@dataclasses.dataclass(frozen=True)
class Online:
    """Online Subspace Descent's options: a rank-``r`` basis learnt by online PCA.

    Attributes:
      rank: ``r``, as :attr:`Subspace.rank`.
      update_every: the basis takes one ``projector_optimizer`` step at steps ``t > 0`` with
        ``t % update_every == 0`` (1: every step, the authors' ``continuous`` projection).
      scale: ``alpha``, multiplies the back-projected update of projected leaves.
      mask: which leaves are projected, as :attr:`Subspace.mask`.
      side: as :attr:`Subspace.side`; ``"state"`` also counts ``projector_optimizer``'s moments.
      matrix_split: as :attr:`Subspace.matrix_split`.
      projector_optimizer: the bases' optimizer; None:
        :func:`golore_jax.default_projector_optimizer` (AdamW, lr 1/200, the authors' code).
      orthonormalize_every: re-orthonormalise the basis by QR every N steps; None: never (the
        PCA loss keeps it near orthonormal).

    >>> Online(rank=8).update_every
    1
    """

    rank: RankRule = 128
    update_every: int = 1
    scale: float = 0.25
    mask: MaskArg = None
    side: str = "gradient"
    matrix_split: Callable[[str, tuple[int, ...]], int | None] | None = None
    projector_optimizer: optax.GradientTransformation | None = None
    orthonormalize_every: int | None = None

    def __post_init__(self):
        _check_group(self, side=SIDE_RULES)


def _tail(
    core: _Transform, learning_rate: optax.ScalarOrSchedule, weight_decay: Any, mask: Any
) -> _Transform:
    return optax.chain(core, *decay_and_learning_rate(learning_rate, weight_decay, mask))


def _subspace(options: Subspace | None) -> Subspace:
    if options is not None and not isinstance(options, Subspace):
        raise TypeError(f"subspace must be a golore_jax.Subspace, got {type(options).__name__}")
    return Subspace() if options is None else options


def scale_by_galore(
    inner: optax.GradientTransformation,
    subspace: Subspace | None = None,
    execution: Execution | None = None,
) -> _Transform:
    """Runs ``inner`` (any optax transformation) in a rank-``r`` subspace of each projected
    leaf, its basis refreshed by a projector (Algorithm 1 of arXiv 2410.11289).

    ``inner`` may be a complete optimizer: ``scale_by_galore(optax.adam(1e-3), Subspace(...))``
    is GaLore-Adam without weight decay.

    Extra args: ``subspace_grads`` (a gradient tree used only to choose the subspace); others
    go to ``inner``. :func:`golore_jax.low_rank_update` steps gradients already in the subspace.

    >>> import jax.numpy as jnp, optax
    >>> params = {"w": jnp.ones((4, 6))}
    >>> tx = scale_by_galore(optax.scale_by_adam(), Subspace(rank=2, update_every=10))
    >>> state = tx.init(params)
    >>> state.bases["w"].shape, state.inner_state.mu["w"].shape
    ((4, 2), (2, 6))
    """
    sub = _subspace(subspace)
    run = Execution() if execution is None else execution
    return subspace_lib.scale_by_subspace(
        inner,
        rank=sub.rank,
        update_every=sub.update_every,
        projector=sub.projector,
        scale=sub.scale,
        mask=sub.mask,
        momentum_projection=bool(sub.momentum_projection),
        second_moment=sub.second_moment,
        matrix_split=sub.matrix_split,
        allow_full_rank=sub.allow_full_rank,
        seed=sub.seed,
        side=sub.side,
        lazy_refresh=sub.lazy_refresh,
        **{f.name: getattr(run, f.name) for f in dataclasses.fields(run)},
    )


def galore(
    learning_rate: optax.ScalarOrSchedule,
    base_optimizer: optax.GradientTransformation | None = None,
    subspace: Subspace | None = None,
    *,
    execution: Execution | None = None,
    weight_decay: Any = 0.0,
    weight_decay_mask: Any = None,
) -> _Transform:
    """GaLore / GoLore with any inner optimizer: ``chain(scale_by_galore(base_optimizer, ...),
    add_decayed_weights(weight_decay), scale_by_learning_rate(learning_rate))``.

    ``base_optimizer`` (default ``optax.scale_by_adam()``, as ``optax.contrib.galore``) is any
    optax transformation that gives a descent direction without the learning rate's sign
    (``scale_by_adam``, ``scale_by_lion``, ``trace``, a ``chain`` of them ...); it runs on the
    low-rank gradients and gets no ``params``, so weight decay acts here, on the full weights.
    A complete optimizer (``optax.adam(1e-3)``) goes in :func:`scale_by_galore`, which is then
    the whole optimizer. GoLore: ``Subspace(projector=golore_jax.projectors.random())``;
    GoLore@x%: ``projector=golore_jax.golore_projector(x, total_steps)``.

    >>> import jax.numpy as jnp, optax
    >>> params = {"w": jnp.ones((4, 6))}
    >>> tx = galore(1e-3, optax.scale_by_lion(), Subspace(rank=2, update_every=10))
    >>> updates, state = tx.update(params, tx.init(params), params)
    >>> updates["w"].shape, state[0].bases["w"].shape
    ((4, 6), (4, 2))
    """
    base = optax.scale_by_adam() if base_optimizer is None else base_optimizer
    core = scale_by_galore(base, subspace, execution)
    return _tail(core, learning_rate, weight_decay, weight_decay_mask)


def galore_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    subspace: Subspace | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    mu_dtype: Any = None,
    weight_decay: float = 1e-4,
    weight_decay_mask: Any = None,
    execution: Execution | None = None,
) -> _Transform:
    """GaLore-AdamW: :func:`galore` with ``optax.scale_by_adam(b1, b2, eps, mu_dtype)``.

    Hyperparameters follow optax's conventions (``b1 = 0.9`` is the paper's ``b1 = 0.1``); the
    defaults match GaLore's code (rank 128, refresh every 200, scale 0.25, moments kept at a
    refresh). 8-bit moments: ``galore(lr, gl.scale_by_adam_8bit(), ...)``.

    >>> import jax.numpy as jnp
    >>> params = {"w": jnp.ones((4, 6)), "b": jnp.ones(6)}
    >>> tx = galore_adamw(1e-3, subspace=Subspace(rank=2, update_every=10))
    >>> updates, state = tx.update(params, tx.init(params), params)
    >>> updates["w"].shape, state[0].bases["w"].shape
    ((4, 6), (4, 2))
    """
    # A dtype is callable: optax.inject_hyperparams would take it for a schedule.
    require_static("galore_adamw", "mu_dtype", mu_dtype)
    base = optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype)
    return galore(
        learning_rate,
        base,
        subspace,
        execution=execution,
        weight_decay=weight_decay,
        weight_decay_mask=weight_decay_mask,
    )


def _sgd_inner(momentum: float | None, nesterov: bool = False) -> optax.GradientTransformation:
    return optax.identity() if momentum is None else optax.trace(decay=momentum, nesterov=nesterov)


def galore_sgd(
    learning_rate: optax.ScalarOrSchedule,
    *,
    subspace: Subspace | None = None,
    momentum: float | None = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    execution: Execution | None = None,
) -> _Transform:
    """GaLore with (momentum) SGD inside, optax's convention (``T <- momentum * T + R``).

    Momentum projection (equation (2)) is on unless ``Subspace.momentum_projection=False``: the
    paper's MSGD theorems assume it. :func:`paper_msgd_hyperparams` maps the paper's
    ``(lr, b1)``.

    >>> import jax.numpy as jnp
    >>> params = {"w": jnp.ones((4, 6))}
    >>> tx = galore_sgd(1.0, subspace=Subspace(rank=2, scale=1.0), momentum=None)
    >>> updates, _ = tx.update(params, tx.init(params), params)  # rank-1 G: P P^T G = G
    >>> bool(jnp.allclose(updates["w"], -1.0, atol=1e-5))
    True
    """
    sub = _subspace(subspace)
    if sub.momentum_projection is None:
        sub = dataclasses.replace(sub, momentum_projection=True)
    core = scale_by_galore(_sgd_inner(momentum, nesterov), sub, execution)
    return _tail(core, learning_rate, weight_decay, weight_decay_mask)


def _random_subspaces(dropin: Callable[..., _Transform], name: str) -> Callable[..., _Transform]:
    """GoLore's drop-in: ``dropin`` with ``Subspace.projector = projectors.random()``."""

    @functools.wraps(dropin)
    def golore_dropin(learning_rate, *, subspace: Subspace | None = None, **kwargs):
        sub = _subspace(subspace)
        if sub.projector is not None:
            raise ValueError(
                f"{name} draws every subspace at random: Subspace.projector must be None, got "
                f"{sub.projector!r} (GoLore@x%: galore_* with "
                "projector=golore_jax.golore_projector(x, total_steps))"
            )
        sub = dataclasses.replace(sub, projector=projectors_lib.random())
        return dropin(learning_rate, subspace=sub, **kwargs)

    golore_dropin.__name__ = golore_dropin.__qualname__ = name
    golore_dropin.__doc__ = (
        f"GoLore: :func:`{dropin.__name__}` with random subspaces (Haar on the Stiefel "
        "manifold, ``Subspace.projector = golore_jax.projectors.random()``).\n\n"
        ">>> import jax.numpy as jnp\n"
        ">>> params = {'w': jnp.ones((4, 6))}\n"
        f">>> tx = {name}(1e-3, subspace=Subspace(rank=2, update_every=10))\n"
        ">>> type(tx.init(params)[0]).__name__\n"
        "'ScaleBySubspaceState'\n"
    )
    return golore_dropin


golore_adamw = _random_subspaces(galore_adamw, "golore_adamw")
golore_sgd = _random_subspaces(galore_sgd, "golore_sgd")


def scale_by_gasare(
    inner: optax.GradientTransformation, sparse: Sparse | None = None
) -> _Transform:
    """Runs ``inner`` on ``k`` entries of each selected leaf, chosen every ``update_every``
    steps by their magnitude (GaSare) or at random (GoSare): Algorithm 5 of arXiv 2410.11289.

    >>> import jax.numpy as jnp, optax
    >>> params = {"w": jnp.arange(24.0).reshape(4, 6)}
    >>> tx = scale_by_gasare(optax.identity(), Sparse(k=3, scale=1.0))
    >>> updates, state = tx.update(params, tx.init(params), params)
    >>> state.indices["w"].tolist(), jnp.flatnonzero(updates["w"]).tolist()
    ([21, 22, 23], [21, 22, 23])
    """
    if sparse is not None and not isinstance(sparse, Sparse):
        raise TypeError(f"sparse must be a golore_jax.Sparse, got {type(sparse).__name__}")
    opts = Sparse() if sparse is None else sparse
    density = opts.density
    if opts.k is None and density is None:
        density = _DEFAULT_DENSITY
    return sparse_lib.scale_by_sparse_subspace(
        inner,
        k=opts.k,
        density=density,
        update_every=opts.update_every,
        selector=opts.selector,
        scale=opts.scale,
        mask=opts.mask,
        remap_moments=opts.remap_moments,
        seed=opts.seed,
    )


def gasare(
    learning_rate: optax.ScalarOrSchedule,
    base_optimizer: optax.GradientTransformation | None = None,
    sparse: Sparse | None = None,
    *,
    weight_decay: Any = 0.0,
    weight_decay_mask: Any = None,
) -> _Transform:
    """GaSare / GoSare with any inner optimizer (default ``optax.scale_by_adam()``), weight
    decay and the learning rate after it, as :func:`galore`.

    >>> import jax.numpy as jnp, optax
    >>> params = {"w": jnp.ones((4, 6))}
    >>> tx = gasare(1e-3, optax.scale_by_lion(), Sparse(k=3, selector="random"))
    >>> updates, state = tx.update(params, tx.init(params), params)
    >>> int((updates["w"] != 0).sum()), state[0].indices["w"].shape
    (3, (3,))
    """
    base = optax.scale_by_adam() if base_optimizer is None else base_optimizer
    return _tail(scale_by_gasare(base, sparse), learning_rate, weight_decay, weight_decay_mask)


def gasare_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    sparse: Sparse | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    weight_decay_mask: Any = None,
) -> _Transform:
    """GaSare-AdamW (Appendix C, Algorithm 5): Adam on the Top-k entries of ``|G|``.

    >>> import jax.numpy as jnp
    >>> params = {"w": jnp.ones((4, 6))}
    >>> tx = gasare_adamw(1e-3, sparse=Sparse(k=3, update_every=10), weight_decay=0.0)
    >>> updates, state = tx.update(params, tx.init(params), params)
    >>> updates["w"].shape, state[0].indices["w"].shape, int((updates["w"] != 0).sum())
    ((4, 6), (3,), 3)
    """
    base = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
    return gasare(
        learning_rate, base, sparse, weight_decay=weight_decay, weight_decay_mask=weight_decay_mask
    )


def gasare_sgd(
    learning_rate: optax.ScalarOrSchedule,
    *,
    sparse: Sparse | None = None,
    momentum: float | None = 0.9,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
) -> _Transform:
    """GaSare with (momentum) SGD: Algorithm 5's MSGD (optax's momentum convention).

    >>> import jax.numpy as jnp
    >>> params = {"w": jnp.arange(24.0).reshape(4, 6)}
    >>> tx = gasare_sgd(1.0, sparse=Sparse(k=2, scale=1.0), momentum=None)
    >>> updates, _ = tx.update(params, tx.init(params), params)  # the 2 largest entries
    >>> jnp.flatnonzero(updates["w"]).tolist(), updates["w"].min().item()
    ([22, 23], -23.0)
    """
    return gasare(
        learning_rate,
        _sgd_inner(momentum),
        sparse,
        weight_decay=weight_decay,
        weight_decay_mask=weight_decay_mask,
    )


def _random_entries(dropin: Callable[..., _Transform], name: str) -> Callable[..., _Transform]:
    """GoSare's drop-in: ``dropin`` with ``Sparse.selector = "random"``."""

    @functools.wraps(dropin)
    def gosare_dropin(learning_rate, *, sparse: Sparse | None = None, **kwargs):
        opts = Sparse() if sparse is None else sparse
        return dropin(learning_rate, sparse=dataclasses.replace(opts, selector="random"), **kwargs)

    gosare_dropin.__name__ = gosare_dropin.__qualname__ = name
    gosare_dropin.__doc__ = (
        f"GoSare: :func:`{dropin.__name__}` with the ``k`` entries drawn uniformly at random "
        "at every refresh (``Sparse.selector = 'random'``, whatever it was).\n\n"
        ">>> import jax.numpy as jnp\n"
        ">>> params = {'w': jnp.ones((4, 6))}\n"
        f">>> tx = {name}(1e-3, sparse=Sparse(k=3))\n"
        ">>> tx.init(params)[0].indices['w'].shape\n"
        "(3,)\n"
    )
    return gosare_dropin


gosare_adamw = _random_entries(gasare_adamw, "gosare_adamw")
gosare_sgd = _random_entries(gasare_sgd, "gosare_sgd")


def scale_by_osd(inner: optax.GradientTransformation, online: Online | None = None) -> _Transform:
    """Runs ``inner`` in a rank-``r`` subspace tracked by online PCA (Online Subspace Descent,
    arXiv 2408.12857): one SVD at step 0, then ``Online.projector_optimizer`` steps the basis
    on the reconstruction loss of the normalised gradient.

    >>> import jax.numpy as jnp, optax
    >>> params = {"w": jnp.ones((4, 6))}
    >>> tx = scale_by_osd(optax.identity(), Online(rank=2, scale=1.0))
    >>> updates, state = tx.update(params, tx.init(params), params)  # t = 0: one SVD
    >>> state.bases["w"].shape, bool(jnp.allclose(updates["w"], 1.0, atol=1e-5))
    ((4, 2), True)
    """
    if online is not None and not isinstance(online, Online):
        raise TypeError(f"online must be a golore_jax.Online, got {type(online).__name__}")
    opts = Online() if online is None else online
    return online_lib.scale_by_online_subspace(
        inner, **{f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)}
    )


def osd(
    learning_rate: optax.ScalarOrSchedule,
    base_optimizer: optax.GradientTransformation | None = None,
    online: Online | None = None,
    *,
    weight_decay: Any = 0.0,
    weight_decay_mask: Any = None,
) -> _Transform:
    """Online Subspace Descent with any inner optimizer (default ``optax.scale_by_adam()``),
    weight decay and the learning rate after it, as :func:`galore`.

    >>> import jax.numpy as jnp, optax
    >>> params = {"w": jnp.ones((4, 6))}
    >>> tx = osd(1e-3, optax.scale_by_lion(), Online(rank=2))
    >>> updates, state = tx.update(params, tx.init(params), params)
    >>> updates["w"].shape, state[0].bases["w"].shape
    ((4, 6), (4, 2))
    """
    base = optax.scale_by_adam() if base_optimizer is None else base_optimizer
    return _tail(scale_by_osd(base, online), learning_rate, weight_decay, weight_decay_mask)


def osd_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    online: Online | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    weight_decay_mask: Any = None,
) -> _Transform:
    """Online Subspace Descent with AdamW: :func:`osd` with ``optax.scale_by_adam``.

    >>> import jax.numpy as jnp
    >>> params = {"w": jnp.ones((4, 6))}
    >>> tx = osd_adamw(1e-3, online=Online(rank=2))
    >>> updates, state = tx.update(params, tx.init(params), params)
    >>> updates["w"].shape, state[0].bases["w"].shape
    ((4, 6), (4, 2))
    """
    base = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
    return osd(
        learning_rate, base, online, weight_decay=weight_decay, weight_decay_mask=weight_decay_mask
    )


def osd_sgd(
    learning_rate: optax.ScalarOrSchedule,
    *,
    online: Online | None = None,
    momentum: float | None = 0.9,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
) -> _Transform:
    """Online Subspace Descent with (momentum) SGD inside (optax's momentum convention).

    >>> import jax.numpy as jnp
    >>> params = {"w": jnp.ones((4, 6))}
    >>> tx = osd_sgd(1.0, online=Online(rank=2, scale=1.0), momentum=None)
    >>> updates, _ = tx.update(params, tx.init(params), params)  # rank-1 G: P P^T G = G
    >>> bool(jnp.allclose(updates["w"], -1.0, atol=1e-5))
    True
    """
    return osd(
        learning_rate,
        _sgd_inner(momentum),
        online,
        weight_decay=weight_decay,
        weight_decay_mask=weight_decay_mask,
    )


def paper_msgd_hyperparams(learning_rate: float, beta1: float) -> dict[str, float]:
    """Maps the paper's MSGD ``(lr, b1)`` to :func:`galore_sgd`'s ``learning_rate, momentum``.

    >>> paper_msgd_hyperparams(0.1, 0.5)
    {'learning_rate': 0.05, 'momentum': 0.5}
    """
    if not 0.0 < beta1 <= 1.0:
        raise ValueError(f"the paper's beta1 must be in (0, 1], got {beta1}")
    return {"learning_rate": learning_rate * beta1, "momentum": 1.0 - beta1}


# ---------------------------------------------------------------------------------------------
# Deprecated for one release (0.1 -> 0.2): the drop-ins' flat keywords (``galore_adamw(rank=...,
# update_every=..., golore_fraction=..., quantized_moments=...)``) and the package-level names
# ``scale_by_subspace`` / ``scale_by_sparse_subspace`` / ``scale_by_online_subspace``. They warn
# and build exactly what the new spelling builds.
# ---------------------------------------------------------------------------------------------

_SUBSPACE_FIELDS = frozenset(f.name for f in dataclasses.fields(Subspace))
_EXECUTION_FIELDS = frozenset(f.name for f in dataclasses.fields(Execution))


def _spelled(group: str, fields: dict[str, Any]) -> str:
    def short(v: Any) -> str:
        text = repr(v)
        return text if len(text) <= 48 else f"{type(v).__name__}(...)"

    return f"golore_jax.{group}({', '.join(f'{k}={short(v)}' for k, v in fields.items())})"


def _take(flat: dict[str, Any], names: frozenset[str]) -> dict[str, Any]:
    return {k: flat.pop(k) for k in list(flat) if k in names}


def _warn_flat(name: str, given: dict[str, Any], replacement: str) -> None:
    warnings.warn(
        f"golore_jax.{name}({', '.join(f'{k}=...' for k in given)}) is deprecated and will be "
        f"removed in the next release: write {replacement}",
        DeprecationWarning,
        stacklevel=4,
    )


def _basis_call(name: str, dropin: Callable[..., _Transform], flat: dict, kwargs: dict):
    """The new call for a basis drop-in's flat keywords: a Subspace, an Execution, GoLore's
    fraction as a projector, 8-bit moments as :func:`galore`'s inner."""
    given = dict(flat)
    fraction = flat.pop("golore_fraction", 1.0 if name.startswith("golore") else None)
    total_steps = flat.pop("total_steps", None)
    quantized = flat.pop("quantized_moments", False) if name.endswith("adamw") else False
    sub_fields, run_fields = _take(flat, _SUBSPACE_FIELDS), _take(flat, _EXECUTION_FIELDS)
    if flat:
        raise TypeError(f"{name}() got an unexpected keyword argument {next(iter(flat))!r}")
    if sub_fields and kwargs.get("subspace") is not None:
        raise TypeError(f"{name}: give subspace=Subspace(...) or the old keywords, not both")
    if run_fields and kwargs.get("execution") is not None:
        raise TypeError(f"{name}: give execution=Execution(...) or the old keywords, not both")
    sub = kwargs.pop("subspace", None) or Subspace(**sub_fields)
    target = name.replace("golore", "galore")
    if name.startswith("golore") and fraction == 1.0 and sub.projector is None:
        fraction, target = None, name  # plain GoLore: the golore_* drop-in draws at random
    if fraction is not None:
        if fraction == 1.0 and sub.projector is not None:
            raise ValueError(
                "golore_fraction=1.0 draws every subspace at random: projector would be unused "
                "(give golore_fraction < 1 to run it before the random phase)"
            )
        projector = golore_projector(fraction, total_steps, before=sub.projector)
        sub = dataclasses.replace(sub, projector=projector)
        sub_fields["projector"] = projector
    if run_fields:
        kwargs["execution"] = Execution(**run_fields)
    replacement = f"golore_jax.{target}(..., subspace={_spelled('Subspace', sub_fields)}"
    if run_fields:
        replacement += f", execution={_spelled('Execution', run_fields)}"
    _warn_flat(name, given, replacement + ")")
    if quantized:  # 8-bit Adam moments: galore() with that inner (mu_dtype did not apply)
        adam = {k: kwargs.pop(k) for k in ("b1", "b2", "eps") if k in kwargs}
        kwargs.pop("mu_dtype", None)
        kwargs.setdefault(
            "weight_decay", inspect.signature(galore_adamw).parameters["weight_decay"].default
        )
        if target.startswith("golore"):
            sub = dataclasses.replace(sub, projector=projectors_lib.random())
        return lambda lr: galore(lr, scale_by_adam_8bit(**adam), sub, **kwargs)
    dropin = globals()[target]
    return lambda lr: dropin(lr, subspace=sub, **kwargs)


def _group_call(group: type, keyword: str) -> Callable:
    """The new call for a sparse or online drop-in's flat keywords: its one option group."""
    fields_of_group = frozenset(f.name for f in dataclasses.fields(group))

    def translate(name: str, dropin: Callable[..., _Transform], flat: dict, kwargs: dict):
        given = dict(flat)
        fields = _take(flat, fields_of_group)
        if flat:
            raise TypeError(f"{name}() got an unexpected keyword argument {next(iter(flat))!r}")
        if kwargs.get(keyword) is not None:
            raise TypeError(f"{name}: give {keyword}=... or the old keywords, not both")
        if fields.get("k") is not None:
            fields.pop("density", None)  # an explicit k replaced the default density
        spelled = _spelled(group.__name__, fields)
        _warn_flat(name, given, f"golore_jax.{name}(..., {keyword}={spelled})")
        return lambda lr: dropin(lr, **{keyword: group(**fields)}, **kwargs)

    return translate


def _accept_flat_keywords(dropin: Callable[..., _Transform], translate: Callable):
    """``dropin`` that also takes its 0.1 flat keywords, with a DeprecationWarning. Its
    signature (``inspect.signature``, which ``optax.inject_hyperparams`` binds) is the new one."""
    new = inspect.signature(dropin).parameters

    @functools.wraps(dropin)
    def accepting(learning_rate, **kwargs):
        flat = {k: kwargs.pop(k) for k in list(kwargs) if k not in new}
        if not flat:
            return dropin(learning_rate, **kwargs)
        return translate(dropin.__name__, dropin, flat, kwargs)(learning_rate)

    return accepting


galore_adamw, galore_sgd, golore_adamw, golore_sgd = (
    _accept_flat_keywords(f, _basis_call)
    for f in (galore_adamw, galore_sgd, golore_adamw, golore_sgd)
)
gasare_adamw, gasare_sgd, gosare_adamw, gosare_sgd = (
    _accept_flat_keywords(f, _group_call(Sparse, "sparse"))
    for f in (gasare_adamw, gasare_sgd, gosare_adamw, gosare_sgd)
)
osd_adamw, osd_sgd = (
    _accept_flat_keywords(f, _group_call(Online, "online")) for f in (osd_adamw, osd_sgd)
)

# Package-level 0.1 names -> (implementation, replacement); golore_jax.__getattr__ warns.
_DEPRECATED_NAMES = {
    "scale_by_subspace": (
        subspace_lib.scale_by_subspace,
        "golore_jax.scale_by_galore(inner, golore_jax.Subspace(...), golore_jax.Execution(...))",
    ),
    "scale_by_sparse_subspace": (
        sparse_lib.scale_by_sparse_subspace,
        "golore_jax.scale_by_gasare(inner, golore_jax.Sparse(...))",
    ),
    "scale_by_online_subspace": (
        online_lib.scale_by_online_subspace,
        "golore_jax.scale_by_osd(inner, golore_jax.Online(...))",
    ),
}
