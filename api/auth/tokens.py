"""Bearer tokens: JWTs verified against the issuer's JWKS.

Only asymmetric algorithms (RS256, ES256) are accepted, and a token's `alg` must be the
algorithm of the key its `kid` names: `alg: none` and an HS256 token "signed" with a
public key are refused before any signature check. `exp`, `nbf`, `iss` and `aud` are
checked with `APP_AUTH_LEEWAY_S` of leeway; `sub` and the tenant claim are required.

The JWKS comes from a URL (an OIDC provider's `jwks_uri`, found by discovery from an
https issuer when not given) or a file. It is kept `APP_AUTH_JWKS_TTL_S` and read again
when a token names a `kid` it lacks (key rotation at the provider), at most once every
`APP_AUTH_JWKS_REFRESH_MIN_S`: a stream of made-up kids costs one fetch per interval.

A token verified once is remembered (by its text, bounded) with its claims, so a client
sending the same token again costs a dictionary lookup and the time checks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Any

import aiohttp
import jwt
import orjson

from api.auth.local import jwks_file
from api.auth.principal import Principal, Unauthenticated
from shared_kernel.settings import Settings

log = logging.getLogger(__name__)

ALGORITHMS = ("RS256", "ES256")
REMEMBERED = 10_000
MAX_TOKEN_CHARS = 8192


class Jwks:
    """The issuer's public keys by `kid`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys: dict[str, jwt.PyJWK] = {}
        self.loaded_at = 0.0
        self.tried_at = 0.0
        self._lock = asyncio.Lock()

    async def key(self, kid: str | None) -> jwt.PyJWK:
        now = time.monotonic()
        if not self.keys or now - self.loaded_at > self.settings.auth_jwks_ttl_s:
            await self._reload(force=not self.keys)
        found = self._find(kid)
        if found is None and time.monotonic() - self.tried_at >= self.settings.auth_jwks_refresh_min_s:
            await self._reload(force=True)  # a key the provider added since
            found = self._find(kid)
        if found is None:
            raise Unauthenticated(f"the token's key {kid!r} is not in the issuer's JWKS")
        return found

    def _find(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None:
            return next(iter(self.keys.values())) if len(self.keys) == 1 else None
        return self.keys.get(kid)

    async def _reload(self, force: bool) -> None:
        async with self._lock:
            if not force and time.monotonic() - self.loaded_at <= self.settings.auth_jwks_ttl_s:
                return
            if (
                force
                and time.monotonic() - self.tried_at < self.settings.auth_jwks_refresh_min_s
                and self.keys
            ):
                return  # another request just did
            self.tried_at = time.monotonic()
            try:
                document = await self._document()
                keys = {}
                for raw in document.get("keys", []):
                    try:
                        jwk = jwt.PyJWK(raw)
                    except jwt.PyJWKError:
                        continue  # a key of a kind we do not take (e.g. symmetric)
                    if jwk.algorithm_name in ALGORITHMS:
                        keys[str(raw.get("kid", ""))] = jwk
                self.keys, self.loaded_at = keys, time.monotonic()
                log.info("JWKS loaded", extra={"keys": len(keys)})
            except (OSError, aiohttp.ClientError, ValueError, TimeoutError) as exc:
                log.warning("JWKS unreachable; keeping the keys known", extra={"error": repr(exc)})
                if not self.keys:
                    raise Unauthenticated(
                        "the issuer's keys cannot be read now", "temporarily_unavailable"
                    ) from exc

    async def _document(self) -> dict[str, Any]:
        s = self.settings
        url = s.auth_jwks_url
        if not url and not s.auth_jwks_file and _discoverable(s):
            discovery = await _get_json(s.auth_issuer.rstrip("/") + "/.well-known/openid-configuration")
            url = str(discovery["jwks_uri"])
        if url:
            return await _get_json(url)
        path = jwks_file(s)
        data: dict[str, Any] = orjson.loads(await asyncio.to_thread(path.read_bytes))
        return data


def _discoverable(settings: Settings) -> bool:
    """An issuer whose discovery document names its keys: an https URL (a plain http one
    too outside production, e.g. a provider on loopback in tests)."""
    issuer = settings.auth_issuer
    return issuer.startswith("https://") or (
        settings.environment != "production" and issuer.startswith("http://")
    )


async def _get_json(url: str) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
        response.raise_for_status()
        data: dict[str, Any] = await response.json(content_type=None)
        return data


class TokenVerifier:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.jwks = Jwks(settings)
        self._known: OrderedDict[str, Principal] = OrderedDict()

    async def verify(self, token: str) -> Principal:
        now = time.time()
        known = self._known.get(token)
        if known is not None:
            if known.expires_at is not None and now > known.expires_at + self.settings.auth_leeway_s:
                del self._known[token]
                raise Unauthenticated("the token has expired")
            return known
        if len(token) > MAX_TOKEN_CHARS:
            raise Unauthenticated("the token is too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"not a JWT: {exc}") from None
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise Unauthenticated(
                f"the token's algorithm {alg!r} is not accepted (only {', '.join(ALGORITHMS)})"
            )
        kid = header.get("kid")
        key = await self.jwks.key(kid if isinstance(kid, str) else None)
        if key.algorithm_name != alg:
            raise Unauthenticated(f"the token's algorithm {alg} is not its key's ({key.algorithm_name})")
        s = self.settings
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=s.auth_audience,
                issuer=s.auth_issuer,
                leeway=s.auth_leeway_s,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("the token is not valid yet (nbf)") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated("the token's issuer is not accepted") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated("the token's audience is not this API") from None
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"the token does not hold: {exc}") from None
        principal = self._principal(claims)
        self._known[token] = principal
        if len(self._known) > REMEMBERED:
            self._known.popitem(last=False)
        return principal

    def _principal(self, claims: dict[str, Any]) -> Principal:
        s = self.settings
        subject, tenant = claims.get("sub"), claims.get(s.auth_tenant_claim)
        if not isinstance(subject, str) or not subject or len(subject) > 200:
            raise Unauthenticated("the token's subject (sub) is missing or not a name")
        if not isinstance(tenant, str) or not tenant or len(tenant) > 200:
            raise Unauthenticated(f"the token names no tenant (claim {s.auth_tenant_claim!r})")
        raw_roles = claims.get(s.auth_roles_claim, [])
        roles = [raw_roles] if isinstance(raw_roles, str) else raw_roles
        if not isinstance(roles, list):
            raise Unauthenticated(f"the token's roles (claim {s.auth_roles_claim!r}) are not a list")
        nbf = claims.get("nbf")
        if isinstance(nbf, int | float) and nbf > time.time() + s.auth_leeway_s:
            raise Unauthenticated("the token is not valid yet (nbf)")
        return Principal(
            subject=subject,
            tenant=tenant,
            roles=tuple(str(r) for r in roles),
            kind="token",
            credential=str(claims.get("jti", "")),
            expires_at=float(claims["exp"]),
        )
