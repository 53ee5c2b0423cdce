"""Ctrl-C, SIGTERM and SIGHUP as ``KeyboardInterrupt``, held back while a tracking write is under way.

A ``KeyboardInterrupt`` raised in the middle of a database write (MLflow's SQLite store, Optuna's)
can leave that write's transaction open and the database locked: closing the run as KILLED then
waits out SQLite's busy timeout, fails, and the run stays RUNNING. So the handlers the CLI installs
only note a signal that arrives inside ``deferred()`` and raise it when the outermost such block
ends, with the write complete. Training itself is never deferred: a signal there raises at once, and
so does a second signal inside a deferred block (Ctrl-C twice gets out of a write that hangs, e.g.
on an unreachable tracking server).

The state is process-wide, as signal handlers are: Python runs them in the main thread, between
bytecodes of whatever that thread is doing. That may be a ``__del__`` method or a weakref callback,
where Python cannot propagate an exception: it prints "Exception ignored" and goes on, and the run
would finish as if no signal had come. Such a swallowed interrupt is sent to the main thread again.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

_depth = 0  # how many deferred() blocks the main thread is inside
_pending: int | None = None  # a signal that arrived inside one, raised when the outermost ends


class Interrupted(KeyboardInterrupt):
    """The ``KeyboardInterrupt`` a signal raises; ``signum`` says which (the exit status: 128 + it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signal.Signals(signum).name}")
        self.signum = signum


STOPPING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # Ctrl-C, kill, a closed terminal


def install_handlers() -> None:
    """Make SIGINT (Ctrl-C), SIGTERM and SIGHUP (the terminal closed) raise ``KeyboardInterrupt``,
    deferred inside ``deferred()``.

    A terminated process then unwinds like Ctrl-C, so its MLflow run is closed as KILLED. A signal
    the process was started ignoring (a background job's SIGINT, SIGHUP under nohup) stays ignored.
    """
    for signum in STOPPING_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _interrupt)
    if sys.unraisablehook is not _redeliver_swallowed_interrupt:
        global _unraisablehook
        _unraisablehook = sys.unraisablehook
        sys.unraisablehook = _redeliver_swallowed_interrupt


def interrupt_behind(error: BaseException | None) -> KeyboardInterrupt | None:
    """The interrupt that ``error`` is, or was raised while handling (its ``__context__`` chain); None
    if none (or no error). A second Ctrl-C inside a library's cleanup after the first (Optuna failing the trial the
    first one stopped) can surface as that library's own error: the command was still interrupted."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return error
        seen.add(id(error))
        error = error.__context__
    return None


def signal_of(interrupt: KeyboardInterrupt) -> int:
    """The signal behind ``interrupt``: the one ``Interrupted`` records, or SIGINT (Python's own Ctrl-C)."""
    return getattr(interrupt, "signum", signal.SIGINT)


def die_by(signum: int) -> NoReturn:
    """End the process killed by ``signum``, with its default action.

    A shell tells a program that handled Ctrl-C (exit status 130) from one that Ctrl-C killed, and
    goes on with a loop of commands only after the former: so a command that has closed its runs and
    said so ends as Python ends on an uncaught ``KeyboardInterrupt`` (the exit functions then do not
    run: nothing of ours is left to them).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    raise SystemExit(128 + signum)  # only if the signal is blocked


def run_script(main: Callable[[], object]) -> None:
    """The entry point of a script (the benchmarks, whose ``main`` prints like the CLI's commands):
    ``main()`` with the handlers installed, so an interrupt closes what it opened (an MLflow run as
    KILLED) and ends the script as it ends a CLI command: ``Aborted: SIGTERM.``, then ``die_by``."""
    install_handlers()
    try:
        main()
    except BaseException as error:
        interrupt = interrupt_behind(error)
        if interrupt is None:
            raise
        sys.stderr.write(f"Aborted: {signal.Signals(signal_of(interrupt)).name}.\n")
        die_by(signal_of(interrupt))


REDELIVERY_DELAY_SECONDS = 0.05
_unraisablehook = sys.unraisablehook  # the hook that reports every other unraisable exception


def _redeliver_swallowed_interrupt(unraisable: Any) -> None:
    """``sys.unraisablehook``: an ``Interrupted`` raised inside a ``__del__`` or a weakref callback
    was dropped by Python; send its signal to the main thread again, so that it still ends the command."""
    if isinstance(unraisable.exc_value, Interrupted):
        # Later, from another thread: a signal that arrived while this hook still runs would raise in
        # it, and Python drops a hook's exceptions too. Should it land in a finaliser again, this
        # hook sends it once more. pthread_kill wakes the main thread if it waits in a system call.
        resend = threading.Timer(REDELIVERY_DELAY_SECONDS, signal.pthread_kill,
                                 args=(threading.main_thread().ident, unraisable.exc_value.signum))
        resend.daemon = True
        resend.start()
        return
    _unraisablehook(unraisable)


def _interrupt(signum: int, frame: Any) -> None:
    global _pending
    if _depth and _pending is None:
        _pending = signum
        return
    _pending = None  # raised now: no deferred block may raise it again
    raise Interrupted(signum)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block that a signal does not interrupt; one that arrived meanwhile is raised at its end.

    Usable as a decorator too. Without ``install_handlers`` (library use) it changes nothing. The
    interrupt raised at the end replaces an exception the block raised (kept as its ``__context__``):
    either way the run is closed, and as KILLED.
    """
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending is not None:
            signum, _pending = _pending, None
            raise Interrupted(signum)
