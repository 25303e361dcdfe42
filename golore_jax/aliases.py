"""Drop-in optimizers in the style of ``optax.adamw`` / ``optax.sgd``, one family per module:
:mod:`golore_jax.subspace` (GaLore, GoLore and the hybrid), :mod:`golore_jax.sparse` (GaSare,
GoSare), :mod:`golore_jax.online_pca` (Online Subspace Descent). Each alias is one
``optax.chain(scale_by_*, *decay_and_learning_rate(...))``; this module re-exports them.

Momentum conventions. The paper (He et al. 2024, Algorithm 1) writes momentum as
``M <- (1 - b1) M + b1 R`` (``b1`` weights the NEW gradient). optax's ``scale_by_adam`` uses
``mu <- b1 mu + (1 - b1) g``, so the paper's Adam ``b1 = 0.1`` is optax's ``b1 = 0.9`` (same for
``b2``). For MSGD, optax's ``trace`` is ``T <- m T + g``; with ``m = 1 - b1`` it holds
``T = M / b1``, so the paper's MSGD with learning rate ``lr`` equals ``galore_sgd`` with
``momentum = 1 - b1`` and ``learning_rate = lr * b1`` (see :func:`paper_msgd_hyperparams`).
"""

from __future__ import annotations

from golore_jax.online_pca import osd_adamw, osd_sgd
from golore_jax.projectors import golore_projector
from golore_jax.sparse import gasare_adamw, gasare_sgd, gosare_adamw, gosare_sgd
from golore_jax.subspace import galore_adamw, galore_sgd, golore_adamw, golore_sgd

__all__ = [
    "galore_adamw",
    "galore_sgd",
    "gasare_adamw",
    "gasare_sgd",
    "golore_adamw",
    "golore_projector",
    "golore_sgd",
    "gosare_adamw",
    "gosare_sgd",
    "osd_adamw",
    "osd_sgd",
    "paper_msgd_hyperparams",
]


def paper_msgd_hyperparams(learning_rate: float, beta1: float) -> dict[str, float]:
    """Maps the paper's MSGD ``(lr, b1)`` to :func:`galore_sgd`'s ``learning_rate, momentum``.

    >>> paper_msgd_hyperparams(0.1, 0.5)
    {'learning_rate': 0.05, 'momentum': 0.5}
    """
    if not 0.0 < beta1 <= 1.0:
        raise ValueError(f"the paper's beta1 must be in (0, 1], got {beta1}")
    return {"learning_rate": learning_rate * beta1, "momentum": 1.0 - beta1}
