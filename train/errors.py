"""Errors a user's input or environment causes, as opposed to bugs, and the exit status of each
class. The command-line entry points print such an error as ONE line, ``error: CLASS: MESSAGE``
(no traceback), and exit with its class's status; any other exception keeps its traceback.

Each message names the config key (or path) and what is allowed or what to do. The classes
also derive from the builtin a caller would expect (``ValueError`` for a bad value,
``PermissionError`` for a directory that cannot be written, ``FloatingPointError`` for a
non-finite stop), so ``except ValueError`` keeps working.

Exit statuses (README "Exit statuses", docs/bad_inputs.md), defined here and nowhere else:

=====  ============================================================================
0      finished, or ``run_steps`` reached (saved)
2      configuration: a config value, a config file, the workdir (unwritable, in use),
       processes of one run with different configs
3      data: a data path or file, the tokenizer, the ``data.*`` keys
4      checkpoint: a save or a metrics / TensorBoard write failed (disk full, read-only,
       quota), or no checkpoint in the workdir is readable
5      non-finite stop: ``nonfinite='stop'``, or more than ``max_skipped`` skipped steps
6      lost peer: another process of a multi-process run died, stopped heartbeating or
       never connected
130    SIGINT (Ctrl-C); 143: SIGTERM. In the loop, after saving the step; before it
       (data preparation, tokenizer training, compilation), with nothing written
=====  ============================================================================
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal

EXIT_CONFIG = 2
EXIT_DATA = 3
EXIT_CHECKPOINT = 4
EXIT_NONFINITE = 5
EXIT_PEER_LOST = 6


def exit_status_of_signal(signum: int) -> int:
    """The shell's convention: 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + int(signum)


class UserError(Exception):
    """Base class: a problem the user fixes by changing the command, config or environment."""

    exit_code = EXIT_CONFIG


class ConfigError(UserError, ValueError):
    """A config value out of its allowed range, or inconsistent with the devices, the workdir
    or the other processes."""


class DataError(ConfigError):
    """The data: a corpus file or directory, the tokenizer, a ``data.*`` value (a ConfigError
    too, so ``except ConfigError`` still catches it)."""

    exit_code = EXIT_DATA


class WorkdirError(UserError, PermissionError):
    """A directory the run must write to cannot be written (or the workdir is in use)."""


class CheckpointError(UserError):
    """Base of the checkpoint class (exit status 4)."""

    exit_code = EXIT_CHECKPOINT


class CheckpointWriteError(CheckpointError, OSError):
    """A save, or a metrics / TensorBoard write, failed for a reason outside the program (disk
    full, read-only file system, quota); the checkpoints saved before it are intact."""


class CheckpointReadError(CheckpointError, RuntimeError):
    """No checkpoint of the workdir can be read (each one's reason is in the message); nothing
    was moved or deleted."""


class NonFiniteError(UserError, FloatingPointError):
    """Training stopped on non-finite losses or gradients (``config.nonfinite``)."""

    exit_code = EXIT_NONFINITE


class PeerLostError(UserError, RuntimeError):
    """Another process of a multi-process run died, stopped heartbeating or never connected."""

    exit_code = EXIT_PEER_LOST


class Interrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM outside the training loop (data preparation, tokenizer training,
    compilation): raised to unwind, so nothing half-written is kept."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return exit_status_of_signal(self.signum)

    def __str__(self) -> str:
        return signal.Signals(self.signum).name


def exit_code(error: BaseException) -> int:
    """The exit status of an error printed as one line (a missing input file is data)."""
    if isinstance(error, (UserError, Interrupted)):
        return error.exit_code
    if isinstance(error, KeyboardInterrupt):
        return exit_status_of_signal(signal.SIGINT)
    if isinstance(error, FileNotFoundError):
        return EXIT_DATA
    return 1


# --------------------------------------------------------------------- write errors

# A write that fails with these is the environment's fault, not the program's.
ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
# tensorstore (orbax's array writer) reports an OS error only in the text of a ValueError,
# e.g. "RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']".
_OS_ERROR_CODE = re.compile(r"os_error_code\s*=\s*'?(\d+)")


def environment_os_error(error: BaseException) -> OSError | None:
    """The OSError of the environment (disk full, read-only, quota, permission) that
    ``error`` was raised from, whatever layer raised it: an OSError in the chain of causes, or
    an errno named in an exception's text (tensorstore); None for any other error."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS:
            return error
        text = str(error)
        match = _OS_ERROR_CODE.search(text)
        code = int(match.group(1)) if match else None
        if code is None:
            code = next((c for c in ENVIRONMENT_ERRNOS if os.strerror(c) in text), None)
        if code in ENVIRONMENT_ERRNOS:
            return OSError(code, os.strerror(code))
        error = error.__cause__ or error.__context__
    return None


def free_space(path: os.PathLike | str) -> str:
    """The free space of ``path``'s file system (its nearest existing parent), e.g. '1.5 MiB'."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        free = float(shutil.disk_usage(path).free)
    except OSError:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if free < 1024 or unit == "GiB":
            return f"{free:.0f} B" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1024
    return "unknown"


def write_error(path: os.PathLike | str, cause: OSError, then: str) -> CheckpointWriteError:
    """``CheckpointWriteError: PATH: OS ERROR [Errno N] (FREE free); THEN``."""
    return CheckpointWriteError(
        f"{path}: {cause.strerror or cause} [Errno {cause.errno}] ({free_space(path)} free); {then}"
    )
