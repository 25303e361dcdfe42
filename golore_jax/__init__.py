"""golore_jax: GaLore, GoLore and other subspace optimizers as optax transformations.

He et al., "Subspace Optimization for Large Language Models with Convergence Guarantees"
(arXiv 2410.11289); Zhao et al., "GaLore" (arXiv 2403.03507).

The public API is the names in ``__all__`` below and two namespaces, :mod:`golore_jax.projectors`
(how a subspace is chosen) and :mod:`golore_jax.layerwise` (a transform per stacked layer).
The other modules are the implementation: importable, but not an API (they may change
without deprecation).
"""

import warnings as _warnings

from golore_jax import aliases as _aliases
from golore_jax import layerwise, projectors
from golore_jax.aliases import *  # noqa: F403  (the optimizers and their options: aliases.__all__)
from golore_jax.aliases import _DEPRECATED_NAMES
from golore_jax.memory import optimizer_state_floats, subspace_state_floats
from golore_jax.online_pca import ScaleByOnlineSubspaceState, default_projector_optimizer
from golore_jax.partitioning import state_partition_specs
from golore_jax.planning import count_moments, default_mask, subspace_layouts
from golore_jax.precision import apply_updates_stochastic, stochastic_round_to_bf16
from golore_jax.quantized import scale_by_adam_8bit
from golore_jax.sparse import ScaleBySparseSubspaceState
from golore_jax.subspace import (
    LazyRefresh,
    ScaleBySubspaceState,
    low_rank_update,
    refresh_counts,
)

__all__ = [
    *_aliases.__all__,
    "LazyRefresh",
    "ScaleByOnlineSubspaceState",
    "ScaleBySparseSubspaceState",
    "ScaleBySubspaceState",
    "apply_updates_stochastic",
    "count_moments",
    "default_mask",
    "default_projector_optimizer",
    "layerwise",
    "low_rank_update",
    "optimizer_state_floats",
    "projectors",
    "refresh_counts",
    "scale_by_adam_8bit",
    "state_partition_specs",
    "stochastic_round_to_bf16",
    "subspace_layouts",
    "subspace_state_floats",
]


def __getattr__(name: str):
    """The 0.1 names kept for one release: they warn and name their replacement."""
    if name in _DEPRECATED_NAMES:
        implementation, replacement = _DEPRECATED_NAMES[name]
        _warnings.warn(
            f"golore_jax.{name} is deprecated and will be removed in the next release: "
            f"use {replacement}",
            DeprecationWarning,
            stacklevel=2,
        )
        return implementation
    raise AttributeError(f"module 'golore_jax' has no attribute {name!r}")


__version__ = "0.2.0"
