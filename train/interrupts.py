"""SIGINT (Ctrl-C) and SIGTERM before the training loop: data preparation, token caching,
tokenizer training, building and compiling the steps.

Python's own SIGINT handling loses the signal in two places we run through: a
``KeyboardInterrupt`` raised while Python runs a garbage-collection callback (JAX registers
one) is printed as "Exception ignored in: <function _xla_gc_callback>" and dropped, and one
raised while the tokenizers library encodes a batch disappears without a word; the run then
trained to the end. So :func:`raising` installs a handler that both raises
:class:`~train.errors.Interrupted` (to unwind at once where Python can) and remembers the
signal, and :func:`check` raises it again at the next phase boundary when a library swallowed
it. Unwinding removes what was half-written: the caches are written to a temporary file and
renamed (``train/atomic.py``), which deletes the temporary file on any exception.

With several processes SIGTERM stays with JAX's preemption notifier and SIGINT is forwarded
to it (``train/distributed.py``): all processes then stop together at their first step, after
saving it, instead of one process leaving the others waiting.

The loop (``train/loop.py``) replaces the handler with its own, which finishes the step, saves
and stops; :func:`check` at its start turns a signal swallowed before into Interrupted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

from train.errors import Interrupted

_pending: int | None = None


def pending() -> int | None:
    """The signal received (and not yet acted on) since :func:`raising` started."""
    return _pending


def check() -> None:
    """Raises Interrupted if a signal arrived and was swallowed on its way up."""
    if _pending is not None:
        raise Interrupted(_pending)


def _joined() -> bool:
    """Whether this process has joined a multi-process run (jax.distributed)."""
    try:
        import jax

        return jax.distributed.is_initialized()
    except Exception:  # never raise from a signal handler but on purpose
        return False


def _handle(signum: int, frame) -> None:
    global _pending
    del frame
    if signum == signal.SIGINT and _joined():
        os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption notice: all stop together
        return
    first = _pending is None
    _pending = signum
    if first:  # a second Ctrl-C must not interrupt the cleanup the first one started
        raise Interrupted(signum)


@contextlib.contextmanager
def raising(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Within: ``signals`` raise Interrupted (and are remembered for :func:`check`). A no-op
    outside the main thread (Python delivers signals only there)."""
    global _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _pending = None
    previous = {sig: signal.signal(sig, _handle) for sig in signals}
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _quiet_unraisable(previous_hook)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sys.unraisablehook = previous_hook
        _pending = None


def _quiet_unraisable(previous):
    """Interrupted raised where Python cannot raise (a gc callback, a ``__del__``) is not
    printed ("Exception ignored in ..."): it is remembered, and :func:`check` raises it."""

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, Interrupted):
            return
        previous(unraisable)

    return hook


def clear() -> None:
    """Forgets a pending signal (the loop acts on it itself)."""
    global _pending
    _pending = None
