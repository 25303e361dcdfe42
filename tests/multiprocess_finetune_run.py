"""The processes of tests/test_multiprocess_finetune.py: ``train.finetune`` under
``jax.distributed`` with 2 processes x 4 fake CPU devices on 127.0.0.1, and its 1-process
reference with 8 devices, on the same (data 2, fsdp 4) mesh and global batch.

``python -m tests.multiprocess_finetune_run pair TMP PORT PROCESS_ID``: fine-tunes steps 1-2
(``run_steps=2``), then resumes from that checkpoint to step 4, on the workdir ``TMP/run``.
``python -m tests.multiprocess_finetune_run reference TMP``: steps 1-4 uninterrupted on
``TMP/reference``. Each prints ``RESULT <phase> <json>`` with the rows this process passed to
``jax.make_array_from_process_local_data`` for the train batches.
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax

from tests.multiprocess_helpers import distributed_keys
from tests.test_finetune import tiny_config
from train import finetune as ft_lib

_MAKE_ARRAY = jax.make_array_from_process_local_data
FED_ROWS: list[int] = []  # rows of each train batch this process fed


BATCH = 8  # the global train batch (eval batches have 16 rows)


def _recording(sharding, local, global_shape=None):
    # One entry per train batch (its weights: the only float array of a batch).
    if local.dtype.kind == "f" and global_shape is not None and global_shape[0] == BATCH:
        FED_ROWS.append(int(local.shape[0]))
    return _MAKE_ARRAY(sharding, local, global_shape)


def config(data: pathlib.Path, **overrides):
    """GoLore, rank 8, refresh every 2 steps, AdamW inside, 1 layer, seq 32; batch 8 on a
    (2, 4, 1) mesh; the task files are written under ``data`` (one directory per process: no
    process reads a file another one is writing)."""
    data.mkdir(parents=True, exist_ok=True)
    config = tiny_config(data, "golore")
    config.optimizer.subspace.rank, config.optimizer.subspace.update_every = 8, 2
    # One layer, shorter rows: less to compile (three processes compile at once).
    config.model.num_layers, config.model.max_seq_len, config.seq_len = 1, 32, 32
    config.num_steps, config.log_every, config.eval_every = 4, 1, 2
    config.data.max_eval_examples, config.eval_batch_size = 8, 16
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 4, 1
    config.export.enabled = False
    config.update(overrides)
    return config


def _losses(workdir: pathlib.Path) -> list[list]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [[r["step"], r["train_loss"]] for r in records if "train_loss" in r]


def _result(phase: str, result: dict) -> None:
    out = {k: result[k] for k in ("step", "train_loss", "eval_answer_loss", "stopped_by_signal")}
    out.update(process_index=jax.process_index(), devices=jax.device_count(), fed_rows=FED_ROWS[:])
    print(f"RESULT {phase} {json.dumps(out)}", flush=True)


def pair(tmp: pathlib.Path, port: int, process_id: int) -> None:
    dist = distributed_keys(port, process_id)
    data = tmp / f"data_{process_id}"

    def same_on_every_process(c):
        # The pod's processes must agree on their configs (train/distributed.py): every one
        # reads the task files the test wrote once under TMP/tasks (the same rows as data_i's).
        c.data.train_file = str(tmp / "tasks" / "train.jsonl")
        c.data.eval_file = str(tmp / "tasks" / "eval.jsonl")
        return c

    first = same_on_every_process(config(data, run_steps=2, **dist))
    _result("first", ft_lib.finetune(first, tmp / "run"))
    _result("resumed", ft_lib.finetune(same_on_every_process(config(data, **dist)), tmp / "run"))


def reference(tmp: pathlib.Path) -> None:
    _result("reference", ft_lib.finetune(config(tmp / "data_ref"), tmp / "reference"))
    print(f"RESULT losses {json.dumps(_losses(tmp / 'reference'))}", flush=True)


if __name__ == "__main__":
    jax.make_array_from_process_local_data = _recording
    # The pair's resumed run loads the compiled steps of its first run.
    jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(sys.argv[2]) / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    if sys.argv[1] == "reference":
        reference(pathlib.Path(sys.argv[2]))
    else:
        pair(pathlib.Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
