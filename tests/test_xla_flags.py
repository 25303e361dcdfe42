"""The XLA flags the trainer and benchmarks add, and that the user's own flags win."""

from __future__ import annotations

import os
import subprocess
import sys

from train import xla_flags


def test_defaults_are_added_once_and_user_flags_win():
    assert xla_flags.with_defaults("") == "--xla_gpu_enable_triton_gemm=false"
    assert xla_flags.with_defaults(" --xla_dump_to=/tmp/d ") == (
        "--xla_dump_to=/tmp/d --xla_gpu_enable_triton_gemm=false"
    )
    mine = "--xla_gpu_enable_triton_gemm=true --xla_dump_to=/tmp/d"
    assert xla_flags.with_defaults(mine) == mine
    once = xla_flags.with_defaults("")
    assert xla_flags.with_defaults(once) == once


def test_apply_defaults_reaches_jax_started_afterwards():
    # A fresh process: jax imported first, flags applied, then the backend starts and parses
    # them (a malformed or unknown flag would abort it). XLA:CPU accepts and ignores GPU flags.
    code = (
        "import os, jax\n"
        "from train import xla_flags\n"
        "xla_flags.apply_defaults()\n"
        "print(os.environ['XLA_FLAGS'])\n"
        "print(float(jax.numpy.ones((4, 4)).sum()))\n"
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    flags, total = out.stdout.split("\n")[:2]
    assert flags == "--xla_force_host_platform_device_count=2 --xla_gpu_enable_triton_gemm=false"
    assert total == "16.0"
