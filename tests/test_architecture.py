"""ARCHITECTURE.md stays true: every path, public name and config key it names exists; every
library module has a row in its table, and the identifiers in a row's concept cell are names of
that module (so a renamed or removed function, alias or key fails here, not in a reader's
head)."""

from __future__ import annotations

import builtins
import importlib
import inspect
import pathlib
import re

import jax
import optax
import pytest

import golore_jax as gl
from configs import base

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEXT = (ROOT / "ARCHITECTURE.md").read_text()
# Backticked spans, and the lines of the code block (the application's diagram).
SPANS = re.findall(r"`([^`\n]+)`", TEXT)
DIAGRAM = "\n".join(re.findall(r"^```\n(.*?)^```$", TEXT, re.MULTILINE | re.DOTALL))
# Libraries whose names a concept cell may use as they are.
KNOWN = (jax, jax.lax, jax.numpy, optax, optax.GradientTransformation)
IDENTIFIER = re.compile(r"^[A-Za-z_]\w*$")
PATH = re.compile(r"^(?:[\w.-]+/)+[\w.-]*\.(?:py|md|sh|json)(?::\w+)?$")
CONFIG = base.llama_config(8, 16, 2, 2, 64)
TOP_KEYS = {k for k in CONFIG if hasattr(CONFIG[k], "keys")}


def _paths() -> set[str]:
    named = {s for s in SPANS if PATH.match(s)}
    named |= set(re.findall(r"\b(?:train|golore_jax|configs|tests)/[\w/]+\.py\b", DIAGRAM))
    return named


@pytest.mark.parametrize("span", sorted(_paths()))
def test_named_paths_exist(span):
    """``dir/file.py`` exists; ``dir/file.py:name`` also names an attribute of that module."""
    path, _, attr = span.partition(":")
    assert (ROOT / path).exists(), span
    if attr:
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert hasattr(module, attr), span


def _resolve(dotted: str):
    """``golore_jax.a.b`` or ``gl.a.b``: attribute by attribute, importing submodules."""
    parts = dotted.split(".")
    obj, name = gl, "golore_jax"
    for part in parts[1:]:
        name = f"{name}.{part}"
        # a submodule not imported yet is imported
        obj = getattr(obj, part) if hasattr(obj, part) else importlib.import_module(name)
    return obj


def _library_names() -> set[str]:
    names = set()
    for span in SPANS + re.findall(r"\b(?:gl|golore_jax)\.[\w.]+", DIAGRAM):
        for match in re.findall(r"\b(?:gl|golore_jax)\.[A-Za-z_][\w.]*", span):
            names.add(match.rstrip("."))
    return names


@pytest.mark.parametrize("dotted", sorted(_library_names()))
def test_named_library_names_exist(dotted):
    _resolve(dotted)


def _config_keys() -> set[str]:
    keys = set()
    for span in SPANS:
        if "/" in span or span.endswith(".py"):
            continue
        for key in re.findall(r"\b([a-z_]+(?:\.[a-z_0-9]+|\.\{[^}]*\}|\.\*)+)", span):
            if key.split(".")[0] in TOP_KEYS:
                keys.add(key)
    keys |= set(re.findall(r"\(((?:step|model|mesh|optimizer)\.[a-z_.]+)\)", DIAGRAM))
    return keys


def _expand(key: str) -> list[str]:
    """``a.{b, c}`` -> ``a.b``, ``a.c``; ``a.*`` -> ``a``."""
    if key.endswith(".*"):
        return [key[:-2]]
    m = re.match(r"^(.*)\.\{([^}]*)\}$", key)
    if m:
        return [f"{m.group(1)}.{k.strip()}" for k in m.group(2).split(",")]
    return [key]


@pytest.mark.parametrize("key", sorted(_config_keys()))
def test_named_config_keys_exist(key):
    """Every ``block.key`` named exists in configs/base.py's full config."""
    for dotted in _expand(key):
        node = CONFIG
        for part in dotted.split("."):
            assert part in node, f"{dotted}: no {part!r} in configs/base.py's config"
            node = node[part]


def _table_rows() -> list[tuple[str, list[str]]]:
    """``(module path, backticked spans of its concept cell)`` of the library table."""
    rows = []
    for line in TEXT.splitlines():
        m = re.match(r"^\| `(golore_jax/[\w]+\.py)` \| (.*) \|$", line)
        if m:
            rows.append((m.group(1), re.findall(r"`([^`]+)`", m.group(2))))
    return rows


def test_every_library_module_has_a_row():
    rows = {path for path, _ in _table_rows()}
    modules = {
        f"golore_jax/{p.name}"
        for p in (ROOT / "golore_jax").glob("*.py")
        if p.name != "__init__.py"
    }
    assert modules - rows == set(), "library modules without a row in ARCHITECTURE.md"


@pytest.mark.parametrize(
    "path, spans", _table_rows(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_table_identifiers_are_names_of_their_module(path, spans):
    """A plain identifier in a row's concept cell is a name of that module (a function, class
    or constant, or a field of one of its classes), of ``golore_jax``, of jax / optax (``init``,
    ``eval_shape``) or a builtin;
    ``prefix_*`` matches at least one public name."""
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    classes = [c for _, c in inspect.getmembers(module, inspect.isclass)]

    def named(span: str) -> bool:
        return (
            hasattr(module, span)
            or hasattr(gl, span)
            or hasattr(builtins, span)
            or any(hasattr(lib, span) for lib in KNOWN)  # jax / optax names (`init`, `vmap`)
            or any(span in getattr(c, "__annotations__", {}) for c in classes)  # a field
        )

    for span in spans:
        if span.endswith("_*"):
            assert any(n.startswith(span[:-1]) for n in gl.__all__), span
        elif IDENTIFIER.match(span) and span not in ("gradient", "state", "left", "right"):
            assert named(span), f"{path}: {span}"


def test_no_wildcard_or_name_outside_the_public_surface():
    """``name_*`` anywhere in the page matches a public name (``hybrid_*`` did not)."""
    for span in SPANS:
        if re.match(r"^\w+_\*$", span):
            assert any(n.startswith(span[:-1]) for n in gl.__all__), span
