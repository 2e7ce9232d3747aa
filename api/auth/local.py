"""The local stack's issuer: a signing key and its JWKS on this machine, and tokens the
local API accepts (`cqrs auth token`). Production takes its tokens from an OIDC
provider (`APP_AUTH_ISSUER`, `APP_AUTH_JWKS_URL`); settings refuse this issuer there.

The key is RS256 (RSA 2048): the algorithm the design asks for, and the cheapest to
verify, which every request does.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from shared_kernel.credentials import key_dir, write_private
from shared_kernel.settings import Settings

PRIVATE_KEY = "signing-key.pem"
JWKS = "jwks.json"


def jwks_file(settings: Settings) -> Path:
    """The JWKS the API reads: the configured file, else the local stack's."""
    return Path(settings.auth_jwks_file) if settings.auth_jwks_file else key_dir(settings) / JWKS


def ensure_keys(settings: Settings) -> Path:
    """Create the local signing key and its JWKS once (idempotent; safe when two processes
    race: each file is written aside and renamed into place)."""
    folder = key_dir(settings)
    private, public = folder / PRIVATE_KEY, folder / JWKS
    if private.exists() and public.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": hashlib.sha256(der).hexdigest()[:16], "alg": "RS256", "use": "sig"})
    write_private(private, pem, 0o600)
    write_private(public, json.dumps({"keys": [jwk]}, indent=2).encode(), 0o644)
    return folder


def issue_token(
    settings: Settings,
    subject: str,
    roles: list[str] | tuple[str, ...],
    tenant: str,
    ttl_s: int = 3600,
    *,
    not_before_s: int = 0,
    issuer: str | None = None,
    audience: str | None = None,
) -> str:
    """A token of the local issuer for `subject`, signed with the local key."""
    folder = ensure_keys(settings)
    pem = (folder / PRIVATE_KEY).read_bytes()
    kid = json.loads((folder / JWKS).read_text())["keys"][0]["kid"]
    now = int(time.time())
    claims = {
        "iss": issuer or settings.auth_issuer,
        "aud": audience or settings.auth_audience,
        "sub": subject,
        "iat": now,
        "nbf": now + not_before_s,
        "exp": now + ttl_s,
        "jti": uuid.uuid4().hex,
        settings.auth_tenant_claim: tenant,
        settings.auth_roles_claim: list(roles),
    }
    return jwt.encode(claims, pem, algorithm="RS256", headers={"kid": kid})
