"""train/compile.py: the real train step compiled for a TPU topology on a CPU machine.

The compile test needs libtpu (the ``tpu`` extra, in ``test``); it is skipped where libtpu is
not installed. The HLO parsing, mesh flag and attention choice are tested without it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from configs import llama_tiny
from tests.child_env import child_env
from tests.conftest import ROOT
from train import compile as compile_lib
from train import main as main_lib
from train import model as model_lib
from train import sharding as sharding_lib

NO_LIBTPU = importlib.util.find_spec("libtpu") is None
NEEDS_LIBTPU = pytest.mark.skipif(
    NO_LIBTPU, reason="libtpu is not installed (pip install 'golore-jax[tpu]'): no TPU compiler"
)


def _sharded_bytes(abstract_tree, mesh_sizes: dict[str, int]) -> int:
    """Bytes per chip of a tree of sharded ShapeDtypeStructs under mesh axis sizes."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(abstract_tree):
        spec = tuple(leaf.sharding.spec) + (None,) * (len(leaf.shape) - len(leaf.sharding.spec))
        shape = []
        for dim, axes in zip(leaf.shape, spec, strict=True):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
            shape.append(math.ceil(dim / math.prod(mesh_sizes[a] for a in axes)))
        total += math.prod(shape) * leaf.dtype.itemsize  # PRNG keys too (8 bytes)
    return total


@NEEDS_LIBTPU
def test_tiny_galore_step_compiles_for_v5e_2x2(tmp_path):
    out, hlo = tmp_path / "report.json", tmp_path / "step.hlo"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "train.compile",
            "--config",
            "configs/llama_tiny.py",
            "--topology",
            "v5e:2x2",
            "--mesh",
            "fsdp=4",
            "--config.optimizer.name=galore",
            "--config.model.num_layers=2",  # llama_tiny's shapes, half its layers: a faster compile
            f"--out={out}",
            f"--hlo_out={hlo}",
        ],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert "HBM per chip" in run.stdout and "fits" in run.stdout
    assert (report["chips"], report["device_kind"]) == (4, "TPU v5 lite")
    assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert report["attention"] == "einsum"

    # Two lax.conds in the step: the non-finite skip and the refresh, whose batched eigh
    # (gram_eigh: one call for all the same-size Gram matrices) the TPU compiler compiles.
    assert report["conditionals"] == 2 and report["hlo_conditionals"] >= 1
    assert report["decompositions"] == {"Eigh": 1}
    assert report["compiled_decompositions"] == ["EighTpu"]
    assert 'custom_call_target="EighTpu"' in hlo.read_text()

    # Memory: the arguments hold this chip's shards of the state and batch (found here from
    # the trainer's own shardings, on the CPU), plus the padding of TPU tiled layouts (352 ->
    # 384: 1.10x here). The donated state is aliased to the new one, counted once in the total.
    config = llama_tiny.get_config()
    config.optimizer.name = "galore"
    config.model.num_layers = 2
    trainer = main_lib.build_trainer(config, sharding_lib.make_mesh(config.mesh))
    sizes = {"data": 1, "fsdp": 4, "tensor": 1}
    state = _sharded_bytes(trainer.abstract_state, sizes)
    batch = 2 * config.batch_size * config.seq_len * 4 // sizes["fsdp"]  # int32 inputs, targets
    argument = report["argument_gib"] * 2**30
    assert state + batch <= argument <= 1.25 * (state + batch), (state, batch, argument)
    assert report["alias_gib"] * 2**30 >= state and report["alias_gib"] <= report["argument_gib"]
    total = sum(report[k] for k in ("argument_gib", "output_gib", "temp_gib"))
    assert report["hbm_gib"] == pytest.approx(total - report["alias_gib"])
    assert report["fits"] and report["hbm_gib"] < 16

    # FLOPs: the model's 6N + attention count plus the optimizer and loss (1.04x here).
    assert 1.0 <= report["hlo_tflops_per_chip"] / report["model_tflops_per_chip"] <= 1.5
    # FSDP: params gathered for the matmuls, gradients reduce-scattered (or all-reduced).
    collectives = report["collectives"]
    assert collectives["all-gather"] > 0
    assert collectives["reduce-scatter"] + collectives["all-reduce"] > 0


@NEEDS_LIBTPU
def test_unknown_topology_is_one_line():
    with pytest.raises(ValueError, match=r"--topology='v9z:2x2': no TPU topology"):
        compile_lib.topology_devices("v9z:2x2")


def test_count_collectives_reads_tpu_hlo():
    hlo = "\n".join(
        [
            "%all-reduce-scatter.3 (p: f32[8]) -> f32[2] {",
            "  %all-reduce.1 = f32[8] all-reduce(%p), channel_id=1",  # the fusion's root
            "}",
            "%wrapped (p: f32[2]) -> f32[8] {",
            "  %all-gather.4 = f32[8] all-gather(%p), dimensions={0}",
            "}",
            "ENTRY %main (a: f32[8]) -> f32[8] {",
            "  %fusion.1 = f32[2] fusion(%a), kind=kOutput, calls=%all-reduce-scatter.3",
            "  %all-reduce-start.2 = f32[] all-reduce-start(%x), to_apply=%add",
            "  %all-reduce-done.2 = f32[] all-reduce-done(%all-reduce-start.2)",
            "  %a2a = f32[8] all-to-all(%a), dimensions={0}",
            "}",
        ]
    )
    assert compile_lib.count_collectives(hlo) == {
        "all-gather": 1,
        "reduce-scatter": 1,
        "all-reduce": 1,
        "all-to-all": 1,
        "collective-permute": 0,
    }


def test_mesh_flag_and_fit_message():
    assert compile_lib.parse_mesh("data=2, fsdp=-1") == {"data": 2, "fsdp": -1, "tensor": 1}
    with pytest.raises(ValueError, match=r"--mesh='fsdp=8,model=2'.*got 'model=2'"):
        compile_lib.parse_mesh("fsdp=8,model=2")
    report = {
        "fits": False,
        "hbm_gib": 21.5,
        "hbm_capacity_gib": 16,
        "device_kind": "TPU v5 lite",
        "topology": "v5e:4x4",
        "mesh": {"data": 1, "fsdp": 16, "tensor": 1},
    }
    message = compile_lib.fit_message(report)
    assert message.startswith("does not fit: 21.50 GiB per chip > 16 GiB (TPU v5 lite, v5e:4x4")
    assert "\n" not in message
    assert compile_lib.fit_message({**report, "fits": True}) is None


def test_auto_attention_follows_the_mesh_devices(monkeypatch):
    # On a GPU host, auto picks cuDNN; tracing for a TPU mesh picks einsum, which TPUs compile.
    class FakeGpu:
        platform, compute_capability = "gpu", "9.0"

    monkeypatch.setattr(jax, "devices", lambda *a, **k: [FakeGpu()])
    config = model_lib.LlamaConfig(256, 64, 128, 4, 2, dtype=jnp.bfloat16)
    assert model_lib.resolve_attention(config) == "cudnn"
    tpu = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=None, platform="tpu")
    mesh = jax.sharding.AbstractMesh((1,), ("fsdp",), abstract_device=tpu)
    with jax.sharding.use_abstract_mesh(mesh):
        assert model_lib.resolve_attention(config) == "einsum"


def test_table_driver_meshes_and_rows(tmp_path):
    from benchmarks import tpu_compile_table as driver

    assert driver.mesh_for("llama_7b", "v5e:16x16") == "fsdp=256"
    assert driver.mesh_for("llama_1b", "v5p:4x4x4") == "data=4,fsdp=16"
    refused = {
        "mesh": {"data": 1, "fsdp": 16, "tensor": 1},
        "hbm_gib": 20.85,
        "hbm_capacity_gib": 16,
        "hbm_is_lower_bound": True,
        "state_and_batch_gib": 4.71,
        "fits": False,
        "compile_s": 72.0,
    }
    driver.report_path(tmp_path, "llama_7b", "adamw", "v5e-16").write_text(json.dumps(refused))
    rows = driver.table(tmp_path).splitlines()
    assert len(rows) == 2 + 18
    assert (
        "| llama_7b | adamw | v5e-16 | fsdp 16 | >= 20.85 of 16 | 4.71 | **no** |  | "
        "(compiler: out of HBM) | 72 |" in rows
    )
    assert "| llama_1b | adamw | v5e-16 | | not run | | | | | |" in rows
    # A variant (galore_layerwise) gets a row only once its report exists ...
    driver.report_path(tmp_path, "llama_7b", "galore_layerwise", "v5p-128").write_text(
        json.dumps(refused)
    )
    rows = driver.table(tmp_path).splitlines()
    assert len(rows) == 2 + 19
    assert sum("| llama_7b | galore_layerwise | v5p-128 | fsdp 16 |" in r for r in rows) == 1


def test_table_driver_variant_flags(tmp_path, monkeypatch):
    from benchmarks import tpu_compile_table as driver

    commands = []

    def fake_run(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(driver.subprocess, "run", fake_run)
    out = tmp_path / "r.json"
    out.write_text("{}")
    driver.run_one("llama_7b", "galore_layerwise", "v5p-128", out, timeout=1.0)
    driver.run_one("llama_7b", "galore", "v5p-128", out, timeout=1.0)
    layerwise, plain = commands
    assert "--config.optimizer.name=galore" in layerwise and "--topology=v5p:4x4x4" in layerwise
    assert "--config.step.layerwise=True" in layerwise
    assert "--config.model.scan_layers=True" in layerwise
    assert not any("layerwise" in arg for arg in plain)
