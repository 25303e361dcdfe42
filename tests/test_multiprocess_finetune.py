"""Fine-tuning as a pod runs it (issue 21): ``train.finetune`` with 2 processes x 4 fake CPU
devices joined by jax.distributed on 127.0.0.1, against one process with 8 fake devices on the
same (data 2, fsdp 4) mesh and global batch (tests/multiprocess_finetune_run.py).

The pair runs steps 1-2, saves (``run_steps``) and resumes to step 4; the reference runs 1-4.
"""

from __future__ import annotations

import json

import pytest

from tests.multiprocess_helpers import Process, free_port
from tests.test_finetune import write_light_boolq

MODULE = "tests.multiprocess_finetune_run"
LOSS_RTOL = 1e-5  # 2 processes vs 1: the same math, collectives may sum in another order


def test_two_processes_fine_tune_as_one_and_resume(tmp_path):
    port = str(free_port())
    # The task files both processes read (tests/test_finetune.tiny_config's rows and seeds).
    (tmp_path / "tasks").mkdir()
    write_light_boolq(tmp_path / "tasks" / "train.jsonl", 200, seed=0)
    write_light_boolq(tmp_path / "tasks" / "eval.jsonl", 40, seed=1)
    pair = [
        Process(["pair", str(tmp_path), port, str(i)], devices=4, module=MODULE) for i in range(2)
    ]
    reference = Process(["reference", str(tmp_path)], devices=8, module=MODULE)
    try:
        for p in (*pair, reference):
            assert p.wait(timeout=300) == 0, p.output[-4000:]
    finally:
        for p in (*pair, reference):
            p.kill()
    ref = reference.results()
    assert ref["reference"]["devices"] == 8 and ref["reference"]["step"] == 4
    # One process of 8 devices feeds all 8 rows of each of the 4 train batches.
    assert ref["reference"]["fed_rows"] == [8] * 4
    want = ref["losses"]
    assert [step for step, _ in want] == [1, 2, 3, 4]

    for index, p in enumerate(pair):
        results = p.results()
        first, resumed = results["first"], results["resumed"]
        assert (first["process_index"], first["devices"]) == (index, 8)
        assert (first["step"], resumed["step"]) == (2, 4)
        # Each process fed only its 4 rows of every batch: 2 steps, then 2 more after resuming.
        assert resumed["fed_rows"] == [4] * 4
        assert resumed["train_loss"] == pytest.approx(want[-1][1], rel=LOSS_RTOL)
        assert resumed["eval_answer_loss"] == pytest.approx(
            ref["reference"]["eval_answer_loss"], rel=LOSS_RTOL
        )

    # Process 0 alone wrote the metrics: every record once; the losses equal one process's.
    records = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    train = [[r["step"], r["train_loss"]] for r in records if "train_loss" in r]
    evals = [r["step"] for r in records if "eval_accuracy" in r]
    assert [s for s, _ in train] == [1, 2, 3, 4] and evals == [0, 2, 4]
    for (step, got), (_, expected) in zip(train, want, strict=True):
        assert got == pytest.approx(expected, rel=LOSS_RTOL), step
    # Both processes wrote their shards of the checkpoints (orbax) at steps 2 and 4.
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["2", "4"]
