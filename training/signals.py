"""SIGTERM taken as Ctrl-C by the command-line scripts (train.py, the benchmarks): `kill`, `timeout` and a
scheduler's preemption stop a run where it is, with the same report of what it kept as an interrupt, instead of
ending the process at once without a word."""

from __future__ import annotations

import contextlib
import signal


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is, as Ctrl-C raises KeyboardInterrupt (exit status 143 where the script
    reports it)."""


def raise_terminated(signum, frame) -> None:
    """The SIGTERM handler: raise Terminated. Once: a second SIGTERM ends the process at once (a first one arriving
    inside a C++ call that does not return is taken only when it returns)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated()


@contextlib.contextmanager
def signals_ignored():
    """SIGINT and SIGTERM ignored while a stop is reported (a second Ctrl-C must not interrupt the report of the
    first with a traceback), then as they were."""
    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, signal.SIG_IGN)
    except ValueError:  # not the main thread: signals go to the main thread anyway
        pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
