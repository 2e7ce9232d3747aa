"""Given commands, when a command, then events or a domain error: through `decide`, the
same pure function the command processor calls, with payloads that crossed JSON."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson

from commands.context import BoundedContext, command_payload
from commands.decide import decide
from shared_kernel.clock import fixed_clock, using_clock
from shared_kernel.domain import AggregateRoot, event_payload

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


class Scenario:
    def __init__(self, context: BoundedContext) -> None:
        self.context = context
        self.aggregate: AggregateRoot | None = None

    def given(self, *commands: Any) -> Scenario:
        for cmd in commands:
            self.when(cmd)
        return self

    def when(self, command: Any, expected_version: int | None = None) -> list[tuple[str, dict[str, Any]]]:
        payload = orjson.loads(orjson.dumps(command_payload(command)))
        with using_clock(fixed_clock(T0)):
            self.aggregate, events = decide(
                self.context, self.aggregate, self.context.command_type(command), payload, expected_version
            )
        return [(type(e).__name__, event_payload(e)) for e in events]

    @property
    def state(self) -> Any:
        return self.aggregate
