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
from collections import deque
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
# Compact JSON without building an encoder per call (json.dumps does, given any option).
_dumps = json.JSONEncoder(separators=(",", ":")).encode


# Not frozen, for the same reason as carrier.Message: up to three per accepted message.
@dataclass(slots=True)
class Receipt:
    provider_message_id: str
    idempotency_key: str
    workspace_id: str
    channel: str
    status: ReceiptStatus
    time: datetime
    error: str | None = None
    # The sender's reference, echoed as given at send time (absent when it gave none).
    client_reference: str | None = None

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
        if self.client_reference is not None:
            entry["client_reference"] = self.client_reference
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
    now: datetime | None = None,
) -> list[Receipt]:
    """The receipts one accepted message will produce, in the order they happen.

    An RCS message to a device without RCS is accepted (the carrier cannot know up front) and then
    fails, which is what a SEND node's fallback exists for. SMS has no open tracking, so a click
    (tracked link) is rolled on delivery; for EMAIL and RCS a click follows an open. `now` is
    the receipts' time (one clock read per batch instead of one per message).
    """
    when = now or datetime.now(UTC)

    def receipt(status: ReceiptStatus, error: str | None = None) -> Receipt:
        return Receipt(
            provider_message_id,
            message.idempotency_key,
            message.workspace_id,
            message.channel.value,
            status,
            when,
            error,
            message.client_reference,
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
    """Batches queued receipts and POSTs them, retrying a few times before dropping a batch.

    The queue is a deque with an event rather than an asyncio.Queue: a send batch queues its
    receipts in one `extend`, and the sender takes a callback's worth at once, instead of paying
    a queue operation (and its bookkeeping) per receipt on both sides.
    """

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
        self._queue_max = queue_max
        self._queue: deque[Receipt] = deque()
        self._queued = asyncio.Event()  # set by every enqueue that added something
        self._idle = asyncio.Event()  # set while nothing is queued or being delivered
        self._idle.set()
        self._client = httpx.AsyncClient(timeout=timeout)
        self._task: asyncio.Task[None] | None = None
        self.sent = 0
        self.dropped = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sandbox-receipts")

    def enqueue(self, receipts: Iterable[Receipt]) -> None:
        """Queue receipts without ever waiting; what does not fit is dropped and logged."""
        incoming = list(receipts)
        room = self._queue_max - len(self._queue)
        if len(incoming) > room:
            overflow = len(incoming) - max(room, 0)
            incoming = incoming[: max(room, 0)]
            self.dropped += overflow
            log.warning("receipt queue full, dropped %d receipts", overflow)
        if incoming:
            self._queue.extend(incoming)
            self._idle.clear()
            self._queued.set()

    async def stop(self, grace: float) -> None:
        """Give queued receipts up to `grace` seconds to go out, then stop."""
        if self._task is not None:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout=grace)
            except TimeoutError:
                log.warning("stopping with %d receipts still queued", len(self._queue))
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._client.aclose()

    async def _next_batch(self) -> list[Receipt]:
        """Up to `batch_size` receipts: waits for the first, then at most `flush_interval` for
        the batch to fill."""
        loop = asyncio.get_running_loop()
        while not self._queue:
            self._queued.clear()
            await self._queued.wait()
        deadline = loop.time() + self._flush_interval
        while len(self._queue) < self._batch_size:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._queued.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queued.wait(), timeout=remaining)
        take = min(len(self._queue), self._batch_size)
        return [self._queue.popleft() for _ in range(take)]

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
                if not self._queue:
                    self._idle.set()

    async def _deliver(self, batch: list[Receipt]) -> None:
        body = _dumps({"receipts": [r.to_json() for r in batch]}).encode()
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
