"""The counter-example of He et al. 2024 (arXiv 2410.11289): Figure 1 and Theorem 1.

Problem (1) of the paper, for ``X`` in ``R^{n x n}``::

    f(X) = 1/2 ||A X||_F^2 + <B, X>_F,      grad F(X; xi) = grad f(X) + xi * sigma * C,
    A = [I_{n-r} 0],  B = [[D, 0], [0, 0]],  C = [[0, 0], [0, I_r]],  xi uniform on {+1, -1}.

``grad f(X) = A^T A X + B`` lives in the top ``n - r`` rows while the noise lives in the
bottom-right ``r x r`` block. Once every singular value of ``grad f`` is below ``sigma``, GaLore's
SVD picks the noise subspace, which is orthogonal to ``grad f``, and it stops moving (Section 3).

The minimal instance from the proof of Theorem 1 (Theorem 5 in Appendix B.2)::

    f(X) = L/2 ||p^T X||^2,  p = e_1,
    noise xi * sigma_hat * Q Q^T = xi * sigma_hat * diag(0, 1, ..., n - 1)

with ``sigma_hat = sigma / sqrt(n (n - 1) / 2)`` and the first row of ``X0`` equal to
``lambda p^T``, ``0 < lambda < sigma_hat / L``. The stochastic gradient is then diagonal with
``L lambda`` as its smallest singular value, so GaLore's basis never contains ``e_1``, row 1 is
never updated and ``||grad f||^2 = L^2 lambda^2`` forever.

Both losses and gradients are in closed form: ``f(X) - f* = 1/2 ||X11 + D||^2 + 1/2 ||X12||^2``
for problem (1) (``f* = -1/2 ||D||^2`` at ``X11 = -D, X12 = 0``), and ``L/2 ||X[0]||^2``
(``f* = 0``) for the minimal instance.

Every method runs through golore_jax's public API; all steps of one (optimizer, method) pair are
a jitted ``lax.scan``, vmapped over seeds.

    python -m experiments.quadratic --config configs/quadratic.py --workdir /tmp/quadratic
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import flags
from jax import lax
from ml_collections import config_flags

import golore_jax as gl
from train import step as step_lib

METHODS = ("full", "galore", "golore", "golore@50%", "large_batch_galore")
# The family of issue 10, run with --config.family=True: sparse masks (Appendix C, Algorithm 5),
# Online Subspace Descent (arXiv 2408.12857) and the GoLore authors' importance-sampled SVD.
FAMILY_METHODS = ("gasare", "gosare", "osd", "importance_svd")
ALL_METHODS = METHODS + FAMILY_METHODS
# Reference lines drawn with the family in figure1_family.png.
FAMILY_REFERENCES = ("galore", "golore")
OPTIMIZERS = ("adamw", "msgd")
PROBLEMS = ("paper", "minimal")
OPTIMIZER_TITLES = {"adamw": "AdamW", "msgd": "MSGD"}
# Below this the fp32 iterates are at round-off (|X| ~ 1, eps ~ 1e-7): curves are clipped here.
PLOT_FLOOR = 1e-12
METRICS = ("loss_gap", "grad_norm_sq")
METRIC_LABELS = {"loss_gap": r"$f(X) - f^\star$", "grad_norm_sq": r"$\|\nabla f(X)\|_F^2$"}


def method_label(method: str, config: ml_collections.ConfigDict) -> str:
    """Legend entry of a method (the paper's names)."""
    return {
        "full": "Full Params.",
        "galore": "GaLore",
        "golore": "GoLore",
        "golore@50%": f"GoLore@{round(100 * config.golore_fraction)}%",
        "large_batch_galore": f"L.B. GaLore (B={config.large_batch})",
        "gasare": f"GaSare (k={sparse_k(config)})",
        "gosare": f"GoSare (k={sparse_k(config)})",
        "osd": "OSD",
        "importance_svd": "GaLore, importance-sampled SVD",
    }[method]


def sparse_k(config: ml_collections.ConfigDict) -> int:
    """GaSare/GoSare's k: ``config.sparse_k``, or by default ``rank * n``, the number of values
    GaLore's rank-r state holds for an n x n matrix (same memory for the moments)."""
    return config.sparse_k if config.sparse_k else config.rank * config.n


@dataclasses.dataclass(frozen=True)
class Problem:
    """Problem (1) (``kind="paper"``) or the minimal instance of Theorem 1 (``kind="minimal"``).

    Static: the random parts (``D`` and ``X0``) are drawn per seed by :meth:`sample`.
    """

    kind: str
    n: int
    rank: int
    sigma: float
    smoothness: float = 1.0  # L (minimal instance)
    lambda_fraction: float = 0.5  # lambda / (sigma_hat / L) (minimal instance)

    def __post_init__(self):
        if self.kind not in PROBLEMS:
            raise ValueError(f"problem must be one of {PROBLEMS}, got {self.kind!r}")
        if not 0 < self.rank < self.n:
            raise ValueError(f"need 0 < rank < n, got rank={self.rank}, n={self.n}")
        if self.kind == "minimal" and not 0.0 < self.lambda_fraction < 1.0:
            # Theorem 1 needs 0 < lambda < sigma_hat / L.
            raise ValueError(f"lambda_fraction must be in (0, 1), got {self.lambda_fraction}")

    @property
    def sigma_hat(self) -> float:
        """Theorem 1's noise scale, chosen so that ``E||noise||_F^2 = sigma^2``."""
        return self.sigma / np.sqrt(self.n * (self.n - 1) / 2)

    @property
    def lam(self) -> float:
        """``lambda``, the first row's fixed value (minimal instance)."""
        return self.lambda_fraction * self.sigma_hat / self.smoothness

    def noise_matrix(self) -> jax.Array:
        """The direction of the noise: ``sigma C`` (problem (1)) or ``sigma_hat Q Q^T``."""
        n, r = self.n, self.rank
        if self.kind == "paper":
            return jnp.zeros((n, n)).at[n - r :, n - r :].set(self.sigma * jnp.eye(r))
        return jnp.diag(self.sigma_hat * jnp.arange(n, dtype=jnp.float32))

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``(X0, D)`` for one seed (``D`` is unused by the minimal instance).

        Problem (1) starts at the GoLore authors' point ``[[sigma/2 I_{n-r}, 0], [sigma randn]]``
        with ``D = sigma randn``; the minimal instance at ``[[lambda p^T], [sigma randn]]``.
        """
        n, r = self.n, self.rank
        d = self.sigma * rng.standard_normal((n - r, n - r))
        x0 = np.zeros((n, n))
        if self.kind == "paper":
            x0[: n - r, : n - r] = self.sigma / 2 * np.eye(n - r)
            x0[n - r :] = self.sigma * rng.standard_normal((r, n))
        else:
            x0[0, 0] = self.lam
            x0[1:] = self.sigma * rng.standard_normal((n - 1, n))
            d = np.zeros_like(d)
        return x0.astype(np.float32), d.astype(np.float32)

    def grad(self, x: jax.Array, d: jax.Array) -> jax.Array:
        """``grad f(X)``: ``A^T A X + B`` (problem (1)) or ``L p p^T X`` (minimal)."""
        n, r = self.n, self.rank
        if self.kind == "paper":
            top = x[: n - r].at[:, : n - r].add(d)
            return jnp.zeros_like(x).at[: n - r].set(top)
        return jnp.zeros_like(x).at[0].set(self.smoothness * x[0])

    def loss_gap(self, x: jax.Array, d: jax.Array) -> jax.Array:
        """``f(X) - f*`` in closed form (computed from the residual, not as a difference)."""
        n, r = self.n, self.rank
        if self.kind == "paper":
            return 0.5 * jnp.sum(jnp.square(x[: n - r].at[:, : n - r].add(d)))
        return 0.5 * self.smoothness * jnp.sum(jnp.square(x[0]))

    def f_star(self, d: jax.Array) -> jax.Array:
        """The optimal value: ``-1/2 ||D||^2`` (problem (1)) or 0 (minimal)."""
        return -0.5 * jnp.sum(jnp.square(d)) if self.kind == "paper" else jnp.zeros(())


def problem_from_config(config: ml_collections.ConfigDict) -> Problem:
    return Problem(
        kind=config.problem,
        n=config.n,
        rank=config.rank,
        sigma=config.sigma,
        smoothness=config.smoothness,
        lambda_fraction=config.lambda_fraction,
    )


def learning_rate_schedule(config: ml_collections.ConfigDict, peak: float) -> optax.Schedule:
    """``peak`` decayed to ``final_lr_fraction * peak`` over ``num_steps``, or constant.

    Under noise a constant step only reaches a noise floor proportional to it (the converging
    methods' noise comes from GoLore's random projections mixing ``sigma C`` into the rows of
    ``grad f``); a decaying step averages it out.
    """
    end = config.final_lr_fraction
    if config.schedule == "constant":
        return optax.constant_schedule(peak)
    if config.schedule == "cosine":
        return optax.cosine_decay_schedule(peak, config.num_steps, alpha=end)
    if config.schedule == "exponential":
        return optax.exponential_decay(peak, config.num_steps, decay_rate=end)
    raise ValueError(
        f"schedule must be 'constant', 'cosine' or 'exponential', got {config.schedule!r}"
    )


def make_optimizer(
    config: ml_collections.ConfigDict, optimizer: str, method: str, seed: int | jax.Array
) -> optax.GradientTransformationExtraArgs:
    """The optimizer of one curve of Figure 1, built from golore_jax's public API.

    ``seed`` (an int or a PRNG key) seeds the random projections of GoLore.
    """
    if method not in ALL_METHODS:
        raise ValueError(f"method must be one of {ALL_METHODS}, got {method!r}")
    subspace = dict(
        rank=config.rank, update_every=config.update_every, scale=config.scale, seed=seed
    )
    sparse = gl.Sparse(
        k=sparse_k(config), update_every=config.update_every, scale=config.scale, seed=seed
    )
    # OSD steps P every iteration with lr 1 / update_proj_gap (the authors' code): tau here.
    online = gl.Online(
        rank=config.rank,
        scale=config.scale,
        projector_optimizer=gl.default_projector_optimizer(1.0 / config.update_every),
    )
    if method in ("golore", "golore@50%"):
        fraction = 1.0 if method == "golore" else config.golore_fraction
        projector = gl.golore_projector(fraction, config.num_steps)
    elif method == "importance_svd":
        projector = gl.projectors.importance_svd()
    else:
        projector = gl.projectors.svd()  # GaLore and large-batch GaLore (its G_sub differs).

    if optimizer == "adamw":
        hp = config.adamw
        lr = learning_rate_schedule(config, hp.learning_rate)
        adam = dict(b1=hp.b1, b2=hp.b2, eps=hp.eps, weight_decay=hp.weight_decay)
        if method == "full":
            return optax.with_extra_args_support(optax.adamw(lr, **adam))
        if method in ("gasare", "gosare"):
            alias = gl.gasare_adamw if method == "gasare" else gl.gosare_adamw
            return alias(lr, **adam, sparse=sparse)
        if method == "osd":
            return gl.osd_adamw(lr, **adam, online=online)
        return gl.galore_adamw(
            lr,
            subspace=gl.Subspace(
                **subspace,
                projector=projector,
                momentum_projection=hp.momentum_projection,
                second_moment=hp.second_moment,
            ),
            **adam,
        )

    if optimizer == "msgd":
        # The paper's MSGD, M <- (1 - b1) M + b1 G and X <- X - lr M, is optax's trace with
        # momentum 1 - b1 and learning rate lr * b1.
        hp = gl.paper_msgd_hyperparams(config.msgd.learning_rate, config.msgd.b1)
        lr = learning_rate_schedule(config, hp["learning_rate"])
        if method == "full":
            return optax.with_extra_args_support(optax.sgd(lr, momentum=hp["momentum"]))
        if method in ("gasare", "gosare"):
            # Algorithm 5's masked momentum: optax's trace, remapped at each mask change.
            alias = gl.gasare_sgd if method == "gasare" else gl.gosare_sgd
            return alias(lr, momentum=hp["momentum"], sparse=sparse)
        if method == "osd":
            return gl.osd_sgd(lr, momentum=hp["momentum"], online=online)
        # Momentum projection (equation (2)) is galore_sgd's default: the paper's MSGD has it.
        sub = gl.Subspace(**subspace, projector=projector)
        return gl.galore_sgd(lr, momentum=hp["momentum"], subspace=sub)

    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")


def sample_inputs(config: ml_collections.ConfigDict, seed: int) -> dict[str, np.ndarray]:
    """One seed's random inputs: ``X0``, ``D``, the oracle's ``xi`` per step and the key.

    They are drawn with numpy, outside ``jit``: PRNG ops inside a long scan are slow to compile
    on CPU, and this keeps the oracle identical across methods for a given seed. ``xi_mean`` is
    the mean of ``B`` independent signs (``(2 Binomial(B, 1/2) - B) / B``), the noise of the
    large-batch gradient that chooses large-batch GaLore's subspace.
    """
    rng = np.random.default_rng(seed)
    x0, d = problem_from_config(config).sample(rng)
    steps, batch = config.num_steps, config.large_batch
    return {
        "x0": x0,
        "d": d,
        "xi": rng.choice(np.array([-1.0, 1.0], np.float32), size=steps),
        "xi_mean": ((2 * rng.binomial(batch, 0.5, size=steps) - batch) / batch).astype(np.float32),
        "key": np.asarray(jax.random.key_data(jax.random.key(seed))),
    }


def trajectory(
    config: ml_collections.ConfigDict,
    optimizer: str,
    method: str,
    inputs: dict[str, jax.Array],
) -> dict[str, jax.Array]:
    """One seed's run: ``f(X_t) - f*`` and ``||grad f(X_t)||^2`` for ``t = 0 .. num_steps``."""
    problem = problem_from_config(config)
    d, noise = inputs["d"], problem.noise_matrix()
    # The key seeds GoLore's random projections.
    tx = make_optimizer(config, optimizer, method, seed=jax.random.wrap_key_data(inputs["key"]))
    params = {"x": inputs["x0"]}  # a 2-D leaf: projected by golore_jax's default mask.
    opt_state = tx.init(params)

    def metrics(x):
        return problem.loss_gap(x, d), jnp.sum(jnp.square(problem.grad(x, d)))

    def step(carry, xs):
        params, opt_state = carry
        xi, xi_mean = xs
        true_grad = problem.grad(params["x"], d)
        extra = {}
        if method == "large_batch_galore":
            # The subspace is chosen from the mean of B stochastic gradients at the same X (only
            # refresh steps use it); the step itself uses the one-sample gradient.
            extra["subspace_grads"] = {"x": true_grad + xi_mean * noise}
        grads = {"x": true_grad + xi * noise}
        params, opt_state = step_lib.apply_gradients(tx.update, grads, opt_state, params, **extra)
        return (params, opt_state), metrics(params["x"])

    xs = (inputs["xi"], inputs["xi_mean"])
    _, (gaps, norms) = lax.scan(step, (params, opt_state), xs)
    gap0, norm0 = metrics(inputs["x0"])
    return {
        "loss_gap": jnp.concatenate([gap0[None], gaps]),
        "grad_norm_sq": jnp.concatenate([norm0[None], norms]),
        "f_star": problem.f_star(d),
    }


def run_method(
    config: ml_collections.ConfigDict, optimizer: str, method: str
) -> dict[str, np.ndarray]:
    """All seeds of one (optimizer, method) pair: one jitted program, arrays ``(seeds, ...)``.

    Seeds go through ``lax.map`` rather than ``vmap``: at this size the run takes milliseconds
    and compilation dominates, and batching the projectors' PRNG, QR and SVD compiles slower.
    """
    fn: Callable[[dict[str, jax.Array]], dict[str, jax.Array]] = functools.partial(
        trajectory, config, optimizer, method
    )
    per_seed = [sample_inputs(config, seed) for seed in config.seeds]
    inputs = jax.tree.map(lambda *xs: np.stack(xs), *per_seed)
    out = jax.jit(lambda xs: lax.map(fn, xs))(inputs)
    return jax.tree.map(np.asarray, out)


def run_methods(
    config: ml_collections.ConfigDict, pairs: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """:func:`run_method` for each ``(optimizer, method)`` pair, compiled on all cores at once.

    Each program compiles in about a second and runs in milliseconds, so compilation is the cost;
    XLA releases the GIL while compiling, and threads compile several programs in parallel.
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        outputs = list(pool.map(lambda pair: run_method(config, *pair), pairs))
    return dict(zip(pairs, outputs, strict=True))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs every optimizer x method x seed; writes results.json, curves.csv and figure1.png.

    With ``config.family`` the methods of :data:`FAMILY_METHODS` run too; they are drawn with
    GaLore and GoLore in ``figure1_family.png`` (figure1.png keeps ``config.methods``).
    """
    start = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    problem = problem_from_config(config)
    methods = list(config.methods)
    if config.family:
        methods += [m for m in FAMILY_METHODS if m not in methods]
    for name in methods:
        if name not in ALL_METHODS:
            raise ValueError(f"unknown method {name!r}; choose from {ALL_METHODS}")
    logged = np.unique(
        np.append(np.arange(0, config.num_steps + 1, config.log_every), config.num_steps)
    )

    pairs = [(opt, method) for opt in config.optimizers for method in methods]
    raw: dict[str, dict[str, dict[str, np.ndarray]]] = {opt: {} for opt in config.optimizers}
    for (optimizer, method), out in run_methods(config, pairs).items():
        raw[optimizer][method] = out

    results: dict[str, Any] = {}
    for optimizer, per_method in raw.items():
        results[optimizer] = {}
        for method, out in per_method.items():
            entry: dict[str, Any] = {"label": method_label(method, config)}
            for metric in METRICS:
                values = out[metric]  # (seeds, num_steps + 1)
                entry[f"initial_{metric}"] = float(values[:, 0].mean())
                entry[f"initial_{metric}_per_seed"] = values[:, 0].tolist()
                entry[f"final_{metric}"] = float(values[:, -1].mean())
                entry[f"final_{metric}_per_seed"] = values[:, -1].tolist()
            entry["curve"] = {
                "step": logged.tolist(),
                **{m: out[m][:, logged].mean(axis=0).tolist() for m in METRICS},
            }
            results[optimizer][method] = entry

    any_out = next(iter(next(iter(raw.values())).values()))
    summary = {
        "problem": {
            "kind": problem.kind,
            "f_star_per_seed": any_out["f_star"].tolist(),
            **(
                {
                    "sigma_hat": problem.sigma_hat,
                    "lambda": problem.lam,
                    "galore_floor_grad_norm_sq": (problem.smoothness * problem.lam) ** 2,
                }
                if problem.kind == "minimal"
                else {}
            ),
        },
        "config": config.to_dict(),
        "results": results,
    }
    _write_csv(os.path.join(workdir, "curves.csv"), raw, config.seeds, logged)
    main_methods = [m for m in methods if m in config.methods]
    plot_figure1(_subset(results, main_methods), config, os.path.join(workdir, "figure1.png"))
    if config.family:
        family = [m for m in FAMILY_REFERENCES + FAMILY_METHODS if m in methods]
        plot_figure1(_subset(results, family), config, os.path.join(workdir, "figure1_family.png"))
    summary["runtime_s"] = time.perf_counter() - start
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(summary, f, indent=2, default=_json_default)
    return summary


def _subset(results: dict, methods: Sequence[str]) -> dict:
    """``results`` restricted to ``methods`` (in that order), per optimizer."""
    return {opt: {m: per[m] for m in methods if m in per} for opt, per in results.items()}


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


def _write_csv(path: str, raw: dict, seeds: Sequence[int], logged: np.ndarray) -> None:
    """Long format: one row per (optimizer, method, seed, logged step)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["optimizer", "method", "seed", "step", *METRICS])
        for optimizer, per_method in raw.items():
            for method, out in per_method.items():
                for i, seed in enumerate(seeds):
                    for t in logged:
                        row = [f"{out[m][i, t]:.8e}" for m in METRICS]
                        writer.writerow([optimizer, method, seed, int(t), *row])


def plot_figure1(results: dict, config: ml_collections.ConfigDict, path: str) -> None:
    """Figure 1's layout: AdamW (left) and MSGD (right), one line per method, log y-scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = config.plot_metric
    if metric not in METRICS:
        raise ValueError(f"plot_metric must be one of {METRICS}, got {metric!r}")
    optimizers = list(results)
    fig, axes = plt.subplots(
        1, len(optimizers), figsize=(5.5 * len(optimizers), 4.2), squeeze=False
    )
    for ax, optimizer in zip(axes[0], optimizers, strict=True):
        for entry in results[optimizer].values():
            # fp32 round-off: values below PLOT_FLOOR (exact zeros included) are drawn at it.
            y = np.maximum(np.asarray(entry["curve"][metric]), PLOT_FLOOR)
            # Dashed hybrid: after its switch it can coincide with GoLore (same noise, same keys).
            style = "--" if entry["label"].startswith("GoLore@") else "-"
            ax.plot(entry["curve"]["step"], y, style, label=entry["label"], lw=1.8)
        ax.set_yscale("log")
        ax.set_ylim(bottom=PLOT_FLOOR / 3)
        ax.set_xlabel("iteration")
        ax.set_ylabel(METRIC_LABELS[metric])
        ax.set_title(OPTIMIZER_TITLES.get(optimizer, optimizer))
        ax.grid(True, which="major", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
    name = "problem (1)" if config.problem == "paper" else "minimal instance of Theorem 1"
    fig.suptitle(
        f"{name}: n={config.n}, r={config.rank}, σ={config.sigma}, τ={config.update_every}, "
        f"mean of {len(config.seeds)} seeds (clipped at {PLOT_FLOOR:g}: fp32 round-off)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=150)
    plt.close(fig)


def _flags(argv: Sequence[str]) -> tuple[flags.FlagValues, Any, Any]:
    """A private FlagValues, so that importing this module defines no global absl flags."""
    flag_values = flags.FlagValues()
    config = config_flags.DEFINE_config_file(
        # config_flags finds the --config.key=value overrides in sys_argv.
        "config",
        None,
        "path to configs/quadratic.py",
        flag_values=flag_values,
        sys_argv=list(argv),
    )
    workdir = flags.DEFINE_string(
        "workdir",
        None,
        "where results.json, curves.csv and figure1.png go",
        flag_values=flag_values,
    )
    return flag_values, config, workdir


def main(argv: Sequence[str]) -> dict[str, Any]:
    """``argv[0]`` is the program name; ``--config FILE [--config.key=value ...] --workdir DIR``."""
    flag_values, config_flag, workdir_flag = _flags(argv)
    flag_values(list(argv))
    if config_flag.value is None or workdir_flag.value is None:
        raise flags.Error("--config and --workdir are required")
    config = config_flag.value
    summary = run(config, workdir_flag.value)
    for optimizer, per_method in summary["results"].items():
        for method, entry in per_method.items():
            print(
                f"{optimizer:6s} {method:20s} f-f* {entry['final_loss_gap']:.3e}  "
                f"||grad f||^2 {entry['final_grad_norm_sq']:.3e} "
                f"(from {entry['initial_grad_norm_sq']:.3e})"
            )
    figures = "figure1.png,figure1_family.png" if config.family else "figure1.png"
    print(
        f"wrote {workdir_flag.value}/{{results.json,curves.csv,{figures}}} "
        f"in {summary['runtime_s']:.1f}s"
    )
    return summary


if __name__ == "__main__":
    main(sys.argv)
