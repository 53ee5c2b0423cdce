"""Ctrl-C and SIGTERM as ``KeyboardInterrupt``, held back while a tracking write is under way.

A ``KeyboardInterrupt`` raised in the middle of a database write (MLflow's SQLite store, Optuna's)
can leave that write's transaction open and the database locked: closing the run as KILLED then
waits out SQLite's busy timeout, fails, and the run stays RUNNING. So the handlers the CLI installs
only note a signal that arrives inside ``deferred()`` and raise it when the outermost such block
ends, with the write complete. Training itself is never deferred: a signal there raises at once.

The state is process-wide, as signal handlers are: Python runs them in the main thread, between
bytecodes of whatever that thread is doing.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any

_depth = 0  # how many deferred() blocks the main thread is inside
_pending: int | None = None  # a signal that arrived inside one, raised when the outermost ends


def install_handlers() -> None:
    """Make SIGINT (Ctrl-C) and SIGTERM raise ``KeyboardInterrupt``, deferred inside ``deferred()``.

    A terminated process then unwinds like Ctrl-C, so its MLflow run is closed as KILLED.
    """
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)


def _interrupt(signum: int, frame: Any) -> None:
    global _pending
    if _depth:
        _pending = signum
        return
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block that a signal does not interrupt; one that arrived meanwhile is raised at its end.

    Usable as a decorator too. Without ``install_handlers`` (library use) it changes nothing.
    """
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending is not None:
            signum, _pending = _pending, None
            raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")
