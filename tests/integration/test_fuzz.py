"""Schemathesis against the real API, over its whole OpenAPI document, then the read side.

The real write side (a command processor and the API) and a projector per projection
run under a topic prefix of their own (`tests/integration/harness.py`). The schema is
loaded from the running API's `/openapi.json` (`schemathesis.openapi.from_url`), and
each operation is run with hypothesis, positive and negative data (schema-valid and
schema-violating requests), against the live process over HTTP. Path ids are mostly
those of aggregates that exist, so commands reach the aggregates rather than 404.

It fails on:

- any 5xx other than a 503 or 504 that carries `Retry-After` or is documented for the
  operation, and on a request the API does not answer (connection dropped, no answer
  in 30 s);
- any command the API accepted (2xx on POST/PUT/PATCH/DELETE) whose events a
  projection then dead-lettered: once every projection has reached the positions of
  all accepted commands (their consistency tokens, merged), `GET /api/v1/admin/
  projections` must count no dead letter, and neither the projections' nor the
  command processor's dead-letter topics may hold a record.

The stream endpoints (`.../stream`, endless Server-Sent Events) are opened with a short
read timeout and judged on their status and headers only; their body is never read.
The WebSocket is not in the OpenAPI document.

Bounded: `MAX_EXAMPLES` examples per operation and generation mode (12; 64 runs), in a
wall-clock budget of `BUDGET_S` (150 s; a run out of its share of it sends nothing
new), derandomized so that CI sends the same requests every time. `FUZZ_MAX_EXAMPLES`
and `FUZZ_BUDGET_S` make a deeper local run. The report in an assertion names each
failure's operation, status and the request as a curl command line.

What the fuzzing found is kept below it as ordinary regression tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.result import Ok

from projections.registry import PROJECTIONS
from shared_kernel.position import PositionToken
from shared_kernel.settings import Settings
from shared_kernel.topics import Topics
from tests.auth import bearer
from tests.integration.harness import WriteSide, read_records

pytestmark = pytest.mark.asyncio(loop_scope="session")

MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "12"))  # per operation and mode
BUDGET_S = float(os.environ.get("FUZZ_BUDGET_S", "150"))  # the whole fuzzing, wall clock
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
REQUEST_TIMEOUT_S = 30.0  # a command waits 10 s for its result, a query 5 s for its token
STREAM_HEADERS_TIMEOUT_S = 10.0  # a stream's status and headers; its body is never read
CATCH_UP_S = 120.0
COMMAND_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
RETRYABLE = {503, 504}
Operation = schemathesis.APIOperation[Any, Any, Any, Any]


@pytest.fixture(scope="module")
async def side(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WriteSide]:
    ws = await WriteSide.everything(settings, tmp_path_factory.mktemp("fuzz"))
    yield ws
    ws.stop()


# ---- the fuzzing ---------------------------------------------------------------------


@dataclass
class Failure:
    operation: str
    mode: str
    problem: str
    curl: str


@dataclass
class Accepted:
    operation: str
    curl: str
    aggregate_id: str
    version: int | None
    position: str


@dataclass
class Fuzzing:
    """What one fuzzing run saw."""

    failures: list[Failure] = field(default_factory=list)
    accepted: list[Accepted] = field(default_factory=list)
    statuses: dict[str, dict[int, int]] = field(default_factory=dict)
    unsent: int = 0  # cases httpx would not send (e.g. a header it refuses)
    seconds: dict[str, float] = field(default_factory=dict)  # spent per operation
    out_of_time: int = 0

    def token(self) -> PositionToken:
        token = PositionToken({})
        for a in self.accepted:
            token = token.merge(PositionToken.decode(a.position))
        return token


@dataclass(frozen=True)
class Known:
    """Aggregates and names that exist: most path ids are drawn from them."""

    ids: dict[str, list[str]]  # path parameter name -> values

    def substitute(self, operation: Operation, path: dict[str, Any], pick: int) -> None:
        if pick == 0:
            return  # keep what schemathesis generated
        for name in list(path):
            values = self.ids.get(name, [])
            if name == "name" and operation.method.upper() != "GET":
                continue  # no rebuild or rollback of a real projection from here
            if values:
                path[name] = values[(pick - 1) % len(values)]


def judge(operation: Operation, status: int, headers: httpx.Headers) -> str | None:
    """Why this answer is a failure, or None."""
    if status < 500:
        return None
    if status in RETRYABLE and ("retry-after" in headers or str(status) in operation.responses.status_codes):
        return None
    return f"{status} without Retry-After" if status in RETRYABLE else f"{status}"


def _is_stream(operation: Operation) -> bool:
    return operation.path.endswith("/stream")


def _request(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A schemathesis case's transport arguments (requests' vocabulary) for httpx."""
    headers = {k: v for k, v in kwargs.get("headers", {}).items() if k.lower() != "x-schemathesis-testcaseid"}
    out: dict[str, Any] = {"method": kwargs["method"], "url": kwargs["url"], "headers": headers}
    if kwargs.get("params"):
        out["params"] = kwargs["params"]
    if kwargs.get("cookies"):
        out["cookies"] = kwargs["cookies"]
    if "json" in kwargs:
        out["content"] = json.dumps(kwargs["json"], allow_nan=True).encode()
    elif kwargs.get("data") is not None:
        data = kwargs["data"]
        out["content"] = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    return out


def _key(request: dict[str, Any]) -> str:
    return repr(
        (
            request["method"],
            request["url"],
            sorted(request["headers"].items()),
            sorted((request.get("params") or {}).items(), key=repr),
            request.get("content"),
        )
    )


def _curl(request: dict[str, Any]) -> str:
    url = httpx.URL(request["url"], params=request.get("params"))
    parts = [f"curl -X {request['method']} '{url}'"]
    parts += [f"-H '{k}: {v}'" for k, v in request["headers"].items() if k.lower() not in _NOISE]
    if request.get("content") is not None:
        parts.append(f"--data-binary {request['content']!r}")
    text = " ".join(parts)
    return text if len(text) <= 1500 else text[:1500] + " ..."


_NOISE = {"user-agent", "accept-encoding", "accept", "connection"}


class Fuzzer:
    """Runs every operation of the schema, each with its share of the budget."""

    def __init__(self, schema: schemathesis.BaseSchema, base_url: str, known: Known) -> None:
        self.schema = schema
        self.base_url = base_url
        self.known = known
        self.seen = Fuzzing()
        limits = httpx.Limits(keepalive_expiry=2.0)
        # an admin of the test tenant: every route is reachable (the authorization matrix is
        # tests/integration/test_identity.py)
        self.client = httpx.Client(timeout=REQUEST_TIMEOUT_S, limits=limits, headers=bearer())

    def run(self, budget_s: float) -> Fuzzing:
        operations = []
        for found in self.schema.get_all_operations():
            if isinstance(found, Ok):
                operations.append(found.ok())
            else:  # an operation schemathesis cannot read is a fault of the document
                self.seen.failures.append(Failure("?", "-", f"invalid schema: {found.err()}", ""))
        runs = [(op, mode) for op in operations for mode in MODES]
        end = time.monotonic() + budget_s
        try:
            for i, (operation, mode) in enumerate(runs):
                share = max(0.0, end - time.monotonic()) / (len(runs) - i)
                t0 = time.monotonic()
                self._fuzz(operation, mode, t0 + share)
                spent = self.seen.seconds.get(operation.label, 0.0)
                self.seen.seconds[operation.label] = spent + time.monotonic() - t0
        finally:
            self.client.close()
        return self.seen

    def _send(self, operation: Operation, request: dict[str, Any]) -> str | None:
        """Send one request; why its answer fails, or None."""
        label = operation.label
        try:
            if _is_stream(operation):
                timeout = httpx.Timeout(REQUEST_TIMEOUT_S, read=STREAM_HEADERS_TIMEOUT_S)
                with self.client.stream(**request, timeout=timeout) as response:
                    status, headers = response.status_code, response.headers
                    body = b""  # endless: status and headers only
            else:
                response = self.client.request(**request)
                status, headers, body = response.status_code, response.headers, response.content
        except (httpx.LocalProtocolError, httpx.InvalidURL, UnicodeEncodeError):
            self.seen.unsent += 1  # httpx would not send it: nothing the server saw
            return None
        except httpx.TransportError as exc:
            return f"no answer: {type(exc).__name__}: {exc}"
        counts = self.seen.statuses.setdefault(label, {})
        counts[status] = counts.get(status, 0) + 1
        if (
            200 <= status < 300
            and request["method"] in COMMAND_METHODS
            and "/admin/" not in operation.path
            and "/integrations/" not in operation.path  # several commands each: their own tests
            and not operation.path.endswith("/stream-tickets")
        ):
            answer = json.loads(body)
            self.seen.accepted.append(
                Accepted(label, _curl(request), answer["id"], answer.get("version"), answer["position"])
            )
        problem = judge(operation, status, headers)
        if problem is not None:
            return f"{problem}: {body[:300]!r}"
        return None

    def _fuzz(self, operation: Operation, mode: GenerationMode, deadline: float) -> None:
        answers: dict[str, str | None] = {}  # a request sent once is judged by its first answer
        last: list[tuple[str, str]] = []  # the last failing request (the minimal one, after shrinking)

        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.explicit, Phase.generate, Phase.shrink],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode), pick=st.integers(0, 3))
        def run(case: schemathesis.Case[Any], pick: int) -> None:
            self.known.substitute(operation, case.path_parameters or {}, pick)
            request = _request(case.as_transport_kwargs(base_url=self.base_url))
            key = _key(request)
            if key not in answers:
                if time.monotonic() > deadline and not last:
                    self.seen.out_of_time += 1
                    return  # out of this operation's share of the budget
                answers[key] = self._send(operation, request)
            problem = answers[key]
            if problem is not None:
                last.append((problem, _curl(request)))
                raise AssertionError(problem)

        try:
            run()
        except Unsatisfiable:
            return  # nothing to negate (an operation without parameters): no negative data
        except Exception as exc:
            problem, curl = last[-1] if last else (f"{type(exc).__name__}: {exc}", "")
            self.seen.failures.append(Failure(operation.label, mode.value, problem, curl))


# ---- the read side after it ------------------------------------------------------------


async def caught_up(client: httpx.AsyncClient, token: PositionToken) -> dict[str, Any]:
    """The projections' state once each has reached `token` on its topics."""
    deadline = time.monotonic() + CATCH_UP_S
    while True:
        r = await client.get("/api/v1/admin/projections")
        if r.status_code == 200:
            projections: dict[str, Any] = r.json()["projections"]
            behind = [
                name
                for name, p in projections.items()
                for pos in p["positions"]
                if pos["next_offset"] < token.offsets.get(pos["topic"], {}).get(pos["partition"], 0)
            ]
            if not behind:
                return projections
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"projections never reached the accepted commands: {sorted(set(behind))}"
                )
        elif time.monotonic() > deadline:
            raise AssertionError(f"admin/projections answers {r.status_code}: {r.text[:300]}")
        await asyncio.sleep(0.5)


async def dead_letters(settings: Settings, consumers: list[str]) -> list[dict[str, str]]:
    """Every record of the consumers' dead-letter topics, by its headers."""
    topics = Topics(settings.topic_prefix)
    dlqs = [topics.dlq(name) for name in consumers]
    return [
        {"topic": r.topic, **{k: v.decode(errors="replace") for k, v in r.headers}}
        for r in await read_records(settings, dlqs, isolation_level="read_uncommitted")
    ]


def report(seen: Fuzzing, projections: dict[str, Any], letters: list[dict[str, str]]) -> str:
    lines = [f"{len(seen.failures)} failing operation(s):"]
    lines += [f"- {f.operation} [{f.mode}]: {f.problem}\n    {f.curl}" for f in seen.failures]
    counted = {n: p["dead_lettered"] for n, p in projections.items() if p["dead_lettered"]}
    lines.append(f"dead letters counted: {counted or 'none'}")
    for name, p in projections.items():
        if p["dead_lettered"]:
            lines.append(f"- {name}: last error {str(p['last_error'])[:300]}")
    by_event = {(a.aggregate_id, a.version): a for a in seen.accepted}
    for letter in letters:
        version = letter.get("aggregate-version")
        command = by_event.get((letter.get("aggregate-id", ""), int(version) if version else None))
        lines.append(
            f"- {letter['topic']}: {letter.get('event-type', '?')} of {letter.get('aggregate-id', '?')} "
            f"v{version}: {letter.get('dlq-error', '?')[:300]}"
            + (f"\n    from {command.operation}: {command.curl}" if command else "")
        )
    return "\n".join(lines)


async def seed(client: httpx.AsyncClient) -> Known:
    """Aggregates for the fuzzing to act on: datasets and incidents in several states."""
    datasets, incidents = [], []
    for i in range(3):
        r = await client.post(
            "/api/v1/datasets",
            json={"name": f"fuzz {i}", "tags": ["fuzz"], "metadata": {"k": i}},
            headers={"Idempotency-Key": f"fuzz-seed-dataset-{i}"},
        )
        assert r.status_code == 201, r.text
        datasets.append(r.json()["id"])
        r = await client.post(
            "/api/v1/incidents",
            json={"title": f"fuzz {i}"},
            headers={"Idempotency-Key": f"fuzz-seed-incident-{i}"},
        )
        assert r.status_code == 201, r.text
        incidents.append(r.json()["id"])
    r = await client.post(f"/api/v1/incidents/{incidents[1]}/status", json={"status": "in_progress"})
    assert r.status_code == 200, r.text
    return Known(
        {
            "dataset_id": datasets,
            "incident_id": incidents,
            "key": ["k", "other"],
            "name": list(PROJECTIONS),
            "rebuild_id": ["1"],
        }
    )


async def test_the_whole_api_answers_without_5xx_and_projects_what_it_accepts(
    side: WriteSide, client: httpx.AsyncClient
) -> None:
    known = await seed(client)
    started = time.monotonic()
    schema = await asyncio.to_thread(schemathesis.openapi.from_url, f"{side.api_url}/openapi.json")
    seen = await asyncio.to_thread(Fuzzer(schema, side.api_url, known).run, BUDGET_S)
    fuzzed_s = time.monotonic() - started
    projections = await caught_up(client, seen.token())
    letters = await dead_letters(side.settings, [*PROJECTIONS, "command-processor"])
    sent = sum(sum(c.values()) for c in seen.statuses.values())
    print(
        f"fuzzing: {sent} requests in {fuzzed_s:.0f} s, {len(seen.accepted)} commands accepted, "
        f"{seen.unsent} unsendable, {seen.out_of_time} skipped out of time"
    )
    for label, counts in seen.statuses.items():
        print(f"  {label}: {dict(sorted(counts.items()))} in {seen.seconds.get(label, 0):.1f} s")
    failed = seen.failures or letters or any(p["dead_lettered"] for p in projections.values())
    assert not failed, report(seen, projections, letters)
    assert seen.accepted, "no command was accepted: the fuzzing reached no aggregate"


# ---- its finds, as ordinary regression tests -------------------------------------------


async def _projected_everywhere(client: httpx.AsyncClient, side: WriteSide, answer: dict[str, Any]) -> None:
    """Every projection reached the command's position and dead-lettered none of its
    aggregate's events (other tests' dead letters are not this one's)."""
    await caught_up(client, PositionToken.decode(answer["position"]))
    letters = await dead_letters(side.settings, list(PROJECTIONS))
    mine = [
        (x["topic"], x.get("event-type"), x.get("dlq-error"))
        for x in letters
        if x.get("aggregate-id") == answer["id"]
    ]
    assert not mine, mine


HOSTILE_BODIES: list[tuple[str, str, bytes]] = [
    # (what, route, raw JSON body): each must be refused (4xx) or projected everywhere
    ("NUL in a text field", "/api/v1/datasets", b'{"name": "a\\u0000b"}'),
    ("NUL in a metadata key", "/api/v1/datasets", b'{"name": "n", "metadata": {"\\u0000": 1}}'),
    ("NUL in a metadata value", "/api/v1/datasets", b'{"name": "n", "metadata": {"k": "\\u0000"}}'),
    ("lone surrogate, escaped", "/api/v1/datasets", b'{"name": "\\ud800"}'),
    ("lone surrogate, as UTF-8 bytes", "/api/v1/datasets", b'{"name": "\xed\xa0\x80"}'),
    ("lone surrogate in a metadata key", "/api/v1/datasets", b'{"name": "n", "metadata": {"\\ud800": 1}}'),
    (
        "integer past 64 bits in metadata",
        "/api/v1/datasets",
        b'{"name": "n", "metadata": {"k": 18446744073709551616}}',
    ),
    ("NaN in metadata", "/api/v1/datasets", b'{"name": "n", "metadata": {"k": NaN}}'),
    (
        "a 40,000-byte metadata string",
        "/api/v1/datasets",
        b'{"name": "n", "metadata": {"k": "' + b"x" * 40_000 + b'"}}',
    ),
    ("NUL in an incident title", "/api/v1/incidents", b'{"title": "\\u0000"}'),
]


@pytest.mark.parametrize(("what", "route", "body"), HOSTILE_BODIES, ids=[h[0] for h in HOSTILE_BODIES])
async def test_a_hostile_body_is_refused_or_projected_everywhere(
    client: httpx.AsyncClient, side: WriteSide, what: str, route: str, body: bytes
) -> None:
    r = await client.post(
        route,
        content=body,
        headers={"content-type": "application/json", "Idempotency-Key": f"hostile-{uuid.uuid4()}"},
    )
    assert r.status_code < 500, f"{what}: {r.status_code} {r.text[:300]}"
    if r.is_success:
        await _projected_everywhere(client, side, r.json())


@pytest.mark.parametrize(
    ("what", "body"),
    [
        ("NaN threshold", b'{"metric": "m", "value": 1, "threshold": NaN}'),
        ("infinite value", b'{"metric": "m", "value": Infinity, "threshold": 1}'),
        ("NUL in the metric", b'{"metric": "\\u0000", "value": 1, "threshold": 1}'),
        ("number past float range", b'{"metric": "m", "value": 1' + b"0" * 400 + b', "threshold": 1}'),
    ],
)
async def test_a_hostile_quality_check_is_refused_or_projected_everywhere(
    client: httpx.AsyncClient, side: WriteSide, what: str, body: bytes
) -> None:
    r = await client.post("/api/v1/datasets", json={"name": f"quality {what}"})
    assert r.status_code == 201, r.text
    dataset = r.json()["id"]
    r = await client.post(
        f"/api/v1/datasets/{dataset}/quality-checks",
        content=body,
        headers={"content-type": "application/json"},
    )
    assert r.status_code < 500, f"{what}: {r.status_code} {r.text[:300]}"
    if r.is_success:
        await _projected_everywhere(client, side, r.json())


async def test_a_nul_in_a_metadata_key_of_the_path_is_refused_or_projected(
    client: httpx.AsyncClient, side: WriteSide
) -> None:
    r = await client.post("/api/v1/datasets", json={"name": "path key"})
    assert r.status_code == 201, r.text
    r = await client.put(f"/api/v1/datasets/{r.json()['id']}/metadata/a%00b", json={"value": 1})
    assert r.status_code < 500, f"{r.status_code} {r.text[:300]}"
    if r.is_success:
        await _projected_everywhere(client, side, r.json())
