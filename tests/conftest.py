"""Shared pytest setup: import the repository's packages without installing them, and compile
faster on CPU.

Compiling is most of a CPU test's time; ``--xla_backend_optimization_level=0`` skips LLVM's
optimisation of the generated code (about 4x faster compiles; the HLO, hence which operations
run in which order and precision, is unchanged). Set before jax starts, it also reaches the
subprocesses the tests launch (they inherit the environment).
"""

from __future__ import annotations

import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

_FAST_COMPILE = "--xla_backend_optimization_level=0"
# An explicit level wins: .ci/run's second pass over the tests marked ``numerics`` runs LLVM's
# optimisation at level 1, whose vectorised loops sum in another order (they must hold in both).
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST_COMPILE).strip()
