"""What the terminal shows for ``python -m train`` / ``python -m train.finetune``: the trainer's
own lines, the progress bar, the final summary and warnings; the libraries' INFO records
(orbax, absl, jax) go to a log file in the workdir instead.

``config.log_level`` ('warning', the default) is the level at which the libraries' records
reach the terminal: 'info' or 'debug' shows them there too (and 'debug' adds DEBUG records to
the file). The trainer's own INFO lines and every WARNING and above are shown at any level
but 'error', which keeps only errors of the libraries (the trainer's own lines stay).

The log file is ``WORKDIR/train.log`` (process 0; process ``i > 0`` of a multi-process run
writes ``WORKDIR/train.process{i}.log``), appended to by every run in that workdir. Records
logged before the workdir is locked (data preparation, compilation) are held in memory and
written when the file opens. Only the command line sets this up; a program called as a
library (tests, notebooks) keeps the caller's logging.
"""

from __future__ import annotations

import logging
import os
import pathlib
import sys
from typing import IO, Any

from train.errors import ConfigError

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
# Records held in memory until the log file opens (a run that stops before that keeps the
# newest ones on the console only when they pass the console's level).
_MAX_PENDING = 20_000
# The train package's directory as imported and resolved (a record's pathname is the code's
# file name as imported, which may go through a symlink).
_OURS = tuple(
    {
        str(pathlib.Path(__file__).parent) + os.sep,
        str(pathlib.Path(__file__).resolve().parent) + os.sep,
    }
)


def check_level(config: Any) -> int:
    """The logging level of ``config.log_level``; a one-line ConfigError naming the key."""
    value = config.log_level
    if value not in LEVELS:
        raise ConfigError(f"config.log_level={value!r}: must be one of {tuple(LEVELS)}")
    return LEVELS[value]


def log_file_name(process_index: int, process_count: int) -> str:
    """``train.log`` (process 0, or the only process), ``train.process{i}.log`` for the others."""
    del process_count  # process 0 keeps the short name with several processes too
    return "train.log" if process_index == 0 else f"train.process{process_index}.log"


def _ours(record: logging.LogRecord) -> bool:
    return record.pathname.startswith(_OURS)  # str.startswith takes a tuple


class _ConsoleFilter(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if _ours(record):
            return record.levelno >= logging.INFO
        return record.levelno >= self.level


class _ConsoleFormatter(logging.Formatter):
    """Our lines as they are ("warning: ..." above INFO); the libraries' with absl's prefix
    (level, time, file:line) so a shown record says where it comes from."""

    def __init__(self) -> None:
        super().__init__()
        from absl import logging as absl_logging

        self._library = absl_logging.PythonFormatter()

    def format(self, record: logging.LogRecord) -> str:
        if not _ours(record):
            return self._library.format(record)
        message = record.getMessage()
        if record.levelno > logging.INFO:
            message = f"{record.levelname.lower()}: {message}"
        return message


class _ConsoleHandler(logging.StreamHandler):
    """Writes through ``tqdm.write`` so a line logged mid-run does not split the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # logging must never raise into the program
            self.handleError(record)


class _Pending(logging.Handler):
    """Keeps records until the log file opens (the workdir is known and locked by then)."""

    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < _MAX_PENDING:
            self.records.append(record)


class Console:
    """The command line's logging: a console handler and the log file (pending until
    :meth:`open_log_file`). :meth:`close` restores the root logger as it was."""

    def __init__(self, level: int, stream: IO[str] | None = None) -> None:
        from absl import logging as absl_logging

        self.file_level = min(level, logging.INFO)
        self.root = logging.getLogger()
        self._saved = (self.root.level, list(self.root.handlers))
        self.console = _ConsoleHandler(sys.stderr if stream is None else stream)
        self.console.addFilter(_ConsoleFilter(level))
        self.console.setFormatter(_ConsoleFormatter())
        self.pending: _Pending | None = _Pending(self.file_level)
        self.file: logging.FileHandler | None = None
        # absl's handler (installed by app.run) would print every record on stderr.
        self.root.removeHandler(absl_logging.get_absl_handler())
        # absl's own scale (INFO = 0), by name; it sets the root logger's level too.
        absl_logging.set_verbosity("debug" if self.file_level <= logging.DEBUG else "info")
        self.root.setLevel(self.file_level)
        self.root.addHandler(self.console)
        self.root.addHandler(self.pending)

    def open_log_file(self, workdir: pathlib.Path, process_index: int, process_count: int):
        """Opens ``workdir``'s log file for this process and writes the held records to it."""
        if self.file is not None or self.pending is None:
            return
        from absl import logging as absl_logging

        path = pathlib.Path(workdir) / log_file_name(process_index, process_count)
        self.file = logging.FileHandler(path, mode="a", encoding="utf-8")
        self.file.setLevel(self.file_level)
        self.file.setFormatter(absl_logging.PythonFormatter())
        for record in self.pending.records:
            self.file.handle(record)
        self.root.removeHandler(self.pending)
        self.pending = None
        self.root.addHandler(self.file)

    def close(self) -> None:
        for handler in (self.console, self.pending, self.file):
            if handler is not None:
                self.root.removeHandler(handler)
                handler.close()
        self.pending = self.file = None
        level, handlers = self._saved
        self.root.setLevel(level)
        for handler in handlers:
            if handler not in self.root.handlers:
                self.root.addHandler(handler)


_active: Console | None = None


def setup(config: Any, stream: IO[str] | None = None) -> Console:
    """Installs the command line's console for ``config.log_level`` (replacing an active one)."""
    global _active
    level = check_level(config)
    if _active is not None:
        _active.close()
    _active = Console(level, stream)
    return _active


def open_log_file(workdir: pathlib.Path, process_index: int, process_count: int) -> None:
    """Called by the loop once it holds the workdir: the log file opens there (a no-op unless
    the command line set the console up)."""
    if _active is not None:
        _active.open_log_file(workdir, process_index, process_count)


def close() -> None:
    global _active
    if _active is not None:
        _active.close()
        _active = None


def number(value: float | None) -> str:
    """A loss or accuracy in a summary line: 4 decimals, ``none`` when there is none."""
    return "none" if value is None else f"{value:.4f}"
