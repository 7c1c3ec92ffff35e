"""`/dashboard`: the operators' web dashboard, static files over the same REST API.

The page and its assets need no key (they hold no data): the browser signs in with an API key,
keeps it in sessionStorage and sends it as `Authorization: Bearer` on every API call. No build
step: plain HTML, CSS and JavaScript modules under `gateway/dashboard/static/`, served as they
are. Only files present there when the gateway starts are served (looked up by name, so no path
reaches outside the folder). `GET /dashboard/config.json` tells the page where Jaeger is.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response

from gateway.config import GatewaySettings

STATIC = Path(__file__).resolve().parents[1] / "dashboard" / "static"
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
# The page talks to its own origin only; an email preview is shown in a sandboxed srcdoc frame,
# which inherits this policy (its inline styles are allowed, its scripts are not).
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; frame-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _files() -> dict[str, Path]:
    if not STATIC.is_dir():
        return {}
    return {p.name: p for p in STATIC.iterdir() if p.is_file() and p.suffix in _TYPES}


FILES = _files()

router = APIRouter(prefix="/dashboard", include_in_schema=False)


@router.get("")
async def dashboard_redirect() -> RedirectResponse:
    return RedirectResponse("/dashboard/", status_code=307)


@router.get("/")
async def dashboard_page() -> Response:
    return _serve("index.html")


@router.get("/config.json")
async def dashboard_config(request: Request) -> JSONResponse:
    """What the page needs to know that is not behind a key: where the tracing UI is."""
    settings: GatewaySettings = request.app.state.settings
    return JSONResponse({"jaeger_url": settings.jaeger_url.rstrip("/")}, headers=_HEADERS)


@router.get("/{name}")
async def dashboard_file(name: str) -> Response:
    return _serve(name)


def _serve(name: str) -> Response:
    path = FILES.get(name)
    if path is None:
        return JSONResponse(
            {"error": "not_found", "message": f"no dashboard file {name!r}", "details": []},
            status_code=404,
        )
    return FileResponse(path, media_type=_TYPES[path.suffix], headers=_HEADERS)
