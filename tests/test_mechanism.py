"""Mechanism metrics (train/mechanism.py): half-batch noise / signal and subspace overlap."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train_fixtures import tiny_config
from train import main as main_lib
from train import mechanism
from train.errors import ConfigError


def quadratic_loss(params, batch):
    """Row r's loss 0.5 ||w - x_r||^2: its gradient is w - x_r, so G = w - mu, S = Cov(x)."""
    return 0.5 * jnp.mean(jnp.sum(jnp.square(params["w"] - batch["x"]), axis=-1))


def test_half_batches_give_the_full_gradient_and_the_stated_estimates():
    x = jax.random.normal(jax.random.key(0), (8, 5))
    params = {"w": jnp.arange(5.0)}
    loss, grads, stats = mechanism.half_batch_gradients(quadratic_loss, params, {"x": x})
    full_loss, full = jax.value_and_grad(quadratic_loss)(params, {"x": x})
    np.testing.assert_allclose(loss, full_loss, rtol=1e-6)  # fp32 order of summation
    np.testing.assert_allclose(grads["w"], full["w"], rtol=1e-6, atol=1e-6)
    g1, g2 = params["w"] - x[0::2].mean(0), params["w"] - x[1::2].mean(0)
    noise, signal = stats["['w']"]
    np.testing.assert_allclose(noise, jnp.sum((g1 - g2) ** 2) / 4, rtol=1e-5)
    np.testing.assert_allclose(
        signal, (jnp.sum((g1 + g2) ** 2) - jnp.sum((g1 - g2) ** 2)) / 4, rtol=1e-5
    )


def test_noise_and_signal_estimates_are_unbiased():
    """Over 4,000 batches of B = 16 rows x ~ N(mu, sigma^2 I_d): the mean noise estimate is
    tr(S) / B = d sigma^2 / B and the mean signal ||w - mu||^2, each within 5 standard errors
    of its trials (false failure ~6e-7 each for a random seed; the seed is fixed)."""
    d, b, trials, sigma = 6, 16, 4000, 1.5
    mu, w = jnp.linspace(-1, 1, d), jnp.zeros(d)
    x = mu + sigma * jax.random.normal(jax.random.key(1), (trials, b, d))

    def one(xs):
        return mechanism.half_batch_gradients(quadratic_loss, {"w": w}, {"x": xs})[2]["['w']"]

    est = np.asarray(jax.vmap(one)(x), np.float64)
    for column, truth in ((0, d * sigma**2 / b), (1, float(jnp.sum((w - mu) ** 2)))):
        values = est[:, column]
        stderr = values.std(ddof=1) / math.sqrt(trials)
        assert abs(values.mean() - truth) < 5 * stderr, (column, values.mean(), truth)


def test_overlap_of_bases():
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(2), (10, 4)))
    a, b, c = q[:, :2], q[:, 2:], jnp.stack([q[:, 0], q[:, 2]], axis=1)
    got = mechanism.overlaps({"same": a, "orth": a, "half": a}, {"same": a, "orth": b, "half": c})
    np.testing.assert_allclose(got["same"], 1.0, atol=1e-6)
    np.testing.assert_allclose(got["orth"], 0.0, atol=1e-6)
    np.testing.assert_allclose(got["half"], 0.5, atol=1e-6)
    # Stacked (L, d, r) bases give one overlap per layer.
    stacked = mechanism.overlaps({"s": jnp.stack([a, a])}, {"s": jnp.stack([a, b])})
    np.testing.assert_allclose(stacked["s"], [1.0, 0.0], atol=1e-6)


def test_scheduler_measures_noise_steps_and_refreshes_after_the_first():
    calls = []

    def plain(state, batch):
        calls.append("plain")
        return state, {}

    def measuring(halves, overlap):
        def step(state, batch):
            calls.append((halves, overlap))
            return state, {}

        return step

    class State:
        step = 0

    scheduler = mechanism.Scheduler(plain, measuring, grad_noise_every=4, update_every=6)
    for _ in range(13):
        scheduler(State(), None)
    measured = [i + 1 for i, c in enumerate(calls) if c != "plain"]
    # Noise at steps 4, 8, 12; refreshes (count 6, 12 before the step) at steps 7, 13.
    assert measured == [4, 7, 8, 12, 13]
    assert all(c == (True, True) for c in calls if c != "plain")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"mechanism.grad_noise_every": 3, "log_every": 2}, "multiple of config.log_every"),
        ({"mechanism.grad_noise_every": -1}, "grad_noise_every"),
        (
            {"mechanism.subspace_overlap": True, "step.relora": True, "optimizer.grad_clip": 0.0},
            "full-gradient step",
        ),
    ],
)
def test_bad_mechanism_config_names_the_key(tmp_path, overrides, match):
    config = tiny_config(tmp_path, **overrides)
    with pytest.raises(ConfigError, match=match):
        mechanism.validate(config)


def test_trainer_logs_noise_and_overlap_at_the_measured_steps(tmp_path):
    """GoLore@50% over 6 steps, refresh every 2: noise at steps 2, 4, 6; overlaps at the
    refreshes after the first (steps 3 and 5; step 5's is GoLore's random subspace)."""
    config = tiny_config(
        tmp_path, **{"mechanism.grad_noise_every": 2, "mechanism.subspace_overlap": True}
    )
    main_lib.train_and_evaluate(config, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    train = {r["step"]: r for r in records if "loss" in r}
    noise_steps = sorted(r["grad_noise_step"] for r in train.values() if "grad_noise" in r)
    assert noise_steps == [2, 3, 4, 5, 6]  # also taken at the refresh steps
    overlap_steps = sorted(
        r["subspace_overlap_step"] for r in train.values() if "subspace_overlap" in r
    )
    assert overlap_steps == [3, 5]
    record = train[2]
    assert set(record["grad_noise"]) >= {"['lm_head']['kernel']"}
    assert all(v[0] >= 0 for v in record["grad_noise"].values())
    assert record["noise_to_signal"] == pytest.approx(
        record["noise_total"] / record["signal_total"]
    )
    for step in (3, 5):
        values = train[step]["subspace_overlap"].values()
        assert all(-1e-5 <= v <= 1 + 1e-5 for v in values)
