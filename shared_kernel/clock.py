"""The clock domain code reads instead of calling `datetime.now()`.

The eventsourcing library stamps events through a static `create_timestamp()`, so the
clock travels in a context variable: the command processor sets it per batch, tests
pin it, and domain code stays free of wall-clock reads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

Clock = Callable[[], datetime]


def system_clock() -> datetime:
    return datetime.now(UTC)


_clock: ContextVar[Clock] = ContextVar("clock", default=system_clock)


def now() -> datetime:
    """The current time of the clock in force."""
    return _clock.get()()


@contextmanager
def using_clock(clock: Clock) -> Iterator[None]:
    token = _clock.set(clock)
    try:
        yield
    finally:
        _clock.reset(token)


def fixed_clock(at: datetime) -> Clock:
    return lambda: at
