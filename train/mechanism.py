"""Mechanism metrics of a pre-training run (``config.mechanism``): the gradient's noise and
signal per matrix, and how much consecutive subspaces overlap.

**Noise and signal from two half-batches.** A measured step computes the gradient as the mean
of the gradients of its two halves (even and odd rows, so each device keeps its own rows), the
same full-batch gradient up to summation order, and compares them. With ``B`` rows drawn
independently (exactly so for ``data.source='sampled'``), each half's gradient is
``g_i = G + e_i`` with ``E e_i = 0`` and ``Cov e_i = S / (B / 2)`` (``S``: one row's gradient
covariance), so

    E ||g1 - g2||^2 = 4 tr(S) / B,        E ||g1 + g2||^2 = 4 ||G||^2 + 4 tr(S) / B.

For the step's gradient ``g = (g1 + g2) / 2`` the noise ``E ||g - G||^2 = tr(S) / B`` and the
signal ``||G||^2`` have the unbiased estimates

    noise  = ||g1 - g2||^2 / 4,           signal = (||g1 + g2||^2 - ||g1 - g2||^2) / 4,

logged per matrix; their ratio noise / signal is the noise-to-signal ratio of the step's
gradient. A ratio of unbiased estimates is not unbiased (and one step's signal can come out
negative when noise dominates): average noise and signal over steps or matrices first, then
divide. The measured gradient is the raw one (before clipping).

**Subspace overlap.** At a step where a subspace optimizer refreshes (its update count, before
the step, a positive multiple of ``update_every``), the measuring step also returns, per
projected matrix, ``||P_old^T P_new||_F^2 / r`` in [0, 1]: 1 when the subspace is unchanged,
about ``r / d`` for an independent random one (GoLore's refreshes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import golore_jax as gl
from train import loop as loop_lib
from train.errors import ConfigError

METRIC_KEYS = ("grad_noise", "subspace_overlap")


def validate(config: Any) -> None:
    """``config.mechanism``'s keys against the rest of the config (one-line ConfigErrors)."""
    mech = config.mechanism
    every = mech.grad_noise_every
    loop_lib.require(
        isinstance(every, int) and every >= 0, "mechanism.grad_noise_every", every, "an int >= 0"
    )
    if every and every % config.log_every:
        raise ConfigError(
            f"config.mechanism.grad_noise_every={every} must be a multiple of "
            f"config.log_every={config.log_every} (the measured step is a logged one)"
        )
    if every and config.batch_size % 2:
        raise ConfigError(
            f"config.mechanism.grad_noise_every={every} splits the batch in two halves: "
            f"config.batch_size={config.batch_size} must be even"
        )
    loop_lib.require(
        isinstance(mech.subspace_overlap, bool),
        "mechanism.subspace_overlap",
        mech.subspace_overlap,
        "True or False",
    )
    if (every or mech.subspace_overlap) and (config.step.layerwise or config.step.relora):
        raise ConfigError(
            "config.mechanism metrics need the plain full-gradient step: not with "
            "config.step.layerwise=True or config.step.relora=True"
        )


def half_batch_gradients(loss_fn: Callable, params: Any, batch: dict) -> tuple[Any, Any, dict]:
    """``(loss, grads, stats)``: the loss and gradient of the whole batch, computed as the
    means over its two halves (even / odd rows), and per leaf ``noise`` and ``signal``
    (the module docstring's estimates) keyed by the leaf's path."""
    halves = [jax.tree_util.tree_map(lambda x, i=i: x[i::2], batch) for i in (0, 1)]
    (l1, g1), (l2, g2) = (jax.value_and_grad(loss_fn)(params, h) for h in halves)
    grads = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, g1, g2)
    stats = {}
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(g1), jax.tree_util.tree_leaves(g2), strict=True
    ):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        diff, total = jnp.sum(jnp.square(a - b)), jnp.sum(jnp.square(a + b))
        stats[jax.tree_util.keystr(path)] = jnp.stack([diff / 4, (total - diff) / 4])
    return (l1 + l2) / 2, grads, stats


def subspace_bases(opt_state: Any) -> dict[str, jax.Array]:
    """Every projected basis of every :class:`golore_jax.ScaleBySubspaceState` in
    ``opt_state`` (``(..., d, r)``, fp32), keyed by its parameter's path."""
    found = [
        (path, node)
        for path, node in jax.tree_util.tree_leaves_with_path(
            opt_state, is_leaf=lambda s: isinstance(s, gl.ScaleBySubspaceState)
        )
        if isinstance(node, gl.ScaleBySubspaceState)
    ]
    out = {}
    for path, node in found:
        # fp32 whatever the basis storage (INT4 decoded)
        for leaf_path, basis in jax.tree_util.tree_leaves_with_path(gl.float_bases(node.bases)):
            if basis.ndim >= 2:
                # The params' path of the basis (prefixed by the state's when several).
                key = jax.tree_util.keystr(leaf_path if len(found) == 1 else path + leaf_path)
                out[key] = basis
    return out


def overlaps(old: dict[str, jax.Array], new: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """``||P_old^T P_new||_F^2 / r`` per basis (per layer for stacked ``(L, d, r)`` bases)."""
    out = {}
    for key, p_new in new.items():
        p_old = old[key]
        cross = jnp.einsum("...dr,...ds->...rs", p_old, p_new)
        out[key] = jnp.sum(jnp.square(cross), axis=(-2, -1)) / p_new.shape[-1]
    return out


def measured_step(
    state: Any,
    batch: dict,
    *,
    loss_fn: Callable,
    apply: Callable,
    halves: bool,
    overlap: bool,
) -> tuple[Any, dict]:
    """A full-gradient train step that also measures: ``apply(state, loss, grads)`` is the
    step's update (``train.step.guarded`` around the optimizer); ``halves`` takes the gradient
    from the two half-batches and returns their noise / signal, ``overlap`` returns the
    overlap of the bases before and after the step."""
    stats = {}
    if halves:
        loss, grads, stats["grad_noise"] = half_batch_gradients(loss_fn, state.params, batch)
    else:
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
    before = subspace_bases(state.opt_state) if overlap else {}
    new_state, metrics = apply(state, loss, grads)
    if overlap:
        stats["subspace_overlap"] = overlaps(before, subspace_bases(new_state.opt_state))
    return new_state, {**metrics, **stats, "measured_step": new_state.step}


class Scheduler:
    """Chooses, per step, the plain jitted step or the measuring one (host-side step count,
    read once from the state): measured are every ``grad_noise_every``-th step and each step
    that refreshes a subspace after the first (its count before the step a positive multiple
    of ``update_every``; None: no overlap). One measuring variant serves both, so a run
    compiles two steps: it takes the half-batch gradients whenever ``grad_noise_every`` is on
    and the overlap whenever ``update_every`` is given."""

    def __init__(
        self,
        plain: Callable,
        measuring: Callable[[bool, bool], Callable],
        *,
        grad_noise_every: int,
        update_every: int | None,
    ) -> None:
        self._plain, self._measuring = plain, measuring
        self._noise_every, self._update_every = grad_noise_every, update_every
        self._step: int | None = None

    def measures(self, done: int) -> bool:
        """Whether the step after ``done`` applied steps is measured."""
        noise = bool(self._noise_every) and (done + 1) % self._noise_every == 0
        refresh = bool(self._update_every) and done > 0 and done % self._update_every == 0
        return noise or refresh

    def __call__(self, state: Any, batch: dict) -> tuple[Any, dict]:
        if self._step is None:
            self._step = int(state.step)
        done = self._step  # steps taken before this one (the optimizer's count, unskipped)
        self._step += 1
        if not self.measures(done):
            return self._plain(state, batch)
        return self._measuring(bool(self._noise_every), self._update_every is not None)(
            state, batch
        )

    def record_fields(self, window: list[dict]) -> dict[str, Any]:
        """The measured metrics of a logging window as JSON fields: ``grad_noise`` (path ->
        [noise, signal]) with ``grad_noise_step`` and totals over the matrices
        (``noise_total``, ``signal_total``, ``noise_to_signal``: their ratio), and, from a
        refresh step, ``subspace_overlap`` (path -> overlap, a list per layer when stacked)
        with ``subspace_overlap_step`` and its mean; the last of each kind in the window."""
        fields: dict[str, Any] = {}
        for metrics in window:
            if "measured_step" not in metrics:
                continue
            step = int(metrics["measured_step"])
            if "grad_noise" in metrics:
                fields.update(noise_fields(metrics["grad_noise"]), grad_noise_step=step)
            refresh = self._update_every and step > 1 and (step - 1) % self._update_every == 0
            if metrics.get("subspace_overlap") and refresh:
                values = {k: np.asarray(v).tolist() for k, v in metrics["subspace_overlap"].items()}
                flat = np.concatenate([np.ravel(v) for v in values.values()])
                fields.update(
                    subspace_overlap=values,
                    subspace_overlap_step=step,
                    subspace_overlap_mean=float(np.mean(flat)),
                )
        return fields


def noise_fields(stats: dict[str, Any]) -> dict[str, Any]:
    """Per-matrix [noise, signal] and their totals over the 2-D weights (norm scales left out
    of the totals) with the totals' ratio."""
    noise = {k: [float(x) for x in np.asarray(v)] for k, v in stats.items()}
    matrices = [v for k, v in noise.items() if _is_matrix_path(k)]
    total_noise = sum(v[0] for v in matrices)
    total_signal = sum(v[1] for v in matrices)
    return {
        "grad_noise": noise,
        "noise_total": total_noise,
        "signal_total": total_signal,
        "noise_to_signal": total_noise / total_signal if total_signal else float("nan"),
    }


def _is_matrix_path(path: str) -> bool:
    """The 2-D weight matrices (kernels and the embedding), not norm scales."""
    return "norm" not in path.lower()
