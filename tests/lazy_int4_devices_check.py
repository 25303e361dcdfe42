"""Run with 8 fake CPU devices: the layer-wise step with INT4 bases and the lazy refresh on one
device and on a 2x2x2 mesh (data x fsdp x tensor): losses, refresh counts, the bases' specs.

``XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.lazy_int4_devices_check
DIR`` prints one JSON object; tests/test_lazy_refresh.py runs it in a subprocess (the device
count is fixed when jax starts).
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax

from golore_jax._subspace import refresh_counts
from tests.train_fixtures import tiny_config
from train import data as data_lib
from train import main as main_lib
from train import sharding as sharding_lib

OPTIONS = {
    "step.layerwise": True,
    "optimizer.grad_clip": 0.0,
    "model.scan_layers": True,
    "optimizer.name": "galore",
    "optimizer.subspace.basis_dtype": "int4",
    "optimizer.subspace.lazy_threshold": 0.05,  # below r/d = 8/64: it fires
    "optimizer.subspace.lazy_patience": 1,
}
MESHES = {"1": (1, 1, 1), "2x2x2": (2, 2, 2)}


def run(tmp: pathlib.Path, steps: int = 5) -> dict:
    config = tiny_config(tmp, **OPTIONS)
    datasets = data_lib.build_datasets(
        config.data, seq_len=config.seq_len, global_batch_size=config.batch_size, seed=0
    )
    batches = [next(datasets.train) for _ in range(steps)]
    out = {"devices": jax.device_count(), "losses": {}, "counts": {}, "specs": {}}
    for name, shape in MESHES.items():
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = shape
        devices = jax.devices()[: shape[0] * shape[1] * shape[2]]
        trainer = main_lib.build_trainer(config, sharding_lib.make_mesh(config.mesh, devices))
        state = trainer.init(jax.random.key(0))
        losses = []
        for batch in batches:
            state, metrics = trainer.train_step(
                state, main_lib.to_global(batch, trainer.batch_sharding)
            )
            losses.append(float(metrics["loss"]))
        out["losses"][name] = losses
        out["counts"][name] = [int(c) for c in refresh_counts(state.opt_state)]
        layers = state.opt_state.layers[0]
        q = layers.bases["self_attn"]["q_proj"]["kernel"]
        down = layers.bases["mlp"]["down_proj"]["kernel"]
        out["specs"][name] = {
            "q_codes": str(q.codes.sharding.spec),
            "q_scales": str(q.scales.sharding.spec),
            "down_codes": str(down.codes.sharding.spec),
            "period": str(layers.lazy.period["self_attn"]["q_proj"]["kernel"].sharding.spec),
        }
    return out


if __name__ == "__main__":
    print(json.dumps(run(pathlib.Path(sys.argv[1]))), flush=True)
