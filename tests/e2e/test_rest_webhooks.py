"""`/v1/webhooks` over the real mesh: endpoint CRUD with the secret shown once, the test event,
validation and scope errors, and real campaign and receipt events reaching a real receiver.

The receiver is `tests.integration.test_webhooks`'s: an HTTP server on a socket of its own that
records raw bodies and headers, so signatures are verified over the bytes that travelled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shoal.v1 import common_pb2
from shoal.v1 import segment_pb2 as spb
from tests.e2e.rest import rest_mesh
from tests.e2e.test_rest_campaigns import campaign
from tests.e2e.test_thin_run import seed
from tests.helpers import wait_for
from tests.integration.test_webhooks import by_event, receiving, signed_by
from tests.secrets_scan import watch

UNKNOWN = "wh_00000000000000000000"


async def test_webhook_endpoints_crud_test_event_and_errors(nats_url: str, tmp_path: Path) -> None:
    async with (
        receiving() as r,
        rest_mesh(nats_url, tmp_path, webhook_poll_interval_seconds=0.1) as (m, rest),
    ):
        ws = m.workspace_id
        c = rest.client
        write = await rest.key(ws, "webhooks:write")
        read = await rest.key(ws, "webhooks:read")

        # Create: 201 with the secret, shown this once.
        made = await c.post(
            "/v1/webhooks",
            json={
                "url": r.url("/crud"),
                "events": ["campaign.paused", "campaign.paused"],
                "description": "ops",
            },
            headers=write,
        )
        assert made.status_code == 201, made.text
        ep = made.json()
        secret = watch(ep.pop("secret"))
        assert secret.startswith("whsec_") and len(secret) > 30
        assert ep["id"].startswith("wh_")
        assert (ep["url"], ep["events"], ep["description"], ep["enabled"]) == (
            r.url("/crud"),
            ["campaign.paused"],
            "ops",
            True,
        )
        path = f"/v1/webhooks/{ep['id']}"

        # Read: the same endpoint, never the secret; a write key may read too.
        got = await c.get(path, headers=read)
        assert (got.status_code, got.json()) == (200, ep)
        listed = await c.get("/v1/webhooks", headers=write)
        assert listed.status_code == 200, listed.text
        assert listed.json() == {"items": [ep], "next_cursor": None}
        assert secret not in listed.text and secret not in got.text

        # Pages: oldest first, the cursor leads to the rest.
        second = await c.post(
            "/v1/webhooks", json={"url": "https://hooks.example.com/b", "events": ["*"]}, headers=write
        )
        assert second.status_code == 201, second.text
        watch(second.json()["secret"])
        page = (await c.get("/v1/webhooks", params={"limit": 1}, headers=read)).json()
        assert [e["id"] for e in page["items"]] == [ep["id"]] and page["next_cursor"]
        rest_page = (
            await c.get("/v1/webhooks", params={"limit": 1, "cursor": page["next_cursor"]}, headers=read)
        ).json()
        assert [e["id"] for e in rest_page["items"]] == [second.json()["id"]]
        assert rest_page["next_cursor"] is None

        # The catalogue.
        types = await c.get("/v1/webhooks/event-types", headers=read)
        names = {t["name"] for t in types.json()["items"]}
        assert {"message.delivered", "message.failed", "email.opened", "email.clicked"} <= names
        assert {"consent.updated", "billing.balance_low", "campaign.paused", "campaign.completed"} <= names

        # Update: partial.
        patched = await c.patch(path, json={"events": ["*"], "description": "all"}, headers=write)
        assert patched.status_code == 200, patched.text
        assert (patched.json()["events"], patched.json()["description"], patched.json()["url"]) == (
            ["*"],
            "all",
            r.url("/crud"),
        )

        # Rotate: a new secret, once; the test event is signed with it.
        rotated = await c.post(f"{path}/rotate-secret", headers=write)
        assert rotated.status_code == 200, rotated.text
        new_secret = watch(rotated.json()["secret"])
        assert new_secret != secret
        sent = await c.post(f"{path}/test", headers=write)
        assert sent.status_code == 202, sent.text
        delivery = sent.json()
        assert (delivery["event"], delivery["endpoint_id"]) == ("webhook.test", ep["id"])
        await wait_for(lambda: len(r.on("/crud")) == 1, timeout=10)
        hit = r.on("/crud")[0]
        assert signed_by(hit, new_secret) and not signed_by(hit, secret)
        assert hit.json()["event"] == "webhook.test"
        assert hit.json()["id"] == delivery["event_id"]

        async def delivered() -> Any:
            reply = await c.get(f"{path}/deliveries/{delivery['id']}", headers=read)
            return reply.json() if reply.json()["state"] == "delivered" else None

        detail = await wait_for(delivered, timeout=10)
        assert detail["attempts"] == 1 and detail["attempt_log"][0]["status_code"] == 200
        assert detail["payload"] == hit.json()
        only = await c.get(f"{path}/deliveries", params={"state": "delivered"}, headers=read)
        assert [d["id"] for d in only.json()["items"]] == [delivery["id"]]
        assert (await c.get(f"{path}/deliveries", params={"state": "failed"}, headers=read)).json()[
            "items"
        ] == []

        # 400: a bad URL, an unknown event, a null in a PATCH, a malformed id, a bad cursor, extra fields.
        for url in (
            "ftp://hooks.example.com/x",
            "http://hooks.example.com/x",
            "not a url",
            "https://u:p@h.example/",
        ):
            bad = await c.post("/v1/webhooks", json={"url": url, "events": ["*"]}, headers=write)
            assert (bad.status_code, bad.json()["details"][0]["field"]) == (400, "url"), (url, bad.text)
        bad = await c.post(
            "/v1/webhooks", json={"url": "https://h.example/", "events": ["campaign.exploded"]}, headers=write
        )
        assert (bad.status_code, bad.json()["details"][0]["field"]) == (400, "events.0"), bad.text
        bad = await c.post("/v1/webhooks", json={"url": "https://h.example/", "events": []}, headers=write)
        assert (bad.status_code, bad.json()["details"][0]["field"]) == (400, "events"), bad.text
        bad = await c.post(
            "/v1/webhooks", json={"url": "https://h.example/", "events": ["*"], "x": 1}, headers=write
        )
        assert bad.status_code == 400, bad.text
        bad = await c.patch(path, json={"url": None}, headers=write)
        assert (bad.status_code, bad.json()["details"][0]["field"]) == (400, "url"), bad.text
        bad = await c.patch(path, json={"url": "http://hooks.example.com/"}, headers=write)
        assert (bad.status_code, bad.json()["details"][0]["field"]) == (400, "url"), bad.text
        assert (await c.get("/v1/webhooks/nope", headers=read)).status_code == 400
        bad = await c.get("/v1/webhooks", params={"cursor": "garbage"}, headers=read)
        assert (bad.status_code, bad.json()["details"][0]["field"]) == (400, "cursor"), bad.text
        bad = await c.get(f"{path}/deliveries", params={"state": "lost"}, headers=read)
        assert (bad.status_code, bad.json()["details"][0]["field"]) == (400, "state"), bad.text

        # 404: unknown here, or another workspace's.
        for method, url in (
            ("GET", f"/v1/webhooks/{UNKNOWN}"),
            ("PATCH", f"/v1/webhooks/{UNKNOWN}"),
            ("DELETE", f"/v1/webhooks/{UNKNOWN}"),
            ("POST", f"/v1/webhooks/{UNKNOWN}/test"),
            ("POST", f"/v1/webhooks/{UNKNOWN}/rotate-secret"),
            ("GET", f"/v1/webhooks/{UNKNOWN}/deliveries"),
            ("GET", f"{path}/deliveries/whd_00000000000000000000"),
            ("POST", f"{path}/deliveries/whd_00000000000000000000/replay"),
        ):
            reply = await c.request(method, url, json={} if method == "PATCH" else None, headers=write)
            assert (reply.status_code, reply.json()["error"]) == (404, "not_found"), (method, url, reply.text)
        stranger = await rest.key("ws_stranger", "webhooks:write")
        assert (await c.get(path, headers=stranger)).status_code == 404
        assert (await c.post(f"{path}/test", headers=stranger)).status_code == 404
        assert (await c.get(f"{path}/deliveries/{delivery['id']}", headers=stranger)).status_code == 404
        assert (await c.get("/v1/webhooks", headers=stranger)).json()["items"] == []

        # 403: a key without the scope; a read key cannot write.
        campaigns_only = await rest.key(ws, "campaigns:read")
        for method, url in (("GET", "/v1/webhooks"), ("GET", path), ("POST", "/v1/webhooks")):
            reply = await c.request(
                method, url, json={"url": "https://h.example/", "events": ["*"]}, headers=campaigns_only
            )
            assert (reply.status_code, reply.json()["error"]) == (403, "forbidden"), (method, url)
        for method, url in (
            ("POST", "/v1/webhooks"),
            ("PATCH", path),
            ("DELETE", path),
            ("POST", f"{path}/test"),
            ("POST", f"{path}/rotate-secret"),
            ("POST", f"{path}/deliveries/{delivery['id']}/replay"),
        ):
            reply = await c.request(
                method,
                url,
                json={"url": "https://h.example/", "events": ["*"]} if method == "POST" else None,
                headers=read,
            )
            assert reply.status_code == 403, (method, url, reply.text)

        # Replay of a delivered one: 202, then it goes again.
        replay = await c.post(f"{path}/deliveries/{delivery['id']}/replay", headers=write)
        assert (replay.status_code, replay.json()["replays"]) == (202, 1), replay.text
        await wait_for(lambda: len(r.on("/crud")) == 2, timeout=10)

        # Disabled: the test event is refused (409); deleting answers 204, then 404.
        off = await c.patch(path, json={"enabled": False}, headers=write)
        assert (off.status_code, off.json()["enabled"]) == (200, False)
        refused = await c.post(f"{path}/test", headers=write)
        assert (refused.status_code, refused.json()["error"]) == (409, "endpoint_disabled"), refused.text
        gone = await c.delete(path, headers=write)
        assert gone.status_code == 204, gone.text
        assert (await c.get(path, headers=read)).status_code == 404
        assert (await c.get(f"{path}/deliveries", headers=read)).status_code == 404


async def test_a_paused_campaign_and_its_receipts_reach_the_customer(nats_url: str, tmp_path: Path) -> None:
    async with (
        receiving() as r,
        rest_mesh(nats_url, tmp_path, webhook_poll_interval_seconds=0.1) as (m, rest),
    ):
        ws = m.workspace_id
        c = rest.client
        await wait_for(lambda: rest.app.state.webhooks.consuming, timeout=15)
        made = await c.post(
            "/v1/webhooks",
            json={
                "url": r.url("/campaigns"),
                "events": ["campaign.running", "campaign.paused", "message.delivered"],
            },
            headers=await rest.key(ws, "webhooks:write"),
        )
        assert made.status_code == 201, made.text
        secret = watch(made.json()["secret"])
        segment_id, template_id = await seed(m, tag="hooks")
        cid = await campaign(m, ws, template_id, segment_id=segment_id)
        headers = await rest.key(ws, "campaigns:read", "campaigns:trigger", "campaigns:write")

        started = await c.post(f"/v1/campaigns/{cid}/trigger", headers=headers)
        assert started.status_code == 202, started.text
        run_id = started.json()["run_id"]

        async def sent() -> bool:
            status = (await c.get(f"/v1/campaigns/{cid}/status", headers=headers)).json()
            return bool(status["sent"] == 3)

        await wait_for(sent, timeout=20)
        paused = await c.post(f"/v1/campaigns/{cid}/pause", headers=headers)
        assert paused.status_code == 200, paused.text

        def arrived() -> dict[str, Any]:
            hits = r.on("/campaigns")
            events = [h.json()["event"] for h in hits]
            return (
                by_event(hits)
                if "campaign.paused" in events and events.count("message.delivered") == 3
                else {}
            )

        got = await wait_for(arrived, timeout=30, message=lambda: str([h.json()["event"] for h in r.hits]))
        assert all(signed_by(h, secret) for h in r.on("/campaigns"))
        assert got["campaign.paused"].json()["data"] == {
            "campaign_id": cid,
            "run_id": run_id,
            "from_state": "RUNNING",
            "to_state": "PAUSED",
            "actor": got["campaign.paused"].json()["data"]["actor"],
            "reason": got["campaign.paused"].json()["data"]["reason"],
        }
        assert got["campaign.paused"].json()["data"]["actor"].startswith("api_key:")
        assert got["campaign.running"].json()["data"]["campaign_id"] == cid
        receipts = [h.json()["data"] for h in r.on("/campaigns") if h.json()["event"] == "message.delivered"]
        assert {d["campaign_id"] for d in receipts} == {cid}
        assert {d["run_id"] for d in receipts} == {run_id}
        assert {d["channel"] for d in receipts} == {"EMAIL"}
        assert len({d["contact_id"] for d in receipts}) == 3
        # Opens were not subscribed to (the sandbox opens every email in this mesh).
        assert "email.opened" not in got


async def test_a_consent_change_reaches_the_customer(nats_url: str, tmp_path: Path) -> None:
    """The segment service publishes contact.consent_updated; the customer gets consent.updated."""
    async with (
        receiving() as r,
        rest_mesh(nats_url, tmp_path, webhook_poll_interval_seconds=0.1) as (m, rest),
    ):
        ws = m.workspace_id
        await wait_for(lambda: rest.app.state.webhooks.consuming, timeout=15)
        made = await rest.client.post(
            "/v1/webhooks",
            json={"url": r.url("/consent"), "events": ["consent.updated"]},
            headers=await rest.key(ws, "webhooks:write"),
        )
        assert made.status_code == 201, made.text
        contact = await m.segment.CreateContact(
            spb.CreateContactRequest(workspace_id=ws, contact=spb.ContactInput(email="c@example.com"))
        )
        await m.segment.SetConsent(
            spb.SetConsentRequest(
                workspace_id=ws,
                contact_id=contact.contact.id,
                consent=spb.ConsentInput(
                    channel=common_pb2.CHANNEL_SMS,
                    message_type=common_pb2.MESSAGE_TYPE_NEWSLETTER,
                    status=spb.CONSENT_STATUS_REVOKED,
                    source="preference-center",
                ),
            )
        )
        hit = (await wait_for(lambda: r.on("/consent"), timeout=20))[0]
        assert signed_by(hit, watch(made.json()["secret"]))
        assert hit.json()["event"] == "consent.updated"
        assert hit.json()["data"] == {
            "contact_id": contact.contact.id,
            "channel": "SMS",
            "message_type": "NEWSLETTER",
            "status": "REVOKED",
            "source": "preference-center",
        }
