"""Fine-tuning runs the pre-training loop (train/loop.py): resume, the non-finite policy,
TensorBoard and loss.png, on the tiny BoolQ model of tests/test_finetune.py."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest

from tests.test_finetune import tiny_config
from train import choice_tasks as tasks_lib
from train import finetune as ft_lib

_BUILD_FINETUNER = ft_lib.build_finetuner
_FINETUNERS: dict = {}


def _cached_build_finetuner(model_config, opt, num_steps, mesh=None, **kwargs):
    """build_finetuner, reusing the compiled steps of an earlier run of the same model,
    optimizer, step count and mesh (the steps are pure: a run never changes them)."""
    key = (repr(model_config), opt.to_json_best_effort(), num_steps, repr(mesh), repr(kwargs))
    if key not in _FINETUNERS:
        _FINETUNERS[key] = _BUILD_FINETUNER(model_config, opt, num_steps, mesh, **kwargs)
    return _FINETUNERS[key]


@pytest.fixture(autouse=True)
def _compile_once(monkeypatch):
    monkeypatch.setattr(ft_lib, "build_finetuner", _cached_build_finetuner)


def _config(tmp_path: pathlib.Path, **overrides):
    config = tiny_config(tmp_path, "golore")
    config.optimizer.subspace.update_every = 2  # refreshes at steps 0, 2, 4: a resume mid-way
    config.num_steps, config.log_every, config.eval_every = 5, 1, 2
    config.data.max_eval_examples, config.eval_batch_size = 8, 16
    config.export.enabled = False
    config.update(overrides)
    return config


def _records(workdir: pathlib.Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    # elapsed_s is wall-clock time: the only field allowed to differ.
    return [{k: v for k, v in json.loads(x).items() if k != "elapsed_s"} for x in lines]


def test_resumed_fine_tune_equals_the_straight_run(tmp_path):
    """Stopped after step 3 (run_steps; between refreshes, mid-epoch in the sampler) and rerun:
    the same records (train losses, eval accuracies and losses) and final weights as one run;
    TensorBoard events and loss.png are written."""
    straight = ft_lib.finetune(_config(tmp_path), tmp_path / "straight")
    first = ft_lib.finetune(_config(tmp_path, run_steps=3), tmp_path / "split")
    assert (first["step"], first["export_dir"]) == (3, None)
    resumed = ft_lib.finetune(_config(tmp_path), tmp_path / "split")
    assert resumed["step"] == straight["step"] == 5
    assert _records(tmp_path / "split") == _records(tmp_path / "straight")
    assert [r["step"] for r in _records(tmp_path / "split")] == [0, 1, 2, 2, 3, 4, 4, 5, 5]
    # The held-out numbers come from the resumed weights, not a re-initialised model.
    assert resumed["eval_answer_loss"] == straight["eval_answer_loss"]
    assert resumed["first_eval_answer_loss"] == straight["first_eval_answer_loss"]
    for got, want in zip(
        jax.tree_util.tree_leaves(resumed["params"]),
        jax.tree_util.tree_leaves(straight["params"]),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert list((tmp_path / "split" / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "split" / "loss.png").stat().st_size > 0


def _nan_in_first_batch(monkeypatch, config):
    """A NaN answer weight in one row of the first train batch: its loss and gradients are NaN."""
    rows = 200  # tiny_config's train items, one row each
    victim = int(next(tasks_lib.EpochSampler(rows, config.batch_size, config.seed))[0])
    encode = ft_lib.encode_examples

    def poisoned(tokenizer, examples, seq_len, *, correct_only):
        out = encode(tokenizer, examples, seq_len, correct_only=correct_only)
        if correct_only:
            out["weights"][victim, np.flatnonzero(out["weights"][victim])[0]] = np.nan
        return out

    monkeypatch.setattr(ft_lib, "encode_examples", poisoned)


def test_non_finite_step_is_skipped_counted_or_stops(tmp_path, monkeypatch):
    """Policy 'skip': step 1 (NaN loss) changes no weight (the eval after it equals step 0's)
    and is counted; later steps train. max_skipped=0 stops; policy 'stop' names the step."""
    config = _config(tmp_path, num_steps=2, eval_every=1)
    _nan_in_first_batch(monkeypatch, config)
    result = ft_lib.finetune(config, tmp_path / "skip")
    records = _records(tmp_path / "skip")
    train = [r for r in records if "train_loss" in r]
    evals = [r for r in records if "eval_answer_loss" in r]
    assert train[0]["train_loss"] is None and train[0]["skipped"] == 1  # NaN: null in the file
    assert np.isfinite(train[1]["train_loss"]) and train[1]["skipped"] == 1
    assert [e["step"] for e in evals] == [0, 1, 2]
    assert evals[1]["eval_answer_loss"] == evals[0]["eval_answer_loss"]
    assert evals[2]["eval_answer_loss"] != evals[1]["eval_answer_loss"]
    assert result["step"] == 2

    with pytest.raises(FloatingPointError, match=r"^1 steps had a non-finite .*max_skipped=0; "):
        ft_lib.finetune(_config(tmp_path, num_steps=2, max_skipped=0), tmp_path / "max")
    with pytest.raises(FloatingPointError, match=r"non-finite loss or gradient at step 1"):
        ft_lib.finetune(_config(tmp_path, num_steps=2, nonfinite="stop"), tmp_path / "stop")
