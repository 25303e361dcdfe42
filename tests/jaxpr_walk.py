"""Walk a jaxpr with its sub-jaxprs, for tests that check which operations a step traces to."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def iter_equations(jaxpr: Any, not_inside: tuple[str, ...] = ()) -> Iterator[Any]:
    """Every equation of ``jaxpr`` and, depth first, of the jaxprs in its equations' params
    (cond branches, pjit, remat, custom_jvp/vjp, scan, while...): an operation XLA will run
    may sit at any depth. A sub-jaxpr referenced twice is walked twice, so counts see both.
    ``not_inside``: primitives whose sub-jaxprs are not entered (e.g. ``("cond",)``: only what
    runs whichever branch is taken)."""
    for eqn in jaxpr.eqns:
        yield eqn
        if eqn.primitive.name in not_inside:
            continue
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    yield from iter_equations(inner, not_inside)
