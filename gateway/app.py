"""The REST gateway: FastAPI app factory.

`create_app(settings)` builds the app; its lifespan opens the gRPC channels to the services (see
`gateway.backends`) and closes them on shutdown. Tests drive the app in-process through
`app.router.lifespan_context(app)` and an httpx ASGITransport.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import RedirectResponse

from gateway import errors
from gateway.backends import Backends
from gateway.config import GatewaySettings
from gateway.routers import campaigns, health
from gateway.telemetry import telemetry_config

DESCRIPTION = """
The Shoal REST API: campaigns, their runs and status.

Conventions:
- Every error answers `{error, message, details: [{field, message}]}`, where `error` is a stable
  code: 400 invalid request, 402 insufficient balance, 403 not allowed, 404 unknown, 409 wrong
  state or conflict, 5xx ours.
- Money is in integer cents (EUR), never a float.
- Campaign ids are UUIDs.
"""


def _version() -> str:
    try:
        return version("shoal")
    except PackageNotFoundError:
        return "0.0.0"


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI documents 422 for validation errors; this API answers 400 (PRODUCT.md), so say so."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
        tags=app.openapi_tags,
    )
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    for name in ("HTTPValidationError", "ValidationError"):
        schema.get("components", {}).get("schemas", {}).pop(name, None)
    app.openapi_schema = schema
    return schema


def create_app(settings: GatewaySettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        backends = Backends.open(settings)
        app.state.backends = backends
        try:
            yield
        finally:
            await backends.close()

    app = FastAPI(
        title="Shoal API",
        version=_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
        telemetry=telemetry_config(),
        openapi_tags=[
            {"name": "campaigns", "description": "Campaign status and operations"},
            {"name": "health", "description": "Liveness and readiness probes"},
        ],
    )
    app.state.settings = settings
    errors.install(app)
    app.include_router(health.router)
    app.include_router(campaigns.router)

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/docs")

    def openapi() -> dict[str, Any]:
        return _openapi(app)

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to shape the schema
    return app
