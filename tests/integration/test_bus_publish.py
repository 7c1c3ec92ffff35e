"""`Bus.publish_many` against a real nats-server: the window, PubAck errors and the timeout."""

from __future__ import annotations

import pytest

from shoal.bus import STREAM_EXEC, Bus, Outgoing, PublishError
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


async def test_no_reply_within_the_timeout_raises_and_frees_nats_py_slots(bus: Bus) -> None:
    # A plain subscriber takes the subject and never replies: no PubAck will ever come.
    silent = await bus.nc.subscribe(bus.subject("shoal.silent.x"))
    try:
        items = [Outgoing("shoal.silent.x", step(i)) for i in range(5)]
        with pytest.raises(TimeoutError):
            await bus.publish_many(items, timeout=0.3)
        # The given-up futures are cancelled, so nats-py's pending publish count is back to 0.
        # (their callbacks run from the loop, hence the bounded poll).
        await wait_for(lambda: bus.js.publish_async_pending() == 0, timeout=2)
    finally:
        await silent.unsubscribe()
