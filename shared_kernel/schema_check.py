"""Schema checks run by `cqrs schemas check`: coverage and backward compatibility.

Compatibility is proved on real encoded data: a record is generated for every older
schema version, encoded with it, and decoded through the codec with the current one.
"""

from __future__ import annotations

import io
from typing import Any

import fastavro

from shared_kernel.avro import AvroCodec, SchemaError, SchemaVersion


def sample(schema: Any) -> Any:
    """A value of the given (parsed) Avro schema."""
    if isinstance(schema, list):  # union: its first branch
        return sample(schema[0])
    if isinstance(schema, str):
        return {
            "null": None,
            "boolean": True,
            "int": 1,
            "long": 1,
            "float": 1.0,
            "double": 1.0,
            "bytes": b"x",
            "string": "x",
        }.get(schema, "x")
    kind = schema.get("type")
    if schema.get("logicalType") == "uuid":
        return "00000000-0000-0000-0000-000000000001"
    if kind == "record":
        return {f["name"]: sample(f["type"]) for f in schema["fields"]}
    if kind == "array":
        return [sample(schema["items"])]
    if kind == "map":
        return {"k": sample(schema["values"])}
    if kind == "enum":
        return schema["symbols"][0]
    if kind == "fixed":
        return b"\0" * schema["size"]
    return sample(kind)


def encode_with(version: SchemaVersion, record: Any) -> bytes:
    buf = io.BytesIO()
    buf.write(version.header)
    fastavro.schemaless_writer(buf, version.parsed, record)
    return buf.getvalue()


def check(codec: AvroCodec, declared: set[str]) -> list[str]:
    problems = [f"event type {n} has no schema" for n in sorted(declared - set(codec.type_names))]
    problems += [f"schema {n} belongs to no event type" for n in sorted(set(codec.type_names) - declared)]
    for version in codec.versions:
        try:
            name, _ = codec.decode(encode_with(version, sample(version.parsed)))
        except (SchemaError, ValueError, TypeError) as exc:
            problems.append(f"{version.path.name}: the current {version.full_name} cannot read it: {exc}")
            continue
        if name != version.full_name:
            problems.append(f"{version.path.name} decoded as {name}")
    return problems
