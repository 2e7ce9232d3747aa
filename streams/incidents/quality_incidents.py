"""The process manager from quality to incidents: a degraded dataset metric opens an
incident; its restoration comments the figures on that incident and resolves it.

Stateless: the incident's id derives from the degradation (tenant, dataset, metric and
the check version it was decided on), and every command id from the event it answers,
so restarts, replays, rebalances and redelivery send the same commands again, which
change nothing (the incident exists already; a repeat command gets its first outcome;
a resolved incident refuses to be resolved again). Exactly one incident per degradation.
"""

from __future__ import annotations

from uuid import UUID, uuid5

from commands.incidents import CONTEXT as INCIDENTS
from commands.incidents import commands as c
from projections.events import StoredEvent
from streams.jobs import Job, derived_id

INCIDENT_IDS = UUID("c7a1d0f2-3b4e-4f6a-8d9c-1e2f3a4b5c6d")


def incident_of(tenant: str, dataset: str, metric: str, check_version: int) -> UUID:
    return uuid5(INCIDENT_IDS, f"{tenant}/quality/{dataset}/{metric}/{check_version}")


def priority_of(failure_rate: float, threshold: float) -> str:
    """How far past the threshold the rate went, as a share of the way to 100 % failing."""
    excess = (failure_rate - threshold) / max(1 - threshold, 1e-9)
    if excess >= 0.75:
        return "critical"
    if excess >= 0.5:
        return "high"
    if excess >= 0.25:
        return "medium"
    return "low"


def _figures(p: dict[str, object]) -> str:
    return (
        f"failure rate {float(p['failure_rate']):.1%} ({p['failed']} of {p['checks']} checks) in the window "  # type: ignore[arg-type]
        f"{p['window_start']} to {p['window_end']}, threshold {float(p['threshold']):.1%}"  # type: ignore[arg-type]
    )


class QualityIncidents(Job):
    name = "quality-incidents"
    contexts = ("datasets",)

    async def handle(self, event: StoredEvent) -> None:
        if event.name not in ("DatasetQualityDegraded", "DatasetQualityRestored"):
            return
        p, tenant, dataset = event.payload, event.meta.tenant, event.meta.aggregate_id
        metric = str(p["metric"])
        if event.name == "DatasetQualityDegraded":
            incident = incident_of(tenant, dataset, metric, int(p["check_version"]))
            opened = c.OpenIncident(
                incident,
                title=f"Quality of {metric} degraded on dataset {dataset}",
                description=f"The {metric} checks of dataset {dataset} degraded: {_figures(p)}.",
                priority=priority_of(float(p["failure_rate"]), float(p["threshold"])),
                source="quality",
                external_id=f"{dataset}/{metric}",
            )
            await self.send(INCIDENTS, opened, derived_id("open", incident), tenant, event)
            return
        incident = incident_of(tenant, dataset, metric, int(p["degraded_check_version"]))
        steps = (
            c.CommentOnIncident(
                incident, f"job:{self.name}", f"Quality of {metric} restored: {_figures(p)}."
            ),
            c.ChangeIncidentStatus(incident, "in_progress", "quality restored"),
            c.ChangeIncidentStatus(incident, "resolved", "quality restored"),
        )
        for n, step in enumerate(steps):
            # refused when a person moved it on already: nothing left to do for that step
            await self.send(
                INCIDENTS, step, derived_id("restored", incident, event.version, n), tenant, event
            )
