"""Aggregate snapshots as stored in `<prefix>.state.<context>` (JSON, keyed by aggregate id).

A snapshot carries the aggregate's state (taken and restored by the eventsourcing
library, so `class_version` upcasters apply), its version, and the results of the
last commands it handled: the durable half of command de-duplication.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import orjson
from eventsourcing.domain import Snapshot
from eventsourcing.utils import get_topic

from commands.context import BoundedContext
from shared_kernel.clock import now
from shared_kernel.domain import AggregateRoot
from shared_kernel.envelope import CommandResult

RECENT_COMMANDS = 32  # per aggregate; older command ids are remembered by the result cache only


@dataclass
class LoadedAggregate:
    """An aggregate in the processor's memory, with the outcomes of its recent commands."""

    aggregate: AggregateRoot
    recent: OrderedDict[str, CommandResult] = field(default_factory=OrderedDict)
    tenant: str = ""  # the tenant it was created in: commands of another tenant do not see it

    @property
    def version(self) -> int:
        return int(self.aggregate.version)

    def remember(self, result: CommandResult) -> None:
        self.recent[result.command_id] = result
        while len(self.recent) > RECENT_COMMANDS:
            self.recent.popitem(last=False)


def dump(context: BoundedContext, loaded: LoadedAggregate) -> bytes:
    snap = Snapshot.take(loaded.aggregate)
    body = {
        "type": context.aggregate_type,
        "version": loaded.version,
        "tenant": loaded.tenant,
        "state": snap.state,
        "recent": [_compact(r) for r in loaded.recent.values()],
    }
    return orjson.dumps(body)


def load(context: BoundedContext, aggregate_id: str, data: bytes) -> LoadedAggregate:
    body = orjson.loads(data)
    if body.get("type") != context.aggregate_type:
        raise ValueError(f"snapshot of {body.get('type')!r} in the {context.name} state topic")
    state = dict(body["state"])
    for key in ("_created_on", "_modified_on"):
        if isinstance(state.get(key), str):
            state[key] = datetime.fromisoformat(state[key])
    snap = Snapshot(
        originator_id=UUID(aggregate_id),
        originator_version=body["version"],
        timestamp=now(),
        topic=get_topic(context.aggregate),
        state=state,
    )
    aggregate = snap.mutate(None)
    tenant = str(body.get("tenant", ""))
    recent = OrderedDict(
        (r.command_id, r) for r in (_expand(aggregate_id, tenant, row) for row in body.get("recent", []))
    )
    return LoadedAggregate(aggregate=aggregate, recent=recent, tenant=tenant)  # type: ignore[arg-type]


def _compact(r: CommandResult) -> list[Any]:
    if r.accepted:
        return ["a", r.command_id, r.fingerprint, r.version, r.position, r.events]
    return ["r", r.command_id, r.fingerprint, r.code, r.reason, r.current_version]


def _expand(aggregate_id: str, tenant: str, row: list[Any]) -> CommandResult:
    if row[0] == "a":
        _, cid, fp, version, position, events = row
        return CommandResult(
            cid,
            "accepted",
            aggregate_id,
            version=version,
            position=position,
            events=events,
            fingerprint=fp,
            tenant=tenant,
        )
    _, cid, fp, code, reason, current = row
    return CommandResult(
        cid,
        "rejected",
        aggregate_id,
        code=code,
        reason=reason,
        current_version=current,
        fingerprint=fp,
        tenant=tenant,
    )
