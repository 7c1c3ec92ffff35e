"""The sandbox carrier's HTTP JSON API: send batches, capability lookups, the log, control switches.

Batch endpoints build their JSON by hand and return it as is: at thousands of items per second,
FastAPI's response-model validation would cost more than the work itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import FastAPI, Query
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from services.sandbox.carrier import (
    Channel,
    Dice,
    InvalidItem,
    Message,
    Switches,
    item_key,
    rcs_capable,
    validate_item,
)
from services.sandbox.config import SandboxSettings
from services.sandbox.receipts import Receipt, ReceiptSender, plan
from services.sandbox.store import MessageFilter, MessageLog
from shoal import metrics as shoal_metrics

log = logging.getLogger(__name__)

MAX_PAGE = 1000


class SendBatch(BaseModel):
    # Items stay raw here: one bad item must fail alone, not turn the whole batch into a 422.
    messages: list[Any]


class CapabilityBatch(BaseModel):
    addresses: list[str] = Field(max_length=100_000)


class MessageQuery(BaseModel):
    """Which logged messages to read; every given field narrows the selection."""

    model_config = ConfigDict(extra="forbid")

    key: str | None = None
    to: str | None = None
    workspace_id: str | None = None
    channel: str | None = None

    def selection(self) -> MessageFilter:
        return MessageFilter(key=self.key, to=self.to, workspace_id=self.workspace_id, channel=self.channel)


class MessagePage(MessageQuery):
    after: int = Field(default=0, ge=0, description="Cursor: the `seq` of the last message already read")
    limit: int = Field(default=100, ge=1, le=MAX_PAGE)


class ControlUpdate(BaseModel):
    """A partial update of the behaviour switches; unknown names are refused, not ignored."""

    model_config = ConfigDict(extra="forbid")

    latency_ms: int | None = Field(default=None, ge=0, le=60_000)
    failure_rate: float | None = Field(default=None, ge=0.0, le=1.0)
    outage: bool | None = None
    refuse_credentials: bool | None = None
    rcs_capable_rate: float | None = Field(default=None, ge=0.0, le=1.0)
    open_rate: float | None = Field(default=None, ge=0.0, le=1.0)
    click_rate: float | None = Field(default=None, ge=0.0, le=1.0)


class Sandbox:
    """Everything one sandbox process holds: the log, the switches, the dice and the receipt sender."""

    def __init__(self, settings: SandboxSettings) -> None:
        self.settings = settings
        self.switches = Switches.from_settings(settings)
        self.log = MessageLog(settings.resolved_database_path())
        self.failure_dice = Dice(settings.failure_seed)
        # Separate dice, so changing open/click rates does not shift which items fail.
        self.engagement_dice = Dice(None if settings.failure_seed is None else settings.failure_seed + 1)
        self.receipts: ReceiptSender | None = None
        if settings.callback_url and settings.receipts_enabled:
            self.receipts = ReceiptSender(
                url=settings.callback_url,
                secret=settings.callback_secret.get_secret_value().encode(),
                batch_size=settings.receipt_batch_size,
                flush_interval=settings.receipt_flush_ms / 1000,
                queue_max=settings.receipt_queue_max,
                attempts=settings.receipt_attempts,
            )

    async def start(self) -> None:
        await self.log.open()
        if self.receipts is not None:
            self.receipts.start()
        log.info(
            "sandbox ready: database %s, receipts to %s",
            self.log.path,
            self.receipts.url if self.receipts else "nowhere",
        )

    async def stop(self) -> None:
        if self.receipts is not None:
            await self.receipts.stop(self.settings.shutdown_grace_seconds)
        await self.log.close()

    async def simulate_latency(self) -> None:
        if self.switches.latency_ms:
            await asyncio.sleep(self.switches.latency_ms / 1000)

    async def send(self, items: list[Any]) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = [{} for _ in items]
        admitted: list[tuple[int, Message]] = []
        failure_rate = self.switches.failure_rate
        for i, raw in enumerate(items):
            try:
                message = validate_item(raw)
            except InvalidItem as exc:
                results[i] = failed(item_key(raw), str(exc), retryable=False)
                continue
            if self.failure_dice.roll(failure_rate):
                results[i] = failed(message.idempotency_key, "carrier rejected the message, try again", True)
                continue
            admitted.append((i, message))
        admissions = await self.log.admit([message for _, message in admitted])
        new: list[Receipt] = []
        # The switches are read once per batch: a batch is one call, as it would be at a carrier.
        rcs_rate, open_rate, click_rate = (
            self.switches.rcs_capable_rate,
            self.switches.open_rate,
            self.switches.click_rate,
        )
        now = datetime.now(UTC)
        for (i, message), admission in zip(admitted, admissions, strict=True):
            results[i] = {
                "idempotency_key": admission.idempotency_key,
                "status": "duplicate" if admission.duplicate else "accepted",
                "provider_message_id": admission.provider_message_id,
                "retryable": False,
            }
            if self.receipts is not None and not admission.duplicate:
                new += plan(
                    message,
                    admission.provider_message_id,
                    rcs_reachable=message.channel is not Channel.RCS or rcs_capable(message.to, rcs_rate),
                    open_rate=open_rate,
                    click_rate=click_rate,
                    dice=self.engagement_dice,
                    now=now,
                )
        if self.receipts is not None and new:
            self.receipts.enqueue(new)
        return results


def failed(key: str, error: str, retryable: bool) -> dict[str, Any]:
    return {"idempotency_key": key, "status": "failed", "error": error, "retryable": retryable}


def outage_response() -> JSONResponse:
    return JSONResponse(
        {"error": "carrier unavailable (sandbox outage switch)"},
        status_code=503,
        headers={"Retry-After": "1"},
    )


def create_app(settings: SandboxSettings) -> FastAPI:
    sandbox = Sandbox(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await sandbox.start()
        try:
            yield
        finally:
            await sandbox.stop()

    app = FastAPI(title="Shoal sandbox carrier", version="1", lifespan=lifespan)
    app.state.sandbox = sandbox
    metrics = shoal_metrics.default()
    app.add_middleware(
        shoal_metrics.HttpMetricsMiddleware, metrics=metrics, skip_paths=("/healthz", "/metrics")
    )

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    def metrics_text() -> Response:
        # A plain def: rendered in the thread pool, not on the event loop.
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/messages:batch")
    async def send_batch(batch: SendBatch) -> JSONResponse:
        await sandbox.simulate_latency()
        if sandbox.switches.outage:
            return outage_response()
        if sandbox.switches.refuse_credentials:
            return JSONResponse({"error": "invalid credentials (sandbox switch)"}, status_code=401)
        if len(batch.messages) > settings.max_batch_size:
            return JSONResponse(
                {"error": f"messages: at most {settings.max_batch_size} per batch"}, status_code=413
            )
        return JSONResponse({"results": await sandbox.send(batch.messages)})

    @app.post("/v1/capabilities:batch")
    async def capabilities(batch: CapabilityBatch) -> JSONResponse:
        await sandbox.simulate_latency()
        if sandbox.switches.outage:
            return outage_response()
        rate = sandbox.switches.rcs_capable_rate
        return JSONResponse(
            {"results": [{"address": a, "rcs_capable": rcs_capable(a, rate)} for a in batch.addresses]}
        )

    @app.get("/v1/messages")
    async def list_messages(query: Annotated[MessagePage, Query()]) -> JSONResponse:
        found = await sandbox.log.find(query.selection(), after=query.after, limit=query.limit)
        next_after = found[-1].seq if len(found) == query.limit else None
        return JSONResponse({"messages": [m.to_json() for m in found], "next_after": next_after})

    @app.get("/v1/messages/count")
    async def count_messages(query: Annotated[MessageQuery, Query()]) -> dict[str, int]:
        return {"count": await sandbox.log.count(query.selection())}

    @app.get("/v1/control")
    async def get_control() -> Switches:
        return sandbox.switches

    @app.put("/v1/control")
    async def put_control(update: ControlUpdate) -> Switches:
        for name, value in update.model_dump(exclude_none=True).items():
            setattr(sandbox.switches, name, value)
        log.info("control switches now %s", sandbox.switches)
        return sandbox.switches

    return app
