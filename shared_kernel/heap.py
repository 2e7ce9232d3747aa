"""The interpreter's cyclic garbage collector in the long-running processes.

A full collection (generation 2) scans every object the collector tracks, with the
event loop stopped. The API holds about 180k of them once started (FastAPI's routes and
their models, pydantic's schemas, the Avro schemas, OpenTelemetry, the clients), almost
none of which ever become garbage: under S1's load each full collection took 70-180 ms
and came every 2 s, freeing nothing, and those pauses were the commands' p99 (190-230 ms
at 16 clients; 79 ms without them, same run). Once the process has settled, what is
alive then is moved out of the collector's sight (`gc.freeze`): it is still freed when
nothing refers to it, only never scanned for cycles again.
"""

from __future__ import annotations

import asyncio
import gc
import logging

log = logging.getLogger(__name__)

SETTLE_S = 5.0  # long enough for the start-up connections, imports and caches of a process


async def freeze_when_settled(delay_s: float = SETTLE_S) -> None:
    """After `delay_s`, collect once and freeze what survives (see the module's text)."""
    await asyncio.sleep(delay_s)
    gc.collect()
    gc.freeze()
    log.info("start-up objects frozen out of the garbage collector", extra={"objects": gc.get_freeze_count()})
