"""Run with 8 fake CPU devices: losses per mesh and the shardings of params and opt state.

``XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.multidevice_check DIR
[--layerwise] [--int8]`` prints one JSON object; tests/test_train.py (the plain step),
tests/test_layerwise.py (``--layerwise``: the layer-wise step on stacked layers) and
tests/test_int8_weights.py (``--layerwise --int8``: with int8-stored layers) run it in a
subprocess (the device count is fixed when jax starts); ``--explicit``: the plain step and
the stacked full-gradient step with ``mesh.axis_types='explicit'``, each on the one-device and
2x2x2 meshes (tests/test_train.py).
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

import jax

from tests.train_fixtures import tiny_config
from train import data as data_lib
from train import main as main_lib
from train import sharding as sharding_lib

# (data, fsdp, tensor)
MESHES = {"1": (1, 1, 1), "8x1x1": (8, 1, 1), "2x4x1": (2, 4, 1), "2x2x2": (2, 2, 2)}
LAYERWISE_MESHES = {"1": (1, 1, 1), "2x2x2": (2, 2, 2)}
LAYERWISE = {"step.layerwise": True, "optimizer.grad_clip": 0.0, "model.scan_layers": True}
# With --layerwise, also the full-gradient step on the stacked layers, both layers per optimizer
# call (vmapped): without clipping it follows the layer-wise trajectory.
STACKED_TWO_PER_CALL = {
    "step.layerwise": False,
    "optimizer.grad_clip": 0.0,
    "model.scan_layers": True,
    "step.layers_per_call": 2,
}
# With --int8 (and --layerwise): instead, the layer-wise step with int8-stored layers (fp32
# rest), on 1 device and on 2x2x2.
INT8 = {**LAYERWISE, "model.weight_storage": "int8"}


def _specs(state: Any) -> dict:
    """The plain step: chain(clip, galore_adamw) -> scale_by_subspace; layers_0's leaves."""
    subspace = state.opt_state[1][0]
    layer = "layers_0"
    q_kernel = state.params["model"][layer]["self_attn"]["q_proj"]["kernel"]
    q_mu = subspace.inner_state.mu["model"][layer]["self_attn"]["q_proj"]["kernel"]
    return {
        "q_kernel": str(q_kernel.sharding.spec),
        "q_basis": str(
            subspace.bases["model"][layer]["self_attn"]["q_proj"]["kernel"].sharding.spec
        ),
        "q_mu": str(q_mu.sharding.spec),
        "down_basis": str(
            subspace.bases["model"][layer]["mlp"]["down_proj"]["kernel"].sharding.spec
        ),
        "down_mu": str(
            subspace.inner_state.mu["model"][layer]["mlp"]["down_proj"]["kernel"].sharding.spec
        ),
        "q_kernel_shards": len(q_kernel.addressable_shards),
        "q_mu_shard_shape": list(q_mu.addressable_shards[0].data.shape),
    }


def _layerwise_specs(state: Any) -> dict:
    """The layer-wise step: LayerwiseState.layers holds galore_adamw's chain, stacked."""
    layers = state.opt_state.layers[0]
    q_kernel = state.params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    q_mu = layers.inner_state.mu["self_attn"]["q_proj"]["kernel"]
    return {
        "q_kernel": str(q_kernel.sharding.spec),
        "q_basis": str(layers.bases["self_attn"]["q_proj"]["kernel"].sharding.spec),
        "q_mu": str(q_mu.sharding.spec),
        "down_basis": str(layers.bases["mlp"]["down_proj"]["kernel"].sharding.spec),
        "down_mu": str(layers.inner_state.mu["mlp"]["down_proj"]["kernel"].sharding.spec),
        "q_mu_shard_shape": list(q_mu.addressable_shards[0].data.shape),
        "embed": str(state.params["model"]["embed_tokens"]["embedding"].sharding.spec),
    }


def _int8_specs(state: Any) -> dict:
    """The int8 layers: codes like the float kernel, scales with their input axis unsharded."""
    layers = state.params["model"]["layers"]
    q, down = layers["self_attn"]["q_proj"]["kernel"], layers["mlp"]["down_proj"]["kernel"]
    return {
        "q_codes": str(q.codes.sharding.spec),
        "q_scale": str(q.scale.sharding.spec),
        "down_codes": str(down.codes.sharding.spec),
        "down_scale": str(down.scale.sharding.spec),
    }


def run(
    tmp: pathlib.Path,
    steps: int = 3,
    *,
    layerwise: bool = False,
    int8: bool = False,
    explicit: bool = False,
) -> dict:
    config = tiny_config(tmp, **(LAYERWISE if layerwise else {}))
    if explicit:  # mesh.axis_types='explicit': the one-device and 2x2x2 meshes
        config.mesh.axis_types = "explicit"
    datasets = data_lib.build_datasets(
        config.data, seq_len=config.seq_len, global_batch_size=config.batch_size, seed=0
    )
    batches = [next(datasets.train) for _ in range(steps)]
    out = {"devices": jax.device_count(), "losses": {}, "specs": {}}
    meshes = LAYERWISE_MESHES if layerwise or explicit else MESHES
    cases = [(name, shape, {}) for name, shape in meshes.items()]
    if int8:
        cases = [(f"int8_{name}", shape, INT8) for name, shape in LAYERWISE_MESHES.items()]
    elif layerwise:
        cases.append(("stacked_2_per_call_2x2x2", (2, 2, 2), STACKED_TWO_PER_CALL))
    elif explicit:  # and the stacked full-gradient step (model.scan_layers, 2 layers a call)
        # with every operation of its update typed (mesh.typed_update: the library's
        # Explicit-axis code), the plain step with the default (update inside auto_axes)
        typed = {**STACKED_TWO_PER_CALL, "mesh.typed_update": True}
        cases += [
            (f"stacked_2_per_call_{name}", shape, typed) for name, shape in LAYERWISE_MESHES.items()
        ]
    for name, shape, overrides in cases:
        config.update_from_flattened_dict(overrides)
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = shape
        devices = jax.devices()[: shape[0] * shape[1] * shape[2]]
        mesh = sharding_lib.make_mesh(config.mesh, devices)
        trainer = main_lib.build_trainer(config, mesh)
        state = trainer.init(jax.random.key(0))
        losses = []
        for batch in batches:
            state, metrics = trainer.train_step(
                state, main_lib.to_global(batch, trainer.batch_sharding)
            )
            losses.append(float(metrics["loss"]))
        out["losses"][name] = losses
        stacked = layerwise or config.model.scan_layers
        specs = _int8_specs if int8 else _layerwise_specs if stacked else _specs
        out["specs"][name] = specs(state)
    return out


if __name__ == "__main__":
    flags = sys.argv[2:]
    print(
        json.dumps(
            run(
                pathlib.Path(sys.argv[1]),
                layerwise="--layerwise" in flags,
                int8="--int8" in flags,
                explicit="--explicit" in flags,
            )
        )
    )
