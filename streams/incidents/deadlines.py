"""Durable deadlines: an incident's service level (`APP_INCIDENT_SLA_ASSIGN_S` and
`_RESOLVE_S` per priority, from its opening) escalated when a deadline passes unmet.

The timers are the Faust table `deadlines`, keyed by incident id: its due times, what
was met and what was escalated, with the last version applied. A scan every
`APP_DEADLINE_SCAN_S` sends `EscalateIncident` for each due, unmet, unescalated
deadline of the partitions this worker holds. Timers survive restarts (the table's
changelog), fire late after an outage (the scan finds them past due), and are gone once
met. They fire once: the command id derives from (incident, deadline), and the
incident refuses a second escalation of one deadline, or one of a deadline met (an
incident assigned just before the scan saw it).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import faust

from commands.incidents import CONTEXT as INCIDENTS
from commands.incidents import commands as c
from projections.events import StoredEvent
from streams.jobs import Job, JsonTable, derived_id

log = logging.getLogger(__name__)


class Deadlines(Job):
    name = "incident-deadlines"
    contexts = ("incidents",)

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.table: Any = None
        self.sent: set[tuple[str, str]] = set()  # escalations sent whose events are not here yet
        self.fired = 0
        self.scans = 0

    def tables(self, app: faust.App) -> None:
        self.table = JsonTable(app, "deadlines", self.settings.partitions)

    def timers(self, app: faust.App) -> None:
        app.timer(self.settings.deadline_scan_s)(self.scan)

    async def handle(self, event: StoredEvent) -> None:
        key = event.meta.aggregate_id
        state = self.table.get(key)
        if event.name == "IncidentOpened":
            if state is not None:
                return  # applied already
            opened = event.meta.occurred_at
            priority = event.payload["priority"]
            due = {
                "assignment": opened + timedelta(seconds=self.settings.incident_sla_assign_s[priority]),
                "resolution": opened + timedelta(seconds=self.settings.incident_sla_resolve_s[priority]),
            }
            self.table[key] = {
                "v": event.version,
                "tenant": event.meta.tenant,
                "due": {k: v.isoformat() for k, v in due.items()},
                "done": [],
            }
            return
        if state is None or event.version <= state["v"]:
            return
        done = set(state["done"])
        if event.name == "IncidentAssigned":
            done.add("assignment")
        elif event.name == "IncidentStatusChanged" and event.payload["to_status"] in ("resolved", "closed"):
            done.add("resolution")
        elif event.name == "IncidentEscalated":
            done.add(event.payload["deadline"])
            self.sent.discard((key, event.payload["deadline"]))
        if done >= {"assignment", "resolution"}:
            del self.table[key]  # nothing left to time
            return
        self.table[key] = {**state, "v": event.version, "done": sorted(done)}

    def progress(self) -> dict[str, Any]:
        return {
            "scans": self.scans,
            "timers": len(self.table.items()),
            "due": len(self._due(datetime.now(UTC))),
            "in_flight": len(self.sent),
        }

    async def scan(self) -> None:
        """One round of the timers; an error is logged and the next round tries again (a
        timer whose function raises stops for good)."""
        try:
            await self._scan()
        except Exception:
            log.exception("the deadline scan failed; the next one tries again")
        self.scans += 1

    def _due(self, now: datetime) -> list[tuple[str, str, str, str]]:
        """(incident, tenant, deadline, due at) of each deadline due, unmet and not sent."""
        due_now = []
        for key, state in list(self.table.items()):
            if not state:
                continue
            for deadline, due_at in state["due"].items():
                if deadline in state["done"] or (key, deadline) in self.sent:
                    continue
                if datetime.fromisoformat(due_at) <= now:
                    due_now.append((key, state["tenant"], deadline, due_at))
        return due_now

    async def _scan(self) -> None:
        for key, tenant, deadline, due_at in self._due(datetime.now(UTC)):
            command = c.EscalateIncident(UUID(key), deadline, due_at)
            self.sent.add((key, deadline))
            result = await self.send(INCIDENTS, command, derived_id("escalate", key, deadline), tenant, None)
            if result.accepted:
                self.fired += 1
