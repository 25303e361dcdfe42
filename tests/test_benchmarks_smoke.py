"""Smoke test of benchmarks/train_step.py (--memory-only, --profile) and profile_summary.

Subprocesses, as the benchmark runs them; llama_tiny at seq 16, batch 1, adamw only: ~30 s.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _run(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _train_step(*args: str) -> list[dict]:
    common = ["--models", "llama_tiny", "--optimizers", "adamw", "--seq", "16", "--batch", "1"]
    stdout = _run("benchmarks.train_step", *common, *args)
    rows = [json.loads(ln) for ln in stdout.splitlines() if ln.startswith('{"model"')]
    assert len(rows) == 1, stdout
    return rows


def test_memory_only_reports_compiled_figures():
    (row,) = _train_step("--memory-only")
    figures = ("argument", "output", "alias", "temp", "peak_estimate")
    for name in figures:
        assert row[f"compiled_{name}_bytes"] > 0, name
    assert row["compiled_peak_estimate_bytes"] == (
        row["compiled_argument_bytes"]
        + row["compiled_temp_bytes"]
        + row["compiled_output_bytes"]
        - row["compiled_alias_bytes"]
    )
    # adamw: two fp32 moments per parameter, plus the step count
    assert row["state_floats"] == 2 * row["params"]
    assert row["compiled_argument_bytes"] >= row["params_bytes"] + row["state_bytes"]
    assert "steady_step_s" not in row


def test_profile_and_summary(tmp_path):
    (row,) = _train_step("--steps", "1", "--profile", str(tmp_path), "--profile-top", "5")
    assert row["steady_step_s"] > 0 and row["compiled_peak_estimate_bytes"] > 0
    assert row["profile_step_s"] > 0
    categories = {c["category"] for c in row["profile_categories"]}
    assert "lm_head matmul" in categories and "optimizer: update (elementwise)" in categories
    out_json = tmp_path / "summary.json"
    table = _run("benchmarks.profile_summary", str(tmp_path), "--top", "5", "--json", str(out_json))
    assert "| # | op | category | phase | per step ms | share of step |" in table
    assert "| category | per step ms | share of step | ops |" in table
    (summary,) = json.loads(out_json.read_text())
    assert summary["steps"] == 3 and summary["hlo_ops_named"] > 0
    assert sum(c["per_step_s"] for c in summary["categories"]) > 0


def _gpu_like_trace(path):
    """A trace shaped like a GPU one: a device process with an XLA Ops line (one conditional
    op around two ops), a stream line, and host step annotations."""
    meta = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 2, "tid": 1, "name": "thread_name", "args": {"name": "XLA Ops"}},
        {"ph": "M", "pid": 2, "tid": 2, "name": "thread_name", "args": {"name": "Stream #7"}},
    ]
    events = []
    for step in range(2):
        t = step * 100.0
        events += [
            {"ph": "X", "pid": 1, "tid": 9, "ts": t, "dur": 100.0, "name": "train_step",
             "args": {"step_num": str(step)}},
            {"ph": "X", "pid": 2, "tid": 1, "ts": t, "dur": 60.0, "name": "gemm_fusion.1",
             "args": {"hlo_op": "gemm_fusion.1", "hlo_module": "jit_step"}},
            {"ph": "X", "pid": 2, "tid": 1, "ts": t + 60, "dur": 30.0, "name": "conditional.2",
             "args": {"hlo_op": "conditional.2", "hlo_module": "jit_step"}},
            {"ph": "X", "pid": 2, "tid": 1, "ts": t + 61, "dur": 20.0, "name": "loop_fusion.3",
             "args": {"hlo_op": "loop_fusion.3", "hlo_module": "jit_step"}},
            {"ph": "X", "pid": 2, "tid": 2, "ts": t, "dur": 60.0, "name": "sm90_xmma_gemm",
             "args": {"hlo_op": "gemm_fusion.1", "hlo_module": "jit_step"}},
        ]  # fmt: skip
    path.mkdir(parents=True)
    with gzip.open(path / "host.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": meta + events}, f)
    hlo = """HloModule jit_step

%fused_dot (p0: bf16[8,8]) -> f32[8,8] {
  %p0 = bf16[8,8]{1,0} parameter(0)
  ROOT %d = f32[8,8]{1,0} dot(%p0, %p0), metadata={op_name="jit(step)/jvp(LlamaForCausalLM)/model/layers_0/mlp/up_proj/up_proj/dot_general"}
}

ENTRY %main (a: bf16[8,8]) -> f32[8,8] {
  %a = bf16[8,8]{1,0} parameter(0)
  %gemm_fusion.1 = f32[8,8]{1,0} fusion(%a), kind=kCustom, calls=%fused_dot
  %conditional.2 = (f32[8,8]{1,0}) conditional(%a), metadata={op_name="jit(step)/optimizer/cond"}
  ROOT %loop_fusion.3 = f32[8,8]{1,0} fusion(%a), kind=kLoop, calls=%fused_dot, metadata={op_name="jit(step)/optimizer/mul"}
}
"""  # noqa: E501
    (path / "step.hlo.txt").write_text(hlo)


def test_summary_of_a_gpu_like_trace(tmp_path):
    from benchmarks import profile_summary

    _gpu_like_trace(tmp_path / "run")
    summary = profile_summary.summarize(tmp_path / "run")
    assert summary["source"] == "device XLA Ops" and summary["steps"] == 2
    ops = {r["op"]: r for r in summary["ops"]}
    assert ops["gemm_fusion.1"]["category"] == "dense matmul (q/k/v/o, MLP)"
    assert ops["gemm_fusion.1"]["share"] == pytest.approx(0.6)
    # self time: 30 us less the 20 us nested in it
    assert ops["conditional.2"]["per_step_s"] == pytest.approx(10e-6)
    assert ops["conditional.2"]["category"] == "projector refresh"
    assert ops["loop_fusion.3"]["phase"] == "opt"


def test_eigh_batch_times_every_batch(tmp_path):
    """benchmarks/eigh_batch.py on one CPU device: a row per batch, the half batch timed too."""
    out = tmp_path / "eigh.json"
    _run("benchmarks.eigh_batch", "--dim", "16", "--batches", "4x16,2x40", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [(r["matrix"], r["batch"]) for r in rows] == [("16x16", 4), ("16x40", 2)]
    for r in rows:
        assert r["one_device_s"] > 0 and r["one_device_half_batch_s"] > 0


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("batched", (True, 0)),
        ("per_leaf", (False, 0)),
        ("batched16", (True, 16)),
        ("batched0", None),
        ("batched-4", None),
        ("stacked", None),
    ],
)
def test_finetune_refresh_modes(mode, expected):
    from benchmarks.finetune_step import refresh_setting

    assert refresh_setting(mode) == expected
