"""The owners' internal endpoint: commands forwarded by API instances that do not own
their partition (commands.bus, commands.routing).

It answers the committed `CommandResult` as JSON (200), or 409 `not_owner` when this
process does not own the command's partition (nothing was written: the sender reads
the directory again), or 503 with Retry-After when the partition is backlogged or its
transaction failed (the sender's client retries with the same Idempotency-Key). It is
not part of the public API (absent from the OpenAPI document).

`create_owner_app` is the HTTP face of a processor run alone (`cqrs run
command-processor`): this endpoint and the health routes, the processor in its lifespan.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse

from api import errors
from api.auth.access import CLUSTER, requires
from commands.bus import INTERNAL_COMMANDS, NOT_OWNER
from commands.partition import Backlogged, NotOwner, Unsettled
from commands.processor import CommandProcessor
from shared_kernel import heap
from shared_kernel.envelope import CommandEnvelope, MalformedRecord
from shared_kernel.settings import Settings, get_settings

log = logging.getLogger(__name__)

router = APIRouter(include_in_schema=False)


@router.post(INTERNAL_COMMANDS, dependencies=[requires(CLUSTER)])
async def forwarded_command(request: Request) -> Response:
    owner: CommandProcessor | None = getattr(request.app.state, "owner", None)
    if owner is None:
        return JSONResponse({"error": NOT_OWNER, "detail": "this process owns no partition"}, 409)
    body = await request.body()
    try:
        command = CommandEnvelope.from_bytes(body)
    except MalformedRecord as exc:
        return JSONResponse({"error": "invalid_command", "detail": str(exc)}, 422)
    settings: Settings = request.app.state.settings
    try:
        result = await asyncio.wait_for(owner.submit(command, body), settings.command_timeout_s)
    except NotOwner as exc:
        return JSONResponse({"error": NOT_OWNER, "detail": str(exc)}, 409)
    except (Backlogged, Unsettled, TimeoutError) as exc:
        return JSONResponse(
            {"error": "unavailable", "detail": str(exc) or "no result in time"}, 503, {"Retry-After": "1"}
        )
    return Response(result.to_bytes(), media_type="application/json")


@contextlib.asynccontextmanager
async def run_owner(app: FastAPI, owner: CommandProcessor) -> AsyncIterator[None]:
    """Run `owner` beside the app until the app stops; a crash of it is logged and it is
    started again (its partitions return to it: static membership)."""
    stop = asyncio.Event()

    async def keep_running() -> None:
        delay = 0.5
        while not stop.is_set():
            try:
                await owner.run(stop)
            except Exception:
                log.exception("the command processor failed; starting it again", extra={"retry_in_s": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)

    app.state.owner = owner
    task = asyncio.create_task(keep_running(), name="command-processor")
    try:
        yield
    finally:
        stop.set()
        await task


def create_owner_app(settings: Settings | None = None) -> FastAPI:
    """A command processor with its internal endpoint (`cqrs run command-processor`)."""
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        owner = CommandProcessor(settings, url=settings.advertised_url, instance=settings.instance_id or None)
        settling = asyncio.create_task(heap.freeze_when_settled())
        try:
            async with run_owner(app, owner):
                yield
        finally:
            settling.cancel()

    app = FastAPI(title="kafka-cqrs command processor", lifespan=lifespan, openapi_url=None)
    app.state.settings = settings
    errors.install(app)  # its refusals (401 without the cluster secret) in the API's shape

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    app.include_router(router)
    from api import metrics as api_metrics  # the API's routes import this module

    app.add_middleware(api_metrics.HttpMetrics)
    app.include_router(api_metrics.router)
    return app
