"""The watcher of one process of a multi-process run (``config.distributed=True`` on the command
line): it runs the same command as a child and says, in one line, why the child ended when JAX
ended it.

JAX's coordination service ends a process from a C++ thread when another process dies, stops
heartbeating or never connects ("Terminating process because the JAX distributed service
detected fatal errors ... another task died", a check-failure stack trace, SIGABRT): no Python
code runs after it, and the binding's ``missed_heartbeat_callback`` cannot be used from Python
(it aborts on converting the status). So the command line forks: this parent passes the
child's output through unchanged, keeps its tail, and learns the child's progress (step,
newest checkpoint) over a pipe; when the child is killed by SIGABRT after such a message it
prints ``error: PeerLostError: ...`` (which process, after how long, what to run) and exits
with status 6 (train/errors.py). Every other exit status is passed on. SIGINT / SIGTERM are
forwarded to the child (a terminal's Ctrl-C reaches only this parent: the child runs in its
own process group), and the child dies with this parent (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from train.errors import EXIT_PEER_LOST, exit_status_of_signal

STATUS_FD = "GOLORE_STATUS_FD"
PARENT_PID = "GOLORE_SUPERVISOR_PID"
_TAIL_BYTES = 64 * 1024

_status_fd: int | None = None


def is_child() -> bool:
    return STATUS_FD in os.environ


def report(**fields: Any) -> None:
    """Tells the watcher (if any) about the run: ``step=``, ``checkpoint=``, ... (never raises)."""
    global _status_fd
    if _status_fd is None:
        if STATUS_FD not in os.environ:
            return
        _status_fd = int(os.environ[STATUS_FD])
    with contextlib.suppress(OSError, TypeError, ValueError):
        os.write(_status_fd, (json.dumps(fields, default=str) + "\n").encode())


def die_with_parent() -> None:
    """In the child: SIGKILL when the watcher dies (``kill -9`` of the command), Linux only."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    parent = os.environ.get(PARENT_PID)
    if parent and os.getppid() != int(parent):  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def run(config: Any, workdir: str) -> int:
    """Runs this command again as a watched child; returns the exit status to exit with."""
    read_status, write_status = os.pipe()
    env = dict(os.environ, **{STATUS_FD: str(write_status), PARENT_PID: str(os.getpid())})
    started = time.monotonic()
    child = subprocess.Popen(
        [sys.executable, *sys.orig_argv[1:]],
        env=env,
        pass_fds=(write_status,),
        stderr=subprocess.PIPE,
        process_group=0,
    )
    os.close(write_status)
    status: dict[str, Any] = {}
    tail = bytearray()

    def relay() -> None:  # the child's stderr, unchanged (progress bar included)
        out = sys.stderr.buffer
        while chunk := os.read(child.stderr.fileno(), 65536):
            out.write(chunk)
            out.flush()
            tail.extend(chunk)
            del tail[:-_TAIL_BYTES]

    def read_reports() -> None:
        with os.fdopen(read_status, "rb") as reports:
            for line in reports:
                with contextlib.suppress(ValueError):
                    status.update(json.loads(line))

    threads = [threading.Thread(target=f, daemon=True) for f in (relay, read_reports)]
    for t in threads:
        t.start()
    previous = {
        sig: signal.signal(sig, lambda s, f: child.send_signal(s))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        rc = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for t in threads:
        t.join(10)
    if rc >= 0:
        return rc
    text = tail.decode("utf-8", "replace")
    if -rc == signal.SIGABRT and "JAX distributed service" in text:
        _release_lock(workdir, child.pid)
        message = lost_peer_message(text, status, config, time.monotonic() - started)
        print(f"error: PeerLostError: {message}", file=sys.stderr, flush=True)
        return EXIT_PEER_LOST
    return exit_status_of_signal(-rc)


def _release_lock(workdir: str, pid: int) -> None:
    """The workdir lock the killed child held (it could not release it itself)."""
    from train.checkpoint import LOCK_FILE

    path = os.path.join(workdir, LOCK_FILE)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError), open(path) as f:
        if int(json.load(f)["pid"]) == pid:
            os.unlink(path)


def _dead_tasks(text: str) -> list[int]:
    """The processes JAX's coordination service names as having stopped heartbeating."""
    match = re.search(r"stopped sending heartbeats\):\s*([\d,\s]+?)\s*(?:The tasks|\n\S|$)", text)
    if not match:
        return sorted({int(t) for t in re.findall(r"/task:(\d+)", text)})
    return sorted({int(t) for t in re.findall(r"\d+", match.group(1))})


def lost_peer_message(text: str, status: dict[str, Any], config: Any, seconds: float) -> str:
    """Our line for a child JAX ended: which process, after how long, what to run."""
    me = status.get("process_id", config.process_id)
    me = "this process" if me is None else f"process {me}"
    count = status.get("num_processes", config.num_processes)
    if "RegisterTask" in text or not status.get("connected"):
        return (
            f"{me} gave up after {seconds:.0f} s waiting for all {count or 'the'} processes to "
            f"connect to the coordinator {config.coordinator_address or '(detected)'} "
            f"(config.initialization_timeout_s={config.initialization_timeout_s}); nothing was "
            "written: start the same command on every host, each with its own "
            "config.process_id, within that time"
        )
    dead = [t for t in _dead_tasks(text) if f"process {t}" != me]
    who = (
        "process " + ", ".join(map(str, dead))
        if dead
        else "another process (or the coordinator, process 0)"
    )
    where = f" at step {status['step']}" if "step" in status else ""
    directory = status.get("checkpoints", "the workdir's checkpoints/")
    checkpoint = _newest(status.get("checkpoint"), status.get("checkpoints"))
    resume = (
        f"the newest checkpoint is step {checkpoint} in {directory}: rerun the same command on "
        "every host to resume from it"
        if checkpoint is not None
        else "no checkpoint was saved yet: rerun the same command on every host to start again"
    )
    return (
        f"{who} stopped (killed, crashed or unreachable: no heartbeat for "
        f"config.heartbeat_timeout_s={config.heartbeat_timeout_s} s); JAX stopped {me} "
        f"{seconds:.0f} s after the start{where}; {resume}"
    )


def _newest(reported: int | None, directory: str | None) -> int | None:
    """The newest resumable checkpoint: the one the child reported or a newer one on disk.

    A save commits (orbax renames its temporary directory to the step's number) before the
    child reports it, and a peer killed in between can leave the child waiting in orbax's
    closing barrier: the step is on disk and resumable (its crc32.json may be missing, which
    restoring allows) but never reported. Orbax's temporary directories have other names.
    """
    try:
        committed = [int(name) for name in os.listdir(directory or "") if name.isdigit()]
    except OSError:
        committed = []
    steps = committed + ([] if reported is None else [int(reported)])
    return max(steps, default=None)
