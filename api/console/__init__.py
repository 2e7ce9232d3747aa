"""The operator's console at `/console`: one page and its assets, shipped in the package
(no CDN, nothing from another origin). The page itself is public, like `/docs`; what it
shows comes from the API's own routes (admin, SSE) called with the token the person gives
it, so it shows nothing the API would not show them."""

from __future__ import annotations

import functools
import html
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse

from api.auth.access import public

STATIC = Path(__file__).resolve().parent / "static"
ASSETS = {"console.js": "text/javascript", "console.css": "text/css"}
# The page loads only its own assets, and talks only to this origin.
POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
HEADERS = {
    "Content-Security-Policy": POLICY,
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}

router = APIRouter(tags=["console"], include_in_schema=False)


@functools.cache
def _page() -> str:
    from commands import CONTEXTS

    contexts = ",".join(ctx.name for ctx in CONTEXTS)
    return (STATIC / "console.html").read_text().replace("{contexts}", html.escape(contexts))


@router.get("/console", dependencies=[public()])
async def console_page() -> HTMLResponse:
    return HTMLResponse(_page(), headers=HEADERS)


@router.get("/console/assets/{name}", dependencies=[public()])
async def console_asset(
    name: Annotated[Literal["console.js", "console.css"], PathParam()],
) -> FileResponse:
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers=HEADERS)
