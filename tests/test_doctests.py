"""The examples in golore_jax's docstrings run and print what they claim (``doctest``)."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import pytest

import golore_jax

MODULES = sorted(
    name for _, name, _ in pkgutil.iter_modules(golore_jax.__path__, prefix="golore_jax.")
)
# Modules whose public functions and transforms carry examples (a module listed here without
# one fails, so examples are not lost silently).
WITH_EXAMPLES = set(MODULES) - {"golore_jax.__init__"}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
    if name in WITH_EXAMPLES:
        assert result.attempted > 0, f"{name} has no docstring example"


def test_every_public_function_has_an_example():
    """Each function of ``golore_jax.__all__`` shows its use in its docstring (the partial
    variants, e.g. golore_adamw, are documented beside the function they fix)."""
    missing = [
        name
        for name in golore_jax.__all__
        if inspect.isfunction(getattr(golore_jax, name))
        and ">>>" not in (inspect.getdoc(getattr(golore_jax, name)) or "")
    ]
    assert not missing, f"public functions without a docstring example: {missing}"
