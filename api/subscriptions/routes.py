"""Subscription endpoints: Server-Sent Events and WebSocket, both served by the live feed.

Each connection runs one loop: take the next messages from its subscriber's mailbox
(or, after `subscription_heartbeat_s` with none, a heartbeat carrying its position),
send them, remember the last id sent. A `subscribed` message comes first with the
starting position, so a client that resumes right away has a position even before any
event. The subscriber is registered before the response starts: a client that has
seen the response headers (or the WebSocket accepted) gets every event committed after.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Annotated, Any
from uuid import UUID

import anyio
from fastapi import APIRouter, Header, Query, Request, WebSocket
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocketDisconnect

from api.auth import permissions as p
from api.auth.access import principal_of, requires
from api.errors import RequestProblem, _body
from api.inputs import FilterValues, TokenHeader, TokenText
from api.subscriptions.feed import FeedUnavailable, LiveFeed
from api.subscriptions.messages import Message
from api.subscriptions.spec import BEGINNING, MAX_VALUES, NOW, StreamSpec, parse_spec
from api.subscriptions.subscriber import Ended, Failure, Subscriber
from shared_kernel import metrics, tracing
from shared_kernel.settings import Settings

router = APIRouter(tags=["subscriptions"])

SHUTDOWN_GRACE_S = 1.0
WS_TRY_AGAIN_LATER = 1013

Contexts = Annotated[
    list[FilterValues] | None,
    Query(
        max_length=MAX_VALUES,
        description="Contexts to follow (repeat, or separate with commas); all by default.",
    ),
]
AggregateIds = Annotated[
    list[FilterValues] | None,
    Query(max_length=MAX_VALUES, description="Only the events of these aggregates."),
]
EventTypes = Annotated[
    list[FilterValues] | None,
    Query(
        max_length=MAX_VALUES,
        description="Only these event types: `incidents.IncidentOpened`, or `IncidentOpened`.",
    ),
]
From = Annotated[
    TokenText | None,
    Query(
        alias="from",
        description=f"Where to start: `{NOW}` (default), `{BEGINNING}`, or the `id` of a message "
        "(or a command's `position`): exactly the events after it.",
    ),
]
LastEventId = Annotated[
    TokenHeader | None, Header(description="Set by EventSource when it reconnects; wins over `from`.")
]

SSE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "An endless `text/event-stream`: `subscribed`, then events (no `event:` line), "
        "`heartbeat`s, and an `error` before the server drops a client that fell behind.",
        "content": {"text/event-stream": {}},
    },
    422: {"description": "Unknown filter value, malformed position or header; names the field."},
    503: {"description": "The event log is unreachable; retry after `Retry-After`."},
}


def _first(sub: Subscriber) -> Message:
    return Message.control(
        "subscribed",
        sub.position(),
        filters=sub.spec.describe(),
        buffer=sub.capacity,
        heartbeat_s=sub.feed.settings.subscription_heartbeat_s,
    )


def _error(sub: Subscriber, end: Ended) -> Message:
    assert end.failure is not None
    return Message.control("error", sub.delivered, error=end.failure.code, detail=end.failure.detail)


class SubscriptionStream(EventSourceResponse):
    """An SSE response that owns one subscriber: unsubscribed however the response ends,
    closed when the server shuts down (the stream ends; EventSource reconnects with
    `Last-Event-ID`)."""

    def __init__(self, feed: LiveFeed, sub: Subscriber) -> None:
        self.feed, self.sub = feed, sub
        # the position as of the subscription, taken before anything reaches the mailbox:
        # taken when the response starts, it could already be past events that wait there
        self.first = _first(sub)
        self.expiry: asyncio.TimerHandle | None = None
        self.shutdown = anyio.Event()
        settings = feed.settings
        super().__init__(
            self._frames(settings),
            ping=0,  # our heartbeats carry the position
            sep="\n",
            send_timeout=settings.subscription_send_timeout_s,
            shutdown_event=self.shutdown,
            shutdown_grace_period=SHUTDOWN_GRACE_S,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.create_task(self._close_on_shutdown())
        metrics.SUBSCRIPTION_CLIENTS.labels("sse").inc()
        try:
            await super().__call__(scope, receive, send)
        finally:
            metrics.SUBSCRIPTION_CLIENTS.labels("sse").dec()
            if self.sub.failure is not None and self.sub.failure.code == "slow_consumer":
                metrics.SUBSCRIPTION_DROPS.labels("sse").inc()
            watcher.cancel()
            if self.expiry is not None:
                self.expiry.cancel()
            self.feed.unsubscribe(self.sub)

    async def _close_on_shutdown(self) -> None:
        await self.shutdown.wait()
        self.sub.close()

    async def _frames(self, settings: Settings) -> Any:
        sub = self.sub
        first = self.first
        yield first.sse
        sub.acknowledge(first)
        while True:
            try:
                batch = await sub.next(settings.subscription_heartbeat_s)
            except Ended as end:
                if end.failure is not None:
                    yield _error(sub, end).sse
                return
            if not batch:
                beat = Message.control("heartbeat", sub.position())
                yield beat.sse
                sub.acknowledge(beat)
                continue
            started = time.time_ns()
            yield b"".join(m.sse for m in batch)
            sub.acknowledge(batch[-1], len(batch))
            _delivered("sse", batch, started)


def _delivered(transport: str, messages: list[Message], started_ns: int) -> None:
    """The delivery, a span in the trace of each event it carried."""
    traceparents = [m.traceparent for m in messages if m.traceparent]
    if traceparents:
        tracing.in_each_trace(
            f"subscription {transport} delivered",
            traceparents,
            started_ns,
            time.time_ns(),
            **{"cqrs.transport": transport},
        )


def _spec(request: Request | WebSocket, **filters: Any) -> StreamSpec:
    settings: Settings = request.app.state.settings
    return parse_spec(settings.topic_prefix, **filters, tenant=principal_of(request).tenant)


async def _stream(request: Request, spec: StreamSpec) -> SubscriptionStream:
    feed: LiveFeed = request.app.state.feed
    stream = SubscriptionStream(feed, await feed.subscribe(spec))
    stream.expiry = ends_with_credential(request, stream.sub)
    return stream


EXPIRED = Failure("credential_expired", "the credential of this stream expired: reconnect with a new one")


def ends_with_credential(connection: Request | WebSocket, sub: Subscriber) -> asyncio.TimerHandle | None:
    """End `sub` with an `error` message when the caller's credential expires."""
    expires_at = principal_of(connection).expires_at
    if expires_at is None:
        return None
    loop = asyncio.get_running_loop()
    return loop.call_later(max(0.0, expires_at - time.time()), sub.fail, EXPIRED)


@router.get(
    "/api/v1/events/stream",
    operation_id="streamEvents",
    dependencies=[requires(p.EVENTS_SUBSCRIBE)],
    responses=SSE_RESPONSES,
)
async def stream_events(
    request: Request,
    context: Contexts = None,
    aggregate_id: AggregateIds = None,
    event_type: EventTypes = None,
    from_: From = None,
    last_event_id: LastEventId = None,
) -> SubscriptionStream:
    """Every event (or those matching the filters) as Server-Sent Events, live from Kafka."""
    spec = _spec(
        request,
        contexts=context,
        aggregate_ids=aggregate_id,
        event_types=event_type,
        from_=from_,
        last_event_id=last_event_id,
    )
    return await _stream(request, spec)


async def aggregate_stream(
    request: Request,
    context: str,
    aggregate_id: UUID,
    event_type: list[str] | None,
    from_: str | None,
    last_event_id: str | None,
) -> SubscriptionStream:
    """One aggregate's events as Server-Sent Events: what each context's stream route
    (`/api/v1/<context>/{id}/stream`) answers."""
    spec = _spec(
        request,
        contexts=[context],
        aggregate_ids=[str(aggregate_id)],
        event_types=event_type,
        from_=from_,
        last_event_id=last_event_id,
    )
    return await _stream(request, spec)


@router.websocket("/ws/v1/events", dependencies=[requires(p.EVENTS_SUBSCRIBE)])
async def events_socket(
    websocket: WebSocket,
    context: Contexts = None,
    aggregate_id: AggregateIds = None,
    event_type: EventTypes = None,
    from_: From = None,
) -> None:
    """The same stream over a WebSocket: one JSON text frame per message. Refused with an
    HTTP answer (422, 503) like the SSE endpoint when the request cannot be served."""
    feed: LiveFeed = websocket.app.state.feed
    try:
        spec = _spec(
            websocket,
            contexts=context,
            aggregate_ids=aggregate_id,
            event_types=event_type,
            from_=from_,
            last_event_id=None,
        )
        sub = await feed.subscribe(spec)
        first = _first(sub)  # as of the subscription (see SubscriptionStream)
        expiry = ends_with_credential(websocket, sub)
    except RequestProblem as problem:
        await _deny(websocket, JSONResponse(_body(problem), status_code=problem.status), problem.detail)
        return
    except FeedUnavailable as exc:
        await _deny(websocket, unavailable(feed.settings, exc), str(exc))
        return
    metrics.SUBSCRIPTION_CLIENTS.labels("websocket").inc()
    try:
        await websocket.accept()
        receiver = asyncio.create_task(_until_disconnect(websocket, sub))
        try:
            await _pump(websocket, sub, first)
        finally:
            receiver.cancel()
    finally:
        metrics.SUBSCRIPTION_CLIENTS.labels("websocket").dec()
        if sub.failure is not None and sub.failure.code == "slow_consumer":
            metrics.SUBSCRIPTION_DROPS.labels("websocket").inc()
        if expiry is not None:
            expiry.cancel()
        feed.unsubscribe(sub)


async def _pump(websocket: WebSocket, sub: Subscriber, first: Message) -> None:
    settings = sub.feed.settings

    async def emit(messages: list[Message]) -> None:
        started = time.time_ns()
        async with asyncio.timeout(settings.subscription_send_timeout_s):
            for m in messages:
                await websocket.send({"type": "websocket.send", "text": m.text})
        _delivered("websocket", messages, started)

    try:
        await emit([first])
        sub.acknowledge(first)
        while True:
            try:
                batch = await sub.next(settings.subscription_heartbeat_s)
            except Ended as end:
                if end.failure is not None:
                    await emit([_error(sub, end)])
                    await websocket.close(WS_TRY_AGAIN_LATER, end.failure.code)
                return
            if not batch:
                beat = Message.control("heartbeat", sub.position())
                await emit([beat])
                sub.acknowledge(beat)
                continue
            await emit(batch)
            sub.acknowledge(batch[-1], len(batch))
    except (WebSocketDisconnect, TimeoutError, RuntimeError):
        return  # gone, or accepting nothing for too long


async def _until_disconnect(websocket: WebSocket, sub: Subscriber) -> None:
    """Messages from the client are ignored; its going away (or the server's shutdown,
    which uvicorn reports the same way) ends the subscription."""
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
    sub.close()


async def _deny(websocket: WebSocket, response: JSONResponse, reason: str) -> None:
    try:
        await websocket.send_denial_response(response)
    except RuntimeError:  # the server cannot answer a handshake with HTTP
        await websocket.close(1008 if response.status_code == 422 else WS_TRY_AGAIN_LATER, reason[:120])


def unavailable(settings: Settings, exc: Exception) -> JSONResponse:
    return JSONResponse(
        {"error": "unavailable", "detail": str(exc)},
        status_code=503,
        headers={"Retry-After": str(settings.retry_after_s)},
    )
