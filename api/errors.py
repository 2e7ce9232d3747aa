"""Errors mapped to HTTP once, here: domain rejection codes, bus failures, invalid
input (422, rendered by `api.inputs`) and the unexpected (500, logged, no internals)."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote

import asyncpg
from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError, WebSocketRequestValidationError
from fastapi.responses import JSONResponse, Response
from opensearchpy.exceptions import ConnectionError as SearchConnectionError
from opensearchpy.exceptions import TransportError as SearchTransportError

from api import inputs
from api.bodies import CommandQueued
from commands.bus import BusUnavailable, ResultTimeout
from shared_kernel.audit import PARKED_RETRY_AFTER_S, STATUS_OF_CODE
from shared_kernel.envelope import CommandEnvelope, CommandResult
from shared_kernel.settings import get_settings

log = logging.getLogger(__name__)


class RequestProblem(Exception):
    """An error answer with a status, a stable code and a message."""

    def __init__(self, status: int, code: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.extra = status, code, detail, extra


class NotModified(Exception):
    """The caller has this version already (`If-None-Match`): 304 with its ETag."""

    def __init__(self, etag: str) -> None:
        super().__init__(etag)
        self.etag = etag


class ReadModelsUnavailable(Exception):
    """PostgreSQL does not answer: 503 with Retry-After."""


class CommandRejected(RequestProblem):
    def __init__(self, result: CommandResult) -> None:
        super().__init__(STATUS_OF_CODE.get(result.code, 409), result.code, result.reason)
        # Domain details may use any name (even "status"): never as keyword arguments.
        self.extra = {**result.details, "current_version": result.current_version}
        # a parked aggregate waits for an operator: not worth retrying every second
        self.retry_after = str(PARKED_RETRY_AFTER_S) if result.code == "aggregate_parked" else None


def _body(problem: RequestProblem) -> dict[str, Any]:
    extra = dict(problem.extra)
    body: dict[str, Any] = {"error": problem.code, "detail": problem.detail}
    for name in ("current_version", "field"):
        if name in extra:
            body[name] = extra.pop(name)
    if problem.status == 422 and "field" in body:
        # Same shape as FastAPI's own validation errors, so clients parse one format.
        where = extra.pop("location", "body")
        body["detail"] = [{"loc": [where, body["field"]], "msg": problem.detail, "type": problem.code}]
    if extra:
        body["extra"] = extra
    renderable: dict[str, Any] = inputs.renderable(body)  # a message may quote the input
    return renderable


COMMANDS_PATH = "/api/v1/commands"  # a command's status by id (api.commands)


class Queued(Exception):
    """Answered 202 by its handler (api.errors): the route's own answer is the commit's."""

    def __init__(self, envelope: CommandEnvelope) -> None:
        self.url = f"{COMMANDS_PATH}/{quote(envelope.command_id, safe='')}"
        self.body = CommandQueued(
            command_id=envelope.command_id, id=envelope.aggregate_id, status="pending", status_url=self.url
        )

    def response(self) -> JSONResponse:
        headers = {"Location": self.url, "Preference-Applied": "respond-async", "Retry-After": "1"}
        return JSONResponse(self.body.model_dump(), 202, headers)


def install(app: FastAPI) -> None:
    retry_after = str(get_settings().retry_after_s)

    @app.exception_handler(RequestProblem)
    async def _problem(_: Request, exc: RequestProblem) -> JSONResponse:
        wait = getattr(exc, "retry_after", None) or (retry_after if exc.status == 503 else None)
        headers = {"Retry-After": wait} if wait else None
        return JSONResponse(_body(exc), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return inputs.invalid(exc.errors())

    @app.exception_handler(WebSocketRequestValidationError)
    async def _invalid_socket(websocket: WebSocket, exc: WebSocketRequestValidationError) -> None:
        # refused with the HTTP answer a stream request gets (a 422 naming the field)
        try:
            await websocket.send_denial_response(inputs.invalid(exc.errors()))
        except RuntimeError:  # the server cannot answer a handshake with HTTP
            await websocket.close(1008, "invalid input")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        # Starlette's ServerErrorMiddleware answers with this, then re-raises for the server.
        correlation = inputs.correlation_id(request.headers.get("x-correlation-id"))
        log.error(
            "unexpected error answering a request",
            exc_info=exc,
            extra={
                "correlation_id": correlation,
                "method": request.method,
                "path": request.url.path,
                "error_type": type(exc).__name__,
            },
        )
        return JSONResponse(
            {
                "error": "internal_error",
                "detail": "an unexpected error occurred; it is logged with this correlation_id",
                "correlation_id": correlation,
            },
            status_code=500,
            headers={"X-Correlation-Id": correlation},
        )

    @app.exception_handler(Queued)
    async def _queued(_: Request, exc: Queued) -> JSONResponse:
        return exc.response()

    @app.exception_handler(NotModified)
    async def _not_modified(_: Request, exc: NotModified) -> Response:
        return Response(status_code=304, headers={"ETag": exc.etag})

    @app.exception_handler(BusUnavailable)
    async def _unavailable(_: Request, exc: BusUnavailable) -> JSONResponse:
        return JSONResponse(
            {"error": "unavailable", "detail": str(exc)},
            status_code=503,
            headers={"Retry-After": retry_after},
        )

    @app.exception_handler(ReadModelsUnavailable)
    @app.exception_handler(asyncpg.PostgresConnectionError)
    @app.exception_handler(asyncpg.CannotConnectNowError)
    @app.exception_handler(ConnectionError)
    async def _read_models_down(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            {"error": "unavailable", "detail": f"the read models are unreachable: {exc}"},
            status_code=503,
            headers={"Retry-After": retry_after},
        )

    @app.exception_handler(SearchTransportError)
    async def _search_failed(_: Request, exc: SearchTransportError) -> JSONResponse:
        # ConnectionError and timeouts have no HTTP status; 429 and 5xx are the
        # cluster's own overload or outage. Anything else would be a request we built.
        status = exc.status_code if isinstance(exc.status_code, int) else None
        if isinstance(exc, SearchConnectionError) or status is None or status == 429 or status >= 500:
            return JSONResponse(
                {"error": "unavailable", "detail": f"the search indexes are unreachable: {exc.error}"},
                status_code=503,
                headers={"Retry-After": retry_after},
            )
        raise exc

    @app.exception_handler(ResultTimeout)
    async def _timeout(_: Request, exc: ResultTimeout) -> JSONResponse:
        return JSONResponse(
            {
                "error": "result_timeout",
                "detail": f"{exc}; it may still apply: retry with the same Idempotency-Key",
            },
            status_code=503,
            headers={"Retry-After": retry_after},
        )
