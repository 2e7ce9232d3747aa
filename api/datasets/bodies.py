"""Request bodies of the datasets command routes (the API's own vocabulary)."""

from __future__ import annotations

from typing import Annotated, Literal
from uuid import UUID

from pydantic import Field, JsonValue

from api.bodies import RequestBody as Body

Name = Annotated[str, Field(min_length=1, max_length=200)]
Text = Annotated[str, Field(max_length=10_000)]
Tag = Annotated[str, Field(min_length=1, max_length=64)]
Number = Annotated[float, Field(allow_inf_nan=False)]


class RegisterDatasetRequest(Body):
    id: UUID | None = Field(
        default=None, description="Optional; derived from the Idempotency-Key when absent."
    )
    name: Name
    description: Text = ""
    owner: Annotated[str, Field(max_length=200)] = ""
    tags: Annotated[list[Tag], Field(max_length=50)] = []
    metadata: dict[Annotated[str, Field(min_length=1, max_length=200)], JsonValue] = {}


class DescribeDatasetRequest(Body):
    name: Name | None = None
    description: Text | None = None


class MetadataValueRequest(Body):
    value: JsonValue


class PublishVersionRequest(Body):
    version: Annotated[str, Field(min_length=5, max_length=100, examples=["1.2.0"])]
    notes: Text = ""


class QualityCheckRequest(Body):
    metric: Name
    value: Number
    threshold: Number
    comparator: Literal[">=", ">", "<=", "<", "=="] = ">="


class ArchiveDatasetRequest(Body):
    reason: Text = ""
