"""Real-time subscriptions: Server-Sent Events and WebSocket streams of the events,
served straight from Kafka (read_committed), filtered, resumable without gaps.

- `spec`: the filters and the starting position a client asks for (422 when invalid).
- `messages`: the wire format, and positions as `shared_kernel.position` tokens.
- `feed`: one live consumer per API process, fanned out in process.
- `subscriber`: one client's bounded mailbox and its catch-up from a position.
- `routes`: the endpoints.

`install(app)` adds the routes and maps an unreachable log to 503 with Retry-After;
the application's lifespan starts and stops the `LiveFeed` kept in `app.state.feed`.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from api.subscriptions.feed import FeedUnavailable, LiveFeed
from api.subscriptions.routes import router, unavailable

__all__ = ["FeedUnavailable", "LiveFeed", "install"]


def install(app: FastAPI) -> None:
    app.include_router(router)

    @app.exception_handler(FeedUnavailable)
    async def _feed_unavailable(request: Request, exc: FeedUnavailable) -> JSONResponse:
        return unavailable(request.app.state.settings, exc)
