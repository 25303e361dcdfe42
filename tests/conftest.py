"""Shared pytest setup: import the repository's packages without installing them, and compile
faster on CPU.

Compiling is most of a CPU test's time. ``--xla_backend_optimization_level=0`` skips LLVM's
optimisation of the generated code (about 4x faster compiles); ``--xla_cpu_use_fusion_emitters=
false`` emits XLA:CPU's fused loops with its older element-wise emitter instead of the MLIR
fusion emitters (a tiny model's train step compiles in 1.6 s instead of 3.3 s on 8 fake
devices). The HLO, hence which operations run and in which precision, is unchanged; the
generated loops may sum in another order, which every tolerance must allow anyway (.ci/run
reruns the tests marked ``numerics`` with LLVM's optimisation on, at level 1, and the fusion
emitters on, XLA:CPU's default). Set before jax starts, they also reach the subprocesses the
tests launch (they inherit the environment; tests/child_env.py adds them where a test sets its
own XLA_FLAGS).
"""

from __future__ import annotations

import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
# A flag set explicitly wins: .ci/run's second pass over the tests marked ``numerics`` runs
# LLVM's optimisation at level 1 with the fusion emitters, whose loops sum in another order
# (they must hold in both).
for _flag in FAST_COMPILE.split():
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
