"""Following what projectors commit: PostgreSQL notifications on the read models' channel.

Every projector batch transaction ends with a notification of what it changed
(`projections.changes`), and a swap of versions sends one too; PostgreSQL delivers them
after the commit, in commit order. `ChangeFollower` listens on a connection of its own
and tells its listeners:

- `following`: it listens, and here are the live versions and their positions (read
  after LISTEN in one snapshot, so no commit falls between the two);
- `committed`: a batch of a live version committed, or a swap made another version
  live (batches of a version being built are not told: readers do not see it);
- `forget`: something changed that no notification names (an unreadable payload);
- `lost`: it does not listen any more, so notifications may be missed until the next
  `following`.

Listeners are the rendered reads kept in memory (`api.rendered`) and read-your-writes
(`api.consistency`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import asyncpg

from projections.changes import Change, channel
from projections.db import schema_name
from shared_kernel.settings import Settings

log = logging.getLogger(__name__)

Positions = Mapping[str, Mapping[tuple[str, int], int]]  # projection -> (topic, partition) -> offset


class ChangeListener:
    """What a listener of the change follower may hear (each is a no-op by default)."""

    def following(self, live: Mapping[str, int], positions: Positions) -> None:
        """Listening; the live versions and what each has committed, per partition."""

    def committed(self, change: Change) -> None:
        """A batch of a live version committed (`change.live` is None), or a swap made
        version `change.live` the one readers see."""

    def forget(self) -> None:
        """Anything may have changed."""

    def lost(self) -> None:
        """Not listening any more: notifications may be missed."""


class ChangeFollower:
    """Listens to the projectors' change notifications and tells its listeners."""

    RETRY_MAX_S = 5.0
    PING_S = 2.0  # a half-open connection is noticed within two of these

    def __init__(self, settings: Settings, *listeners: ChangeListener) -> None:
        self.settings = settings
        self.listeners = listeners
        self.channel = channel(schema_name(settings))
        self.live: dict[str, int] = {}
        self.connected = False
        self._lost = asyncio.Event()
        self._held: list[Change] | None = None  # notifications delivered while loading

    def on_change(self, change: Change) -> None:
        if change.live is not None:
            # Another version is live (a rebuild, or a rollback to one behind): what the
            # previous one had reached says nothing about it.
            self.live[change.projection] = change.live
        elif change.version != self.live.get(change.projection, 1):
            return  # a version being built: readers do not see it
        for listener in self.listeners:
            listener.committed(change)

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            change = Change.parse(payload)
        except Exception as exc:  # e.g. a payload of another writer: forget everything, to be safe
            log.warning("unreadable change notification", extra={"error": repr(exc)})
            for listener in self.listeners:
                listener.forget()
            return
        if self._held is not None:
            self._held.append(change)
        else:
            self.on_change(change)

    def _terminated(self, _conn: Any) -> None:
        self._lost.set()

    async def run(self) -> None:
        """Follow until cancelled; reconnect (with backoff) whenever the connection is lost."""
        delay = 0.5
        while True:
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: listeners know nothing until back
                log.warning(
                    "read model changes not followed; reads go to PostgreSQL", extra={"error": repr(exc)}
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.RETRY_MAX_S)
            else:
                delay = 0.5

    async def _follow(self) -> None:
        conn = await asyncpg.connect(
            self.settings.postgres_dsn,
            server_settings={
                "search_path": schema_name(self.settings),
                "application_name": f"{self.settings.service_name}:changes"[:63],
            },
        )
        try:
            self._lost.clear()
            conn.add_termination_listener(self._terminated)
            self._held = []
            await conn.add_listener(self.channel, self._notified)
            await self._load(conn)
            self.connected = True
            log.info("following read model changes", extra={"channel": self.channel})
            while not self._lost.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._lost.wait(), self.PING_S)
                if not self._lost.is_set():
                    await asyncio.wait_for(conn.fetchval("SELECT 1"), self.PING_S)
            log.warning("the connection following read model changes was lost; reconnecting")
        finally:
            self.connected = False
            self._held = None
            for listener in self.listeners:
                listener.lost()  # notifications may be missed from here on
            if not conn.is_closed():
                conn.terminate()

    async def _load(self, conn: asyncpg.Connection) -> None:
        """The live versions and their positions, read after LISTEN in one snapshot.
        Notifications delivered meanwhile are held and told after it, in order: those
        of commits the snapshot saw change nothing (positions only grow, a swap only
        forgets), those of later commits (PostgreSQL sends them as the snapshot's
        transaction ends, before its COMMIT returns) bring it up to date."""
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            live = await conn.fetch(
                "SELECT projection, version FROM projection_versions WHERE state = 'live'"
            )
            rows = await conn.fetch(
                "SELECT p.projection, p.topic, p.partition, p.next_offset FROM projection_positions p "
                "LEFT JOIN projection_versions v ON v.projection = p.projection AND v.state = 'live' "
                "WHERE p.version = coalesce(v.version, 1)"
            )
        self.live = {r["projection"]: r["version"] for r in live}
        positions: dict[str, dict[tuple[str, int], int]] = {}
        for r in rows:
            positions.setdefault(r["projection"], {})[(r["topic"], r["partition"])] = r["next_offset"]
        for listener in self.listeners:
            listener.following(self.live, positions)
        held, self._held = self._held or [], None
        for change in held:
            self.on_change(change)
