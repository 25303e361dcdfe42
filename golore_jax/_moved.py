"""The 0.1 module paths (``golore_jax.subspace``, ``golore_jax.layout``, ...), kept one release.

The implementation modules are private (``golore_jax._subspace``, ...). Under each old name
:func:`register` puts a :class:`MovedModule` in ``sys.modules``, so ``import
golore_jax.subspace`` and ``from golore_jax.subspace import X`` still work; reading a name from it
warns (``DeprecationWarning``, pointing at the caller's line) and returns the private module's
object. The warning names the public spelling when there is one, else says the name is an
implementation detail.

>>> import warnings
>>> import golore_jax, golore_jax.subspace
>>> with warnings.catch_warnings(record=True) as caught:
...     warnings.simplefilter("always")
...     lazy = golore_jax.subspace.LazyRefresh
>>> lazy is golore_jax.LazyRefresh, caught[0].category.__name__
(True, 'DeprecationWarning')
>>> print(caught[0].message)  # doctest: +ELLIPSIS
golore_jax.subspace is deprecated ... next release: use golore_jax.LazyRefresh
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings
from typing import Any

# The 0.1 module names, now ``golore_jax._<name>``.
MODULES = (
    "aliases",
    "basis_storage",
    "finish",
    "layout",
    "memory",
    "online_pca",
    "planning",
    "precision",
    "quantized",
    "refresh",
    "rotation",
    "sparse",
    "state_shapes",
    "subspace",
    "tail",
)


class MovedModule(types.ModuleType):
    """An old module path: each attribute read warns and forwards to the private module."""

    def __init__(self, old: str, new: str):
        super().__init__(old, f"Deprecated alias of {new} (an implementation module).")
        self._new = new

    def _target(self) -> types.ModuleType:
        return importlib.import_module(self._new)

    def __getattr__(self, name: str) -> Any:
        target = self._target()
        if name == "__all__":  # a star import gives the module's public names (each warns)
            return [n for n in sys.modules["golore_jax"].__all__ if hasattr(target, n)]
        if name.startswith("__") or not hasattr(target, name):
            # No dunder is forwarded: tools scanning sys.modules (inspect.getmodule reads
            # __file__) must not map the private file to this alias, nor warn.
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(target, name)
        warnings.warn(
            f"{self.__name__} is deprecated and will be removed in the next release: "
            f"{_advice(self.__name__, self._new, name, value)}",
            DeprecationWarning,
            stacklevel=2,  # the line that reads the name (attribute access or from-import)
        )
        return value

    def __dir__(self) -> list[str]:
        return dir(self._target())


def _advice(old: str, new: str, name: str, value: Any) -> str:
    """``use golore_jax.<name>`` when the package exports the same object (or a replacement
    for a 0.1 name), else where the implementation now lives."""
    package = sys.modules["golore_jax"]
    if name in package.__all__ and getattr(package, name) is value:
        return f"use golore_jax.{name}"
    replacement = package._DEPRECATED_NAMES.get(name)
    if replacement is not None:
        return f"use {replacement[1]}"
    return (
        f"{old}.{name} is not public API; it lives in the implementation module {new}, which "
        "may change without deprecation"
    )


def register(package: str) -> dict[str, MovedModule]:
    """A :class:`MovedModule` per old name, in ``sys.modules`` (``import package.old`` finds
    it there); returns ``{old name: module}`` for the package's ``__getattr__``."""
    moved = {}
    for name in MODULES:
        module = MovedModule(f"{package}.{name}", f"{package}._{name}")
        sys.modules.setdefault(module.__name__, module)
        moved[name] = sys.modules[module.__name__]
    return moved
