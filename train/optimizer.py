"""The optimizer a config asks for, built from golore_jax and optax as any user would."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

import golore_jax as gl
from train.errors import ConfigError
from train.sharding import MESH_AXES

OPTIMIZERS = ("adamw", "galore", "golore", "hybrid", "importance", "gasare", "gosare", "osd")
INNERS = ("adamw", "adamw8bit", "msgd")
PROJECTION_DTYPES = ("float32", "bfloat16")  # config.optimizer.projection_dtype
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
    if opt.get("relora"):
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
