"""Reliability of the trainer: exact resume, preemption, kill -9, non-finite steps, bad input.

The in-process tests share one compiled golore step (tests.reliability_run.cached_build_trainer);
the 8-device preemption test runs two subprocesses (see tests/reliability_run.py).
"""

from __future__ import annotations

import json
import pathlib
import shutil
import signal
import subprocess
import sys

import pytest

from tests import reliability_run as rr
from tests.child_env import eight_devices_env
from tests.train_fixtures import tiny_config
from train import data as data_lib
from train import main as main_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def golore(tmp: pathlib.Path, **overrides):
    """Pure GoLore (random projector), refresh every 2 steps, 6 steps, saves at 3 and 6."""
    return tiny_config(tmp, **{"optimizer.name": "golore", **overrides})


@pytest.fixture(autouse=True)
def _shared_compile(monkeypatch):
    monkeypatch.setattr(main_lib, "build_trainer", rr.cached_build_trainer)
    monkeypatch.setattr(main_lib, "cross_entropy", rr.poisoned_cross_entropy)


def _poison(monkeypatch, poison: dict[int, int]) -> None:
    monkeypatch.setattr(data_lib, "build_datasets", rr.poisoned_build_datasets(poison))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """An uninterrupted 6-step golore run (its workdir and config)."""
    tmp = tmp_path_factory.mktemp("full")
    config = golore(tmp)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(main_lib, "build_trainer", rr.cached_build_trainer)
        mp.setattr(main_lib, "cross_entropy", rr.poisoned_cross_entropy)
        main_lib.train_and_evaluate(config, tmp / "run")
    return tmp, config


def _checkpoint_steps(workdir: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_golore_resume_is_exact_across_refresh(full_run):
    """GoLore stopped at step 3 and resumed: bit-identical losses (refresh at step 4)."""
    tmp, _ = full_run
    split = golore(tmp, run_steps=3)
    assert main_lib.train_and_evaluate(split, tmp / "split")["step"] == 3
    split.run_steps = None
    assert main_lib.train_and_evaluate(split, tmp / "split")["step"] == 6
    assert rr.losses(tmp / "split") == rr.losses(tmp / "run")
    assert [r["step"] for r in rr.records(tmp / "split") if "eval_loss" in r] == [0, 3, 6]


def test_corrupted_checkpoint_falls_back_to_the_previous_one(full_run, tmp_path, caplog):
    """Flipped bytes in the newest checkpoint: CRC-32 catches them, the run resumes from the
    previous checkpoint with a warning, the corrupt one is moved aside (not deleted), and the
    rerun steps give the losses of the uninterrupted run."""
    src, config = full_run
    work = tmp_path / "run"
    shutil.copytree(src / "run", work)
    data = max(
        (p for p in (work / "checkpoints/6/state").rglob("*") if p.is_file()),
        key=lambda p: p.stat().st_size,
    )
    corrupt = bytearray(data.read_bytes())
    corrupt[len(corrupt) // 2] ^= 0xFF
    data.write_bytes(bytes(corrupt))
    result = main_lib.train_and_evaluate(config, work)
    assert result["step"] == 6
    assert "checkpoints/6 is corrupted" in caplog.text
    assert "moved it to" in caplog.text
    assert rr.losses(work) == rr.losses(src / "run")
    assert _checkpoint_steps(work) == [3, 6]
    moved = work / "checkpoints_unreadable" / "6"
    assert (moved / data.relative_to(work / "checkpoints/6")).read_bytes() == bytes(corrupt)
    assert rr.check_checkpoints(config, work) == {3: [], 6: []}

    # Every checkpoint unreadable: a clear error naming them, nothing moved or deleted.
    for step in (3, 6):
        target = work / f"checkpoints/{step}/state/manifest.ocdbt"
        target.write_bytes(target.read_bytes()[:10])
    with pytest.raises(RuntimeError, match=r"no readable checkpoint in .*checkpoints/6 .*/3 "):
        main_lib.train_and_evaluate(config, work)
    assert _checkpoint_steps(work) == [3, 6]


def test_nonfinite_policies_and_state_stays_finite(tmp_path, monkeypatch):
    """'skip' counts NaN / Inf steps (also at a projector refresh) and keeps the state finite;
    more than max_skipped stops; 'stop' names the step and the leaves."""
    # NaN at step 3 (a refresh: update_every=2, step index 2) and Inf at step 5.
    _poison(monkeypatch, {3: rr.NAN, 5: rr.INF})
    config = golore(tmp_path, max_skipped=2)
    assert main_lib.train_and_evaluate(config, tmp_path / "skip")["step"] == 6
    train = [r for r in rr.records(tmp_path / "skip") if "loss" in r]
    assert [r["skipped"] for r in train] == [0, 0, 1, 1, 2, 2]
    assert [str(r["loss"]) for r in train][2::2] == ["nan", "inf"]
    assert rr.check_checkpoints(config, tmp_path / "skip") == {3: [], 6: []}

    # More than max_skipped=1: stops at the log step, no checkpoint written past the last.
    with pytest.raises(FloatingPointError, match=r"2 steps had non-finite .*max_skipped=1"):
        main_lib.train_and_evaluate(golore(tmp_path, max_skipped=1), tmp_path / "limit")
    assert _checkpoint_steps(tmp_path / "limit") == [3]

    # 'stop': names the step, the leaves and the last checkpoint; the checkpoint is kept.
    with pytest.raises(
        FloatingPointError,
        match=r"non-finite loss or gradient at step 3 \(leaves: \[.*\['lm_head'\]\['kernel'\]"
        r".*the last checkpoint is step None",
    ):
        main_lib.train_and_evaluate(golore(tmp_path, nonfinite="stop"), tmp_path / "stop")


def test_checkpoint_of_another_model_is_refused_and_kept(full_run, tmp_path):
    src, _ = full_run
    shutil.copytree(src / "run", tmp_path / "run")
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    with pytest.raises(ValueError, match=r"does not match the config in \['model'\]"):
        main_lib.train_and_evaluate(golore(tmp_path, **{"model.hidden_size": 32}), tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before


def test_unreadable_data_file_is_named(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text \xff\xfe not utf-8")
    with pytest.raises(ValueError, match=rf"Cannot read {bad}: not valid UTF-8"):
        main_lib.train_and_evaluate(golore(tmp_path, **{"data.paths": [str(bad)]}), tmp_path / "r")
    assert not (tmp_path / "r" / "checkpoints").exists()


def _expect(process: subprocess.Popen, prefix: str, seen: list[str]) -> str:
    for line in process.stdout:  # tqdm's stderr shares the pipe: find the prefix anywhere
        if prefix in line:
            line = line[line.index(prefix) :]
            seen.append(line)
            return line
        seen.append(line)
    raise AssertionError(f"no {prefix!r} in output:\n{''.join(seen)}")


def test_sigterm_sigint_and_kill_during_save_on_8_devices(tmp_path):
    """Sharded (2, 2, 2) golore run: SIGTERM after step 1, SIGINT after step 3 and kill -9 in
    the middle of saving step 6, then resumed: every step once, losses identical to an
    uninterrupted run, the last 2 checkpoints kept and all readable and finite."""
    env = eight_devices_env()
    command = [sys.executable, "-m", "tests.reliability_run"]
    seen: list[str] = []
    process = subprocess.Popen(
        [*command, "preempt", str(tmp_path)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _expect(process, "PAUSED 1", seen)
        process.send_signal(signal.SIGTERM)
        _expect(process, "PHASE a", seen)
        assert json.loads(seen[-1].split(" ", 2)[2])["stopped_by_signal"]
        assert any(f"received signal {signal.SIGTERM}: saved step 1 to" in s for s in seen)
        _expect(process, "PAUSED 3", seen)
        process.send_signal(signal.SIGINT)
        _expect(process, "PHASE b", seen)
        assert any(f"received signal {signal.SIGINT}: saved step 3 to" in s for s in seen)
        tmp_dir = pathlib.Path(_expect(process, "SAVING 6", seen).split()[2])
        assert (tmp_dir / "state").is_dir()  # orbax wrote the step-6 checkpoint, uncommitted
        process.kill()
    finally:
        process.kill()
        process.wait()
    workdir = tmp_path / "run"
    assert _checkpoint_steps(workdir) == [3, 4]  # keep_checkpoints=2; 6 never committed

    out = subprocess.run(
        [*command, "resume", str(tmp_path)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(out.stdout.split("RESULT ", 1)[1])
    assert result["devices"] == 8
    assert result["resumed"]["step"] == 6
    assert [s for s, _ in result["losses"]] == [1, 2, 3, 4, 5, 6]  # none lost or repeated
    assert result["losses"] == result["reference_losses"]  # bit-identical
    assert result["eval_steps"] == [0, 3, 6]
    assert result["checkpoints"] == {"4": [], "6": []}
    assert not tmp_dir.exists()  # the uncommitted temporary dir was cleaned up
