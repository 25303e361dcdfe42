"""The processes of tests/test_multiprocess.py: the trainer under ``jax.distributed`` with 2
processes x 4 fake CPU devices on 127.0.0.1 (gloo collectives), and its 1-process reference.

``python -m tests.multiprocess_run PHASES TMP PORT PROCESS_ID`` (4 fake devices) runs, in one
process of the pair, the phases named in PHASES (comma-separated), one ``train_and_evaluate``
each, on the workdir ``TMP/run``, printing ``RESULT <phase> <json>`` after each:

* ``sigterm``: trains from scratch (checkpoints every 2 steps); process 1 pauses after step 5
  (``PAUSED 5``) until ``TMP/go`` exists; the test sends SIGTERM to process 1 alone before
  creating it;
* ``fallback``: resumes (the test has corrupted the newest checkpoint); process 1 pauses after
  step 9 (``PAUSED 9``) until ``TMP/go_both`` exists; the test sends SIGTERM to process 0, then
  creates it and sends SIGTERM to process 1 too;
* ``resume``: resumes where ``fallback`` stopped; process 1 pauses after step 13
  (``PAUSED 13``) for the test's ``kill -9``.

Each process prints ``STARTED AT <step>`` before its first step (the step it resumed from).

Every phase has ``num_steps=20`` (the learning-rate schedule depends on it).
``python -m tests.multiprocess_run reference TMP`` (8 fake devices) runs steps 1-13 in one
process, uninterrupted, on ``TMP/reference``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time

import jax

from tests.multiprocess_helpers import distributed_keys
from tests.train_fixtures import tiny_config
from train import main as main_lib

_BUILD_TRAINER = main_lib.build_trainer


def config(tmp: pathlib.Path, **overrides):
    """GoLore, rank 8, refresh every 2 steps, batch 8 on a (2, 2, 2) mesh, saves every 2."""
    return tiny_config(
        tmp,
        num_steps=20,
        checkpoint_every=2,
        eval_every=4,
        keep_checkpoints=5,
        **{"optimizer.name": "golore", "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2},
        **overrides,
    )


def _pause_after(step: int, go: pathlib.Path | None) -> None:
    """Process 1 stops after ``step`` until ``go`` exists (None: until it is killed)."""

    def build_trainer(c, mesh):
        trainer = _BUILD_TRAINER(c, mesh)
        started = []

        def train_step(state, batch):
            if not started:
                started.append(int(state.step))
                print(f"STARTED AT {started[0]}", flush=True)
            state, metrics = trainer.train_step(state, batch)
            if jax.process_index() == 1 and int(state.step) == step:
                print(f"PAUSED {step}", flush=True)
                deadline = time.monotonic() + 120
                while (go is None or not go.exists()) and time.monotonic() < deadline:
                    time.sleep(0.05)
            return state, metrics

        return dataclasses.replace(trainer, train_step=train_step)

    main_lib.build_trainer = build_trainer


def _losses(workdir: pathlib.Path) -> list[list]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [[r["step"], r["loss"]] for r in records if "loss" in r]


def run_pair(phases: list[str], tmp: pathlib.Path, port: int, process_id: int) -> None:
    dist = distributed_keys(port, process_id)
    for phase in phases:
        main_lib.build_trainer = _BUILD_TRAINER
        if phase == "sigterm":
            _pause_after(5, tmp / "go")
        if phase == "fallback":
            _pause_after(9, tmp / "go_both")
        if phase == "resume":
            _pause_after(13, None)
        result = main_lib.train_and_evaluate(config(tmp, **dist), tmp / "run")
        result["process_index"] = jax.process_index()
        result["process_count"] = jax.process_count()
        result["devices"] = jax.device_count()
        print(f"RESULT {phase} {json.dumps(result)}", flush=True)


def reference(tmp: pathlib.Path) -> None:
    result = main_lib.train_and_evaluate(config(tmp, run_steps=13), tmp / "reference")
    result["devices"] = jax.device_count()
    result["losses"] = _losses(tmp / "reference")
    print(f"RESULT reference {json.dumps(result)}", flush=True)


if __name__ == "__main__":
    # The second launch of the pair loads the first one's compiled steps.
    jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(sys.argv[2]) / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    if sys.argv[1] == "reference":
        reference(pathlib.Path(sys.argv[2]))
    else:
        run_pair(
            sys.argv[1].split(","), pathlib.Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
        )
