"""Request and response bodies shared by every context's routes (pydantic models)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class RequestBody(BaseModel):
    """Base of every request body: unknown fields are a 422, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


class CommandAccepted(BaseModel):
    """A command was applied (or had been applied: the answer to a retry is the same)."""

    id: str = Field(description="The aggregate id.")
    version: int | None = Field(description="The aggregate version after the command (also in ETag).")
    position: str = Field(description="Consistency token: pass it to a query to read your own write.")


class CommandQueued(BaseModel):
    """`Prefer: respond-async`: the command is in the commands topic; its outcome will be at `status_url`."""

    command_id: str = Field(description="The command id (the Idempotency-Key, or a new one).")
    id: str = Field(description="The aggregate id.")
    status: str = Field(description="pending")
    status_url: str = Field(description="GET it for the outcome (202 while pending).")


class CommandStatus(BaseModel):
    """The outcome of a command, by its id."""

    command_id: str
    status: str = Field(description="pending, accepted or rejected")
    id: str | None = Field(default=None, description="The aggregate id, once decided.")
    version: int | None = None
    position: str | None = Field(default=None, description="Consistency token of an accepted command.")
    error: str | None = Field(default=None, description="Why a rejected command was refused.")
    detail: str | None = None
    current_version: int | None = None


class ErrorBody(BaseModel):
    error: str = Field(
        description="Stable error code, e.g. version_conflict, invariant_violation, not_found."
    )
    detail: str
    current_version: int | None = None
    field: str | None = None
    extra: dict[str, Any] = Field(default_factory=dict)


class InternalErrorBody(BaseModel):
    error: str = Field(description="internal_error")
    detail: str
    correlation_id: str = Field(description="The request's X-Correlation-Id (or a new one): in the logs.")


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "Unknown aggregate (or entry)."},
    409: {
        "model": ErrorBody,
        "description": "Version conflict or broken invariant; body has the current version.",
    },
    202: {
        "model": CommandQueued,
        "description": "With `Prefer: respond-async`: queued on the commands topic; see status_url.",
    },
    422: {"description": "Invalid input (body, path, query or header); names the field."},
    500: {"model": InternalErrorBody, "description": "Unexpected; logged with its correlation_id."},
    503: {
        "model": ErrorBody,
        "description": "Kafka unreachable, the partition changing owner, or no result in time; "
        "retry with the same Idempotency-Key.",
    },
}
