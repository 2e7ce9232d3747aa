"""The audit record: one JSON object per outcome on `<prefix>.audit` (keyed by tenant).

Written by the API (every command it took, every refused request: api.auth.audit) and
by the command processor (the outcome of each command it consumed from the commands
topic, inside the transaction that decided it: commands.transaction). `streams.audit`
writes them into PostgreSQL for `GET /api/v1/admin/audit`.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import orjson

# the HTTP status a domain rejection is answered with (api.errors answers with them too)
STATUS_OF_CODE = {
    "not_found": 404,
    "already_exists": 409,
    "version_conflict": 409,
    "invariant_violation": 409,
    "invalid_command": 422,
    "idempotency_key_reused": 422,
    "too_large": 413,
    "internal_error": 500,
    "aggregate_parked": 503,  # behind a dead letter: answered once an operator retried or skipped it
}
# answers that a later retry of the same command may change: not cached as its result
# (a parked one for a while, so that a queued command refused so has a status)
PASSING = frozenset({"internal_error", "aggregate_parked"})
PARKED_RETRY_AFTER_S = 30


def audit_record(
    *,
    tenant: str,
    actor: str,
    outcome: str,
    status: int,
    reason: str = "",
    credential: str = "",
    method: str = "",
    route: str = "",
    aggregate_id: str = "",
    command_id: str = "",
    client_ip: str = "",
    user_agent: str = "",
    correlation_id: str = "",
) -> tuple[bytes, bytes]:
    """(key, value) of one audit record."""
    body = {
        "id": str(uuid.uuid4()),
        "at": datetime.now(UTC).isoformat(),
        "tenant": tenant,
        "actor": actor,
        "credential": credential,
        "method": method,
        "route": route,
        "aggregate_id": aggregate_id,
        "command_id": command_id,
        "outcome": outcome,
        "status": status,
        "reason": reason[:500],
        "client_ip": client_ip,
        "user_agent": user_agent,
        "correlation_id": correlation_id or command_id,
    }
    return tenant.encode(), orjson.dumps(body)
