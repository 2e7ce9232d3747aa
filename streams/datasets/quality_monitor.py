"""The quality monitor: per dataset and metric, the failure rate of its quality checks in
the current hopping window (event time, allowed lateness: shared_kernel.windows), and
the commands that say when it degrades and when it is restored.

State, in the Faust table `quality` keyed by dataset id: the last version applied (an
event at or below it is a redelivery: skipped), the dataset's stream time, and per
metric the counts of its open hopping windows and whether it is degraded. On each
check, when the current window has at least `APP_QUALITY_MIN_CHECKS` checks and its
failure rate reaches `APP_QUALITY_DEGRADED_RATE`, `MarkQualityDegraded` is sent; when a
degraded metric's rate is at or under `APP_QUALITY_RESTORED_RATE`, `MarkQualityRestored`.
Command ids derive from (dataset, metric, window, check version), and the aggregate
refuses a decision not newer than its last one, so replays change nothing. The
aggregate's own `DatasetQualityDegraded` / `DatasetQualityRestored` events, in the same
stream, set the degraded flag too: the aggregate stays the authority.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import faust

from commands.datasets import CONTEXT as DATASETS
from commands.datasets import commands as c
from projections.datasets.windows import check_time
from projections.events import StoredEvent
from shared_kernel.windows import from_ms, kinds, takes, to_ms
from streams.jobs import Job, JsonTable, Poison, derived_id


class QualityMonitor(Job):
    name = "quality-monitor"
    contexts = ("datasets",)

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.hopping = kinds(settings)[1]
        self.lateness_ms = settings.quality_window_lateness_s * 1000
        self.table: Any = None

    def tables(self, app: faust.App) -> None:
        self.table = JsonTable(app, "quality", self.settings.partitions)

    async def handle(self, event: StoredEvent) -> None:
        if event.name not in ("QualityCheckRecorded", "DatasetQualityDegraded", "DatasetQualityRestored"):
            return  # nothing of its windows (and no write to the table's changelog)
        key = event.meta.aggregate_id
        state: dict[str, Any] = self.table.get(key) or {"v": 0, "t": 0, "m": {}}
        if event.version <= state["v"]:
            return  # applied already
        state = {"v": event.version, "t": state["t"], "m": dict(state["m"])}
        if event.name == "QualityCheckRecorded":
            decision = self._count(state, event)
            try:
                if decision is not None:
                    await self._decide(state, event, *decision)
            finally:  # the check is counted even when its decision is dead-lettered
                self.table[key] = state
        elif event.name in ("DatasetQualityDegraded", "DatasetQualityRestored"):
            metric = state["m"].setdefault(event.payload["metric"], {"w": {}, "d": False})
            metric["d"] = event.name == "DatasetQualityDegraded"
            self.table[key] = state

    def _count(self, state: dict[str, Any], event: StoredEvent) -> tuple[str, dict[str, Any]] | None:
        """Count the check in its windows; the decision it calls for, if any: (command, figures)."""
        p = event.payload
        try:
            metric_name, passed = str(p["metric"]), bool(p["passed"])
            t = to_ms(check_time(event))
        except (KeyError, ValueError, TypeError) as exc:
            raise Poison(f"not a quality check: {exc!r}") from exc
        state["t"] = stream = max(state["t"], t)
        metric = dict(state["m"].get(metric_name) or {"w": {}, "d": False})
        windows = {k: list(v) for k, v in metric["w"].items()}
        for start, end in self.hopping.containing(t):
            if takes(end, stream, self.lateness_ms):
                counts = windows.setdefault(str(start), [0, 0])
                counts[0] += 1
                counts[1] += 0 if passed else 1
        # windows that can take no more checks are forgotten (the read model keeps them)
        metric["w"] = {
            k: v for k, v in windows.items() if takes(int(k) + self.hopping.size_ms, stream, self.lateness_ms)
        }
        state["m"][metric_name] = metric
        start, end = self.hopping.current(stream)
        checks, failed = metric["w"].get(str(start), [0, 0])
        if checks < self.settings.quality_min_checks:
            return None
        rate = failed / checks
        figures = {
            "window_start": from_ms(start).isoformat(),
            "window_end": from_ms(end).isoformat(),
            "checks": checks,
            "failed": failed,
            "failure_rate": rate,
        }
        if not metric["d"] and rate >= self.settings.quality_degraded_rate:
            return "degraded", {**figures, "threshold": self.settings.quality_degraded_rate}
        if metric["d"] and rate <= self.settings.quality_restored_rate:
            return "restored", {**figures, "threshold": self.settings.quality_restored_rate}
        return None

    async def _decide(
        self, state: dict[str, Any], event: StoredEvent, what: str, figures: dict[str, Any]
    ) -> None:
        metric = event.payload["metric"]
        dataset = UUID(event.meta.aggregate_id)
        command: Any = (c.MarkQualityDegraded if what == "degraded" else c.MarkQualityRestored)(
            dataset, metric, figures, event.version
        )
        command_id = derived_id(
            "quality", event.meta.tenant, dataset, metric, figures["window_start"], what, event.version
        )
        await self.send(DATASETS, command, command_id, event.meta.tenant, event)
        # accepted, or refused as decided already: either way the metric is in that state now
        state["m"][metric] = {**state["m"][metric], "d": what == "degraded"}
