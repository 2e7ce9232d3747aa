"""Request bodies of the incidents command routes."""

from __future__ import annotations

from typing import Annotated, Literal
from uuid import UUID

from pydantic import Field

from api.bodies import RequestBody as Body

Short = Annotated[str, Field(min_length=1, max_length=200)]
Text = Annotated[str, Field(max_length=10_000)]


class OpenIncidentRequest(Body):
    id: UUID | None = Field(
        default=None, description="Optional; derived from the Idempotency-Key when absent."
    )
    title: Short
    description: Text = ""
    priority: Literal["low", "medium", "high", "critical"] = "medium"
    source: Annotated[str, Field(max_length=200)] = ""
    external_id: Annotated[str, Field(max_length=200)] = ""


class AssignIncidentRequest(Body):
    assignee: Short


class ChangeStatusRequest(Body):
    status: Literal["open", "in_progress", "resolved", "closed"]
    reason: Text = ""


class ReopenIncidentRequest(Body):
    reason: Text = ""


class CommentRequest(Body):
    author: Short
    body: Annotated[str, Field(min_length=1, max_length=10_000)]
