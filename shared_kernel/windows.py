"""Event-time windows: which windows an instant falls in, and whether a window still
takes an event that arrives when its key's stream time is already further on.

A window is [start, end), aligned to the epoch. Tumbling windows have step = size;
hopping windows overlap (size 24 h, step 1 h: each instant is in 24 of them). A key's
*stream time* is the latest event time seen for it so far; a window takes an event
until the stream time is `lateness` past the window's end, so late and out-of-order
events within the allowed lateness count in the windows they belong to, and later ones
are dropped (and counted as such). Everything here is a pure function of the events in
their order, so a rebuild from the log, or a job replaying it, gets the same windows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from shared_kernel.settings import Settings


@dataclass(frozen=True)
class WindowKind:
    name: str  # tumbling | hopping
    size_ms: int
    step_ms: int

    def containing(self, t_ms: int) -> list[tuple[int, int]]:
        """The (start, end) of every window of this kind that holds the instant, oldest first."""
        start = t_ms - t_ms % self.step_ms
        out = []
        while start + self.size_ms > t_ms:
            out.append((start, start + self.size_ms))
            start -= self.step_ms
        out.reverse()
        return out

    def current(self, t_ms: int) -> tuple[int, int]:
        """The window of `t_ms` that ends first after it: the latest `size` of history."""
        end = t_ms - t_ms % self.step_ms + self.step_ms
        return end - self.size_ms, end


def kinds(settings: Settings) -> tuple[WindowKind, WindowKind]:
    """(tumbling, hopping) as configured."""
    tumbling = settings.quality_window_tumbling_s * 1000
    return (
        WindowKind("tumbling", tumbling, tumbling),
        WindowKind("hopping", settings.quality_window_hopping_s * 1000, settings.quality_window_hop_s * 1000),
    )


def takes(window_end_ms: int, stream_time_ms: int, lateness_ms: int) -> bool:
    """Does a window still take an event, given its key's stream time?"""
    return window_end_ms + lateness_ms > stream_time_ms


def to_ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)
