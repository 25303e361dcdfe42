"""Writing a file so that readers see the old or the new content, never a part: the content
goes to a temporary file in the same directory, renamed over the target when complete (a
rename within a file system is atomic, so a kill mid-write leaves the old file intact)."""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
from collections.abc import Callable
from typing import IO, Any


def write(
    path: str | pathlib.Path, fill: Callable[[IO[Any]], Any], *, binary: bool = False
) -> None:
    """Calls ``fill(file)`` on a temporary file beside ``path``, then renames it to ``path``."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
            fill(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path: str | pathlib.Path, text: str) -> None:
    """``path.write_text(text)``, atomically."""
    write(path, lambda f: f.write(text))
