"""Delivery and engagement receipts, POSTed in signed batches to the configured callback URL.

Accepting a message only puts its receipts on a bounded in-memory queue; one background task
drains the queue in batches. A slow or dead callback therefore never slows sends down: when the
queue is full, receipts are dropped with a log line, like a carrier that gives up on a webhook.
Receipts are not durable; a restart loses the ones still queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import httpx
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from services.sandbox.carrier import Channel, Dice, Message

log = logging.getLogger(__name__)

PROVIDER = "sandbox"
SIGNATURE_HEADER = "X-Sandbox-Signature"
ReceiptStatus = Literal["delivered", "failed", "opened", "clicked"]


@dataclass(frozen=True, slots=True)
class Receipt:
    provider_message_id: str
    idempotency_key: str
    workspace_id: str
    channel: str
    status: ReceiptStatus
    time: datetime
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "provider": PROVIDER,
            "provider_message_id": self.provider_message_id,
            "idempotency_key": self.idempotency_key,
            "workspace_id": self.workspace_id,
            "channel": self.channel,
            "status": self.status,
            "time": self.time.isoformat(),
        }
        if self.error is not None:
            entry["error"] = self.error
        return entry


def sign(body: bytes, secret: bytes) -> str:
    """The signature header value: `sha256=` and the hex HMAC-SHA256 of the raw body."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def plan(
    message: Message,
    provider_message_id: str,
    *,
    rcs_reachable: bool,
    open_rate: float,
    click_rate: float,
    dice: Dice,
) -> list[Receipt]:
    """The receipts one accepted message will produce, in the order they happen.

    An RCS message to a device without RCS is accepted (the carrier cannot know up front) and then
    fails, which is what a SEND node's fallback exists for. SMS has no open tracking, so a click
    (tracked link) is rolled on delivery; for EMAIL and RCS a click follows an open.
    """
    now = datetime.now(UTC)

    def receipt(status: ReceiptStatus, error: str | None = None) -> Receipt:
        return Receipt(
            provider_message_id=provider_message_id,
            idempotency_key=message.idempotency_key,
            workspace_id=message.workspace_id,
            channel=message.channel.value,
            status=status,
            time=now,
            error=error,
        )

    if message.channel is Channel.RCS and not rcs_reachable:
        return [receipt("failed", "rcs_not_reachable")]
    receipts = [receipt("delivered")]
    if message.channel is Channel.SMS:
        if dice.roll(click_rate):
            receipts.append(receipt("clicked"))
    elif dice.roll(open_rate):
        receipts.append(receipt("opened"))
        if dice.roll(click_rate):
            receipts.append(receipt("clicked"))
    return receipts


class CallbackRejected(Exception):
    """The callback answered with a status that retrying will not change (4xx)."""


class CallbackFailed(Exception):
    """The callback answered with a status worth retrying (5xx, 408, 429)."""


class ReceiptSender:
    """Batches queued receipts and POSTs them, retrying a few times before dropping a batch."""

    def __init__(
        self,
        *,
        url: str,
        secret: bytes,
        batch_size: int,
        flush_interval: float,
        queue_max: int,
        attempts: int,
        timeout: float = 5.0,
    ) -> None:
        self.url = url
        self._secret = secret
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._attempts = attempts
        self._queue: asyncio.Queue[Receipt] = asyncio.Queue(maxsize=queue_max)
        self._client = httpx.AsyncClient(timeout=timeout)
        self._task: asyncio.Task[None] | None = None
        self.sent = 0
        self.dropped = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sandbox-receipts")

    def enqueue(self, receipts: Iterable[Receipt]) -> None:
        """Queue receipts without ever waiting; what does not fit is dropped and logged."""
        overflow = 0
        for receipt in receipts:
            try:
                self._queue.put_nowait(receipt)
            except asyncio.QueueFull:
                overflow += 1
        if overflow:
            self.dropped += overflow
            log.warning("receipt queue full, dropped %d receipts", overflow)

    async def stop(self, grace: float) -> None:
        """Give queued receipts up to `grace` seconds to go out, then stop."""
        if self._task is not None:
            try:
                await asyncio.wait_for(self._queue.join(), timeout=grace)
            except TimeoutError:
                log.warning("stopping with %d receipts still queued", self._queue.qsize())
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._client.aclose()

    async def _next_batch(self) -> list[Receipt]:
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self._flush_interval
        while len(batch) < self._batch_size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), timeout=remaining))
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            try:
                await self._deliver(batch)
                self.sent += len(batch)
            except (httpx.HTTPError, CallbackFailed, CallbackRejected) as exc:
                self.dropped += len(batch)
                log.warning("dropped %d receipts for %s: %s", len(batch), self.url, exc)
            except Exception:
                # A bug here must not end the task: later receipts would silently stop flowing.
                self.dropped += len(batch)
                log.exception("dropped %d receipts for %s", len(batch), self.url)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _deliver(self, batch: list[Receipt]) -> None:
        body = json.dumps({"receipts": [r.to_json() for r in batch]}, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(body, self._secret)}
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(self._attempts),
            wait=wait_exponential(multiplier=0.2, max=5.0),
            retry=retry_if_exception_type((httpx.TransportError, CallbackFailed)),
            reraise=True,
        ):
            with attempt:
                response = await self._client.post(self.url, content=body, headers=headers)
                status = response.status_code
                if status >= 500 or status in (408, 429):
                    raise CallbackFailed(f"HTTP {status}")
                if status >= 400:
                    raise CallbackRejected(f"HTTP {status}")
