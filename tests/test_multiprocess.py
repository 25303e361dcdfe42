"""The trainer as a pod runs it: 2 processes x 4 fake CPU devices joined by jax.distributed on
127.0.0.1 (gloo collectives), against one process with 8 fake devices and the same mesh.

Three launches of the pair (tests/multiprocess_run.py) and one reference process cover, in
order: train and SIGTERM process 1 alone after step 5 (both save the same step and exit);
corrupt that checkpoint and resume (one fallback, by process 0), then SIGTERM both processes at
different steps (both save the same step and exit); resume with the same command, then ``kill
-9`` process 1 after step 13 (process 0 exits with an error within the heartbeat timeout). One
test runs them all and checks each part.
"""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import time

import numpy as np

from tests.multiprocess_helpers import HEARTBEAT_S
from tests.multiprocess_helpers import Process as _Process
from tests.multiprocess_helpers import free_port as _free_port

# From the first SIGTERM until both processes have exited: one more step, a save and the exit
# take a few seconds; a process stuck in a collective or in orbax's save waits minutes.
STOP_TIMEOUT_S = 90
LOSS_RTOL = 1e-5  # 2 processes vs 1: the same math, collectives may sum in another order


def _wait_all(processes: list[_Process], timeout: float) -> list[int]:
    """The exit statuses; an AssertionError (with the outputs) if any runs past ``timeout``."""
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(deadline - time.monotonic(), 0.1)) for p in processes]
    except subprocess.TimeoutExpired:
        tails = "\n".join(f"--- process {i}:\n{p.output[-3000:]}" for i, p in enumerate(processes))
        raise AssertionError(f"still running {timeout} s after the SIGTERM:\n{tails}") from None


def _started_at(output: str) -> int:
    """The step a launch resumed from (``STARTED AT`` of tests/multiprocess_run.py)."""
    return int(output.split("STARTED AT ", 1)[1].split()[0])


def _checkpoint_steps(workdir: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _pair(phases: str, tmp: pathlib.Path) -> list[_Process]:
    port = str(_free_port())
    return [_Process([phases, str(tmp), port, str(i)], devices=4) for i in range(2)]


def _newest_checkpoint(workdir: pathlib.Path) -> int:
    return max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _flip_a_byte(step_dir: pathlib.Path) -> None:
    data = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    corrupt = bytearray(data.read_bytes())
    corrupt[len(corrupt) // 2] ^= 0xFF
    data.write_bytes(bytes(corrupt))


def _run_scenarios(tmp: pathlib.Path) -> dict:
    """Runs every scenario once; returns what the checks below look at."""
    start = time.monotonic()
    out: dict = {}
    reference = _Process(["reference", str(tmp)], devices=8)
    pair = _pair("sigterm", tmp)
    try:
        # SIGTERM to process 1 alone, while it waits after step 5 (process 0 is then in step
        # 6 or blocked in its collectives): the notice must reach process 0 too.
        pair[1].wait_for("PAUSED 5")
        pair[1].popen.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        (tmp / "go").touch()
        out["sigterm_rc"] = _wait_all(pair, STOP_TIMEOUT_S)
        out["launch_a_s"] = time.monotonic() - start
        out["launch_a"] = [p.results() for p in pair]
        out["launch_a_output"] = [p.output for p in pair]
        workdir = tmp / "run"
        out["sigterm_checkpoints"] = _checkpoint_steps(workdir)
        out["state_dirs"] = sorted(
            p.name for p in (workdir / "checkpoints" / "4" / "state").iterdir()
        )
        corrupted = _newest_checkpoint(workdir)
        _flip_a_byte(workdir / "checkpoints" / str(corrupted) / "state")
        out["corrupted"] = corrupted

        pair = _pair("fallback", tmp)
        # SIGTERM to both, seen after different steps: process 0 while process 1 waits after
        # step 9 (process 0 is then in step 10 or blocked in its collectives), process 1 once
        # it goes on.
        pair[1].wait_for("PAUSED 9")
        signalled = time.monotonic()
        pair[0].popen.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        (tmp / "go_both").touch()
        time.sleep(0.2)
        out["second_signal_alive"] = pair[1].popen.poll() is None
        pair[1].popen.send_signal(signal.SIGTERM)
        out["both_rc"] = _wait_all(pair, STOP_TIMEOUT_S)
        out["both_s"] = time.monotonic() - signalled
        out["launch_b_s"] = time.monotonic() - start
        out["launch_b"] = [p.results() for p in pair]
        out["fallback_output"] = [p.output for p in pair]
        out["unreadable_dir"] = workdir / "checkpoints_unreadable"
        out["unreadable"] = sorted(p.name for p in out["unreadable_dir"].iterdir())
        out["both_checkpoints"] = _checkpoint_steps(workdir)
        both = out["both_checkpoints"][-1]
        out["both_state_dirs"] = sorted(
            p.name for p in (workdir / "checkpoints" / str(both) / "state").iterdir()
        )
        out["both_checksums"] = (workdir / "checkpoints" / str(both) / "crc32.json").is_file()

        pair = _pair("resume", tmp)
        pair[1].wait_for("PAUSED 13")
        # Process 0 logs step 13 after its own step returns: on a loaded machine that can come
        # after process 1's PAUSED line; kill once step 13 is on disk (bounded).
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while '"step": 13,' not in (workdir / "metrics.jsonl").read_text():
            assert time.monotonic() < deadline, "step 13 never reached metrics.jsonl"
            time.sleep(0.05)
        out["launch_c_s"] = time.monotonic() - start
        out["resume_output"] = [p.output for p in pair]
        killed = time.monotonic()
        pair[1].popen.kill()
        try:
            out["survivor_rc"] = pair[0].wait(timeout=6 * HEARTBEAT_S)
        except subprocess.TimeoutExpired:
            out["survivor_rc"] = None
        out["survivor_s"] = time.monotonic() - killed
        out["survivor_output"] = pair[0].output
        out["metrics"] = [
            json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
        ]
        assert reference.wait() == 0, reference.output[-4000:]
        out["reference"] = reference.results()["reference"]
    finally:
        for p in [reference, *pair]:
            p.kill()
    out["wall_s"] = time.monotonic() - start
    print(
        f"multi-process scenarios: {out['wall_s']:.1f} s (first pair {out['launch_a_s']:.1f} s, "
        f"second pair {out['launch_b_s']:.1f} s (both stopped {out['both_s']:.1f} s after "
        f"the first SIGTERM), third pair until the kill {out['launch_c_s']:.1f} s, survivor "
        f"{out['survivor_s']:.1f} s)"
    )
    return out


def _two_processes_match_one_and_write_metrics_once(runs):
    """Losses of steps 1-13 equal the 1-process 8-device run (rtol 1e-5) across a stop on
    SIGTERM to one process, a resume after a fallback, a stop on SIGTERM to both and a resume;
    each step is in metrics.jsonl once."""
    first = [r["sigterm"] for r in runs["launch_a"]]
    assert [r["process_index"] for r in first] == [0, 1]
    assert all(r["process_count"] == 2 and r["devices"] == 8 for r in first)
    assert runs["reference"]["devices"] == 8
    train = [(r["step"], r["loss"]) for r in runs["metrics"] if "loss" in r]
    steps = [s for s, _ in train]
    assert steps[:13] == list(range(1, 14)) and steps == sorted(set(steps))  # once each
    reference = dict(runs["reference"]["losses"])
    assert sorted(reference) == list(range(1, 14))
    np.testing.assert_allclose(
        [loss for s, loss in train[:13]], [reference[s] for s in range(1, 14)], rtol=LOSS_RTOL
    )
    evals = [r["step"] for r in runs["metrics"] if "eval_loss" in r]
    assert evals[:4] == [0, 4, 8, 12] and evals == sorted(set(evals))


def _sigterm_to_one_process_stops_both_at_the_same_step(runs):
    assert runs["sigterm_rc"] == [0, 0], runs["launch_a_output"][1][-3000:]
    results = [r["sigterm"] for r in runs["launch_a"]]
    assert all(r["stopped_by_signal"] for r in results)
    stop = results[0]["step"]
    assert results[1]["step"] == stop and 5 < stop < 12
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(runs["state_dirs"])
    for output in runs["launch_a_output"]:
        assert f"received signal {int(signal.SIGTERM)}: saved step {stop} to" in output
    assert stop in runs["sigterm_checkpoints"] and runs["corrupted"] == stop


def _sigterm_to_both_at_different_steps_stops_both_at_the_same_step(runs):
    """SIGTERM to process 0 while process 1 waits after step 9, to process 1 about a second
    later: both exit with status 0 within STOP_TIMEOUT_S, having saved the same step once (one
    checkpoint, written by both, with its checksums); the same command then resumes from that
    step on both processes and trains on to step 13 with the reference's losses (the losses
    test)."""
    outputs = runs["fallback_output"]
    assert runs["both_rc"] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert runs["second_signal_alive"]  # process 1 got its own SIGTERM, not only the notice
    results = [r["fallback"] for r in runs["launch_b"]]
    assert all(r["stopped_by_signal"] for r in results)
    stop = results[0]["step"]
    assert results[1]["step"] == stop and 9 < stop < 13
    for output in outputs:
        assert output.count(f"received signal {int(signal.SIGTERM)}: saved step ") == 1
        assert f"received signal {int(signal.SIGTERM)}: saved step {stop} to" in output
    assert runs["both_checkpoints"][-1] == stop
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(runs["both_state_dirs"])
    assert runs["both_checksums"]
    assert [_started_at(o) for o in runs["resume_output"]] == [stop, stop]
    assert not any("unreadable" in o for o in runs["resume_output"])


def _corrupted_checkpoint_one_fallback_both_resume(runs):
    """Process 0 alone moves the corrupted checkpoint aside (the others wait at a barrier);
    both resume from the previous one (and train on to step 13: the losses test)."""
    bad = runs["corrupted"]
    assert runs["unreadable"] == [str(bad)]  # moved once, not twice (no f"{bad}.1")
    previous = max(s for s in runs["sigterm_checkpoints"] if s < bad)
    assert (
        f"moved it to {runs['unreadable_dir']}/{bad}; resuming from step {previous}"
        in (runs["fallback_output"][0])
    )
    moved = [
        o.count(f"checkpoint step {bad} was unreadable: moved it") for o in runs["fallback_output"]
    ]
    assert moved == [1, 0]
    assert all(f"checkpoints/{bad} is corrupted" in o for o in runs["fallback_output"])
    assert [_started_at(o) for o in runs["fallback_output"]] == [previous, previous]


def _killed_peer_ends_the_survivor_within_the_heartbeat_timeout(runs):
    """kill -9 of process 1 after step 13, while process 0 waits in step 14's collectives:
    process 0 exits with an error after about heartbeat_timeout_s instead of hanging."""
    assert runs["survivor_rc"] not in (None, 0), runs["survivor_output"][-3000:]
    assert runs["survivor_s"] < 4 * HEARTBEAT_S
    assert "another task died" in runs["survivor_output"]
    assert 13 in [r["step"] for r in runs["metrics"] if "loss" in r]


def test_two_processes_sigterm_fallback_and_kill(tmp_path):
    """One test (not a module fixture shared by four): under ``pytest -n 2`` the tests of a
    module may run on both workers, and the scenarios would then run twice."""
    runs = _run_scenarios(tmp_path)
    _two_processes_match_one_and_write_metrics_once(runs)
    _sigterm_to_one_process_stops_both_at_the_same_step(runs)
    _corrupted_checkpoint_one_fallback_both_resume(runs)
    _sigterm_to_both_at_different_steps_stops_both_at_the_same_step(runs)
    _killed_peer_ends_the_survivor_within_the_heartbeat_timeout(runs)
