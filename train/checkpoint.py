"""Orbax checkpoints of the whole run: params, optimizer state, step, data position, config.

A checkpoint directory ``WORKDIR/checkpoints/<step>`` holds the train state (restored with the
shardings of the current mesh, so a run can resume on a different device count) and a JSON item
with the data position and the config fields that must match to resume. Orbax writes to a
temporary directory and renames it when complete, so an interrupted save never damages the
previous checkpoint.
"""

from __future__ import annotations

import json
import pathlib
import tempfile
from typing import Any

import orbax.checkpoint as ocp

# Config fields that must match between a checkpoint and the run that resumes it.
MUST_MATCH = ("model", "optimizer.name", "optimizer.inner", "optimizer.rank", "seq_len")


def _lookup(config: Any, dotted: str) -> Any:
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value.to_dict() if hasattr(value, "to_dict") else value


def fingerprint(config: Any) -> dict[str, Any]:
    """The fields of ``config`` a checkpoint must agree with, JSON-normalised."""
    return json.loads(json.dumps({k: _lookup(config, k) for k in MUST_MATCH}, default=str))


def check_writable(workdir: pathlib.Path) -> None:
    """Fails early, before training, when the workdir cannot be written."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise PermissionError(f"workdir {workdir} is not writable: {e}") from e


class Checkpoints:
    """Saves every ``every`` steps, keeps the last ``keep``, restores the latest."""

    def __init__(self, workdir: pathlib.Path, *, keep: int, every: int) -> None:
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        self.every = every
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
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
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=force,
        )
        self._manager.wait_until_finished()
        return saved

    def restore(self, step: int, abstract_state: Any, config: Any) -> tuple[Any, dict[str, Any]]:
        """Restores ``step`` into ``abstract_state``'s shapes and shardings.

        Raises ValueError when the checkpoint was written by an incompatible config, and
        RuntimeError naming the checkpoint when it cannot be read; nothing is deleted.
        """
        path = self.directory / str(step)
        try:
            meta = self._manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            )["meta"]
        except Exception as e:
            raise RuntimeError(f"checkpoint {path} is unreadable (its metadata): {e}") from e
        expected, found = fingerprint(config), meta.get("fingerprint")
        if found != expected:
            diffs = [k for k in MUST_MATCH if (found or {}).get(k) != expected[k]]
            raise ValueError(
                f"checkpoint {path} does not match the config in {diffs}: checkpoint has "
                f"{ {k: (found or {}).get(k) for k in diffs} }, config has "
                f"{ {k: expected[k] for k in diffs} }. Use another --workdir to start afresh."
            )
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            )
        except Exception as e:
            raise RuntimeError(f"checkpoint {path} is unreadable (its train state): {e}") from e
        return restored["state"], meta

    def close(self) -> None:
        self._manager.close()
