"""benchmarks/memory.py: config overrides, one row measured in-process on CPU, a failing row."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks import memory
from tests.child_env import child_env
from tests.conftest import ROOT

TINY = "configs/llama_tiny.py"
SMALL = [  # a 2-layer, hidden-64 llama_tiny: cheap to compile on CPU
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "model.num_layers=2",
    "model.vocab_size=512",
    "seq_len=32",
    "batch_size=2",
    "optimizer.subspace.rank=8",
]


def test_load_config_overrides_by_key_and_type():
    config = memory.load_config(
        str(ROOT / TINY),
        [
            "optimizer.name=galore",
            "model.remat=true",
            "batch_size=4",
            "optimizer.subspace.scale=0.25",
        ],
    )
    assert config.optimizer.name == "galore" and config.model.remat is True
    assert config.batch_size == 4 and config.optimizer.subspace.scale == 0.25
    with pytest.raises(KeyError, match=r"optimizer\.nmae"):
        memory.load_config(str(ROOT / TINY), ["optimizer.nmae=galore"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        memory.load_config(str(ROOT / TINY), ["optimizer.name"])
    assert memory.parse_row("low: model.param_dtype=bfloat16 optimizer.inner.name=adamw8bit") == (
        "low",
        ["model.param_dtype=bfloat16", "optimizer.inner.name=adamw8bit"],
    )


def test_one_row_on_cpu_reports_compiled_figures_and_throughput():
    overrides = [*SMALL, "optimizer.name=galore", "model.param_dtype=bfloat16"]
    overrides += ["step.stochastic_rounding=True", "optimizer.subspace.basis_dtype=bfloat16"]
    row = memory.run_row(str(ROOT / TINY), overrides, "low", steady_steps=2)
    assert row["status"] == "ok", row.get("error")
    assert row["param_dtype"] == "bfloat16" and row["stochastic_rounding"]
    assert row["params_bytes"] == 2 * row["params"]  # bf16 params
    # arguments hold the donated state (params + optimizer state) and the batch
    assert row["compiled_argument_bytes"] >= row["params_bytes"] + row["state_bytes"]
    assert row["compiled_peak_estimate_bytes"] == (
        row["compiled_argument_bytes"]
        + row["compiled_temp_bytes"]
        + row["compiled_output_bytes"]
        - row["compiled_alias_bytes"]
    )
    assert set(row["phases"]) == {"compile", "init", "refresh0", "steady", "refresh1"}
    assert row["peak_bytes"] is None and "compiled figures only" in row["note"]  # CPU
    steady, refresh, tau = row["steady_step_s"], row["refresh_step_s"], 40  # llama_tiny's tau
    assert row["update_every_amortized"] == tau
    assert row["amortized_step_s"] == pytest.approx(steady + (refresh - steady) / tau)
    assert row["steady_tokens_per_s"] == pytest.approx(2 * 32 / steady)
    assert row["skipped"] == 0 and row["final_loss"] > 0
    assert row["method"]["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"


def test_a_failing_row_is_recorded_and_the_run_goes_on(tmp_path):
    out_json = tmp_path / "rows.json"
    out = subprocess.run(
        [
            *(sys.executable, "-m", "benchmarks.memory", "--config", TINY, "--json", str(out_json)),
            *("--row", "typo: optimizer.nmae=galore", "--row", "bad: optimizer.name=sophia"),
        ],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out_json.read_text())
    assert [(r["label"], r["status"]) for r in rows] == [("typo", "failed"), ("bad", "failed")]
    assert "optimizer.nmae" in rows[0]["error"]
    assert "optimizer.name must be one of" in rows[1]["error"]
    assert "| typo | llama_tiny | -x- | failed |" in out.stdout
