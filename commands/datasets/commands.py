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


@dataclass(frozen=True)
class ArchiveDataset:
    dataset_id: UUID
    reason: str = ""
