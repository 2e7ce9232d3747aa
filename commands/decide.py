"""Decide: one command against one aggregate's current state, no I/O.

Checks the expected state (new or existing, expected version), runs the handler and
returns the aggregate with its new events. Every refusal is a `DomainError`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from commands.context import BoundedContext, command_from_payload
from shared_kernel.domain import (
    AggregateAlreadyExists,
    AggregateNotFound,
    AggregateRoot,
    VersionConflict,
)


def decide(
    context: BoundedContext,
    aggregate: AggregateRoot | None,
    command_type: str,
    payload: Mapping[str, Any],
    expected_version: int | None = None,
) -> tuple[AggregateRoot, Sequence[Any]]:
    handler = context.handler(command_type)
    command = command_from_payload(handler.command, payload)
    if handler.creates:
        if aggregate is not None:
            raise AggregateAlreadyExists(
                f"{context.aggregate_type} {aggregate.id} already exists", current_version=aggregate.version
            )
        if expected_version not in (None, 0):
            raise VersionConflict(
                f"expected version {expected_version}, but the aggregate does not exist yet",
                current_version=0,
            )
        assert handler.create is not None
        aggregate = handler.create(command)
    else:
        if aggregate is None:
            raise AggregateNotFound(f"no {context.name} aggregate {handler.aggregate_id(command)}")
        if expected_version is not None and expected_version != aggregate.version:
            raise VersionConflict(
                f"expected version {expected_version}, current version is {aggregate.version}",
                current_version=aggregate.version,
            )
        assert handler.act is not None
        handler.act(aggregate, command)
    return aggregate, aggregate.collect_events()
