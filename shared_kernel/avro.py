"""Avro codec with Avro single-object encoding.

Every record is `C3 01` + the 8-byte little-endian CRC-64-AVRO fingerprint of the
writer schema's parsing canonical form + the Avro binary body, so each record names
its exact writer schema. Schemas are `.avsc` files under `schemas/avro/<context>/`
(the current version of each type) and `schemas/avro/<context>/history/` (every
older version, kept so old records stay readable). Decoding resolves the writer
schema found by fingerprint against the current schema of the same full name.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import to_parsing_canonical_form

MARKER = b"\xc3\x01"
SCHEMAS_ROOT = Path(__file__).resolve().parent.parent / "schemas" / "avro"
_EMPTY = 0xC15D213AA4D7A795


def _fingerprint_table() -> list[int]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (_EMPTY if fp & 1 else 0)
        table.append(fp)
    return table


_TABLE = _fingerprint_table()


def crc64_avro(data: bytes) -> int:
    """The Rabin fingerprint the Avro specification calls CRC-64-AVRO."""
    fp = _EMPTY
    for byte in data:
        fp = (fp >> 8) ^ _TABLE[(fp ^ byte) & 0xFF]
    return fp


class SchemaError(ValueError):
    """A record or a schema file cannot be used."""


class UnknownSchema(SchemaError):
    """The record names a writer schema (fingerprint) or a type this codec does not know."""


@dataclass(frozen=True)
class SchemaVersion:
    """One parsed schema file."""

    full_name: str
    fingerprint: int
    parsed: Any
    path: Path
    current: bool

    @property
    def header(self) -> bytes:
        return MARKER + struct.pack("<Q", self.fingerprint)


def load_schema(path: Path) -> SchemaVersion:
    try:
        raw = json.loads(path.read_text())
        parsed = fastavro.parse_schema(raw)
    except (ValueError, fastavro.schema.SchemaParseException) as exc:
        raise SchemaError(f"{path}: {exc}") from exc
    if not isinstance(parsed, dict):
        raise SchemaError(f"{path}: the top level must be a named record schema")
    name = str(parsed["name"])
    canonical = to_parsing_canonical_form(parsed)
    return SchemaVersion(
        full_name=name,
        fingerprint=crc64_avro(canonical.encode()),
        parsed=parsed,
        path=path,
        current=path.parent.name != "history",
    )


class AvroCodec:
    """Encodes records with the current schema of their type; decodes any known version."""

    def __init__(self, versions: list[SchemaVersion]) -> None:
        self._by_fingerprint: dict[int, SchemaVersion] = {}
        self._current: dict[str, SchemaVersion] = {}
        for v in versions:
            if v.fingerprint in self._by_fingerprint and self._by_fingerprint[v.fingerprint].path != v.path:
                other = self._by_fingerprint[v.fingerprint].path
                raise SchemaError(f"{v.path} and {other} have the same canonical form")
            self._by_fingerprint[v.fingerprint] = v
            if v.current:
                if v.full_name in self._current:
                    raise SchemaError(
                        f"two current schemas for {v.full_name}: {v.path}, {self._current[v.full_name].path}"
                    )
                self._current[v.full_name] = v
        orphans = {v.full_name for v in versions} - set(self._current)
        if orphans:
            raise SchemaError(f"history without a current schema: {sorted(orphans)}")

    @classmethod
    def from_directory(cls, root: Path = SCHEMAS_ROOT) -> AvroCodec:
        return cls([load_schema(p) for p in sorted(root.rglob("*.avsc"))])

    @property
    def type_names(self) -> list[str]:
        return sorted(self._current)

    @property
    def versions(self) -> list[SchemaVersion]:
        return list(self._by_fingerprint.values())

    def current(self, full_name: str) -> SchemaVersion:
        try:
            return self._current[full_name]
        except KeyError:
            raise UnknownSchema(f"no schema for type {full_name!r}") from None

    def encode(self, full_name: str, record: Mapping[str, Any], schema: SchemaVersion | None = None) -> bytes:
        """Single-object encoding with the current schema (or the given version)."""
        version = schema or self.current(full_name)
        buf = io.BytesIO()
        buf.write(version.header)
        try:
            fastavro.schemaless_writer(buf, version.parsed, record)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise SchemaError(f"{full_name}: record does not match {version.path.name}: {exc}") from exc
        return buf.getvalue()

    def decode(self, data: bytes) -> tuple[str, dict[str, Any]]:
        """The type name and the record, resolved to the current schema of its type."""
        if len(data) < 10 or data[:2] != MARKER:
            raise SchemaError("not an Avro single-object encoded record")
        (fingerprint,) = struct.unpack_from("<Q", data, 2)
        writer = self._by_fingerprint.get(fingerprint)
        if writer is None:
            raise UnknownSchema(f"unknown writer schema fingerprint {fingerprint:016x}")
        reader = self._current[writer.full_name]
        try:
            record = fastavro.schemaless_reader(
                io.BytesIO(data[10:]), writer.parsed, None if reader is writer else reader.parsed
            )
        except (EOFError, ValueError, TypeError, IndexError, fastavro.read.SchemaResolutionError) as exc:
            raise SchemaError(f"cannot decode {writer.full_name}: {exc}") from exc
        if not isinstance(record, dict):
            raise SchemaError(f"{writer.full_name} is not a record schema")
        return writer.full_name, record
