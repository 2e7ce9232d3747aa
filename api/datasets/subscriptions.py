"""Subscriptions to one dataset's events, live from Kafka (Server-Sent Events)."""

from __future__ import annotations

from uuid import UUID

from fastapi import APIRouter, Request

from api.auth import permissions as p
from api.auth.access import requires
from api.subscriptions.routes import (
    SSE_RESPONSES,
    EventTypes,
    From,
    LastEventId,
    SubscriptionStream,
    aggregate_stream,
)

router = APIRouter(prefix="/api/v1/datasets", tags=["subscriptions"])


@router.get(
    "/{dataset_id}/stream",
    operation_id="streamDataset",
    dependencies=[requires(p.EVENTS_SUBSCRIBE)],
    responses=SSE_RESPONSES,
)
async def stream_dataset(
    request: Request,
    dataset_id: UUID,
    event_type: EventTypes = None,
    from_: From = None,
    last_event_id: LastEventId = None,
) -> SubscriptionStream:
    """One dataset's events as Server-Sent Events (`from=beginning` for its history first)."""
    return await aggregate_stream(request, "datasets", dataset_id, event_type, from_, last_event_id)
