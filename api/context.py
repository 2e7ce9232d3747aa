"""What a bounded context gives the API: its routes (commands, queries, search, subscriptions)
and which of its reads the API may keep in memory."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fastapi import APIRouter


@dataclass(frozen=True)
class ApiContext:
    name: str
    routers: tuple[APIRouter, ...]
    # path prefix -> the projection whose row, keyed by the id that follows, its route
    # renders: answers kept by `api.readcache` until a change of that row
    cached: Mapping[str, str] = field(default_factory=dict)
    # what those reads need (a hit is answered without the route, so the cache checks it)
    read_permission: str = ""
