"""Reliability of the trainer: exact resume, preemption, kill -9, non-finite steps, bad input.

The in-process tests share one compiled golore step (tests.reliability_run.cached_build_trainer);
the 8-device preemption test runs two subprocesses (see tests/reliability_run.py).
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys

import optax
import pytest

from tests import reliability_run as rr
from tests.child_env import child_env, eight_devices_env
from tests.conftest import FAST_COMPILE
from tests.train_fixtures import tiny_config, write_corpus
from train import checkpoint as checkpoint_lib
from train import data as data_lib
from train import main as main_lib
from train.errors import CheckpointWriteError, ConfigError, NonFiniteError, WorkdirError

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
    # The NaN and the Inf are null in metrics.jsonl (strict JSON); the other losses finite.
    assert [r["loss"] for r in train][2::2] == [None, None]
    assert all(isinstance(r["loss"], float) for r in train[1::2])
    assert rr.check_checkpoints(config, tmp_path / "skip") == {3: [], 6: []}

    # More than max_skipped=1: stops at the log step, no checkpoint written past the last; one
    # short line (a NonFiniteError, a FloatingPointError) saying what to do.
    with pytest.raises(
        NonFiniteError,
        match=r"^2 steps had a non-finite loss or gradient, more than config.max_skipped=1; "
        r"the newest checkpoint, step 3 in .*limit/checkpoints, is intact: lower "
        r"config.optimizer.learning_rate \(or raise config.max_skipped\) and rerun",
    ) as raised:
        main_lib.train_and_evaluate(golore(tmp_path, max_skipped=1), tmp_path / "limit")
    assert isinstance(raised.value, FloatingPointError) and raised.value.exit_code == 5
    assert _checkpoint_steps(tmp_path / "limit") == [3]

    # 'stop': names the step, where (the NaN loss: every gradient) and what to do; nothing is
    # saved. (It was a 2,240-character line listing every leaf, ending "step None".)
    with pytest.raises(
        NonFiniteError,
        match=r"^non-finite loss or gradient at step 3 in the loss \(and all 21 gradients\) "
        r"\(config.nonfinite='stop'\); no checkpoint was saved: lower "
        r"config.optimizer.learning_rate \(or raise config.max_skipped\) and start again$",
    ) as raised:
        main_lib.train_and_evaluate(golore(tmp_path, nonfinite="stop"), tmp_path / "stop")
    assert len(str(raised.value)) < 300


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


# ------------------------------------------------ inputs refused before anything on disk changes


def _tree(workdir: pathlib.Path) -> dict[str, int]:
    """Every file under ``workdir`` with its size and mtime: what "unchanged" means below."""
    return {
        str(p.relative_to(workdir)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(workdir.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"keep_checkpoints": 0}, "config.keep_checkpoints=0: must be >= 1"),
        ({"optimizer.inner.b1": 1.5}, r"config.optimizer.inner.b1=1.5: must be in \[0, 1\)"),
        ({"optimizer.inner.b2": -0.1}, r"config.optimizer.inner.b2=-0.1: must be in \[0, 1\)"),
        ({"optimizer.grad_clip": -1.0}, "config.optimizer.grad_clip=-1.0: must be a finite"),
        ({"optimizer.warmup_steps": 7}, "warmup_steps=7: must be >= 0 and <= config.num_steps=6"),
        ({"eval_batches": 0}, "config.eval_batches=0: must be >= 1"),
        ({"run_steps": 0}, r"config.run_steps=0: must be >= 1 \(or None\)"),
        ({"checkpoint_every": 0}, "config.checkpoint_every=0: must be >= 1"),
        ({"optimizer.subspace.rank": 0}, "config.optimizer.subspace.rank=0: must be >= 1"),
        (
            {"optimizer.name": "hybrid", "optimizer.subspace.golore_fraction": 1.5},
            r"golore_fraction=1.5: must be in \(0, 1\]",
        ),
        ({"mesh.data": 2}, "has 2 devices but 1 are available"),
        ({"num_processes": 0}, r"config.num_processes=0: must be >= 1 \(or None: detect\)"),
        ({"coordinator_address": "host"}, "config.coordinator_address='host': must be 'host:port'"),
        # The data position counts batches of the saved size: refused, naming both values.
        ({"batch_size": 16}, r"\['batch_size'\]: checkpoint has \{'batch_size': 8\}, config has"),
    ],
)
def test_bad_trainer_input_one_line_error_before_any_change(full_run, tmp_path, overrides, message):
    """Each input: a one-line ConfigError naming the key and the allowed range, raised before
    anything in a workdir holding checkpoints changes (keep_checkpoints=0 once made orbax
    delete them all)."""
    src, _ = full_run
    work = tmp_path / "run"
    shutil.copytree(src / "run", work)
    before = _tree(work)
    with pytest.raises(ConfigError, match=message) as raised:
        main_lib.train_and_evaluate(golore(tmp_path, **overrides), work)
    assert "\n" not in str(raised.value)
    assert _tree(work) == before
    assert not (work / checkpoint_lib.LOCK_FILE).exists()


def test_resume_with_another_seed_warns_naming_both(full_run, tmp_path, caplog):
    src, _ = full_run
    shutil.copytree(src / "run", tmp_path / "run")
    result = main_lib.train_and_evaluate(golore(tmp_path, seed=7), tmp_path / "run")
    assert result["step"] == 6
    assert "RESUMING step 6 WITH A DIFFERENT SEED: config.seed=7" in caplog.text
    assert "saved with seed=0" in caplog.text


def test_unwritable_directories_are_found_at_start(full_run, tmp_path):
    src, _ = full_run
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cases = [
        ({"compilation_cache_dir": str(blocker)}, "config.compilation_cache_dir .*a_file is not"),
        ({"data.cache_dir": str(blocker / "sub")}, "config.data.cache_dir .*a_file/sub is not"),
    ]
    for overrides, message in cases:
        with pytest.raises(WorkdirError, match=message):
            main_lib.train_and_evaluate(golore(tmp_path, **overrides), tmp_path / "fresh")
    if os.geteuid() != 0:  # root writes anywhere
        work = tmp_path / "ro"
        shutil.copytree(src / "run", work)
        (work / "checkpoints").chmod(0o500)
        try:
            with pytest.raises(WorkdirError, match=r"checkpoints directory .* is not writable"):
                main_lib.train_and_evaluate(golore(tmp_path), work)
        finally:
            (work / "checkpoints").chmod(0o700)


def test_workdir_lock_refuses_a_second_run_and_takes_over_a_dead_one(full_run, tmp_path, caplog):
    src, config = full_run
    work = tmp_path / "run"
    shutil.copytree(src / "run", work)
    before = _tree(work)
    lock = work / checkpoint_lib.LOCK_FILE
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = socket.gethostname()
        for pid, holder_host in ((sleeper.pid, host), (1, "elsewhere")):
            lock.write_text(json.dumps({"pid": pid, "host": holder_host}))
            with pytest.raises(
                WorkdirError, match=rf"in use by pid {pid} on host {holder_host} \(lock file"
            ):
                main_lib.train_and_evaluate(config, work)
            assert _tree(work) == {**before, checkpoint_lib.LOCK_FILE: _tree(work)[".lock"]}
    finally:
        sleeper.kill()
        sleeper.wait()
    # The holder is gone (same host): its lock is taken over with a warning, then released.
    lock.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
    assert main_lib.train_and_evaluate(config, work)["step"] == 6
    assert f"taking over the lock of pid {sleeper.pid}" in caplog.text
    assert not lock.exists()


def _mount_tmpfs(path: pathlib.Path, size: int) -> bool:
    """A tmpfs of ``size`` bytes at ``path`` (root with CAP_SYS_ADMIN only: False elsewhere)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return out.returncode == 0


def _du(path: pathlib.Path) -> int:
    """Bytes ``path``'s files take on a tmpfs (whole 4 KiB pages)."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in path.rglob("*") if p.is_file())


# tensorstore's report of a full disk (orbax's array writer): an OSError only in the text of a
# ValueError, as a full tmpfs gives it (the message of a real run, paths shortened).
TENSORSTORE_ENOSPC = (
    'RESOURCE_EXHAUSTED: Error writing local file "{path}/state/d/0123": Failed to write '
    "No space left on device [os_error_code='28'] [source locations='tensorstore/internal/"
    "os/file_util_posix.cc:245']"
)


def _inject_tensorstore_enospc(monkeypatch, after_saves: int) -> None:
    """Where no tmpfs can be mounted: tensorstore's ValueError at the array writes of orbax's
    save number ``after_saves + 1`` (the layer that raises it on a full disk)."""
    from orbax.checkpoint._src.serialization import serialization

    saves = {"n": 0}
    original = checkpoint_lib.Checkpoints.save

    def save(self, step, *args, **kwargs):
        saves["n"] += 1
        return original(self, step, *args, **kwargs)

    real_ts = serialization.ts

    class FullDisk:
        def __getattr__(self, name):
            return getattr(real_ts, name)

        async def open(self, spec, *args, **kwargs):
            if saves["n"] > after_saves and kwargs.get("create"):  # a save's array write
                raise ValueError(TENSORSTORE_ENOSPC)
            return await real_ts.open(spec, *args, **kwargs)

    monkeypatch.setattr(checkpoint_lib.Checkpoints, "save", save)
    monkeypatch.setattr(serialization, "ts", FullDisk())


@pytest.mark.parametrize("disk", ["tmpfs", "injected"])
def test_disk_full_during_a_save_is_one_line_and_keeps_the_checkpoints(
    full_run, tmp_path, monkeypatch, disk
):
    """The workdir on a tmpfs with room for one checkpoint (and, as where none can be mounted,
    tensorstore's ENOSPC injected at the second save): the save of step 6 fails with ONE line
    ``PATH: No space left on device [Errno 28] (N free); ...`` (CheckpointWriteError, exit
    status 4) naming the checkpoints kept; step 3 stays readable, the lock is released, and
    the rerun (with room again) resumes from step 3 to the uninterrupted run's losses."""
    src, config = full_run
    work = tmp_path / "disk"
    step_size = _du(src / "run" / "checkpoints" / "3")
    # Room for the checkpoint of step 3 and the small files, not for a second checkpoint.
    mounted = disk == "tmpfs" and _mount_tmpfs(work, step_size + step_size // 2 + 256 * 1024)
    try:
        if not mounted:
            _inject_tensorstore_enospc(monkeypatch, after_saves=1)
        with pytest.raises(CheckpointWriteError) as raised:
            main_lib.train_and_evaluate(config, work)
        message = str(raised.value)
        assert "\n" not in message and raised.value.exit_code == 4
        assert re.match(
            rf"{re.escape(str(work))}/checkpoints/6: No space left on device \[Errno 28\] "
            r"\(\d+(\.\d)? (B|KiB|MiB|GiB) free\); saving step 6 failed and nothing was lost: "
            r"the checkpoints saved before \(\[3\]\) are intact; free space \(or fix the "
            r"permission\) and rerun the same command to resume$",
            message,
        ), message
        assert _checkpoint_steps(work) == [3]
        assert rr.check_checkpoints(config, work) == {3: []}
        assert not (work / checkpoint_lib.LOCK_FILE).exists()
        if mounted:  # room again
            subprocess.run(["mount", "-o", "remount,size=64m", str(work)], check=True)
        else:
            monkeypatch.undo()
            monkeypatch.setattr(main_lib, "build_trainer", rr.cached_build_trainer)
            monkeypatch.setattr(main_lib, "cross_entropy", rr.poisoned_cross_entropy)
        assert main_lib.train_and_evaluate(config, work)["step"] == 6
        assert rr.losses(work) == rr.losses(src / "run")
        assert _checkpoint_steps(work) == [3, 6]
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(work)], check=False)


def test_write_errors_of_metrics_and_events_are_one_line(full_run, tmp_path, monkeypatch):
    """ENOSPC from the ``os.write`` of a metrics.jsonl record, EROFS from the TensorBoard
    event file's write: each one line naming the file, the OS error and the free space,
    checkpoints kept, lock released; another OSError keeps its type (a bug)."""
    from tensorboardX import record_writer

    src, _ = full_run
    real_write = os.write

    class ReadOnly:  # the event file tensorboardX opens, on a read-only file system
        def __init__(self, *args):
            pass

        def write(self, data):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

        flush = close = lambda self: None

    cases = (
        ("metrics.jsonl", errno.ENOSPC, "os.write"),
        ("tensorboard", errno.EROFS, "events"),  # its first write, opening the event file
        ("metrics.jsonl", errno.EBADF, "os.write"),
    )
    for i, (target, err, where) in enumerate(cases):
        work = tmp_path / str(i)
        shutil.copytree(src / "run", work)
        before = (work / "metrics.jsonl").read_text()
        if where == "os.write":  # only the metrics file's descriptor fails

            def write(fd, data, err=err):
                if os.readlink(f"/proc/self/fd/{fd}").endswith("metrics.jsonl"):
                    raise OSError(err, os.strerror(err))
                return real_write(fd, data)

            monkeypatch.setattr(os, "write", write)
        else:
            monkeypatch.setattr(record_writer, "open", ReadOnly, raising=False)
        with pytest.raises(OSError) as raised:  # resumes at step 6, writes step 7's record
            main_lib.train_and_evaluate(golore(tmp_path, num_steps=9), work)
        monkeypatch.setattr(os, "write", real_write)
        monkeypatch.delattr(record_writer, "open", raising=False)
        assert not (work / checkpoint_lib.LOCK_FILE).exists()
        assert _checkpoint_steps(work) == [3, 6]
        if err == errno.EBADF:
            assert type(raised.value) is OSError  # not the environment's: a bug, traceback
            continue
        assert isinstance(raised.value, CheckpointWriteError)
        assert re.match(
            rf"{re.escape(str(work / target))}\S*: {os.strerror(err)} \[Errno {err}\] "
            r"\(\S+ \S+ free\); nothing was lost: the checkpoints saved before are intact",
            str(raised.value),
        ), str(raised.value)
        # metrics.jsonl holds every record up to the resumed step, nothing torn
        assert (work / "metrics.jsonl").read_text() == before


# ------------------------------------------------------------------- the command line


def test_list_valued_keys_from_the_command_line(tmp_path):
    """``--config.data.paths=a,b`` (comma-separated) and a list literal both set the list."""
    from absl import flags
    from ml_collections import config_flags

    from train import cli

    cli.register_list_parser()
    config_file = tmp_path / "cfg.py"
    config_file.write_text(
        "import ml_collections\n"
        "def get_config():\n"
        "    return ml_collections.ConfigDict({'data': {'paths': []}, 'n': 1})\n"
    )
    for value, expected in (
        ("a.txt,b.jsonl", ["a.txt", "b.jsonl"]),
        ('["x,y.txt", "z.txt"]', ["x,y.txt", "z.txt"]),
        ("", []),
    ):
        argv = ["train", f"--config={config_file}", f"--config.data.paths={value}"]
        values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
        values(argv)
        assert values.config.data.paths == expected


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = child_env()
    env.pop("PJRT_NPROC", None)
    return subprocess.run(
        [sys.executable, "-m", "train", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_command_line_config_errors_are_one_line(tmp_path):
    """A config error: ``error: ConfigError: ...`` on one line, exit status 2, no traceback;
    nothing written. A missing config file likewise."""
    out = _cli(
        "--config=configs/llama_tiny.py",
        f"--workdir={tmp_path / 'w'}",
        "--config.optimizer.inner.b1=1.5",
        "--config.data.paths=a.txt,b.txt",
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert lines == ["error: ConfigError: config.optimizer.inner.b1=1.5: must be in [0, 1)"]
    assert not (tmp_path / "w").exists()
    missing = _cli("--config=configs/nope.py", f"--workdir={tmp_path / 'w'}")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "error: ConfigError: --config=configs/nope.py: cannot load the config file" in (
        missing.stderr
    )


def test_two_fake_devices_default_refresh_without_pjrt_nproc_finishes(tmp_path):
    """configs/llama_tiny.py with GoLore and the default batched refresh on 2 fake CPU devices,
    PJRT_NPROC unset: on a 2-core machine it hung at 0% CPU in step 1 (it still does with
    PJRT_NPROC=2). ``python -m train`` sizes XLA:CPU's pool before JAX starts, and it ends.
    The tiny local corpus replaces the default one (no tokenizer training over GCIDE)."""
    corpus = write_corpus(tmp_path / "corpus")
    config_file = tmp_path / "cfg.py"
    config_file.write_text(
        "from configs import llama_tiny\n"
        "def get_config():\n"
        "    config = llama_tiny.get_config()\n"
        "    config.update(num_steps=3, seq_len=32, eval_batches=1, log_every=1)\n"
        "    config.optimizer.update(name='golore', warmup_steps=1)\n"
        "    config.data.update(source='files', txt_split='blank_lines', vocab_size=512,\n"
        f"                       paths=[{str(corpus)!r}], eval_fraction=0.1,\n"
        f"                       cache_dir={str(tmp_path / 'cache')!r})\n"
        "    return config\n"
    )
    env = child_env(XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {FAST_COMPILE}")
    env.pop("PJRT_NPROC", None)
    out = subprocess.run(
        [sys.executable, "-m", "train", f"--config={config_file}", f"--workdir={tmp_path / 'w'}"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("step 3: train loss")
    assert [r["step"] for r in rr.records(tmp_path / "w") if "loss" in r] == [1, 2, 3]


# ------------------------------------------------------------------- library inputs


def test_integer_leaves_get_a_one_line_error_naming_the_leaf():
    """An int32 param with a float32 gradient (it failed inside the batched refresh on a
    MaskedNode) and float0 gradients (jax.grad(allow_int=True); numpy's ufunc error)."""
    import jax
    import jax.numpy as jnp

    import golore_jax as gl

    params = {"w": jnp.ones((6, 8)), "ids": jnp.zeros((6, 8), jnp.int32)}
    tx = gl.galore_adamw(1e-3, subspace=gl.Subspace(rank=2, update_every=2))
    state = tx.init(params)
    float_grads = {"w": jnp.ones((6, 8)), "ids": jnp.ones((6, 8))}
    float0_grads = jax.grad(
        lambda p: jnp.sum(p["w"]) + jnp.sum(p["ids"]).astype(jnp.float32), allow_int=True
    )(params)
    for grads, message in (
        (float_grads, r"leaf \['ids'\] gets a float32 update but was not projected at init"),
        (float0_grads, r"leaf \['ids'\] has a float0 gradient \(an integer param\)"),
    ):
        for update in (tx.update, jax.jit(tx.update)):
            with pytest.raises(TypeError, match=message):
                update(grads, state, params)
    # Left out of the optimizer as the message says, the int leaf trains nothing and fails not.
    masked = optax.partition(
        {"float": tx, "int": optax.set_to_zero()},
        jax.tree.map(lambda p: "float" if jnp.issubdtype(p.dtype, jnp.floating) else "int", params),
    )
    updates, _ = masked.update(float0_grads, masked.init(params), params)
    assert updates["ids"].dtype == jax.dtypes.float0 and updates["w"].shape == (6, 8)
