"""Launching the processes of a multi-process test (tests/test_multiprocess*.py): each child is
``python -m MODULE ARGS`` with its own fake CPU device count; its merged output is kept and
its ``RESULT <phase> <json>`` lines parsed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

from tests.child_env import child_env
from tests.conftest import FAST_COMPILE as FAST
from tests.conftest import ROOT

HEARTBEAT_S = 5  # a dead peer ends the others within about this many seconds


def distributed_keys(port: int, process_id: int) -> dict:
    """The config keys of process ``process_id`` of a pair joined on 127.0.0.1:``port``."""
    return {
        "distributed": True,
        "coordinator_address": f"127.0.0.1:{port}",
        "num_processes": 2,
        "process_id": process_id,
        "heartbeat_timeout_s": HEARTBEAT_S,
        "initialization_timeout_s": 60,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A child whose merged output is read by a thread (so neither pipe ever fills)."""

    def __init__(
        self, args: list[str], devices: int, module: str = "tests.multiprocess_run"
    ) -> None:
        env = child_env(
            XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST}",
            PJRT_NPROC=str((os.cpu_count() or 1) + devices),
        )
        self.popen = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if self.popen.poll() is not None and not self._reader.is_alive():
                raise AssertionError(f"exited without {text!r}:\n{self.output[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} within {timeout} s:\n{self.output[-4000:]}")
            time.sleep(0.05)

    def wait(self, timeout: float = 240) -> int:
        rc = self.popen.wait(timeout)
        self._reader.join(10)
        return rc

    def results(self) -> dict[str, dict]:
        out = {}
        for line in self.lines:
            if "RESULT " in line:
                _, phase, payload = line[line.index("RESULT ") :].split(" ", 2)
                out[phase] = json.loads(payload)
        return out

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()
