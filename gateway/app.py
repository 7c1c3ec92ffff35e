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
from fastapi.responses import RedirectResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway import errors
from gateway.auth import Authenticator
from gateway.backends import Backends
from gateway.body_limit import BodyLimit
from gateway.config import GatewaySettings
from gateway.keys import MIGRATIONS
from gateway.routers import (
    billing,
    campaigns,
    contacts,
    dashboard,
    executions,
    funnel,
    health,
    providers,
    segments,
    templates,
    webhooks,
)
from gateway.telemetry import telemetry_config
from gateway.webhooks import Dispatcher as WebhookDispatcher
from shoal import metrics as shoal_metrics
from shoal.db import Database

DESCRIPTION = """
The Shoal REST API: campaigns, contacts, segments, templates, billing and webhooks.

Conventions:
- `Authorization: Bearer <API key>` on every route but the health probes, the docs and signed
  provider callbacks. A key belongs to one workspace and carries scopes (`campaigns:read`,
  `campaigns:trigger`, `campaigns:write`, `contacts:read|write`, `templates:read|write`,
  `billing:read|write`, `webhooks:read|write`, `admin`; a `:write` scope also reads), optionally
  restricted to listed campaigns. Requests are rate limited per key (429 with `Retry-After`).
- Every error answers `{error, message, details: [{field, message}]}`, where `error` is a stable
  code: 400 invalid request, 401 no or bad key, 402 insufficient balance, 403 not allowed,
  404 unknown, 409 wrong state or conflict, 422 a semantic rule broken, 429 rate limited,
  5xx ours.
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
            responses = operation.get("responses", {})
            # Only FastAPI's own 422 goes; a route's documented 422 (a semantic rule) stays.
            if "HTTPValidationError" in str(responses.get("422", "")):
                responses.pop("422")
    for name in ("HTTPValidationError", "ValidationError"):
        schema.get("components", {}).get("schemas", {}).pop(name, None)
    app.openapi_schema = schema
    return schema


def create_app(settings: GatewaySettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        keys = Database(settings.resolved_database_url(), migrations_dir=MIGRATIONS)
        await keys.call(keys.migrate)
        auth = Authenticator(keys, settings.rate_limit)
        backends = Backends.open(settings)
        app.state.backends = backends
        app.state.auth = auth
        app.state.receipts = providers.ReceiptIngest(settings)
        # Outgoing webhooks: events from the bus become signed deliveries (gateway.webhooks). It
        # connects to NATS in the background, so the API starts whether NATS is up or not.
        dispatcher = WebhookDispatcher(settings, keys)
        await dispatcher.start()
        app.state.webhooks = dispatcher
        try:
            yield
        finally:
            await dispatcher.stop()
            await backends.close()
            await keys.close()

    app = FastAPI(
        title="Shoal API",
        version=_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
        telemetry=telemetry_config(),
        openapi_tags=[
            {"name": "campaigns", "description": "Campaigns: authoring, launch, status and operations"},
            {"name": "contacts", "description": "Contacts, bulk import and consent records"},
            {"name": "segments", "description": "Saved audience filters and their size"},
            {"name": "templates", "description": "Message templates, versions, publishing and preview"},
            {"name": "billing", "description": "Prepaid balance, top-ups, auto-reload, prices and ledger"},
            {"name": "webhooks", "description": "Outgoing webhooks: endpoints, deliveries and replay"},
            {"name": "providers", "description": "Signed callbacks from channel providers"},
            {"name": "health", "description": "Liveness and readiness probes"},
        ],
    )
    app.state.settings = settings
    errors.install(app)
    app.add_middleware(
        BodyLimit,
        max_bytes=settings.max_body_bytes,
        callback_max_bytes=settings.callback_max_bytes,
        import_max_bytes=settings.import_max_bytes,
    )
    # Outermost of ours (added last): counts the body limit's 413s too. Probes and scrapes are not counted.
    metrics = shoal_metrics.default()
    app.add_middleware(
        shoal_metrics.HttpMetricsMiddleware, metrics=metrics, skip_paths=("/healthz", "/readyz", "/metrics")
    )
    app.include_router(health.router)
    app.include_router(campaigns.router)
    app.include_router(funnel.router)
    app.include_router(executions.router)
    app.include_router(contacts.router)
    app.include_router(segments.router)
    app.include_router(templates.router)
    app.include_router(billing.router)
    app.include_router(webhooks.router)
    app.include_router(providers.router)
    app.include_router(dashboard.router)

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/docs")

    @app.get("/metrics", include_in_schema=False)
    def metrics_text() -> Response:
        # Unauthenticated, like the probes (Prometheus scrapes it); a plain def runs in the thread
        # pool, so the exposition is not rendered on the event loop.
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:
        return _openapi(app)

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to shape the schema
    return app
