"""API keys (`X-API-Key`): issued by a tenant's admin, stored hashed, rotated, revoked.

A key reads `ck_<key id>_<secret>`. Only its argon2id hash is stored, beside its
tenant, role, expiry (`APP_AUTH_KEY_TTL_DAYS`, 90 by default) and last use. The
answer of `POST /api/v1/admin/api-keys` is the one place the whole key appears.

Checking a key: its record is read by id (kept `APP_AUTH_KEY_CACHE_S` in the process,
so a revocation holds everywhere within that, and at once in the revoking process);
the secret is checked against the hash once per process (argon2 costs ~20 ms by
design), and afterwards against a SHA-256 of the key kept in memory only.
Rotation issues a new key of the same role and lets the old one work for an overlap
window (default one day), then it expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import re
import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from api.auth.principal import Principal, Unauthenticated

log = logging.getLogger(__name__)

_HASHER = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)  # OWASP's minimum for argon2id
_FORMAT = re.compile(r"^ck_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
LAST_USE_EVERY_S = 60.0
COLUMNS = (
    "key_id, name, tenant, role, created_by, created_at, expires_at, revoked_at, last_used_at, "
    "rotated_from, replaced_by"
)


def _new_key() -> tuple[str, str]:
    key_id = secrets.token_hex(8)
    return key_id, f"ck_{key_id}_{secrets.token_urlsafe(32)}"


def _fingerprint(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    def __init__(self, cache_s: float, ttl_days: int) -> None:
        self.cache_s, self.ttl_days = cache_s, ttl_days
        self._records: dict[str, tuple[float, asyncpg.Record | None]] = {}
        self._checked: dict[str, bytes] = {}  # key id -> SHA-256 of the key once argon2 said yes
        self._used: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ checking a key

    async def authenticate(self, pool: asyncpg.Pool, key: str) -> Principal:
        m = _FORMAT.match(key)
        if m is None:
            raise Unauthenticated("not an API key of this service", "invalid_key")
        key_id = m.group(1)
        record = await self._record(pool, key_id)
        if record is None:
            raise Unauthenticated("unknown API key", "invalid_key")
        fingerprint = _fingerprint(key)
        known = self._checked.get(key_id)
        if known is None or not hmac.compare_digest(known, fingerprint):
            try:
                await asyncio.to_thread(_HASHER.verify, record["hash"], key)
            except (VerificationError, InvalidHashError):
                raise Unauthenticated("unknown API key", "invalid_key") from None
            self._checked[key_id] = fingerprint
        now = datetime.now(UTC)
        if record["revoked_at"] is not None:
            raise Unauthenticated("the API key was revoked", "invalid_key")
        if record["expires_at"] <= now:
            raise Unauthenticated("the API key has expired", "invalid_key")
        self._note_use(pool, key_id)
        return Principal(
            subject=f"key:{key_id}",
            tenant=record["tenant"],
            roles=(record["role"],),
            kind="api_key",
            credential=key_id,
            expires_at=record["expires_at"].timestamp(),
        )

    async def _record(self, pool: asyncpg.Pool, key_id: str) -> asyncpg.Record | None:
        now = time.monotonic()
        cached = self._records.get(key_id)
        if cached is not None and now - cached[0] < self.cache_s:
            return cached[1]
        record = await pool.fetchrow(
            "SELECT hash, tenant, role, expires_at, revoked_at FROM api_keys WHERE key_id = $1", key_id
        )
        self._records[key_id] = (now, record)
        if len(self._records) > 10_000:
            self._records.pop(next(iter(self._records)))
        return record

    def _note_use(self, pool: asyncpg.Pool, key_id: str) -> None:
        now = time.monotonic()
        if now - self._used.get(key_id, -LAST_USE_EVERY_S) < LAST_USE_EVERY_S:
            return
        self._used[key_id] = now

        async def note() -> None:
            with contextlib.suppress(OSError, asyncpg.PostgresError):
                await pool.execute("UPDATE api_keys SET last_used_at = now() WHERE key_id = $1", key_id)

        task = asyncio.create_task(note())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def forget(self, key_id: str) -> None:
        self._records.pop(key_id, None)
        self._checked.pop(key_id, None)

    # ------------------------------------------------------------------ administering keys

    async def issue(
        self,
        pool: asyncpg.Pool,
        *,
        tenant: str,
        role: str,
        name: str,
        created_by: str,
        ttl_days: int | None = None,
        rotated_from: str | None = None,
    ) -> tuple[dict[str, Any], str]:
        key_id, key = _new_key()
        hashed = await asyncio.to_thread(_HASHER.hash, key)
        expires = datetime.now(UTC) + timedelta(days=ttl_days or self.ttl_days)
        row = await pool.fetchrow(
            "INSERT INTO api_keys (key_id, name, tenant, role, hash, created_by, expires_at, rotated_from) "
            f"VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {COLUMNS}",
            key_id,
            name,
            tenant,
            role,
            hashed,
            created_by,
            expires,
            rotated_from,
        )
        return describe(row), key

    async def list(self, pool: asyncpg.Pool, tenant: str) -> list[dict[str, Any]]:
        rows = await pool.fetch(
            f"SELECT {COLUMNS} FROM api_keys WHERE tenant = $1 ORDER BY created_at, key_id", tenant
        )
        return [describe(r) for r in rows]

    async def get(self, pool: asyncpg.Pool, tenant: str, key_id: str) -> dict[str, Any] | None:
        row = await pool.fetchrow(
            f"SELECT {COLUMNS} FROM api_keys WHERE tenant = $1 AND key_id = $2", tenant, key_id
        )
        return describe(row) if row is not None else None

    async def rotate(
        self, pool: asyncpg.Pool, tenant: str, key_id: str, overlap_s: int, by: str
    ) -> tuple[dict[str, Any], str, dict[str, Any]] | None:
        """A new key like `key_id`; the old one works `overlap_s` more, then expires."""
        old = await self.get(pool, tenant, key_id)
        if old is None or old["revoked_at"] is not None:
            return None
        new, key = await self.issue(
            pool, tenant=tenant, role=old["role"], name=old["name"], created_by=by, rotated_from=key_id
        )
        row = await pool.fetchrow(
            "UPDATE api_keys SET expires_at = least(expires_at, now() + make_interval(secs => $3)), "
            f"replaced_by = $4 WHERE tenant = $1 AND key_id = $2 RETURNING {COLUMNS}",
            tenant,
            key_id,
            float(overlap_s),
            new["id"],
        )
        self.forget(key_id)
        return new, key, describe(row)

    async def revoke(self, pool: asyncpg.Pool, tenant: str, key_id: str) -> dict[str, Any] | None:
        row = await pool.fetchrow(
            "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) "
            f"WHERE tenant = $1 AND key_id = $2 RETURNING {COLUMNS}",
            tenant,
            key_id,
        )
        self.forget(key_id)
        return describe(row) if row is not None else None


def describe(row: asyncpg.Record) -> dict[str, Any]:
    """A key as admins see it: never its secret nor its hash."""
    now = datetime.now(UTC)
    state = (
        "revoked" if row["revoked_at"] is not None else "expired" if row["expires_at"] <= now else "active"
    )
    return {
        "id": row["key_id"],
        "name": row["name"],
        "tenant": row["tenant"],
        "role": row["role"],
        "state": state,
        "created_by": row["created_by"],
        "created_at": row["created_at"],
        "expires_at": row["expires_at"],
        "revoked_at": row["revoked_at"],
        "last_used_at": row["last_used_at"],
        "rotated_from": row["rotated_from"],
        "replaced_by": row["replaced_by"],
    }
