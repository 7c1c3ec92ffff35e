"""The JetStream kit against a real nats-server: delivery, settlement, de-duplication, tracing."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import nats.errors
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from shoal.bus import BATCH_SPAN_NAME, STREAM_EXEC, Bus, Delivery, Outgoing, consume
from shoal.natsserver import NatsServer
from shoal.v1.events_pb2 import StepMessage
from tests.helpers import span_tree, wait_for

DURABLE = "workers"
Handler = Callable[[list[Delivery[StepMessage]]], Awaitable[None]]


def step(i: int, campaign: str = "c1", seq: int = 1) -> StepMessage:
    return StepMessage(
        workspace_id="ws1", campaign_id=campaign, run_id="r1", execution_id=f"e{i}", step_seq=seq
    )


@contextlib.asynccontextmanager
async def consuming(bus: Bus, handler: Handler, **options: Any) -> AsyncIterator[asyncio.Task[None]]:
    """Run the consume loop in a task; stop it (bounded) and surface its errors on exit."""
    stop = asyncio.Event()
    options.setdefault("fetch_timeout", 0.5)
    task = asyncio.create_task(
        consume(
            bus,
            stream=STREAM_EXEC,
            durable=DURABLE,
            decode=StepMessage,
            handler=handler,
            stop=stop,
            **options,
        )
    )
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)


async def drained(bus: Bus) -> bool:
    """Nothing left to deliver and nothing waiting for an ack."""
    info = await bus.consumer_info(STREAM_EXEC, DURABLE)
    return info.num_pending == 0 and info.num_ack_pending == 0


def consumer_spans(spans: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in spans.get_finished_spans() if s.kind is SpanKind.CONSUMER]


async def test_round_trip(bus: Bus) -> None:
    await bus.ensure_consumer(STREAM_EXEC, DURABLE)
    got: list[Delivery[StepMessage]] = []

    async def handler(batch: list[Delivery[StepMessage]]) -> None:
        got.extend(batch)

    sent = step(1, campaign="camp-7", seq=3)
    ack = await bus.publish(bus.step_subject("camp-7"), sent, msg_id="e1:3")
    assert ack.stream == bus.stream_name(STREAM_EXEC)
    async with consuming(bus, handler):
        await wait_for(lambda: len(got) == 1)
        await wait_for(lambda: drained(bus))

    assert len(got) == 1
    d = got[0]
    assert d.payload == sent
    assert d.subject == bus.step_subject("camp-7") == f"{bus.namespace}.shoal.exec.step.camp-7"
    assert d.num_delivered == 1
    assert (d.msg.headers or {}).get("Nats-Msg-Id") == "e1:3"
    # Work-queue retention: an acked message leaves the stream.
    assert (await bus.stream_info(STREAM_EXEC)).state.messages == 0


async def test_duplicate_msg_id_is_stored_once(bus: Bus) -> None:
    subject = bus.step_subject("c1")
    first = await bus.publish(subject, step(1), msg_id="e1:1")
    again = await bus.publish(subject, step(1), msg_id="e1:1")
    other = await bus.publish(subject, step(1, seq=2), msg_id="e1:2")

    assert not first.duplicate
    assert again.duplicate
    assert again.seq == first.seq
    assert other.seq == first.seq + 1
    assert (await bus.stream_info(STREAM_EXEC)).state.messages == 2


async def test_retry_redelivers(bus: Bus) -> None:
    await bus.ensure_consumer(STREAM_EXEC, DURABLE)
    seen: list[int] = []
    processed: list[tuple[str, int]] = []

    async def handler(batch: list[Delivery[StepMessage]]) -> None:
        for d in batch:
            seen.append(d.num_delivered)
            if d.num_delivered == 1:
                d.retry(0.1)
            else:
                processed.append((d.payload.execution_id, d.num_delivered))

    await bus.publish(bus.step_subject("c1"), step(1), msg_id="e1:1")
    async with consuming(bus, handler):
        await wait_for(lambda: len(processed) == 1)
        await wait_for(lambda: drained(bus))

    assert seen == [1, 2]
    assert processed == [("e1", 2)]
    info = await bus.consumer_info(STREAM_EXEC, DURABLE)
    assert info.delivered is not None
    assert info.delivered.stream_seq == 1
    assert info.num_redelivered == 0  # settled: nothing is waiting for another delivery


@pytest.mark.parametrize("server_max_deliver", [3, 10], ids=["consumer-max-3", "consumer-max-10"])
async def test_poison_message_is_terminated_after_max_deliver(
    bus: Bus, spans: InMemorySpanExporter, server_max_deliver: int
) -> None:
    # With the consumer allowing 10 deliveries, only consume()'s own max_deliver=3 and its term()
    # stop the redeliveries: a nak on the third delivery would bring a fourth.
    await bus.ensure_consumer(STREAM_EXEC, DURABLE, max_deliver=server_max_deliver)
    attempts: list[int] = []

    async def handler(batch: list[Delivery[StepMessage]]) -> None:
        attempts.extend(d.num_delivered for d in batch)
        raise RuntimeError("boom")

    await bus.publish(bus.step_subject("c1"), step(1), msg_id="e1:1")
    async with consuming(bus, handler, max_deliver=3, retry_base=0.05):
        await wait_for(lambda: len(attempts) >= 3)
        await wait_for(lambda: drained(bus))
        # A redelivery would come after at most 0.05 * 2^2 s; give it several times that.
        with pytest.raises(AssertionError):
            await wait_for(lambda: len(attempts) > 3, timeout=1.0)

    assert attempts == [1, 2, 3]
    info = await bus.consumer_info(STREAM_EXEC, DURABLE)
    assert info.num_ack_pending == 0
    assert info.num_pending == 0
    outcomes = [(s.attributes or {}).get("shoal.bus.outcome") for s in consumer_spans(spans)]
    assert outcomes == ["retry", "retry", "reject"]
    assert all(s.status.status_code is StatusCode.ERROR for s in consumer_spans(spans))
    assert all(any(e.name == "exception" for e in s.events) for s in consumer_spans(spans))


async def test_explicit_outcomes_stand_when_the_handler_raises(bus: Bus, spans: InMemorySpanExporter) -> None:
    await bus.ensure_consumer(STREAM_EXEC, DURABLE)
    deliveries: list[tuple[str, int]] = []

    async def handler(batch: list[Delivery[StepMessage]]) -> None:
        for d in batch:
            deliveries.append((d.payload.execution_id, d.num_delivered))
            if d.payload.execution_id == "e1":
                d.ack()
            elif d.payload.execution_id == "e2":
                d.reject("campaign deleted")
        if any(d.payload.execution_id == "e3" and d.num_delivered == 1 for d in batch):
            raise RuntimeError("commit failed")

    for i in (1, 2, 3):
        await bus.publish(bus.step_subject("c1"), step(i), msg_id=f"e{i}:1")
    async with consuming(bus, handler, retry_base=0.05):
        await wait_for(lambda: ("e3", 2) in deliveries)
        await wait_for(lambda: drained(bus))

    assert sorted(deliveries) == [("e1", 1), ("e2", 1), ("e3", 1), ("e3", 2)]
    outcomes = sorted(
        ((s.attributes or {})["shoal.bus.num_delivered"], (s.attributes or {})["shoal.bus.outcome"])
        for s in consumer_spans(spans)
    )
    assert outcomes == [(1, "ack"), (1, "reject"), (1, "retry"), (2, "ack")]
    rejected = next(s for s in consumer_spans(spans) if (s.attributes or {})["shoal.bus.outcome"] == "reject")
    assert (rejected.attributes or {})["shoal.bus.reject_reason"] == "campaign deleted"
    assert (await bus.stream_info(STREAM_EXEC)).state.messages == 0


async def test_retry_on_the_last_delivery_terminates(bus: Bus) -> None:
    await bus.ensure_consumer(STREAM_EXEC, DURABLE, max_deliver=2)
    attempts: list[int] = []

    async def handler(batch: list[Delivery[StepMessage]]) -> None:
        for d in batch:
            attempts.append(d.num_delivered)
            d.retry(0.05)

    await bus.publish(bus.step_subject("c1"), step(1), msg_id="e1:1")
    async with consuming(bus, handler, max_deliver=2):
        await wait_for(lambda: len(attempts) >= 2)
        # term'ed, not left behind: a work queue keeps a message nobody will ever be given again.
        await wait_for(lambda: drained(bus))
        await wait_for(lambda: bus_messages(bus, 0))

    assert attempts == [1, 2]


async def bus_messages(bus: Bus, expected: int) -> bool:
    return (await bus.stream_info(STREAM_EXEC)).state.messages == expected


async def test_in_progress_holds_a_message_past_ack_wait(bus: Bus) -> None:
    await bus.ensure_consumer(STREAM_EXEC, DURABLE, ack_wait=1.0)
    attempts: list[int] = []

    async def handler(batch: list[Delivery[StepMessage]]) -> None:
        attempts.extend(d.num_delivered for d in batch)
        # Long work (2.5 x ack_wait), reporting progress as it goes.
        for _ in range(5):
            await asyncio.sleep(0.5)
            for d in batch:
                await d.in_progress()

    await bus.publish(bus.step_subject("c1"), step(1), msg_id="e1:1")
    async with consuming(bus, handler, fetch_timeout=0.3):
        await wait_for(lambda: attempts == [1])
        await wait_for(lambda: drained(bus), timeout=10)

    assert attempts == [1]
    info = await bus.consumer_info(STREAM_EXEC, DURABLE)
    assert info.num_redelivered == 0
    assert info.delivered is not None
    assert info.delivered.stream_seq == 1


async def test_undecodable_payload_is_terminated_at_once(bus: Bus, spans: InMemorySpanExporter) -> None:
    await bus.ensure_consumer(STREAM_EXEC, DURABLE)
    got: list[str] = []

    async def handler(batch: list[Delivery[StepMessage]]) -> None:
        got.extend(d.payload.execution_id for d in batch)

    subject = bus.step_subject("c1")
    await bus.js.publish(subject, b"\x0a\x05ab")  # field 1 claims 5 bytes, has 2: corrupt
    await bus.publish(subject, step(2), msg_id="e2:1")
    async with consuming(bus, handler):
        await wait_for(lambda: got == ["e2"])
        await wait_for(lambda: drained(bus))

    info = await bus.consumer_info(STREAM_EXEC, DURABLE)
    assert info.delivered is not None
    assert info.delivered.stream_seq == 2
    assert info.num_redelivered == 0
    poison = [s for s in consumer_spans(spans) if s.status.status_code is StatusCode.ERROR]
    assert len(poison) == 1
    assert (poison[0].attributes or {})["shoal.bus.num_delivered"] == 1
    assert len(consumer_spans(spans)) == 2


async def test_trace_context_crosses_the_bus(bus: Bus, spans: InMemorySpanExporter) -> None:
    await bus.ensure_consumer(STREAM_EXEC, DURABLE)
    tracer = trace.get_tracer("test")
    handled = asyncio.Event()

    async def handler(batch: list[Delivery[StepMessage]]) -> None:
        # A follow-up published from the handler continues the same trace.
        with trace.use_span(batch[0].span, end_on_exit=False):
            await bus.publish(bus.event_subject("execution", "step_done"), batch[0].payload)
        handled.set()

    with tracer.start_as_current_span("launch") as parent:
        await bus.publish(bus.step_subject("c1"), step(1), msg_id="e1:1")
    async with consuming(bus, handler):
        await wait_for(handled.is_set)
        await wait_for(lambda: len(consumer_spans(spans)) == 1)

    trace_id = parent.get_span_context().trace_id
    finished = [s for s in spans.get_finished_spans() if s.context and s.context.trace_id == trace_id]
    by_kind = {s.kind: s for s in finished if s.name != BATCH_SPAN_NAME and s.kind is not SpanKind.PRODUCER}
    producers = [s for s in finished if s.kind is SpanKind.PRODUCER]
    step_producer = next(s for s in producers if ".exec.step." in s.name)
    consumer = by_kind[SpanKind.CONSUMER]
    batch_span = next(s for s in finished if s.name == BATCH_SPAN_NAME)

    assert step_producer.parent is not None
    assert step_producer.parent.span_id == parent.get_span_context().span_id
    assert consumer.parent is not None and consumer.parent.span_id == step_producer.context.span_id
    assert batch_span.parent is not None and batch_span.parent.span_id == consumer.context.span_id
    assert batch_span.kind is SpanKind.INTERNAL
    assert [link.context.span_id for link in batch_span.links] == [consumer.context.span_id]
    attrs = step_producer.attributes or {}
    assert attrs["messaging.system"] == "nats"
    assert attrs["messaging.destination.name"] == bus.step_subject("c1")
    assert attrs["messaging.message.id"] == "e1:1"
    step_subject, event_subject = bus.step_subject("c1"), bus.event_subject("execution", "step_done")
    assert span_tree(finished) == "\n".join(
        [
            "launch [INTERNAL]",
            f"    {step_subject} publish [PRODUCER]",
            f"        {step_subject} process [CONSUMER]",
            f"            {BATCH_SPAN_NAME} [INTERNAL]",
            f"            {event_subject} publish [PRODUCER]",
        ]
    )


async def test_publish_many_continues_each_items_trace(bus: Bus, spans: InMemorySpanExporter) -> None:
    await bus.ensure_consumer(STREAM_EXEC, DURABLE)
    tracer = trace.get_tracer("test")
    parents = [tracer.start_span(f"execution {i}") for i in range(2)]
    items = [
        Outgoing(bus.step_subject("c1"), step(i), msg_id=f"e{i}:1", context=trace.set_span_in_context(p))
        for i, p in enumerate(parents)
    ]
    got: dict[str, Delivery[StepMessage]] = {}

    async def handler(batch: list[Delivery[StepMessage]]) -> None:
        got.update({d.payload.execution_id: d for d in batch})

    await bus.publish_many(items)
    for p in parents:
        p.end()
    async with consuming(bus, handler):
        await wait_for(lambda: len(consumer_spans(spans)) == 2)

    producers = {s.context.span_id: s for s in spans.get_finished_spans() if s.kind is SpanKind.PRODUCER}
    for i, p in enumerate(parents):
        consumer_span = got[f"e{i}"].span
        assert consumer_span.get_span_context().trace_id == p.get_span_context().trace_id
        producer = producers[consumer_span.parent.span_id]  # type: ignore[attr-defined]
        assert producer.parent is not None and producer.parent.span_id == p.get_span_context().span_id


async def test_publish_many_delivers_each_message_once(bus: Bus) -> None:
    await bus.ensure_consumer(STREAM_EXEC, DURABLE)
    total = 2000
    counts: Counter[str] = Counter()

    async def handler(batch: list[Delivery[StepMessage]]) -> None:
        counts.update(d.payload.execution_id for d in batch)

    items = [Outgoing(bus.step_subject(f"c{i % 3}"), step(i), msg_id=f"e{i}:1") for i in range(total)]
    acks = await bus.publish_many(items, window=256)
    assert len(acks) == total
    assert len({a.seq for a in acks}) == total
    assert not any(a.duplicate for a in acks)
    # Publishing the same ids again inside the duplicate window stores nothing new.
    again = await bus.publish_many(items[:100])
    assert all(a.duplicate for a in again)

    async with consuming(bus, handler, batch=500):
        await wait_for(lambda: counts.total() >= total, timeout=20)
        await wait_for(lambda: drained(bus))

    assert len(counts) == total
    assert set(counts.values()) == {1}


async def try_publish(bus: Bus, i: int) -> bool:
    try:
        await bus.publish(bus.step_subject("c1"), step(i), msg_id=f"e{i}:1")
    except (nats.errors.Error, TimeoutError):
        return False
    return True


async def test_consume_survives_server_restart(nats_server: NatsServer) -> None:
    bus = await Bus.connect(nats_server.url, name="restart-test", namespace="restart")
    try:
        await bus.ensure_streams()
        await bus.ensure_consumer(STREAM_EXEC, DURABLE)
        seen: set[str] = set()

        async def handler(batch: list[Delivery[StepMessage]]) -> None:
            seen.update(d.payload.execution_id for d in batch)

        async with consuming(bus, handler) as task:
            for i in range(20):
                await bus.publish(bus.step_subject("c1"), step(i), msg_id=f"e{i}:1")
            await wait_for(lambda: len(seen) == 20)

            # In a thread, so the client's loop runs on and sees the disconnect as it happens.
            await asyncio.to_thread(nats_server.restart)
            for i in range(20, 40):
                await wait_for(functools.partial(try_publish, bus, i), timeout=15)
            await wait_for(lambda: len(seen) == 40, timeout=15, message=lambda: f"seen {sorted(seen)}")
            assert not task.done()

        assert seen == {f"e{i}" for i in range(40)}
    finally:
        await bus.close()


async def test_consume_survives_fetch_errors(bus: Bus, caplog: pytest.LogCaptureFixture) -> None:
    await bus.ensure_consumer(STREAM_EXEC, DURABLE)
    seen: set[str] = set()

    async def handler(batch: list[Delivery[StepMessage]]) -> None:
        seen.update(d.payload.execution_id for d in batch)

    async with consuming(bus, handler) as task:
        await bus.publish(bus.step_subject("c1"), step(1), msg_id="e1:1")
        await wait_for(lambda: seen == {"e1"})
        # Fetches now fail (no consumer to answer them) until it exists again.
        await bus.js.delete_consumer(bus.stream_name(STREAM_EXEC), DURABLE)
        await wait_for(lambda: "fetch from" in caplog.text)
        assert not task.done()
        await bus.ensure_consumer(STREAM_EXEC, DURABLE)
        await bus.publish(bus.step_subject("c1"), step(2), msg_id="e2:1")
        await wait_for(lambda: seen == {"e1", "e2"})
