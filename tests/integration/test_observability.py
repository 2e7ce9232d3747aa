"""Observability on the real stack: every process's /metrics parses as Prometheus text and
carries the product's metrics; counters move by what happened; one request's trace runs
through the API, the processor and a projector, read back from the stack's Jaeger and from the
Zipkin UI it hands them to."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared_kernel.settings import Settings
from tests.integration.harness import WriteSide, free_port, until, wait_until_up

pytestmark = pytest.mark.asyncio(loop_scope="session")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
PROJECTORS_METRICS = free_port()  # where this module's projectors serve /metrics
JAEGER_OTLP = "http://127.0.0.1:4318"  # infra/stack.py's Jaeger
JAEGER_QUERY = "http://127.0.0.1:16686"
ZIPKIN = "http://127.0.0.1:9411"  # the trace UI, fed by Jaeger through a Kafka topic


@pytest.fixture(scope="module")
async def side(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WriteSide]:
    ws = WriteSide.create(settings, tmp_path_factory.mktemp("observability"))
    ws.env.update(
        {  # every trace kept and exported at once, to the stack's Jaeger
            "OTEL_EXPORTER_OTLP_ENDPOINT": JAEGER_OTLP,
            "OTEL_TRACES_SAMPLER": "parentbased_always_on",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            "APP_SERVICE_NAME": f"cqrs-{ws.settings.topic_prefix}",
        }
    )
    await ws.start_serving()
    ws.start_projectors("datasets", "events", env={**ws.env, "APP_METRICS_PORT": str(PROJECTORS_METRICS)})
    await ws.wait_until_projected()
    yield ws
    ws.stop()


async def scrape(url: str) -> Samples:
    """Every sample of a /metrics page, by name and labels (the text must parse)."""
    async with httpx.AsyncClient(timeout=10) as c:
        r = await c.get(url)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


async def test_the_api_metrics_count_a_burst_of_commands_and_requests_by_route_template(
    side: WriteSide, client: httpx.AsyncClient
) -> None:
    before = await scrape(f"{side.api_url}/metrics")
    n = 12
    ids = []
    for i in range(n):
        r = await client.post("/api/v1/datasets", json={"name": f"metered {i}"})
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    conflict = await client.patch(
        f"/api/v1/datasets/{ids[0]}", json={"description": "x"}, headers={"If-Match": '"7"'}
    )
    assert conflict.status_code == 409
    missing = await client.get(f"/api/v1/datasets/{uuid.uuid4()}")
    assert missing.status_code == 404
    after = await scrape(f"{side.api_url}/metrics")

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    accepted = {"context": "datasets", "command": "RegisterDataset", "outcome": "accepted"}
    assert moved("cqrs_commands_total", **accepted) == n
    rejected = {"context": "datasets", "command": "DescribeDataset", "outcome": "version_conflict"}
    assert moved("cqrs_commands_total", **rejected) == 1
    route = "/api/v1/datasets"
    assert moved("cqrs_http_request_duration_seconds_count", route=route, method="POST", status="201") == n
    one = "/api/v1/datasets/{dataset_id}"
    assert moved("cqrs_http_request_duration_seconds_count", route=one, method="PATCH", status="409") == 1
    assert moved("cqrs_http_request_duration_seconds_count", route=one, method="GET", status="404") == 1
    assert moved("cqrs_processor_transaction_duration_seconds_count") >= 1
    assert moved("cqrs_processor_commands_per_transaction_sum") == n + 1
    # no id is a label: every route label is a template
    routes = {dict(ls).get("route", "") for (name, ls) in after if name.startswith("cqrs_http_request")}
    assert not any(i in r for r in routes for i in ids)
    assert value(after, "cqrs_dead_letters_total", consumer="command-processor") == 0


async def test_reads_served_from_the_cache_are_counted_under_their_route_template(
    side: WriteSide, client: httpx.AsyncClient
) -> None:
    r = await client.post("/api/v1/datasets", json={"name": "cached"})
    dataset, token = r.json()["id"], r.json()["position"]
    assert (
        await client.get(f"/api/v1/datasets/{dataset}", params={"consistent_with": token})
    ).status_code == 200
    assert (await client.get(f"/api/v1/datasets/{dataset}")).status_code == 200  # a miss keeps the answer
    before = await scrape(f"{side.api_url}/metrics")
    for _ in range(5):
        assert (await client.get(f"/api/v1/datasets/{dataset}")).status_code == 200
    after = await scrape(f"{side.api_url}/metrics")
    hits = value(after, "cqrs_read_cache_requests_total", result="hit") - value(
        before, "cqrs_read_cache_requests_total", result="hit"
    )
    assert hits == 5
    timed = value(after, "cqrs_http_request_duration_seconds_count", method="GET", status="200") - value(
        before, "cqrs_http_request_duration_seconds_count", method="GET", status="200"
    )
    assert timed >= 5
    assert not any(dataset in dict(ls).get("route", "") for (_, ls) in after)


async def test_the_projectors_metrics_and_the_lag_gauges_follow_what_was_applied(
    side: WriteSide, client: httpx.AsyncClient
) -> None:
    url = f"http://127.0.0.1:{PROJECTORS_METRICS}/metrics"
    before = await scrape(url)
    r = await client.post("/api/v1/datasets", json={"name": "projected"})
    token = r.json()["position"]
    got = await client.get(f"/api/v1/datasets/{r.json()['id']}", params={"consistent_with": token})
    assert got.status_code == 200

    async def applied() -> Samples | None:
        now = await scrape(url)
        moved = value(now, "cqrs_projection_applied_events_total", projection="datasets") - value(
            before, "cqrs_projection_applied_events_total", projection="datasets"
        )
        return now if moved >= 1 else None

    now = await until(applied, 30, "the datasets projection's applied counter")
    assert ("cqrs_dead_letters_total", frozenset({("consumer", "datasets")})) in now

    async def lag_known() -> Samples | None:
        api = await scrape(f"{side.api_url}/metrics")
        present = any(n == "cqrs_projection_lag_events" for n, _ in api)
        return api if present else None

    api = await until(lag_known, 30, "the lag gauges")
    assert value(api, "cqrs_projection_lag_seconds", projection="datasets") >= 0
    groups: Any = {dict(ls).get("group") for (n, ls) in api if n == "cqrs_consumer_group_lag_records"}
    assert f"{side.settings.topic_prefix}.projection.datasets.v1" in groups


async def test_metrics_are_public_and_carry_no_tenant_data(side: WriteSide) -> None:
    async with httpx.AsyncClient(base_url=side.api_url) as anonymous:
        r = await anonymous.get("/metrics")
    assert r.status_code == 200
    assert "acme" not in r.text


async def test_one_requests_trace_has_spans_of_the_api_the_processor_and_a_projector(
    side: WriteSide, client: httpx.AsyncClient
) -> None:
    trace_id = uuid.uuid4().hex
    traceparent = f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"
    r = await client.post("/api/v1/datasets", json={"name": "traced"}, headers={"traceparent": traceparent})
    assert r.status_code == 201, r.text
    got = await client.get(
        f"/api/v1/datasets/{r.json()['id']}", params={"consistent_with": r.json()["position"]}
    )
    assert got.status_code == 200
    prefix = side.settings.topic_prefix

    async def spans() -> list[tuple[str, str]] | None:
        async with httpx.AsyncClient(timeout=5) as c:
            found = await c.get(f"{JAEGER_QUERY}/api/traces/{trace_id}")
        if found.status_code != 200 or not found.json().get("data"):
            return None
        [t] = found.json()["data"]
        named = [(t["processes"][s["processID"]]["serviceName"], s["operationName"]) for s in t["spans"]]
        services = {service for service, _ in named}
        wanted = {f"cqrs-{prefix}-api", f"cqrs-{prefix}-projectors"}
        operations = {op for _, op in named}
        done = wanted <= services and "projection datasets applied" in operations
        return named if done else None

    named = await until(spans, 60, "the trace's spans in Jaeger")
    operations = {op for _, op in named}
    assert "POST /api/v1/datasets" in operations  # the request (FastAPI's instrumentation)
    assert "commands.transaction" in operations  # the processor's transaction
    assert (f"cqrs-{prefix}-api", "commands.transaction") in named
    assert (f"cqrs-{prefix}-projectors", "projection datasets applied") in named

    # the same trace is in the UI a person opens (Zipkin, fed by Jaeger through Kafka)
    async def in_the_ui() -> set[tuple[str, str]] | None:
        async with httpx.AsyncClient(timeout=5) as c:
            found = await c.get(f"{ZIPKIN}/api/v2/trace/{trace_id}")
        if found.status_code != 200:
            return None
        seen = {(s["localEndpoint"]["serviceName"], s.get("name", "")) for s in found.json()}
        return seen if (f"cqrs-{prefix}-projectors", "projection datasets applied") in seen else None

    seen = await until(in_the_ui, 60, "the trace in Zipkin")
    assert (f"cqrs-{prefix}-api", "post /api/v1/datasets") in seen  # Zipkin lower-cases names
    assert (f"cqrs-{prefix}-api", "commands.transaction") in seen
    async with httpx.AsyncClient(timeout=5) as c:
        page = await c.get(f"{ZIPKIN}/zipkin/traces/{trace_id}")
    assert page.status_code == 200
    assert "<title>Zipkin</title>" in page.text
    # the API's access log line of that request carries its trace id, and no credential
    assert side.api is not None
    lines = [orjson.loads(line) for line in side.api.output().splitlines() if b'"api.access"' in line]
    [posted] = [x for x in lines if x.get("trace_id") == trace_id]
    assert (posted["method"], posted["route"], posted["status"]) == ("POST", "/api/v1/datasets", 201)
    assert "authorization" not in str(lines).lower()
    assert "bearer" not in str(lines).lower()


async def test_an_api_with_several_workers_counts_the_requests_of_all_of_them(side: WriteSide) -> None:
    port = free_port()
    env = {k: v for k, v in side.env.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    url = f"http://127.0.0.1:{port}"
    proc = side._spawn("api-workers", "serve", "api", "--port", str(port), "--workers", "2", env=env, url=url)
    try:
        await wait_until_up(proc, "/health", 90)
        async with httpx.AsyncClient(base_url=url) as c:
            for _ in range(20):  # new connections: spread over the workers
                async with httpx.AsyncClient(base_url=url) as one:
                    assert (await one.get("/health")).status_code == 200
            samples = await scrape(f"{url}/metrics")
            again = await scrape(f"{url}/metrics")
            assert (await c.get("/health")).status_code == 200
        served = value(samples, "cqrs_http_request_duration_seconds_count", route="/health")
        assert served >= 20  # every worker's requests, whichever worker answers the scrape
        assert value(again, "cqrs_http_request_duration_seconds_count", route="/health") == served
    finally:
        proc.stop()
