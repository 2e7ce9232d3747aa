"""Identity on the real stack: who may call what (every route of the OpenAPI document x
every role), tenants that never see each other, credentials that do not hold, API keys,
rate limits, stream tickets and the audit trail."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from api.auth.local import JWKS, PRIVATE_KEY, issue_token
from api.auth.permissions import ROLES
from projections.registry import PROJECTIONS
from shared_kernel.credentials import key_dir
from shared_kernel.position import PositionToken
from shared_kernel.settings import Settings
from tests.auth import TENANT, api_client, bearer
from tests.integration.harness import Proc, WriteSide, covers, free_port, read_records

pytestmark = pytest.mark.asyncio(loop_scope="session")

OTHER = "globex"
DEADLINE_S = 30.0


@pytest.fixture(scope="module")
async def side(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WriteSide]:
    # heartbeats every half second: an idle stream says how far it has read
    ws = WriteSide.create(settings, tmp_path_factory.mktemp("identity"))
    ws.env["APP_SUBSCRIPTION_HEARTBEAT_S"] = "0.5"
    await ws.start_serving()
    ws.start_projectors(*PROJECTIONS)  # and the audit sink
    await ws.wait_until_projected()
    yield ws
    ws.stop()


@contextlib.asynccontextmanager
async def another_api(side: WriteSide, wait_ready: bool = True, **env: str) -> AsyncIterator[Proc]:
    """One more API instance of the side, with settings of its own, for one test."""
    proc = await side.start_api(env={**side.env, **env}, wait_ready=wait_ready)
    try:
        yield proc
    finally:
        proc.stop()
        side.apis.remove(proc)


def _unauthenticated(r: httpx.Response) -> None:
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"].startswith("Bearer"), r.headers
    assert r.json()["error"] == "unauthenticated"


# ---- the authorization matrix -----------------------------------------------------------------

PATH_VALUES = {"key": "k", "name": "no-such-projection", "rebuild_id": "1", "key_id": "0123456789abcdef"}


def _fill(path: str) -> str:
    """A concrete path: ids of nothing, names of nothing (whoever passes gets a 404 or 422)."""
    while "{" in path:
        start = path.index("{")
        name = path[start + 1 : path.index("}", start)]
        value = PATH_VALUES.get(name, str(uuid.uuid4()))
        path = path.replace("{" + name + "}", value, 1)
    return path


async def _status(client: httpx.AsyncClient, method: str, path: str, **headers: str) -> httpx.Response:
    body = b"{}" if method in ("POST", "PUT", "PATCH") else None
    hdrs = {"content-type": "application/json", **headers} if body else headers
    if path.endswith("/stream"):  # endless when allowed: the status and headers only
        async with client.stream(method, path, headers=hdrs) as r:
            if r.status_code != 200:
                await r.aread()
            return r
    return await client.request(method, path, content=body, headers=hdrs)


async def test_every_route_declares_a_permission_and_every_role_gets_exactly_its_own(
    side: WriteSide,
) -> None:
    async with httpx.AsyncClient(base_url=side.api_url, timeout=30) as anonymous:
        spec = (await anonymous.get("/openapi.json")).json()
        routes = [
            (method.upper(), path, op["x-permission"])
            for path, methods in spec["paths"].items()
            for method, op in methods.items()
        ]
        undeclared = [(m, p) for m, p, permission in routes if permission == "undeclared"]
        assert not undeclared, f"routes without a declared permission: {undeclared}"
        assert len(routes) >= 35
        assert spec["components"]["securitySchemes"]["bearer"]["bearerFormat"] == "JWT"
        outcomes: dict[str, int] = {}
        for method, path, permission in routes:
            concrete = _fill(path)
            r = await _status(anonymous, method, concrete)
            if permission == "public":
                assert r.status_code == 200, (method, path, r.status_code)
                continue
            assert r.status_code == 401, (method, path, r.status_code, r.text)
            assert r.headers["www-authenticate"].startswith('Bearer realm="kafka-cqrs"')
            for role, granted in ROLES.items():
                r = await _status(anonymous, method, concrete, **bearer(role, sub=f"matrix-{role}"))
                if permission in granted:
                    assert r.status_code not in (401, 403), (role, method, path, r.status_code, r.text)
                else:
                    assert r.status_code == 403, (role, method, path, r.status_code, r.text)
                    body = r.json()
                    assert body["error"] == "forbidden"
                    assert body["extra"]["missing_permission"] == permission
                    assert permission in body["detail"]
                outcomes[role] = outcomes.get(role, 0) + (permission in granted)
        # the table's shape: a viewer reads, an operator changes, an admin administers its
        # tenant, and the platform role (the shared projections) is the only way to the rest
        assert outcomes["admin"] + outcomes["platform"] == sum(p != "public" for _, _, p in routes)
        assert outcomes["viewer"] < outcomes["operator"] < outcomes["admin"]


async def test_the_websocket_stream_needs_a_credential_with_its_permission(side: WriteSide) -> None:
    url = side.api_url.replace("http", "ws", 1) + "/ws/v1/events"
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url):
            pass
    assert refused.value.response.status_code == 401
    async with connect(url, additional_headers=bearer("viewer")) as conn:
        first = orjson.loads(await asyncio.wait_for(conn.recv(), DEADLINE_S))
        assert first["type"] == "subscribed"


# ---- credentials that do not hold ------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": "kafka-cqrs-local",
        "aud": "kafka-cqrs",
        "sub": "mallory",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "tenant": TENANT,
        "roles": ["admin"],
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def _signed(claims: dict[str, Any], **header: Any) -> str:
    folder = key_dir(Settings())
    kid = json.loads((folder / JWKS).read_text())["keys"][0]["kid"]
    return jwt.encode(
        claims, (folder / PRIVATE_KEY).read_bytes(), algorithm="RS256", headers={"kid": kid, **header}
    )


def _hand_made(header: dict[str, Any], claims: dict[str, Any], key: bytes | None) -> str:
    signing = f"{_b64(orjson.dumps(header))}.{_b64(orjson.dumps(claims))}"
    signature = _b64(hmac.new(key, signing.encode(), hashlib.sha256).digest()) if key else ""
    return f"{signing}.{signature}"


def _refused_tokens() -> dict[str, str]:
    now = int(time.time())
    folder = key_dir(Settings())
    jwks = json.loads((folder / JWKS).read_text())
    public = jwt.algorithms.RSAAlgorithm.from_jwk(json.dumps(jwks["keys"][0]))
    assert isinstance(public, rsa.RSAPublicKey)
    public_pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {
        "expired": _signed(_claims(exp=now - 120, iat=now - 720, nbf=now - 720)),  # beyond the leeway
        "not yet valid": _signed(_claims(nbf=now + 600, exp=now + 1200)),
        "wrong issuer": _signed(_claims(iss="https://evil.example")),
        "wrong audience": _signed(_claims(aud="another-api")),
        "no tenant": _signed(_claims(tenant=None)),
        "unknown kid": jwt.encode(_claims(), stranger, algorithm="RS256", headers={"kid": "not-in-the-jwks"}),
        "another key, same kid": jwt.encode(
            _claims(), stranger, algorithm="RS256", headers={"kid": jwks["keys"][0]["kid"]}
        ),
        "alg none": _hand_made({"alg": "none", "typ": "JWT"}, _claims(), None),
        "HS256 signed with the public key": _hand_made(
            {"alg": "HS256", "typ": "JWT", "kid": jwks["keys"][0]["kid"]}, _claims(), public_pem
        ),
        "garbage": "not.a.jwt",
    }


async def test_tokens_that_do_not_hold_are_refused_with_a_challenge(side: WriteSide) -> None:
    async with httpx.AsyncClient(base_url=side.api_url, timeout=30) as client:
        assert (await client.get("/api/v1/datasets", headers=bearer("viewer"))).status_code == 200
        for what, bad in _refused_tokens().items():
            r = await client.get("/api/v1/datasets", headers={"Authorization": f"Bearer {bad}"})
            assert r.status_code == 401, (what, r.status_code, r.text)
            assert 'error="invalid_token"' in r.headers["www-authenticate"], what
        r = await client.get("/api/v1/datasets", headers={"Authorization": "Basic YWxpY2U6c2VjcmV0"})
        assert r.status_code == 401
        assert 'error="invalid_request"' in r.headers["www-authenticate"]


# ---- tenants ---------------------------------------------------------------------------------


async def _sse_until_covered(
    client: httpx.AsyncClient, path: str, params: dict[str, str], position: str
) -> list[dict[str, Any]]:
    """The events a stream delivers until a heartbeat says it has read past `position`."""
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(DEADLINE_S), client.stream("GET", path, params=params) as r:
        assert r.status_code == 200, (await r.aread()).decode()
        kind, data = "message", ""
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = line.removeprefix("data: ")
            elif not line and data:
                body = orjson.loads(data)
                if kind == "message":
                    events.append(body)
                elif kind == "heartbeat" and covers(body["id"], position):
                    return events
                kind, data = "message", ""
    raise AssertionError("unreachable")


async def test_tenants_see_nothing_of_each_other_on_any_read_path(side: WriteSide) -> None:
    word = f"zephyr{uuid.uuid4().hex[:8]}"
    async with (
        api_client("operator", TENANT, base_url=side.api_url, timeout=30) as acme,
        api_client("admin", OTHER, base_url=side.api_url, timeout=30) as other,
    ):
        d = await acme.post("/api/v1/datasets", json={"name": f"Rainfall {word}", "tags": [word]})
        assert d.status_code == 201, d.text
        dataset = d.json()["id"]
        q = await acme.post(
            f"/api/v1/datasets/{dataset}/quality-checks", json={"metric": "rows", "value": 3, "threshold": 1}
        )
        assert q.status_code == 200, q.text
        i = await acme.post("/api/v1/incidents", json={"title": f"Outage {word}"})
        assert i.status_code == 201, i.text
        incident, position = i.json()["id"], i.json()["position"]
        after = {"consistent_with": q.json()["position"]}
        seen = {"consistent_with": position}
        soon = datetime.now(UTC).replace(year=datetime.now(UTC).year + 1).isoformat()
        everything = PositionToken(
            {**PositionToken.decode(q.json()["position"]).offsets, **PositionToken.decode(position).offsets}
        ).encode()

        # the owner's tenant sees everything (the positive control)
        assert (await acme.get(f"/api/v1/datasets/{dataset}", params=after)).status_code == 200
        found = (await acme.get("/api/v1/search/datasets", params={"q": word, **after})).json()
        assert (found["total"], found["counts"]["status"]) == (1, {"active": 1})

        # the other tenant: every single read a 404, every list and search without them
        for path, params in (
            (f"/api/v1/datasets/{dataset}", after),
            (f"/api/v1/datasets/{dataset}/quality", after),
            (f"/api/v1/datasets/{dataset}/events", after),
            (f"/api/v1/datasets/{dataset}", {"as_of_version": "1", **after}),
            (f"/api/v1/datasets/{dataset}", {"as_of": soon, **after}),
            (f"/api/v1/incidents/{incident}", seen),
            (f"/api/v1/incidents/{incident}/events", seen),
            (f"/api/v1/incidents/{incident}", {"as_of_version": "1", **seen}),
        ):
            r = await other.get(path, params=params)
            assert r.status_code == 404, (path, r.status_code, r.text)
        for path, params in (("/api/v1/datasets", after), ("/api/v1/incidents", seen)):
            items = (await other.get(path, params={**params, "limit": "500"})).json()["items"]
            assert {dataset, incident}.isdisjoint(x["id"] for x in items), path
            assert all(x["tenant"] == OTHER for x in items)
        for path, params in (("/api/v1/search/datasets", after), ("/api/v1/search/incidents", seen)):
            found = (await other.get(path, params={"q": word, **params})).json()
            assert (found["total"], found["items"], found["counts"]["status"]) == (0, [], {}), path

        # streams: read past the acme events (a heartbeat says so) and deliver none of them
        ours = await _sse_until_covered(acme, "/api/v1/events/stream", {"from": "beginning"}, everything)
        assert {dataset, incident} <= {e["aggregate_id"] for e in ours}
        theirs = await _sse_until_covered(other, "/api/v1/events/stream", {"from": "beginning"}, everything)
        assert all(e["metadata"]["tenant"] == OTHER for e in theirs)
        one = await _sse_until_covered(
            other, f"/api/v1/incidents/{incident}/stream", {"from": "beginning"}, position
        )
        assert one == []
        url = side.api_url.replace("http", "ws", 1) + "/ws/v1/events?from=beginning"
        async with connect(url, additional_headers=bearer("viewer", OTHER)) as conn:
            async with asyncio.timeout(DEADLINE_S):
                while True:
                    m = orjson.loads(await conn.recv())
                    if m["type"] == "heartbeat" and covers(m["id"], everything):
                        break
                    assert m["type"] != "event" or m["metadata"]["tenant"] == OTHER, m

        # commands: another tenant's aggregate is not there
        r = await other.post(f"/api/v1/incidents/{incident}/comments", json={"author": "x", "body": "y"})
        assert (r.status_code, r.json()["error"]) == (404, "not_found"), r.text
        r = await other.post(f"/api/v1/datasets/{dataset}/archive", json={"reason": "mine now"})
        assert r.status_code == 404, r.text
        history = (await acme.get(f"/api/v1/incidents/{incident}/events", params=seen)).json()["items"]
        assert len(history) == 1


async def test_the_same_idempotency_key_in_two_tenants_is_two_commands(side: WriteSide) -> None:
    key = {"Idempotency-Key": f"shared-{uuid.uuid4()}"}
    async with (
        api_client("operator", TENANT, base_url=side.api_url, timeout=30) as acme,
        api_client("operator", OTHER, base_url=side.api_url, timeout=30) as other,
    ):
        a = await acme.post("/api/v1/incidents", json={"title": "ours"}, headers=key)
        b = await other.post("/api/v1/incidents", json={"title": "theirs, different body"}, headers=key)
        assert (a.status_code, b.status_code) == (201, 201), (a.text, b.text)
        assert a.json()["id"] != b.json()["id"]
        again = await acme.post("/api/v1/incidents", json={"title": "ours"}, headers=key)
        assert again.json() == a.json()  # a retry in its own tenant: the same answer
        mine = await acme.get(f"/api/v1/commands/{key['Idempotency-Key']}")
        theirs = await other.get(f"/api/v1/commands/{key['Idempotency-Key']}")
        assert (mine.json()["id"], theirs.json()["id"]) == (a.json()["id"], b.json()["id"])
        r = await other.get(
            f"/api/v1/incidents/{b.json()['id']}", params={"consistent_with": b.json()["position"]}
        )
        assert (r.status_code, r.json()["title"], r.json()["tenant"]) == (
            200,
            "theirs, different body",
            OTHER,
        )


# ---- API keys ----------------------------------------------------------------------------------


async def test_an_api_key_works_rotates_and_stops_working_once_revoked(side: WriteSide) -> None:
    async with (
        another_api(side) as second,  # another instance: it learns of a revocation within the bound
        api_client("admin", TENANT, base_url=side.api_url, timeout=30) as admin,
        httpx.AsyncClient(base_url=side.api_url, timeout=30) as first_api,
        httpx.AsyncClient(base_url=second.url, timeout=30) as second_api,
    ):
        issued = await admin.post("/api/v1/admin/api-keys", json={"name": "ingest", "role": "operator"})
        assert issued.status_code == 201, issued.text
        key, key_id = issued.json()["key"], issued.json()["id"]
        assert issued.headers["location"].endswith(key_id)
        days = (
            datetime.fromisoformat(issued.json()["expires_at"]) - datetime.now(UTC)
        ).total_seconds() / 86400
        assert 89.9 < days <= 90
        with_key = {"X-API-Key": key}
        r = await first_api.post("/api/v1/incidents", json={"title": "by key"}, headers=with_key)
        assert r.status_code == 201, r.text
        assert (await second_api.get("/api/v1/incidents", headers=with_key)).status_code == 200
        # the key's role holds: an operator key cannot administer keys
        assert (await first_api.get("/api/v1/admin/api-keys", headers=with_key)).status_code == 403
        started = time.monotonic()
        while True:  # its last use is written in the background, at most once a minute
            listed = (await admin.get("/api/v1/admin/api-keys")).json()["items"]
            (mine,) = [k for k in listed if k["id"] == key_id]
            if mine["last_used_at"] is not None or time.monotonic() - started > DEADLINE_S:
                break
            await asyncio.sleep(0.1)
        assert mine["last_used_at"] is not None
        assert mine["state"] == "active"
        assert "key" not in mine
        assert "hash" not in mine
        # another tenant's admin sees none of them, and cannot revoke them
        async with api_client("admin", OTHER, base_url=side.api_url, timeout=30) as stranger:
            assert key_id not in {
                k["id"] for k in (await stranger.get("/api/v1/admin/api-keys")).json()["items"]
            }
            assert (await stranger.delete(f"/api/v1/admin/api-keys/{key_id}")).status_code == 404

        rotated = await admin.post(f"/api/v1/admin/api-keys/{key_id}/rotate", json={"overlap_s": 3600})
        assert rotated.status_code == 201, rotated.text
        new_key = rotated.json()["key"]
        assert rotated.json()["previous"]["replaced_by"] == rotated.json()["id"]
        for api in (first_api, second_api):
            for k in (key, new_key):  # both work during the overlap
                assert (await api.get("/api/v1/incidents", headers={"X-API-Key": k})).status_code == 200

        revoked = await admin.delete(f"/api/v1/admin/api-keys/{key_id}")
        assert (revoked.status_code, revoked.json()["state"]) == (200, "revoked")
        r = await first_api.get("/api/v1/incidents", headers=with_key)  # the revoking instance: at once
        assert r.status_code == 401, r.text
        started = time.monotonic()
        while (await second_api.get("/api/v1/incidents", headers=with_key)).status_code != 401:
            assert time.monotonic() - started < side.settings.auth_key_cache_s + 2, "revocation not seen"
            await asyncio.sleep(0.05)
        assert (await second_api.get("/api/v1/incidents", headers={"X-API-Key": new_key})).status_code == 200
        assert (await first_api.get("/api/v1/incidents", headers={"X-API-Key": key + "x"})).status_code == 401


# ---- rate limits -------------------------------------------------------------------------------


async def test_the_1001st_request_of_a_window_is_a_429_counted_exactly_under_concurrency(
    side: WriteSide,
) -> None:
    sub = f"busy-{uuid.uuid4().hex[:6]}"
    async with another_api(side, APP_RATE_LIMIT_WINDOW_S="120") as limited:
        async with api_client("viewer", TENANT, sub, base_url=limited.url, timeout=30) as busy:

            async def one() -> httpx.Response:
                return await busy.get("/api/v1/incidents", params={"limit": "1"})

            statuses: list[int] = []
            for _ in range(10):  # 1,050 requests, 105 at a time
                statuses += [r.status_code for r in await asyncio.gather(*(one() for _ in range(105)))]
            assert statuses.count(200) == 1000, sorted(set(statuses))
            assert statuses.count(429) == 50
            refused = await one()
            assert refused.status_code == 429
            assert 0 < int(refused.headers["retry-after"]) <= 120
            assert refused.headers["ratelimit-limit"] == "1000"
            assert refused.headers["ratelimit-remaining"] == "0"
            assert refused.headers["ratelimit-policy"] == "1000;w=120"
            assert refused.json()["error"] == "rate_limited"
        async with api_client("admin", TENANT, base_url=side.api_url, timeout=30) as admin:
            params = {"actor": sub, "outcome": "rate_limited", "limit": "500"}
            audited = await _audited(admin, params, lambda found: bool(found))
            assert audited[0]["status"] == 429
        async with api_client("viewer", TENANT, f"{sub}-2", base_url=limited.url, timeout=30) as fresh:
            r = await fresh.get("/api/v1/incidents")  # each principal has its own count
            assert (r.status_code, r.headers["ratelimit-remaining"]) == (200, "999")
        async with api_client("admin", TENANT, sub, base_url=limited.url, timeout=30) as admin:
            r = await admin.get("/api/v1/incidents")  # admins are not limited
            assert r.status_code == 200
            assert "ratelimit-limit" not in r.headers


async def test_with_redis_down_the_setting_decides_and_the_default_allows(side: WriteSide) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    async with (
        another_api(side, wait_ready=False, APP_REDIS_URL=dead) as allow,
        another_api(
            side, wait_ready=False, APP_REDIS_URL=dead, APP_RATE_LIMIT_WHEN_REDIS_DOWN="refuse"
        ) as refuse,
    ):
        for proc, expected in ((allow, 200), (refuse, 503)):
            async with api_client("viewer", base_url=proc.url, timeout=30) as client:
                started = time.monotonic()
                while True:  # the read models connect in the background
                    r = await client.get("/api/v1/incidents")
                    if r.status_code == expected or time.monotonic() - started > DEADLINE_S:
                        break
                    await asyncio.sleep(0.1)
                assert r.status_code == expected, r.text
                if expected == 503:
                    assert r.headers["retry-after"] == "1"
                _unauthenticated(await client.get("/api/v1/incidents", headers={"Authorization": "Bearer x"}))


# ---- browsers ----------------------------------------------------------------------------------


async def test_a_stream_ticket_opens_one_stream_and_a_stream_ends_with_its_credential(
    side: WriteSide,
) -> None:
    async with (
        api_client("viewer", base_url=side.api_url, timeout=30) as viewer,
        httpx.AsyncClient(base_url=side.api_url, timeout=30) as browser,  # EventSource: no headers
    ):
        _unauthenticated(await browser.get("/api/v1/events/stream"))
        issued = await viewer.post("/api/v1/stream-tickets")
        assert issued.status_code == 201, issued.text
        ticket = issued.json()["ticket"]
        async with browser.stream("GET", "/api/v1/events/stream", params={"ticket": ticket}) as r:
            assert r.status_code == 200
        _unauthenticated(await browser.get("/api/v1/events/stream", params={"ticket": ticket}))  # used
        # a ticket is for streams only
        ticket = (await viewer.post("/api/v1/stream-tickets")).json()["ticket"]
        _unauthenticated(await browser.get("/api/v1/incidents", params={"ticket": ticket}))

    short = issue_token(side.settings, "brief", ["viewer"], TENANT, ttl_s=2)
    async with (
        httpx.AsyncClient(
            base_url=side.api_url, timeout=30, headers={"Authorization": f"Bearer {short}"}
        ) as c,
        asyncio.timeout(DEADLINE_S),
        c.stream("GET", "/api/v1/events/stream") as r,
    ):
        assert r.status_code == 200
        ended = None
        async for line in r.aiter_lines():
            if line.startswith("data: ") and '"credential_expired"' in line:
                ended = orjson.loads(line.removeprefix("data: "))
        assert ended is not None, "the stream did not end with its credential"
        assert ended["type"] == "error"


async def test_cors_answers_the_configured_origins_only(side: WriteSide) -> None:
    async with (
        another_api(side, APP_CORS_ORIGINS="https://console.example") as cors,
        httpx.AsyncClient(base_url=cors.url, timeout=30) as client,
    ):
        preflight = {
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization",
        }
        ok = await client.options(
            "/api/v1/incidents", headers={"Origin": "https://console.example", **preflight}
        )
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == "https://console.example"
        no = await client.options(
            "/api/v1/incidents", headers={"Origin": "https://evil.example", **preflight}
        )
        assert "access-control-allow-origin" not in no.headers


# ---- the audit trail --------------------------------------------------------------------------


async def _audited(
    admin: httpx.AsyncClient, params: dict[str, str], enough: Callable[[list[dict[str, Any]]], bool]
) -> list[dict[str, Any]]:
    """The audit records matching `params` once there are enough (the sink writes them
    within about a second of the request)."""
    started = time.monotonic()
    while True:
        found: list[dict[str, Any]] = (await admin.get("/api/v1/admin/audit", params=params)).json()["items"]
        if enough(found) or time.monotonic() - started > DEADLINE_S:
            assert enough(found), f"not audited: {params}, found {found}"
            return found
        await asyncio.sleep(0.2)


async def test_each_outcome_is_audited_and_an_admin_queries_its_own_tenants_trail(side: WriteSide) -> None:
    actor = f"audited-{uuid.uuid4().hex[:6]}"
    async with (
        api_client(
            "operator", TENANT, actor, base_url=side.api_url, timeout=30, headers={"User-Agent": "probe/1"}
        ) as op,
        api_client("viewer", TENANT, actor, base_url=side.api_url, timeout=30) as viewer,
        api_client("admin", TENANT, base_url=side.api_url, timeout=30) as admin,
        api_client("admin", OTHER, base_url=side.api_url, timeout=30) as stranger,
    ):
        accepted = await op.post(
            "/api/v1/incidents", json={"title": "audited"}, headers={"X-Correlation-Id": "corr-1"}
        )
        incident = accepted.json()["id"]
        conflict = await op.post(
            f"/api/v1/incidents/{incident}/assign", json={"assignee": "a"}, headers={"If-Match": '"9"'}
        )
        forbidden = await viewer.post("/api/v1/incidents", json={"title": "not mine to open"})
        assert (accepted.status_code, forbidden.status_code) == (201, 403)
        assert conflict.status_code == 409, conflict.text
        wanted = {"accepted", "rejected", "forbidden"}
        found = await _audited(admin, {"actor": actor}, lambda found: {f["outcome"] for f in found} >= wanted)
        by_outcome: dict[str, list[dict[str, Any]]] = {}
        for record in found:
            by_outcome.setdefault(record["outcome"], []).append(record)
        assert set(by_outcome) >= wanted, found
        (ok,) = by_outcome["accepted"]
        assert (ok["tenant"], ok["aggregate_id"], ok["status"], ok["route"]) == (
            TENANT,
            incident,
            201,
            "/api/v1/incidents",
        )
        assert (ok["user_agent"], ok["correlation_id"], ok["client_ip"]) == ("probe/1", "corr-1", "127.0.0.1")
        assert {r["reason"].split(":")[0] for r in by_outcome["rejected"]} >= {"version_conflict"}
        assert by_outcome["forbidden"][0]["reason"].endswith("incidents:create")
        # filters, and the trail of one tenant only
        only = (
            await admin.get("/api/v1/admin/audit", params={"actor": actor, "outcome": "forbidden"})
        ).json()
        assert [r["outcome"] for r in only["items"]] == ["forbidden"]
        later = (
            await admin.get("/api/v1/admin/audit", params={"actor": actor, "since": "9999-01-01T00:00:00Z"})
        ).json()
        assert later["items"] == []
        theirs = (await stranger.get("/api/v1/admin/audit", params={"actor": actor})).json()
        assert theirs["items"] == []
        assert (await op.get("/api/v1/admin/audit")).status_code == 403


async def test_refusals_without_a_tenant_are_on_the_audit_topic(side: WriteSide) -> None:
    agent = f"anonymous-{uuid.uuid4().hex[:6]}"
    async with httpx.AsyncClient(base_url=side.api_url, timeout=30, headers={"User-Agent": agent}) as client:
        _unauthenticated(await client.get("/api/v1/incidents"))
        _unauthenticated(await client.get("/api/v1/incidents", headers={"X-API-Key": "ck_nope"}))
    started, mine = time.monotonic(), list[dict[str, Any]]()
    while len(mine) < 2 and time.monotonic() - started < DEADLINE_S:
        records = await read_records(side.settings, [f"{side.settings.topic_prefix}.audit"])
        mine = [orjson.loads(r.value or b"") for r in records]
        mine = [m for m in mine if m["user_agent"] == agent]
        await asyncio.sleep(0.2)
    assert [(m["outcome"], m["status"], m["tenant"], m["route"]) for m in mine] == [
        ("unauthenticated", 401, "", "/api/v1/incidents")
    ] * 2
    assert "credential is required" in mine[0]["reason"]


async def test_a_queued_commands_outcome_is_audited_by_the_transaction_that_decided_it(
    side: WriteSide,
) -> None:
    actor = f"bulk-{uuid.uuid4().hex[:6]}"
    key = f"queued-{uuid.uuid4()}"
    async with (
        api_client("operator", TENANT, actor, base_url=side.api_url, timeout=30) as op,
        api_client("admin", TENANT, base_url=side.api_url, timeout=30) as admin,
    ):
        r = await op.post(
            "/api/v1/incidents",
            json={"title": "queued"},
            headers={"Prefer": "respond-async", "Idempotency-Key": key},
        )
        assert r.status_code == 202, r.text
        found = await _audited(
            admin, {"actor": actor}, lambda found: {f["outcome"] for f in found} >= {"queued", "accepted"}
        )
        outcomes = {f["outcome"]: f for f in found}
        assert (outcomes["queued"]["status"], outcomes["queued"]["method"]) == (202, "POST")
        decided = outcomes["accepted"]
        assert (decided["method"], decided["route"], decided["command_id"], decided["tenant"]) == (
            "ASYNC",
            "incidents.OpenIncident",
            key,
            TENANT,
        )
        status = (await op.get(f"/api/v1/commands/{key}")).json()
        assert (status["status"], status["id"]) == ("accepted", decided["aggregate_id"])
