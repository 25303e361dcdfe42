"""Orbax checkpoints of the whole run: params, optimizer state, step, data position, config.

A checkpoint directory ``WORKDIR/checkpoints/<step>`` holds the train state (restored with the
shardings of the current mesh, so a run can resume on a different device count) and a JSON item
with the data position and the config fields that must match to resume. Orbax writes to a
temporary directory and renames it when complete, so an interrupted save (even ``kill -9``)
never damages the previous checkpoint; the leftover temporary directory is removed at the next
start. A checkpoint that cannot be read (corrupted or truncated files) is skipped: the run
resumes from the newest readable one, and the unreadable ones are moved, not deleted, to
``WORKDIR/checkpoints_unreadable/`` with a warning. Orbax stores raw array chunks without
checksums, so flipped bytes inside a data file would restore silently; each saved checkpoint
therefore also gets ``crc32.json`` (a CRC-32 of every file, written after the commit) that is
checked before restoring.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import socket
import tempfile
import time
import warnings
import zlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from train import atomic, supervise
from train import distributed as distributed_lib
from train.errors import (
    CheckpointReadError,
    ConfigError,
    WorkdirError,
    environment_os_error,
    write_error,
)

CHECKSUMS = "crc32.json"
# Config fields that must match between a checkpoint and the run that resumes it.
MUST_MATCH = (
    "model",
    "optimizer.name",
    "optimizer.inner.name",
    "optimizer.subspace.rank",
    "step.relora",
    "seq_len",
    # The data position is counted in batches of this size, and the schedule in steps.
    "batch_size",
)


def _lookup(config: Any, dotted: str) -> Any:
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value.to_dict() if hasattr(value, "to_dict") else value


# Model fields that change how a step runs, not what the state holds: a run may resume with
# other values (e.g. after the attention default changed, or with remat turned on).
MODEL_RUNTIME_FIELDS = ("attention", "remat", "dtype")


def comparable(fp: dict[str, Any] | None) -> dict[str, Any]:
    """A fingerprint without the runtime model fields (also for ones saved with them)."""
    fp = {k: v for k, v in (fp or {}).items() if k in (*MUST_MATCH, *MUST_MATCH_WHEN_SET)}
    if isinstance(fp.get("model"), dict):
        fp["model"] = {k: v for k, v in fp["model"].items() if k not in MODEL_RUNTIME_FIELDS}
        # Checkpoints from before model.weight_storage existed stored floats.
        if fp["model"].get("weight_storage") == "float":
            del fp["model"]["weight_storage"]
    return fp


def _is_set(config: Any, dotted: str) -> bool:
    try:
        return bool(_lookup(config, dotted))
    except (KeyError, AttributeError):
        return False


# Must match too, but recorded only when set: older checkpoints (without it) stay resumable.
MUST_MATCH_WHEN_SET = ("step.layerwise",)  # the layer-wise optimizer state differs


def fingerprint(config: Any) -> dict[str, Any]:
    """The fields of ``config`` a checkpoint must agree with, JSON-normalised."""
    fields = {}
    for key in MUST_MATCH:  # a program without a block (fine-tuning has no `step`) skips it
        try:
            fields[key] = _lookup(config, key)
        except (KeyError, AttributeError):
            continue
    fields.update({k: True for k in MUST_MATCH_WHEN_SET if _is_set(config, k)})
    found = json.loads(json.dumps(fields, default=str))
    return comparable(found)


def check_writable(directory: pathlib.Path, what: str = "workdir") -> None:
    """Fails early, before training, when ``directory`` cannot be created or written."""
    directory = pathlib.Path(directory).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as e:
        raise WorkdirError(f"{what} {directory} is not writable: {e}") from e


LOCK_FILE = ".lock"


class WorkdirLock:
    """One run per workdir: ``WORKDIR/.lock`` holds the running process's pid and host.

    A second run on the same workdir refuses to start, naming them. A lock left by a process
    that no longer exists on this host (killed with ``kill -9``, a crash) is taken over with a
    warning; one from another host cannot be checked from here and must be deleted by hand.
    With several processes, process 0 holds the lock for the run.
    """

    def __init__(self, workdir: pathlib.Path) -> None:
        self.path = pathlib.Path(workdir) / LOCK_FILE
        self._held = False

    def acquire(self) -> None:
        error = None
        if distributed_lib.is_main():
            try:
                self._acquire_here()
            except WorkdirError as e:
                error = e
        if not distributed_lib.all_true(error is None):
            raise error or WorkdirError(f"{self.path}: process 0 could not lock the workdir")

    def _acquire_here(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for attempt in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:  # removed, or being written by another starting run
                    time.sleep(0.05 * (attempt + 1))
                    continue
                if holder["host"] == me["host"] and not _pid_alive(holder["pid"]):
                    logging.warning(
                        "%s: taking over the lock of pid %d on %s, which no longer runs",
                        self.path,
                        holder["pid"],
                        holder["host"],
                    )
                    self.path.unlink(missing_ok=True)
                    continue
                raise WorkdirError(
                    f"workdir {self.path.parent} is in use by pid {holder['pid']} on host "
                    f"{holder['host']} (lock file {self.path}); wait for that run to end, or "
                    "delete the lock file if it is not running"
                ) from None
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
            self._held = True
            return
        raise WorkdirError(
            f"could not lock workdir {self.path.parent}: its lock file {self.path} {self._why()}"
            f" (a run killed while writing it, or not ours); if no run uses this workdir, "
            f"delete {self.path} and rerun"
        )

    def _holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text())
            return {"pid": int(holder["pid"]), "host": str(holder["host"])}
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _why(self) -> str:
        """What is wrong with a lock file :meth:`_holder` cannot read."""
        try:
            text = self.path.read_text(errors="replace")
        except FileNotFoundError:
            return "kept vanishing and reappearing (another run starting at the same time?)"
        except OSError as e:
            return f"cannot be read ({e.strerror})"
        if not text.strip():
            return "is empty"
        return f"does not hold a pid and host ({text[:60]!r})"

    def release(self) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class _OrbaxErrorsToFile(logging.Filter):
    """orbax's ERROR records about a save (a failed write reported by each of its threads, each
    with a traceback) become INFO: the log file keeps them, the console shows our one line
    (train/console.py shows a library's records from WARNING up)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname:
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


_ORBAX_ERRORS_TO_FILE = _OrbaxErrorsToFile()


class _UnretrievedWriteErrorsToFile(logging.Filter):
    """asyncio's "Future (Task) exception was never retrieved" for a write of orbax's that failed
    for the environment (the disk full), logged when the abandoned future is collected, often at
    exit after our error line: INFO (the log file), like orbax's own records of that save."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if record.levelno >= logging.ERROR and error and environment_os_error(error):
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


_UNRETRIEVED_WRITE_ERRORS_TO_FILE = _UnretrievedWriteErrorsToFile()


class Checkpoints:
    """Saves every ``every`` steps, keeps the last ``keep``, restores the latest."""

    def __init__(self, workdir: pathlib.Path, *, keep: int, every: int) -> None:
        # max_to_keep=0 would make orbax delete every checkpoint, the ones saved before too.
        if keep < 1:
            raise ConfigError(f"config.keep_checkpoints={keep!r}: must be >= 1")
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        self.every = every
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, cleanup_tmp_directories=True
            ),
            item_names=("state", "meta"),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = False) -> bool:
        """Saves ``step`` (forced: even off the interval); a step already saved is kept."""
        if step in self._manager.all_steps():
            return False
        orbax_log = logging.getLogger("absl")
        orbax_log.addFilter(_ORBAX_ERRORS_TO_FILE)
        try:
            saved = self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
                force=force,
            )
            self._manager.wait_until_finished()
            if saved and jax.process_index() == 0:
                self._write_checksums(step)
            if saved:
                supervise.report(checkpoint=step)  # the watcher's "resume from" (multi-process)
        except Exception as e:
            cause = environment_os_error(e)  # orbax wraps OSErrors; tensorstore only says it
            if cause is None:
                orbax_log.removeFilter(_ORBAX_ERRORS_TO_FILE)
                raise
            # orbax's threads (and asyncio, collecting their futures) may still report the
            # failed writes: they stay out of the way of our line (in the log file) until exit.
            logging.getLogger("asyncio").addFilter(_UNRETRIEVED_WRITE_ERRORS_TO_FILE)
            # The writes it abandoned are coroutines collected at exit ("coroutine
            # 'write_fragment' was never awaited", a RuntimeWarning on stderr).
            warnings.filterwarnings(
                "ignore", r"coroutine '.*' was never awaited", category=RuntimeWarning
            )
            raise write_error(
                self.directory / str(step),
                cause,
                f"saving step {step} failed and nothing was lost: the checkpoints saved before "
                f"({self.all_steps() or 'none'}) are intact; free space (or fix the "
                "permission) and rerun the same command to resume",
            ) from e
        orbax_log.removeFilter(_ORBAX_ERRORS_TO_FILE)
        return saved

    def _files(self, step: int) -> dict[str, pathlib.Path]:
        root = self.directory / str(step)
        return {
            str(p.relative_to(root)): p
            for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != CHECKSUMS
        }

    def _write_checksums(self, step: int) -> None:
        sums = {name: _crc32(path) for name, path in self._files(step).items()}
        atomic.write_text(self.directory / str(step) / CHECKSUMS, json.dumps(sums, indent=0))

    def verify(self, step: int) -> None:
        """Raises RuntimeError when a file of ``step`` is missing or its CRC-32 has changed.

        A checkpoint without ``crc32.json`` (killed between commit and writing it, or saved
        by an older version) is not checked here.
        """
        root = self.directory / str(step)
        path = root / CHECKSUMS
        if not path.exists():
            return
        try:
            expected = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise RuntimeError(f"checkpoint {root}: {CHECKSUMS} is unreadable: {e}") from e
        files = self._files(step)
        for name, crc in expected.items():
            if name not in files:
                raise RuntimeError(f"checkpoint {root} is incomplete: {name} is missing")
            if _crc32(files[name]) != crc:
                raise RuntimeError(
                    f"checkpoint {root} is corrupted: {name} does not match its CRC-32 in "
                    f"{CHECKSUMS}"
                )

    def restore(self, step: int, abstract_state: Any, config: Any) -> tuple[Any, dict[str, Any]]:
        """Restores ``step`` into ``abstract_state``'s shapes and shardings.

        Raises ValueError when the checkpoint was written by an incompatible config, and
        RuntimeError naming the checkpoint when it cannot be read; nothing is deleted.
        """
        path = self.directory / str(step)
        self.verify(step)
        try:
            meta = self._manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            )["meta"]
        except Exception as e:
            raise RuntimeError(f"checkpoint {path} is unreadable (its metadata): {e}") from e
        expected, found = fingerprint(config), comparable(meta.get("fingerprint"))
        # A key an older checkpoint did not record is not compared; a when-set key is absent
        # from both when unset.
        diffs = [k for k in MUST_MATCH if k in found and found[k] != expected[k]]
        diffs += [k for k in MUST_MATCH_WHEN_SET if found.get(k) != expected.get(k)]
        if diffs:
            raise ConfigError(
                f"checkpoint {path} does not match the config in {diffs}: checkpoint has "
                f"{ {k: found.get(k) for k in diffs} }, config has "
                f"{ {k: expected.get(k) for k in diffs} }. Use another --workdir to start afresh."
            )
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            )
        except Exception as e:
            raise RuntimeError(f"checkpoint {path} is unreadable (its train state): {e}") from e
        return restored["state"], meta

    def restore_latest(
        self, abstract_state: Any, config: Any
    ) -> tuple[int, Any, dict[str, Any]] | None:
        """Restores the newest readable checkpoint: ``(step, state, meta)``, or None if none.

        A newer checkpoint that cannot be read is skipped with a warning and, once an older one
        has been restored, moved to ``checkpoints_unreadable/`` (so this run can save that step
        again). Raises RuntimeError listing them when no checkpoint is readable (nothing moved),
        and ValueError at once when a checkpoint belongs to another config.
        """
        steps = sorted(self.all_steps(), reverse=True)
        errors: list[str] = []
        for step in steps:
            # Every process tries; a checkpoint counts as readable only if all of them read
            # it, so all take the same decision.
            try:
                state, meta = self.restore(step, abstract_state, config)
                error = None
            except RuntimeError as e:
                state, error = None, str(e)
            if not distributed_lib.all_true(error is None):
                if error is None:
                    path = self.directory / str(step)
                    error = f"checkpoint {path} is unreadable on another process"
                logging.warning("skipping checkpoint %s: %s", self.directory / str(step), error)
                errors.append(error)
                continue
            self._move_aside_all(steps[: len(errors)], resumed=step)
            return step, state, meta
        if errors:
            reasons = " | ".join(_shortened(error) for error in errors)
            raise CheckpointReadError(
                f"no readable checkpoint in {self.directory} (nothing was moved or deleted): "
                f"{reasons}. Restore a copy of a checkpoint, or move {self.directory} away to "
                "start afresh"
            )
        return None

    def _move_aside_all(self, bad_steps: list[int], *, resumed: int) -> None:
        """Process 0 moves the unreadable checkpoints aside; the others wait, then reload."""
        if not bad_steps:
            return
        if distributed_lib.is_main():
            for bad in bad_steps:
                moved = self._move_aside(bad)
                logging.warning(
                    "checkpoint step %d was unreadable: moved it to %s; resuming from step %d",
                    bad,
                    moved,
                    resumed,
                )
        distributed_lib.barrier("checkpoints moved aside")
        self._manager.reload()

    def _move_aside(self, step: int) -> pathlib.Path:
        aside = self.directory.parent / "checkpoints_unreadable"
        aside.mkdir(exist_ok=True)
        target, n = aside / str(step), 1
        while target.exists():
            target, n = aside / f"{step}.{n}", n + 1
        (self.directory / str(step)).rename(target)
        return target

    def close(self) -> None:
        self._manager.close()


def _shortened(text: str, limit: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 4] + " ..."


def _crc32(path: pathlib.Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc
