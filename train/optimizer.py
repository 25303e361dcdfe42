"""The optimizer a config asks for, built from golore_jax and optax as any user would.

``config.optimizer`` (configs/base.py) is a ``name``, the keys every name shares (schedule,
weight decay, clip) and one sub-block per family: ``inner`` (every name), ``subspace`` (every
name but adamw), ``sparse`` (gasare, gosare), ``online`` (osd). :data:`FAMILY_BLOCKS` says which
sub-blocks a name reads; :func:`validate` checks those (``_check_<block>``, one-line
ConfigErrors naming the full key) and :data:`BUILDERS` builds the name from them. Nothing here
restates a default: every key is read as the config declares it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

import golore_jax as gl
from train.errors import ConfigError
from train.sharding import MESH_AXES

OPTIMIZERS = (
    "adamw",
    "galore",
    "golore",
    "hybrid",
    "importance",
    "gasare",
    "gosare",
    "osd",
    "optax_galore",  # optax.contrib.galore, to measure beside ours
)
INNERS = ("adamw", "adamw8bit", "msgd")
PROJECTION_DTYPES = ("float32", "bfloat16")  # config.optimizer.subspace.projection_dtype
BASIS_DTYPES = ("float32", "bfloat16", "int4")  # config.optimizer.subspace.basis_dtype
# config.optimizer.subspace.side: gl.Subspace.side's rules (tests/test_config.py checks the
# library has the same)
SIDES = ("gradient", "state", "left", "right")
# The names whose transform keeps a basis P per matrix (a projector chooses it).
RELORA_OPTIMIZERS = ("galore", "golore", "hybrid", "importance")
# Optimizers that update stacked layers' kernels as they are (elementwise AdamW), or refuse them
# (optax.contrib.galore), instead of running per layer.
NO_PER_LAYER_OPTIMIZERS = ("adamw", "optax_galore")
# The sub-blocks of config.optimizer each name reads besides ``inner`` (configs/base.py's
# table); each is checked by its ``_check_<block>`` below, and only for the names reading it.
FAMILY_BLOCKS: dict[str, tuple[str, ...]] = {
    "adamw": (),
    **{name: ("subspace",) for name in (*RELORA_OPTIMIZERS, "optax_galore")},
    "gasare": ("subspace", "sparse"),
    "gosare": ("subspace", "sparse"),
    "osd": ("subspace", "online"),
}


def learning_rate_schedule(opt: Any, num_steps: int) -> optax.Schedule:
    """Linear warmup to ``learning_rate`` then cosine decay to ``learning_rate*min_lr_ratio``."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=opt.learning_rate,
        warmup_steps=min(opt.warmup_steps, num_steps),
        decay_steps=max(num_steps, opt.warmup_steps + 1),
        end_value=opt.learning_rate * opt.min_lr_ratio,
    )


def _matrices(params: Any) -> Any:
    """Weight decay on matrices only (not norms), as in the LLaMA pre-training recipes."""
    return jax.tree_util.tree_map(lambda p: jnp.ndim(p) >= 2, params)


def _sparse_k(rank: int) -> Any:
    """GaSare/GoSare's k per leaf: ``rank * max(m, n)``, the values GaLore's rank-r moments hold
    (``optimizer.sparse.density`` replaces it)."""

    def rule(path: str, shape: tuple[int, ...]) -> int:
        lay = gl.make_layout(shape, rank)
        return min(rank * max(lay.rows, lay.cols), lay.rows * lay.cols - 1)

    return rule


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """A one-line ConfigError ``config.KEY=VALUE: must be ALLOWED`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"config.{key}={value!r}: must be {allowed}")


def _one_of(value: Any, allowed: tuple[Any, ...], key: str) -> None:
    if value not in allowed:
        raise ConfigError(f"config.{key} must be one of {allowed}, got {value!r}")


def _check_shared(opt: Any, num_steps: int | None) -> None:
    """The keys every name reads: schedule, weight decay, clip."""
    if opt.learning_rate <= 0:
        raise ConfigError(f"config.optimizer.learning_rate must be > 0, got {opt.learning_rate}")
    for key in ("grad_clip", "weight_decay"):
        value = opt[key]
        _require(
            math.isfinite(value) and value >= 0, f"optimizer.{key}", value, "a finite number >= 0"
        )
    _require(0 <= opt.min_lr_ratio <= 1, "optimizer.min_lr_ratio", opt.min_lr_ratio, "in [0, 1]")
    bound = "" if num_steps is None else f" and <= config.num_steps={num_steps}"
    _require(
        opt.warmup_steps >= 0 and (num_steps is None or opt.warmup_steps <= num_steps),
        "optimizer.warmup_steps",
        opt.warmup_steps,
        ">= 0" + bound,
    )


def _check_inner(opt: Any) -> None:
    """``optimizer.inner``: the optimizer run alone (adamw) or inside the subspace."""
    inner = opt.inner
    _one_of(inner.name, INNERS, "optimizer.inner.name")
    if inner.name == "adamw8bit" and opt.name == "optax_galore":
        raise ConfigError("config.optimizer.name='optax_galore' has no inner.name='adamw8bit'")
    if inner.name == "adamw8bit" and opt.name in ("gasare", "gosare", "osd"):
        raise ConfigError(
            "config.optimizer.inner.name='adamw8bit' is offered for adamw and the basis "
            f"projectors, not for config.optimizer.name={opt.name!r}"
        )
    for key in ("b1", "b2", "momentum"):  # optax convention: the decay of the moving average
        _require(0 <= inner[key] < 1, f"optimizer.inner.{key}", inner[key], "in [0, 1)")
    _require(
        math.isfinite(inner.eps) and inner.eps >= 0,
        "optimizer.inner.eps",
        inner.eps,
        "a finite number >= 0",
    )


def _check_subspace(opt: Any) -> None:
    """``optimizer.subspace``: rank, refresh and projection settings of the subspace names."""
    sub = opt.subspace
    for key in ("rank", "update_every"):
        if not callable(sub[key]):  # fine-tuning passes a per-matrix rank rule
            _require(int(sub[key]) >= 1, f"optimizer.subspace.{key}", sub[key], ">= 1")
    _require(
        math.isfinite(sub.scale) and sub.scale > 0,
        "optimizer.subspace.scale",
        sub.scale,
        "a finite number > 0",
    )
    if opt.name == "hybrid":
        fraction = sub.golore_fraction
        _require(0 < fraction <= 1, "optimizer.subspace.golore_fraction", fraction, "in (0, 1]")
    _one_of(sub.side, SIDES, "optimizer.subspace.side")
    # Settings optax.contrib.galore has no counterpart for.
    if opt.name == "optax_galore" and (sub.momentum_projection or sub.second_moment != "keep"):
        raise ConfigError(
            "config.optimizer.name='optax_galore' keeps moments at a refresh: needs "
            "config.optimizer.subspace.momentum_projection=False and second_moment='keep', "
            f"got {sub.momentum_projection} and {sub.second_moment!r}"
        )
    refresh = sub.refresh_batch_size
    _require(
        int(refresh) >= 0, "optimizer.subspace.refresh_batch_size", refresh, ">= 0 (0: no limit)"
    )
    _one_of(sub.projection_dtype, PROJECTION_DTYPES, "optimizer.subspace.projection_dtype")
    _one_of(sub.basis_dtype, BASIS_DTYPES, "optimizer.subspace.basis_dtype")
    if sub.basis_dtype != "float32" and opt.name not in RELORA_OPTIMIZERS:
        raise ConfigError(
            f"config.optimizer.subspace.basis_dtype={sub.basis_dtype!r} applies to the basis "
            f"projectors {RELORA_OPTIMIZERS}, not to name={opt.name!r}"
        )
    if opt.name in RELORA_OPTIMIZERS:
        _one_of(sub.projector, tuple(SVD_PROJECTORS), "optimizer.subspace.projector")
    _check_lazy(opt)


# The names whose subspaces come from the gradient, where a lazy refresh can save work.
LAZY_OPTIMIZERS = ("galore", "hybrid", "importance")


def _check_lazy(opt: Any) -> None:
    """``optimizer.subspace.lazy_*``: the lazy, layer-adaptive refresh (0 threshold: off)."""
    sub = opt.subspace
    threshold = sub.lazy_threshold
    _require(
        isinstance(threshold, int | float) and math.isfinite(threshold) and threshold >= 0,
        "optimizer.subspace.lazy_threshold",
        threshold,
        "a finite number >= 0 (0: off; 2 never triggers)",
    )
    for key, low in (("lazy_patience", 1), ("lazy_growth", 2), ("lazy_max_period", 0)):
        value = sub[key]
        _require(
            isinstance(value, int) and not isinstance(value, bool) and value >= low,
            f"optimizer.subspace.{key}",
            value,
            f"an int >= {low}",
        )
    if threshold and opt.name not in LAZY_OPTIMIZERS:
        reason = (
            ": GoLore's random subspaces keep their schedule (a random subspace overlaps the "
            "previous one by ~rank/dim, so the rule never fires)"
            if opt.name == "golore"
            else ""
        )
        raise ConfigError(
            f"config.optimizer.subspace.lazy_threshold={threshold} applies to "
            f"optimizer.name in {LAZY_OPTIMIZERS}, not {opt.name!r}{reason}; set it to 0"
        )


def lazy_refresh(sub: Any) -> gl.LazyRefresh | None:
    """``optimizer.subspace.lazy_*`` as the library's option (None when the threshold is 0)."""
    if not sub.lazy_threshold:
        return None
    return gl.LazyRefresh(
        threshold=float(sub.lazy_threshold),
        patience=sub.lazy_patience,
        growth=sub.lazy_growth,
        max_period=sub.lazy_max_period or None,
    )


def _check_sparse(opt: Any) -> None:
    """``optimizer.sparse``: GaSare / GoSare's kept fraction (None: GaLore's moment count)."""
    density = opt.sparse.density
    if density is not None:
        _require(0 < density <= 1, "optimizer.sparse.density", density, "in (0, 1] (or None)")


def _check_online(opt: Any) -> None:
    """``optimizer.online``: Online Subspace Descent's projector optimizer."""
    lr = opt.online.projector_learning_rate
    _require(
        math.isfinite(lr) and lr > 0,
        "optimizer.online.projector_learning_rate",
        lr,
        "a finite number > 0",
    )


_BLOCK_CHECKS = {"subspace": _check_subspace, "sparse": _check_sparse, "online": _check_online}


def validate(opt: Any, *, num_steps: int | None = None, step: Any = None) -> None:
    """Rejects an optimizer block the trainer cannot build, before anything compiles.

    Checks the shared keys, ``inner`` and the sub-blocks ``opt.name`` reads (FAMILY_BLOCKS);
    a sub-block the name does not read is not looked at. ``step`` (pre-training's
    ``config.step``), when given, is checked against the optimizer. Each error is one line
    naming the full key and its allowed range (``num_steps``, when given, bounds
    ``warmup_steps``).
    """
    _one_of(opt.name, OPTIMIZERS, "optimizer.name")
    _check_shared(opt, num_steps)
    _check_inner(opt)
    for block in FAMILY_BLOCKS[opt.name]:
        _BLOCK_CHECKS[block](opt)
    if step is not None:
        validate_step(step, opt)


def validate_step(step: Any, opt: Any) -> None:
    """``config.step`` against the optimizer it applies."""
    if step.layerwise and opt.grad_clip:
        raise ConfigError(
            f"config.optimizer.grad_clip={opt.grad_clip} is a global-norm clip, which "
            "config.step.layerwise=True cannot do (the layers' gradients never exist "
            "together): set optimizer.grad_clip=0, and step.layer_grad_clip for a per-layer clip"
        )
    if step.layer_grad_clip < 0 or (step.layer_grad_clip and not step.layerwise):
        raise ConfigError(
            f"config.step.layer_grad_clip={step.layer_grad_clip} needs layerwise=True "
            "and a value >= 0 (the plain step clips by the global norm: optimizer.grad_clip)"
        )
    if isinstance(step.layers_per_call, bool) or not (
        isinstance(step.layers_per_call, int) and step.layers_per_call >= 1
    ):
        raise ConfigError(
            f"config.step.layers_per_call={step.layers_per_call!r} must be an int >= 1"
        )
    if step.layers_per_call > 1 and (step.layerwise or opt.name in NO_PER_LAYER_OPTIMIZERS):
        raise ConfigError(
            f"config.step.layers_per_call={step.layers_per_call} applies to a subspace "
            "optimizer's full-gradient step over stacked layers; with step.layerwise=True or "
            f"optimizer.name={opt.name!r} it must be 1"
        )
    if not step.relora:
        return
    if opt.name not in RELORA_OPTIMIZERS:
        raise ConfigError(
            f"config.step.relora=True needs a basis projector, config.optimizer.name one of "
            f"{RELORA_OPTIMIZERS}, got {opt.name!r}"
        )
    if opt.subspace.basis_dtype == "int4":
        raise ConfigError(
            "config.step.relora=True needs config.optimizer.subspace.basis_dtype 'float32' or "
            "'bfloat16', got 'int4' (the adapters read the bases as matrices)"
        )
    if opt.subspace.side == "state":
        raise ConfigError(
            "config.step.relora=True needs config.optimizer.subspace.side 'gradient', 'left' "
            "or 'right', got 'state' (the adapters' side would depend on the inner optimizer)"
        )
    # Both act on the full gradient / weights, which the low-rank path never forms.
    for field in ("grad_clip", "weight_decay"):
        if opt[field]:
            raise ConfigError(
                f"config.step.relora=True needs config.optimizer.{field}=0, got {opt[field]}"
            )


# GaLore's SVD-phase projectors by name. Measured on an H100 (BENCHMARKS.md), gram_eigh finds
# the same subspace as the SVD (captured energy 1.0000) 8-16x faster; subspace_iteration is
# 15-50x faster at 0.9998-0.9999 of the energy.
SVD_PROJECTORS = {
    "svd": gl.projectors.svd,
    "gram_eigh": gl.projectors.gram_eigh,
    "subspace_iteration": gl.projectors.subspace_iteration,
}


def optax_galore(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int,
    update_proj_gap: int,
    scale: float,
    base_optimizer: optax.GradientTransformation,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
) -> optax.GradientTransformation:
    """``optax.contrib.galore`` on the matrices golore_jax's default mask projects (attention
    and MLP kernels; not the embedding or the head), with its own SVD and side rule."""

    def dimension_numbers(params):
        def spec(path, leaf, selected):
            if not selected:
                return None
            if jnp.ndim(leaf) != 2:
                raise ConfigError(
                    f"config.optimizer.name='optax_galore' projects 2-D kernels only; "
                    f"{jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)} "
                    "(set model.scan_layers=False)"
                )
            return optax.contrib.GaLoreDimensionNumbers()

        return jax.tree_util.tree_map_with_path(spec, params, gl.default_mask(params))

    return optax.contrib.galore(
        learning_rate,
        rank=rank,
        update_proj_gap=update_proj_gap,
        scale=scale,
        base_optimizer=base_optimizer,
        weight_decay=weight_decay,
        mask=weight_decay_mask,
        weight_dimension_numbers=dimension_numbers,
    )


def _full(opt: Any, schedule: optax.Schedule, num_steps: int, num_devices: int):
    """name=adamw: the inner optimizer on every parameter (AdamW, 8-bit AdamW or MSGD)."""
    inner = opt.inner
    if inner.name == "adamw":
        return optax.adamw(
            schedule, inner.b1, inner.b2, inner.eps, opt.weight_decay, mask=_matrices
        )
    if inner.name == "adamw8bit":
        return optax.chain(
            gl.scale_by_adam_8bit(inner.b1, inner.b2, inner.eps),
            optax.add_decayed_weights(opt.weight_decay, _matrices),
            optax.scale_by_learning_rate(schedule),
        )
    return optax.chain(  # full-parameter MSGD
        optax.add_decayed_weights(opt.weight_decay, _matrices),
        optax.sgd(schedule, momentum=inner.momentum),
    )


def _inner(opt: Any) -> optax.GradientTransformation:
    """``optimizer.inner`` as the optax transformation each family runs inside its subspace."""
    inner = opt.inner
    if inner.name == "adamw":
        return optax.scale_by_adam(b1=inner.b1, b2=inner.b2, eps=inner.eps)
    if inner.name == "adamw8bit":
        return gl.scale_by_adam_8bit(b1=inner.b1, b2=inner.b2, eps=inner.eps)
    return optax.trace(decay=inner.momentum)


def _basis(opt: Any, schedule: optax.Schedule, num_steps: int, num_devices: int):
    """galore / golore / hybrid / importance: ``gl.galore``, a projector choosing each basis."""
    sub = opt.subspace
    svd_phase = SVD_PROJECTORS[sub.projector]()
    projector = {
        "importance": gl.projectors.importance_svd(),
        "galore": svd_phase,
        "golore": gl.projectors.random(),
        "hybrid": gl.golore_projector(sub.golore_fraction, num_steps, before=svd_phase),
    }[opt.name]
    subspace = gl.Subspace(
        rank=sub.rank,
        update_every=sub.update_every,
        scale=sub.scale,
        projector=projector,
        side=sub.side,
        seed=sub.seed,
        momentum_projection=sub.momentum_projection,
        # MSGD's trace has no second moment to rotate
        second_moment="keep" if opt.inner.name == "msgd" else sub.second_moment,
        lazy_refresh=lazy_refresh(sub),
    )
    execution = gl.Execution(
        batch_refresh=sub.batch_refresh,
        refresh_batch_size=sub.refresh_batch_size or None,
        refresh_sharding=PartitionSpec(MESH_AXES) if num_devices > 1 else None,
        projection_dtype=sub.projection_dtype,
        basis_dtype=sub.basis_dtype,
    )
    return gl.galore(
        schedule,
        _inner(opt),
        subspace,
        execution=execution,
        weight_decay=opt.weight_decay,
        weight_decay_mask=_matrices,
    )


def _sparse(opt: Any, schedule: optax.Schedule, num_steps: int, num_devices: int):
    """gasare / gosare (Algorithm 5): ``gl.gasare``, a sparse support per matrix."""
    sub, density = opt.subspace, opt.sparse.density
    sparse = gl.Sparse(
        density=density,
        k=_sparse_k(sub.rank) if density is None else None,
        update_every=sub.update_every,
        scale=sub.scale,
        selector="topk" if opt.name == "gasare" else "random",
        seed=sub.seed,
    )
    return gl.gasare(
        schedule, _inner(opt), sparse, weight_decay=opt.weight_decay, weight_decay_mask=_matrices
    )


def _online(opt: Any, schedule: optax.Schedule, num_steps: int, num_devices: int):
    """osd: ``gl.osd``, Online Subspace Descent (arXiv 2408.12857), the basis learnt by its own
    AdamW."""
    sub = opt.subspace
    online = gl.Online(
        rank=sub.rank,
        scale=sub.scale,
        side=sub.side,
        projector_optimizer=gl.default_projector_optimizer(opt.online.projector_learning_rate),
    )
    return gl.osd(
        schedule, _inner(opt), online, weight_decay=opt.weight_decay, weight_decay_mask=_matrices
    )


def _optax_galore(opt: Any, schedule: optax.Schedule, num_steps: int, num_devices: int):
    """optax_galore: ``optax.contrib.galore`` with the same rank, refresh gap and scale."""
    sub, inner = opt.subspace, opt.inner
    return optax_galore(
        schedule,
        rank=sub.rank,
        update_proj_gap=sub.update_every,
        scale=sub.scale,
        base_optimizer=(
            optax.scale_by_adam(inner.b1, inner.b2, inner.eps)
            if inner.name == "adamw"
            else optax.trace(decay=inner.momentum)
        ),
        weight_decay=opt.weight_decay,
        weight_decay_mask=_matrices,
    )


# name -> builder; each reads the shared keys, ``inner`` and its FAMILY_BLOCKS only.
BUILDERS = {
    "adamw": _full,
    **{name: _basis for name in RELORA_OPTIMIZERS},
    "gasare": _sparse,
    "gosare": _sparse,
    "osd": _online,
    "optax_galore": _optax_galore,
}


def build_optimizer(
    opt: Any, num_steps: int, *, num_devices: int = 1
) -> optax.GradientTransformation:
    """``config.optimizer`` -> an optax transformation (clipping, the named optimizer, lr).

    Validates the block first (:func:`validate`), then calls the name's builder.

    With ``num_devices > 1`` the refresh is spread: same-shape matrices are stacked and the
    stack is sharded over every mesh axis, so each device decomposes its share
    (tests/test_refresh_spread.py). Left to the partitioner, the batched decompositions hung on
    8 fake CPU devices: a jaxlib 0.10 CPU deadlock (batched LAPACK calls waiting on an
    exhausted thread pool), which ``PJRT_NPROC`` (a larger pool) also avoids.
    """
    validate(opt)
    schedule = learning_rate_schedule(opt, num_steps)
    tx = BUILDERS[opt.name](opt, schedule, num_steps, num_devices)
    if opt.grad_clip:
        tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip), tx)
    return tx


# Separates the rounding noise's PRNG stream from the init key (both come from config.seed),
# and the layers' streams (the layer-wise update applies each layer on its own) from the rest.
_ROUNDING_STREAM = 0x5352
_LAYER_STREAM = 0x4C59


def update_applier(step_config: Any, seed: int) -> Callable[..., Any]:
    """``(params, updates, step, layer=None) -> new params``: ``optax.apply_updates``, or with
    ``config.step.stochastic_rounding`` :func:`golore_jax.apply_updates_stochastic` keyed by
    ``fold_in(key(seed), step)`` (a resumed run rounds exactly as the uninterrupted one).

    ``layer`` (an int or traced index, e.g. inside a scan over stacked layers): the subtree of
    that layer gets its own noise; without it, every layer's leaves at the same position in
    their subtree would be rounded with the same noise.
    """
    if not step_config.stochastic_rounding:
        return lambda params, updates, step, layer=None: optax.apply_updates(params, updates)
    stream = jax.random.fold_in(jax.random.key(seed), _ROUNDING_STREAM)

    def apply(params, updates, step, layer=None):
        key = jax.random.fold_in(stream, step)
        if layer is not None:
            key = jax.random.fold_in(jax.random.fold_in(key, _LAYER_STREAM), layer)
        return gl.apply_updates_stochastic(params, updates, key)

    return apply


def relora_settings(opt: Any) -> tuple[int, str, int]:
    """``(rank, side, update_every)`` of the ReLoRA-like path's adapter layer."""
    return opt.subspace.rank, opt.subspace.side, opt.subspace.update_every
