"""How every alias ends: decoupled weight decay on the full weights, then the learning rate.

The alias of a transform ``core`` is ``optax.chain(core, *decay_and_learning_rate(...))``, as
``optax.adamw`` is ``chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate)``.

>>> import jax.numpy as jnp, optax
>>> tx = optax.chain(optax.identity(), *decay_and_learning_rate(0.1, 0.5))
>>> params = {"w": jnp.ones(2)}
>>> tx.update({"w": jnp.ones(2)}, tx.init(params), params)[0]["w"].tolist()
[-0.15000000596046448, -0.15000000596046448]
"""

from __future__ import annotations

from typing import Any

import optax

from golore_jax._planning import require_static


def decay_and_learning_rate(
    learning_rate: optax.ScalarOrSchedule, weight_decay: float = 0.0, weight_decay_mask: Any = None
) -> tuple[optax.GradientTransformation, ...]:
    """``add_decayed_weights(weight_decay, weight_decay_mask)`` (left out when it is a Python
    zero) and ``scale_by_learning_rate(learning_rate)``: the transforms that follow ``core``.

    Decay acts on the full weights after the subspace step, as in GaLore. ``weight_decay`` may
    be traced (``optax.inject_hyperparams``), then the decay is always kept.
    """
    # A mask function under optax.inject_hyperparams is called as a schedule (an array here).
    require_static("golore_jax", "weight_decay_mask", weight_decay_mask)
    if isinstance(weight_decay_mask, bool):  # what such a schedule returns for most masks
        raise TypeError(
            "golore_jax: weight_decay_mask must be a tree of bools or a function of params, got "
            f"{weight_decay_mask!r} (under optax.inject_hyperparams a mask function is called as "
            "a schedule: pass static_args=('weight_decay_mask',))"
        )
    parts = []
    if not isinstance(weight_decay, int | float) or weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay, weight_decay_mask))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return tuple(parts)
