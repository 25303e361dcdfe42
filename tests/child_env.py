"""Environments of the Python processes tests start: a device count is fixed when jax starts,
and some settings (the compilation cache) are process-wide."""

from __future__ import annotations

import os

from tests.conftest import FAST_COMPILE, ROOT

# 8 fake CPU devices; the faster compiles of tests/conftest.py.
EIGHT_DEVICES = f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}"


def child_env(**overrides: str) -> dict[str, str]:
    """``os.environ`` plus ``overrides``, with the repository first on ``PYTHONPATH``."""
    env = dict(os.environ, **overrides)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def eight_devices_env(**overrides: str) -> dict[str, str]:
    """:func:`child_env` with 8 fake CPU devices.

    ``PJRT_NPROC``: jaxlib's batched CPU LAPACK kernels block a thread of the intra-op pool
    (cpu_count threads) while their batch runs on that same pool; with fewer threads than
    batched calls in flight (one per fake device) a run can deadlock (jaxlib 0.10), so the pool
    gets headroom.
    """
    return child_env(XLA_FLAGS=EIGHT_DEVICES, PJRT_NPROC="16", **overrides)
