"""Alerts in: Prometheus Alertmanager's webhook (payload version 4) opens, comments on
and resolves incidents of the caller's tenant.

Each firing alert opens an incident (source `alertmanager`, external id = the alert's
fingerprint, priority from its `severity` label, title and description from its
annotations). The same fingerprint firing again (a repeat notification, or a new
episode while the incident is still open) comments on the open incident instead. A
resolved alert comments and resolves it. Incident ids derive from (tenant, fingerprint,
startsAt) and command ids from the notification's content, so Alertmanager's retries of
one notification change nothing. Alertmanager's receiver sends a token of an operator
of the tenant: `webhook_configs: [{url: .../api/v1/integrations/alertmanager,
http_config: {authorization: {credentials_file: ...}}}]`.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal
from uuid import UUID, uuid5

import orjson
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from api.auth import permissions as p
from api.auth.access import PrincipalDep, requires
from api.bodies import ERROR_RESPONSES
from api.deps import BusDep
from api.inputs import Chars, Instant, Label, Text
from api.readmodels import PoolDep
from commands.bus import CommandBus
from commands.incidents import CONTEXT
from commands.incidents import commands as c
from shared_kernel.envelope import CommandResult

router = APIRouter(prefix="/api/v1/integrations", tags=["integrations"], responses=ERROR_RESPONSES)

ALERT_INCIDENTS = UUID("2f8e4d6a-1c3b-4a5e-9f7d-0b2c4e6a8d1f")
SEVERITY = {"critical": "critical", "page": "critical", "error": "high", "high": "high", "warning": "medium"}
SEVERITY |= {"medium": "medium", "info": "low", "low": "low", "none": "low"}
Fingerprint = Annotated[str, StringConstraints(min_length=1, max_length=200), Chars(line=True)]


class Loose(BaseModel):
    """Alertmanager adds fields over its versions: those not read here are ignored."""

    model_config = ConfigDict(extra="ignore")


class Alert(Loose):
    status: Literal["firing", "resolved"]
    labels: dict[Label, Text] = Field(max_length=200)
    annotations: dict[Label, Text] = Field(default_factory=dict, max_length=200)
    startsAt: Instant
    endsAt: Instant | None = None
    generatorURL: Text = ""
    fingerprint: Fingerprint


class AlertmanagerPayload(Loose):
    version: Literal["4"]
    status: Literal["firing", "resolved"]
    receiver: Label = ""
    groupKey: Text = ""
    alerts: list[Alert] = Field(min_length=1, max_length=1000)
    externalURL: Text = ""


class AlertOutcome(BaseModel):
    fingerprint: str
    incident_id: UUID
    action: Literal["opened", "commented", "resolved", "ignored"]


class AlertsHandled(BaseModel):
    alerts: list[AlertOutcome]


def _digest(alert: Alert) -> str:
    return hashlib.sha256(
        orjson.dumps(alert.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
    ).hexdigest()


def _text(alert: Alert) -> tuple[str, str]:
    a, labels = alert.annotations, alert.labels
    title = a.get("summary") or a.get("title") or labels.get("alertname") or f"alert {alert.fingerprint}"
    description = a.get("description") or a.get("message") or ""
    lines = [description, "", "labels: " + ", ".join(f"{k}={v}" for k, v in sorted(labels.items()))]
    if alert.generatorURL:
        lines.append(f"source: {alert.generatorURL}")
    return title.strip()[:200] or "alert", "\n".join(lines).strip()[:10_000]


async def _send(bus: CommandBus, principal: Any, command: Any, command_id: str) -> CommandResult:
    envelope = CONTEXT.envelope(
        command, command_id, actor=principal.subject, tenant=principal.tenant, correlation_id=command_id
    )
    return await bus.send(envelope)


@router.post(
    "/alertmanager",
    operation_id="receiveAlertmanagerWebhook",
    dependencies=[requires(p.INCIDENTS_CREATE)],
)
async def alertmanager(
    body: AlertmanagerPayload, principal: PrincipalDep, bus: BusDep, pool: PoolDep
) -> AlertsHandled:
    """Alertmanager's webhook (`webhook_configs`, payload version 4): one incident per
    alert episode, deduplicated by fingerprint; resolved alerts resolve it."""
    outcomes = []
    for alert in body.alerts:
        open_id = await pool.fetchval(
            "SELECT id FROM incidents WHERE tenant = $1 AND source = 'alertmanager' AND external_id = $2 "
            "AND status IN ('open', 'in_progress') ORDER BY opened_at DESC LIMIT 1",
            principal.tenant,
            alert.fingerprint,
        )
        episode = uuid5(
            ALERT_INCIDENTS, f"{principal.tenant}/{alert.fingerprint}/{alert.startsAt.isoformat()}"
        )
        incident: UUID = open_id or episode
        digest = _digest(alert)
        title, description = _text(alert)
        when = (alert.endsAt if alert.status == "resolved" and alert.endsAt else alert.startsAt).isoformat()
        action: Literal["opened", "commented", "resolved", "ignored"]
        if alert.status == "firing":
            action = "commented"
            if open_id is None:
                severity = alert.labels.get("severity", "").lower()
                opened = c.OpenIncident(
                    incident,
                    title,
                    description,
                    SEVERITY.get(severity, "medium"),
                    "alertmanager",
                    alert.fingerprint,
                )
                result = await _send(bus, principal, opened, f"alertmanager:open:{incident}")
                action = "opened" if result.accepted and result.version == 1 else "commented"
            if action == "commented":
                note = c.CommentOnIncident(
                    incident, principal.subject, f"Firing again (since {when}): {title}"
                )
                result = await _send(bus, principal, note, f"alertmanager:comment:{incident}:{digest}")
                if not result.accepted and result.code == "not_found":
                    action = "ignored"
        else:
            note = c.CommentOnIncident(incident, principal.subject, f"Alert resolved at {when}: {title}")
            result = await _send(bus, principal, note, f"alertmanager:resolved-note:{incident}:{digest}")
            action = "ignored" if not result.accepted and result.code == "not_found" else "resolved"
            if action == "resolved":
                for status in ("in_progress", "resolved"):
                    move = c.ChangeIncidentStatus(incident, status, "the alert resolved")
                    await _send(bus, principal, move, f"alertmanager:status-{status}:{incident}:{digest}")
        outcomes.append(AlertOutcome(fingerprint=alert.fingerprint, incident_id=incident, action=action))
    return AlertsHandled(alerts=outcomes)
