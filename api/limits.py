"""The request body limit (`APP_MAX_BODY_BYTES`), enforced before any route reads a body.

A plain ASGI middleware, outermost of the app's own:

- a `Content-Length` over the limit is answered 413 at once, the body unread (the
  server discards it; the connection stays usable);
- a body without a length (`Transfer-Encoding: chunked`) is read here, counting, up to
  the limit: over it, 413 and the rest is not read; within it, the route gets the body
  as it came.

The answer has the API's error shape, `{"error": "too_large", "detail": ..., "extra":
{"max_bytes": ...}}`, and no `Retry-After`: the same body would get the same answer.
What is within the limit can still be too large for Kafka once decided (an aggregate's
snapshot grows with each command): that 413 comes from the write side (api.dispatch).
"""

from __future__ import annotations

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length: int | None = None
        chunked = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = None  # the server refuses a malformed length itself
            elif name == b"transfer-encoding":
                chunked = True
        if length is not None and length > self.max_bytes:
            await self._refuse(send)
            return
        if not chunked:
            # The server delivers no more than Content-Length bytes, and no body without one.
            await self.app(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: let the app see it
                await self.app(scope, _replay([message], receive), send)
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self._refuse(send)
                return
            if not message.get("more_body", False):
                break
        whole: Message = {"type": "http.request", "body": bytes(body), "more_body": False}
        await self.app(scope, _replay([whole], receive), send)

    async def _refuse(self, send: Send) -> None:
        body = orjson.dumps(
            {
                "error": "too_large",
                "detail": f"the request body is larger than {self.max_bytes:,} bytes",
                "extra": {"max_bytes": self.max_bytes},
            }
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """`receive` that first hands out the messages already read, then the server's own."""
    queued = list(messages)

    async def replayed() -> Message:
        if queued:
            return queued.pop(0)
        return await receive()

    return replayed
