"""XLA flags the trainer and the benchmarks start JAX with.

``--xla_gpu_enable_triton_gemm=false`` makes XLA:GPU run matmuls through cuBLAS instead of its
own Triton GEMM fusions. With fp32 master weights every dense layer's matmul is fused with the
weight's cast to bf16, and those Triton fusions ran LLaMA-1B's dense matmuls at about
190 TFLOP/s on an H100; cuBLAS ran the same train step 1.72x faster (MFU 31% -> 54% at seq 2048,
BENCHMARKS.md section 1). XLA:CPU ignores the flag.

XLA reads ``XLA_FLAGS`` once, when JAX starts its first backend, so :func:`apply_defaults` must
run before anything touches a device (importing jax is fine). A flag the user already put in
``XLA_FLAGS`` is left as they set it.
"""

from __future__ import annotations

import os

DEFAULTS: dict[str, str] = {"--xla_gpu_enable_triton_gemm": "false"}


def with_defaults(xla_flags: str) -> str:
    """``xla_flags`` plus each default flag it does not name already."""
    named = {token.split("=", 1)[0] for token in xla_flags.split()}
    extra = [f"{flag}={value}" for flag, value in DEFAULTS.items() if flag not in named]
    return " ".join([xla_flags.strip(), *extra]).strip()


def apply_defaults() -> None:
    """Adds the default flags to ``os.environ['XLA_FLAGS']`` (call before JAX starts)."""
    os.environ["XLA_FLAGS"] = with_defaults(os.environ.get("XLA_FLAGS", ""))
