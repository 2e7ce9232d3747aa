"""Command routes of the datasets context: each translates a request into one command."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Path, Response

from api.auth import permissions as p
from api.auth.access import requires
from api.bodies import ERROR_RESPONSES, CommandAccepted
from api.datasets import bodies as s
from api.deps import BusDep, CommandMetaDep
from api.dispatch import dispatch, new_aggregate_id
from commands.datasets import CONTEXT
from commands.datasets import commands as c

router = APIRouter(prefix="/api/v1/datasets", tags=["datasets"], responses=ERROR_RESPONSES)
MetadataKey = Annotated[str, Path(min_length=1, max_length=200)]


@router.post("", status_code=201, operation_id="registerDataset", dependencies=[requires(p.DATASETS_WRITE)])
async def register_dataset(
    body: s.RegisterDatasetRequest, meta: CommandMetaDep, bus: BusDep, response: Response
) -> CommandAccepted:
    """Register a dataset. Its id is derived from the Idempotency-Key unless given."""
    command = c.RegisterDataset(
        dataset_id=body.id or new_aggregate_id(meta),
        name=body.name,
        description=body.description,
        owner=body.owner,
        tags=body.tags,
        metadata=body.metadata,
    )
    return await dispatch(bus, CONTEXT, command, meta, response)


@router.patch("/{dataset_id}", operation_id="describeDataset", dependencies=[requires(p.DATASETS_WRITE)])
async def describe_dataset(
    dataset_id: UUID, body: s.DescribeDatasetRequest, meta: CommandMetaDep, bus: BusDep, response: Response
) -> CommandAccepted:
    """Rename and/or re-describe a dataset."""
    command = c.DescribeDataset(dataset_id, name=body.name, description=body.description)
    return await dispatch(bus, CONTEXT, command, meta, response)


@router.put(
    "/{dataset_id}/metadata/{key}",
    operation_id="setDatasetMetadata",
    dependencies=[requires(p.DATASETS_WRITE)],
)
async def set_metadata(
    dataset_id: UUID,
    key: MetadataKey,
    body: s.MetadataValueRequest,
    meta: CommandMetaDep,
    bus: BusDep,
    response: Response,
) -> CommandAccepted:
    """Add or replace a metadata entry (any JSON value)."""
    return await dispatch(bus, CONTEXT, c.SetMetadataEntry(dataset_id, key, body.value), meta, response)


@router.delete(
    "/{dataset_id}/metadata/{key}",
    operation_id="removeDatasetMetadata",
    dependencies=[requires(p.DATASETS_WRITE)],
)
async def remove_metadata(
    dataset_id: UUID, key: MetadataKey, meta: CommandMetaDep, bus: BusDep, response: Response
) -> CommandAccepted:
    """Remove a metadata entry (404 if there is none)."""
    return await dispatch(bus, CONTEXT, c.RemoveMetadataEntry(dataset_id, key), meta, response)


@router.post(
    "/{dataset_id}/versions", operation_id="publishDatasetVersion", dependencies=[requires(p.DATASETS_WRITE)]
)
async def publish_version(
    dataset_id: UUID, body: s.PublishVersionRequest, meta: CommandMetaDep, bus: BusDep, response: Response
) -> CommandAccepted:
    """Publish a version; it must be greater (semver precedence) than the latest one."""
    return await dispatch(
        bus, CONTEXT, c.PublishVersion(dataset_id, body.version, body.notes), meta, response
    )


@router.post(
    "/{dataset_id}/quality-checks",
    operation_id="recordDatasetQualityCheck",
    dependencies=[requires(p.DATASETS_WRITE)],
)
async def record_quality_check(
    dataset_id: UUID, body: s.QualityCheckRequest, meta: CommandMetaDep, bus: BusDep, response: Response
) -> CommandAccepted:
    """Record a quality check; whether it passed is computed from value, comparator and threshold."""
    measured_at = body.measured_at.isoformat() if body.measured_at else None
    command = c.RecordQualityCheck(
        dataset_id, body.metric, body.value, body.threshold, body.comparator, measured_at
    )
    return await dispatch(bus, CONTEXT, command, meta, response)


@router.post(
    "/{dataset_id}/archive", operation_id="archiveDataset", dependencies=[requires(p.DATASETS_WRITE)]
)
async def archive_dataset(
    dataset_id: UUID, body: s.ArchiveDatasetRequest, meta: CommandMetaDep, bus: BusDep, response: Response
) -> CommandAccepted:
    """Archive a dataset; it accepts no change afterwards."""
    return await dispatch(bus, CONTEXT, c.ArchiveDataset(dataset_id, body.reason), meta, response)
