"""Errors a user's input causes, as opposed to bugs: the command-line entry points print their
message as ONE line (no traceback) and exit with status 2; any other exception keeps its
traceback.

Each message names the config key (or path) and what is allowed. The classes also derive from
the builtin a caller would expect (``ValueError`` for a bad value, ``PermissionError`` for a
directory that cannot be written), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """Base class: a problem the user fixes by changing the command, config or environment."""


class ConfigError(UserError, ValueError):
    """A config value out of its allowed range, or inconsistent with the devices or workdir."""


class WorkdirError(UserError, PermissionError):
    """A directory the run must write to cannot be written (or the workdir is in use)."""


class CheckpointWriteError(UserError, OSError):
    """A save failed for a reason outside the program (disk full, read-only file system); the
    checkpoints saved before it are intact."""
