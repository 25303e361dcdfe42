"""Runs of several processes (one per host): start-up, agreement and the rules they follow.

``config.distributed=True`` calls :func:`jax.distributed.initialize`. On a cluster JAX detects
(SLURM, Open MPI, TPU VMs, GKE with JobSet) every argument comes from the environment; anywhere
else give them as config keys, the same on every process except ``process_id``::

    python -m train --config C --workdir W --config.distributed=True \\
        --config.coordinator_address=10.0.0.1:8476 --config.num_processes=2 --config.process_id=0

What the processes agree on, so that none of them waits forever for the others:

* a SIGTERM (a preemption notice) or SIGINT on ANY process makes ALL of them save the same step
  and exit: JAX's preemption sync manager (``multihost_utils.reached_preemption_sync_point``)
  picks the step; SIGINT is forwarded to its SIGTERM notifier;
* when a process dies, the others end within about ``config.heartbeat_timeout_s`` seconds: the
  coordination service stops them with "Terminating process because the JAX distributed service
  detected fatal errors ... another task died";
* decisions taken from files (which checkpoint to restore, whether the workdir lock is held)
  are taken by process 0 or agreed by all (:func:`all_true`); only process 0 moves files and
  writes metrics, TensorBoard events and plots.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from train.errors import ConfigError


def validate(config: Any) -> None:
    """The multi-process keys, checked before JAX starts its backends."""
    address = config.coordinator_address
    if address and (":" not in address or not address.rsplit(":", 1)[1].isdigit()):
        raise ConfigError(
            f"config.coordinator_address={address!r}: must be 'host:port' (or '' to let JAX "
            "detect the cluster)"
        )
    count, index = config.num_processes, config.process_id
    if count is not None and count < 1:
        raise ConfigError(f"config.num_processes={count!r}: must be >= 1 (or None: detect)")
    if index is not None and not (index >= 0 and (count is None or index < count)):
        raise ConfigError(
            f"config.process_id={index!r}: must be in [0, config.num_processes={count}) "
            "(or None: detect)"
        )
    for key in ("heartbeat_timeout_s", "initialization_timeout_s"):
        if not config[key] >= 1:
            raise ConfigError(f"config.{key}={config[key]!r}: must be >= 1 (seconds)")


def initialize(config: Any) -> None:
    """``jax.distributed.initialize`` with the config's explicit keys (None / '' = detect)."""
    if jax.distributed.is_initialized():  # e.g. a second run in the same Python process
        return
    try:
        jax.distributed.initialize(
            coordinator_address=config.coordinator_address or None,
            num_processes=config.num_processes,
            process_id=config.process_id,
            initialization_timeout=int(config.initialization_timeout_s),
            heartbeat_timeout_seconds=int(config.heartbeat_timeout_s),
        )
    except (ValueError, RuntimeError) as e:
        if "coordinator_address" in str(e) or "should be defined" in str(e):
            raise ConfigError(
                "config.distributed=True outside a cluster JAX detects: set "
                "config.coordinator_address, config.num_processes and config.process_id "
                f"({' '.join(str(e).split())})"
            ) from e
        raise


def is_main() -> bool:
    """Process 0 writes the files all processes share (metrics, TensorBoard, plots)."""
    return jax.process_index() == 0


def all_true(flag: bool) -> bool:
    """True on every process when ``flag`` is True on every process (a collective)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.all(multihost_utils.process_allgather(np.int32(flag))))


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def stop_signals() -> tuple[int, ...]:
    """The signals the loop turns into a Python flag: with several processes SIGTERM is left to
    JAX's preemption notifier (installed by ``jax.distributed.initialize``)."""
    if jax.process_count() > 1:
        return (signal.SIGINT,)
    return (signal.SIGTERM, signal.SIGINT)


def forward_to_preemption_notifier() -> None:
    """SIGINT on one process of several: raise SIGTERM, which JAX spreads to all processes."""
    os.kill(os.getpid(), signal.SIGTERM)


def preemption_step(step: int) -> bool:
    """True on every process at the same step once any of them received SIGTERM (call at every
    step, with the same step numbers on all processes)."""
    if jax.process_count() == 1:
        return False
    return multihost_utils.reached_preemption_sync_point(step)
