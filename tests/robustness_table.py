"""The command-line rows of docs/bad_inputs.md ("The command line and the environment"): each
case runs ``python -m train`` as a user would and records its exit status and its ``error:``
line (TMP stands for the directory given).

``python -m tests.robustness_table DIR`` prints the markdown table (about 4 minutes on a
2-core CPU: two of the cases train).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

from tests.child_env import child_env
from tests.conftest import ROOT
from tests.multiprocess_helpers import Process, free_port
from tests.test_robustness import _config_file, _pair_args

ENV = child_env(JAX_PLATFORMS="cpu")


def _line(output: str) -> str:
    lines = [x for x in output.splitlines() if x.startswith("error: ")]
    return lines[-1][len("error: ") :] if lines else "(no error line)"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "train", *args],
        env=ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def rows(tmp: pathlib.Path) -> list[tuple[str, int, str]]:
    out: list[tuple[str, int, str]] = []

    def record(what: str, rc: int, output: str) -> None:
        out.append((what, rc, _line(output).replace(str(tmp), "TMP")))

    # A config file that does not exist, with an override (ml_collections fails in flag parsing)
    r = _cli("--config=configs/nope.py", f"--workdir={tmp / 'w0'}", "--config.seed=3")
    record("--config=configs/nope.py with --config.seed=3", r.returncode, r.stderr)

    # A half-written lock file
    config = _config_file(tmp)
    (tmp / "w1").mkdir()
    (tmp / "w1" / ".lock").write_text('{"pid": 12')
    r = _cli(f"--config={config}", f"--workdir={tmp / 'w1'}")
    record('workdir with a half-written .lock (`{"pid": 12`)', r.returncode, r.stderr)

    # One config per pod
    port = free_port()
    pair = [
        Process(_pair_args(config, tmp / "w2", port, 0), devices=1, module="train"),
        Process(
            [*_pair_args(config, tmp / "w2", port, 1), "--config.optimizer.learning_rate=0.03"],
            devices=1,
            module="train",
        ),
    ]
    rcs = [p.wait(300) for p in pair]
    for i, p in enumerate(pair):
        record(
            f"2 processes, process 1 with optimizer.learning_rate=0.03 (process {i})",
            rcs[i],
            p.output,
        )

    # A peer that never connects
    port = free_port()
    args = [a for a in _pair_args(config, tmp / "w3", port, 0) if "initialization" not in a]
    alone = Process([*args, "--config.initialization_timeout_s=3"], devices=1, module="train")
    record(
        "process 0 of 2 alone, initialization_timeout_s=3",
        alone.wait(300),
        alone.output.replace(str(port), "PORT"),
    )

    # A peer killed mid-run
    config50 = _config_file(tmp, num_steps=50, checkpoint_every=2, eval_every=50)
    port = free_port()
    pair = [
        Process(_pair_args(config50, tmp / "w4", port, i), devices=1, module="train")
        for i in range(2)
    ]
    deadline = time.monotonic() + 300
    while not (tmp / "w4" / "checkpoints" / "2").is_dir() and time.monotonic() < deadline:
        time.sleep(0.05)
    pair[1].popen.kill()
    record(
        "kill -9 of process 1 after step 2 (process 0's line)", pair[0].wait(300), pair[0].output
    )

    # Disk full at a save: the workdir on a tmpfs with room for one checkpoint
    full = tmp / "w5"
    config6 = _config_file(tmp, **{"optimizer.name": "golore"})
    r = _cli(f"--config={config6}", f"--workdir={tmp / 'w5ref'}", "--config.run_steps=3")
    size = sum(
        -(-p.stat().st_size // 4096) * 4096 for p in (tmp / "w5ref").rglob("*") if p.is_file()
    )
    full.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size + size // 2}", "tmpfs", str(full)]
    if os.geteuid() == 0 and subprocess.run(mount, capture_output=True).returncode == 0:
        try:
            r = _cli(f"--config={config6}", f"--workdir={full}")
            record("workdir on a tmpfs with room for one checkpoint", r.returncode, r.stderr)
        finally:
            subprocess.run(["umount", "-l", str(full)], check=False)

    # Ctrl-C while the default tiny run caches its tokens
    cache, work = tmp / "cache_default", tmp / "w6"
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "train",
            "--config=configs/llama_tiny.py",
            f"--workdir={work}",
            f"--config.data.cache_dir={cache}",
        ],
        env=ENV,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    while not list((cache / "tokenizers").glob("bpe-*.json")) and first.poll() is None:
        time.sleep(0.02)
    first.send_signal(signal.SIGINT)
    output, _ = first.communicate(timeout=300)
    record("Ctrl-C while configs/llama_tiny.py caches its tokens", first.returncode, output)
    shutil.rmtree(cache, ignore_errors=True)
    return out


def main(tmp: pathlib.Path) -> None:
    tmp.mkdir(parents=True, exist_ok=True)
    table = rows(tmp)
    print("| input | exit status | the line (stderr) |")
    print("|---|---|---|")
    for what, rc, line in table:
        print(f"| {what} | {rc} | {line.replace('|', chr(92) + '|')} |")
    json.dump(table, sys.stderr)


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
