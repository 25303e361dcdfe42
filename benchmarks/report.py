"""How a benchmark hands over its results: the rows as JSON beside the printed table."""

from __future__ import annotations

import json
import pathlib
import subprocess
from typing import Any


def write_json(rows: Any, path: str | None) -> None:
    """Writes ``rows`` as indented JSON to ``path`` (its folder created); nothing when None."""
    if path is None:
        return
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))


RESULT = "RESULT "  # a child process prints one such line (then JSON) per measured row


def print_result(row: Any) -> None:
    """Hands ``row`` to the parent process (see :func:`run_child`)."""
    print(RESULT + json.dumps(row), flush=True)


def run_child(
    cmd: list[str], timeout: float | None = None, env: dict[str, str] | None = None
) -> tuple[list[Any], str]:
    """Runs one benchmark child process (each has its own device and peak memory).

    Returns the rows it printed with :func:`print_result` and, when there are none, why: the
    timeout or the tail of its stderr.
    """
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return [], f"timed out after {timeout:.0f} s"
    rows = [
        json.loads(ln[len(RESULT) :]) for ln in out.stdout.splitlines() if ln.startswith(RESULT)
    ]
    return rows, "" if rows else out.stderr[-3000:]
