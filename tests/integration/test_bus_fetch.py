"""`shoal.bus.fetch`, the lean pull fetch, against a real nats-server: the same answers as
nats-py's `PullSubscription.fetch` (batches, timeouts, statuses, redelivery)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext

from shoal.bus import STREAM_EXEC, Bus, fetch
from shoal.v1.events_pb2 import StepMessage
from tests.helpers import wait_for

DURABLE = "fetcher"
PullSub = JetStreamContext.PullSubscription


def step(i: int) -> StepMessage:
    return StepMessage(workspace_id="ws1", campaign_id="c1", run_id="r1", execution_id=f"e{i}", step_seq=1)


async def publish(bus: Bus, ids: range) -> None:
    for i in ids:
        await bus.publish(bus.step_subject("c1"), step(i), msg_id=f"e{i}:1")


@pytest.fixture
async def psub(bus: Bus) -> AsyncIterator[PullSub]:
    """A pull subscription on a fresh durable; unsubscribed after, as `consume` does (a status
    that comes after a fetch gave up would otherwise hold the bus's drain until its timeout)."""
    await bus.ensure_consumer(STREAM_EXEC, DURABLE, ack_wait=30)
    sub = await bus.js.pull_subscribe_bind(durable=DURABLE, stream=bus.stream_name(STREAM_EXEC))
    yield sub
    if not sub._sub._closed:
        await sub.unsubscribe()


def ids(msgs: list[Msg]) -> list[str]:
    return [StepMessage.FromString(m.data).execution_id for m in msgs]


async def ack_all(msgs: list[Msg]) -> None:
    for m in msgs:
        await m.ack()


async def test_batch_larger_than_available_returns_what_is_there_promptly(bus: Bus, psub: PullSub) -> None:
    await publish(bus, range(5))
    t0 = time.monotonic()
    msgs = await fetch(psub, 100, timeout=5)
    assert ids(msgs) == [f"e{i}" for i in range(5)]
    # The no_wait request ends with the server's 404, not with the 5 s expiry.
    assert time.monotonic() - t0 < 2.5
    await ack_all(msgs)


async def test_batches_are_capped_and_in_order(bus: Bus, psub: PullSub) -> None:
    await publish(bus, range(25))
    got: list[str] = []
    for expected in (10, 10, 5):
        msgs = await fetch(psub, 10, timeout=2)
        assert len(msgs) == expected
        got += ids(msgs)
        await ack_all(msgs)
    assert got == [f"e{i}" for i in range(25)]


async def test_empty_stream_times_out(bus: Bus, psub: PullSub) -> None:
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        await fetch(psub, 10, timeout=0.5)
    elapsed = time.monotonic() - t0
    assert 0.3 < elapsed < 3


async def test_messages_published_while_a_fetch_waits_arrive(bus: Bus, psub: PullSub) -> None:
    waiting = asyncio.create_task(fetch(psub, 3, timeout=10))
    # The fetch's first request must be at the server before the messages: wait for it there.
    await wait_for(lambda: _waiting_requests(bus), timeout=5)
    t0 = time.monotonic()
    await publish(bus, range(3))
    msgs = await asyncio.wait_for(waiting, timeout=10)
    # That request returns as soon as it has a message (nats-py's no_wait + expires), well before
    # its expiry; the rest come with the next fetch, in order.
    assert time.monotonic() - t0 < 5
    while len(msgs) < 3:
        msgs += await fetch(psub, 3 - len(msgs), timeout=2)
    assert ids(msgs) == ["e0", "e1", "e2"]
    await ack_all(msgs)


async def _waiting_requests(bus: Bus) -> int:
    info = await bus.consumer_info(STREAM_EXEC, DURABLE)
    return info.num_waiting or 0


async def test_status_messages_are_not_returned(bus: Bus, psub: PullSub) -> None:
    inbox = psub._deliver
    # A stale end-of-request status and an idle heartbeat in the inbox before the messages: nats-py
    # parses a status line into the "Status" header, which is what a publish with that header gives.
    await bus.nc.publish(inbox, b"", headers={"Status": "404", "Description": "No Messages"})
    await bus.nc.publish(inbox, b"", headers={"Status": "100", "Description": "Idle Heartbeat"})
    await bus.nc.flush()
    await wait_for(lambda: psub.pending_msgs == 2)
    await publish(bus, range(3))
    msgs = await fetch(psub, 10, timeout=2)
    assert ids(msgs) == ["e0", "e1", "e2"]
    assert all(not m.headers or "Status" not in m.headers for m in msgs)
    assert psub.pending_msgs == 0 and psub.pending_bytes == 0
    await ack_all(msgs)


async def test_heartbeat_alone_is_a_fetch_timeout(bus: Bus, psub: PullSub) -> None:
    # Only a heartbeat answers (sent once the fetch waits): the server is alive but had nothing.
    waiting = asyncio.create_task(fetch(psub, 10, timeout=1))
    await wait_for(lambda: _waiting_requests(bus), timeout=5)
    await bus.nc.publish(psub._deliver, b"", headers={"Status": "100", "Description": "Idle Heartbeat"})
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(waiting, timeout=10)


async def test_nak_redelivers(bus: Bus, psub: PullSub) -> None:
    await publish(bus, range(3))
    first = await fetch(psub, 10, timeout=2)
    assert [m.metadata.num_delivered for m in first] == [1, 1, 1]
    for m in first:
        await m.nak()
    again = await fetch(psub, 10, timeout=5)
    assert ids(again) == ids(first)
    assert [m.metadata.num_delivered for m in again] == [2, 2, 2]
    await ack_all(again)
    await wait_for(lambda: _acked(bus))


async def _acked(bus: Bus) -> bool:
    info = await bus.consumer_info(STREAM_EXEC, DURABLE)
    return info.num_pending == 0 and info.num_ack_pending == 0


async def test_falls_back_to_nats_py_without_its_internals(bus: Bus, psub: PullSub) -> None:
    real = psub

    class OnlyFetch:
        """A pull subscription as another nats-py might shape it: `fetch`, nothing private."""

        def __init__(self, psub: PullSub) -> None:
            self.calls = 0
            self._psub = psub

        async def fetch(self, batch: int, **options: Any) -> list[Msg]:
            self.calls += 1
            return await self._psub.fetch(batch, **options)

    only = OnlyFetch(real)
    await publish(bus, range(4))
    msgs = await fetch(only, 10, timeout=2)  # type: ignore[arg-type]
    assert ids(msgs) == ["e0", "e1", "e2", "e3"] and only.calls == 1
    await ack_all(msgs)


async def test_drain_after_fetch_completes(bus: Bus, psub: PullSub) -> None:
    await publish(bus, range(3))
    msgs = await fetch(psub, 10, timeout=2)
    await ack_all(msgs)
    # Draining joins the inbox queue: every message taken must have been marked done.
    await asyncio.wait_for(psub._sub.drain(), timeout=5)
