"""The Dataset aggregate: decides on commands, changes only by applying its events.

Public methods validate (the `_check_*` guards) and then trigger exactly one event;
the `@event` methods are the evolve functions and re-run on replay, so they hold no
validation and read no clock.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import orjson
from eventsourcing.domain import event

from shared_kernel.domain import AggregateRoot, InvalidCommand, InvariantViolation, NotFound, required_text

COMPARATORS = {
    ">=": lambda v, t: v >= t,
    ">": lambda v, t: v > t,
    "<=": lambda v, t: v <= t,
    "<": lambda v, t: v < t,
    "==": lambda v, t: v == t,
}
_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
MAX_TAGS = 50


def semver_key(version: str) -> tuple[Any, ...]:
    """Sort key of a semantic version (2.0.0 precedence rules; build metadata ignored)."""
    m = _SEMVER.match(version)
    if m is None:
        raise InvalidCommand(f"{version!r} is not a semantic version (MAJOR.MINOR.PATCH)", field="version")
    major, minor, patch, pre, _build = m.groups()
    release = (int(major), int(minor), int(patch))
    if pre is None:
        return (*release, 1, ())
    ids = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
    return (*release, 0, ids)


def _normalise_tags(tags: list[str]) -> list[str]:
    seen: dict[str, None] = {}
    for tag in tags:
        t = tag.strip().lower()
        if not t:
            raise InvalidCommand("tags must not be blank", field="tags")
        seen[t] = None
    if len(seen) > MAX_TAGS:
        raise InvalidCommand(f"at most {MAX_TAGS} tags", field="tags")
    return list(seen)


def event_time(value: str | None, field: str = "measured_at") -> str | None:
    """An instant as ISO-8601 text in UTC (an event's own time), or None when not given."""
    if value is None:
        return None
    try:
        at = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise InvalidCommand(f"{field} is not an ISO-8601 instant", field=field) from None
    if at.tzinfo is None:
        raise InvalidCommand(f"{field} must name its time zone (e.g. Z or +00:00)", field=field)
    return at.astimezone(UTC).isoformat()


def _json_text(value: Any, field: str) -> str:
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError as exc:
        raise InvalidCommand(f"{field} is not JSON: {exc}", field=field) from exc


FIGURES = ("window_start", "window_end", "checks", "failed", "failure_rate", "threshold")


def _figures(figures: dict[str, Any]) -> dict[str, Any]:
    """A window's figures as an event carries them, checked."""
    missing = [k for k in FIGURES if k not in figures]
    if missing:
        raise InvalidCommand(f"figures lack {', '.join(missing)}", field=f"figures.{missing[0]}")
    out: dict[str, Any] = {}
    for name in ("window_start", "window_end"):
        out[name] = event_time(figures[name], f"figures.{name}")
    for name in ("checks", "failed"):
        n = figures[name]
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < 2**31:
            raise InvalidCommand(f"figures.{name} must be a count", field=f"figures.{name}")
        out[name] = n
    for name in ("failure_rate", "threshold"):
        x = figures[name]
        if isinstance(x, bool) or not isinstance(x, int | float) or not 0 <= x <= 1:
            raise InvalidCommand(f"figures.{name} must be a rate from 0 to 1", field=f"figures.{name}")
        out[name] = float(x)
    return out


class Dataset(AggregateRoot):
    """A registered dataset: descriptive data, metadata entries, versions, quality checks,
    and per metric whether its quality is degraded (decided by the quality monitor job)."""

    class_version = 2  # v2: `quality_alerts`

    @staticmethod
    def upcast_v1_v2(state: dict[str, Any]) -> None:
        state["quality_alerts"] = {}

    # ---- decide -------------------------------------------------------------

    @classmethod
    def register(
        cls,
        dataset_id: UUID,
        name: str,
        description: str,
        owner: str,
        tags: list[str],
        metadata: dict[str, Any],
    ) -> Dataset:
        entries = {required_text(k, "metadata"): _json_text(v, f"metadata.{k}") for k, v in metadata.items()}
        return cls(
            id=dataset_id,
            name=required_text(name, "name"),
            description=description.strip(),
            owner=owner.strip(),
            tags=_normalise_tags(tags),
            metadata=entries,
        )

    def describe(self, name: str | None, description: str | None) -> None:
        self._check_active()
        if name is None and description is None:
            raise InvalidCommand("give a new name, a new description, or both", field="name")
        self._described(
            name=self.name if name is None else required_text(name, "name"),
            description=self.description if description is None else description.strip(),
        )

    def set_metadata(self, key: str, value: Any) -> None:
        self._check_active()
        self._metadata_set(key=required_text(key, "key"), value_json=_json_text(value, "value"))

    def remove_metadata(self, key: str) -> None:
        self._check_active()
        if key not in self.metadata:
            raise NotFound(f"dataset has no metadata entry {key!r}", key=key)
        self._metadata_removed(key=key)

    def publish_version(self, version: str, notes: str) -> None:
        self._check_active()
        new_key = semver_key(version.strip())
        if self.latest_version is not None and new_key <= semver_key(self.latest_version):
            raise InvariantViolation(
                f"version {version} is not greater than the latest published version {self.latest_version}",
                latest_version=self.latest_version,
            )
        self._version_published(version=version.strip(), notes=notes)

    def record_quality_check(
        self, metric: str, value: float, threshold: float, comparator: str, measured_at: str | None = None
    ) -> None:
        self._check_active()
        if comparator not in COMPARATORS:
            raise InvalidCommand(f"comparator must be one of {', '.join(COMPARATORS)}", field="comparator")
        for name, number in (("value", value), ("threshold", threshold)):
            if isinstance(number, bool) or not isinstance(number, int | float) or not math.isfinite(number):
                raise InvalidCommand(f"{name} must be a finite number", field=name)
        self._quality_check_recorded(
            metric=required_text(metric, "metric"),
            value=float(value),
            threshold=float(threshold),
            comparator=comparator,
            passed=COMPARATORS[comparator](value, threshold),
            measured_at=event_time(measured_at),
        )

    def mark_quality_degraded(self, metric: str, figures: dict[str, Any], check_version: int) -> None:
        """The metric's failure rate reached the degradation threshold, as of the check at
        `check_version`. A repeat (the same or an earlier check) is refused, so a job that
        decides again over the same events changes nothing."""
        self._check_active()
        alert = self.quality_alerts.get(metric)
        if alert is not None and alert["degraded"]:
            raise InvariantViolation(
                f"quality of {metric!r} is already degraded (since check {alert['since_check']})",
                metric=metric,
                since_check=alert["since_check"],
            )
        self._check_later(metric, alert, check_version)
        self._quality_degraded(metric=metric, check_version=check_version, **_figures(figures))

    def mark_quality_restored(self, metric: str, figures: dict[str, Any], check_version: int) -> None:
        """The metric's failure rate fell back below the recovery threshold."""
        self._check_active()
        alert = self.quality_alerts.get(metric)
        if alert is None or not alert["degraded"]:
            raise InvariantViolation(f"quality of {metric!r} is not degraded", metric=metric)
        self._check_later(metric, alert, check_version)
        self._quality_restored(
            metric=metric,
            check_version=check_version,
            degraded_check_version=alert["since_check"],
            **_figures(figures),
        )

    @staticmethod
    def _check_later(metric: str, alert: dict[str, Any] | None, check_version: int) -> None:
        if isinstance(check_version, bool) or not isinstance(check_version, int) or check_version < 1:
            raise InvalidCommand("check_version must be a positive integer", field="check_version")
        if alert is not None and check_version <= alert["last_check"]:
            raise InvariantViolation(
                f"quality of {metric!r} was already decided as of check {alert['last_check']}",
                metric=metric,
                last_check=alert["last_check"],
            )

    def archive(self, reason: str) -> None:
        self._check_active()
        self._archived(reason=reason.strip())

    def state(self) -> dict[str, Any]:
        state = super().state()
        state["metadata"] = {k: orjson.loads(v) for k, v in self.metadata.items()}  # held as JSON text
        return state

    def _check_active(self) -> None:
        if self.status == "archived":
            raise InvariantViolation("the dataset is archived and accepts no change")

    # ---- evolve -------------------------------------------------------------

    @event("DatasetRegistered")
    def __init__(
        self,
        id: UUID,
        name: str,
        description: str,
        owner: str,
        tags: list[str],
        metadata: dict[str, str],
    ) -> None:
        self.name = name
        self.description = description
        self.owner = owner
        self.tags = list(tags)
        self.metadata = dict(metadata)
        self.status = "active"
        self.latest_version: str | None = None
        self.quality: dict[str, dict[str, Any]] = {}
        self.quality_alerts: dict[str, dict[str, Any]] = {}
        self.archived_reason = ""

    @event("DatasetDescribed")
    def _described(self, name: str, description: str) -> None:
        self.name = name
        self.description = description

    @event("MetadataSet")
    def _metadata_set(self, key: str, value_json: str) -> None:
        self.metadata[key] = value_json

    @event("MetadataRemoved")
    def _metadata_removed(self, key: str) -> None:
        self.metadata.pop(key, None)

    @event("VersionPublished")
    def _version_published(self, version: str, notes: str) -> None:
        self.latest_version = version

    @event("QualityCheckRecorded")
    def _quality_check_recorded(
        self,
        metric: str,
        value: float,
        threshold: float,
        comparator: str,
        passed: bool,
        measured_at: str | None = None,
    ) -> None:
        self.quality[metric] = {
            "value": value,
            "threshold": threshold,
            "comparator": comparator,
            "passed": passed,
        }

    @event("DatasetQualityDegraded")
    def _quality_degraded(
        self,
        metric: str,
        window_start: str,
        window_end: str,
        checks: int,
        failed: int,
        failure_rate: float,
        threshold: float,
        check_version: int,
    ) -> None:
        self._alert(metric, True, check_version, window_start, failure_rate)

    @event("DatasetQualityRestored")
    def _quality_restored(
        self,
        metric: str,
        window_start: str,
        window_end: str,
        checks: int,
        failed: int,
        failure_rate: float,
        threshold: float,
        check_version: int,
        degraded_check_version: int,
    ) -> None:
        self._alert(metric, False, check_version, window_start, failure_rate)

    def _alert(self, metric: str, degraded: bool, check_version: int, window_start: str, rate: float) -> None:
        self.quality_alerts[metric] = {
            "degraded": degraded,
            "since_check": check_version,
            "last_check": check_version,
            "window_start": window_start,
            "failure_rate": rate,
        }

    @event("DatasetArchived")
    def _archived(self, reason: str) -> None:
        self.status = "archived"
        self.archived_reason = reason
