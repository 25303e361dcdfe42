"""What the command-line entry points (``python -m train``, ``python -m train.finetune``) share:
list-valued config keys on the command line, one-line messages for the user's errors with the
exit status of their class (train/errors.py), SIGINT / SIGTERM before the loop
(train/interrupts.py), and the watcher of a multi-process run (train/supervise.py)."""

from __future__ import annotations

import ast
import contextlib
import logging
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any

from absl import flags
from ml_collections import config_flags

from train import errors, interrupts, supervise
from train.errors import ConfigError, Interrupted, UserError


class ListParser(flags.ArgumentParser):
    """``--config.data.paths=a.txt,b.jsonl`` (comma-separated) or a Python list literal
    ``--config.data.paths='["a.txt", "b,c.txt"]'``; an empty string gives ``[]``."""

    def parse(self, argument):
        if isinstance(argument, list):
            return argument
        text = str(argument).strip()
        if text.startswith("["):
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError) as e:
                raise ValueError(f"not a list literal: {text!r} ({e})") from e
            if not isinstance(value, list):
                raise ValueError(f"not a list: {text!r}")
            return value
        return [part.strip() for part in text.split(",") if part.strip()]

    def flag_type(self):
        return "list"


def register_list_parser() -> None:
    """Lets ml_collections override list-valued keys (it refuses them otherwise)."""
    config_flags.register_flag_parser_for_type(list, ListParser())


def loaded_config(flag_values: flags.FlagValues, name: str = "config"):
    """The config of ``--config``; a file that cannot be loaded is a one-line ConfigError."""
    try:
        config = flag_values[name].value
        config.keys()  # the config flag raises on first use when the file failed to load
    except OSError as e:
        raise ConfigError(
            f"--{name}={flag_values[name].config_filename}: cannot load the config file "
            f"({_load_error(e)})"
        ) from e
    return config


# Errors of the user's making: printed as one line. A missing input file is one too.
ONE_LINE_ERRORS = (UserError, FileNotFoundError)


def _print_error(name: str, message: str) -> None:
    message = " ".join(str(message).split())
    with contextlib.suppress(Exception):  # a progress bar left open: end its line first
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
    print(f"error: {name}: {message}", file=sys.stderr, flush=True)


def _load_error(error: OSError) -> str:
    """ml_collections' load failure, down to the OS error when there is one."""
    text = " ".join(str(error).split())
    match = re.search(r"\[Errno \d+\].*", text)
    return match.group(0) if match else text


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Prints a user error as ``error: CLASS: MESSAGE`` on stderr and exits with its class's
    status (train/errors.py); SIGINT / SIGTERM that stopped the run before its loop: one line,
    status 130 / 143. Any other exception (a bug) keeps its traceback."""
    try:
        yield
    except ONE_LINE_ERRORS as e:
        _print_error(type(e).__name__, str(e))
        sys.exit(errors.exit_code(e))
    except KeyboardInterrupt as e:  # Interrupted, or a Ctrl-C before its handler was installed
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        _print_error(
            "Interrupted",
            f"{signal.Signals(signum).name} before training started (data preparation, "
            "tokenizer training or compilation): nothing was saved and no partial cache file "
            "kept; rerun the same command to start",
        )
        # Unwinding removed what was half-written and released the lock. A compile (or a
        # tokenizer) may still run in another thread: interpreter shutdown would end it with
        # pthread_exit through C++ frames ("FATAL: exception not rethrown", SIGABRT), so the
        # process ends here, after flushing the log file and the streams.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(errors.exit_status_of_signal(signum))


def _closed_loop(error: BaseException | None) -> bool:
    """asyncio's "Event loop is closed", raised in callbacks tensorstore still delivers to the
    loop of an orbax save that failed (dozens of tracebacks after a full disk's one line)."""
    return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def _quiet_closed_loop_errors() -> None:
    excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

    def quiet_excepthook(kind, value, traceback) -> None:
        if not _closed_loop(value):
            excepthook(kind, value, traceback)

    def quiet_unraisablehook(unraisable) -> None:
        if not _closed_loop(unraisable.exc_value):
            unraisablehook(unraisable)

    sys.excepthook, sys.unraisablehook = quiet_excepthook, quiet_unraisablehook


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a config file that cannot be loaded as one line (with
    ``--config.x=`` overrides, ml_collections fails while parsing them, before ``main``)."""
    from absl import app

    try:
        return app.parse_flags_with_usage(argv)
    except OSError as e:
        filename = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
        name = f"--config={filename}: " if filename else ""
        _print_error("ConfigError", f"{name}cannot load the config file ({_load_error(e)})")
        sys.exit(errors.EXIT_CONFIG)


def _stop_signals(config: Any) -> tuple[int, ...]:
    """The signals that raise before the loop: with several processes SIGTERM is JAX's
    preemption notice (it makes all of them stop together at the first step)."""
    if config.distributed:
        return (signal.SIGINT,)
    return (signal.SIGINT, signal.SIGTERM)


def run_program(
    program: Callable[[Any, str], dict[str, Any]],
    summary: Callable[[dict[str, Any]], str],
    *,
    config_help: str,
    workdir_help: str,
) -> None:
    """The command line of a program: ``--config FILE --workdir DIR [--config.x.y=value ...]``.

    Runs ``program(config, workdir)`` with the XLA defaults and the quiet console of
    ``config.log_level`` (train/console.py: library INFO records go to WORKDIR/train.log),
    prints ``summary(result)``; user errors print one line and exit with their class's status
    (train/errors.py); a run the loop stopped on SIGINT / SIGTERM exits with 130 / 143.
    """
    from absl import app

    from train import console, xla_flags

    register_list_parser()
    config_flags.DEFINE_config_file("config", None, config_help, lock_config=True)
    flags.DEFINE_string("workdir", None, workdir_help)
    flags.mark_flags_as_required(["config", "workdir"])

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        xla_flags.apply_defaults()  # before the first device is touched
        _quiet_closed_loop_errors()
        # A log file on a full disk must not print a traceback per record ("--- Logging error
        # ---"): the write error that matters is reported as one line.
        logging.raiseExceptions = False
        with one_line_errors():
            config = loaded_config(flags.FLAGS)
            if config.distributed and not supervise.is_child():
                # The watcher: runs this command as its child, says why JAX ended it.
                sys.exit(supervise.run(config, flags.FLAGS.workdir))
            if supervise.is_child():
                supervise.die_with_parent()
            console.setup(config)
            with interrupts.raising(_stop_signals(config)):
                result = program(config, flags.FLAGS.workdir)
        print(summary(result))
        if result.get("signal"):  # the loop saved the step and stopped on SIGINT / SIGTERM
            sys.exit(errors.exit_status_of_signal(result["signal"]))

    app.run(main, flags_parser=_parse_flags)
