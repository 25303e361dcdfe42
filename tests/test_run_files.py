"""What a run leaves in its workdir, read by others: file modes of atomic rewrites, strict JSON
in metrics.jsonl (null for a non-finite value), loss.png from such records, and the summary
line naming the step of each held-out loss."""

from __future__ import annotations

import json
import math
import os
import pathlib
import stat

import pytest

from train import atomic
from train import loop as loop_lib


def _mode(path: pathlib.Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_atomic_write_gives_a_new_file_the_umask_mode_and_keeps_an_existing_ones(tmp_path):
    """mkstemp creates 0600; the renamed file must not keep that."""
    new = tmp_path / "new.txt"
    atomic.write_text(new, "a")
    assert _mode(new) == 0o666 & ~_umask()
    kept = tmp_path / "kept.txt"
    kept.write_text("a")
    for mode in (0o640, 0o604):
        kept.chmod(mode)
        atomic.write_text(kept, "b")
        assert (_mode(kept), kept.read_text()) == (mode, "b")
    assert not list(tmp_path.glob("*.tmp"))


def test_resume_dropping_records_keeps_metrics_jsonl_mode(tmp_path):
    """A resume from step 1 drops the records of steps run after it (rewriting the file
    atomically): the file keeps its mode (0644 under the usual umask, was 0600)."""
    path = tmp_path / "metrics.jsonl"
    with path.open("a") as f:  # as the loop creates it
        for step in range(4):
            f.write(json.dumps({"step": step, "loss": 1.0}) + "\n")
    path.chmod(0o644)
    records = loop_lib._read_metrics(path, keep_until=1)
    assert [r["step"] for r in records] == [0, 1]
    assert len(path.read_text().splitlines()) == 2
    assert _mode(path) == 0o644


def _strict_loads(line: str):
    def refuse(constant: str):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(line, parse_constant=refuse)


def test_metrics_lines_are_strict_json_with_null_for_non_finite_values():
    record = {"step": 3, "loss": math.nan, "grad_norm": math.inf, "lr": -math.inf, "ok": 1.5}
    line = loop_lib.metrics_line(record)
    assert line.endswith("\n") and line.count("\n") == 1
    expected = {"step": 3, "loss": None, "grad_norm": None, "lr": None, "ok": 1.5}
    assert _strict_loads(line) == expected
    assert record["loss"] != record["loss"]  # the caller's record keeps its NaN


def test_reading_metrics_accepts_null_and_rewrites_old_nan_lines_as_null(tmp_path):
    """A file written before null (a bare NaN token) or after it reads back; a rewrite (resume
    dropping records) leaves strict JSON."""
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"step": 1, "loss": NaN, "skipped": 1}\n'
        '{"step": 2, "loss": null, "skipped": 2}\n'
        '{"step": 3, "loss": 2.5, "skipped": 2}\n'
    )
    records = loop_lib._read_metrics(path, keep_until=2)
    assert [r["step"] for r in records] == [1, 2]
    assert [_strict_loads(x)["loss"] for x in path.read_text().splitlines()] == [None, None]


def test_loss_png_draws_records_with_null_losses(tmp_path):
    history = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": None}, {"step": 3, "loss": 2.0}]
    evals = [{"step": 0, "eval_loss": 3.5}, {"step": 3, "eval_loss": None}]
    loop_lib._loss_png(history, evals, tmp_path / "loss.png", "loss", "eval_loss")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pretraining_summary_names_the_step_of_each_held_out_loss():
    from train.__main__ import summary

    result = {
        "step": 200,
        "train_loss": 5.050466060638428,
        "first_eval_loss": 8.328227758407593,
        "first_eval_step": 0,
        "eval_loss": 4.975313425064087,
        "eval_step": 150,  # e.g. run_steps stopped the run between two evaluations
    }
    assert summary(result) == (
        "step 200: train loss 5.0505, held-out loss 8.3282 (step 0) -> 4.9753 (step 150)"
    )
    result["train_loss"] = None  # no train record (e.g. every one dropped)
    assert summary(result).startswith("step 200: train loss none, ")


def test_finetune_summary_names_the_evaluation_steps():
    from train.finetune import summary

    result = {
        "step": 20,
        "train_loss": 0.25,
        "first_eval_step": 0,
        "eval_step": 15,
        "first_eval_accuracy": 0.5,
        "eval_accuracy": 0.75,
        "first_eval_answer_loss": 0.7,
        "eval_answer_loss": 0.5,
        "export_dir": None,
    }
    assert summary(result) == (
        "step 20: train loss 0.2500; evaluated at step 0 -> 15: accuracy 0.5000 -> 0.7500, "
        "answer loss 0.7000 -> 0.5000"
    )


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_bare_non_finite_float_is_never_written(value):
    with pytest.raises(ValueError):
        json.dumps({"loss": value}, allow_nan=False)  # what metrics_line relies on
    assert loop_lib.metrics_line({"loss": value}) == '{"loss": null}\n'
