"""Writing a file so that readers see the old or the new content, never a part: the content
goes to a temporary file in the same directory, renamed over the target when complete (a
rename within a file system is atomic, so a kill mid-write leaves the old file intact).

The file keeps the target's permission bits when it exists, else gets the ones ``open`` would
give a new file (0666 less the umask): ``tempfile.mkstemp`` creates 0600, which a rename would
otherwise leave on e.g. ``metrics.jsonl`` after a resume rewrote it."""

from __future__ import annotations

import contextlib
import os
import pathlib
import stat
import tempfile
from collections.abc import Callable
from typing import IO, Any


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (/proc), since
    ``os.umask`` can only be read by setting it, which races with other threads' file creation."""
    with contextlib.suppress(OSError, ValueError):
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(path: pathlib.Path) -> int:
    """The permission bits the written file gets: the existing file's, else a new file's."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def write(
    path: str | pathlib.Path, fill: Callable[[IO[Any]], Any], *, binary: bool = False
) -> None:
    """Calls ``fill(file)`` on a temporary file beside ``path``, then renames it to ``path``."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
            os.fchmod(f.fileno(), _mode_for(path))
            fill(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path: str | pathlib.Path, text: str) -> None:
    """``path.write_text(text)``, atomically."""
    write(path, lambda f: f.write(text))
