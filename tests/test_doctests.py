"""The examples in golore_jax's docstrings run and print what they claim (``doctest``)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import golore_jax

MODULES = sorted(
    name for _, name, _ in pkgutil.iter_modules(golore_jax.__path__, prefix="golore_jax.")
)
# Modules whose public functions and transforms carry examples (a module listed here without
# one fails, so examples are not lost silently).
WITH_EXAMPLES = {
    "golore_jax.aliases",
    "golore_jax.finish",
    "golore_jax.online_pca",
    "golore_jax.partitioning",
    "golore_jax.planning",
    "golore_jax.projectors",
    "golore_jax.refresh",
    "golore_jax.rotation",
    "golore_jax.sparse",
    "golore_jax.subspace",
    "golore_jax.tail",
}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
    if name in WITH_EXAMPLES:
        assert result.attempted > 0, f"{name} has no docstring example"
