"""Request bodies of the incidents command routes, on the input rules of `api.inputs`."""

from __future__ import annotations

from typing import Literal
from uuid import UUID

from pydantic import Field

from api.bodies import RequestBody as Body
from api.inputs import Label, Name, SomeText, Text


class OpenIncidentRequest(Body):
    id: UUID | None = Field(
        default=None, description="Optional; derived from the Idempotency-Key when absent."
    )
    title: Name
    description: Text = ""
    priority: Literal["low", "medium", "high", "critical"] = "medium"
    source: Label = ""
    external_id: Label = ""


class AssignIncidentRequest(Body):
    assignee: Name


class ChangeStatusRequest(Body):
    status: Literal["open", "in_progress", "resolved", "closed"]
    reason: Text = ""


class ReopenIncidentRequest(Body):
    reason: Text = ""


class CommentRequest(Body):
    author: Name
    body: SomeText
