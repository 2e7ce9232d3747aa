"""What a bounded context gives the shared write-side machinery.

A context is an aggregate class, a declarative table of command handlers (each says
whether it creates the aggregate or acts on an existing one) and the table of its
event types (Avro full names). Type names are explicit strings, never module paths,
so moving code never breaks replay.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any
from uuid import UUID

from shared_kernel.domain import AggregateRoot, InvalidCommand
from shared_kernel.envelope import CommandEnvelope

Command = Any


@dataclass(frozen=True)
class Handler:
    """How one command type is handled: on a new aggregate, or on an existing one."""

    command: type[Any]
    creates: bool
    create: Callable[[Any], AggregateRoot] | None = None
    act: Callable[[Any, Any], None] | None = None
    aggregate_id: Callable[[Any], UUID] = lambda c: c.__dict__[dataclasses.fields(c)[0].name]


def creates(command: type[Any], create: Callable[[Any], AggregateRoot]) -> Handler:
    return Handler(command=command, creates=True, create=create)


def acts_on(command: type[Any], act: Callable[[Any, Any], None]) -> Handler:
    return Handler(command=command, creates=False, act=act)


@dataclass(frozen=True)
class BoundedContext:
    """One context's aggregate, command handlers and event types."""

    name: str
    aggregate: type[AggregateRoot]
    handlers: tuple[Handler, ...]
    event_names: tuple[str, ...]  # the aggregate's @event names; the Avro name is "<context>.<name>"

    @property
    def aggregate_type(self) -> str:
        return f"{self.name}.{self.aggregate.__name__}"

    @property
    def commands(self) -> Mapping[str, Handler]:
        return {f"{self.name}.{h.command.__name__}": h for h in self.handlers}

    @property
    def events(self) -> Mapping[str, type[Any]]:
        """Avro full name -> event class."""
        return {f"{self.name}.{n}": getattr(self.aggregate, n) for n in self.event_names}

    def command_type(self, command: Command) -> str:
        return f"{self.name}.{type(command).__name__}"

    def event_type(self, event: Any) -> str:
        return f"{self.name}.{type(event).__name__}"

    def envelope(self, command: Command, command_id: str, **fields: Any) -> CommandEnvelope:
        """`command` as the command path carries it, addressed to its aggregate."""
        command_type = self.command_type(command)
        return CommandEnvelope(
            command_id=command_id,
            command_type=command_type,
            aggregate_id=str(self.handler(command_type).aggregate_id(command)),
            payload=command_payload(command),
            **fields,
        )

    def handler(self, command_type: str) -> Handler:
        try:
            return self.commands[command_type]
        except KeyError:
            raise InvalidCommand(f"unknown command type {command_type!r}", field="command_type") from None


def command_payload(command: Command) -> dict[str, Any]:
    """A command as JSON-ready fields (UUIDs as strings)."""
    return {f.name: _jsonable(getattr(command, f.name)) for f in dataclasses.fields(command)}


def command_from_payload(command_cls: Any, payload: Mapping[str, Any]) -> Command:
    """Rebuild a command from its payload, turning UUID-typed fields back into UUIDs."""
    names = {f.name for f in dataclasses.fields(command_cls)}
    unknown = set(payload) - names
    if unknown:
        raise InvalidCommand(f"unknown field(s) {sorted(unknown)}", field=sorted(unknown)[0])
    values = dict(payload)
    for name in _uuid_fields(command_cls):
        if isinstance(values.get(name), str):
            try:
                values[name] = UUID(values[name])
            except ValueError:
                raise InvalidCommand(f"{name} is not a UUID", field=name) from None
    try:
        return command_cls(**values)
    except TypeError as exc:
        raise InvalidCommand(str(exc)) from exc


@cache
def _uuid_fields(command_cls: Any) -> tuple[str, ...]:
    hints = typing.get_type_hints(command_cls)
    return tuple(name for name, hint in hints.items() if hint is UUID)


def _jsonable(value: Any) -> Any:
    return str(value) if isinstance(value, UUID) else value
