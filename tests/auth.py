"""Credentials for the tests: tokens of the local issuer, as `cqrs auth token` prints them."""

from __future__ import annotations

from functools import cache
from typing import Any

import httpx

from api.auth.local import issue_token
from shared_kernel.settings import Settings

TENANT = "acme"


EVERYTHING = "admin+platform"  # an admin of acme who may also rebuild the projections


@cache
def token(role: str = EVERYTHING, tenant: str = TENANT, sub: str = "tester", ttl: int = 6 * 3600) -> str:
    """A token of `role` (roles joined by `+`) in `tenant`."""
    return issue_token(Settings(), sub, role.split("+"), tenant, ttl)


def bearer(role: str = EVERYTHING, tenant: str = TENANT, sub: str = "tester") -> dict[str, str]:
    """The Authorization header of `role` in `tenant` (an admin of acme and the platform unless told)."""
    return {"Authorization": f"Bearer {token(role, tenant, sub)}"}


def api_client(
    role: str = EVERYTHING, tenant: str = TENANT, sub: str = "tester", **options: Any
) -> httpx.AsyncClient:
    """An HTTP client of the API carrying a token of `role` in `tenant`."""
    headers = {**bearer(role, tenant, sub), **options.pop("headers", {})}
    return httpx.AsyncClient(headers=headers, **options)
