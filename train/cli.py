"""What the command-line entry points (``python -m train``, ``python -m train.finetune``) share:
list-valued config keys on the command line, and one-line messages for the user's errors."""

from __future__ import annotations

import ast
import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

from absl import flags
from ml_collections import config_flags

from train.errors import ConfigError, UserError


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
            f"({' '.join(str(e).split())})"
        ) from e
    return config


# Errors of the user's making: printed as one line. A missing input file is one too.
ONE_LINE_ERRORS = (UserError, FileNotFoundError)


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Prints a user error as ``error: MESSAGE`` on stderr and exits with status 2; any other
    exception (a bug) keeps its traceback."""
    try:
        yield
    except ONE_LINE_ERRORS as e:
        message = " ".join(str(e).split())
        print(f"error: {type(e).__name__}: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


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
    prints ``summary(result)``; user errors print one line (exit status 2).
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
        with one_line_errors():
            config = loaded_config(flags.FLAGS)
            console.setup(config)
            result = program(config, flags.FLAGS.workdir)
        print(summary(result))

    app.run(main)
