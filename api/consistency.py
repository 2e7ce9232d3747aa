"""What the live versions of the projections have committed, as the change
notifications tell it: read-your-writes answers a position token from here with no
query, and a waiting query wakes when its batch commits (`api.readmodels.wait_for`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

from api.changes import ChangeListener, Positions
from projections.changes import Change
from projections.registry import PROJECTIONS
from shared_kernel.position import PositionToken
from shared_kernel.topics import Topics


class CommittedPositions(ChangeListener):
    """Per live projection, the offsets its committed batches reached (a lower bound of
    its positions in PostgreSQL: after a swap it knows nothing of the new version until
    that version commits a batch)."""

    def __init__(self, topic_prefix: str) -> None:
        self.topics = Topics(topic_prefix)
        self.positions: dict[str, dict[tuple[str, int], int]] = {}
        self.connected = False
        self._changed = asyncio.Event()

    def reached(self, projection: str, token: PositionToken) -> bool:
        """Has every batch of `projection` up to the token's positions committed?"""
        known = self.positions.get(projection, {})
        for context in PROJECTIONS[projection].contexts:
            topic = self.topics.events(context)
            for partition, offset in token.offsets.get(topic, {}).items():
                if known.get((topic, partition), 0) < offset:
                    return False
        return True

    def reached_all(self, projections: tuple[str, ...], token: PositionToken) -> bool:
        """Following the changes, and every projection named has committed up to the token."""
        return self.connected and all(self.reached(p, token) for p in projections)

    async def changed(self, seconds: float) -> None:
        """Until the next change is told, or `seconds`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), max(seconds, 0.0))

    def _wake(self) -> None:
        self._changed.set()  # wake the readers waiting for a position
        self._changed = asyncio.Event()

    def following(self, live: Mapping[str, int], positions: Positions) -> None:
        self.positions = {p: dict(at) for p, at in positions.items()}
        self.connected = True
        self._wake()

    def committed(self, change: Change) -> None:
        if change.live is not None:
            self.positions.pop(change.projection, None)
        else:
            known = self.positions.setdefault(change.projection, {})
            for topic, partition, offset in change.positions:
                if known.get((topic, partition), 0) < offset:
                    known[(topic, partition)] = offset
        self._wake()

    def lost(self) -> None:
        self.connected = False
        self._wake()
