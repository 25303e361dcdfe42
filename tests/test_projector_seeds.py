"""experiments/projector_seeds.py: the paired seed statistics in EXPERIMENTS.md (issue 6)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "experiments" / "projector_seeds.py"
WINDOW_TOKENS = 50 * 128 * 256


def _write_run(root, name, evals, window_seconds):
    lines = [{"step": 0, "eval_loss": 10.0}]
    lines += [
        {"step": 50 * (i + 1), "loss": 5.0, "tokens_per_s": WINDOW_TOKENS / s}
        for i, s in enumerate(window_seconds)
    ]
    lines += [{"step": step, "eval_loss": loss} for step, loss in evals.items()]
    (root / name).mkdir()
    (root / name / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def _run(root):
    return subprocess.run([sys.executable, str(SCRIPT), str(root)], capture_output=True, text=True)


def test_paired_difference_and_t_interval(tmp_path):
    svd = {0: 4.0, 1: 4.1, 2: 4.2}
    gram = {0: 4.01, 1: 4.12, 2: 4.2}  # differences 0.01, 0.02, 0.00: mean 0.01, std 0.01
    for seed in svd:
        _write_run(tmp_path, f"svd_s{seed}", {500: svd[seed]}, [10.0, 10.0])
        _write_run(tmp_path, f"gram_eigh_s{seed}", {500: gram[seed]}, [8.0, 8.0])
    _write_run(tmp_path, "svd_s9", {500: 9.0}, [1.0])  # no gram_eigh partner: must be left out
    result = _run(tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["seeds"] == [0, 1, 2]
    (row,) = summary["rows"]  # step 0 (shared initialisation) is not a row
    assert row["step"] == 500
    assert row["svd_mean"] == pytest.approx(4.1) and row["svd_std"] == pytest.approx(0.1)
    assert row["diff_mean"] == pytest.approx(0.01)
    # t_{0.975, 2 dof} = 4.302653 (Student-t table) times std / sqrt(n)
    assert row["diff_ci95"] == pytest.approx(4.302653 * 0.01 / 3**0.5, rel=1e-5)
    assert summary["svd_step_seconds"] == pytest.approx([20.0] * 3)
    assert summary["time_ratio_mean"] == pytest.approx(0.8)
    assert "+0.0100 ± 0.0248" in result.stdout


def test_one_shared_seed_is_refused(tmp_path):
    _write_run(tmp_path, "svd_s0", {500: 4.0}, [1.0])
    _write_run(tmp_path, "gram_eigh_s0", {500: 4.0}, [1.0])
    _write_run(tmp_path, "gram_eigh_s1", {500: 4.0}, [1.0])
    result = _run(tmp_path)
    assert result.returncode != 0
    assert "share 1 seed(s)" in result.stderr
    assert not (tmp_path / "summary.json").exists()


def test_missing_projector_names_it(tmp_path):
    _write_run(tmp_path, "svd_s0", {500: 4.0}, [1.0])
    result = _run(tmp_path)
    assert "no gram_eigh_s<seed>/metrics.jsonl" in result.stderr
