"""Compile the real sharded train step for a TPU topology on any machine, TPU or not.

``python -m train.compile --config configs/llama_7b.py --topology v5e:16x16 --mesh fsdp=256``
builds the trainer of ``train.main.build_trainer`` on the compile-only devices of the topology
(``jax.experimental.topologies``, from libtpu: ``pip install 'golore-jax[tpu]'``), lowers its
train step for abstract arguments and compiles it with the TPU compiler. The step holds the
projector refresh (a ``lax.cond``), so the compiled program is the largest one training runs.

It prints a table and writes JSON: per-chip HBM from ``memory_analysis()`` against the chip's
capacity, the HLO's FLOPs from ``cost_analysis()``, the collectives in the compiled HLO and the
decompositions of the refresh. Exit status 1, with one line, when the step does not fit.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from train import main as main_lib
from train import model as model_lib
from train import sharding as sharding_lib

# HBM per chip in GiB, by the device_kind libtpu reports. Google Cloud TPU docs
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e): v4 32 GiB, v5e 16 GiB, v5p 95 GiB,
# v6e (Trillium) 32 GiB.
HBM_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95, "TPU v6 lite": 32}

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# An HLO instruction whose opcode is a collective (its async "-start" half counts, "-done" not).
_COLLECTIVE_RE = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
# XLA:TPU fuses a reduce-scatter into a fusion computation named all-reduce-scatter.N whose root
# is an all-reduce: count the fusion, not that all-reduce.
_REDUCE_SCATTER_FUSION_RE = re.compile(r"\sfusion\(.*calls=%all-reduce-scatter")
_COMPUTATION_RE = re.compile(r"^(?:ENTRY )?%([\w.-]+) ")
# The refresh's decompositions as the lowered module names them (custom calls on TPU: the TPU
# compiler expands them itself).
_DECOMPOSITION_RE = re.compile(r"custom_call @(\w+)")
_DECOMPOSITIONS = ("Eigh", "Qr", "ProductOfElementaryHouseholderReflectors", "Svd")
# What the TPU compiler says when the step does not fit: "... the total memory required for
# HLO temporaries (19.91G) exceeds available HBM (15.75G)" (or "Used 21.5G of 15.75G hbm").
_OOM_RE = re.compile(r"(?:HLO temporaries \(|Used )([\d.]+)([KMGT])")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.DEFINE_string(
    "topology", None, "TPU topology, e.g. v5e:2x2, v5e:16x16, v5p:4x4x4 (chips per axis)."
)
flags.DEFINE_string(
    "mesh",
    None,
    "Mesh axis sizes, e.g. 'fsdp=256' or 'data=2,fsdp=128' (unnamed axes are 1, one may be "
    "-1); default: config.mesh.",
)
flags.DEFINE_string("out", None, "JSON report path (default benchmarks/results/compile_*.json).")
flags.DEFINE_string("hlo_out", None, "Also write the compiled HLO text here.")
flags.DEFINE_float("hbm_gib", None, "Per-chip HBM in GiB (default: by the chip, see HBM_GIB).")
flags.mark_flags_as_required(["config", "topology"])


def topology_devices(topology: str) -> list:
    """The compile-only devices of a TPU topology (libtpu; no TPU needed)."""
    try:
        from jax.experimental import topologies

        return list(topologies.get_topology_desc(topology, "tpu").devices)
    except Exception as e:  # libtpu missing or an unknown topology name
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"--topology={topology!r}: no TPU topology ({first}); install libtpu "
            "(pip install 'golore-jax[tpu]') and name one like v5e:2x2, v5e:16x16, v5p:4x4x4"
        ) from None


def parse_mesh(spec: str) -> dict[str, int]:
    """'fsdp=256' / 'data=2,fsdp=128' -> sizes of every mesh axis (unnamed ones are 1)."""
    sizes = dict.fromkeys(sharding_lib.MESH_AXES, 1)
    for item in spec.split(","):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in sizes or not re.fullmatch(r"-?\d+", value.strip()):
            raise ValueError(
                f"--mesh={spec!r}: expected axis=size items over {sharding_lib.MESH_AXES}, "
                f"e.g. fsdp=256, got {item!r}"
            )
        sizes[name] = int(value)
    return sizes


def count_collectives(hlo_text: str) -> dict[str, int]:
    """Instructions per collective opcode in an HLO module's text."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    computation = ""
    for line in hlo_text.splitlines():
        header = _COMPUTATION_RE.match(line)
        if header:
            computation = header.group(1)
            continue
        if _REDUCE_SCATTER_FUSION_RE.search(line):
            counts["reduce-scatter"] += 1
            continue
        match = _COLLECTIVE_RE.search(line)
        if match and not computation.startswith("all-reduce-scatter"):
            counts[match.group(1)] += 1
    return counts


def decompositions(lowered_text: str) -> dict[str, int]:
    """The linear-algebra custom calls (eigh, QR, SVD) in a lowered module's text."""
    found = [name for name in _DECOMPOSITION_RE.findall(lowered_text) if name in _DECOMPOSITIONS]
    return {name: found.count(name) for name in sorted(set(found))}


def _attention(model_config: model_lib.LlamaConfig, mesh: jax.sharding.Mesh) -> str:
    with jax.set_mesh(mesh):  # the attention the step was traced with
        return model_lib.resolve_attention(model_config)


def fit_message(report: dict[str, Any]) -> str | None:
    """The one-line reason a compiled step does not fit its chip, or None when it fits."""
    if report["fits"]:
        return None
    return (
        f"does not fit: {report['hbm_gib']:.2f} GiB per chip > {report['hbm_capacity_gib']} GiB "
        f"({report['device_kind']}, {report.get('topology', '?')}, mesh {report['mesh']}); "
        "shard more (a larger fsdp axis), lower config.batch_size or turn on config.model.remat"
    )


def _bytes_per_chip(abstract_tree: Any) -> int:
    """Bytes of one chip's shards of a tree of ShapeDtypeStructs with shardings."""
    return sum(
        math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
        for leaf in jax.tree_util.tree_leaves(abstract_tree)
    )


def _gib(n: float) -> float:
    return n / 2**30


def _oom_bytes(message: str) -> float | None:
    match = _OOM_RE.search(message)
    if match is None:
        return None
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    return float(match.group(1)) * scale[match.group(2)]


def compile_train_step(
    config: Any, devices: list, hbm_gib: float | None = None
) -> tuple[dict[str, Any], str]:
    """Compiles ``config``'s train step for ``devices``; the report and the compiled HLO text.

    Memory per chip: ``argument + output + temp - alias`` bytes of ``memory_analysis()`` (the
    donated state is aliased to the new state, so it is counted once).
    """
    main_lib.validate_config(config)
    kind = devices[0].device_kind
    capacity = hbm_gib if hbm_gib is not None else HBM_GIB.get(kind)
    if capacity is None:
        raise ValueError(f"unknown HBM of chip {kind!r}; pass --hbm_gib")
    shape = sharding_lib.mesh_shape(config.mesh, len(devices))
    from jax.experimental import mesh_utils

    # Mesh axes laid out along the topology's ICI links (not just in device id order).
    mesh = jax.sharding.Mesh(mesh_utils.create_device_mesh(shape, devices), sharding_lib.MESH_AXES)
    trainer = main_lib.build_trainer(config, mesh)
    tokens = jax.ShapeDtypeStruct(
        (config.batch_size, config.seq_len), jnp.int32, sharding=trainer.batch_sharding
    )
    batch = {"inputs": tokens, "targets": tokens}
    start = time.perf_counter()
    lowered = trainer.train_step.lower(trainer.abstract_state, batch)
    lowered_text = lowered.as_text()
    report: dict[str, Any] = {
        "model": {k: config.model[k] for k in ("hidden_size", "num_layers", "vocab_size")},
        "optimizer": config.optimizer.name,
        "rank": config.optimizer.subspace.rank,
        "device_kind": kind,
        "chips": len(devices),
        "mesh": dict(mesh.shape),
        "batch_size": config.batch_size,
        "seq_len": config.seq_len,
        "attention": _attention(trainer.model.config, mesh),
        "hbm_capacity_gib": capacity,
        # lax.conds of the step: the non-finite skip, and the refresh (subspace optimizers).
        "conditionals": len(re.findall(r"stablehlo\.(?:case|if)\b", lowered_text)),
        "decompositions": decompositions(lowered_text),
        "jax": jax.__version__,
    }
    report["params"] = model_lib.num_params(trainer.model.config)
    report["state_and_batch_gib"] = _gib(_bytes_per_chip((trainer.abstract_state, batch)))
    tokens_per_chip = config.batch_size * config.seq_len / len(devices)
    report["model_tflops_per_chip"] = (
        model_lib.model_flops_per_token(trainer.model.config, config.seq_len)
        * tokens_per_chip
        / 1e12
    )
    try:
        compiled = lowered.compile()
    except Exception as e:  # the TPU compiler refuses a program larger than HBM
        temp = _oom_bytes(str(e))
        if temp is None:
            raise
        # No memory_analysis: the compiler's temporaries plus this chip's shards of the
        # state and batch (the arguments), a lower bound.
        report.update(
            compile_s=time.perf_counter() - start,
            compiler_temp_gib=_gib(temp),
            hbm_gib=_gib(temp) + report["state_and_batch_gib"],
            hbm_is_lower_bound=True,
            fits=False,
            compiler_error=str(e).strip().splitlines()[0][:300],
        )
        return report, ""
    report["compile_s"] = time.perf_counter() - start
    mem = compiled.memory_analysis()
    fields = {
        "argument_gib": mem.argument_size_in_bytes,
        "output_gib": mem.output_size_in_bytes,
        "temp_gib": mem.temp_size_in_bytes,
        "alias_gib": mem.alias_size_in_bytes,
        "generated_code_gib": mem.generated_code_size_in_bytes,
    }
    report.update({k: _gib(v) for k, v in fields.items()})
    total = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes
    )
    report["hbm_gib"] = _gib(total)
    report["fits"] = report["hbm_gib"] <= capacity
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    report["hlo_tflops_per_chip"] = float(cost.get("flops", math.nan)) / 1e12
    hlo_text = compiled.as_text()
    report["collectives"] = count_collectives(hlo_text)
    report["hlo_conditionals"] = len(re.findall(r"\sconditional\(", hlo_text))
    # cost_analysis counts a while loop's body once (e.g. a collective matmul's loop).
    report["hlo_while_loops"] = len(re.findall(r"\swhile\(", hlo_text))
    # What the TPU compiler made of the decompositions (e.g. EighTpu, QrDecompositionBlock).
    targets = re.findall(r'custom_call_target="(\w+)"', hlo_text)
    report["compiled_decompositions"] = sorted(
        {t for t in targets if re.match(r"Eigh|Qr|Svd|Cholesky", t)}
    )
    return report, hlo_text


def format_report(report: dict[str, Any]) -> str:
    mesh = "x".join(f"{k}{v}" for k, v in report["mesh"].items() if v > 1) or "1"
    rows = [
        (
            "topology",
            f"{report.get('topology', '?')} ({report['chips']} x {report['device_kind']})",
        ),
        ("mesh", mesh),
        ("optimizer", f"{report['optimizer']} (rank {report['rank']})"),
        ("batch x seq", f"{report['batch_size']} x {report['seq_len']}"),
        (
            "HBM per chip",
            f"{report['hbm_gib']:.2f} GiB of {report['hbm_capacity_gib']} GiB: "
            + ("fits" if report["fits"] else "DOES NOT FIT"),
        ),
    ]
    if "argument_gib" in report:
        rows.append(
            (
                "  args/out/temp/alias",
                " / ".join(
                    f"{report[k]:.2f}"
                    for k in ("argument_gib", "output_gib", "temp_gib", "alias_gib")
                )
                + " GiB",
            )
        )
        rows.append(
            (
                "TFLOPs per chip",
                f"{report['hlo_tflops_per_chip']:.3f} (HLO), "
                f"{report['model_tflops_per_chip']:.3f} (6N+attention model count)",
            )
        )
        rows.append(
            ("collectives", ", ".join(f"{k} {v}" for k, v in report["collectives"].items()))
        )
    rows.append(
        (
            "refresh",
            f"{report['conditionals']} lax.cond (non-finite skip + refresh), decompositions "
            + (", ".join(f"{k} x{v}" for k, v in report["decompositions"].items()) or "none"),
        )
    )
    rows.append(("compile", f"{report['compile_s']:.1f} s"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = FLAGS.config
    try:
        devices = topology_devices(FLAGS.topology)
        if FLAGS.mesh:
            with config.unlocked():
                config.mesh.update(parse_mesh(FLAGS.mesh))
        report, hlo_text = compile_train_step(config, devices, FLAGS.hbm_gib)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    report["topology"] = FLAGS.topology
    report["config"] = pathlib.Path(config_flags.get_config_filename(FLAGS["config"])).stem
    print(format_report(report))
    out = FLAGS.out or (
        f"benchmarks/results/compile_{report['config']}_{report['optimizer']}_"
        f"{FLAGS.topology.replace(':', '_')}.json"
    )
    pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(out).write_text(json.dumps(report, indent=2) + "\n")
    if FLAGS.hlo_out and hlo_text:
        pathlib.Path(FLAGS.hlo_out).write_text(hlo_text)
    message = fit_message(report)
    if message is not None:
        print(message, file=sys.stderr)
        sys.exit(1)


def _compile_only_environment() -> None:
    """Compile-only devices need neither the TPU runtime nor the chips: keep JAX on the CPU
    (a TPU host's chips stay free for a running job) and let libtpu load beside another
    process holding its lockfile."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")


if __name__ == "__main__":
    _compile_only_environment()
    app.run(main)
