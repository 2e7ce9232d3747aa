"""The AsyncAPI 3.0 document of the topics: what OpenAPI is to the HTTP routes.

Generated from the topic contract (`shared_kernel.topics.contract_topics`, with the
dead-letter topics of every consumer: the command processor, each projection, each
stream job, the audit sink) and the Avro schemas (`schemas/avro/<context>/`): one
channel per topic with its Kafka binding (partitions, replicas, retention, cleanup), one
message per event type with its headers (the event's identity and provenance), its key
(the aggregate id) and its payload as the Avro schema itself (the record is Avro
single-object encoded: the marker C3 01, the schema's 64-bit fingerprint, then the
body), and the earlier versions of each schema that consumers still read. Served at
`/asyncapi.json`, printed by `cqrs schemas asyncapi`.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any

from aiokafka.admin import NewTopic
from fastapi import APIRouter, Request

from api.auth.access import public
from shared_kernel.avro import AvroCodec
from shared_kernel.envelope import (
    H_ACTOR,
    H_AGGREGATE_ID,
    H_AGGREGATE_TYPE,
    H_AGGREGATE_VERSION,
    H_CAUSATION_ID,
    H_CORRELATION_ID,
    H_EVENT_ID,
    H_EVENT_TYPE,
    H_OCCURRED_AT,
    H_TENANT,
    H_TRACEPARENT,
)
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics, contract_topics, dlq_topic
from streams.dead_letters import consumers

AVRO = "application/vnd.apache.avro;version=1.9.0"
KAFKA_BINDING = "0.5.0"

EVENT_HEADERS: dict[str, Any] = {
    "type": "object",
    "description": "Kafka headers (UTF-8 values): the event's identity and provenance.",
    "required": [
        H_EVENT_ID,
        H_EVENT_TYPE,
        H_AGGREGATE_TYPE,
        H_AGGREGATE_ID,
        H_AGGREGATE_VERSION,
        H_OCCURRED_AT,
    ],
    "properties": {
        H_EVENT_ID: {"type": "string", "format": "uuid", "description": "Unique; the same on every replay."},
        H_EVENT_TYPE: {"type": "string", "description": "`<context>.<EventName>`, the Avro full name."},
        H_AGGREGATE_TYPE: {"type": "string"},
        H_AGGREGATE_ID: {"type": "string", "description": "Also the record's key."},
        H_AGGREGATE_VERSION: {"type": "string", "description": "1, 2, ... per aggregate, contiguous."},
        H_OCCURRED_AT: {"type": "string", "format": "date-time"},
        H_CORRELATION_ID: {"type": "string"},
        H_CAUSATION_ID: {"type": "string", "description": "The id of the command that caused it."},
        H_ACTOR: {"type": "string", "description": "Who sent the command."},
        H_TENANT: {"type": "string"},
        H_TRACEPARENT: {"type": "string", "description": "W3C trace context of the command."},
    },
}
DEAD_LETTER_HEADERS: dict[str, Any] = {
    "type": "object",
    "description": "The dead record's own headers, and why and where from.",
    "properties": {
        "dlq-error": {"type": "string", "description": "Why it could not be handled."},
        "dlq-source": {"type": "string", "description": "`topic:partition:offset` of the record."},
        "dlq-value-dropped": {
            "type": "string",
            "description": "Its size, when the value was too large to keep.",
        },
    },
}
AGGREGATE_KEY: dict[str, Any] = {"type": "string", "description": "The aggregate id (UTF-8)."}


def _binding(topic: NewTopic) -> dict[str, Any]:
    configs = topic.topic_configs or {}
    wanted: dict[str, Any] = {}
    if "cleanup.policy" in configs:
        wanted["cleanup.policy"] = configs["cleanup.policy"].split(",")
    for name in ("retention.ms", "retention.bytes", "max.message.bytes"):
        if name in configs:
            wanted[name] = int(configs[name])
    return {
        "kafka": {
            "topic": topic.name,
            "partitions": topic.num_partitions,
            "replicas": topic.replication_factor,
            "topicConfiguration": wanted,
            "bindingVersion": KAFKA_BINDING,
        }
    }


def _event_message(codec: AvroCodec, full_name: str, context: str) -> dict[str, Any]:
    current = codec.current(full_name)
    parsed = json.loads(current.path.read_text())
    older = [v for v in codec.versions if v.full_name == full_name and not v.current]
    return {
        "name": full_name,
        "title": full_name.rpartition(".")[2],
        "summary": parsed.get("doc", ""),
        "contentType": "application/vnd.apache.avro+binary",
        "headers": EVENT_HEADERS,
        "payload": {"schemaFormat": AVRO, "schema": parsed},
        "bindings": {"kafka": {"key": AGGREGATE_KEY, "bindingVersion": KAFKA_BINDING}},
        "tags": [{"name": context}],
        "x-schema-fingerprint": f"{current.fingerprint:016x}",
        "x-schema-file": f"schemas/avro/{current.path.parent.name}/{current.path.name}",
        "x-earlier-versions": [
            {"file": f"schemas/avro/{context}/history/{v.path.name}", "fingerprint": f"{v.fingerprint:016x}"}
            for v in sorted(older, key=lambda v: v.path.name)
        ],
    }


def document(settings: Settings) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of this deployment's topics (its prefix, partitions)."""
    from commands import CONTEXTS

    try:
        release = package_version("kafka-cqrs")
    except PackageNotFoundError:  # run from a checkout that is not installed
        release = "0.0.0"
    codec = AvroCodec.from_directory()
    t = Topics(settings.topic_prefix)
    topics = {nt.name: nt for nt in contract_topics(settings, [c.name for c in CONTEXTS])}
    for consumer in consumers():
        nt = dlq_topic(settings, consumer)
        topics[nt.name] = nt
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {
        "CommandEnvelope": {
            "name": "CommandEnvelope",
            "title": "A command for one aggregate",
            "summary": "Appended by `Prefer: respond-async` requests; the partition's owner decides it.",
            "contentType": "application/json",
            "payload": {
                "type": "object",
                "required": ["command_id", "command_type", "aggregate_id", "payload"],
                "properties": {
                    "command_id": {"type": "string"},
                    "command_type": {"type": "string", "description": "`<context>.<CommandName>`"},
                    "aggregate_id": {"type": "string"},
                    "payload": {"type": "object"},
                    "expected_version": {"type": ["integer", "null"]},
                    "actor": {"type": "string"},
                    "tenant": {"type": "string"},
                    "correlation_id": {"type": "string"},
                    "traceparent": {"type": "string"},
                    "reply_to": {"type": "string"},
                    "fingerprint": {"type": "string"},
                    "issued_at": {"type": "string"},
                    "retriable": {"type": "boolean"},
                },
            },
            "bindings": {"kafka": {"key": AGGREGATE_KEY, "bindingVersion": KAFKA_BINDING}},
        },
        "Snapshot": {
            "name": "Snapshot",
            "title": "An aggregate's state",
            "summary": "The command path's state store (compacted; internal, its bytes may change).",
            "contentType": "application/octet-stream",
            "payload": {"type": "string", "format": "binary"},
            "bindings": {"kafka": {"key": AGGREGATE_KEY, "bindingVersion": KAFKA_BINDING}},
        },
        "AuditRecord": {
            "name": "AuditRecord",
            "title": "One audited request or command outcome",
            "contentType": "application/json",
            "payload": {"type": "object", "required": ["id", "at", "tenant", "actor", "outcome"]},
            "bindings": {
                "kafka": {
                    "key": {"type": "string", "description": "The tenant."},
                    "bindingVersion": KAFKA_BINDING,
                }
            },
        },
        "DeadLetter": {
            "name": "DeadLetter",
            "title": "A record a consumer could not handle",
            "summary": "The record's key and value as they were, with why and where from in its headers.",
            "contentType": "application/octet-stream",
            "headers": DEAD_LETTER_HEADERS,
            "payload": {"type": "string", "format": "binary"},
        },
    }

    def channel(key: str, name: str, description: str, refs: list[str]) -> None:
        channels[key] = {
            "address": name,
            "description": description,
            "messages": {ref: {"$ref": f"#/components/messages/{ref}"} for ref in refs},
            "bindings": _binding(topics[name]),
        }

    channel("commands", t.commands, "Commands sent asynchronously, and the command log.", ["CommandEnvelope"])
    operations["sendCommand"] = {"action": "send", "channel": {"$ref": "#/channels/commands"}}
    for ctx in CONTEXTS:
        names = sorted(n for n in codec.type_names if n.startswith(f"{ctx.name}."))
        for full_name in names:
            messages[full_name] = _event_message(codec, full_name, ctx.name)
        key = f"events.{ctx.name}"
        channel(
            key,
            t.events(ctx.name),
            f"The events of the {ctx.name} context ({ctx.aggregate_type}), in order per aggregate; kept "
            "forever. Written in transactions: read them read_committed.",
            names,
        )
        operations[f"receive.{ctx.name}"] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{key}"},
            "summary": f"Follow the {ctx.name} events (projections, stream jobs, webhooks do).",
        }
        channel(
            f"state.{ctx.name}", t.state(ctx.name), f"Snapshots of the {ctx.name} aggregates.", ["Snapshot"]
        )
    audit = t.audit(settings.audit_topic_suffix)
    channel("audit", audit, "The audit trail (kept a year; also in PostgreSQL).", ["AuditRecord"])
    for consumer in consumers():
        channel(f"dlq.{consumer}", t.dlq(consumer), f"What {consumer} dead-lettered.", ["DeadLetter"])
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": f"{settings.service_name} topics",
            "version": release,
            "description": "The Kafka topics of a kafka-cqrs deployment, their records and their schemas.",
        },
        "defaultContentType": "application/vnd.apache.avro+binary",
        "servers": {
            "kafka": {
                "host": settings.kafka_bootstrap,
                "protocol": "kafka",
                "description": "The deployment's brokers.",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }


router = APIRouter(tags=["schemas"])
_served: dict[int, dict[str, Any]] = {}


@router.get("/asyncapi.json", operation_id="asyncapi", dependencies=[public()])
async def asyncapi(request: Request) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of this deployment's topics, their messages and schemas
    (public, like `/openapi.json`: it holds no data)."""
    settings = request.app.state.settings
    if id(settings) not in _served:
        _served[id(settings)] = document(settings)
    return _served[id(settings)]
