"""Run with 8 fake CPU devices: the layer-wise step's losses per mesh and its state shardings.

``XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.layerwise_multidevice_check
DIR`` prints one JSON object; tests/test_layerwise.py runs it in a subprocess.
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax

from tests.train_fixtures import tiny_config
from train import data as data_lib
from train import main as main_lib
from train import sharding as sharding_lib

# (data, fsdp, tensor)
MESHES = {"1": (1, 1, 1), "2x2x2": (2, 2, 2)}


def run(tmp: pathlib.Path, steps: int = 3) -> dict:
    config = tiny_config(
        tmp,
        **{"step.layerwise": True, "optimizer.grad_clip": 0.0, "model.scan_layers": True},
    )
    datasets = data_lib.build_datasets(
        config.data, seq_len=config.seq_len, global_batch_size=config.batch_size, seed=0
    )
    batches = [next(datasets.train) for _ in range(steps)]
    out = {"devices": jax.device_count(), "losses": {}, "specs": {}}
    for name, shape in MESHES.items():
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
        layers = state.opt_state.layers[0]  # LayerwiseState.layers: galore_adamw's chain
        q_kernel = state.params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
        out["specs"][name] = {
            "q_kernel": str(q_kernel.sharding.spec),
            "q_basis": str(layers.bases["self_attn"]["q_proj"]["kernel"].sharding.spec),
            "q_mu": str(layers.inner_state.mu["self_attn"]["q_proj"]["kernel"].sharding.spec),
            "down_basis": str(layers.bases["mlp"]["down_proj"]["kernel"].sharding.spec),
            "down_mu": str(layers.inner_state.mu["mlp"]["down_proj"]["kernel"].sharding.spec),
            "q_mu_shard_shape": list(
                layers.inner_state.mu["self_attn"]["q_proj"]["kernel"]
                .addressable_shards[0]
                .data.shape
            ),
            "embed": str(state.params["model"]["embed_tokens"]["embedding"].sharding.spec),
        }
    return out


if __name__ == "__main__":
    print(json.dumps(run(pathlib.Path(sys.argv[1]))))
