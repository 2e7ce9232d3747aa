"""The datasets context's commands: what a caller asks a Dataset to do (imperative)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from uuid import UUID


@dataclass(frozen=True)
class RegisterDataset:
    dataset_id: UUID
    name: str
    description: str = ""
    owner: str = ""
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DescribeDataset:
    """Rename and/or re-describe; a field left as None keeps its value."""

    dataset_id: UUID
    name: str | None = None
    description: str | None = None


@dataclass(frozen=True)
class SetMetadataEntry:
    dataset_id: UUID
    key: str
    value: Any


@dataclass(frozen=True)
class RemoveMetadataEntry:
    dataset_id: UUID
    key: str


@dataclass(frozen=True)
class PublishVersion:
    dataset_id: UUID
    version: str
    notes: str = ""


@dataclass(frozen=True)
class RecordQualityCheck:
    dataset_id: UUID
    metric: str
    value: float
    threshold: float
    comparator: str = ">="
    measured_at: str | None = None  # the check's own time (ISO-8601); the record's time when absent


@dataclass(frozen=True)
class MarkQualityDegraded:
    """Sent by the quality monitor job: a metric's failure rate reached its threshold in a
    window (`figures`: window_start, window_end, checks, failed, failure_rate, threshold),
    as of the quality check at `check_version` of the dataset."""

    dataset_id: UUID
    metric: str
    figures: dict[str, Any]
    check_version: int


@dataclass(frozen=True)
class MarkQualityRestored:
    """Sent by the quality monitor job: the failure rate fell back below recovery."""

    dataset_id: UUID
    metric: str
    figures: dict[str, Any]
    check_version: int


@dataclass(frozen=True)
class ArchiveDataset:
    dataset_id: UUID
    reason: str = ""
