"""Identity without services: the roles table, the token checks, the production refusal,
the rate limits' classes and the API keys' format."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from pydantic import ValidationError

from api.auth import permissions as p
from api.auth.keys import _FORMAT, _new_key
from api.auth.local import JWKS, PRIVATE_KEY, ensure_keys, issue_token
from api.auth.principal import Principal, Unauthenticated
from api.auth.ratelimit import RateLimiter
from api.auth.tokens import TokenVerifier
from shared_kernel.settings import LOCAL_ISSUER, Settings

WRITES = {p.DATASETS_WRITE, p.INCIDENTS_CREATE, p.INCIDENTS_UPDATE, p.INCIDENTS_ASSIGN}
ADMINISTRATION = {p.ADMIN_PROJECTIONS, p.ADMIN_KEYS, p.ADMIN_AUDIT}


def test_the_roles_table_a_viewer_reads_an_operator_changes_an_admin_administers() -> None:
    assert not p.ROLES["viewer"] & (WRITES | ADMINISTRATION)
    assert p.ROLES["viewer"] >= {p.DATASETS_READ, p.INCIDENTS_VIEW, p.SEARCH_READ, p.EVENTS_SUBSCRIBE}
    assert p.ROLES["operator"] == p.ROLES["viewer"] | WRITES
    # a tenant's admin administers its tenant; the shared projections are the platform's
    # and says where the tenant's events are pushed (webhooks)
    assert p.ROLES["admin"] == p.ROLES["operator"] | {
        p.ADMIN_KEYS,
        p.ADMIN_AUDIT,
        p.WEBHOOKS_VIEW,
        p.WEBHOOKS_MANAGE,
    }
    # the capture of another system's database and every consumer's dead letters serve every
    # tenant too: the platform's
    assert p.ROLES["platform"] == {p.ADMIN_PROJECTIONS, p.ADMIN_CDC, p.ADMIN_DEAD_LETTERS, p.ADMIN_RUNTIME}
    assert p.permissions_of(["viewer", "made-up"]) == p.ROLES["viewer"]
    assert p.permissions_of(["made-up"]) == frozenset()
    assert p.main_role(["viewer", "admin"]) == "admin"
    assert sorted(p.PERMISSIONS) == sorted(set().union(*p.ROLES.values()))


@pytest.fixture
def local(tmp_path: Path) -> Settings:
    settings = Settings(environment="test", auth_key_dir=str(tmp_path / "auth"))
    ensure_keys(settings)
    return settings


async def test_a_local_token_names_its_principal_and_is_remembered(local: Settings) -> None:
    verifier = TokenVerifier(local)
    token = issue_token(local, "alice", ["operator"], "acme", 60)
    principal = await verifier.verify(token)
    assert (principal.subject, principal.tenant, principal.role, principal.kind) == (
        "alice",
        "acme",
        "operator",
        "token",
    )
    assert principal.can(p.DATASETS_WRITE)
    assert not principal.can(p.ADMIN_KEYS)
    assert principal.expires_at is not None
    assert abs(principal.expires_at - (time.time() + 60)) < 5
    assert await verifier.verify(token) is principal  # the second time: no signature check


async def test_the_leeway_admits_a_little_skew_and_no_more(local: Settings) -> None:
    verifier = TokenVerifier(local)
    folder = Path(local.auth_key_dir)
    kid = json.loads((folder / JWKS).read_text())["keys"][0]["kid"]
    now = int(time.time())

    def signed(**claims: object) -> str:
        body = {
            "iss": LOCAL_ISSUER,
            "aud": "kafka-cqrs",
            "sub": "s",
            "tenant": "t",
            "roles": ["viewer"],
            **claims,
        }
        return jwt.encode(body, (folder / PRIVATE_KEY).read_bytes(), algorithm="RS256", headers={"kid": kid})

    await verifier.verify(signed(exp=now - 10))  # within the 30 s leeway
    await verifier.verify(signed(exp=now + 60, nbf=now + 10))
    for bad, why in (
        (signed(exp=now - 60), "expired"),
        (signed(exp=now + 600, nbf=now + 120), "not valid yet"),
        (signed(), "exp"),  # no expiry at all
        (signed(exp=now + 60, sub=""), "subject"),
        (signed(exp=now + 60, roles="viewer", tenant=""), "tenant"),
    ):
        with pytest.raises(Unauthenticated, match=why):
            await verifier.verify(bad)


async def test_a_token_of_an_unknown_kid_reloads_the_keys_at_most_once_per_interval(local: Settings) -> None:
    verifier = TokenVerifier(local)
    await verifier.verify(issue_token(local, "a", ["viewer"], "t", 60))
    loads = verifier.jwks.tried_at
    other = Settings(environment="test", auth_key_dir=str(Path(local.auth_key_dir).parent / "other"))
    stranger = issue_token(other, "a", ["viewer"], "t", 60)  # another key: a kid the JWKS lacks
    for _ in range(20):
        with pytest.raises(Unauthenticated, match="not in the issuer's JWKS"):
            await verifier.verify(stranger)
    assert verifier.jwks.tried_at == loads  # the last load was within the interval: none again
    verifier.jwks.tried_at -= local.auth_jwks_refresh_min_s  # the interval has passed
    # the provider rotated its keys meanwhile: the reload finds the new one
    _copy(Path(other.auth_key_dir) / JWKS, Path(local.auth_key_dir) / JWKS)
    assert (await verifier.verify(stranger)).subject == "a"


def _copy(source: Path, target: Path) -> None:
    target.write_text(source.read_text())


def test_production_refuses_the_local_issuer_and_missing_cluster_and_webhook_secrets() -> None:
    safe: dict[str, Any] = {
        "environment": "production",
        "kafka_bootstrap": "kafka:9092",
        "postgres_dsn": "postgresql://svc:s3cret@db:5432/app",
        "opensearch_url": "https://search:9200",
        "redis_url": "redis://cache:6379/0",
        "replication_factor": 3,
    }
    with pytest.raises(ValidationError, match="APP_AUTH_ISSUER") as refused:
        Settings(**safe)
    assert "APP_CLUSTER_SECRET" in str(refused.value)
    assert "APP_WEBHOOK_SIGNING_KEY" in str(refused.value)
    safe["webhook_signing_key"] = "k" * 32
    with pytest.raises(ValidationError, match="no JWKS"):
        Settings(**safe, auth_issuer="acme-idp", cluster_secret="x" * 32)
    ok = Settings(**safe, auth_issuer="https://idp.example/realms/acme", cluster_secret="x" * 32)
    assert ok.auth_issuer.startswith("https://")


def test_rate_limits_follow_the_strongest_role_and_admins_have_none() -> None:
    limits: Any = "operator=1000,viewer=500,admin=0"  # as the environment gives it
    limiter = RateLimiter(Settings(environment="test", rate_limits=limits))

    def of(*roles: str) -> int:
        return limiter.limit_of(Principal("s", "t", roles, "token"))

    assert (of("viewer"), of("operator"), of("viewer", "operator"), of("admin"), of("admin", "viewer")) == (
        500,
        1000,
        1000,
        0,
        0,
    )
    assert of("made-up") == 500  # an unknown role is counted as the least
    with pytest.raises(ValidationError, match="APP_RATE_LIMITS"):
        Settings(environment="test", rate_limits="operator")  # type: ignore[arg-type]


def test_an_api_key_has_one_format_and_a_ticket_keeps_its_principal() -> None:
    key_id, key = _new_key()
    m = _FORMAT.match(key)
    assert m is not None
    assert m.group(1) == key_id
    assert _FORMAT.match(key + "x") is None
    assert _new_key()[1] != key
    principal = Principal("alice", "acme", ("viewer",), "token", "jti-1", 1_900_000_000.0)
    again = Principal.from_dict(principal.as_dict())
    assert (again.subject, again.tenant, again.roles, again.expires_at, again.kind) == (
        "alice",
        "acme",
        ("viewer",),
        1_900_000_000.0,
        "ticket",
    )


async def test_an_https_issuer_is_found_by_oidc_discovery_and_its_jwks_fetched(
    local: Settings, tmp_path: Path
) -> None:
    """The provider's discovery document names its `jwks_uri`; the keys come from there
    (an aiohttp server on loopback stands for the provider)."""
    from aiohttp import web

    jwks = (Path(local.auth_key_dir) / JWKS).read_text()
    fetched: list[str] = []

    async def discovery(request: web.Request) -> web.Response:
        fetched.append(request.path)
        return web.json_response({"issuer": issuer, "jwks_uri": f"{base}/keys"})

    async def keys(request: web.Request) -> web.Response:
        fetched.append(request.path)
        return web.Response(text=jwks, content_type="application/json")

    app = web.Application()
    app.router.add_get("/realm/.well-known/openid-configuration", discovery)
    app.router.add_get("/keys", keys)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    base = f"http://127.0.0.1:{port}"
    issuer = f"{base}/realm"
    try:
        # told its JWKS URL
        told = Settings(environment="test", auth_issuer=issuer, auth_jwks_url=f"{base}/keys")
        token = issue_token(local, "carol", ["viewer"], "acme", 60, issuer=issuer)
        assert (await TokenVerifier(told).verify(token)).subject == "carol"
        assert fetched == ["/keys"]
        # told nothing but the issuer: its discovery document names the keys
        fetched.clear()
        found = Settings(environment="test", auth_issuer=issuer)
        assert (await TokenVerifier(found).verify(token)).tenant == "acme"
        assert fetched == ["/realm/.well-known/openid-configuration", "/keys"]
    finally:
        await runner.cleanup()


async def test_es256_is_accepted_from_a_jwks_of_p256_keys(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": "ec-1", "alg": "ES256", "use": "sig"})
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    settings = Settings(environment="test", auth_jwks_file=str(tmp_path / "jwks.json"))
    now = int(time.time())
    claims = {"iss": LOCAL_ISSUER, "aud": "kafka-cqrs", "sub": "dave", "exp": now + 60, "tenant": "acme"}
    token = jwt.encode(claims, key, algorithm="ES256", headers={"kid": "ec-1"})
    principal = await TokenVerifier(settings).verify(token)
    assert (principal.subject, principal.roles) == ("dave", ())  # no roles: allowed nothing
    assert not principal.permissions
    # the same key named as RS256 in a token: the algorithm is not its key's
    _, body, signature = token.split(".")
    header = base64.urlsafe_b64encode(b'{"alg":"RS256","kid":"ec-1","typ":"JWT"}').rstrip(b"=").decode()
    forged = f"{header}.{body}.{signature}"
    with pytest.raises(Unauthenticated, match="not its key's"):
        await TokenVerifier(settings).verify(forged)
