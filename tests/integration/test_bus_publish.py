"""`Bus.publish_many` against a real nats-server: the window, PubAck errors and the timeout."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats.js.errors
import pytest
from nats.js.api import DiscardPolicy

from shoal.bus import STREAM_EXEC, Bus, Outgoing, PublishError
from shoal.natsserver import NatsServer
from shoal.v1.events_pb2 import StepMessage
from tests.helpers import wait_for


def step(i: int) -> StepMessage:
    return StepMessage(workspace_id="ws1", campaign_id="c1", run_id="r1", execution_id=f"e{i}", step_seq=1)


async def test_a_small_window_still_publishes_all_in_order(bus: Bus) -> None:
    items = [Outgoing(bus.step_subject("c1"), step(i), msg_id=f"e{i}:1") for i in range(50)]
    acks = await bus.publish_many(items, window=3)
    assert [a.seq for a in acks] == list(range(1, 51))
    assert not any(a.duplicate for a in acks)
    info = await bus.stream_info(STREAM_EXEC)
    assert info.state.messages == 50


async def test_unstored_messages_raise_publish_error_naming_them(bus: Bus) -> None:
    items = [Outgoing(bus.step_subject("c1"), step(i), msg_id=f"e{i}:1") for i in range(6)]
    # No stream takes this subject: the server answers "no responders" for those two.
    items[2] = Outgoing("shoal.nowhere.a", step(2))
    items[4] = Outgoing("shoal.nowhere.b", step(4))
    with pytest.raises(PublishError) as caught:
        await bus.publish_many(items)
    assert [i for i, _ in caught.value.failures] == [2, 4]
    assert "2 of 6 publishes failed" in str(caught.value)
    # The others were stored (re-publishing all is safe: their msg ids de-duplicate).
    info = await bus.stream_info(STREAM_EXEC)
    assert info.state.messages == 4
    again = await bus.publish_many([it for i, it in enumerate(items) if i not in (2, 4)])
    assert all(a.duplicate for a in again)


async def test_no_reply_within_the_timeout_raises_and_frees_the_reply_map(bus: Bus) -> None:
    # A plain subscriber takes the subject and never replies: no PubAck will ever come.
    silent = await bus.nc.subscribe(bus.subject("shoal.silent.x"))
    try:
        items = [Outgoing("shoal.silent.x", step(i)) for i in range(5)]
        with pytest.raises(TimeoutError):
            await bus.publish_many(items, timeout=0.3)
        # The given-up publishes left the map at once: nothing waits for their replies any more.
        assert bus._acks.waiting == {}
        # A reply that comes after all is dropped, not credited to anyone.
        requests = [await silent.next_msg(timeout=1) for _ in items]
        for request in requests:
            await bus.nc.publish(request.reply, b'{"stream": "X", "seq": 1}')
        await bus.nc.flush()
        assert bus._acks.waiting == {}
        # And the bus still publishes.
        acks = await bus.publish_many([Outgoing(bus.step_subject("c1"), step(9), msg_id="e9:1")])
        assert [a.seq for a in acks] == [1]
    finally:
        await silent.unsubscribe()


async def test_a_cancelled_publish_frees_the_reply_map(bus: Bus) -> None:
    silent = await bus.nc.subscribe(bus.subject("shoal.silent.y"))
    try:
        items = [Outgoing("shoal.silent.y", step(i)) for i in range(5)]
        task = asyncio.create_task(bus.publish_many(items, timeout=30))
        await wait_for(lambda: len(bus._acks.waiting) == 5, timeout=5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert bus._acks.waiting == {}
    finally:
        await silent.unsubscribe()


async def test_an_error_reply_raises_publish_error_naming_the_item(bus: Bus) -> None:
    # A stream that refuses new messages once it holds two: the server answers an API error.
    await bus.js.add_stream(
        name=bus.stream_name("LIMITED"),
        subjects=[bus.subject("shoal.limited.>")],
        max_msgs=2,
        discard=DiscardPolicy.NEW,
    )
    items = [Outgoing("shoal.limited.a", step(i), msg_id=f"l{i}") for i in range(4)]
    with pytest.raises(PublishError) as caught:
        await bus.publish_many(items, window=1)
    assert [i for i, _ in caught.value.failures] == [2, 3]
    assert all(isinstance(e, nats.js.errors.APIError) for _, e in caught.value.failures)
    message = str(caught.value)
    assert f"2 of 4 publishes failed; first (item 2, subject {bus.subject('shoal.limited.a')})" in message
    assert "maximum messages exceeded" in message
    assert bus._acks.waiting == {}


async def test_duplicates_are_flagged_and_keep_the_first_sequence(bus: Bus) -> None:
    subject = bus.step_subject("c1")
    first = await bus.publish_many([Outgoing(subject, step(i), msg_id=f"e{i}:1") for i in range(3)])
    assert [(a.seq, bool(a.duplicate)) for a in first] == [(1, False), (2, False), (3, False)]
    mixed = [Outgoing(subject, step(i), msg_id=f"e{i}:1") for i in (3, 1, 4)]
    again = await bus.publish_many(mixed)
    assert [(a.seq, bool(a.duplicate)) for a in again] == [(4, False), (2, True), (5, False)]
    assert all(a.stream == bus.stream_name(STREAM_EXEC) for a in again)
    info = await bus.stream_info(STREAM_EXEC)
    assert info.state.messages == 5


async def test_no_stream_for_the_subject_is_a_clear_error(bus: Bus) -> None:
    with pytest.raises(PublishError) as caught:
        await bus.publish_many([Outgoing("shoal.nowhere.z", step(0))])
    [(index, error)] = caught.value.failures
    assert index == 0
    assert isinstance(error, nats.js.errors.NoStreamResponseError)
    assert str(caught.value) == (
        f"1 of 1 publishes failed; first (item 0, subject {bus.subject('shoal.nowhere.z')}): "
        f"no stream takes subject {bus.subject('shoal.nowhere.z')}"
    )


async def test_concurrent_calls_share_the_reply_inbox_and_get_their_own_acks(bus: Bus) -> None:
    subject = bus.step_subject("c1")
    calls = [
        [Outgoing(subject, step(c * 100 + i), msg_id=f"e{c * 100 + i}:1") for i in range(40)]
        for c in range(3)
    ]
    results = await asyncio.gather(*(bus.publish_many(items, window=7) for items in calls))
    seqs = [[a.seq for a in acks] for acks in results]
    for call in seqs:
        assert call == sorted(call)  # one subject, in order within a call
    assert sorted(s for call in seqs for s in call) == list(range(1, 121))
    # Each ack is its own message's: fetch them back and match the execution ids by sequence.
    stored = {}
    for seq in (seqs[0][0], seqs[1][5], seqs[2][39]):
        raw = await bus.js.get_msg(bus.stream_name(STREAM_EXEC), seq)
        stored[seq] = StepMessage.FromString(raw.data or b"").execution_id
    assert stored == {seqs[0][0]: "e0", seqs[1][5]: "e105", seqs[2][39]: "e239"}
    assert bus._acks.waiting == {}


async def test_a_reply_lost_to_a_server_restart_times_out_then_the_bus_publishes_again(
    tmp_path: Path,
) -> None:
    server = NatsServer(store_dir=tmp_path / "store")
    server.start()
    try:
        bus = await Bus.connect(server.url, name="test-restart", namespace="r1", reconnect_wait=0.1)
        await bus.ensure_streams()
        subject = bus.step_subject("c1")
        await bus.publish_many([Outgoing(subject, step(0), msg_id="e0:1")])
        # The server goes away with publishes in flight: their replies never come.
        await asyncio.to_thread(server.stop)
        with pytest.raises(TimeoutError):
            await bus.publish_many(
                [Outgoing(subject, step(i), msg_id=f"e{i}:1") for i in range(1, 4)], timeout=0.5
            )
        assert bus._acks.waiting == {}
        await asyncio.to_thread(server.restart)
        await wait_for(lambda: bus.nc.is_connected, timeout=10)
        # The reply inbox subscription came back with the connection; re-publishing is safe.
        acks = await bus.publish_many(
            [Outgoing(subject, step(i), msg_id=f"e{i}:1") for i in range(4)], timeout=10
        )
        assert acks[0].seq == 1 and acks[0].duplicate
        info = await bus.stream_info(STREAM_EXEC)
        assert info.state.messages == 4
        await bus.close()
    finally:
        server.stop()
