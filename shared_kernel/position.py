"""Positions in the log and the opaque consistency tokens handed to clients.

A token is a map `topic -> partition -> next offset` (the offset just after the last
record it covers). A read model that has processed a partition up to that offset has
seen every record the token names. Clients treat the token as an opaque string.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import orjson

INT32_MAX = 2**31 - 1  # a Kafka partition number (and PostgreSQL int)
INT64_MAX = 2**63 - 1  # a Kafka offset (and PostgreSQL bigint)
# What a token may hold: far more than this service's topics and partitions, far less
# than what would cost a request noticeable time to decode or to wait for.
MAX_TOKEN_CHARS = 16_384
MAX_TOKEN_TOPICS = 64
MAX_TOKEN_PARTITIONS = 1_024  # over all its topics

_BASE64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")  # Kafka's legal topic names
_PARTITION = re.compile(r"0|[1-9][0-9]{0,9}")


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
        """The token a string encodes; `InvalidToken` unless every partition fits int32,
        every offset int64, and the token the bounds above (never echoing the input)."""
        if len(token) > MAX_TOKEN_CHARS:
            raise InvalidToken(f"a position token has at most {MAX_TOKEN_CHARS} characters")
        if _BASE64URL.fullmatch(token) is None:
            raise InvalidToken("not a position token")
        try:
            raw = orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        except (ValueError, binascii.Error, orjson.JSONDecodeError) as exc:
            raise InvalidToken("not a position token") from exc
        if not isinstance(raw, dict) or not all(isinstance(ps, dict) for ps in raw.values()):
            raise InvalidToken("not a position token")
        if len(raw) > MAX_TOKEN_TOPICS:
            raise InvalidToken(f"a position token names at most {MAX_TOKEN_TOPICS} topics")
        if sum(len(ps) for ps in raw.values()) > MAX_TOKEN_PARTITIONS:
            raise InvalidToken(f"a position token names at most {MAX_TOKEN_PARTITIONS} partitions")
        offsets: dict[str, dict[int, int]] = {}
        for topic, parts in raw.items():
            if _TOPIC.fullmatch(topic) is None:
                raise InvalidToken("not a position token (a topic name is not valid)")
            mine: dict[int, int] = {}
            offsets[topic] = mine
            for partition, offset in parts.items():
                if _PARTITION.fullmatch(partition) is None or int(partition) > INT32_MAX:
                    raise InvalidToken(f"not a position token (partitions are 0 to {INT32_MAX})")
                if type(offset) is not int or not 0 <= offset <= INT64_MAX:
                    raise InvalidToken(f"not a position token (offsets are 0 to {INT64_MAX})")
                mine[int(partition)] = offset
        return cls(offsets)

    def __str__(self) -> str:
        return self.encode()
