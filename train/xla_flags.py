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


def forced_cpu_devices(xla_flags: str) -> int:
    """The ``--xla_force_host_platform_device_count`` of ``xla_flags`` (1 if absent)."""
    for token in xla_flags.split():
        if token.startswith("--xla_force_host_platform_device_count="):
            return int(token.split("=", 1)[1])
    return 1


def cpu_thread_pool_size(xla_flags: str, cpu_count: int) -> int:
    """Threads for XLA:CPU's intra-op pool (``PJRT_NPROC``): one per core, plus one per device.

    jaxlib 0.10's batched CPU LAPACK kernels (the batched eigh / QR of a subspace refresh) hold
    a pool thread while their batch runs on that same pool. Each fake CPU device runs one such
    call at once, so with as many devices as threads every thread waits and the run hangs at
    0% CPU (2 fake devices on a 2-core machine: GoLore hung at its first refresh). One extra
    thread per device always leaves the batches a thread to run on.
    """
    return max(cpu_count, 1) + forced_cpu_devices(xla_flags)


def apply_defaults() -> None:
    """Adds the default flags to ``os.environ['XLA_FLAGS']`` and sizes XLA:CPU's thread pool
    (unless ``PJRT_NPROC`` is set); call before JAX starts its backends."""
    os.environ["XLA_FLAGS"] = with_defaults(os.environ.get("XLA_FLAGS", ""))
    if "PJRT_NPROC" not in os.environ:
        os.environ["PJRT_NPROC"] = str(
            cpu_thread_pool_size(os.environ["XLA_FLAGS"], os.cpu_count() or 1)
        )
