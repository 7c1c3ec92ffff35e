"""Contact events on NATS: published after commits, and provider receipts consumed into contact events."""

from __future__ import annotations

from pathlib import Path

from shoal.bus import Bus
from shoal.v1 import events_pb2
from shoal.v1 import segment_pb2 as pb
from tests.helpers import wait_for
from tests.integration.test_segment_service import EMAIL, WS, create, start


async def test_contact_events_published(database_url: str, tmp_path: Path, bus: Bus) -> None:
    received: list[tuple[str, events_pb2.ContactEvent]] = []

    async def on_message(msg: object) -> None:
        event = events_pb2.ContactEvent()
        event.ParseFromString(msg.data)  # type: ignore[attr-defined]
        received.append((msg.subject, event))  # type: ignore[attr-defined]

    sub = await bus.nc.subscribe(bus.subject("shoal.events.contact.>"), cb=on_message)
    harness, channel = await start(database_url, tmp_path, bus=bus)
    try:
        contact = await create(harness, email="a@example.com")
        await harness.stub.UpdateContact(
            pb.UpdateContactRequest(
                workspace_id=WS, contact_id=contact.id, contact=pb.ContactInput(first_name="A")
            )
        )
        await harness.stub.AddTag(pb.AddTagRequest(workspace_id=WS, contact_id=contact.id, tag="vip"))
        await harness.stub.AddTag(pb.AddTagRequest(workspace_id=WS, contact_id=contact.id, tag="vip"))
        await harness.stub.RecordEvents(
            pb.RecordEventsRequest(
                workspace_id=WS, events=[pb.ContactEventInput(contact_id=contact.id, type="order.placed")]
            )
        )
        await wait_for(lambda: len(received) >= 4)
        kinds = [(subject.rsplit(".", 1)[-1], event.type) for subject, event in received]
        assert kinds == [
            ("created", "created"),
            ("updated", "updated"),
            ("tagged", "tagged"),
            ("custom", "order.placed"),
        ]
        assert all(e.workspace_id == WS and e.contact_id == contact.id and e.event_id for _, e in received)
        assert list(received[2][1].tags) == ["vip"]
    finally:
        await sub.unsubscribe()
        await channel.close()
        await harness.server.stop(0)


async def test_receipts_become_contact_events(database_url: str, tmp_path: Path, bus: Bus) -> None:
    harness, channel = await start(database_url, tmp_path, bus=bus)
    try:
        contact = await create(harness, email="a@example.com")
        opened = events_pb2.MessageReceipt(
            workspace_id=WS,
            provider="sandbox",
            send_key="exe_1:n_send",
            provider_message_id="pm_1",
            status=events_pb2.RECEIPT_STATUS_OPENED,
            contact_id=contact.id,
            channel=EMAIL,
        )
        opened.time.GetCurrentTime()
        # Published twice (a provider retry): recorded once.
        for _ in range(2):
            await bus.publish(bus.event_subject("message", "opened"), opened)
        bounced = events_pb2.MessageReceipt()
        bounced.CopyFrom(opened)
        bounced.status = events_pb2.RECEIPT_STATUS_BOUNCED
        await bus.publish(bus.event_subject("message", "bounced"), bounced)

        async def opened_at_node() -> bool:
            reply = await harness.stub.QueryEvents(
                pb.QueryEventsRequest(
                    workspace_id=WS,
                    queries=[pb.EventQuery(contact_id=contact.id, type="email.opened", node_id="n_send")],
                )
            )
            return reply.occurred[0]

        await wait_for(opened_at_node)

        async def bounced_status() -> bool:
            got = await harness.stub.GetContact(pb.GetContactRequest(workspace_id=WS, contact_id=contact.id))
            return got.contact.status == pb.CONTACT_STATUS_BOUNCED

        await wait_for(bounced_status)
        once = await harness.stub.EstimateAudience(
            pb.EstimateAudienceRequest(
                workspace_id=WS,
                filter=pb.Filter(event=pb.EventCondition(type="email.opened", min_count=1, max_count=1)),
            )
        )
        assert once.size == 1
    finally:
        await channel.close()
        await harness.server.stop(0)
