"""What a subscriber asks for: filters and a starting position, validated once.

Filters are `context`, `aggregate_id` and `event_type`, each repeatable or
comma-separated; an event is delivered when it matches every filter given. The start
is "now" (the default), "beginning", or a position token: the `id` of any message of
a stream (SSE sends it back as `Last-Event-ID`, which wins over `?from=`), or the
`position` a command returned. A partition the token does not name is read from its
beginning: the token covers none of its records. "Now" is the live feed's position,
which may be a moment behind the log's end; the first message (`subscribed`) says
exactly where the stream starts, and everything after it is delivered.

A position is meaningful for the filters it was issued under: it says that every
matching event before it has been delivered, and nothing about the others.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from api.errors import RequestProblem
from commands import CONTEXTS
from shared_kernel.position import InvalidToken, PositionToken
from shared_kernel.topics import Topics

MAX_VALUES = 1000
NOW = "now"
BEGINNING = "beginning"

_EVENT_TYPES = {name: ctx.name for ctx in CONTEXTS for name in ctx.events}
_SHORT_NAMES: dict[str, list[str]] = {}
for _full in _EVENT_TYPES:
    _SHORT_NAMES.setdefault(_full.partition(".")[2], []).append(_full)


@dataclass(frozen=True)
class StreamSpec:
    """A validated subscription: the contexts to read, the filters, where to start."""

    contexts: tuple[str, ...]
    aggregate_ids: frozenset[str] | None = None
    event_types: frozenset[str] | None = None
    start: PositionToken | None = None  # None: from now on
    tenant: str = ""  # the caller's: no stream shows another tenant's events

    def topics(self, prefix: str) -> tuple[str, ...]:
        t = Topics(prefix)
        return tuple(t.events(c) for c in self.contexts)

    def matches(self, aggregate_id: str, event_type: str, tenant: str) -> bool:
        """Whether an event of one of the spec's topics is wanted (the topic is checked by the caller)."""
        return (
            tenant == self.tenant
            and (self.aggregate_ids is None or aggregate_id in self.aggregate_ids)
            and (self.event_types is None or event_type in self.event_types)
        )

    def describe(self) -> dict[str, Any]:
        return {
            "context": list(self.contexts),
            "aggregate_id": sorted(self.aggregate_ids) if self.aggregate_ids is not None else None,
            "event_type": sorted(self.event_types) if self.event_types is not None else None,
        }


def _problem(field: str, location: str, detail: str) -> RequestProblem:
    return RequestProblem(422, "invalid_filter", detail, field=field, location=location)


def _values(raw: Iterable[str] | None, field: str) -> list[str]:
    out: list[str] = []
    for item in raw or ():
        out += [v.strip() for v in item.split(",") if v.strip()]
    if len(out) > MAX_VALUES:
        raise _problem(field, "query", f"at most {MAX_VALUES} values")
    return list(dict.fromkeys(out))


def _event_type(name: str) -> str:
    if name in _EVENT_TYPES:
        return name
    candidates = _SHORT_NAMES.get(name, [])
    if len(candidates) == 1:
        return candidates[0]
    known = ", ".join(sorted(_EVENT_TYPES))
    if candidates:
        raise _problem("event_type", "query", f"{name!r} is ambiguous: {', '.join(candidates)}")
    raise _problem("event_type", "query", f"unknown event type {name!r}; known: {known}")


def parse_start(prefix: str, from_: str | None, last_event_id: str | None) -> PositionToken | None:
    """The starting position: `Last-Event-ID` (an EventSource reconnecting) over `?from=`."""
    if last_event_id and last_event_id.strip():
        raw, field, location = last_event_id.strip(), "last-event-id", "header"
    elif from_ and from_.strip():
        raw, field, location = from_.strip(), "from", "query"
    else:
        return None
    if raw == NOW:
        return None
    if raw == BEGINNING:
        return PositionToken({})
    try:
        token = PositionToken.decode(raw)
    except InvalidToken as exc:
        raise _problem(field, location, f"{exc}; expected a message id, {NOW!r} or {BEGINNING!r}") from exc
    ours = {Topics(prefix).events(c.name) for c in CONTEXTS}
    strangers = sorted(set(token.offsets) - ours)
    if strangers:
        raise _problem(field, location, f"not a position of these streams (it names {', '.join(strangers)})")
    return token


def parse_spec(
    prefix: str,
    contexts: Iterable[str] | None,
    aggregate_ids: Iterable[str] | None,
    event_types: Iterable[str] | None,
    from_: str | None,
    last_event_id: str | None,
    tenant: str = "",
) -> StreamSpec:
    """Validate the request's filters; every problem is a 422 that names its field."""
    known = [c.name for c in CONTEXTS]
    chosen = _values(contexts, "context")
    for name in chosen:
        if name not in known:
            raise _problem("context", "query", f"unknown context {name!r}; known: {', '.join(known)}")
    types = [_event_type(t) for t in _values(event_types, "event_type")]
    if chosen:
        for t in types:
            if _EVENT_TYPES[t] not in chosen:
                raise _problem("event_type", "query", f"{t} is not an event of {', '.join(chosen)}")
    of_types = {_EVENT_TYPES[t] for t in types}
    selected = [c for c in known if (not chosen or c in chosen) and (not types or c in of_types)]
    ids: list[str] = []
    for value in _values(aggregate_ids, "aggregate_id"):
        try:
            ids.append(str(UUID(value)))
        except ValueError:
            raise _problem("aggregate_id", "query", f"{value!r} is not an aggregate id (a UUID)") from None
    return StreamSpec(
        contexts=tuple(selected),
        aggregate_ids=frozenset(ids) if ids else None,
        event_types=frozenset(types) if types else None,
        start=parse_start(prefix, from_, last_event_id),
        tenant=tenant,
    )
