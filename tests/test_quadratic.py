"""The counter-example of He et al. 2024 (problem (1), Theorem 1, Figure 1) as a regression test.

GaLore's SVD picks the noise subspace and stalls above a positive floor; GoLore, GoLore@50%,
large-batch GaLore and full-parameter training reduce ``||grad f||^2`` by >= 10^3, with AdamW and
with MSGD. If GoLore's random projector were replaced by SVD, or the hybrid never switched, those
two would stall with GaLore and the test would fail.
"""

from __future__ import annotations

import csv
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import quadratic as quadratic_config
from experiments import quadratic

CONFIG_PATH = str(pathlib.Path(quadratic_config.__file__))
REDUCTION = 1e-3  # the converging methods must end below REDUCTION * ||grad f(X0)||^2
CONVERGING = ("full", "golore", "golore@50%", "large_batch_galore")


def _config(**overrides):
    config = quadratic_config.get_config()
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    """The default command, in-process: problem (1), both optimizers, all methods, 3 seeds."""
    workdir = tmp_path_factory.mktemp("quadratic")
    argv = ["quadratic", f"--config={CONFIG_PATH}", f"--workdir={workdir}", "--config.log_every=10"]
    summary = quadratic.main(argv)
    return workdir, summary


@pytest.fixture(scope="module")
def minimal_runs():
    """The minimal instance of Theorem 1: per-step ``||grad f||^2`` of GaLore and full training."""
    config = _config(problem="minimal", num_steps=2000)
    pairs = [(opt, method) for opt in quadratic.OPTIMIZERS for method in ("galore", "full")]
    return config, quadratic.run_methods(config, pairs)


@pytest.mark.parametrize("kind", quadratic.PROBLEMS)
def test_closed_forms_match_autodiff(kind):
    """grad f, f - f* and f* in closed form agree with jax.grad of f as written in the paper."""
    config = _config(problem=kind)
    problem = quadratic.problem_from_config(config)
    x0, d = problem.sample(np.random.default_rng(0))
    n, r = config.n, config.rank
    if kind == "paper":
        a = jnp.eye(n - r, n)
        b = jnp.zeros((n, n)).at[: n - r, : n - r].set(d)

        def f(x):
            return 0.5 * jnp.sum(jnp.square(a @ x)) + jnp.sum(b * x)

        x_star = jnp.zeros((n, n)).at[: n - r, : n - r].set(-d)
    else:
        p = jnp.zeros(n).at[0].set(1.0)

        def f(x):
            return 0.5 * config.smoothness * jnp.sum(jnp.square(p @ x))

        x_star = jnp.zeros((n, n))
    x = jnp.asarray(x0 + 0.3 * np.random.default_rng(1).standard_normal((n, n)), jnp.float32)

    @jax.jit  # one compilation instead of one per eager op
    def both(x):
        closed = (problem.grad(x, d), problem.f_star(d), problem.loss_gap(x, d))
        return closed, (jax.grad(f)(x), f(x_star), f(x) - f(x_star))

    (grad, f_star, gap), (grad_ad, f_star_direct, gap_direct) = both(x)
    np.testing.assert_allclose(grad, grad_ad, atol=1e-5)
    np.testing.assert_allclose(f_star, f_star_direct, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gap, gap_direct, rtol=1e-4)


def test_minimal_instance_galore_never_moves_row_one(minimal_runs):
    """Theorem 1: ||grad f(X_t)||^2 = L^2 lambda^2 at every step, every seed, AdamW and MSGD."""
    config, runs = minimal_runs
    problem = quadratic.problem_from_config(config)
    floor = (problem.smoothness * problem.lam) ** 2
    assert 0 < problem.lam < problem.sigma_hat / problem.smoothness
    for opt in quadratic.OPTIMIZERS:
        g = runs[opt, "galore"]["grad_norm_sq"]
        assert g.shape == (len(config.seeds), config.num_steps + 1)
        np.testing.assert_allclose(g, floor, rtol=1e-6, err_msg=opt)
        # Row 1 is never touched: the value is bit-for-bit the initial one.
        np.testing.assert_array_equal(g, np.broadcast_to(g[:, :1], g.shape), err_msg=opt)
        # Full-parameter training, from the same points and noise, converges.
        full = runs[opt, "full"]["grad_norm_sq"]
        assert np.all(full[:, -1] <= REDUCTION * full[:, 0]), (opt, full[:, -1])


@pytest.mark.parametrize("opt", quadratic.OPTIMIZERS)
def test_problem1_galore_stalls_others_converge(paper_run, opt):
    """Figure 1: per seed, GaLore stalls at a positive floor; the other methods go >= 10^3 down."""
    workdir, summary = paper_run
    results = summary["results"][opt]

    galore = results["galore"]
    initial = np.asarray(galore["initial_grad_norm_sq_per_seed"])
    final = np.asarray(galore["final_grad_norm_sq_per_seed"])
    assert np.all(final > REDUCTION * initial), final / initial
    # Stalled, not slow: once SVD picks the noise block, X's rows carrying grad f never change.
    curves = _read_curves(workdir / "curves.csv")
    late = [
        float(row["grad_norm_sq"])
        for row in curves
        if row["optimizer"] == opt
        and row["method"] == "galore"
        and int(row["step"]) >= summary["config"]["num_steps"] // 2
    ]
    assert late and min(late) > 0
    for seed in summary["config"]["seeds"]:
        per_seed = [
            float(r["grad_norm_sq"])
            for r in curves
            if r["optimizer"] == opt
            and r["method"] == "galore"
            and int(r["seed"]) == seed
            and int(r["step"]) >= summary["config"]["num_steps"] // 2
        ]
        np.testing.assert_allclose(per_seed, per_seed[-1], rtol=1e-5)

    for method in CONVERGING:
        entry = results[method]
        initial = np.asarray(entry["initial_grad_norm_sq_per_seed"])
        final = np.asarray(entry["final_grad_norm_sq_per_seed"])
        assert len(final) == len(summary["config"]["seeds"]) >= 3
        assert np.all(final <= REDUCTION * initial), (method, final / initial)
        # ... and far below where GaLore stalled, on every seed.
        assert np.all(final < 0.1 * np.asarray(galore["final_grad_norm_sq_per_seed"])), method
        # f - f* = ||grad f||^2 / 2 on problem (1).
        np.testing.assert_allclose(
            entry["final_loss_gap_per_seed"], 0.5 * final, rtol=1e-4, atol=1e-12
        )


def test_command_writes_results_curves_and_figure(paper_run):
    workdir, summary = paper_run
    config = summary["config"]
    with open(workdir / "results.json") as f:
        results = json.load(f)
    assert set(results) >= {"config", "problem", "results", "runtime_s"}
    assert set(results["results"]) == set(quadratic.OPTIMIZERS)
    logged = list(range(0, config["num_steps"] + 1, config["log_every"]))
    for opt in quadratic.OPTIMIZERS:
        assert set(results["results"][opt]) == set(quadratic.METHODS)
        for entry in results["results"][opt].values():
            for metric in quadratic.METRICS:
                assert np.isfinite(entry[f"final_{metric}"])
                assert len(entry[f"final_{metric}_per_seed"]) == len(config["seeds"])
                np.testing.assert_allclose(
                    entry[f"final_{metric}"], np.mean(entry[f"final_{metric}_per_seed"])
                )
                assert len(entry["curve"][metric]) == len(logged)
            assert entry["curve"]["step"] == logged
            assert entry["label"]

    rows = _read_curves(workdir / "curves.csv")
    assert set(rows[0]) == {"optimizer", "method", "seed", "step", *quadratic.METRICS}
    assert len(rows) == len(quadratic.OPTIMIZERS) * len(quadratic.METHODS) * 3 * len(logged)

    png = (workdir / "figure1.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def _read_curves(path: pathlib.Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
