"""Every schema parses, every event round-trips, and newer schemas read older data."""

from __future__ import annotations

import io
import struct
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import fastavro
import pytest
from fastavro.schema import to_parsing_canonical_form

from commands import CONTEXTS
from commands.context import BoundedContext
from commands.serialization import to_domain_event
from shared_kernel.avro import (
    MARKER,
    SCHEMAS_ROOT,
    AvroCodec,
    SchemaError,
    UnknownSchema,
    crc64_avro,
    load_schema,
)
from shared_kernel.domain import event_payload
from shared_kernel.envelope import EventMetadata

CODEC = AvroCodec.from_directory()
SCHEMA_FILES = sorted(SCHEMAS_ROOT.rglob("*.avsc"))

# One realistic payload per event type: the round-trip test fails when a type has none.
SAMPLES: dict[str, dict[str, Any]] = {
    "datasets.DatasetRegistered": {
        "name": "Weather",
        "description": "Hourly",
        "owner": "climate",
        "tags": ["a"],
        "metadata": {"rows": "10"},
    },
    "datasets.DatasetDescribed": {"name": "Weather", "description": "Daily"},
    "datasets.MetadataSet": {"key": "licence", "value_json": '{"name":"CC-BY"}'},
    "datasets.MetadataRemoved": {"key": "licence"},
    "datasets.VersionPublished": {"version": "1.2.3", "notes": "fixes"},
    "datasets.QualityCheckRecorded": {
        "metric": "completeness",
        "value": 0.97,
        "threshold": 0.95,
        "comparator": ">=",
        "passed": True,
        "measured_at": "2026-12-01T10:00:00+00:00",
    },
    "datasets.DatasetArchived": {"reason": "superseded"},
    "datasets.DatasetQualityDegraded": {
        "metric": "completeness",
        "window_start": "2026-12-01T00:00:00+00:00",
        "window_end": "2026-12-02T00:00:00+00:00",
        "checks": 20,
        "failed": 12,
        "failure_rate": 0.6,
        "threshold": 0.5,
        "check_version": 31,
    },
    "datasets.DatasetQualityRestored": {
        "metric": "completeness",
        "window_start": "2026-12-01T01:00:00+00:00",
        "window_end": "2026-12-02T01:00:00+00:00",
        "checks": 20,
        "failed": 2,
        "failure_rate": 0.1,
        "threshold": 0.2,
        "check_version": 52,
        "degraded_check_version": 31,
    },
    "incidents.IncidentOpened": {
        "title": "DB down",
        "description": "d",
        "priority": "high",
        "source": "pager",
        "external_id": "PD-1",
    },
    "incidents.IncidentAssigned": {"assignee": "alice"},
    "incidents.IncidentStatusChanged": {"from_status": "open", "to_status": "in_progress", "reason": ""},
    "incidents.IncidentCommented": {"author": "bob", "body": "on it"},
    "incidents.IncidentEscalated": {
        "level": 1,
        "deadline": "assignment",
        "due_at": "2026-12-01T10:15:00+00:00",
    },
    "webhooks.WebhookRegistered": {
        "url": "https://hooks.example.com/in",
        "contexts": ["incidents"],
        "event_types": ["incidents.IncidentOpened"],
        "description": "pager",
    },
    "webhooks.WebhookPaused": {"reason": "maintenance"},
    "webhooks.WebhookResumed": {"from_status": "paused"},
    "webhooks.WebhookSecretRotated": {
        "generation": 4,
        "previous_generation": 1,
        "previous_until": "2026-12-02T10:00:00+00:00",
    },
    "webhooks.WebhookDeleted": {},
    "webhooks.WebhookFailing": {"reason": "timed out", "since": "2026-12-01T10:00:00+00:00"},
    "webhooks.WebhookDisabled": {"reason": "410 Gone"},
}


def test_the_fingerprint_is_the_avro_specs_crc64() -> None:
    # Test vectors from the Avro specification's canonical form of primitive types.
    assert crc64_avro(b'"int"') == 0x7275D51A3F395C8F
    assert crc64_avro(b'"string"') == 0x8F014872634503C7


@pytest.mark.parametrize("path", SCHEMA_FILES, ids=lambda p: str(p.relative_to(SCHEMAS_ROOT)))
def test_every_schema_file_parses_and_names_its_context(path: Path) -> None:
    version = load_schema(path)
    context = path.relative_to(SCHEMAS_ROOT).parts[0]
    assert version.full_name.startswith(f"{context}.")
    assert version.full_name.split(".")[-1] == path.name.split(".")[0]


def test_every_event_class_has_a_schema_and_a_sample_and_nothing_is_left_over() -> None:
    declared = {name for ctx in CONTEXTS for name in ctx.events}
    assert declared == set(CODEC.type_names) == set(SAMPLES)


@pytest.mark.parametrize(
    ("context", "type_name"), [(ctx, name) for ctx in CONTEXTS for name in ctx.events], ids=lambda v: str(v)
)
def test_every_event_round_trips_through_the_codec_and_back_into_the_domain(
    context: BoundedContext, type_name: str
) -> None:
    data = CODEC.encode(type_name, SAMPLES[type_name])
    assert data[:2] == MARKER
    assert struct.unpack_from("<Q", data, 2)[0] == CODEC.current(type_name).fingerprint
    decoded_name, record = CODEC.decode(data)
    assert (decoded_name, record) == (type_name, SAMPLES[type_name])
    metadata = EventMetadata(
        uuid4(), type_name, context.aggregate_type, str(uuid4()), 3, datetime.now(UTC), "c", "c"
    )
    event = to_domain_event(context, metadata, record)
    assert event_payload(event) == record


def _write_with(schema_path: Path, record: dict[str, Any]) -> bytes:
    """Encode as an old producer would have: single-object encoding with that file's schema."""
    parsed = fastavro.parse_schema(fastavro.schema.load_schema(str(schema_path)))
    buf = io.BytesIO()
    buf.write(MARKER + struct.pack("<Q", crc64_avro(to_parsing_canonical_form(parsed).encode())))
    fastavro.schemaless_writer(buf, parsed, record)
    return buf.getvalue()


@pytest.mark.parametrize(
    "old", sorted(SCHEMAS_ROOT.rglob("history/*.avsc")), ids=lambda p: str(p.relative_to(SCHEMAS_ROOT))
)
def test_the_current_schema_reads_every_older_version(old: Path) -> None:
    old_version = load_schema(old)
    current = CODEC.current(old_version.full_name).parsed
    sample = SAMPLES[old_version.full_name]
    old_record = {f["name"]: sample[f["name"]] for f in old_version.parsed["fields"]}
    _, record = CODEC.decode(_write_with(old, old_record))
    for f in current["fields"]:
        expected = old_record[f["name"]] if f["name"] in old_record else f["default"]
        assert record[f["name"]] == expected


def test_a_v1_quality_check_reads_as_a_greater_or_equal_comparison() -> None:
    old = SCHEMAS_ROOT / "datasets" / "history" / "QualityCheckRecorded.v1.avsc"
    data = _write_with(old, {"metric": "rows", "value": 10.0, "threshold": 5.0, "passed": True})
    assert CODEC.decode(data)[1] == {
        "metric": "rows",
        "value": 10.0,
        "threshold": 5.0,
        "comparator": ">=",
        "passed": True,
        "measured_at": None,
    }


def test_unknown_fingerprints_and_garbage_are_refused_with_schema_errors() -> None:
    with pytest.raises(UnknownSchema):
        CODEC.decode(MARKER + struct.pack("<Q", 12345) + b"\x00")
    with pytest.raises(SchemaError):
        CODEC.decode(b'{"json": true}')
    with pytest.raises(SchemaError):
        CODEC.decode(CODEC.encode("incidents.IncidentAssigned", {"assignee": "a"})[:10])
    with pytest.raises(SchemaError):
        CODEC.encode("incidents.IncidentAssigned", {"assignee": 42})
