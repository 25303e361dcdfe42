"""Drop-in optimizers in the style of ``optax.adamw`` / ``optax.sgd``.

Momentum conventions. The paper (He et al. 2024, Algorithm 1) writes momentum as
``M <- (1 - b1) M + b1 R`` (``b1`` weights the NEW gradient). optax's ``scale_by_adam`` uses
``mu <- b1 mu + (1 - b1) g``, so the paper's Adam ``b1 = 0.1`` is optax's ``b1 = 0.9`` (same for
``b2``). For MSGD, optax's ``trace`` is ``T <- m T + g``; with ``m = 1 - b1`` it holds
``T = M / b1``, so the paper's MSGD with learning rate ``lr`` equals ``galore_sgd`` with
``momentum = 1 - b1`` and ``learning_rate = lr * b1`` (see :func:`paper_msgd_hyperparams`).
"""

from __future__ import annotations

from typing import Any

import optax

from golore_jax import projectors as projectors_lib
from golore_jax.online_pca import scale_by_online_subspace
from golore_jax.quantized import scale_by_adam_8bit
from golore_jax.sparse import scale_by_sparse_subspace
from golore_jax.subspace import RankRule, scale_by_subspace


def paper_msgd_hyperparams(learning_rate: float, beta1: float) -> dict[str, float]:
    """Maps the paper's MSGD ``(lr, b1)`` to :func:`galore_sgd`'s ``learning_rate, momentum``."""
    if not 0.0 < beta1 <= 1.0:
        raise ValueError(f"the paper's beta1 must be in (0, 1], got {beta1}")
    return {"learning_rate": learning_rate * beta1, "momentum": 1.0 - beta1}


def golore_projector(
    golore_fraction: float,
    total_steps: int | None,
    before: projectors_lib.Projector | None = None,
) -> projectors_lib.Projector:
    """GoLore@x%: random for the last ``golore_fraction`` of ``total_steps``, ``before``
    (default: the exact SVD) until then."""
    if not 0.0 < golore_fraction <= 1.0:
        raise ValueError(f"golore_fraction must be in (0, 1], got {golore_fraction}")
    if golore_fraction == 1.0:
        return projectors_lib.random()
    if total_steps is None or total_steps <= 0:
        raise ValueError(
            f"golore_fraction={golore_fraction} needs total_steps > 0 to place the switch, "
            f"got total_steps={total_steps}"
        )
    return projectors_lib.hybrid(
        switch_step=round((1.0 - golore_fraction) * total_steps), before=before
    )


def _subspace_optimizer(
    inner: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float,
    weight_decay_mask: Any,
    **subspace_kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
    parts = [scale_by_subspace(inner, **subspace_kwargs)]
    if not isinstance(weight_decay, int | float) or weight_decay:  # may be traced (inject)
        # Decoupled weight decay on the full weights, as GaLore does.
        parts.append(optax.add_decayed_weights(weight_decay, weight_decay_mask))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


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
    mask: Any = None,
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
    ``scale_by_subspace``).
    """
    if quantized_moments:
        inner = scale_by_adam_8bit(b1=b1, b2=b2, eps=eps)
    else:
        inner = optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype)
    return _subspace_optimizer(
        inner,
        learning_rate,
        weight_decay,
        weight_decay_mask,
        rank=rank,
        update_every=update_every,
        projector=projector if projector is not None else projectors_lib.svd(),
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


def golore_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    golore_fraction: float = 1.0,
    total_steps: int | None = None,
    **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
    """GoLore-AdamW: random (Haar) subspaces; ``golore_fraction < 1`` gives the hybrid.

    ``golore_fraction=0.2, total_steps=T`` is the paper's GoLore@20%: GaLore's SVD projector
    for the first 80% of ``T`` steps, random projections after. Other arguments as
    :func:`galore_adamw`.
    """
    return galore_adamw(
        learning_rate, projector=golore_projector(golore_fraction, total_steps), **kwargs
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
    mask: Any = None,
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
    MSGD are proved with it. Use :func:`paper_msgd_hyperparams` to map the paper's ``(lr, b1)``.
    """
    inner = optax.identity() if momentum is None else optax.trace(decay=momentum, nesterov=nesterov)
    return _subspace_optimizer(
        inner,
        learning_rate,
        weight_decay,
        weight_decay_mask,
        rank=rank,
        update_every=update_every,
        projector=projector if projector is not None else projectors_lib.svd(),
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


def golore_sgd(
    learning_rate: optax.ScalarOrSchedule,
    *,
    golore_fraction: float = 1.0,
    total_steps: int | None = None,
    **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
    """GoLore with (momentum) SGD; ``golore_fraction < 1`` gives the hybrid (see golore_adamw)."""
    return galore_sgd(
        learning_rate, projector=golore_projector(golore_fraction, total_steps), **kwargs
    )


def _finish(
    core: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float,
    weight_decay_mask: Any,
) -> optax.GradientTransformationExtraArgs:
    """``core``, then decoupled weight decay on the full weights, then the learning rate."""
    parts = [core]
    if not isinstance(weight_decay, int | float) or weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay, weight_decay_mask))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


def _sparse_optimizer(
    inner: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    selector: str,
    *,
    k: Any,
    density: float | None,
    update_every: int,
    scale: float,
    weight_decay: float,
    weight_decay_mask: Any,
    mask: Any,
    seed: int,
) -> optax.GradientTransformationExtraArgs:
    if k is not None:
        density = None  # an explicit k replaces the default density
    core = scale_by_sparse_subspace(
        inner,
        k=k,
        density=density,
        update_every=update_every,
        selector=selector,
        scale=scale,
        mask=mask,
        seed=seed,
    )
    return _finish(core, learning_rate, weight_decay, weight_decay_mask)


def gasare_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    density: float | None = 0.25,
    k: Any = None,
    update_every: int = 200,
    scale: float = 0.25,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    weight_decay_mask: Any = None,
    mask: Any = None,
    seed: int = 0,
    selector: str = "topk",
) -> optax.GradientTransformationExtraArgs:
    """GaSare-AdamW (Appendix C, Algorithm 5): Adam on the Top-k entries of ``|G|``.

    ``density=0.25`` keeps as many values as GaLore's rank 128 on 512-wide matrices
    (LLaMA-60M); ``k`` (an int or a rule) overrides it. Other defaults as :func:`galore_adamw`.
    """
    return _sparse_optimizer(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        learning_rate,
        selector,
        k=k,
        density=density,
        update_every=update_every,
        scale=scale,
        weight_decay=weight_decay,
        weight_decay_mask=weight_decay_mask,
        mask=mask,
        seed=seed,
    )


def gosare_adamw(
    learning_rate: optax.ScalarOrSchedule, **kwargs: Any
) -> optax.GradientTransformationExtraArgs:
    """GoSare-AdamW: Adam on ``k`` entries chosen uniformly at random (see gasare_adamw)."""
    return gasare_adamw(learning_rate, selector="random", **kwargs)


def gasare_sgd(
    learning_rate: optax.ScalarOrSchedule,
    *,
    density: float | None = 0.25,
    k: Any = None,
    update_every: int = 200,
    scale: float = 0.25,
    momentum: float | None = 0.9,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    mask: Any = None,
    seed: int = 0,
    selector: str = "topk",
) -> optax.GradientTransformationExtraArgs:
    """GaSare with (momentum) SGD: Algorithm 5's MSGD (optax convention, see the module doc)."""
    inner = optax.identity() if momentum is None else optax.trace(decay=momentum)
    return _sparse_optimizer(
        inner,
        learning_rate,
        selector,
        k=k,
        density=density,
        update_every=update_every,
        scale=scale,
        weight_decay=weight_decay,
        weight_decay_mask=weight_decay_mask,
        mask=mask,
        seed=seed,
    )


def gosare_sgd(
    learning_rate: optax.ScalarOrSchedule, **kwargs: Any
) -> optax.GradientTransformationExtraArgs:
    """GoSare with (momentum) SGD: random masks (see gasare_sgd)."""
    return gasare_sgd(learning_rate, selector="random", **kwargs)


def osd_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: RankRule = 128,
    update_every: int = 1,
    projector_optimizer: optax.GradientTransformation | None = None,
    orthonormalize_every: int | None = None,
    scale: float = 0.25,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    weight_decay_mask: Any = None,
    mask: Any = None,
    side: str = "gradient",
) -> optax.GradientTransformationExtraArgs:
    """Online Subspace Descent with AdamW (arXiv 2408.12857): P tracked by online PCA.

    ``projector_optimizer`` defaults to AdamW with lr ``1/200`` (the authors' code, see
    :mod:`golore_jax.online_pca`). Other defaults as :func:`galore_adamw`.
    """
    core = scale_by_online_subspace(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        rank=rank,
        update_every=update_every,
        projector_optimizer=projector_optimizer,
        orthonormalize_every=orthonormalize_every,
        scale=scale,
        mask=mask,
        side=side,
    )
    return _finish(core, learning_rate, weight_decay, weight_decay_mask)


def osd_sgd(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: RankRule = 128,
    update_every: int = 1,
    projector_optimizer: optax.GradientTransformation | None = None,
    orthonormalize_every: int | None = None,
    scale: float = 0.25,
    momentum: float | None = 0.9,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    mask: Any = None,
    side: str = "gradient",
) -> optax.GradientTransformationExtraArgs:
    """Online Subspace Descent with (momentum) SGD inside (optax's momentum convention)."""
    inner = optax.identity() if momentum is None else optax.trace(decay=momentum)
    core = scale_by_online_subspace(
        inner,
        rank=rank,
        update_every=update_every,
        projector_optimizer=projector_optimizer,
        orthonormalize_every=orthonormalize_every,
        scale=scale,
        mask=mask,
        side=side,
    )
    return _finish(core, learning_rate, weight_decay, weight_decay_mask)
