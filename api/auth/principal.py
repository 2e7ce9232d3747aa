"""Who is calling: what every authenticated request carries past the edge."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from api.auth.permissions import main_role, permissions_of


class Unauthenticated(Exception):
    """No credential, or one that does not hold: 401 with `WWW-Authenticate`."""

    def __init__(self, detail: str, code: str = "invalid_token") -> None:
        super().__init__(detail)
        self.detail, self.code = detail, code


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str  # the actor of every command and audit record
    tenant: str
    roles: tuple[str, ...]
    kind: Literal["token", "api_key", "ticket"]
    credential: str = ""  # the token's jti or the key's id: which credential, never the secret
    expires_at: float | None = None  # epoch seconds: a stream ends then

    @property
    def permissions(self) -> frozenset[str]:
        return permissions_of(self.roles)

    @property
    def role(self) -> str:
        return main_role(self.roles)

    def can(self, permission: str) -> bool:
        return permission in self.permissions

    def as_dict(self) -> dict[str, object]:
        return {
            "subject": self.subject,
            "tenant": self.tenant,
            "roles": list(self.roles),
            "kind": self.kind,
            "credential": self.credential,
            "expires_at": self.expires_at,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, object]) -> Principal:
        roles = raw.get("roles") or ()
        expires = raw.get("expires_at")
        return cls(
            subject=str(raw["subject"]),
            tenant=str(raw["tenant"]),
            roles=tuple(str(r) for r in roles) if isinstance(roles, list | tuple) else (),
            kind="ticket",
            credential=str(raw.get("credential", "")),
            expires_at=float(expires) if isinstance(expires, int | float) else None,
        )
