"""`/v1/webhooks`: outgoing webhook endpoints, their deliveries, tests and replays.

The delivery machinery (catalogue, envelope, signature, schedule, leases) is `gateway.webhooks`;
this module is the REST face of its tables. Endpoints and deliveries live in the gateway's own
database, so these routes call no backend service. The signing secret is returned by create and
rotate-secret only; it is stored (signing needs it) but never shown again.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import re
from datetime import UTC, datetime
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue, field_validator

from gateway.auth import require
from gateway.errors import ApiError, ErrorBody, ErrorDetail, RateLimitedBody
from gateway.keys import Principal, Scope
from gateway.webhooks import Dispatcher, store
from gateway.webhooks.catalogue import ALL, EVENTS, TEST_EVENT
from gateway.webhooks.dispatcher import DELIVERY_HEADER, EVENT_HEADER, SIGNATURE_HEADER

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])

LIST_LIMIT_DEFAULT = 50
LIST_LIMIT_MAX = 500
MAX_EVENTS = 50
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
_ID = r"[0-9A-HJKMNP-TV-Z]{20}"
_ENDPOINT_RE = re.compile(rf"^wh_{_ID}$")
_DELIVERY_RE = re.compile(rf"^whd_{_ID}$")

_COMMON: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Malformed request; `details` name each field"},
    401: {"model": ErrorBody, "description": "No API key, or not a valid one"},
    403: {"model": ErrorBody, "description": "The key lacks the scope (`webhooks:read` or `webhooks:write`)"},
    429: {
        "model": RateLimitedBody,
        "description": "The key's rate limit is spent; see `Retry-After`",
        "headers": {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}},
    },
}
_ENDPOINT_404: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "No such webhook endpoint in this workspace"}
}
_DELIVERY_404: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "No such endpoint, or no such delivery of it, in this workspace"}
}
_DISABLED_409: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorBody, "description": "The endpoint is disabled (`endpoint_disabled`)"}
}

SIGNING = (
    f"Each POST carries `{SIGNATURE_HEADER}: sha256=<hex HMAC-SHA256 of the raw body>` keyed with the "
    f"endpoint's secret (the whole `whsec_...` string), `{EVENT_HEADER}` and `{DELIVERY_HEADER}`. "
    "Verify the signature over the raw bytes, before parsing, in constant time."
)


# -- models ------------------------------------------------------------------------------------------------


def _known_event(name: str) -> str:
    if name != ALL and name not in EVENTS:
        raise ValueError(f"unknown event {name!r}; see GET /v1/webhooks/event-types, or use '*'")
    return name


EventName = Annotated[str, Field(max_length=64), AfterValidator(_known_event)]
Url = Annotated[str, Field(min_length=1, max_length=2048, description="Where events are POSTed")]
Description = Annotated[str, Field(max_length=500, pattern=r"^[^\x00]*$")]

_EVENTS_DESCRIPTION = (
    'Event names to receive (see `GET /v1/webhooks/event-types`), or `["*"]` for all of them; '
    f"1 to {MAX_EVENTS}"
)


def _normalise_events(names: list[str]) -> list[str]:
    return [ALL] if ALL in names else list(dict.fromkeys(names))


class WebhookCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "url": "https://hooks.example.com/shoal",
                    "events": ["message.delivered", "campaign.paused", "campaign.completed"],
                    "description": "CRM sync",
                }
            ]
        },
    )

    url: Url
    events: list[EventName] = Field(min_length=1, max_length=MAX_EVENTS, description=_EVENTS_DESCRIPTION)
    description: Description = ""


class WebhookUpdate(BaseModel):
    """Only the fields given change; `null` is not a value for any of them."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"enabled": False}, {"events": ["*"]}]}
    )

    url: Url | None = None
    events: list[EventName] | None = Field(
        default=None, min_length=1, max_length=MAX_EVENTS, description=_EVENTS_DESCRIPTION
    )
    description: Description | None = None
    enabled: bool | None = Field(default=None, description="A disabled endpoint receives nothing")

    @field_validator("url", "events", "description", "enabled")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        # Runs only for fields the request gave: an explicit null.
        if value is None:
            raise ValueError("may be omitted, but not null")
        return value


_ENDPOINT_EXAMPLE: dict[str, JsonValue] = {
    "id": "wh_01JD3ZK4W8M2Q7R5T9V1XB",
    "url": "https://hooks.example.com/shoal",
    "description": "CRM sync",
    "events": ["message.delivered", "campaign.paused", "campaign.completed"],
    "enabled": True,
    "created_at": "2026-11-26T06:00:00Z",
    "updated_at": "2026-11-26T06:00:00Z",
}


class WebhookEndpoint(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [_ENDPOINT_EXAMPLE]})

    id: str = Field(description="Endpoint id (`wh_...`)")
    url: str
    description: str
    events: list[str] = Field(description='Subscribed event names, or `["*"]`')
    enabled: bool
    created_at: datetime
    updated_at: datetime


class WebhookEndpointWithSecret(WebhookEndpoint):
    """The endpoint and its signing secret: shown here once, never again."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{**_ENDPOINT_EXAMPLE, "secret": "whsec_q8V...k2"}]}
    )

    secret: str = Field(
        description=(
            "The HMAC key of `X-Shoal-Signature` (the whole string, UTF-8). Shown only in this "
            "answer: store it now; rotate it if lost"
        )
    )


class WebhookEndpointPage(BaseModel):
    items: list[WebhookEndpoint]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page")


class EventType(BaseModel):
    name: str
    description: str


class EventTypeList(BaseModel):
    items: list[EventType]


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


_DELIVERY_EXAMPLE: dict[str, JsonValue] = {
    "id": "whd_01JD3ZM0A1B2C3D4E5F6G7",
    "endpoint_id": "wh_01JD3ZK4W8M2Q7R5T9V1XB",
    "event_id": "evt_8J2K4M6P8R0T2V4X6Z8B",
    "event": "campaign.paused",
    "state": "pending",
    "attempts": 1,
    "replays": 0,
    "last_status_code": 500,
    "last_error": "HTTP 500: upstream unavailable",
    "last_attempt_at": "2026-11-26T06:00:00.120Z",
    "next_attempt_at": "2026-11-26T06:01:02Z",
    "delivered_at": None,
    "created_at": "2026-11-26T06:00:00.100Z",
}


class WebhookDelivery(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [_DELIVERY_EXAMPLE]})

    id: str = Field(description="Delivery id (`whd_...`), also sent as `X-Shoal-Delivery`")
    endpoint_id: str
    event_id: str = Field(description="The envelope's `id` (`evt_...`); the same on every attempt")
    event: str
    state: DeliveryState = Field(
        description="`pending` (an attempt is due at `next_attempt_at`), `delivered` (a 2xx came back) "
        "or `failed` (every attempt of the schedule failed; replayable)"
    )
    attempts: int = Field(ge=0, description="Attempts made, over every round")
    replays: int = Field(ge=0, description="How many times it was replayed")
    last_status_code: int | None = Field(
        description="HTTP status of the last attempt; null without an answer"
    )
    last_error: str | None = Field(description="Why the last attempt failed; null when it did not")
    last_attempt_at: datetime | None
    next_attempt_at: datetime | None = Field(description="When the next attempt is due; null unless pending")
    delivered_at: datetime | None
    created_at: datetime


class WebhookAttempt(BaseModel):
    number: int = Field(ge=1, description="1-based over the delivery's life")
    replay: int = Field(ge=0, description="0 for the original round, n for the n-th replay")
    started_at: datetime
    duration_ms: int = Field(ge=0)
    status_code: int | None = Field(description="HTTP status; null on a timeout or connection error")
    error: str | None
    succeeded: bool


class WebhookDeliveryDetail(WebhookDelivery):
    payload: dict[str, Any] = Field(description="The envelope POSTed: `{id, event, timestamp, data}`")
    attempt_log: list[WebhookAttempt] = Field(description="Every attempt, oldest first")


class WebhookDeliveryPage(BaseModel):
    items: list[WebhookDelivery]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page")


# -- mapping ----------------------------------------------------------------------------------------------


def to_endpoint(row: store.EndpointRow) -> WebhookEndpoint:
    return WebhookEndpoint(
        id=row.id,
        url=row.url,
        description=row.description,
        events=row.events,
        enabled=row.enabled,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def to_endpoint_with_secret(row: store.EndpointRow) -> WebhookEndpointWithSecret:
    return WebhookEndpointWithSecret(**to_endpoint(row).model_dump(), secret=row.secret)


def to_delivery(row: store.DeliveryRow) -> WebhookDelivery:
    return WebhookDelivery(
        id=row.id,
        endpoint_id=row.endpoint_id,
        event_id=row.event_id,
        event=row.event,
        state=DeliveryState(row.state),
        attempts=row.attempts,
        replays=row.replays,
        last_status_code=row.last_status_code,
        last_error=row.last_error or None,
        last_attempt_at=row.last_attempt_at,
        next_attempt_at=row.next_attempt_at,
        delivered_at=row.delivered_at,
        created_at=row.created_at,
    )


def to_attempt(row: store.AttemptRow) -> WebhookAttempt:
    return WebhookAttempt(
        number=row.number,
        replay=row.replay,
        started_at=row.started_at,
        duration_ms=row.duration_ms,
        status_code=row.status_code,
        error=row.error or None,
        succeeded=row.succeeded,
    )


# -- helpers ---------------------------------------------------------------------------------------------


async def get_dispatcher(request: Request) -> Dispatcher:
    dispatcher: Dispatcher = request.app.state.webhooks
    return dispatcher


def _now() -> datetime:
    return datetime.now(UTC)


def _invalid(field: str, message: str) -> ApiError:
    return ApiError(
        400, "validation_failed", f"{field}: {message}", details=[ErrorDetail(field=field, message=message)]
    )


def check_url(url: str, *, allow_http: bool) -> str:
    """https with a host; http only for localhost (or when SHOAL_GATEWAY_WEBHOOK_ALLOW_HTTP)."""
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise _invalid("url", "must not contain spaces or control characters")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise _invalid("url", f"is not a valid URL ({exc})") from None
    if parsed.scheme not in ("https", "http") or not parsed.host:
        raise _invalid("url", "must be an absolute https:// URL")
    if parsed.userinfo:
        raise _invalid("url", "must not carry credentials; authenticate the request by its signature")
    if parsed.scheme == "http" and not allow_http and parsed.host not in LOCAL_HOSTS:
        raise _invalid("url", "must use https (plain http is accepted for localhost only)")
    return url


def _encode_cursor(last_id: str) -> str:
    return base64.urlsafe_b64encode(last_id.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str | None, pattern: re.Pattern[str]) -> str | None:
    if cursor is None:
        return None
    try:
        value = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        value = ""
    if not pattern.match(value):
        raise _invalid("cursor", "is not a cursor this API returned")
    return value


async def _endpoint_or_404(
    dispatcher: Dispatcher, principal: Principal, endpoint_id: str
) -> store.EndpointRow:
    row = await dispatcher.db.run(
        store.get_endpoint, workspace_id=principal.workspace_id, endpoint_id=endpoint_id
    )
    if row is None:
        raise ApiError(404, "not_found", f"webhook endpoint {endpoint_id} not found")
    return row


def _disabled(endpoint_id: str) -> ApiError:
    return ApiError(
        409, "endpoint_disabled", f"webhook endpoint {endpoint_id} is disabled; enable it first (PATCH)"
    )


EndpointIdPath = Annotated[
    str, Path(pattern=_ENDPOINT_RE.pattern, description="Webhook endpoint id (`wh_...`)")
]
DeliveryIdPath = Annotated[str, Path(pattern=_DELIVERY_RE.pattern, description="Delivery id (`whd_...`)")]
Limit = Annotated[int, Query(ge=1, le=LIST_LIMIT_MAX, description=f"Items per page (1..{LIST_LIMIT_MAX})")]
Cursor = Annotated[
    str | None,
    Query(max_length=200, description="`next_cursor` of the previous page; omitted for the first page"),
]
Reader = Annotated[Principal, Depends(require(Scope.WEBHOOKS_READ))]
Writer = Annotated[Principal, Depends(require(Scope.WEBHOOKS_WRITE))]
Dispatch = Annotated[Dispatcher, Depends(get_dispatcher)]


# -- routes ----------------------------------------------------------------------------------------------


@router.get(
    "/event-types",
    summary="The event catalogue",
    description="Every event name an endpoint may subscribe to, with what it means. Needs `webhooks:read`.",
    response_model=EventTypeList,
    responses=_COMMON,
)
async def list_event_types(principal: Reader) -> EventTypeList:
    return EventTypeList(items=[EventType(name=n, description=d) for n, d in EVENTS.items()])


@router.post(
    "",
    status_code=201,
    summary="Create a webhook endpoint",
    description=(
        "Registers a URL for the named events of this workspace (events that happen from now on). "
        "The answer carries the signing `secret`, **shown this once**: it is kept server-side to "
        "sign deliveries and never returned again (rotate it if lost). URLs must be https (plain "
        f"http only for localhost). {SIGNING} Needs `webhooks:write`."
    ),
    response_model=WebhookEndpointWithSecret,
    responses={
        **_COMMON,
        422: {"model": ErrorBody, "description": "The workspace has its maximum of endpoints"},
    },
)
async def create_webhook(
    body: WebhookCreate, principal: Writer, dispatcher: Dispatch
) -> WebhookEndpointWithSecret:
    settings = dispatcher.settings
    url = check_url(body.url, allow_http=settings.webhook_allow_http)
    ws = principal.workspace_id
    if await dispatcher.db.run(store.count_endpoints, workspace_id=ws) >= settings.webhook_max_endpoints:
        raise ApiError(
            422,
            "limit_reached",
            f"a workspace has at most {settings.webhook_max_endpoints} webhook endpoints; delete one first",
        )
    row = await dispatcher.db.run(
        store.create_endpoint,
        workspace_id=ws,
        url=url,
        events=_normalise_events(body.events),
        description=body.description,
        now=_now(),
    )
    dispatcher.endpoints_changed()  # its events are wanted from now on, not after the cache expires
    return to_endpoint_with_secret(row)


@router.get(
    "",
    summary="List webhook endpoints",
    description=(
        "Oldest first, in pages (`limit`, `cursor`). Secrets are never listed. Needs `webhooks:read`."
    ),
    response_model=WebhookEndpointPage,
    responses=_COMMON,
)
async def list_webhooks(
    principal: Reader,
    dispatcher: Dispatch,
    limit: Limit = LIST_LIMIT_DEFAULT,
    cursor: Cursor = None,
) -> WebhookEndpointPage:
    after = _decode_cursor(cursor, _ENDPOINT_RE)
    rows = await dispatcher.db.run(
        store.list_endpoints, workspace_id=principal.workspace_id, after=after, limit=limit + 1
    )
    page = rows[:limit]
    more = len(rows) > limit
    return WebhookEndpointPage(
        items=[to_endpoint(r) for r in page], next_cursor=_encode_cursor(page[-1].id) if more else None
    )


@router.get(
    "/{endpoint_id}",
    summary="Get a webhook endpoint",
    description="The endpoint without its secret. Needs `webhooks:read`.",
    response_model=WebhookEndpoint,
    responses={**_COMMON, **_ENDPOINT_404},
)
async def get_webhook(
    endpoint_id: EndpointIdPath, principal: Reader, dispatcher: Dispatch
) -> WebhookEndpoint:
    return to_endpoint(await _endpoint_or_404(dispatcher, principal, endpoint_id))


@router.patch(
    "/{endpoint_id}",
    summary="Update a webhook endpoint",
    description=(
        "Partial: only the given fields change. `enabled: false` stops deliveries (pending ones "
        "wait and go once it is enabled again). Needs `webhooks:write`."
    ),
    response_model=WebhookEndpoint,
    responses={**_COMMON, **_ENDPOINT_404},
)
async def update_webhook(
    endpoint_id: EndpointIdPath, body: WebhookUpdate, principal: Writer, dispatcher: Dispatch
) -> WebhookEndpoint:
    values: dict[str, Any] = {}
    if body.url is not None:
        values["url"] = check_url(body.url, allow_http=dispatcher.settings.webhook_allow_http)
    if body.events is not None:
        values["events"] = _normalise_events(body.events)
    if body.description is not None:
        values["description"] = body.description
    if body.enabled is not None:
        values["enabled"] = body.enabled
    if not values:
        return to_endpoint(await _endpoint_or_404(dispatcher, principal, endpoint_id))
    row = await dispatcher.db.run(
        store.update_endpoint,
        workspace_id=principal.workspace_id,
        endpoint_id=endpoint_id,
        values=values,
        now=_now(),
    )
    if row is None:
        raise ApiError(404, "not_found", f"webhook endpoint {endpoint_id} not found")
    dispatcher.endpoints_changed()  # its events or its enabled flag may have changed
    if body.enabled:
        dispatcher.wake()  # deliveries that waited for it are due
    return to_endpoint(row)


@router.delete(
    "/{endpoint_id}",
    status_code=204,
    summary="Delete a webhook endpoint",
    description=(
        "Removes the endpoint with its deliveries; nothing more is sent to it. Needs `webhooks:write`."
    ),
    response_class=Response,
    responses={**_COMMON, **_ENDPOINT_404},
)
async def delete_webhook(endpoint_id: EndpointIdPath, principal: Writer, dispatcher: Dispatch) -> Response:
    deleted = await dispatcher.db.run(
        store.delete_endpoint, workspace_id=principal.workspace_id, endpoint_id=endpoint_id
    )
    if not deleted:
        raise ApiError(404, "not_found", f"webhook endpoint {endpoint_id} not found")
    dispatcher.endpoints_changed()
    return Response(status_code=204)


@router.post(
    "/{endpoint_id}/rotate-secret",
    summary="Rotate an endpoint's signing secret",
    description=(
        "Replaces the secret at once and returns the new one, **shown this once**; every attempt "
        "from now on (retries included) is signed with it. Needs `webhooks:write`."
    ),
    response_model=WebhookEndpointWithSecret,
    responses={**_COMMON, **_ENDPOINT_404},
)
async def rotate_secret(
    endpoint_id: EndpointIdPath, principal: Writer, dispatcher: Dispatch
) -> WebhookEndpointWithSecret:
    row = await dispatcher.db.run(
        store.update_endpoint,
        workspace_id=principal.workspace_id,
        endpoint_id=endpoint_id,
        values={"secret": store.new_secret()},
        now=_now(),
    )
    if row is None:
        raise ApiError(404, "not_found", f"webhook endpoint {endpoint_id} not found")
    return to_endpoint_with_secret(row)


@router.post(
    "/{endpoint_id}/test",
    status_code=202,
    summary="Send a test event",
    description=(
        f"Queues a `{TEST_EVENT}` event for this endpoint, due now, through the same delivery path "
        "(signature, retries, delivery log) as every event; answers the delivery to follow. "
        "Needs `webhooks:write`."
    ),
    response_model=WebhookDelivery,
    responses={**_COMMON, **_ENDPOINT_404, **_DISABLED_409},
)
async def send_test(endpoint_id: EndpointIdPath, principal: Writer, dispatcher: Dispatch) -> WebhookDelivery:
    endpoint = await _endpoint_or_404(dispatcher, principal, endpoint_id)
    if not endpoint.enabled:
        raise _disabled(endpoint_id)
    row = await dispatcher.db.run(store.enqueue_test, endpoint=endpoint, now=_now())
    dispatcher.wake()
    return to_delivery(row)


@router.get(
    "/{endpoint_id}/deliveries",
    summary="List an endpoint's deliveries",
    description=(
        "Newest first, in pages (`limit`, `cursor`), optionally only those in one `state`. Each "
        "says how many attempts were made, the last status code or error and when the next "
        "attempt is due. Needs `webhooks:read`."
    ),
    response_model=WebhookDeliveryPage,
    responses={**_COMMON, **_ENDPOINT_404},
)
async def list_deliveries(
    *,
    endpoint_id: EndpointIdPath,
    principal: Reader,
    dispatcher: Dispatch,
    state: Annotated[DeliveryState | None, Query(description="Only deliveries in this state")] = None,
    limit: Limit = LIST_LIMIT_DEFAULT,
    cursor: Cursor = None,
) -> WebhookDeliveryPage:
    before = _decode_cursor(cursor, _DELIVERY_RE)
    await _endpoint_or_404(dispatcher, principal, endpoint_id)
    rows = await dispatcher.db.run(
        store.list_deliveries,
        workspace_id=principal.workspace_id,
        endpoint_id=endpoint_id,
        state=state.value if state is not None else None,
        before=before,
        limit=limit + 1,
    )
    page = rows[:limit]
    more = len(rows) > limit
    return WebhookDeliveryPage(
        items=[to_delivery(r) for r in page], next_cursor=_encode_cursor(page[-1].id) if more else None
    )


@router.get(
    "/{endpoint_id}/deliveries/{delivery_id}",
    summary="Get a delivery with its attempts",
    description="The delivery, the envelope it POSTs and every attempt made. Needs `webhooks:read`.",
    response_model=WebhookDeliveryDetail,
    responses={**_COMMON, **_DELIVERY_404},
)
async def get_delivery(
    endpoint_id: EndpointIdPath, delivery_id: DeliveryIdPath, principal: Reader, dispatcher: Dispatch
) -> WebhookDeliveryDetail:
    found = await dispatcher.db.run(
        store.get_delivery,
        workspace_id=principal.workspace_id,
        endpoint_id=endpoint_id,
        delivery_id=delivery_id,
    )
    if found is None:
        raise ApiError(
            404, "not_found", f"delivery {delivery_id} of webhook endpoint {endpoint_id} not found"
        )
    row, attempts = found
    return WebhookDeliveryDetail(
        **to_delivery(row).model_dump(),
        payload=json.loads(row.body),
        attempt_log=[to_attempt(a) for a in attempts],
    )


@router.post(
    "/{endpoint_id}/deliveries/{delivery_id}/replay",
    status_code=202,
    summary="Replay a delivery",
    description=(
        "A failed or delivered delivery gets a fresh round of attempts (the whole retry schedule), "
        "the first due now, with the same envelope and event id. 409 while it is still pending. "
        "Needs `webhooks:write`."
    ),
    response_model=WebhookDelivery,
    responses={
        **_COMMON,
        **_DELIVERY_404,
        409: {
            "model": ErrorBody,
            "description": "Still pending (`wrong_state`), or the endpoint is disabled (`endpoint_disabled`)",
        },
    },
)
async def replay_delivery(
    endpoint_id: EndpointIdPath, delivery_id: DeliveryIdPath, principal: Writer, dispatcher: Dispatch
) -> WebhookDelivery:
    endpoint = await _endpoint_or_404(dispatcher, principal, endpoint_id)
    if not endpoint.enabled:
        raise _disabled(endpoint_id)
    try:
        row = await dispatcher.db.run(
            store.replay,
            workspace_id=principal.workspace_id,
            endpoint_id=endpoint_id,
            delivery_id=delivery_id,
            now=_now(),
        )
    except store.WrongState as exc:
        raise ApiError(409, "wrong_state", str(exc)) from None
    if row is None:
        raise ApiError(
            404, "not_found", f"delivery {delivery_id} of webhook endpoint {endpoint_id} not found"
        )
    dispatcher.wake()
    return to_delivery(row)
