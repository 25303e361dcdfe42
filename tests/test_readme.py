"""Every ```python block of README.md runs as written, each on its own (a block defines what it
uses: no name may leak in from another block or from this test)."""

from __future__ import annotations

import pathlib
import re
import warnings

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def python_blocks() -> list[tuple[int, str]]:
    """``(line of the opening fence, code)`` of each ```python block, in order."""
    text = README.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in BLOCK.finditer(text)]


def test_the_readme_has_python_blocks():
    assert len(python_blocks()) >= 4


@pytest.mark.parametrize(
    "line, code", python_blocks(), ids=lambda v: f"line{v}" if isinstance(v, int) else ""
)
def test_readme_block_runs(line, code):
    """The block runs in a fresh namespace, and uses no deprecated spelling."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="golore_jax", category=DeprecationWarning)
        exec(compile(code, f"README.md:{line}", "exec"), {"__name__": f"readme_line{line}"})
