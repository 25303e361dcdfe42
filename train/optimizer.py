"""The optimizer a config asks for, built from golore_jax and optax as any user would."""

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
PROJECTION_DTYPES = ("float32", "bfloat16")  # config.optimizer.projection_dtype
BASIS_DTYPES = ("float32", "bfloat16")  # config.optimizer.basis_dtype
RELORA_OPTIMIZERS = ("galore", "golore", "hybrid", "importance")


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
    (an optional ``optimizer.density`` replaces it)."""

    def rule(path: str, shape: tuple[int, ...]) -> int:
        lay = gl.layout.make_layout(shape, rank)
        return min(rank * max(lay.rows, lay.cols), lay.rows * lay.cols - 1)

    return rule


def _family_optimizer(opt: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
    """GaSare / GoSare (Algorithm 5) and Online Subspace Descent (arXiv 2408.12857)."""
    common = dict(
        scale=opt.scale,
        weight_decay=opt.weight_decay,
        weight_decay_mask=_matrices,
    )
    if opt.inner == "adamw":
        common.update(b1=opt.b1, b2=opt.b2, eps=opt.eps)
    else:
        common.update(momentum=opt.momentum)
    if opt.name == "osd":
        alias = gl.osd_adamw if opt.inner == "adamw" else gl.osd_sgd
        lr = opt.get("projector_learning_rate") or gl.online_pca.DEFAULT_PROJECTOR_LEARNING_RATE
        return alias(
            schedule,
            rank=opt.rank,
            side=opt.get("side", "gradient"),
            projector_optimizer=gl.online_pca.default_projector_optimizer(lr),
            **common,
        )
    alias = {
        ("gasare", "adamw"): gl.gasare_adamw,
        ("gasare", "msgd"): gl.gasare_sgd,
        ("gosare", "adamw"): gl.gosare_adamw,
        ("gosare", "msgd"): gl.gosare_sgd,
    }[opt.name, opt.inner]
    density = opt.get("density")
    sparsity = {"density": density} if density else {"k": _sparse_k(opt.rank)}
    return alias(schedule, update_every=opt.update_every, seed=opt.seed, **sparsity, **common)


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"config.optimizer.{key}={value!r}: must be {allowed}")


def validate(opt: Any, *, num_steps: int | None = None) -> None:
    """Rejects an optimizer block the trainer cannot build, before anything compiles.

    Each error is one line naming the key and its allowed range (``num_steps``, when given,
    bounds ``warmup_steps``).
    """
    if opt.name not in OPTIMIZERS:
        raise ConfigError(f"config.optimizer.name must be one of {OPTIMIZERS}, got {opt.name!r}")
    if opt.inner not in INNERS:
        raise ConfigError(f"config.optimizer.inner must be one of {INNERS}, got {opt.inner!r}")
    if opt.inner == "adamw8bit" and opt.name in ("gasare", "gosare", "osd"):
        raise ConfigError(
            f"config.optimizer.inner='adamw8bit' is offered for adamw and the basis projectors, "
            f"not for name={opt.name!r}"
        )
    if opt.learning_rate <= 0:
        raise ConfigError(f"config.optimizer.learning_rate must be > 0, got {opt.learning_rate}")
    finite = math.isfinite
    for key in ("b1", "b2", "momentum"):  # optax convention: the decay of the moving average
        _require(0 <= opt[key] < 1, key, opt[key], "in [0, 1)")
    _require(finite(opt.eps) and opt.eps >= 0, "eps", opt.eps, "a finite number >= 0")
    for key in ("grad_clip", "weight_decay"):
        _require(finite(opt[key]) and opt[key] >= 0, key, opt[key], "a finite number >= 0")
    _require(0 <= opt.min_lr_ratio <= 1, "min_lr_ratio", opt.min_lr_ratio, "in [0, 1]")
    bound = "" if num_steps is None else f" and <= config.num_steps={num_steps}"
    _require(
        opt.warmup_steps >= 0 and (num_steps is None or opt.warmup_steps <= num_steps),
        "warmup_steps",
        opt.warmup_steps,
        ">= 0" + bound,
    )
    if opt.name != "adamw":
        for key in ("rank", "update_every"):
            if not callable(opt[key]):  # fine-tuning passes a per-matrix rank rule
                _require(int(opt[key]) >= 1, key, opt[key], ">= 1")
        _require(finite(opt.scale) and opt.scale > 0, "scale", opt.scale, "a finite number > 0")
    if opt.name == "hybrid":
        fraction = opt.golore_fraction
        _require(0 < fraction <= 1, "golore_fraction", fraction, "in (0, 1]")
    refresh = opt.get("refresh_batch_size", 0)
    _require(int(refresh) >= 0, "refresh_batch_size", refresh, ">= 0 (0: no limit)")
    if opt.get("projection_dtype", "float32") not in PROJECTION_DTYPES:
        raise ConfigError(
            f"config.optimizer.projection_dtype must be one of {PROJECTION_DTYPES}, "
            f"got {opt.projection_dtype!r}"
        )
    if opt.get("basis_dtype", "float32") not in BASIS_DTYPES:
        raise ConfigError(
            f"config.optimizer.basis_dtype must be one of {BASIS_DTYPES}, got {opt.basis_dtype!r}"
        )
    if opt.get("basis_dtype", "float32") != "float32" and opt.name not in RELORA_OPTIMIZERS:
        raise ConfigError(
            f"config.optimizer.basis_dtype={opt.basis_dtype!r} applies to the basis projectors "
            f"{RELORA_OPTIMIZERS}, not to name={opt.name!r}"
        )
    if opt.get("layerwise") and opt.grad_clip:
        raise ConfigError(
            f"config.optimizer.grad_clip={opt.grad_clip} is a global-norm clip, which "
            "config.optimizer.layerwise=True cannot do (the layers' gradients never exist "
            "together): set grad_clip=0, and layer_grad_clip for a per-layer clip"
        )
    if opt.get("layer_grad_clip", 0.0) < 0 or (
        opt.get("layer_grad_clip", 0.0) and not opt.get("layerwise")
    ):
        raise ConfigError(
            f"config.optimizer.layer_grad_clip={opt.layer_grad_clip} needs layerwise=True "
            "and a value >= 0 (the plain step clips by the global norm: grad_clip)"
        )
    side = opt.get("side", "gradient")
    if side not in gl.layout.SIDE_RULES:
        raise ConfigError(
            f"config.optimizer.side must be one of {gl.layout.SIDE_RULES}, got {side!r}"
        )
    if opt.name == "optax_galore":  # settings optax.contrib.galore has no counterpart for
        if opt.inner == "adamw8bit":
            raise ConfigError("config.optimizer.name='optax_galore' has no inner='adamw8bit'")
        if opt.momentum_projection or opt.second_moment != "keep":
            raise ConfigError(
                "config.optimizer.name='optax_galore' keeps moments at a refresh: needs "
                f"momentum_projection=False and second_moment='keep', got "
                f"{opt.momentum_projection} and {opt.second_moment!r}"
            )
    if opt.get("relora"):
        if side == "state":
            raise ConfigError(
                "config.optimizer.relora=True needs side 'gradient', 'left' or 'right', got "
                "'state' (the adapters' side would depend on the inner optimizer)"
            )
        if opt.name not in RELORA_OPTIMIZERS:
            raise ConfigError(
                f"config.optimizer.relora=True needs a basis projector, name one of "
                f"{RELORA_OPTIMIZERS}, got {opt.name!r}"
            )
        # Both act on the full gradient / weights, which the low-rank path never forms.
        for field in ("grad_clip", "weight_decay"):
            if opt[field]:
                raise ConfigError(
                    f"config.optimizer.relora=True needs config.optimizer.{field}=0, "
                    f"got {opt[field]}"
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


def build_optimizer(
    opt: Any, num_steps: int, *, num_devices: int = 1
) -> optax.GradientTransformation:
    """``config.optimizer`` -> an optax transformation (clipping, subspace optimizer, lr).

    With ``num_devices > 1`` the refresh is spread: same-shape matrices are stacked and the
    stack is sharded over every mesh axis, so each device decomposes its share
    (tests/test_refresh_spread.py). Left to the partitioner, the batched decompositions hung on
    8 fake CPU devices: a jaxlib 0.10 CPU deadlock (batched LAPACK calls waiting on an
    exhausted thread pool), which ``PJRT_NPROC`` (a larger pool) also avoids.
    """
    validate(opt)
    schedule = learning_rate_schedule(opt, num_steps)
    if opt.name == "adamw" and opt.inner == "adamw":
        tx = optax.adamw(schedule, opt.b1, opt.b2, opt.eps, opt.weight_decay, mask=_matrices)
    elif opt.name == "adamw" and opt.inner == "adamw8bit":
        tx = optax.chain(
            gl.scale_by_adam_8bit(opt.b1, opt.b2, opt.eps),
            optax.add_decayed_weights(opt.weight_decay, _matrices),
            optax.scale_by_learning_rate(schedule),
        )
    elif opt.name == "adamw":  # full-parameter MSGD
        tx = optax.chain(
            optax.add_decayed_weights(opt.weight_decay, _matrices),
            optax.sgd(schedule, momentum=opt.momentum),
        )
    elif opt.name in ("gasare", "gosare", "osd"):
        tx = _family_optimizer(opt, schedule)
    elif opt.name == "optax_galore":
        tx = optax_galore(
            schedule,
            rank=opt.rank,
            update_proj_gap=opt.update_every,
            scale=opt.scale,
            base_optimizer=(
                optax.scale_by_adam(opt.b1, opt.b2, opt.eps)
                if opt.inner == "adamw"
                else optax.trace(decay=opt.momentum)
            ),
            weight_decay=opt.weight_decay,
            weight_decay_mask=_matrices,
        )
    else:
        if opt.projector not in SVD_PROJECTORS:
            raise ConfigError(
                f"config.optimizer.projector must be one of {sorted(SVD_PROJECTORS)}, "
                f"got {opt.projector!r}"
            )
        svd_phase = SVD_PROJECTORS[opt.projector]()
        projector = {
            "importance": gl.projectors.importance_svd(),
            "galore": svd_phase,
            "golore": gl.projectors.random(),
            "hybrid": gl.golore_projector(opt.golore_fraction, num_steps, before=svd_phase),
        }[opt.name]
        common = dict(
            rank=opt.rank,
            update_every=opt.update_every,
            scale=opt.scale,
            weight_decay=opt.weight_decay,
            weight_decay_mask=_matrices,
            projector=projector,
            momentum_projection=opt.momentum_projection,
            seed=opt.seed,
            refresh_sharding=PartitionSpec(MESH_AXES) if num_devices > 1 else None,
            batch_refresh=opt.get("batch_refresh", True),
            refresh_batch_size=opt.get("refresh_batch_size", 0) or None,
            projection_dtype=opt.get("projection_dtype", "float32"),
            basis_dtype=opt.get("basis_dtype", "float32"),
            side=opt.get("side", "gradient"),
        )
        if opt.inner in ("adamw", "adamw8bit"):
            tx = gl.galore_adamw(
                schedule,
                b1=opt.b1,
                b2=opt.b2,
                eps=opt.eps,
                second_moment=opt.second_moment,
                quantized_moments=opt.inner == "adamw8bit",
                **common,
            )
        else:
            tx = gl.galore_sgd(schedule, momentum=opt.momentum, **common)
    if opt.grad_clip:
        tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip), tx)
    return tx


# Separates the rounding noise's PRNG stream from the init key (both come from config.seed),
# and the layers' streams (the layer-wise update applies each layer on its own) from the rest.
_ROUNDING_STREAM = 0x5352
_LAYER_STREAM = 0x4C59


def update_applier(opt: Any, seed: int) -> Callable[..., Any]:
    """``(params, updates, step, layer=None) -> new params``: ``optax.apply_updates``, or with
    ``opt.stochastic_rounding`` :func:`golore_jax.apply_updates_stochastic` keyed by
    ``fold_in(key(seed), step)`` (a resumed run rounds exactly as the uninterrupted one).

    ``layer`` (an int or traced index, e.g. inside a scan over stacked layers): the subtree of
    that layer gets its own noise; without it, every layer's leaves at the same position in
    their subtree would be rounded with the same noise.
    """
    if not opt.get("stochastic_rounding", False):
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
    return opt.rank, opt.get("side", "gradient"), opt.update_every
