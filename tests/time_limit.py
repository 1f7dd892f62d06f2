"""A wall-clock limit for code that must end (a loop that could spin forever fails the test instead)."""

from __future__ import annotations

import contextlib
import signal


class TookTooLong(AssertionError):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise `TookTooLong` in the main thread after ``seconds`` (SIGALRM; pytest runs tests in the main thread)."""

    def stop(signum, frame):
        raise TookTooLong(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
