"""Where the local stack keeps its credentials, and the cluster's shared secret.

The cluster secret authenticates API instances to each other: a command forwarded to
its partition's owner (`/internal/v1/commands`) carries it, and the owner trusts the
envelope's actor and tenant because of it. In production it is `APP_CLUSTER_SECRET`
(settings refuse to start without it); elsewhere it is made once in the local key folder.
"""

from __future__ import annotations

import os
import secrets
import uuid
from functools import cache
from pathlib import Path

from shared_kernel.settings import Settings

CLUSTER_HEADER = "X-Cluster-Secret"


def key_dir(settings: Settings) -> Path:
    if settings.auth_key_dir:
        return Path(settings.auth_key_dir)
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "kafka-cqrs" / "auth"


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write a file aside and rename it into place: a reader never sees half of it, and
    two processes racing to create it both leave a whole one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    aside = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(aside, path)


@cache
def local_secret(folder: Path, name: str) -> str:
    """A random secret kept in `folder/name`, made by the first process that asks: the
    file is written aside and linked into place only if none is there, so processes that
    race to make it all read the one that won."""
    path = folder / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        aside = path.with_name(f".{name}.{uuid.uuid4().hex}")
        fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_urlsafe(32).encode())
        try:
            os.link(aside, path)
        except FileExistsError:
            pass  # another process made it first: theirs is the secret
        finally:
            os.unlink(aside)
    return path.read_text().strip()


def cluster_secret(settings: Settings) -> str:
    if settings.cluster_secret:
        return settings.cluster_secret
    return local_secret(key_dir(settings), "cluster-secret")


def webhook_key(settings: Settings) -> str:
    """The key every webhook's signing secret is derived from (`commands.webhooks.signing`)."""
    if settings.webhook_signing_key:
        return settings.webhook_signing_key
    return local_secret(key_dir(settings), "webhook-key")
