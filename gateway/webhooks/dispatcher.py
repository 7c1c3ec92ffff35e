"""The webhook dispatcher of one gateway process: bus events in, signed POSTs out.

Two loops, started and stopped by the app's lifespan:

- **events** (only when `settings.webhook_consume`): waits until NATS answers (retrying in the
  background, so the REST API starts without it), then reads the durable pull consumer
  `gateway-webhooks` on EVENTS. Each fetched batch becomes pending deliveries in one transaction
  (`store.enqueue`); the consume loop acks the batch only after that commit, and a redelivered
  message finds its rows already there (unique per endpoint and event id). Which workspaces
  subscribe to which events is cached for `SUBSCRIPTIONS_TTL` seconds (dropped at once when this
  process changes an endpoint): a batch no enabled endpoint wants is acked without decoding its
  messages or opening a transaction, which is every batch of a deployment without webhooks.
- **delivery**: claims due deliveries with a lease (`store.claim`), at most
  `webhook_max_concurrency` in flight, POSTs each with a whole-request timeout, and records the
  attempt and the next state (`store.record`). It polls every `webhook_poll_interval_seconds`
  and is woken at once when this process enqueues something; it also prunes old finished
  deliveries. It needs only the database, so tests and replays are sent while NATS is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import httpx
from google.protobuf import empty_pb2
from google.protobuf.message import DecodeError
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from sqlalchemy import select
from sqlmodel import Session

from gateway.config import GatewaySettings
from gateway.webhooks import store
from gateway.webhooks.catalogue import ALL, SUBJECTS, Event, from_bus, signature
from shoal.bus import STREAM_EVENTS, Bus, Delivery, consume
from shoal.db import Database

log = logging.getLogger(__name__)

DURABLE = "gateway-webhooks"
MAX_DELIVER = 20
SIGNATURE_HEADER = "X-Shoal-Signature"
EVENT_HEADER = "X-Shoal-Event"
DELIVERY_HEADER = "X-Shoal-Delivery"
USER_AGENT = "Shoal-Webhooks/1"
_PRUNE_EVERY = 600.0
_CONNECT_TIMEOUT = 10.0
_SNIPPET = 200
# How long a process trusts its cached subscriptions. An endpoint created or enabled through
# another process sharing the database gets events from this one at most this much later; one
# changed through this process is seen at once (`endpoints_changed`).
SUBSCRIPTIONS_TTL = 2.0

tracer = trace.get_tracer("gateway.webhooks")


def utcnow() -> datetime:
    return datetime.now(UTC)


def _servers(url: str) -> list[tuple[str, int]]:
    out = []
    for part in url.split(","):
        parsed = urlsplit(part.strip() if "://" in part else f"nats://{part.strip()}")
        if parsed.hostname:
            out.append((parsed.hostname, parsed.port or 4222))
    return out


async def _reachable(url: str, timeout: float) -> bool:  # noqa: ASYNC109  # a probe with its own bound
    """Whether any server of a NATS URL accepts a TCP connection (before handing it to nats-py,
    whose first connect retries forever and logs every attempt)."""
    for host, port in _servers(url):
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout=timeout)
        except (OSError, TimeoutError):
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True
    return False


Subscriptions = dict[str, frozenset[str]]


def load_subscriptions(session: Session) -> Subscriptions:
    """Workspace -> the event names its enabled endpoints subscribe to (`*` for all)."""
    out: dict[str, set[str]] = {}
    for workspace_id, events in session.execute(
        select(store.EP.c.workspace_id, store.EP.c.events).where(store.EP.c.enabled.is_(True))
    ).all():
        out.setdefault(workspace_id, set()).update(events.split())
    return {ws: frozenset(names) for ws, names in out.items()}


def wanted(subscriptions: Subscriptions, event: Event) -> bool:
    names = subscriptions.get(event.workspace_id)
    return names is not None and (ALL in names or event.name in names)


class Dispatcher:
    """Turns bus events into deliveries and deliveries into POSTs, for one gateway process."""

    def __init__(self, settings: GatewaySettings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self.delays = settings.webhook_delays
        self.consuming = False
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._inflight: set[asyncio.Task[None]] = set()
        self._client: httpx.AsyncClient | None = None
        self._bus: Bus | None = None
        self.subscriptions_ttl = SUBSCRIPTIONS_TTL
        self._subscriptions: Subscriptions | None = None
        self._subscriptions_at = 0.0
        self._subscriptions_generation = 0

    # -- life -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._client = httpx.AsyncClient(
            follow_redirects=False,
            timeout=httpx.Timeout(self.settings.webhook_request_timeout_seconds),
            limits=httpx.Limits(max_connections=self.settings.webhook_max_concurrency),
            headers={"User-Agent": USER_AGENT},
        )
        self._tasks.append(asyncio.create_task(self._deliver_loop(), name="webhook-delivery"))
        if self.settings.webhook_consume:
            self._tasks.append(asyncio.create_task(self._events_loop(), name="webhook-events"))
        else:
            log.info("webhook dispatcher: not consuming bus events (no NATS URL configured)")

    async def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        grace = self.settings.webhook_request_timeout_seconds + 2
        await self._settle(self._tasks, grace)
        await self._settle(list(self._inflight), grace)
        if self._bus is not None:
            with contextlib.suppress(Exception):
                await self._bus.close()
        if self._client is not None:
            await self._client.aclose()

    @staticmethod
    async def _settle(tasks: list[asyncio.Task[None]], grace: float) -> None:
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=grace)
        for task in late:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def wake(self) -> None:
        """Look for due deliveries now (something was just enqueued or replayed)."""
        self._wake.set()

    def endpoints_changed(self) -> None:
        """Forget the cached subscriptions: this process created, changed or deleted an endpoint."""
        self._subscriptions = None
        self._subscriptions_generation += 1

    async def subscriptions(self) -> Subscriptions:
        """Who wants which events, at most `subscriptions_ttl` seconds old."""
        cached = self._subscriptions
        if cached is not None and time.monotonic() - self._subscriptions_at < self.subscriptions_ttl:
            return cached
        generation = self._subscriptions_generation
        loaded_at = time.monotonic()
        loaded = await self.db.run(load_subscriptions)
        # An endpoint changed while loading: use what was read for this batch (it is what the
        # database held), but do not keep it, so the next batch reads the change.
        if generation == self._subscriptions_generation:
            self._subscriptions, self._subscriptions_at = loaded, loaded_at
        return loaded

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)

    # -- events in --------------------------------------------------------------------------------------

    async def _events_loop(self) -> None:
        backoff = 0.5
        warned = False
        while not self._stop.is_set():
            try:
                if self._bus is None:
                    if not await _reachable(self.settings.nats_url, timeout=2.0):
                        if not warned:
                            log.warning("webhook dispatcher: NATS unreachable; retrying in the background")
                            warned = True
                        await self._pause(backoff)
                        backoff = min(backoff * 2, 30.0)
                        continue
                    self._bus = await asyncio.wait_for(
                        Bus.connect(
                            self.settings.nats_url, name="gateway-webhooks", namespace=self.settings.namespace
                        ),
                        timeout=_CONNECT_TIMEOUT,
                    )
                await self._bus.ensure_streams()
                await self._bus.ensure_consumer(
                    STREAM_EVENTS, DURABLE, filter_subjects=SUBJECTS, max_deliver=MAX_DELIVER
                )
                self.consuming = True
                warned = False
                backoff = 0.5
                log.info("webhook dispatcher: consuming %s as %s", STREAM_EVENTS, DURABLE)
                await consume(
                    self._bus,
                    stream=STREAM_EVENTS,
                    durable=DURABLE,
                    # Several message types share the stream; each is decoded by its subject in
                    # the handler. Empty parses any well-formed payload (and keeps nothing).
                    decode=empty_pb2.Empty,
                    handler=self._on_events,
                    batch=200,
                    fetch_timeout=1.0,
                    stop=self._stop,
                    max_deliver=MAX_DELIVER,
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.consuming = False
                log.warning("webhook dispatcher: event consumer failed (%r); again in %.1fs", exc, backoff)
                await self._pause(backoff)
                backoff = min(backoff * 2, 30.0)
        self.consuming = False

    def _logical(self, subject: str) -> str:
        namespace = self.settings.namespace
        return subject.removeprefix(f"{namespace}.") if namespace else subject

    async def _on_events(self, deliveries: list[Delivery[empty_pb2.Empty]]) -> None:
        subscriptions = await self.subscriptions()
        if not subscriptions:
            # No enabled endpoint anywhere: the batch is acked as read. Not even decoded, so a
            # malformed message is acked too rather than terminated; nobody would have got it.
            return
        events: dict[str, Event] = {}
        for d in deliveries:
            subject = self._logical(d.subject)
            try:
                event = from_bus(subject, d.msg.data)
            except DecodeError as exc:
                d.reject(f"not the payload of {subject}: {exc}")
                continue
            except Exception as exc:
                # A message this gateway cannot map (an enum value it does not know yet) must not
                # hold the batch back: it is set aside, the others go on.
                log.error("webhook dispatcher: cannot map %s: %r; message terminated", subject, exc)
                d.reject(f"cannot map {subject}: {exc!r}")
                continue
            # `store.enqueue` decides for good (enabled, subscribed, created before the event); the
            # cache only spares it the events no workspace's endpoint could want.
            if event is not None and wanted(subscriptions, event):
                events.setdefault(event.id, event)
        if not events:
            return
        offered = await self.db.run(
            store.enqueue, list(events.values()), first_delay=self.delays[0], now=utcnow()
        )
        if offered:
            self._wake.set()

    # -- deliveries out ---------------------------------------------------------------------------------

    async def _deliver_loop(self) -> None:
        lease = timedelta(seconds=self.settings.webhook_lease_seconds)
        concurrency = self.settings.webhook_max_concurrency
        pruned_at = 0.0
        while not self._stop.is_set():
            self._wake.clear()
            free = concurrency - len(self._inflight)
            claimed: list[store.Claimed] = []
            if free > 0:
                try:
                    claimed = await self.db.run(store.claim, limit=free, lease=lease, now=utcnow())
                except Exception:
                    log.exception("webhook dispatcher: claiming due deliveries failed")
            for c in claimed:
                task = asyncio.create_task(self._attempt(c), name=f"webhook-{c.id}")
                self._inflight.add(task)
                task.add_done_callback(self._finished)
            if time.monotonic() - pruned_at > _PRUNE_EVERY:
                pruned_at = time.monotonic()
                await self._prune()
            if claimed and len(claimed) == free:
                continue  # maybe more are due; the next pass waits if every slot is busy
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.settings.webhook_poll_interval_seconds)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook attempt crashed", exc_info=task.exception())

    async def _prune(self) -> None:
        before = utcnow() - timedelta(days=self.settings.webhook_retention_days)
        try:
            await self.db.run(store.prune, before=before)
        except Exception:
            log.exception("webhook dispatcher: pruning old deliveries failed")

    async def _attempt(self, c: store.Claimed) -> None:
        assert self._client is not None
        body = c.body.encode()
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: signature(c.secret, body),
            EVENT_HEADER: c.event,
            DELIVERY_HEADER: c.id,
        }
        timeout = self.settings.webhook_request_timeout_seconds
        started = utcnow()
        t0 = time.monotonic()
        status: int | None = None
        error = ""
        with tracer.start_as_current_span(
            "webhook deliver",
            kind=SpanKind.CLIENT,
            attributes={
                "http.request.method": "POST",
                "shoal.webhook.delivery_id": c.id,
                "shoal.webhook.event": c.event,
            },
        ) as span:
            try:
                async with asyncio.timeout(timeout):
                    status, error = await self._post(c.url, body, headers)
            except TimeoutError:
                error = f"timed out after {timeout:g}s"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}".rstrip(": ")
            if status is not None:
                span.set_attribute("http.response.status_code", status)
            if error:
                span.set_status(Status(StatusCode.ERROR, error[:_SNIPPET]))
        result = store.AttemptResult(
            started_at=started,
            duration_ms=int((time.monotonic() - t0) * 1000),
            status_code=status,
            error=error,
        )
        try:
            state = await self.db.run(
                store.record, claimed=c, result=result, delays=self.delays, now=utcnow()
            )
        except Exception:
            # The lease runs out and the delivery is tried again: at least once, never lost.
            log.exception("webhook dispatcher: recording attempt of %s failed", c.id)
            return
        if state is None:
            log.warning(
                "webhook delivery %s: its lease ran out or its endpoint was deleted during the attempt; "
                "the result is not kept",
                c.id,
            )
        elif not result.succeeded:
            log.info("webhook delivery %s to %s failed (%s); now %s", c.id, c.endpoint_id, error, state)

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
        assert self._client is not None
        async with self._client.stream("POST", url, content=body, headers=headers) as response:
            if 200 <= response.status_code < 300:
                return response.status_code, ""
            snippet = await _read_some(response.aiter_bytes(), _SNIPPET)
            return response.status_code, f"HTTP {response.status_code}" + (f": {snippet}" if snippet else "")


async def _read_some(chunks: AsyncIterator[bytes], limit: int) -> str:
    """Up to `limit` characters of a response body, for the attempt's error (never all of it)."""
    data = b""
    async for chunk in chunks:
        data += chunk
        if len(data) >= limit:
            break
    return data[:limit].decode("utf-8", "replace").strip()
