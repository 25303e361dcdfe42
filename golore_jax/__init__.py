"""golore_jax: GaLore, GoLore and other subspace optimizers as optax transformations.

He et al., "Subspace Optimization for Large Language Models with Convergence Guarantees"
(arXiv 2410.11289); Zhao et al., "GaLore" (arXiv 2403.03507).
"""

from golore_jax import layout, projectors
from golore_jax.aliases import (
    galore_adamw,
    galore_sgd,
    golore_adamw,
    golore_projector,
    golore_sgd,
    paper_msgd_hyperparams,
)
from golore_jax.memory import optimizer_state_floats, subspace_state_floats
from golore_jax.subspace import ScaleBySubspaceState, default_mask, scale_by_subspace

__all__ = [
    "ScaleBySubspaceState",
    "default_mask",
    "galore_adamw",
    "galore_sgd",
    "golore_adamw",
    "golore_projector",
    "golore_sgd",
    "layout",
    "optimizer_state_floats",
    "paper_msgd_hyperparams",
    "projectors",
    "scale_by_subspace",
    "subspace_state_floats",
]

__version__ = "0.1.0"
