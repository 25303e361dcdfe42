"""How a benchmark hands over its results: the rows as JSON beside the printed table."""

from __future__ import annotations

import json
import pathlib
from typing import Any


def write_json(rows: Any, path: str | None) -> None:
    """Writes ``rows`` as indented JSON to ``path`` (its folder created); nothing when None."""
    if path is None:
        return
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
