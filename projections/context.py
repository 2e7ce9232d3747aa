"""What a bounded context gives the read side: its name (its events topic is
`<prefix>.events.<name>`) and its projections."""

from __future__ import annotations

from dataclasses import dataclass

from projections.projection import Projection


@dataclass(frozen=True)
class ReadContext:
    name: str
    projections: tuple[Projection, ...]
