"""The AsyncAPI document: valid against the AsyncAPI 3.0.0 JSON schema (the official
one, from the `@asyncapi/specs` package on the npm registry, fetched once and checked
against its published integrity), and complete: every topic of the contract and every
dead-letter topic is a channel, every schema file in the repository is named."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import tarfile
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest

from api.asyncapi import document
from commands import CONTEXTS
from shared_kernel.avro import SCHEMAS_ROOT
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics, contract_topics
from streams.dead_letters import consumers

SPECS = "https://registry.npmjs.org/@asyncapi/specs/-/specs-6.11.1.tgz"
SPECS_SHA512 = "A3WBLqAKGoJ2+6FWFtpjBlCQ1oFCcs4GxF7zsIGvNqp/klGUHjlA3aAcZ9XMMpLGE8zPeYDz2x9FmO6DSuKraQ=="
MEMBER = "package/schemas/3.0.0-without-$id.json"


def asyncapi_schema() -> dict[str, Any]:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kafka-cqrs-stack" / "npm"
    tarball = cache / SPECS.rpartition("/")[2]
    if not tarball.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(SPECS, timeout=60) as answer:
            data = answer.read()
        tmp = tarball.with_suffix(".part")
        tmp.write_bytes(data)
        tmp.replace(tarball)
    data = tarball.read_bytes()
    assert base64.b64encode(hashlib.sha512(data).digest()).decode() == SPECS_SHA512, (
        "the tarball is not the published one"
    )
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = tar.extractfile(MEMBER)
        assert member is not None
        return dict(json.load(member))


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return document(Settings(topic_prefix="acme", partitions=6))


def test_the_document_validates_against_the_asyncapi_3_schema(doc: dict[str, Any]) -> None:
    validator = jsonschema_rs.Draft7Validator(asyncapi_schema())
    assert [e.message for e in validator.iter_errors(doc)] == []
    broken = json.loads(json.dumps(doc))
    broken["channels"]["commands"]["bindings"]["kafka"]["partitions"] = "six"
    assert not validator.is_valid(broken)  # the check is not a formality


def test_every_topic_and_every_schema_is_in_it(doc: dict[str, Any]) -> None:
    settings = Settings(topic_prefix="acme", partitions=6)
    addresses = {c["address"]: c for c in doc["channels"].values()}
    topics = Topics("acme")
    wanted = {t.name for t in contract_topics(settings, [c.name for c in CONTEXTS])}
    wanted |= {topics.dlq(consumer) for consumer in consumers()}
    assert wanted == set(addresses)
    assert addresses["acme.events.incidents"]["bindings"]["kafka"]["partitions"] == 6
    assert addresses["acme.events.incidents"]["bindings"]["kafka"]["topicConfiguration"]["retention.ms"] == -1
    named = set()
    for name, message in doc["components"]["messages"].items():
        if "x-schema-file" in message:
            named.add(message["x-schema-file"])
            named.update(v["file"] for v in message["x-earlier-versions"])
            assert message["payload"]["schema"]["name"] == name.rpartition(".")[2]
    files = {f"schemas/avro/{p.relative_to(SCHEMAS_ROOT)}" for p in SCHEMAS_ROOT.rglob("*.avsc")}
    assert files == named
    for ctx in CONTEXTS:
        events = addresses[f"acme.events.{ctx.name}"]["messages"]
        assert set(events) == {n for n in ctx.events}, ctx.name
