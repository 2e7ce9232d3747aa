"""What the webhooks context's write side, its routes and its delivery job share: the
signing secrets, the Standard Webhooks headers, and which targets may be called.

**Secrets.** A subscription's signing secret is never stored: it is
HMAC-SHA256(`APP_WEBHOOK_SIGNING_KEY`, tenant / id / generation), shown as `whsec_` and
base64 (the Standard Webhooks form). The register and rotate answers show it once; the
delivery job derives it again to sign. The log holds only the generation; a retried
register answers the same secret; changing the key changes every secret.

**Targets.** http(s) URLs without credentials in them. A host that names or resolves to
a private, loopback, link-local, multicast or reserved address is refused unless one of
`APP_WEBHOOK_ALLOWED_NETWORKS` holds it; it is checked when the webhook is registered
(its shape) and again before every attempt (what the name resolves to then).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import socket
from datetime import UTC, datetime
from urllib.parse import urlsplit

from standardwebhooks import Webhook

from shared_kernel.credentials import key_dir, local_secret
from shared_kernel.domain import InvalidCommand
from shared_kernel.settings import Settings

MAX_URL = 2048
SECRET_PREFIX = "whsec_"


def webhook_key(settings: Settings) -> str:
    """The key every webhook's signing secret is derived from."""
    if settings.webhook_signing_key:
        return settings.webhook_signing_key
    return local_secret(key_dir(settings), "webhook-key")


def secret_of(key: str, tenant: str, webhook_id: str, generation: int) -> str:
    """The signing secret of one generation of a webhook."""
    raw = hmac.new(key.encode(), f"{tenant}/{webhook_id}/{generation}".encode(), hashlib.sha256).digest()
    return SECRET_PREFIX + base64.b64encode(raw[:24]).decode()


def webhook_id_of(subscription_id: str, event_id: str) -> str:
    """The `webhook-id` of one event's delivery to one subscription: the same on every
    attempt and after any restart, so a receiver can drop repeats."""
    digest = hashlib.sha256(f"{subscription_id}/{event_id}".encode()).hexdigest()[:26]
    return f"msg_{digest}"


def headers(msg_id: str, body: str, secrets: list[str], at: datetime | None = None) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt: one `v1,` signature per secret in
    force (the current one first; during a rotation's overlap the previous one too)."""
    when = (at or datetime.now(UTC)).astimezone(UTC)
    signatures = " ".join(Webhook(s).sign(msg_id, when, body) for s in secrets)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": signatures,
        "content-type": "application/json",
    }


def check_target_shape(url: str) -> str:
    """The URL as stored, or an InvalidCommand naming `url`."""
    url = url.strip()
    if len(url) > MAX_URL:
        raise InvalidCommand(f"url has at most {MAX_URL} characters", field="url")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidCommand(f"url is not a URL: {exc}", field="url") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidCommand("url must be an http or https URL with a host", field="url")
    if parts.username or parts.password:
        raise InvalidCommand("url must not carry credentials", field="url")
    if parts.fragment:
        raise InvalidCommand("url must not have a fragment", field="url")
    if port == 0:
        raise InvalidCommand("url names port 0", field="url")
    return url


def _blocked(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


def refusal(url: str, allowed: list[str]) -> str | None:
    """Why `url`'s host may not be called as it is written (a literal address), or None."""
    host = urlsplit(url).hostname or ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if host == "localhost" or host.endswith(".localhost"):
            address = ipaddress.ip_address("127.0.0.1")
        else:
            return None  # a name: checked when it is resolved
    return _refused_address(address, allowed)


Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _refused_address(address: Address, allowed: list[str]) -> str | None:
    if not _blocked(address):
        return None
    if any(address in ipaddress.ip_network(n, strict=False) for n in allowed):
        return None
    return f"{address} is a private, loopback or link-local address (APP_WEBHOOK_ALLOWED_NETWORKS)"


async def resolved_refusal(url: str, allowed: list[str]) -> str | None:
    """Why `url` may not be called now (what its host resolves to), or None."""
    literal = refusal(url, allowed)
    if literal is not None:
        return literal
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        ipaddress.ip_address(host)
        return None  # a literal address that passed
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, parts.port or (443 if parts.scheme == "https" else 80), type=socket.SOCK_STREAM
        )
    except OSError as exc:
        return f"{host} does not resolve: {exc}"
    for info in infos:
        why = _refused_address(ipaddress.ip_address(info[4][0]), allowed)
        if why is not None:
            return f"{host} resolves to {why}"
    return None
