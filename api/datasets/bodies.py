"""Request bodies of the datasets command routes (the API's own vocabulary), on the
input rules of `api.inputs`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal
from uuid import UUID

from pydantic import AfterValidator, Field, StringConstraints
from pydantic_core import PydanticCustomError

from api.bodies import RequestBody as Body
from api.inputs import Chars, Finite, Instant, Json, Label, Metadata, Name, Tag, Text

CLOCK_SKEW = timedelta(minutes=5)  # how far ahead of ours a client's clock may be


def _not_ahead(value: datetime) -> datetime:
    if value > datetime.now(UTC) + CLOCK_SKEW:
        raise PydanticCustomError("future_instant", "A measurement cannot be in the future")
    return value


MeasuredAt = Annotated[Instant, AfterValidator(_not_ahead)]

MAX_TAGS = 50
SemVer = Annotated[str, StringConstraints(min_length=5, max_length=100), Chars(line=True)]


class RegisterDatasetRequest(Body):
    id: UUID | None = Field(
        default=None, description="Optional; derived from the Idempotency-Key when absent."
    )
    name: Name
    description: Text = ""
    owner: Label = ""
    tags: Annotated[list[Tag], Field(max_length=MAX_TAGS)] = []
    metadata: Metadata = {}


class DescribeDatasetRequest(Body):
    name: Name | None = None
    description: Text | None = None


class MetadataValueRequest(Body):
    value: Json


class PublishVersionRequest(Body):
    version: Annotated[SemVer, Field(examples=["1.2.0"])]
    notes: Text = ""


class QualityCheckRequest(Body):
    metric: Name
    value: Finite
    threshold: Finite
    comparator: Literal[">=", ">", "<=", "<", "=="] = ">="
    measured_at: MeasuredAt | None = Field(
        default=None,
        description="When the check measured (its event time: the quality windows count it there); "
        "default: when it is recorded. Up to 5 minutes ahead of the server's clock.",
    )


class ArchiveDatasetRequest(Body):
    reason: Text = ""
