"""golore_jax: GaLore, GoLore and other subspace optimizers as optax transformations.

He et al., "Subspace Optimization for Large Language Models with Convergence Guarantees"
(arXiv 2410.11289); Zhao et al., "GaLore" (arXiv 2403.03507).
"""

from golore_jax import (
    aliases,
    finish,
    layerwise,
    layout,
    online_pca,
    planning,
    precision,
    projectors,
    refresh,
    rotation,
    sparse,
    subspace,
    tail,
)
from golore_jax.aliases import *  # noqa: F403  (the drop-in optimizers; aliases.__all__)
from golore_jax.memory import optimizer_state_floats, subspace_state_floats
from golore_jax.online_pca import ScaleByOnlineSubspaceState, scale_by_online_subspace
from golore_jax.planning import count_moments, default_mask, subspace_layouts
from golore_jax.precision import apply_updates_stochastic, stochastic_round_to_bf16
from golore_jax.quantized import scale_by_adam_8bit
from golore_jax.sparse import ScaleBySparseSubspaceState, scale_by_sparse_subspace
from golore_jax.subspace import ScaleBySubspaceState, low_rank_update, scale_by_subspace

__all__ = [
    *aliases.__all__,
    "ScaleByOnlineSubspaceState",
    "ScaleBySparseSubspaceState",
    "ScaleBySubspaceState",
    "aliases",
    "apply_updates_stochastic",
    "count_moments",
    "default_mask",
    "finish",
    "layerwise",
    "layout",
    "low_rank_update",
    "online_pca",
    "optimizer_state_floats",
    "planning",
    "precision",
    "projectors",
    "refresh",
    "rotation",
    "scale_by_adam_8bit",
    "scale_by_online_subspace",
    "scale_by_sparse_subspace",
    "scale_by_subspace",
    "sparse",
    "stochastic_round_to_bf16",
    "subspace",
    "subspace_layouts",
    "subspace_state_floats",
    "tail",
]

__version__ = "0.1.0"
