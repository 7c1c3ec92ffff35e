"""Outgoing webhooks end to end in one process: a real nats-server, the real gateway app (its
lifespan runs the dispatcher) and a real HTTP receiver on a socket of its own.

Events are real `events.proto` messages published on the bus the way the services publish them;
the receiver records every request (raw body and headers) and can be told to answer 500, or to
hold a request, per path. Retry delays are shortened through the schedule setting.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from google.protobuf import struct_pb2, timestamp_pb2
from google.protobuf.message import Message

from gateway.app import create_app
from gateway.config import GatewaySettings
from gateway.keys import MIGRATIONS, create_key
from gateway.webhooks import Dispatcher, store
from gateway.webhooks import dispatcher as dispatcher_module
from gateway.webhooks.dispatcher import DURABLE
from shoal.bus import STREAM_EVENTS, Bus
from shoal.db import Database
from shoal.http import QuietServer, bind
from shoal.v1 import campaign_pb2, common_pb2, events_pb2
from tests.helpers import wait_for
from tests.secrets_scan import watch

WS = "ws_hooks"
OTHER = "ws_other"
FAST = "0,0.2,0.2,0.2,0.2"


# -- the receiver ---------------------------------------------------------------------------------------


@dataclass
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """An ASGI app recording every request; `fail[path]` answers 500 that many times (-1: always),
    `hold[path]` keeps requests waiting until the event is set."""

    base: str = ""
    hits: list[Hit] = field(default_factory=list)
    fail: dict[str, int] = field(default_factory=dict)
    hold: dict[str, asyncio.Event] = field(default_factory=dict)

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    def on(self, path: str) -> list[Hit]:
        return [h for h in self.hits if h.path == path]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope["path"]
        self.hits.append(Hit(path, {k.decode().lower(): v.decode() for k, v in scope["headers"]}, body))
        if path in self.hold:
            await self.hold[path].wait()
        status = 200
        left = self.fail.get(path, 0)
        if left:
            status = 500
            if left > 0:
                self.fail[path] = left - 1
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]}
        )
        await send({"type": "http.response.body", "body": b"receiver says no" if status >= 400 else b"ok"})


@contextlib.asynccontextmanager
async def receiving() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    sock = bind("127.0.0.1", 0)
    receiver.base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = QuietServer(uvicorn.Config(receiver, log_config=None, lifespan="off", loop="asyncio"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await wait_for(lambda: server.started, timeout=10)
        yield receiver
    finally:
        for gate in receiver.hold.values():
            gate.set()
        server.should_exit = True
        await asyncio.wait_for(serving, timeout=10)
        sock.close()


# -- the gateway ------------------------------------------------------------------------------------------


@dataclass
class Gateway:
    app: Any
    client: httpx.AsyncClient

    @property
    def dispatcher(self) -> Dispatcher:
        dispatcher: Dispatcher = self.app.state.webhooks
        return dispatcher

    async def key(self, workspace: str = WS, *scopes: str) -> dict[str, str]:
        created = await self.app.state.auth.db.run(
            create_key, workspace_id=workspace, scopes=list(scopes or ("webhooks:write",))
        )
        return {"Authorization": f"Bearer {created.key}"}

    async def endpoint(self, url: str, events: list[str], workspace: str = WS) -> dict[str, Any]:
        reply = await self.client.post(
            "/v1/webhooks", json={"url": url, "events": events}, headers=await self.key(workspace)
        )
        assert reply.status_code == 201, reply.text
        body: dict[str, Any] = reply.json()
        watch(body["secret"])
        return body

    async def deliveries(self, endpoint: dict[str, Any], workspace: str = WS, **params: Any) -> list[Any]:
        reply = await self.client.get(
            f"/v1/webhooks/{endpoint['id']}/deliveries",
            params=params,
            headers=await self.key(workspace, "webhooks:read"),
        )
        assert reply.status_code == 200, reply.text
        items: list[Any] = reply.json()["items"]
        return items

    async def delivery(self, endpoint: dict[str, Any], delivery_id: str) -> dict[str, Any]:
        reply = await self.client.get(
            f"/v1/webhooks/{endpoint['id']}/deliveries/{delivery_id}",
            headers=await self.key(WS, "webhooks:read"),
        )
        assert reply.status_code == 200, reply.text
        body: dict[str, Any] = reply.json()
        return body


def settings(nats_url: str, namespace: str, data_dir: Path, **overrides: Any) -> GatewaySettings:
    return GatewaySettings.load(
        **{
            "nats_url": nats_url,
            "namespace": namespace,
            "data_dir": data_dir,
            "log_json": False,
            "webhook_retry_schedule": FAST,
            "webhook_poll_interval_seconds": 0.05,
            "webhook_request_timeout_seconds": 2.0,
            "webhook_lease_seconds": 5.0,
            **overrides,
        }
    )


@contextlib.asynccontextmanager
async def gateway(
    nats_url: str, namespace: str, data_dir: Path, *, consuming: bool = True, **overrides: Any
) -> AsyncIterator[Gateway]:
    app = create_app(settings(nats_url, namespace, data_dir, **overrides))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client,
    ):
        g = Gateway(app, client)
        if consuming:
            await wait_for(
                lambda: g.dispatcher.consuming, timeout=15, message="the event consumer never started"
            )
        yield g


# -- events as the services publish them ------------------------------------------------------------------


def _now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(datetime.now(UTC))
    return stamp


def state_changed(
    campaign_id: str, to: int, *, workspace: str = WS, frm: int = 0
) -> events_pb2.CampaignStateChanged:
    return events_pb2.CampaignStateChanged(
        workspace_id=workspace,
        campaign_id=campaign_id,
        run_id="run_1",
        from_state=frm or campaign_pb2.CAMPAIGN_STATE_RUNNING,
        to_state=to,
        actor="api_key:k1",
        reason="pause",
        time=_now(),
        providers=["sandbox"],
    )


def receipt(status: int, *, pmid: str = "msg_1", workspace: str = WS) -> events_pb2.MessageReceipt:
    return events_pb2.MessageReceipt(
        workspace_id=workspace,
        provider="sandbox",
        send_key="ex_1:s1",
        provider_message_id=pmid,
        status=status,
        contact_id="c_01HZX3K8Q2AAAAAAAAAA",
        campaign_id="cmp_1",
        run_id="run_1",
        node_id="s1",
        channel=common_pb2.CHANNEL_EMAIL,
        time=_now(),
    )


async def publish(bus: Bus, domain: str, kind: str, message: Message, msg_id: str | None = None) -> None:
    await bus.publish(bus.event_subject(domain, kind), message, msg_id=msg_id)


def signed_by(hit: Hit, secret: str) -> bool:
    expected = "sha256=" + hmac.new(secret.encode(), hit.body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, hit.headers.get("x-shoal-signature", ""))


def by_event(hits: list[Hit]) -> dict[str, Hit]:
    return {h.json()["event"]: h for h in hits}


# -- tests ------------------------------------------------------------------------------------------------


async def test_bus_events_arrive_signed_to_subscribers_of_their_workspace_only(
    nats_url: str, bus: Bus, tmp_path: Path
) -> None:
    async with receiving() as r, gateway(nats_url, bus.namespace, tmp_path) as g:
        wanted = [
            "campaign.paused",
            "message.delivered",
            "email.opened",
            "consent.updated",
            "billing.balance_low",
        ]
        mine = await g.endpoint(r.url("/mine"), wanted)
        everything = await g.endpoint(r.url("/disabled"), ["*"])
        off = await g.client.patch(
            f"/v1/webhooks/{everything['id']}", json={"enabled": False}, headers=await g.key()
        )
        assert (off.status_code, off.json()["enabled"]) == (200, False), off.text
        other = await g.endpoint(r.url("/other"), ["*"], workspace=OTHER)

        # The other workspace's event first: once ours have all arrived, it was handled too.
        await publish(
            bus,
            "billing",
            "balance_low",
            events_pb2.BalanceEvent(workspace_id=OTHER, free_cents=400, threshold_cents=500, time=_now()),
        )
        cid = "3f2b9c1e-8d4a-4c1b-9f5e-2a7d6c0b1e94"
        await publish(
            bus, "campaign", "state_changed", state_changed(cid, campaign_pb2.CAMPAIGN_STATE_PAUSED)
        )
        # RUNNING is not subscribed: nothing for it.
        await publish(
            bus,
            "campaign",
            "state_changed",
            state_changed(cid, campaign_pb2.CAMPAIGN_STATE_RUNNING, frm=campaign_pb2.CAMPAIGN_STATE_PAUSED),
        )
        await publish(bus, "message", "delivered", receipt(events_pb2.RECEIPT_STATUS_DELIVERED))
        await publish(bus, "message", "opened", receipt(events_pb2.RECEIPT_STATUS_OPENED))
        consent = events_pb2.ContactEvent(
            workspace_id=WS,
            contact_id="c_01HZX3K8Q2AAAAAAAAAA",
            type="consent_updated",
            event_id="evt_c1",
            time=_now(),
        )
        consent.properties.CopyFrom(
            struct_pb2.Struct(
                fields={
                    "channel": struct_pb2.Value(string_value="EMAIL"),
                    "message_type": struct_pb2.Value(string_value="NEWSLETTER"),
                    "status": struct_pb2.Value(string_value="GRANTED"),
                    "source": struct_pb2.Value(string_value="signup form"),
                }
            )
        )
        await publish(bus, "contact", "consent_updated", consent)
        await publish(
            bus,
            "billing",
            "balance_low",
            events_pb2.BalanceEvent(workspace_id=WS, free_cents=900, threshold_cents=1000, time=_now()),
        )

        await wait_for(lambda: len(r.on("/mine")) >= 5, timeout=15, message=lambda: str(r.hits))
        got = by_event(r.on("/mine"))
        assert sorted(got) == sorted(wanted), got.keys()
        for hit in got.values():
            assert signed_by(hit, mine["secret"]), hit.headers
            envelope = hit.json()
            assert set(envelope) == {"id", "event", "timestamp", "data"}
            assert envelope["id"].startswith("evt_")
            assert datetime.fromisoformat(envelope["timestamp"]).tzinfo is not None
            assert hit.headers["content-type"] == "application/json"
            assert hit.headers["x-shoal-event"] == envelope["event"]
            assert hit.headers["x-shoal-delivery"].startswith("whd_")
        assert got["campaign.paused"].json()["data"] == {
            "campaign_id": cid,
            "run_id": "run_1",
            "from_state": "RUNNING",
            "to_state": "PAUSED",
            "actor": "api_key:k1",
            "reason": "pause",
        }
        assert got["message.delivered"].json()["data"] == {
            "message_id": "msg_1",
            "channel": "EMAIL",
            "contact_id": "c_01HZX3K8Q2AAAAAAAAAA",
            "campaign_id": "cmp_1",
            "run_id": "run_1",
            "node_id": "s1",
            "provider": "sandbox",
            "error": None,
        }
        assert got["email.opened"].json()["data"]["message_id"] == "msg_1"
        assert got["consent.updated"].json()["data"] == {
            "contact_id": "c_01HZX3K8Q2AAAAAAAAAA",
            "channel": "EMAIL",
            "message_type": "NEWSLETTER",
            "status": "GRANTED",
            "source": "signup form",
        }
        assert got["billing.balance_low"].json()["data"] == {"free_cents": 900, "threshold_cents": 1000}
        # A signature made with another secret does not verify.
        assert not signed_by(got["campaign.paused"], "whsec_not-the-secret")

        # The other workspace's endpoint got its own event only; the disabled one nothing at all.
        await wait_for(lambda: len(r.on("/other")) == 1, message=lambda: str(r.hits))
        assert r.on("/other")[0].json()["data"] == {"free_cents": 400, "threshold_cents": 500}
        assert signed_by(r.on("/other")[0], other["secret"])
        assert r.on("/disabled") == []
        assert await g.deliveries(everything) == []
        assert len(r.on("/mine")) == 5
        listed = await g.deliveries(mine, state="delivered")
        assert sorted(d["event"] for d in listed) == sorted(wanted)
        assert all(d["attempts"] == 1 and d["last_status_code"] == 200 for d in listed)


async def test_a_receiver_failing_twice_gets_three_attempts_and_one_success(
    nats_url: str, bus: Bus, tmp_path: Path
) -> None:
    async with receiving() as r, gateway(nats_url, bus.namespace, tmp_path) as g:
        r.fail["/flaky"] = 2
        ep = await g.endpoint(r.url("/flaky"), ["campaign.completed"])
        cid = "0b8f3c2a-1111-4c1b-9f5e-2a7d6c0b1e94"
        await publish(
            bus, "campaign", "state_changed", state_changed(cid, campaign_pb2.CAMPAIGN_STATE_COMPLETED)
        )

        async def delivered() -> list[Any]:
            return await g.deliveries(ep, state="delivered")

        (d,) = await wait_for(delivered, timeout=15)
        assert (d["attempts"], d["last_status_code"], d["last_error"], d["next_attempt_at"]) == (
            3,
            200,
            None,
            None,
        )
        assert d["event"] == "campaign.completed" and d["delivered_at"] is not None
        hits = r.on("/flaky")
        assert len(hits) == 3
        assert len({h.body for h in hits}) == 1, "every attempt sends the same body"
        assert all(signed_by(h, ep["secret"]) for h in hits)
        detail = await g.delivery(ep, d["id"])
        assert [(a["number"], a["status_code"], a["succeeded"]) for a in detail["attempt_log"]] == [
            (1, 500, False),
            (2, 500, False),
            (3, 200, True),
        ]
        assert detail["attempt_log"][0]["error"] == "HTTP 500: receiver says no"
        assert detail["payload"] == hits[0].json()
        assert detail["payload"]["id"] == d["event_id"]


async def test_a_receiver_always_failing_ends_failed_after_five_attempts_and_replay_delivers(
    nats_url: str, bus: Bus, tmp_path: Path
) -> None:
    async with receiving() as r, gateway(nats_url, bus.namespace, tmp_path) as g:
        r.fail["/down"] = -1
        ep = await g.endpoint(r.url("/down"), ["message.failed"])
        await publish(bus, "message", "failed", receipt(events_pb2.RECEIPT_STATUS_FAILED, pmid="msg_f"))

        async def failed() -> list[Any]:
            return await g.deliveries(ep, state="failed")

        (d,) = await wait_for(failed, timeout=15)
        assert (d["attempts"], d["last_status_code"], d["next_attempt_at"]) == (5, 500, None)
        assert len(r.on("/down")) == 5
        assert await g.deliveries(ep, state="pending") == []

        # The receiver recovers; a replay is a fresh round, delivered at the first attempt.
        r.fail["/down"] = 0
        gate = r.hold["/down"] = asyncio.Event()
        headers = await g.key()
        replay = await g.client.post(f"/v1/webhooks/{ep['id']}/deliveries/{d['id']}/replay", headers=headers)
        assert replay.status_code == 202, replay.text
        assert (replay.json()["state"], replay.json()["replays"]) == ("pending", 1)
        # While the attempt is in flight the delivery is still pending: replaying it again is 409.
        await wait_for(lambda: len(r.on("/down")) == 6)
        again = await g.client.post(f"/v1/webhooks/{ep['id']}/deliveries/{d['id']}/replay", headers=headers)
        assert (again.status_code, again.json()["error"]) == (409, "wrong_state"), again.text
        gate.set()

        async def delivered() -> list[Any]:
            return await g.deliveries(ep, state="delivered")

        (done,) = await wait_for(delivered, timeout=15)
        assert (done["id"], done["attempts"], done["replays"]) == (d["id"], 6, 1)
        assert len(r.on("/down")) == 6
        assert len({h.json()["id"] for h in r.on("/down")}) == 1, "a replay sends the same event id"
        detail = await g.delivery(ep, d["id"])
        assert [(a["number"], a["replay"], a["succeeded"]) for a in detail["attempt_log"]] == [
            (1, 0, False),
            (2, 0, False),
            (3, 0, False),
            (4, 0, False),
            (5, 0, False),
            (6, 1, True),
        ]


async def test_the_same_event_published_twice_is_delivered_once(
    nats_url: str, bus: Bus, tmp_path: Path
) -> None:
    async with receiving() as r, gateway(nats_url, bus.namespace, tmp_path) as g:
        ep = await g.endpoint(r.url("/once"), ["campaign.paused", "campaign.completed"])
        cid = "0b8f3c2a-2222-4c1b-9f5e-2a7d6c0b1e94"
        event = state_changed(cid, campaign_pb2.CAMPAIGN_STATE_PAUSED)
        # Two stream messages (different Nats-Msg-Id, so JetStream keeps both) of one event.
        await publish(bus, "campaign", "state_changed", event, msg_id="copy-1")
        await publish(bus, "campaign", "state_changed", event, msg_id="copy-2")
        marker = state_changed(
            cid, campaign_pb2.CAMPAIGN_STATE_COMPLETED, frm=campaign_pb2.CAMPAIGN_STATE_PAUSED
        )
        await publish(bus, "campaign", "state_changed", marker, msg_id="marker")
        await wait_for(lambda: "campaign.completed" in by_event(r.on("/once")), timeout=15)
        listed = await g.deliveries(ep)
        assert sorted(d["event"] for d in listed) == ["campaign.completed", "campaign.paused"]
        assert [h.json()["event"] for h in r.on("/once")].count("campaign.paused") == 1
        info = await bus.stream_info("EVENTS")
        assert info.state.messages == 3


async def test_pending_deliveries_and_unread_events_survive_a_gateway_restart(
    nats_url: str, bus: Bus, tmp_path: Path
) -> None:
    async with receiving() as r:
        r.fail["/later"] = 1
        # A long wait before the second attempt: it is due only after the restart.
        slow = {"webhook_retry_schedule": "0,1.5,0.2,0.2,0.2"}
        async with gateway(nats_url, bus.namespace, tmp_path, **slow) as g:
            ep = await g.endpoint(r.url("/later"), ["campaign.paused", "campaign.archived"])
            await publish(
                bus,
                "campaign",
                "state_changed",
                state_changed("c-restart", campaign_pb2.CAMPAIGN_STATE_PAUSED),
            )

            async def first_failed() -> bool:
                items = await g.deliveries(ep, state="pending")
                return bool(items) and items[0]["attempts"] == 1

            await wait_for(first_failed, timeout=15)
        # Published while no gateway runs: the durable consumer keeps it for the next one.
        await publish(
            bus, "campaign", "state_changed", state_changed("c-restart", campaign_pb2.CAMPAIGN_STATE_ARCHIVED)
        )
        assert len(r.on("/later")) == 1
        async with gateway(nats_url, bus.namespace, tmp_path, **slow) as g:

            async def both_delivered() -> list[Any]:
                items = await g.deliveries(ep, state="delivered")
                return items if len(items) == 2 else []

            items = await wait_for(both_delivered, timeout=15)
            by_name = {d["event"]: d for d in items}
            assert by_name["campaign.paused"]["attempts"] == 2
            assert by_name["campaign.archived"]["attempts"] == 1
            assert sorted(h.json()["event"] for h in r.on("/later")) == [
                "campaign.archived",
                "campaign.paused",
                "campaign.paused",
            ]


async def test_replicas_sharing_a_database_post_each_delivery_once(
    nats_url: str, bus: Bus, tmp_path: Path, database_url: str
) -> None:
    """Two gateways, one database (SQLite, and PostgreSQL when configured): the lease gives each
    due delivery to one of them."""
    replicas = 2
    async with receiving() as r, contextlib.AsyncExitStack() as stack:
        gws = [
            await stack.enter_async_context(
                gateway(
                    nats_url,
                    bus.namespace,
                    tmp_path / f"g{i}",
                    database_url=database_url,
                    webhook_max_concurrency=4,
                )
            )
            for i in range(replicas)
        ]
        r.fail["/shared"] = 5  # a few retries too, so attempts are claimed again and again
        ep = await gws[0].endpoint(r.url("/shared"), ["*"])
        headers = await gws[0].key()
        made = []
        for i in range(20):
            reply = await gws[i % replicas].client.post(f"/v1/webhooks/{ep['id']}/test", headers=headers)
            assert reply.status_code == 202, reply.text
            made.append(reply.json()["id"])
        for i in range(10):
            await publish(
                bus, "message", "delivered", receipt(events_pb2.RECEIPT_STATUS_DELIVERED, pmid=f"msg_{i}")
            )

        async def all_delivered() -> bool:
            items = await gws[1].deliveries(ep, state="delivered", limit=500)
            return len(items) == 30

        await wait_for(all_delivered, timeout=30, message=lambda: f"{len(r.hits)} hits")
        items = await gws[0].deliveries(ep, limit=500)
        assert {d["state"] for d in items} == {"delivered"}
        assert set(made) <= {d["id"] for d in items}
        # Each POST is one recorded attempt: no delivery was POSTed by two replicas at once.
        assert sum(d["attempts"] for d in items) == len(r.on("/shared")) == 30 + 5
        successes = [h.headers["x-shoal-delivery"] for h in r.on("/shared")][5:]
        assert len(successes) == len(set(successes)) == 30


async def test_the_api_starts_and_sends_tests_while_nats_is_down(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"nats://127.0.0.1:{sock.getsockname()[1]}"
    async with receiving() as r, gateway(closed, "", tmp_path, consuming=False, webhook_dispatch=True) as g:
        assert not g.dispatcher.consuming
        ep = await g.endpoint(r.url("/test"), ["campaign.paused"])
        reply = await g.client.post(f"/v1/webhooks/{ep['id']}/test", headers=await g.key())
        assert reply.status_code == 202, reply.text
        sent = reply.json()
        assert (sent["event"], sent["state"], sent["attempts"]) == ("webhook.test", "pending", 0)
        await wait_for(lambda: len(r.on("/test")) == 1)
        hit = r.on("/test")[0]
        assert signed_by(hit, ep["secret"])
        assert hit.json()["event"] == "webhook.test"
        assert hit.json()["data"] == {
            "endpoint_id": ep["id"],
            "message": "a test event sent from the Shoal API",
        }
        assert hit.headers["x-shoal-delivery"] == sent["id"]


async def test_an_expired_lease_fences_its_late_holder(database_url: str) -> None:
    """Process A claims a delivery and stalls past its lease; B claims it again. A's late result
    writes nothing, B's is kept: one attempt recorded, not two."""
    db = Database(database_url, migrations_dir=MIGRATIONS)
    try:
        await db.call(db.migrate)
        now = datetime.now(UTC)
        endpoint = await db.run(
            store.create_endpoint,
            workspace_id=WS,
            url="https://hooks.example.com/x",
            events=["*"],
            description="",
            now=now - timedelta(minutes=1),
        )
        made = await db.run(store.enqueue_test, endpoint=endpoint, now=now)
        (a,) = await db.run(store.claim, limit=10, lease=timedelta(seconds=30), now=now)
        # Still leased: nobody else gets it.
        assert (
            await db.run(store.claim, limit=10, lease=timedelta(seconds=30), now=now + timedelta(seconds=29))
            == []
        )
        (b,) = await db.run(
            store.claim, limit=10, lease=timedelta(seconds=30), now=now + timedelta(seconds=31)
        )
        assert a.id == b.id == made.id and a.token != b.token
        ok = store.AttemptResult(started_at=now, duration_ms=5, status_code=200, error="")
        later = now + timedelta(seconds=32)
        assert await db.run(store.record, claimed=a, result=ok, delays=[0, 1], now=later) is None
        assert await db.run(store.record, claimed=b, result=ok, delays=[0, 1], now=later) == "delivered"
        found = await db.run(
            store.get_delivery, workspace_id=WS, endpoint_id=endpoint.id, delivery_id=made.id
        )
        assert found is not None
        row, attempts = found
        assert (row.state, row.attempts, len(attempts)) == ("delivered", 1, 1)
        # Another workspace sees neither the endpoint nor the delivery.
        assert await db.run(store.get_endpoint, workspace_id=OTHER, endpoint_id=endpoint.id) is None
        assert (
            await db.run(store.get_delivery, workspace_id=OTHER, endpoint_id=endpoint.id, delivery_id=made.id)
            is None
        )
    finally:
        await db.close()


async def drained(bus: Bus) -> bool:
    """Whether the dispatcher's consumer has read and acked everything published so far."""
    info = await bus.consumer_info(STREAM_EVENTS, DURABLE)
    return info.num_pending == 0 and info.num_ack_pending == 0


async def test_subscriptions_are_cached_and_local_endpoint_changes_are_seen_at_once(
    nats_url: str, bus: Bus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches nobody subscribes to are acked from a cached answer; an endpoint created through
    this gateway is served from its next event on, one created through another replica once the
    cache expires (the staleness bound of design.md)."""
    loads: list[int] = []
    real_load = dispatcher_module.load_subscriptions

    def counting_load(session: Any) -> dispatcher_module.Subscriptions:
        found = real_load(session)
        loads.append(len(found))
        return found

    monkeypatch.setattr(dispatcher_module, "load_subscriptions", counting_load)
    async with receiving() as r, gateway(nats_url, bus.namespace, tmp_path) as g:
        g.dispatcher.subscriptions_ttl = 3600.0  # in this test only endpoint changes refresh the cache
        for i in range(3):
            await publish(
                bus, "message", "delivered", receipt(events_pb2.RECEIPT_STATUS_DELIVERED, pmid=f"m{i}")
            )
            await wait_for(lambda: drained(bus), message="events not consumed")
        assert loads == [0], "one read of the endpoints, then the cached 'nobody' answers"

        # Created through this gateway: the very next event reaches it.
        local = await g.endpoint(r.url("/local"), ["message.delivered"])
        await publish(
            bus, "message", "delivered", receipt(events_pb2.RECEIPT_STATUS_DELIVERED, pmid="m_local")
        )
        await wait_for(lambda: len(r.on("/local")) == 1, message="the local endpoint got nothing")
        assert r.on("/local")[0].json()["data"]["message_id"] == "m_local"
        assert loads == [0, 1]

        # Created through another replica (straight into the shared database): not seen while
        # the cached answer is fresh...
        remote = await g.dispatcher.db.run(
            store.create_endpoint,
            workspace_id=OTHER,
            url=r.url("/remote"),
            events=["*"],
            description="",
            now=datetime.now(UTC) - timedelta(minutes=1),
        )
        other = receipt(events_pb2.RECEIPT_STATUS_DELIVERED, pmid="m_stale", workspace=OTHER)
        await publish(bus, "message", "delivered", other)
        await wait_for(lambda: drained(bus), message="events not consumed")
        assert (
            await g.dispatcher.db.run(
                store.list_deliveries,
                workspace_id=OTHER,
                endpoint_id=remote.id,
                state=None,
                before=None,
                limit=10,
            )
            == []
        )
        # ...and served once it expires.
        g.dispatcher.subscriptions_ttl = 0.0
        fresh = receipt(events_pb2.RECEIPT_STATUS_DELIVERED, pmid="m_fresh", workspace=OTHER)
        await publish(bus, "message", "delivered", fresh)
        await wait_for(lambda: len(r.on("/remote")) == 1, message="the remote endpoint got nothing")
        assert r.on("/remote")[0].json()["data"]["message_id"] == "m_fresh"
        assert [h.json()["data"]["message_id"] for h in r.on("/local")] == ["m_local"]
        assert local["id"] != remote.id
