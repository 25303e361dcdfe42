"""golore_jax: GaLore, GoLore and other subspace optimizers as optax transformations.

He et al., "Subspace Optimization for Large Language Models with Convergence Guarantees"
(arXiv 2410.11289); Zhao et al., "GaLore" (arXiv 2403.03507).

The public API is the names in ``__all__`` below, written once here; three of them are
namespaces: :mod:`golore_jax.projectors` (how a subspace is chosen), :mod:`golore_jax.layerwise`
(a transform per stacked layer) and :mod:`golore_jax.partitioning` (an optimizer state's
partition specs). The implementation modules are private (``golore_jax._subspace``, ...: they
change without deprecation); their 0.1 paths (``golore_jax.subspace``, ...) warn for one
release.
"""

import warnings as _warnings

from golore_jax import _moved, layerwise, partitioning, projectors
from golore_jax._aliases import (
    _DEPRECATED_NAMES,
    Execution,
    Online,
    Sparse,
    Subspace,
    galore,
    galore_adamw,
    galore_sgd,
    gasare,
    gasare_adamw,
    gasare_sgd,
    golore_adamw,
    golore_sgd,
    gosare_adamw,
    gosare_sgd,
    osd,
    osd_adamw,
    osd_sgd,
    paper_msgd_hyperparams,
    scale_by_galore,
    scale_by_gasare,
    scale_by_osd,
)
from golore_jax._basis_storage import float_bases
from golore_jax._layout import MatrixLayout, make_layout
from golore_jax._memory import optimizer_state_floats, subspace_state_floats
from golore_jax._online_pca import ScaleByOnlineSubspaceState, default_projector_optimizer
from golore_jax._planning import count_moments, default_mask, subspace_layouts
from golore_jax._precision import (
    Int8Weight,
    apply_updates_stochastic,
    dequantize_int8_tree,
    quantize_int8,
    stochastic_round_to_bf16,
)
from golore_jax._quantized import scale_by_adam_8bit
from golore_jax._sparse import ScaleBySparseSubspaceState
from golore_jax._subspace import (
    LazyRefresh,
    ScaleBySubspaceState,
    low_rank_update,
    refresh_counts,
)
from golore_jax.partitioning import state_partition_specs
from golore_jax.projectors import golore_projector

__all__ = [
    "Execution",
    "Int8Weight",
    "LazyRefresh",
    "MatrixLayout",
    "Online",
    "ScaleByOnlineSubspaceState",
    "ScaleBySparseSubspaceState",
    "ScaleBySubspaceState",
    "Sparse",
    "Subspace",
    "apply_updates_stochastic",
    "count_moments",
    "default_mask",
    "default_projector_optimizer",
    "dequantize_int8_tree",
    "float_bases",
    "galore",
    "galore_adamw",
    "galore_sgd",
    "gasare",
    "gasare_adamw",
    "gasare_sgd",
    "golore_adamw",
    "golore_projector",
    "golore_sgd",
    "gosare_adamw",
    "gosare_sgd",
    "layerwise",
    "low_rank_update",
    "make_layout",
    "optimizer_state_floats",
    "osd",
    "osd_adamw",
    "osd_sgd",
    "paper_msgd_hyperparams",
    "partitioning",
    "projectors",
    "quantize_int8",
    "refresh_counts",
    "scale_by_adam_8bit",
    "scale_by_galore",
    "scale_by_gasare",
    "scale_by_osd",
    "state_partition_specs",
    "stochastic_round_to_bf16",
    "subspace_layouts",
    "subspace_state_floats",
]

# The 0.1 module paths: ``sys.modules`` entries that warn on use (golore_jax/_moved.py).
_MOVED = _moved.register(__name__)


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
    if name in _MOVED:  # ``golore_jax.subspace``: its attributes warn, not the module itself
        return _MOVED[name]
    raise AttributeError(f"module 'golore_jax' has no attribute {name!r}")


__version__ = "0.2.0"
