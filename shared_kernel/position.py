"""Positions in the log and the opaque consistency tokens handed to clients.

A token is a map `topic -> partition -> next offset` (the offset just after the last
record it covers). A read model that has processed a partition up to that offset has
seen every record the token names. Clients treat the token as an opaque string.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import orjson


class InvalidToken(ValueError):
    """The string is not a token this service issued."""


@dataclass(frozen=True, slots=True, order=True)
class Position:
    """Where one record sits: (topic, partition, offset)."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True)
class PositionToken:
    """The records up to (excluding) `offsets[topic][partition]` for each partition named."""

    offsets: Mapping[str, Mapping[int, int]]

    @classmethod
    def after(cls, positions: Iterable[Position]) -> PositionToken:
        offsets: dict[str, dict[int, int]] = {}
        for p in positions:
            by_partition = offsets.setdefault(p.topic, {})
            by_partition[p.partition] = max(by_partition.get(p.partition, 0), p.offset + 1)
        return cls(offsets)

    def merge(self, other: PositionToken) -> PositionToken:
        merged: dict[str, dict[int, int]] = {t: dict(ps) for t, ps in self.offsets.items()}
        for topic, parts in other.offsets.items():
            mine = merged.setdefault(topic, {})
            for partition, offset in parts.items():
                mine[partition] = max(mine.get(partition, 0), offset)
        return PositionToken(merged)

    def encode(self) -> str:
        body = {t: {str(p): o for p, o in sorted(ps.items())} for t, ps in sorted(self.offsets.items())}
        return base64.urlsafe_b64encode(orjson.dumps(body)).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> PositionToken:
        try:
            raw = orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
            offsets = {str(t): {int(p): int(o) for p, o in ps.items()} for t, ps in raw.items()}
        except (ValueError, TypeError, AttributeError, binascii.Error, orjson.JSONDecodeError) as exc:
            raise InvalidToken("not a position token") from exc
        if any(o < 0 or p < 0 for ps in offsets.values() for p, o in ps.items()):
            raise InvalidToken("not a position token")
        return cls(offsets)

    def __str__(self) -> str:
        return self.encode()
