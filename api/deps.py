"""Request dependencies: the bus, and the command metadata taken from headers (each
header on its rule in `api.inputs`: an empty or over-long one is a 422 naming it) and
from the caller's credential (actor and tenant: never from a header the client sets)."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request

from api.auth.access import PrincipalDep
from api.errors import RequestProblem
from api.inputs import ETags, HeaderText, TraceParent
from commands.bus import CommandBus
from shared_kernel import tracing

_ETAG = re.compile(r'^(?:W/)?"?(\d{1,18})"?$')


def etag_named(if_none_match: str, etag: str) -> bool:
    """Does an `If-None-Match` header name this ETag (weak or strong, or `*`)?"""
    tags = {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
    return etag in tags or "*" in tags


async def get_bus(request: Request) -> CommandBus:
    bus: CommandBus = request.app.state.bus
    return bus


BusDep = Annotated[CommandBus, Depends(get_bus)]


@dataclass(frozen=True)
class CommandMeta:
    command_id: str
    expected_version: int | None
    actor: str
    tenant: str
    correlation_id: str
    traceparent: str
    keyed: bool = True  # the command id is the client's Idempotency-Key
    respond_async: bool = False  # `Prefer: respond-async`: answer 202 once queued
    request: Request | None = None  # where the outcome is audited from


async def command_meta(
    request: Request,
    principal: PrincipalDep,
    idempotency_key: Annotated[
        HeaderText | None,
        Header(description="Command id: a retry with the same key gets the same answer."),
    ] = None,
    if_match: Annotated[
        ETags | None, Header(description='Expected aggregate version (the ETag, e.g. "3"), or *.')
    ] = None,
    x_correlation_id: Annotated[
        HeaderText | None, Header(description="Correlates the command's events; the command id if absent.")
    ] = None,
    traceparent: Annotated[TraceParent | None, Header(description="W3C trace context.")] = None,
    prefer: Annotated[
        HeaderText | None,
        Header(
            description="`respond-async`: queue the command on the commands topic and answer 202 with "
            "a status URL at once (for bulk submitters); without it the answer waits for the commit."
        ),
    ] = None,
) -> CommandMeta:
    command_id = idempotency_key or str(uuid.uuid4())
    expected: int | None = None
    if if_match is not None and if_match != "*":
        m = _ETAG.match(if_match)
        if m is None:
            raise RequestProblem(
                422,
                "invalid_header",
                'If-Match must be a version, e.g. "3"',
                field="If-Match",
                location="header",
            )
        expected = int(m.group(1))
    return CommandMeta(
        command_id=command_id,
        expected_version=expected,
        actor=principal.subject,
        tenant=principal.tenant,
        correlation_id=x_correlation_id or command_id,
        traceparent=tracing.current_traceparent(traceparent or ""),  # this request's span
        keyed=idempotency_key is not None,
        request=request,
        respond_async=prefer is not None
        and "respond-async" in (p.strip().split("=")[0].lower() for p in prefer.split(",")),
    )


CommandMetaDep = Annotated[CommandMeta, Depends(command_meta)]
