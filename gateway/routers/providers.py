"""`POST /v1/providers/{provider}/events`: signed delivery and engagement receipts from carriers.

The signature (`X-<Provider>-Signature: sha256=<hex HMAC-SHA256 of the raw body>`, the sandbox's
`X-Sandbox-Signature`) is checked in constant time over the raw bytes before anything parses
them; a bad one is 401. The body is the receipt batch the sandbox carrier sends:
`{"receipts": [{provider_message_id, idempotency_key, workspace_id, channel, status, time, error?}]}`.

Each receipt becomes one `MessageReceipt` on `shoal.events.message.<status>`, with
`Nats-Msg-Id` = provider, provider message id and status, so a callback the carrier retries (or
an attacker replays) is stored once. The idempotency key a provider echoes is our send key
(`execution_id:node_id`). The contact, campaign and run come from the `client_reference` the
provider was given at send time and echoes (`o1:<contact_id>:<campaign_id>:<run_id>`, written by
`services.execution.providers.base.client_reference`): the signature covers it, so it is trusted
as is and a receipt costs no call. A receipt without one (sent before references existed, or from
a carrier that echoes nothing) falls back to looking up the execution its send key names, once
per execution, with a bounded number of calls in flight and a small cache (a message yields up to
three receipts, usually in separate callbacks).

202 once every receipt is stored on the stream. A backend outage is 503, so the carrier retries.

Tracing: a callback is its own trace (carriers send no trace context). Each receipt gets a
`shoal.receipt` span carrying the execution id, send key, node, contact, campaign and run, so a
search by `shoal.execution.id` in Jaeger finds an execution's receipts next to its run's trace.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections import OrderedDict
from datetime import datetime
from typing import Annotated, Literal, NamedTuple, NotRequired

import grpc
import nats.errors
from fastapi import APIRouter, Depends, Path, Request
from google.protobuf import timestamp_pb2
from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    with_config,
)

# pydantic takes typing's TypedDict from Python 3.12 on only.
from typing_extensions import TypedDict

from gateway.backends import Backends, get_backends
from gateway.config import PROVIDER_RE, GatewaySettings
from gateway.errors import ApiError, ErrorBody, ErrorDetail, field_path
from shoal.bus import Outgoing, PublishError, event_subject
from shoal.telemetry import ATTR_CAMPAIGN_ID, ATTR_CONTACT_ID, ATTR_EXECUTION_ID, ATTR_NODE_ID, ATTR_RUN_ID
from shoal.v1 import common_pb2, events_pb2, execution_pb2

log = logging.getLogger(__name__)
tracer = trace.get_tracer("gateway.receipts")

router = APIRouter(prefix="/v1/providers", tags=["providers"])

_STATUS = {
    "delivered": events_pb2.RECEIPT_STATUS_DELIVERED,
    "failed": events_pb2.RECEIPT_STATUS_FAILED,
    "opened": events_pb2.RECEIPT_STATUS_OPENED,
    "clicked": events_pb2.RECEIPT_STATUS_CLICKED,
    "bounced": events_pb2.RECEIPT_STATUS_BOUNCED,
}
_CHANNEL = {"EMAIL": common_pb2.CHANNEL_EMAIL, "RCS": common_pb2.CHANNEL_RCS, "SMS": common_pb2.CHANNEL_SMS}
_CACHE_SIZE = 100_000
# The client reference format (see the module docstring); parts never hold the separator.
_REFERENCE_PREFIX = "o1"
# Ours are at most 512 characters; a longer echo (another carrier's data, the longest any of
# them keeps) is accepted and ignored rather than failing the whole batch.
_REFERENCE_MAX_LENGTH = 4000

Token = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$")]


# TypedDicts rather than models: a callback holds hundreds of receipts, and validating the raw
# body straight into dicts (one TypeAdapter, built once) costs half of building a model per
# receipt. The body schema is not documented from these (the route reads the raw body for its
# signature), so the OpenAPI document does not change with them.
@with_config(ConfigDict(extra="ignore"))
class ReceiptIn(TypedDict):
    provider_message_id: Token
    idempotency_key: Token
    workspace_id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    channel: Literal["EMAIL", "RCS", "SMS"]
    status: Literal["delivered", "failed", "opened", "clicked", "bounced"]
    time: datetime
    error: NotRequired[Annotated[str, StringConstraints(max_length=500)] | None]
    # Echoed as given at send time; one the gateway cannot read only means a lookup.
    client_reference: NotRequired[Annotated[str, StringConstraints(max_length=_REFERENCE_MAX_LENGTH)] | None]


@with_config(ConfigDict(extra="ignore"))
class ReceiptBatch(TypedDict):
    receipts: Annotated[list[ReceiptIn], Field(max_length=100_000)]


_BATCH = TypeAdapter(ReceiptBatch)


class ReceiptsAccepted(BaseModel):
    accepted: int = Field(ge=0, description="Receipts stored on the event stream")


class Origin(NamedTuple):
    """Where a receipt's message came from: its contact, campaign and run."""

    contact_id: str
    campaign_id: str
    run_id: str


def origin_from_reference(reference: str | None) -> Origin | None:
    """The origin a client reference carries, or None when there is none or it is not ours."""
    if not reference:
        return None
    parts = reference.split(":")
    if len(parts) != 4 or parts[0] != _REFERENCE_PREFIX or not all(parts[1:]):
        return None
    return Origin(parts[1], parts[2], parts[3])


class ReceiptIngest:
    """Turns verified receipt batches into `MessageReceipt` events."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self._origins: OrderedDict[tuple[str, str], Origin | None] = OrderedDict()
        self._slots = asyncio.Semaphore(settings.callback_lookup_concurrency)

    async def origin(self, backends: Backends, workspace_id: str, execution_id: str) -> Origin | None:
        key = (workspace_id, execution_id)
        if key in self._origins:
            self._origins.move_to_end(key)
            return self._origins[key]
        async with self._slots:
            try:
                reply = await backends.executions.GetExecution(
                    execution_pb2.GetExecutionRequest(workspace_id=workspace_id, execution_id=execution_id)
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                    raise
                # Not one of ours (or not any more): the event is still published, without a contact.
                found = None
            else:
                e = reply.execution
                found = Origin(contact_id=e.contact_id, campaign_id=e.campaign_id, run_id=e.run_id)
        self._origins[key] = found
        while len(self._origins) > _CACHE_SIZE:
            self._origins.popitem(last=False)
        return found

    async def events(
        self, backends: Backends, provider: str, receipts: list[ReceiptIn]
    ) -> list[events_pb2.MessageReceipt]:
        carried = [origin_from_reference(r.get("client_reference")) for r in receipts]
        # Only receipts without a usable reference cost a lookup (of their execution).
        executions = {
            (r["workspace_id"], r["idempotency_key"].rpartition(":")[0])
            for r, origin in zip(receipts, carried, strict=True)
            if origin is None
        }
        pairs = sorted((ws, ex) for ws, ex in executions if ex)
        found = await asyncio.gather(*(self.origin(backends, ws, ex) for ws, ex in pairs))
        origins = dict(zip(pairs, found, strict=True))
        out = []
        # A carrier stamps a batch's receipts alike; FromDatetime is a quarter of this loop.
        stamps: dict[datetime, timestamp_pb2.Timestamp] = {}
        for r, reference in zip(receipts, carried, strict=True):
            execution_id, _, node_id = r["idempotency_key"].rpartition(":")
            origin = reference or origins.get((r["workspace_id"], execution_id))
            stamped = r["time"]
            when = stamps.get(stamped)
            if when is None:
                when = stamps[stamped] = timestamp_pb2.Timestamp()
                when.FromDatetime(stamped)
            out.append(
                events_pb2.MessageReceipt(
                    workspace_id=r["workspace_id"],
                    provider=provider,
                    send_key=r["idempotency_key"],
                    provider_message_id=r["provider_message_id"],
                    status=_STATUS[r["status"]],
                    contact_id=origin.contact_id if origin else "",
                    campaign_id=origin.campaign_id if origin else "",
                    run_id=origin.run_id if origin else "",
                    node_id=node_id if execution_id else "",
                    channel=_CHANNEL[r["channel"]],
                    error=r.get("error") or "",
                    time=when,
                )
            )
        return out


def receipt_spans(provider: str, events: list[events_pb2.MessageReceipt]) -> list[Span]:
    """One `shoal.receipt` span per receipt, children of the request's span (none when unsampled)."""
    if not trace.get_current_span().is_recording():
        return []
    spans = []
    for e in events:
        attributes = {
            "shoal.provider": provider,
            "shoal.send.key": e.send_key,
            "shoal.receipt.status": events_pb2.ReceiptStatus.Name(e.status)
            .removeprefix("RECEIPT_STATUS_")
            .lower(),
            "shoal.provider.message_id": e.provider_message_id,
        }
        execution_id = e.send_key.rpartition(":")[0]
        for name, value in (
            (ATTR_EXECUTION_ID, execution_id),
            (ATTR_NODE_ID, e.node_id),
            (ATTR_CONTACT_ID, e.contact_id),
            (ATTR_CAMPAIGN_ID, e.campaign_id),
            (ATTR_RUN_ID, e.run_id),
        ):
            if value:
                attributes[name] = value
        spans.append(tracer.start_span("shoal.receipt", attributes=attributes))
    return spans


# Both dependencies are coroutines on purpose: FastAPI runs a plain `def` dependency in its thread
# pool, a thread hop (and GIL hand-off) per callback for what is an attribute read.
async def get_ingest(request: Request) -> ReceiptIngest:
    ingest: ReceiptIngest = request.app.state.receipts
    return ingest


def signature_header(provider: str) -> str:
    return f"X-{provider.replace('_', '-').title()}-Signature"


def signature_ok(body: bytes, header: str | None, secret: bytes) -> bool:
    """`sha256=<hex>` against the HMAC-SHA256 of the raw body, compared in constant time."""
    if not header or not header.startswith("sha256="):
        return False
    expected = hmac.new(secret, body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), header.removeprefix("sha256=").strip().encode())


def _parse(body: bytes, settings: GatewaySettings) -> list[ReceiptIn]:
    try:
        receipts = _BATCH.validate_json(body)["receipts"]
    except ValidationError as exc:
        details = [
            ErrorDetail(field=field_path(e.get("loc", ())), message=str(e.get("msg", "")))
            for e in exc.errors()[:20]
        ]
        raise ApiError(400, "validation_failed", "not a receipt batch", details=details) from None
    if len(receipts) > settings.callback_max_receipts:
        raise ApiError(
            400,
            "validation_failed",
            f"at most {settings.callback_max_receipts} receipts per callback",
            details=[ErrorDetail(field="receipts", message="too many receipts")],
        )
    return receipts


@router.post(
    "/{provider}/events",
    status_code=202,
    summary="Receipts from a channel provider (signed callback)",
    description=(
        "Authenticated by `X-<Provider>-Signature: sha256=<hex HMAC-SHA256 of the raw body>` "
        "(the sandbox carrier's `X-Sandbox-Signature`), not by an API key. Each receipt is "
        "published once on the event stream."
    ),
    response_model=ReceiptsAccepted,
    responses={
        400: {"model": ErrorBody, "description": "Signed, but not a receipt batch"},
        401: {"model": ErrorBody, "description": "Missing or wrong signature"},
        404: {"model": ErrorBody, "description": "No callbacks configured for this provider"},
        413: {"model": ErrorBody, "description": "Body too large"},
        503: {"model": ErrorBody, "description": "NATS or the execution service is unavailable; retry"},
    },
)
async def provider_events(
    provider: Annotated[str, Path(pattern=PROVIDER_RE.pattern, description="Provider name, e.g. `sandbox`")],
    request: Request,
    backends: Annotated[Backends, Depends(get_backends)],
    ingest: Annotated[ReceiptIngest, Depends(get_ingest)],
) -> ReceiptsAccepted:
    settings = ingest.settings
    secret = settings.callback_secret(provider)
    if secret is None:
        raise ApiError(404, "not_found", f"no callbacks are configured for provider {provider}")
    # The size cap (413) is `gateway.body_limit`'s, applied while the body streams in.
    body = await request.body()
    # Before any parsing: an unsigned body is not even looked at.
    if not signature_ok(body, request.headers.get(signature_header(provider)), secret):
        log.warning("rejected a %s callback with a bad signature", provider)
        raise ApiError(401, "bad_signature", f"missing or wrong {signature_header(provider)}")
    receipts = _parse(body, settings)
    if not receipts:
        return ReceiptsAccepted(accepted=0)
    try:
        events = await ingest.events(backends, provider, receipts)
    except grpc.aio.AioRpcError as exc:
        log.warning("receipt lookup failed: %s", exc.code().name)
        raise ApiError(503, "unavailable", "a backend service is unavailable; retry later") from None
    subjects = {status: event_subject("message", status) for status in {r["status"] for r in receipts}}
    items = [
        Outgoing(
            subject=subjects[r["status"]],
            message=event,
            msg_id=f"{provider}:{r['provider_message_id']}:{r['status']}",
        )
        for r, event in zip(receipts, events, strict=True)
    ]
    spans = receipt_spans(provider, events)
    try:
        bus = await asyncio.wait_for(backends.bus(), timeout=settings.bus_connect_timeout_seconds)
        await bus.publish_many(items, timeout=10.0)
    except (TimeoutError, PublishError, nats.errors.Error, OSError) as exc:
        log.warning("publishing %d receipts failed: %r", len(items), type(exc).__name__)
        for span in spans:
            span.set_status(Status(StatusCode.ERROR, "not stored"))
        raise ApiError(503, "unavailable", "the event bus is unavailable; retry later") from None
    finally:
        for span in spans:
            span.end()
    return ReceiptsAccepted(accepted=len(items))
