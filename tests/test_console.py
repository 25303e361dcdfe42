"""The command line's console (train/console.py): our lines, the progress bar, warnings and the
summary on the terminal; orbax / absl / jax INFO records in WORKDIR/train.log."""

from __future__ import annotations

import io
import logging
import pathlib
import re
import subprocess
import sys

import ml_collections
import pytest
from absl import logging as absl_logging

from tests.child_env import child_env
from train import console
from train import main as main_lib
from train.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
# absl's record prefix, e.g. "I1206 09:18:32.243642 140386295683968 checkpoint_manager.py:701]"
ABSL_PREFIX = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\]")


def _progress_bar(line: str) -> bool:
    """A tqdm frame: ``NN%|...| n/total [...]`` (carriage returns split the frames)."""
    return bool(re.match(r"^\s*\d+%\|.*\| *\d+/\d+ \[", line))


def test_default_command_line_shows_our_lines_and_logs_the_libraries_to_train_log(tmp_path):
    """2 steps with a checkpoint (orbax logs ~100 INFO records over a save and a restore
    check): none of them, nor jax's, on stdout / stderr; all in WORKDIR/train.log, with ours.
    The terminal holds our 2 INFO lines, the progress bar and the summary naming the steps."""
    config_file = tmp_path / "cfg.py"
    config_file.write_text(
        "import pathlib\n"
        "from tests.train_fixtures import tiny_config\n"
        "def get_config():\n"
        f"    return tiny_config(pathlib.Path({str(tmp_path)!r}), num_steps=2, eval_every=2,\n"
        "                       checkpoint_every=2, log_every=1)\n"
    )
    workdir = tmp_path / "w"
    out = subprocess.run(
        [sys.executable, "-m", "train", f"--config={config_file}", f"--workdir={workdir}"],
        # The test extras install libtpu (for tests/test_tpu_compile.py), which a `.[train]`
        # install lacks: probing for a TPU, it prints C++ lines no Python logging can route.
        env=child_env(JAX_PLATFORMS="cpu"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    terminal = out.stderr + out.stdout
    lines = [x for x in re.split(r"[\r\n]+", terminal) if x.strip()]
    ours = [x for x in lines if not _progress_bar(x)]
    assert not [x for x in lines if ABSL_PREFIX.match(x)], terminal[-3000:]
    assert "orbax" not in terminal and "CheckpointManager" not in terminal
    assert [x.split(":")[0] for x in ours] == ["attention", "starting from scratch", "step 2"], (
        terminal[-3000:]
    )
    assert re.fullmatch(
        r"step 2: train loss \d+\.\d{4}, held-out loss \d+\.\d{4} \(step 0\) -> "
        r"\d+\.\d{4} \(step 2\)",
        out.stdout.strip(),
    )
    log = (workdir / "train.log").read_text()
    records = log.splitlines()
    assert sum("checkpoint_manager.py" in x for x in records) >= 5  # orbax's INFO records
    assert all(ABSL_PREFIX.match(x) for x in records if x.startswith("I"))
    assert any("] starting from scratch: " in x for x in records)  # ours too, with a prefix


def _record(level: int, pathname: str, message: str) -> logging.LogRecord:
    return logging.LogRecord("absl", level, pathname, 1, message, None, None)


@pytest.mark.parametrize(
    ("log_level", "shown"),
    [
        ("warning", ["ours info", "warning: ours warning", "library warning"]),
        ("info", ["ours info", "library info", "warning: ours warning", "library warning"]),
        ("error", ["ours info", "warning: ours warning"]),
    ],
)
def test_log_level_decides_which_library_records_reach_the_console(tmp_path, log_level, shown):
    """Our INFO and WARNING lines always show (a warning prefixed ``warning:``); a library's
    record shows from ``log_level`` up, with absl's prefix; the file gets every INFO record,
    the ones logged before it opened included."""
    ours = str(ROOT / "train" / "loop.py")
    library = str(ROOT / ".venv" / "orbax" / "checkpoint_manager.py")
    stream = io.StringIO()
    active = console.setup(ml_collections.ConfigDict({"log_level": log_level}), stream)
    try:
        root = logging.getLogger()
        root.handle(_record(logging.INFO, ours, "ours info"))
        root.handle(_record(logging.INFO, library, "library info"))
        console.open_log_file(tmp_path, 0, 1)
        root.handle(_record(logging.WARNING, ours, "ours warning"))
        root.handle(_record(logging.WARNING, library, "library warning"))
        root.handle(_record(logging.DEBUG, library, "library debug"))
        assert absl_logging.get_absl_handler() not in root.handlers
    finally:
        console.close()
    assert active.file is None and active.pending is None  # closed
    printed = stream.getvalue().splitlines()
    assert [x.split("] ")[-1] for x in printed] == shown
    assert all(ABSL_PREFIX.match(x) for x in printed if "library" in x)
    written = [x.split("] ")[-1] for x in (tmp_path / "train.log").read_text().splitlines()]
    assert written == ["ours info", "library info", "ours warning", "library warning"]


def test_log_file_per_process():
    assert console.log_file_name(0, 1) == "train.log"
    assert console.log_file_name(0, 4) == "train.log"
    assert console.log_file_name(3, 4) == "train.process3.log"


def test_bad_log_level_is_one_config_error_naming_the_key(tmp_path):
    from tests.train_fixtures import tiny_config

    config = tiny_config(tmp_path, log_level="loud")
    with pytest.raises(ConfigError, match=r"^config.log_level='loud': must be one of \("):
        main_lib.validate_config(config)
