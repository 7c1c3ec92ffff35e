"""The JetStream kit: streams, durable pull consumers, traced publishes and the consume loop.

Subjects and streams (DESIGN §4):
    EXEC    shoal.exec.step.<campaign_id>         work queue, file storage, duplicate window
    EVENTS  shoal.events.<domain>.<kind>          limits (max age), file storage

Namespaces isolate tests (and could isolate environments sharing one server): a bus connected with
namespace "t1" uses stream "t1_EXEC" and subjects "t1.shoal.exec.step.<id>". Every stream name and
subject that goes through a `Bus` is namespaced idempotently, so callers may pass either the
logical name (`STREAM_EXEC`, `step_subject(cid)`) or one already namespaced by `bus.stream_name`/
`bus.step_subject`. Durable consumer names live inside a stream and are not namespaced.

Tracing (DESIGN §6): a publish opens a PRODUCER span and injects W3C trace context into the headers
inside it; the consume loop extracts it and opens a CONSUMER span, child of the producer, and runs
the handler once per batch inside an INTERNAL "shoal.bus.batch" span that is a child of the first
message's span and links to every consumer span. For speed, spans are per group, not per message:
`publish_many` opens one PRODUCER span per (parent context, subject) and the consume loop one
CONSUMER span per distinct producer context in a fetched batch (`messaging.batch.message_count`
says how many messages a span stands for). A span per message cost more CPU than the message.

Settlement: after the handler returns every delivery is acked unless the handler chose otherwise
(`retry(delay)` -> nak with delay, `reject(reason)` -> term). When the handler raises, undecided
deliveries are nak'ed with exponential backoff, or term'ed once they reached `max_deliver` (poison).
A payload that does not decode is term'ed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import itertools
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, Self, TypeVar, cast

import nats.errors
import nats.js.errors
from google.protobuf.message import DecodeError, Message
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    ConsumerInfo,
    DeliverPolicy,
    Header,
    PubAck,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
)
from nats.js.api import StatusCode as NatsStatus
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, TracerProvider

from shoal import telemetry
from shoal.config import SharedSettings

logger = logging.getLogger(__name__)

STREAM_EXEC = "EXEC"
STREAM_EVENTS = "EVENTS"
EXEC_SUBJECTS = "shoal.exec.>"
EVENTS_SUBJECTS = "shoal.events.>"
BATCH_SPAN_NAME = "shoal.bus.batch"
# OpenTelemetry keeps at most 128 links per span by default; building more only costs CPU.
_MAX_LINKS = 128

# JetStream error code for "stream name already in use with a different configuration".
_ERR_STREAM_NAME_IN_USE = 10058
# "replicas > 1 not supported in non-clustered mode", "insufficient resources" (fewer servers).
_ERR_REPLICAS = frozenset({10074, 10023})
_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_-]*$")
_BAD_TOKEN_RE = re.compile(r"[.*>\s]")

ATTR_SYSTEM = "messaging.system"
ATTR_DESTINATION = "messaging.destination.name"
ATTR_MESSAGE_ID = "messaging.message.id"
ATTR_OPERATION = "messaging.operation.type"
ATTR_CONSUMER = "messaging.consumer.group.name"
ATTR_BATCH_COUNT = "messaging.batch.message_count"
ATTR_NUM_DELIVERED = "shoal.bus.num_delivered"
ATTR_STREAM_SEQ = "shoal.bus.stream_seq"
ATTR_DUPLICATE = "shoal.bus.duplicate"

M = TypeVar("M", bound=Message)


def _token(value: str, what: str) -> str:
    if not value or _BAD_TOKEN_RE.search(value):
        raise ValueError(
            f"{what} {value!r} cannot be a subject token (empty, or has '.', '*', '>' or spaces)"
        )
    return value


def step_subject(campaign_id: str) -> str:
    """Subject of a step message for a campaign (not namespaced; see `Bus.step_subject`)."""
    return f"shoal.exec.step.{_token(campaign_id, 'campaign id')}"


def event_subject(domain: str, kind: str) -> str:
    """Subject of an event (not namespaced; see `Bus.event_subject`)."""
    return f"shoal.events.{_token(domain, 'event domain')}.{_token(kind, 'event kind')}"


def stream_replicas() -> int:
    """The `SHOAL_NATS_STREAM_REPLICAS` setting (1..5, default 1), validated like every setting."""
    return SharedSettings.load().nats_stream_replicas


class StreamReplicasError(Exception):
    """The server cannot keep a stream with that many replicas (not clustered, or too few servers)."""


class PublishError(Exception):
    """One or more messages of `publish_many` were not stored; re-publishing all is safe (msg ids)."""

    def __init__(
        self, failures: list[tuple[int, BaseException]], total: int, *, subject: str | None = None
    ) -> None:
        self.failures = failures
        first_index, first = failures[0]
        where = f"item {first_index}, subject {subject}" if subject else f"item {first_index}"
        if isinstance(first, nats.js.errors.NoStreamResponseError):
            detail = f"no stream takes subject {subject}" if subject else "no stream takes its subject"
        else:
            detail = str(first) or repr(first)
        super().__init__(f"{len(failures)} of {total} publishes failed; first ({where}): {detail}")


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message for `Bus.publish_many`; `context` is the parent of its PRODUCER span."""

    subject: str
    message: Message
    msg_id: str | None = None
    context: Context | None = None


_MSG_ID = Header.MSG_ID.value


class _ProducerGroup:
    """The PRODUCER span shared by the messages of one `publish_many` with the same parent."""

    __slots__ = ("count", "duplicates", "failed", "headers", "last_seq", "span", "subject")

    def __init__(self, span: Span, subject: str, headers: dict[str, str]) -> None:
        self.span = span
        self.subject = subject
        self.headers = headers
        self.count = 0
        self.failed = False
        self.last_seq = 0
        self.duplicates = 0

    def fail(self, exc: BaseException) -> None:
        if not self.failed:
            self.failed = True
            self.span.record_exception(exc)
            self.span.set_status(Status(StatusCode.ERROR, repr(exc)))

    def settled(self, outcome: PubAck | BaseException | None) -> None:
        """Account for one of the group's publishes once it has settled (None: given up)."""
        if outcome is None:
            self.fail(asyncio.CancelledError("publish cancelled"))
        elif isinstance(outcome, BaseException):
            self.fail(outcome)
        else:
            self.last_seq = max(self.last_seq, outcome.seq)
            self.duplicates += bool(outcome.duplicate)

    def end(self) -> None:
        span = self.span
        if not span.is_recording():
            span.end()
            return
        span.set_attribute(ATTR_BATCH_COUNT, self.count)
        if self.last_seq:
            span.set_attribute(ATTR_STREAM_SEQ, self.last_seq)
        if self.duplicates:
            span.set_attribute(ATTR_DUPLICATE, True)
        span.end()


class _Window:
    """One `publish_many`'s publishes: their outcomes, how many await a PubAck, a wait for fewer.

    `outcomes[i]` is item i's PubAck or error once its reply came, None until then. A counter and
    one waiter, where a future per message, a semaphore and a closure per message cost more CPU
    than the publish itself.
    """

    __slots__ = ("outcomes", "pending", "waiter", "wanted")

    def __init__(self) -> None:
        self.outcomes: list[PubAck | BaseException | None] = []
        self.pending = 0
        self.wanted = 0
        self.waiter: asyncio.Future[None] | None = None

    def settle(self, index: int, outcome: PubAck | BaseException) -> None:
        self.outcomes[index] = outcome
        self.pending -= 1
        waiter = self.waiter
        if waiter is not None and self.pending <= self.wanted and not waiter.done():
            waiter.set_result(None)

    async def wait(self, most: int) -> None:
        """Return once at most `most` publishes are unsettled."""
        while self.pending > most:
            self.wanted = most
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None


_STATUS_HEADER = Header.STATUS.value
_NO_RESPONDERS = NatsStatus.SERVICE_UNAVAILABLE.value  # "no responders": no stream took it
# PubAck's fields, computed once: nats-py's `PubAck.from_response` calls `dataclasses.fields`
# for every ack, a visible share of a publisher's CPU.
_PUBACK_FIELDS = frozenset(f.name for f in dataclasses.fields(PubAck))


def _read_pub_ack(msg: Msg) -> PubAck:
    """A JetStream publish reply as nats-py's `publish_async` reads it: the PubAck, or raises
    NoStreamResponseError (no stream takes the subject) or the APIError the server answered."""
    headers = msg.headers
    if headers and (status := headers.get(_STATUS_HEADER)):
        if status == _NO_RESPONDERS:
            raise nats.js.errors.NoStreamResponseError
        nats.js.errors.APIError.from_msg(msg)  # raises
    resp = json.loads(msg.data)
    if "error" in resp:
        nats.js.errors.APIError.from_error(resp["error"])  # raises
    if resp.keys() <= _PUBACK_FIELDS:
        return PubAck(**resp)
    return PubAck.from_response(resp)  # fields this nats-py does not know, or renamed ones


class _Acks:
    """One reply subscription per `Bus` for every `publish_many` PubAck, and who awaits which.

    nats-py's `publish_async` makes a random token, a future, a done-callback closure and a
    semaphore wait per message and parses each PubAck through `dataclasses.fields`; here a
    message's reply subject is the bus's inbox plus a counter, mapped to (its call, its index).
    Entries leave the map when the reply comes or when their call gives up (timeout, cancel), so
    a reply lost to a server restart cannot leak one: its call times out and removes it. The
    subscription is an ordinary one, re-made by nats-py after a reconnect.
    """

    __slots__ = ("lock", "prefix", "serial", "sub", "waiting")

    def __init__(self) -> None:
        self.waiting: dict[str, tuple[_Window, int]] = {}
        self.prefix = ""
        self.serial = itertools.count()
        self.sub: Subscription | None = None
        self.lock = asyncio.Lock()

    async def start(self, nc: Client) -> None:
        async with self.lock:
            if self.sub is None:
                prefix = f"{nc.new_inbox()}."
                self.sub = await nc.subscribe(f"{prefix}*", cb=self.on_reply)
                self.prefix = prefix

    async def on_reply(self, msg: Msg) -> None:
        entry = self.waiting.pop(msg.subject, None)
        if entry is not None:  # else its call gave up already
            window, index = entry
            try:
                outcome: PubAck | BaseException = _read_pub_ack(msg)
            except Exception as exc:  # the server's answer, or a reply we cannot read
                outcome = exc
            window.settle(index, outcome)


class Bus:
    """A NATS connection and its JetStream context, with Shoal's streams and tracing."""

    def __init__(
        self, nc: Client, *, namespace: str = "", tracer_provider: TracerProvider | None = None
    ) -> None:
        if not _NAMESPACE_RE.match(namespace) or namespace == "shoal":
            raise ValueError(f"namespace {namespace!r} must be letters, digits, '_' or '-' and not 'shoal'")
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.namespace = namespace
        self.tracer = trace.get_tracer("shoal.bus", tracer_provider=tracer_provider)
        self._acks = _Acks()

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        name: str,
        namespace: str = "",
        reconnect_wait: float = 0.5,
        tracer_provider: TracerProvider | None = None,
    ) -> Self:
        """Connect and reconnect forever, so a restarted nats-server is survived."""
        nc = Client()
        outage = False

        async def on_error(exc: Exception) -> None:
            # One warning per outage: the failed reconnect attempts that follow go to debug.
            logger.log(logging.DEBUG if outage else logging.WARNING, "nats %s: %r", name, exc)

        async def on_disconnected() -> None:
            nonlocal outage
            closing = nc.is_closed or nc.is_draining
            outage = not closing
            logger.log(logging.DEBUG if closing else logging.WARNING, "nats %s: disconnected", name)

        async def on_reconnected() -> None:
            nonlocal outage
            outage = False
            logger.info("nats %s: reconnected", name)

        await nc.connect(
            [s.strip() for s in url.split(",")],
            name=name,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            # nats-py annotates the waits as int, but they are seconds and fractions work.
            reconnect_time_wait=reconnect_wait,  # type: ignore[arg-type]
            connect_timeout=2,
            error_cb=on_error,
            disconnected_cb=on_disconnected,
            reconnected_cb=on_reconnected,
        )
        return cls(nc, namespace=namespace, tracer_provider=tracer_provider)

    # -- names -------------------------------------------------------------------------------

    def subject(self, subject: str) -> str:
        """`subject` in this bus's namespace (unchanged when already namespaced)."""
        if not self.namespace or subject.startswith(f"{self.namespace}."):
            return subject
        return f"{self.namespace}.{subject}"

    def stream_name(self, stream: str) -> str:
        """`stream` in this bus's namespace (unchanged when already namespaced)."""
        if not self.namespace or stream.startswith(f"{self.namespace}_"):
            return stream
        return f"{self.namespace}_{stream}"

    def step_subject(self, campaign_id: str) -> str:
        return self.subject(step_subject(campaign_id))

    def event_subject(self, domain: str, kind: str) -> str:
        return self.subject(event_subject(domain, kind))

    # -- streams and consumers ---------------------------------------------------------------

    async def ensure_streams(
        self,
        *,
        duplicate_window: float = 120.0,
        events_max_age: float = 7 * 86400,
        replicas: int | None = None,
    ) -> None:
        """Create EXEC and EVENTS, or update them to this configuration.

        `replicas` (default: the `SHOAL_NATS_STREAM_REPLICAS` setting) is how many servers of a
        JetStream cluster keep each stream; durable consumers inherit it. Every start applies it,
        so raising the setting and restarting a service moves existing streams to it.
        """
        if replicas is None:
            replicas = stream_replicas()
        await self._ensure_stream(
            StreamConfig(
                name=self.stream_name(STREAM_EXEC),
                subjects=[self.subject(EXEC_SUBJECTS)],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
                duplicate_window=duplicate_window,
                num_replicas=replicas,
            )
        )
        await self._ensure_stream(
            StreamConfig(
                name=self.stream_name(STREAM_EVENTS),
                subjects=[self.subject(EVENTS_SUBJECTS)],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                max_age=events_max_age,
                # The server refuses a duplicate window longer than the stream's max age.
                duplicate_window=min(duplicate_window, events_max_age),
                num_replicas=replicas,
            )
        )

    async def _ensure_stream(self, config: StreamConfig) -> None:
        try:
            try:
                await self.js.add_stream(config)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != _ERR_STREAM_NAME_IN_USE:
                    raise
                await self.js.update_stream(config)
        except nats.js.errors.APIError as exc:
            if (config.num_replicas or 1) > 1 and exc.err_code in _ERR_REPLICAS:
                raise StreamReplicasError(
                    f"stream {config.name} with {config.num_replicas} replicas: {exc.description} "
                    "(SHOAL_NATS_STREAM_REPLICAS must not exceed the JetStream servers in the cluster)"
                ) from exc
            raise

    async def ensure_consumer(
        self,
        stream: str,
        durable: str,
        *,
        filter_subjects: list[str] | None = None,
        max_deliver: int = 10,
        ack_wait: float = 30.0,
        max_ack_pending: int = 20000,
    ) -> None:
        """Create or update a durable pull consumer with explicit ack (filters get namespaced)."""
        filters = [self.subject(s) for s in filter_subjects or []]
        config = ConsumerConfig(
            name=durable,
            durable_name=durable,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            max_deliver=max_deliver,
            ack_wait=ack_wait,
            max_ack_pending=max_ack_pending,
            filter_subject=filters[0] if len(filters) == 1 else None,
            filter_subjects=filters if len(filters) > 1 else None,
        )
        # Since nats-server 2.10 CONSUMER.CREATE creates or updates, so this is idempotent.
        await self.js.add_consumer(self.stream_name(stream), config)

    async def stream_info(self, stream: str) -> StreamInfo:
        return await self.js.stream_info(self.stream_name(stream))

    async def consumer_info(self, stream: str, durable: str) -> ConsumerInfo:
        info: ConsumerInfo = await self.js.consumer_info(self.stream_name(stream), durable)
        return info

    # -- publishing ----------------------------------------------------------------------------

    def _producer_attributes(self, subject: str, msg_id: str | None) -> dict[str, str]:
        attributes = {ATTR_SYSTEM: "nats", ATTR_DESTINATION: subject, ATTR_OPERATION: "publish"}
        if msg_id:
            attributes[ATTR_MESSAGE_ID] = msg_id
        return attributes

    @staticmethod
    def _headers(
        msg_id: str | None, headers: Mapping[str, str] | None, context: Context | None
    ) -> dict[str, str]:
        out = dict(headers or {})
        if msg_id:
            out[Header.MSG_ID.value] = msg_id
        return telemetry.inject(out, context)

    async def publish(
        self,
        subject: str,
        message: Message,
        *,
        msg_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> PubAck:
        """Publish one protobuf message and wait for its PubAck, inside a PRODUCER span."""
        subject = self.subject(subject)
        with self.tracer.start_as_current_span(
            f"{subject} publish",
            kind=SpanKind.PRODUCER,
            attributes=self._producer_attributes(subject, msg_id),
        ) as span:
            # Injected inside the span, so the consumer's parent is this PRODUCER span.
            hdrs = self._headers(msg_id, headers, None)
            ack = await self.js.publish(subject, message.SerializeToString(), headers=hdrs)
            span.set_attribute(ATTR_STREAM_SEQ, ack.seq)
            if ack.duplicate:
                span.set_attribute(ATTR_DUPLICATE, True)
            return ack

    async def publish_many(
        self,
        items: Sequence[Outgoing],
        *,
        window: int = 1000,
        # A JetStream reply lost to a server restart never comes, so without a bound the caller
        # would hang; the bound belongs here, not to every caller.
        timeout: float = 30.0,  # noqa: ASYNC109
    ) -> list[PubAck]:
        """Publish pipelined (at most `window` unacknowledged) and return every PubAck, in order.

        Raises `PublishError` when any message was not stored (after all have settled), or
        TimeoutError when they did not all settle within `timeout` seconds.

        Each message is a core NATS publish whose reply subject is on this bus's PubAck inbox
        (`_Acks`): JetStream's own protocol, as nats-py's `publish_async` speaks it, at less
        CPU per message.
        """
        if window < 1:
            raise ValueError("window must be at least 1")
        acks = self._acks
        if acks.sub is None:
            await acks.start(self.nc)
        waiting = acks.waiting
        prefix = acks.prefix
        serial = acks.serial
        publish = self.nc.publish
        pipeline = _Window()
        outcomes = pipeline.outcomes
        replies: list[str] = []  # replies[i]: item i's reply subject, its key in `waiting`
        owners: list[_ProducerGroup] = []  # owners[i] is item i's group
        # One PRODUCER span per distinct parent context, not per message: a fan-out page or a
        # batch's follow-ups share one parent, and a span per message cost more CPU than the
        # publish itself. Every message still carries the trace context of a PRODUCER span whose
        # parent is its own `context` (so the consumer's parent is that producer, DESIGN §6).
        groups: dict[tuple[int, str], _ProducerGroup] = {}
        try:
            async with asyncio.timeout(timeout):
                for index, item in enumerate(items):
                    # The items hold their contexts alive for this call, so id() cannot be reused.
                    key = (id(item.context), item.subject)
                    group = groups.get(key)
                    if group is None:
                        group = groups[key] = self._producer_group(self.subject(item.subject), item)
                    if pipeline.pending >= window:
                        await pipeline.wait(window - 1)
                    hdrs = {**group.headers, _MSG_ID: item.msg_id} if item.msg_id else group.headers
                    reply = f"{prefix}{next(serial)}"
                    # Registered before the publish: the reply may come while it awaits.
                    waiting[reply] = (pipeline, index)
                    replies.append(reply)
                    outcomes.append(None)
                    owners.append(group)
                    pipeline.pending += 1
                    try:
                        await publish(group.subject, item.message.SerializeToString(), reply, hdrs)
                    except BaseException as exc:
                        group.fail(exc)
                        raise
                    group.count += 1
                await pipeline.wait(0)
        finally:
            for reply, group, outcome in zip(replies, owners, outcomes, strict=True):
                group.settled(outcome)
                if outcome is None:
                    # Given up (timeout, cancel, failed send): a late reply finds nobody waiting.
                    waiting.pop(reply, None)
            for group in groups.values():
                group.end()
        failures: list[tuple[int, BaseException]] = []
        for i, outcome in enumerate(outcomes):
            if isinstance(outcome, BaseException):
                failures.append((i, outcome))
        if failures:
            first = failures[0][0]
            raise PublishError(failures, len(items), subject=owners[first].subject) from failures[0][1]
        # Every item settled (else the timeout raised) and none failed: all are PubAcks.
        return cast(list[PubAck], outcomes)

    def _producer_group(self, subject: str, item: Outgoing) -> _ProducerGroup:
        span = self.tracer.start_span(
            f"{subject} publish",
            context=item.context,
            kind=SpanKind.PRODUCER,
            attributes={ATTR_SYSTEM: "nats", ATTR_DESTINATION: subject, ATTR_OPERATION: "publish"},
        )
        # Injected once for the group, inside its span, and copied into every message's headers.
        return _ProducerGroup(
            span, subject, telemetry.inject({}, trace.set_span_in_context(span, item.context))
        )

    async def close(self) -> None:
        """Drain subscriptions and pending publishes, then close."""
        if not self.nc.is_closed:
            await self.nc.drain()


class Outcome(enum.Enum):
    UNDECIDED = "undecided"
    ACK = "ack"
    RETRY = "retry"
    REJECT = "reject"


class Delivery(Generic[M]):
    """One fetched message, decoded, with its CONSUMER span; the handler decides its outcome.

    `retry`, `reject` and `ack` record the decision, applied after the handler returns;
    `in_progress` is sent at once (it extends `ack_wait` during long work).
    """

    __slots__ = ("_outcome", "context", "delay", "msg", "num_delivered", "payload", "reason", "span")

    def __init__(self, msg: Msg, payload: M, span: Span, context: Context, num_delivered: int) -> None:
        self.msg = msg
        self.payload = payload
        self.span = span
        self.context = context
        self.num_delivered = num_delivered
        self.delay = 0.0
        self.reason = ""
        self._outcome = Outcome.UNDECIDED

    @property
    def subject(self) -> str:
        return self.msg.subject

    @property
    def outcome(self) -> Outcome:
        return self._outcome

    def ack(self) -> None:
        """Ack even if the handler raises later for other deliveries of the batch."""
        self._outcome = Outcome.ACK

    def retry(self, delay: float = 0.0) -> None:
        """Redeliver after `delay` seconds (nak); on the last allowed delivery it is term'ed instead."""
        self._outcome = Outcome.RETRY
        self.delay = delay

    def reject(self, reason: str) -> None:
        """Never redeliver (term)."""
        self._outcome = Outcome.REJECT
        self.reason = reason

    async def in_progress(self) -> None:
        await self.msg.in_progress()


def retry_delay(num_delivered: int, *, base: float = 0.5, cap: float = 30.0) -> float:
    """Backoff before the next delivery after `num_delivered` failed ones: base * 2^(n-1), capped."""
    return min(cap, base * 2.0 ** max(0, min(num_delivered - 1, 32)))


_STATUS = Header.STATUS.value
_NO_MESSAGES = NatsStatus.NO_MESSAGES.value
_REQUEST_TIMEOUT = NatsStatus.REQUEST_TIMEOUT.value
_CONFLICT = NatsStatus.CONFLICT.value
_HEARTBEAT = NatsStatus.CONTROL_MESSAGE.value
# Statuses that end a pull request without an error: no messages now, request expired, conflict
# (e.g. a request over max bytes or a consumer limit): nats-py treats them alike.
_TEMPORARY = frozenset({_NO_MESSAGES, _REQUEST_TIMEOUT, _CONFLICT})


class _Inbox:
    """The parts of a nats-py `PullSubscription` a lean fetch needs (private; checked on use)."""

    __slots__ = ("nc", "next_subject", "queue", "reply", "sub")

    def __init__(self, psub: JetStreamContext.PullSubscription) -> None:
        self.sub = psub._sub
        self.queue: asyncio.Queue[Msg] = psub._sub._pending_queue
        self.nc: Client = psub._nc
        self.next_subject: str = psub._nms
        self.reply: str = psub._deliver
        if not (
            isinstance(self.queue, asyncio.Queue)
            and isinstance(self.sub._pending_size, int)
            and isinstance(self.next_subject, str)
            and isinstance(self.reply, str)
        ):
            raise TypeError("unexpected nats-py PullSubscription internals")

    def take(self) -> Msg:
        """The next message already delivered to the inbox, with nats-py's own bookkeeping."""
        msg = self.queue.get_nowait()
        self.sub._pending_size -= len(msg.data)
        self.queue.task_done()  # Subscription.drain() joins the queue
        return msg

    async def next(self, deadline: float) -> Msg:
        """A delivered message at once, else wait for one until `deadline` (monotonic).

        Waiting goes through nats-py's `next_msg`, so a closed connection still wakes it with
        ConnectionClosedError; it costs a task and a timer, paid per wait, not per message.
        """
        if self.queue.qsize():
            return self.take()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise nats.errors.TimeoutError
        return await self.sub.next_msg(timeout=remaining)

    async def request(self, batch: int, *, expires: float | None, no_wait: bool) -> None:
        req: dict[str, int | bool] = {"batch": batch}
        if expires is not None:
            req["expires"] = int(expires * 1_000_000_000) - 100_000
        if no_wait:
            req["no_wait"] = True
        await self.nc.publish(self.next_subject, json.dumps(req).encode(), self.reply)
        # As nats-py does: let the flusher send the request before the first wait.
        await asyncio.sleep(0)


def _status(msg: Msg) -> str | None:
    headers = msg.headers
    return headers.get(_STATUS) if headers else None


def _processable(status: str | None, msg: Msg) -> bool:
    """True for a message, False for a status that ends a request; other statuses are errors."""
    if not status:
        return True
    if status in _TEMPORARY:
        return False
    raise nats.js.errors.APIError.from_msg(msg)


async def fetch(
    psub: JetStreamContext.PullSubscription,
    batch: int,
    *,
    # Not a local deadline only: it becomes the pull request's `expires`, as in nats-py's fetch.
    timeout: float,  # noqa: ASYNC109
) -> list[Msg]:
    """`psub.fetch(batch, timeout=timeout)` at a fraction of the CPU per message.

    nats-py 2.16 awaits `next_msg` once per message of a batch, and every `next_msg` wraps the
    queue read in `asyncio.wait_for`: a task, a timer and a uuid per message, more CPU than the
    rest of the fetch. This sends the same pull requests as nats-py's `_fetch_n` and handles the
    same statuses, but takes the messages already in the inbox without awaiting, and waits only
    when it is empty.

    Protocol (as nats-py): messages left in the inbox by an earlier request are taken first
    (their status messages dropped); then a `no_wait` request for the rest (with `expires` when
    nothing was found, so it waits for the first message), read until the batch is full or a 404/
    408/409 says that request is over; when nothing came, one lingering request for the time left.
    A 100 (idle heartbeat) counts as a sign of life only. No message within `timeout`: TimeoutError
    (FetchTimeoutError when the server answered but had nothing). Other statuses raise APIError.

    When the nats-py internals it relies on are not there (another nats-py version), it falls
    back to `psub.fetch`, so an upgrade costs speed, never correctness.
    """
    if batch < 2:
        return await psub.fetch(batch, timeout=timeout)
    try:
        inbox = _Inbox(psub)
    except (AttributeError, TypeError):
        return await psub.fetch(batch, timeout=timeout)
    if timeout <= 0:
        raise ValueError("nats: invalid fetch timeout")
    start = time.monotonic()
    deadline = start + timeout
    msgs: list[Msg] = []
    # Delivered for an earlier request that gave up before they came: still ours to process.
    while len(msgs) < batch and inbox.queue.qsize():
        msg = inbox.take()
        if not _status(msg):
            msgs.append(msg)
    if len(msgs) == batch:
        return msgs

    # 1. Whatever is available now, up to the batch.
    await inbox.request(batch - len(msgs), expires=None if msgs else timeout, no_wait=True)
    alive = False  # the server answered (a heartbeat or status), so this is not a lost request
    try:
        msg = await inbox.next(deadline)
    except TimeoutError:
        if msgs:
            return msgs
        raise
    status = _status(msg)
    if status == _HEARTBEAT:
        alive = True
    elif _processable(status, msg):
        msgs.append(msg)
        with contextlib.suppress(TimeoutError):
            while len(msgs) < batch:
                msg = await inbox.next(deadline)
                status = _status(msg)
                if status in (_NO_MESSAGES, _REQUEST_TIMEOUT):
                    break  # this request is over; nothing more will come for it
                if status == _HEARTBEAT:
                    alive = True
                elif _processable(status, msg):
                    msgs.append(msg)
    if msgs:
        return msgs

    # 2. Nothing yet: one lingering request for the time left, returned when full or expired.
    remaining = deadline - time.monotonic()
    if int(remaining * 1_000_000_000) - 100_000 <= 0:
        raise nats.errors.TimeoutError
    await inbox.request(batch, expires=remaining, no_wait=False)
    while True:
        try:
            msg = await inbox.next(deadline)
        except TimeoutError:
            if alive:
                raise nats.js.errors.FetchTimeoutError from None
            raise
        status = _status(msg)
        if status == _HEARTBEAT:
            alive = True
            continue
        if not status:
            msgs.append(msg)
        # A status here may end the earlier no_wait request (it came late); read on either way.
        break
    with contextlib.suppress(TimeoutError):
        while len(msgs) < batch:
            msg = await inbox.next(deadline)
            status = _status(msg)
            if status == _HEARTBEAT:
                alive = True
            elif status in (_NO_MESSAGES, _REQUEST_TIMEOUT):
                break
            elif _processable(status, msg):
                msgs.append(msg)
    if not msgs and alive:
        raise nats.js.errors.FetchTimeoutError
    return msgs


async def consume(
    bus: Bus,
    *,
    stream: str,
    durable: str,
    decode: type[M],
    handler: Callable[[list[Delivery[M]]], Awaitable[None]],
    batch: int = 500,
    fetch_timeout: float = 1.0,
    stop: asyncio.Event,
    max_deliver: int = 10,
    retry_base: float = 0.5,
    retry_cap: float = 30.0,
) -> None:
    """Fetch batches from a durable pull consumer and hand them to `handler` until `stop` is set.

    The consumer must exist (`Bus.ensure_consumer`). The poison threshold is the smaller of
    `max_deliver` and the consumer's own, so a message is always term'ed on its last delivery.
    A batch in hand when `stop` is set is finished and settled before returning.
    """
    stream_name = bus.stream_name(stream)
    info = await bus.consumer_info(stream, durable)
    server_max = info.config.max_deliver or -1
    if server_max > 0 and server_max != max_deliver:
        logger.warning(
            "consumer %s/%s has max_deliver=%s, consume() was given %s; using the smaller",
            stream_name,
            durable,
            server_max,
            max_deliver,
        )
        max_deliver = min(max_deliver, server_max)
    sub = await bus.js.pull_subscribe_bind(durable=durable, stream=stream_name)
    backoff = 0.0
    try:
        while not stop.is_set():
            try:
                msgs = await fetch(sub, batch, timeout=fetch_timeout)
            except TimeoutError:  # nats.errors.TimeoutError too: nothing to fetch, ask again
                backoff = 0.0
                continue
            except nats.errors.ConnectionClosedError:
                if stop.is_set():
                    break
                raise
            except Exception as exc:
                # Reconnecting, JetStream not ready yet after a restart, leader change...
                backoff = min(2.0, max(0.1, backoff * 2))
                logger.warning(
                    "fetch from %s/%s failed (%r); again in %.1fs", stream_name, durable, exc, backoff
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=backoff)
                continue
            backoff = 0.0
            await _process_batch(
                bus,
                msgs,
                durable=durable,
                decode=decode,
                handler=handler,
                max_deliver=max_deliver,
                retry_base=retry_base,
                retry_cap=retry_cap,
            )
    finally:
        if not bus.nc.is_closed:
            try:
                await sub.unsubscribe()
            except nats.errors.Error as exc:
                logger.debug("unsubscribe %s/%s: %r", stream_name, durable, exc)


def _num_delivered(msg: Msg) -> int:
    """`msg.metadata.num_delivered`, read from the ack subject without building the metadata.

    nats-py's metadata parses every token, builds a datetime and two frozen dataclasses; the
    consume loop needs one number per message. The layouts are nats-py's (`Msg.Metadata`):
    $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<tm>.<pending> (9 tokens), or with
    <domain>.<account hash> after ACK (11 or more, delivered at index 6).
    """
    tokens = msg.reply.split(".")
    if tokens[0] == "$JS" and len(tokens) > 1 and tokens[1] == "ACK":
        if len(tokens) == 9:
            return int(tokens[4])
        if len(tokens) >= 11:
            return int(tokens[6])
    return msg.metadata.num_delivered  # not a JetStream ack subject: nats-py raises as before


async def _process_batch(
    bus: Bus,
    msgs: list[Msg],
    *,
    durable: str,
    decode: type[M],
    handler: Callable[[list[Delivery[M]]], Awaitable[None]],
    max_deliver: int,
    retry_base: float,
    retry_cap: float,
) -> None:
    deliveries: list[Delivery[M]] = []
    # One CONSUMER span per producer context in the batch, not per message: messages published
    # together (a fan-out page, a batch's follow-ups) share their PRODUCER span and so their
    # trace headers. Each message's consumer span is still a child of its producer (DESIGN §6).
    consumers: dict[tuple[str, str], _ConsumerSpan] = {}
    owners: list[_ConsumerSpan] = []  # owners[i] is deliveries[i]'s span group
    for msg in msgs:
        headers = msg.headers or {}
        key = (headers.get("traceparent", ""), headers.get("tracestate", ""))
        num_delivered = _num_delivered(msg)
        group = consumers.get(key)
        if group is None:
            group = consumers[key] = _ConsumerSpan(bus, msg, durable, num_delivered)
        else:
            group.add(num_delivered)
        try:
            payload = decode.FromString(msg.data)
        except DecodeError as exc:
            logger.error(
                "poison message on %s (seq %s): not a %s (%s); terminated",
                msg.subject,
                msg.metadata.sequence.stream,
                decode.DESCRIPTOR.full_name,
                exc,
            )
            group.span.record_exception(exc)
            group.span.set_status(Status(StatusCode.ERROR, "undecodable payload"))
            try:
                await msg.term()
            except nats.errors.Error as settle_exc:
                _settle_failed(settle_exc, group.span)
            group.settled(Outcome.REJECT.value)
            continue
        deliveries.append(Delivery(msg, payload, group.span, group.context, num_delivered))
        owners.append(group)
    if not deliveries:
        for group in consumers.values():
            group.end()
        return

    failure: Exception | None = None
    try:
        with bus.tracer.start_as_current_span(
            BATCH_SPAN_NAME,
            context=deliveries[0].context,
            kind=SpanKind.INTERNAL,
            # One link per consumer span; OTel keeps at most 128 links per span anyway.
            links=[Link(g.span.get_span_context()) for g in itertools.islice(consumers.values(), _MAX_LINKS)],
            attributes={ATTR_SYSTEM: "nats", ATTR_CONSUMER: durable, ATTR_BATCH_COUNT: len(deliveries)},
        ):
            await handler(deliveries)
    except Exception as exc:
        failure = exc
        logger.warning("handler for %s failed on a batch of %s: %r", durable, len(deliveries), exc)
    except BaseException:
        # Cancelled: leave the messages unacked; the server redelivers them after ack_wait.
        for group in consumers.values():
            group.span.set_status(Status(StatusCode.ERROR, "cancelled"))
            group.span.end()
        raise

    for d, group in zip(deliveries, owners, strict=True):
        outcome = _decide(
            d, group, failure, max_deliver=max_deliver, retry_base=retry_base, retry_cap=retry_cap
        )
        # Awaited here rather than through a helper: one coroutine less per message adds up.
        try:
            if outcome is Outcome.ACK:
                await d.msg.ack()
            elif outcome is Outcome.RETRY:
                await d.msg.nak(delay=d.delay or None)
            else:
                await d.msg.term()
        except nats.errors.Error as exc:
            _settle_failed(exc, d.span)
    for group in consumers.values():
        group.end()


def _decide(
    d: Delivery[M],
    group: _ConsumerSpan,
    failure: Exception | None,
    *,
    max_deliver: int,
    retry_base: float,
    retry_cap: float,
) -> Outcome:
    """The settlement of `d` (its own decision, or ack / retry / poison term after the handler)."""
    span = d.span
    outcome = d.outcome
    poison = False
    if outcome is Outcome.UNDECIDED:
        outcome = Outcome.ACK if failure is None else Outcome.RETRY
        if failure is not None:
            group.fail(failure)
            d.delay = retry_delay(d.num_delivered, base=retry_base, cap=retry_cap)
    if outcome is Outcome.RETRY and d.num_delivered >= max_deliver:
        # The server would not redeliver it, and on a work queue it would sit in the stream forever.
        outcome, poison = Outcome.REJECT, True
        d.reason = f"poison: failed {d.num_delivered} deliveries" + (
            f", last with {failure!r}" if failure else ""
        )
        span.set_status(Status(StatusCode.ERROR, d.reason))
    group.settled(outcome.value)
    if outcome is Outcome.REJECT:
        span.set_attribute("shoal.bus.reject_reason", d.reason)
        logger.log(
            logging.ERROR if poison else logging.WARNING,
            "terminated message on %s (seq %s): %s",
            d.subject,
            d.msg.metadata.sequence.stream,
            d.reason,
        )
    return outcome


class _ConsumerSpan:
    """The CONSUMER span shared by the messages of a fetched batch that have one producer."""

    __slots__ = ("context", "failed", "max_delivered", "messages", "msg_id", "outcomes", "span")

    def __init__(self, bus: Bus, msg: Msg, durable: str, num_delivered: int) -> None:
        parent = telemetry.extract(msg.headers)
        attributes: dict[str, str | int] = {
            ATTR_SYSTEM: "nats",
            ATTR_DESTINATION: msg.subject,
            ATTR_OPERATION: "process",
            ATTR_CONSUMER: durable,
            ATTR_NUM_DELIVERED: num_delivered,
        }
        self.msg_id = (msg.headers or {}).get(_MSG_ID, "")
        self.span = bus.tracer.start_span(
            f"{msg.subject} process", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
        )
        self.context = trace.set_span_in_context(self.span, parent)
        self.messages = 1
        self.max_delivered = num_delivered
        self.failed = False
        self.outcomes: dict[str, int] = {}

    def add(self, num_delivered: int) -> None:
        self.messages += 1
        self.max_delivered = max(self.max_delivered, num_delivered)

    def fail(self, exc: BaseException) -> None:
        if not self.failed:
            self.failed = True
            self.span.record_exception(exc)
            self.span.set_status(Status(StatusCode.ERROR, repr(exc)))

    def settled(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def end(self) -> None:
        span = self.span
        if span.is_recording():
            if self.messages == 1:
                if self.msg_id:
                    span.set_attribute(ATTR_MESSAGE_ID, self.msg_id)
            else:
                span.set_attribute(ATTR_BATCH_COUNT, self.messages)
                span.set_attribute(ATTR_NUM_DELIVERED, self.max_delivered)
                for outcome, n in self.outcomes.items():
                    span.set_attribute(f"shoal.bus.outcomes.{outcome}", n)
            if self.outcomes:
                only = next(iter(self.outcomes)) if len(self.outcomes) == 1 else "mixed"
                span.set_attribute("shoal.bus.outcome", only)
        span.end()


def _settle_failed(exc: nats.errors.Error, span: Span) -> None:
    # An ack lost to a disconnect only means a redelivery later: the handler is idempotent.
    logger.warning("could not settle a message: %r", exc)
    span.record_exception(exc)
