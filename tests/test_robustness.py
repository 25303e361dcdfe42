"""The command line where a pod, a terminal and a scheduler reach it (issue 29): one config per
pod, Ctrl-C before the loop, a peer that dies or never connects, and the exit statuses.

Each test runs ``python -m train`` in subprocesses (tests/multiprocess_helpers.py launches the
pairs), on CPU.
"""

from __future__ import annotations

import json
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.child_env import child_env
from tests.multiprocess_helpers import HEARTBEAT_S, Process, free_port
from train import distributed as distributed_lib
from train import errors, supervise

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config_file(tmp: pathlib.Path, **overrides) -> pathlib.Path:
    """A config file of tests/train_fixtures.tiny_config (its corpus and cache under ``tmp``)."""
    path = tmp / "cfg.py"
    path.write_text(
        "import pathlib\n"
        "from tests.train_fixtures import tiny_config\n"
        "def get_config():\n"
        f"    return tiny_config(pathlib.Path({str(tmp)!r}), **{overrides!r})\n"
    )
    return path


def _pair_args(config: pathlib.Path, workdir: pathlib.Path, port: int, i: int) -> list[str]:
    keys = {
        "distributed": True,
        "coordinator_address": f"127.0.0.1:{port}",
        "num_processes": 2,
        "process_id": i,
        "heartbeat_timeout_s": HEARTBEAT_S,
        "initialization_timeout_s": 60,
    }
    return [
        f"--config={config}",
        f"--workdir={workdir}",
        *[f"--config.{k}={v}" for k, v in keys.items()],
    ]


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error: ")]


def test_a_pod_with_a_differing_key_is_refused_before_anything_is_written(tmp_path):
    """Process 1 alone gets another learning rate: both processes exit with the configuration
    status (2), each printing the same one line naming the key and both values; the workdir is
    not even created."""
    config = _config_file(tmp_path)
    workdir = tmp_path / "run"
    port = free_port()
    pair = [
        Process(_pair_args(config, workdir, port, 0), devices=1, module="train"),
        Process(
            [*_pair_args(config, workdir, port, 1), "--config.optimizer.learning_rate=0.03"],
            devices=1,
            module="train",
        ),
    ]
    try:
        rcs = [p.wait(timeout=120) for p in pair]
    finally:
        for p in pair:
            p.kill()
    outputs = [p.output for p in pair]
    assert rcs == [errors.EXIT_CONFIG] * 2, outputs
    expected = (
        "error: ConfigError: the 2 processes were started with different configs: "
        "optimizer.learning_rate (process 0: 0.01, process 1: 0.03). Run the same command on "
        f"every host (only {', '.join(distributed_lib.PER_HOST_KEYS)} may differ); nothing "
        "was written"
    )
    for output in outputs:
        assert _error_lines(output) == [expected], output[-3000:]
        assert "Traceback" not in output
    assert not workdir.exists()


def test_config_differences_name_every_key_and_spare_the_per_host_ones():
    base = {"seed": "0", "process_id": "0", "data.cache_dir": '"/a"', "code version": "x+1"}
    other = {**base, "process_id": "1", "data.cache_dir": '"/b"', "code version": "x+2"}
    assert distributed_lib.config_differences([base, base]) == []
    assert distributed_lib.config_differences([base, other]) == [
        "code version (process 0: x+1, process 1: x+2)"
    ]
    assert distributed_lib.config_differences([base, {**base, "extra": "1"}]) == [
        "extra (process 0: (absent), process 1: 1)"
    ]


def test_a_peer_that_never_connects_is_one_line(tmp_path):
    """Process 0 alone, the coordinator waiting 3 s for process 1: JAX aborts it (SIGABRT from
    C++); the command says so in one line, exit status 6, nothing written."""
    config = _config_file(tmp_path)
    workdir = tmp_path / "run"
    port = free_port()
    args = [a for a in _pair_args(config, workdir, port, 0) if "initialization_timeout" not in a]
    alone = Process([*args, "--config.initialization_timeout_s=3"], devices=1, module="train")
    try:
        rc = alone.wait(timeout=120)
    finally:
        alone.kill()
    assert rc == errors.EXIT_PEER_LOST, alone.output[-3000:]
    (line,) = _error_lines(alone.output)
    assert line.startswith("error: PeerLostError: process 0 gave up after ") and line.endswith(
        f"s waiting for all 2 processes to connect to the coordinator 127.0.0.1:{port} "
        "(config.initialization_timeout_s=3); nothing was "
        "written: start the same command on every host, each with its own config.process_id, "
        "within that time"
    ), line
    assert not workdir.exists()


def test_a_killed_peer_is_reported_in_our_words(tmp_path):
    """kill -9 of process 1 once both processes run: process 0 is ended by JAX's coordination
    service within about the heartbeat timeout; its last line names process 1, the time and
    what to run; exit status 6; the workdir lock is released."""
    config = _config_file(tmp_path, num_steps=50, checkpoint_every=2, eval_every=50)
    workdir = tmp_path / "run"
    port = free_port()
    pair = [
        Process(_pair_args(config, workdir, port, i), devices=1, module="train") for i in range(2)
    ]
    try:
        deadline = time.monotonic() + 240
        # Both joined (process 0 holds the workdir lock after the configs agreed), then the
        # first checkpoint: process 1 is killed mid-run.
        while not (workdir / "checkpoints" / "2").is_dir():
            assert time.monotonic() < deadline, pair[0].output[-3000:]
            assert pair[0].popen.poll() is None, pair[0].output[-3000:]
            time.sleep(0.05)
        pair[1].popen.kill()
        killed = time.monotonic()
        rc = pair[0].wait(timeout=12 * HEARTBEAT_S)
        seconds = time.monotonic() - killed
    finally:
        for p in pair:
            p.kill()
    output = pair[0].output
    assert rc == errors.EXIT_PEER_LOST, output[-3000:]
    assert seconds < 6 * HEARTBEAT_S
    last = output.strip().splitlines()[-1]
    assert last.startswith(
        "error: PeerLostError: process 1 stopped (killed, crashed or unreachable: no heartbeat "
        f"for config.heartbeat_timeout_s={HEARTBEAT_S} s); JAX stopped process 0 "
    ), last
    assert " s after the start at step " in last
    assert f"the newest checkpoint is step {_newest(workdir)} in {workdir}/checkpoints: rerun " in (
        last
    )
    assert last.endswith("rerun the same command on every host to resume from it")
    assert not (workdir / ".lock").exists()


def test_lost_peer_message_names_a_committed_but_unreported_checkpoint(tmp_path):
    """A peer killed between a save's commit (the step's directory renamed into place) and the
    child's report, or during orbax's closing barrier: the line names the step on disk, not
    "no checkpoint"; orbax's temporary directories do not count."""
    directory = tmp_path / "checkpoints"
    (directory / "2").mkdir(parents=True)
    (directory / "4.orbax-checkpoint-tmp-7").mkdir()
    config = type("C", (), {"process_id": 0, "num_processes": 2, "heartbeat_timeout_s": 5})()
    text = "stopped sending heartbeats): 1"
    status = {"connected": True, "step": 3, "checkpoints": str(directory)}

    def line(**fields):
        return supervise.lost_peer_message(text, {**status, **fields}, config, 12.0)

    assert f"the newest checkpoint is step 2 in {directory}: rerun" in line(checkpoint=None)
    assert "the newest checkpoint is step 2 in" in line(checkpoint=2)
    (directory / "2").rmdir()
    assert "no checkpoint was saved yet" in line(checkpoint=None)
    assert "the newest checkpoint is step 0 in" in line(checkpoint=0)  # reported, not on disk


def _newest(workdir: pathlib.Path) -> int:
    return max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_sigint_while_caching_tokens_stops_and_a_rerun_works(tmp_path):
    """The README's tiny run (the default GCIDE corpus) with an empty cache: SIGINT once the
    tokenizer is cached, while the token streams are being written (~15 s of work): exit
    status 130 and one line; no partial token file, and nothing in the workdir.
    (It was printed as "Exception ignored in: <function _xla_gc_callback>", or lost inside the
    tokenizers library, and the run trained to the end with status 0.) The same command then
    trains."""
    cache, workdir = tmp_path / "cache", tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "train",
        "--config=configs/llama_tiny.py",
        f"--workdir={workdir}",
        f"--config.data.cache_dir={cache}",
        "--config.num_steps=2",
        "--config.optimizer.warmup_steps=1",
        "--config.eval_every=2",
        "--config.eval_batches=1",
    ]
    env = child_env(JAX_PLATFORMS="cpu")
    first = subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 240
        while not list((cache / "tokenizers").glob("bpe-*.json")):
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
            time.sleep(0.02)
        first.send_signal(signal.SIGINT)
        output, _ = first.communicate(timeout=240)
    finally:
        first.kill()
    assert first.returncode == 130, output[-3000:]
    assert _error_lines(output) == [
        "error: Interrupted: SIGINT before training started (data preparation, tokenizer "
        "training or compilation): nothing was saved and no partial cache file kept; rerun "
        "the same command to start"
    ], output[-3000:]
    assert "Exception ignored" not in output and "Traceback" not in output
    # The token streams are written atomically (train/atomic.py: a ".tmp" beside, then a rename):
    # a stream finished before the signal reached Python (the tokenizers library holds it until
    # its call returns) is whole and may stay; a half-written one may not.
    kept = list((cache / "tokens").iterdir()) if (cache / "tokens").exists() else []
    assert not [f for f in kept if f.suffix != ".npy"], kept
    for f in kept:
        np.load(f)  # whole: loads
    assert not workdir.exists() or not list(workdir.iterdir())
    rerun = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stdout.startswith("step 2: train loss")
    assert len(list((cache / "tokens").glob("*.npy"))) == 2
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2]  # log_every=10: the last step


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (errors.ConfigError("x"), 2),
        (errors.WorkdirError("x"), 2),
        (errors.DataError("x"), 3),
        (FileNotFoundError("x"), 3),
        (errors.CheckpointWriteError("x"), 4),
        (errors.CheckpointReadError("x"), 4),
        (errors.NonFiniteError("x"), 5),
        (errors.PeerLostError("x"), 6),
        (errors.Interrupted(signal.SIGINT), 130),
        (errors.Interrupted(signal.SIGTERM), 143),
        (KeyboardInterrupt(), 130),
    ],
)
def test_exit_status_of_each_class(error, status):
    assert errors.exit_code(error) == status


def test_enospc_is_recognised_whatever_layer_raised_it():
    """An OSError among the causes, tensorstore's text (os_error_code), or the strerror text."""
    import errno

    tensorstore = ValueError(
        'RESOURCE_EXHAUSTED: Error writing local file "/w/x": No space left on device '
        "[os_error_code='28'] [source locations='file_util_posix.cc:245']"
    )
    wrapped = RuntimeError("orbax: save failed")
    wrapped.__cause__ = OSError(errno.EROFS, "Read-only file system")
    for error, code in (
        (tensorstore, errno.ENOSPC),
        (wrapped, errno.EROFS),
        (ValueError("Disk quota exceeded while writing"), errno.EDQUOT),
    ):
        assert errors.environment_os_error(error).errno == code
    assert errors.environment_os_error(ValueError("shape mismatch")) is None
    assert errors.environment_os_error(OSError(errno.EBADF, "Bad file descriptor")) is None


def test_a_missing_config_file_with_overrides_is_one_line(tmp_path):
    """With a ``--config.x=`` override ml_collections fails while parsing the flags (an 18-frame
    traceback before): one line, the configuration status, nothing written."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            "--config=configs/nope.py",
            f"--workdir={tmp_path / 'w'}",
            "--config.seed=3",
        ],
        env=child_env(JAX_PLATFORMS="cpu"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == errors.EXIT_CONFIG, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    (line,) = _error_lines(out.stderr)
    assert line.startswith(
        "error: ConfigError: --config=configs/nope.py: cannot load the config file ("
    ) and ("No such file or directory: 'configs/nope.py'" in line), line
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(("content", "why"), [("", "is empty"), ('{"pid": 12', "does not hold")])
def test_a_half_written_lock_says_why_and_what_to_delete(tmp_path, content, why):
    from train.checkpoint import LOCK_FILE, WorkdirLock
    from train.errors import WorkdirError

    lock = tmp_path / LOCK_FILE
    lock.write_text(content)
    with pytest.raises(WorkdirError) as raised:
        WorkdirLock(tmp_path).acquire()
    assert str(raised.value) == (
        f"could not lock workdir {tmp_path}: its lock file {lock} {why}"
        + (f" a pid and host ({content!r})" if content else "")
        + f" (a run killed while writing it, or not ours); if no run uses this workdir, "
        f"delete {lock} and rerun"
    )
    assert lock.read_text() == content  # not ours to delete


def test_disk_full_on_the_command_line_is_one_line(tmp_path):
    """The workdir on a tmpfs with room for one checkpoint: the save of step 6 fails and the
    terminal shows our two INFO lines, the progress bar and the error line, nothing else (it
    showed orbax's ERROR records with tracebacks, asyncio's "Event loop is closed" tracebacks
    and a "--- Logging error ---" per record of the log file on the full disk); exit status 4;
    checkpoint 3 and nothing else kept."""
    from tests.test_reliability import _du, _mount_tmpfs

    config = _config_file(tmp_path, **{"optimizer.name": "golore"})
    reference = tmp_path / "reference"
    first = subprocess.run(
        [
            *(sys.executable, "-m", "train", f"--config={config}"),
            f"--workdir={reference}",
            "--config.run_steps=3",
        ],
        env=child_env(JAX_PLATFORMS="cpu"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    size = _du(reference)
    workdir = tmp_path / "full"
    if not _mount_tmpfs(workdir, size + size // 2):
        pytest.skip("cannot mount a tmpfs here (tests/test_reliability.py injects ENOSPC)")
    try:
        out = subprocess.run(
            [sys.executable, "-m", "train", f"--config={config}", f"--workdir={workdir}"],
            env=child_env(JAX_PLATFORMS="cpu"),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        steps = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    finally:
        subprocess.run(["umount", "-l", str(workdir)], check=False)
    assert out.returncode == errors.EXIT_CHECKPOINT, out.stderr[-3000:]
    lines = [x for x in re.split(r"[\r\n]+", out.stderr) if x.strip()]
    shown = [x for x in lines if not re.match(r"^\s*\d+%\|", x)]
    assert [x.split(":")[0] for x in shown] == ["attention", "starting from scratch", "error"]
    assert shown[-1].startswith(
        f"error: CheckpointWriteError: {workdir}/checkpoints/6: No space left on device "
        "[Errno 28] ("
    ), shown
    assert steps[0] == "3" and all(not s.isdigit() for s in steps[1:])  # 6 never committed


def test_unretrieved_write_errors_of_a_failed_save_go_to_the_log_file():
    """asyncio logs "Task exception was never retrieved" for each orbax write the failed save
    abandoned, when its future is collected (at exit, after our error line: the one CI failure
    of the test above): such a record of an environment OS error is INFO (the log file); any
    other asyncio error stays an ERROR."""
    import logging

    from tests.test_reliability import TENSORSTORE_ENOSPC
    from train import checkpoint

    def level(error: BaseException) -> int:
        record = logging.LogRecord(
            "asyncio", logging.ERROR, "base_events.py", 1771,
            "Task exception was never retrieved", None, (type(error), error, None),
        )  # fmt: skip
        assert checkpoint._UNRETRIEVED_WRITE_ERRORS_TO_FILE.filter(record)
        return record.levelno

    assert level(ValueError(TENSORSTORE_ENOSPC.format(path="/w/checkpoints/6"))) == logging.INFO
    assert level(ValueError("RESOURCE_EXHAUSTED: out of memory")) == logging.ERROR
    assert level(RuntimeError("a bug")) == logging.ERROR


def test_a_signal_a_library_swallows_is_raised_at_the_next_check():
    """The tokenizers library and JAX's gc callback swallow the KeyboardInterrupt a signal
    raises: the signal is remembered and raised again at the next phase boundary; the handlers
    are restored afterwards."""
    import os

    from train import interrupts

    before = signal.getsignal(signal.SIGTERM)
    with interrupts.raising():
        try:  # a library that catches everything
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        except BaseException:
            pass
        with pytest.raises(errors.Interrupted) as raised:
            interrupts.check()
    assert raised.value.exit_code == 143 and str(raised.value) == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before
    interrupts.check()  # outside: nothing pending


def test_sigterm_while_compiling_stops_with_nothing_saved(tmp_path):
    """SIGTERM once the steps are built (the init and the first evaluation compile next): exit
    status 143 and one line; no checkpoint, no metrics."""
    config = _config_file(tmp_path)
    workdir = tmp_path / "run"
    run = subprocess.Popen(
        [sys.executable, "-m", "train", f"--config={config}", f"--workdir={workdir}"],
        env=child_env(JAX_PLATFORMS="cpu"),
        cwd=ROOT,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        seen = []
        for line in run.stderr:  # "attention: ..." is logged right after the steps are built
            seen.append(line)
            if line.startswith("attention:"):
                run.send_signal(signal.SIGTERM)
                break
        _, rest = run.communicate(timeout=240)
    finally:
        run.kill()
    output = "".join(seen) + rest
    assert run.returncode == 143, output[-3000:]
    assert _error_lines(output) == [
        "error: Interrupted: SIGTERM before training started (data preparation, tokenizer "
        "training or compilation): nothing was saved and no partial cache file kept; rerun "
        "the same command to start"
    ], output[-3000:]
    assert not (workdir / "metrics.jsonl").exists()
    assert not [p for p in (workdir / "checkpoints").glob("*")] if workdir.exists() else True
