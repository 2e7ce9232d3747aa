"""Send a command through the bus and turn its result into the HTTP answer.

A command too large for a Kafka record is a 413 (`too_large`), answered before anything
is produced; so is one whose events or snapshot would be (the processor's rejection, see
commands.batch). Neither is an outage: no Retry-After, a retry gets the same answer.
"""

from __future__ import annotations

import hashlib
from typing import Any
from uuid import UUID, uuid5

import orjson
from fastapi import Response

from api.bodies import CommandAccepted
from api.deps import CommandMeta
from api.errors import CommandRejected, Queued, RequestProblem
from commands.bus import BusUnavailable, CommandBus, CommandTooLarge, ResultTimeout
from commands.context import BoundedContext, command_payload
from shared_kernel.audit import STATUS_OF_CODE
from shared_kernel.envelope import CommandEnvelope

NEW_AGGREGATE_NAMESPACE = UUID("0b5e6f8e-9d3c-4f7a-8e21-5c4d3b2a1f00")


def new_aggregate_id(meta: CommandMeta) -> UUID:
    """Ids of new aggregates derive from the command id: a retried create targets the same one."""
    return uuid5(NEW_AGGREGATE_NAMESPACE, f"{meta.tenant}/{meta.command_id}")


async def dispatch(
    bus: CommandBus, context: BoundedContext, command: Any, meta: CommandMeta, response: Response
) -> CommandAccepted:
    command_type = context.command_type(command)
    payload = command_payload(command)
    aggregate_id = str(context.handler(command_type).aggregate_id(command))
    fingerprint = hashlib.sha256(
        orjson.dumps([command_type, payload, meta.expected_version], option=orjson.OPT_SORT_KEYS)
    ).hexdigest()[:32]
    envelope = CommandEnvelope(
        command_id=meta.command_id,
        command_type=command_type,
        aggregate_id=aggregate_id,
        payload=payload,
        expected_version=meta.expected_version,
        actor=meta.actor,
        tenant=meta.tenant,
        correlation_id=meta.correlation_id,
        traceparent=meta.traceparent,
        fingerprint=fingerprint,
        retriable=meta.keyed or meta.respond_async,  # an asynchronous one has a status URL
    )
    try:
        if meta.respond_async:
            await bus.enqueue(envelope)
            audit(meta, envelope, "queued", 202)
            raise Queued(envelope)
        result = await bus.send(envelope)
    except CommandTooLarge as exc:
        audit(meta, envelope, "rejected", 413, "too_large")
        raise RequestProblem(413, "too_large", str(exc), max_bytes=exc.limit, bytes=exc.size) from exc
    except (BusUnavailable, ResultTimeout) as exc:
        audit(meta, envelope, "failed", 503, repr(exc))
        raise
    if result.fingerprint and result.fingerprint != fingerprint:
        audit(meta, envelope, "rejected", 422, "idempotency_key_reused")
        raise RequestProblem(
            422,
            "idempotency_key_reused",
            "this Idempotency-Key was already used for a different request",
            field="Idempotency-Key",
            location="header",
        )
    if not result.accepted:
        audit(
            meta,
            envelope,
            "rejected",
            STATUS_OF_CODE.get(result.code, 409),
            f"{result.code}: {result.reason}",
        )
        raise CommandRejected(result)
    audit(meta, envelope, "accepted", 200)
    if result.version is not None:
        response.headers["ETag"] = f'"{result.version}"'
    response.headers["X-Consistency-Token"] = result.position
    return CommandAccepted(id=result.aggregate_id, version=result.version, position=result.position)


def audit(meta: CommandMeta, envelope: CommandEnvelope, outcome: str, status: int, reason: str = "") -> None:
    """The command's outcome on the audit topic (api.auth.audit), with its caller."""
    request = meta.request
    if request is None:
        return
    identity = getattr(request.app.state, "identity", None)
    if identity is None:
        return
    route = request.scope.get("route")
    if outcome == "accepted":
        status = getattr(route, "status_code", None) or status  # 201 for a creation
    identity.audit.record(
        request.scope,
        request.scope.get("state", {}).get("principal"),
        outcome,
        status,
        reason,
        route=getattr(route, "path", request.url.path),
        aggregate_id=envelope.aggregate_id,
        command_id=envelope.command_id,
    )
