"""Request bodies of the datasets command routes (the API's own vocabulary), on the
input rules of `api.inputs`."""

from __future__ import annotations

from typing import Annotated, Literal
from uuid import UUID

from pydantic import Field, StringConstraints

from api.bodies import RequestBody as Body
from api.inputs import Chars, Finite, Json, Label, Metadata, Name, Tag, Text

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


class ArchiveDatasetRequest(Body):
    reason: Text = ""
