"""Command routes of the incidents context."""

from __future__ import annotations

from uuid import UUID

from fastapi import APIRouter, Response

from api.auth import permissions as p
from api.auth.access import requires
from api.bodies import ERROR_RESPONSES, CommandAccepted
from api.deps import BusDep, CommandMetaDep
from api.dispatch import dispatch, new_aggregate_id
from api.incidents import bodies as s
from commands.incidents import CONTEXT
from commands.incidents import commands as c

router = APIRouter(prefix="/api/v1/incidents", tags=["incidents"], responses=ERROR_RESPONSES)


@router.post("", status_code=201, operation_id="openIncident", dependencies=[requires(p.INCIDENTS_CREATE)])
async def open_incident(
    body: s.OpenIncidentRequest, meta: CommandMetaDep, bus: BusDep, response: Response
) -> CommandAccepted:
    """Open an incident. Its id is derived from the Idempotency-Key unless given."""
    command = c.OpenIncident(
        incident_id=body.id or new_aggregate_id(meta),
        title=body.title,
        description=body.description,
        priority=body.priority,
        source=body.source,
        external_id=body.external_id,
    )
    return await dispatch(bus, CONTEXT, command, meta, response)


@router.post(
    "/{incident_id}/assign", operation_id="assignIncident", dependencies=[requires(p.INCIDENTS_ASSIGN)]
)
async def assign_incident(
    incident_id: UUID, body: s.AssignIncidentRequest, meta: CommandMetaDep, bus: BusDep, response: Response
) -> CommandAccepted:
    return await dispatch(bus, CONTEXT, c.AssignIncident(incident_id, body.assignee), meta, response)


@router.post(
    "/{incident_id}/status", operation_id="changeIncidentStatus", dependencies=[requires(p.INCIDENTS_UPDATE)]
)
async def change_status(
    incident_id: UUID, body: s.ChangeStatusRequest, meta: CommandMetaDep, bus: BusDep, response: Response
) -> CommandAccepted:
    """Move the incident in its life cycle; a refused transition names the allowed ones (409)."""
    command = c.ChangeIncidentStatus(incident_id, body.status, body.reason)
    return await dispatch(bus, CONTEXT, command, meta, response)


@router.post(
    "/{incident_id}/reopen", operation_id="reopenIncident", dependencies=[requires(p.INCIDENTS_UPDATE)]
)
async def reopen_incident(
    incident_id: UUID, body: s.ReopenIncidentRequest, meta: CommandMetaDep, bus: BusDep, response: Response
) -> CommandAccepted:
    """Reopen a closed incident (the only way out of `closed`)."""
    return await dispatch(bus, CONTEXT, c.ReopenIncident(incident_id, body.reason), meta, response)


@router.post(
    "/{incident_id}/comments", operation_id="commentOnIncident", dependencies=[requires(p.INCIDENTS_UPDATE)]
)
async def comment(
    incident_id: UUID, body: s.CommentRequest, meta: CommandMetaDep, bus: BusDep, response: Response
) -> CommandAccepted:
    return await dispatch(
        bus, CONTEXT, c.CommentOnIncident(incident_id, body.author, body.body), meta, response
    )
