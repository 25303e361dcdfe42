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
* every process's config (flattened) and code version are compared right after joining
  (:func:`agree_on_config`), before anything on disk changes: a difference stops all of them
  with one line naming the keys and the processes; the per-host keys (:data:`PER_HOST_KEYS`)
  may differ;
* when a process dies, the others end within about ``config.heartbeat_timeout_s`` seconds: the
  coordination service stops them with "Terminating process because the JAX distributed service
  detected fatal errors ... another task died" (SIGABRT); on the command line the watcher
  (``train/supervise.py``) then says which process stopped, when, and what to run (exit 6);
* decisions taken from files (which checkpoint to restore, whether the workdir lock is held)
  are taken by process 0 or agreed by all (:func:`all_true`); only process 0 moves files and
  writes metrics, TensorBoard events and plots.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import signal
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from train import supervise
from train.errors import ConfigError

# Keys that may differ between the processes of one run: each host's own index, its way to
# reach the coordinator, its local cache directories and console verbosity.
PER_HOST_KEYS = (
    "process_id",
    "coordinator_address",
    "data.cache_dir",
    "compilation_cache_dir",
    "log_level",
)
# The code whose version the processes must share (the hash of these directories' .py files).
_SOURCE_DIRS = ("train", "golore_jax", "configs")
_ROOT = pathlib.Path(__file__).resolve().parents[1]


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
    """``jax.distributed.initialize`` with the config's explicit keys (None / '' = detect),
    then :func:`agree_on_config`."""
    if not jax.distributed.is_initialized():  # else a second run in the same Python process
        _initialize(config)
    supervise.report(
        connected=True, process_id=jax.process_index(), num_processes=jax.process_count()
    )
    agree_on_config(config)


def _initialize(config: Any) -> None:
    try:
        jax.distributed.initialize(
            coordinator_address=config.coordinator_address or None,
            num_processes=config.num_processes,
            process_id=config.process_id,
            initialization_timeout=int(config.initialization_timeout_s),
            heartbeat_timeout_seconds=int(config.heartbeat_timeout_s),
        )
    except (ValueError, RuntimeError) as e:  # a failed connect aborts in C++ (train/supervise.py)
        if "coordinator_address" in str(e) or "should be defined" in str(e):
            raise ConfigError(
                "config.distributed=True outside a cluster JAX detects: set "
                "config.coordinator_address, config.num_processes and config.process_id "
                f"({' '.join(str(e).split())})"
            ) from e
        raise


def flat_config(config: Any) -> dict[str, str]:
    """``{"optimizer.learning_rate": "0.003", ...}``: every leaf of ``config`` as JSON text."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}{key}.", item)
        else:
            out[prefix[:-1]] = json.dumps(value, sort_keys=True, default=str)

    walk("", config.to_dict() if hasattr(config, "to_dict") else dict(config))
    return out


def code_version() -> str:
    """The package version and a hash of the trainer's, library's and configs' source files."""
    from importlib import metadata

    try:
        version = metadata.version("golore-jax")
    except metadata.PackageNotFoundError:
        version = "unknown"
    digest = hashlib.sha256()
    for directory in _SOURCE_DIRS:
        for path in sorted((_ROOT / directory).rglob("*.py")):
            digest.update(str(path.relative_to(_ROOT)).encode() + b"\0" + path.read_bytes())
    return f"{version}+{digest.hexdigest()[:12]}"


def config_differences(configs: list[dict[str, str]]) -> list[str]:
    """``KEY (process 0: A, process 1: B)`` for each key whose value differs between the
    processes (``configs[i]`` is process i's :func:`flat_config`), the per-host keys aside."""
    out = []
    for key in sorted(set().union(*configs)):
        if key in PER_HOST_KEYS:
            continue
        values = [c.get(key, "(absent)") for c in configs]
        if len(set(values)) > 1:
            shown = ", ".join(f"process {i}: {v}" for i, v in enumerate(values))
            out.append(f"{key} ({shown})")
    return out


_agreements = 0  # each run in this Python process compares under its own keys


def agree_on_config(config: Any) -> None:
    """Compares every process's config and code version (through the coordination service's
    key-value store); raises the same one-line ConfigError on every process if any differ."""
    global _agreements
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    _agreements += 1
    prefix = f"golore_jax/config/{_agreements}"
    mine = {**flat_config(config), "code version": code_version()}
    client.key_value_set(f"{prefix}/{jax.process_index()}", json.dumps(mine))
    timeout_ms = int(config.initialization_timeout_s) * 1000
    configs = [
        json.loads(client.blocking_key_value_get(f"{prefix}/{i}", timeout_ms))
        for i in range(jax.process_count())
    ]
    # No process leaves (and takes the coordinator away) before every one has read them all.
    client.wait_at_barrier(f"{prefix}/read", timeout_ms)
    differences = config_differences(configs)
    if differences:
        shown = "; ".join(differences[:8]) + ("; ..." if len(differences) > 8 else "")
        raise ConfigError(
            f"the {jax.process_count()} processes were started with different configs: "
            f"{shown}. Run the same command on every host (only {', '.join(PER_HOST_KEYS)} may "
            "differ); nothing was written"
        )


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
