"""The web app: ``/`` and its assets, plain HTML, CSS and JavaScript shipped as package data
(``gateway/web/``), no build step (docs/architecture.md, "The web app and WebSocket API")."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter
from starlette.responses import Response

from gateway.http.errors import NotFound

router = APIRouter(include_in_schema=False)

ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "markdown.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# Scripts and styles from this origin only, no inline script: rendered text cannot run code.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@cache
def asset(name: str) -> bytes:
    """An asset's bytes, read once from the package."""
    return files("gateway").joinpath("web", name).read_bytes()


def _serve(name: str) -> Response:
    return Response(asset(name), media_type=ASSETS[name], headers=SECURITY_HEADERS)


@router.get("/")
async def page() -> Response:
    """The page: sign in, paste or drop a document, watch its summary stream in."""
    return _serve("index.html")


@router.get("/web/{name}")
async def web_asset(name: str) -> Response:
    if name not in ASSETS or name == "index.html":
        raise NotFound(f"no asset {name[:64]}")
    return _serve(name)
