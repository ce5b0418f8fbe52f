"""The web playground: `GET /` serves `static/index.html`, `GET /static/<name>` its script and stylesheet.

Only the files named in `ASSETS` are served (no directory listing, no path from the request reaches the
file system). Plain HTML, CSS and JavaScript shipped in the package: no CDN, no build step. The pages are
public (the API calls they make are not); `--ui false` leaves these routes out.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, PlainTextResponse, Response

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
ASSETS: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# the paths the API-key middleware leaves open when the UI is on
PUBLIC_PATHS: tuple[str, ...] = ("/", *(f"/static/{name}" for name in ASSETS))
_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    # no inline script, no third-party origin: model text can never run as code here
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
}

router = APIRouter(include_in_schema=False)


def _asset(name: str) -> Response:
    if name not in ASSETS:
        return PlainTextResponse("Not Found", status_code=404)
    return FileResponse(STATIC_DIR / name, media_type=ASSETS[name], headers=_HEADERS)


@router.api_route("/", methods=["GET", "HEAD"])
async def index() -> Response:
    return _asset("index.html")


@router.api_route("/static/{name}", methods=["GET", "HEAD"])
async def static_file(name: str) -> Response:
    return _asset(name)
