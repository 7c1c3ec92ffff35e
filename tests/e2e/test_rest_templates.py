"""`/v1/templates` over the real mesh: create, list with the flow builder's filters, edit into new
versions, publish (RCS through the provider's approval), reject, and preview with sample data,
with every error status the template service and the gateway produce.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from shoal.v1 import template_pb2 as tpb
from tests.e2e.rest import rest_mesh

MISSING = "tpl_0123456789abcdef0123456789abcdef"

WELCOME: dict[str, Any] = {
    "name": "welcome",
    "channel": "EMAIL",
    "message_type": "MESSAGE",
    "variables": [{"name": "contact.first_name", "type": "STRING", "required": True}],
    "content": {
        "email": {
            "subject": "Welcome {{ contact.first_name }}",
            "html": "<p>Hi {{ contact.first_name }}!</p>",
        }
    },
}
SHIPPED: dict[str, Any] = {
    "name": "shipped",
    "channel": "SMS",
    "message_type": "MESSAGE",
    "variables": [{"name": "data.order_id", "required": True}],
    "content": {"sms": {"text": "Order {{ data.order_id }} is on its way."}},
}
NEWS: dict[str, Any] = {
    "name": "news",
    "channel": "EMAIL",
    "message_type": "NEWSLETTER",
    "content": {"email": {"subject": "March news", "text": "Spring is here."}},
}
RICH_RCS: dict[str, Any] = {
    "name": "offer",
    "channel": "RCS",
    "message_type": "MESSAGE",
    "content": {
        "rcs": {
            "text": "Our spring offer",
            "suggestions": [
                {"text": "Shop", "url": "https://shop.example.com"},
                {"text": "Stop", "postback": "stop"},
            ],
            "rich_card": {
                "title": "Spring",
                "description": "20% off",
                "media_url": "https://cdn.example.com/spring.png",
                "suggestions": [{"text": "Buy", "url": "https://shop.example.com/buy"}],
            },
        }
    },
}
PLAIN_RCS: dict[str, Any] = {
    "name": "hello",
    "channel": "RCS",
    "message_type": "CONVERSATION",
    "content": {"rcs": {"text": "Hello there"}},
}


def error_of(reply: httpx.Response) -> tuple[int, str, list[str]]:
    body = reply.json()
    return reply.status_code, body["error"], [d["field"] for d in body["details"]]


async def test_templates_round_trip(nats_url: str, tmp_path: Path) -> None:
    async with rest_mesh(nats_url, tmp_path) as (m, rest):
        ws = m.workspace_id
        c = rest.client
        write = await rest.key(ws, "templates:write")
        read = await rest.key(ws, "templates:read")
        other_scope = await rest.key(ws, "campaigns:write", "billing:write")

        # --- create -------------------------------------------------------------------------
        reply = await c.post("/v1/templates", json=WELCOME, headers=write)
        assert reply.status_code == 201, reply.text
        welcome = reply.json()
        tid = welcome["id"]
        assert tid.startswith("tpl_")
        assert (welcome["name"], welcome["channel"], welcome["message_type"]) == (
            "welcome",
            "EMAIL",
            "MESSAGE",
        )
        assert (welcome["latest_version"], welcome["published_version"]) == (1, None)
        v1 = welcome["current"]
        assert (v1["template_id"], v1["version"], v1["state"]) == (tid, 1, "DRAFT")
        assert v1["content"]["email"] == {**WELCOME["content"]["email"], "text": None}
        assert v1["variables"] == [{**WELCOME["variables"][0], "default": None}]
        assert v1["published_at"] is None and v1["created_at"].endswith("Z")
        # The template service holds it in this workspace.
        held = await m.template.GetTemplate(tpb.GetTemplateRequest(workspace_id=ws, template_id=tid))
        assert held.template.current.content.email.subject == "Welcome {{ contact.first_name }}"

        sms_id = (await c.post("/v1/templates", json=SHIPPED, headers=write)).json()["id"]
        news = await c.post("/v1/templates", json=NEWS, headers=write)
        assert news.status_code == 201, news.text
        news_id = news.json()["id"]
        assert news.json()["current"]["variables"] == []

        # A key without the scope, a read-only key, no key.
        assert error_of(await c.post("/v1/templates", json=WELCOME, headers=read))[:2] == (403, "forbidden")
        assert (await c.get("/v1/templates", headers=other_scope)).status_code == 403
        assert (await c.get("/v1/templates")).status_code == 401

        # Malformed requests: 400 naming the field.
        reply = await c.post("/v1/templates", json={**WELCOME, "channel": "FAX"}, headers=write)
        assert error_of(reply) == (400, "validation_failed", ["channel"])
        both = {"email": WELCOME["content"]["email"], "sms": {"text": "hi"}}
        reply = await c.post("/v1/templates", json={**WELCOME, "content": both}, headers=write)
        assert error_of(reply) == (400, "validation_failed", ["content"])
        reply = await c.post("/v1/templates", json={**WELCOME, "colour": "red"}, headers=write)
        assert error_of(reply) == (400, "validation_failed", ["colour"])
        # Content the channel cannot carry: the service's rule, field and limit, 400.
        too_long = {**SHIPPED, "variables": [], "content": {"sms": {"text": "x" * 1601}}}
        reply = await c.post("/v1/templates", json=too_long, headers=write)
        assert error_of(reply) == (400, "validation_failed", ["content.sms.text"]), reply.text
        assert reply.json()["details"][0]["message"] == "longer than 1600 characters"
        assert "content.sms.text" in reply.json()["message"]
        reply = await c.post("/v1/templates", json={**SHIPPED, "content": WELCOME["content"]}, headers=write)
        assert error_of(reply) == (400, "validation_failed", ["content.email"]), reply.text
        reply = await c.post("/v1/templates", json={**WELCOME, "variables": []}, headers=write)
        assert error_of(reply)[:2] == (400, "validation_failed")
        assert set(error_of(reply)[2]) == {"content.email.subject", "content.email.html"}
        bad_var = {**WELCOME, "variables": [*WELCOME["variables"], {"name": "Order Id"}]}
        reply = await c.post("/v1/templates", json=bad_var, headers=write)
        assert error_of(reply) == (400, "validation_failed", ["variables.1.name"]), reply.text
        # Text protobuf cannot carry (a lone surrogate) is refused here, naming the field.
        raw = json.dumps({**WELCOME, "name": "caf\ud800"})  # ASCII, with the \ud800 escape
        reply = await c.post(
            "/v1/templates", content=raw, headers={**write, "Content-Type": "application/json"}
        )
        assert error_of(reply) == (400, "validation_failed", ["name"]), reply.text
        carousel = {**RICH_RCS, "content": {"rcs": {"carousel": [{"title": "only one"}]}}}
        reply = await c.post("/v1/templates", json=carousel, headers=write)
        assert error_of(reply) == (400, "validation_failed", ["content.rcs.carousel"]), reply.text
        assert "2 to 10" in reply.json()["details"][0]["message"]

        # --- publish --------------------------------------------------------------------------
        reply = await c.post(f"/v1/templates/{tid}/publish", json={"version": 1}, headers=write)
        assert reply.status_code == 200, reply.text
        assert (reply.json()["version"], reply.json()["state"]) == (1, "PUBLISHED")
        assert reply.json()["published_at"] is not None
        again = await c.post(f"/v1/templates/{tid}/publish", json={"version": 1}, headers=write)
        assert error_of(again)[:2] == (409, "template_wrong_state")
        reply = await c.post(f"/v1/templates/{tid}/publish", json={"version": 7}, headers=write)
        assert error_of(reply)[:2] == (404, "not_found")
        reply = await c.post(f"/v1/templates/{tid}/publish", json={"version": 0}, headers=write)
        assert error_of(reply) == (400, "validation_failed", ["version"])
        assert (await c.post(f"/v1/templates/{tid}/publish", headers=read)).status_code == 403
        assert (await c.post(f"/v1/templates/{MISSING}/publish", headers=write)).status_code == 404

        # --- list with the flow builder's filters ---------------------------------------------
        async def listed(query: str, headers: dict[str, str] = read) -> list[str]:
            reply = await c.get(f"/v1/templates{query}", headers=headers)
            assert reply.status_code == 200, reply.text
            return [t["id"] for t in reply.json()["items"]]

        assert await listed("?channel=EMAIL&message_type=MESSAGE&state=PUBLISHED") == [tid]
        assert await listed("?channel=SMS") == [sms_id]
        assert set(await listed("?state=DRAFT")) == {sms_id, news_id}
        assert await listed("?message_type=NEWSLETTER") == [news_id]
        assert await listed("") == [news_id, sms_id, tid]  # newest first
        first = (await c.get("/v1/templates?limit=2", headers=read)).json()
        assert len(first["items"]) == 2 and first["next_cursor"]
        rest_page = (await c.get(f"/v1/templates?limit=2&cursor={first['next_cursor']}", headers=read)).json()
        assert [t["id"] for t in rest_page["items"]] == [tid] and rest_page["next_cursor"] is None
        assert error_of(await c.get("/v1/templates?state=LIVE", headers=read))[:2] == (
            400,
            "validation_failed",
        )
        assert error_of(await c.get("/v1/templates?limit=0", headers=read)) == (
            400,
            "validation_failed",
            ["limit"],
        )
        reply = await c.get("/v1/templates?cursor=nope", headers=read)
        assert error_of(reply) == (400, "validation_failed", ["cursor"]), reply.text
        reply = await c.get(f"/v1/templates?cursor={'9' * 40}", headers=read)
        assert error_of(reply) == (400, "validation_failed", ["cursor"]), reply.text

        # --- get ------------------------------------------------------------------------------
        reply = await c.get(f"/v1/templates/{tid}", headers=read)
        assert reply.status_code == 200 and reply.json()["published_version"] == 1
        assert error_of(await c.get(f"/v1/templates/{MISSING}", headers=read))[:2] == (404, "not_found")
        assert error_of(await c.get("/v1/templates/welcome", headers=read))[:2] == (400, "validation_failed")
        assert (await c.get(f"/v1/templates/{tid}", headers=other_scope)).status_code == 403

        # --- edit: a new immutable version -----------------------------------------------------
        new_subject = {"email": {"subject": "Welcome aboard, {{ contact.first_name }}", "text": "Hello"}}
        reply = await c.patch(f"/v1/templates/{tid}", json={"content": new_subject}, headers=write)
        assert reply.status_code == 200, reply.text
        edited = reply.json()
        assert (edited["latest_version"], edited["published_version"]) == (2, 1)
        assert (edited["current"]["version"], edited["current"]["state"]) == (2, "DRAFT")
        assert edited["current"]["content"]["email"]["subject"] == "Welcome aboard, {{ contact.first_name }}"
        # Variables not given are carried over from the latest version.
        assert edited["current"]["variables"] == v1["variables"]
        # A rename alone makes no version.
        reply = await c.patch(f"/v1/templates/{tid}", json={"name": "welcome-2"}, headers=write)
        assert (reply.json()["name"], reply.json()["latest_version"]) == ("welcome-2", 2), reply.text
        # Variables alone: a new version with the latest content.
        optional = [{"name": "contact.first_name", "default": "friend"}]
        reply = await c.patch(f"/v1/templates/{tid}", json={"variables": optional}, headers=write)
        assert reply.status_code == 200, reply.text
        assert reply.json()["current"]["version"] == 3
        assert reply.json()["current"]["content"]["email"]["subject"].startswith("Welcome aboard")
        assert reply.json()["current"]["variables"][0]["default"] == "friend"
        # No variables left while the content still uses one: the service's 400 names the field.
        reply = await c.patch(f"/v1/templates/{tid}", json={"variables": []}, headers=write)
        assert error_of(reply)[:2] == (400, "validation_failed")
        assert "content.email.subject" in error_of(reply)[2]
        reply = await c.patch(
            f"/v1/templates/{tid}", json={"content": {"sms": {"text": "hi"}}}, headers=write
        )
        assert error_of(reply) == (400, "validation_failed", ["content.sms"])
        assert error_of(await c.patch(f"/v1/templates/{tid}", json={"name": ""}, headers=write))[0] == 400
        assert (
            await c.patch(f"/v1/templates/{MISSING}", json={"name": "x"}, headers=write)
        ).status_code == 404
        assert (await c.patch(f"/v1/templates/{tid}", json={"name": "x"}, headers=read)).status_code == 403

        reply = await c.get(f"/v1/templates/{tid}/versions", headers=read)
        assert reply.status_code == 200, reply.text
        versions = reply.json()
        assert [(v["version"], v["state"]) for v in versions["items"]] == [
            (1, "PUBLISHED"),
            (2, "DRAFT"),
            (3, "DRAFT"),
        ]
        assert versions["next_cursor"] is None
        page = (await c.get(f"/v1/templates/{tid}/versions?limit=2", headers=read)).json()
        assert [v["version"] for v in page["items"]] == [1, 2] and page["next_cursor"]
        page = (
            await c.get(f"/v1/templates/{tid}/versions?cursor={page['next_cursor']}", headers=read)
        ).json()
        assert [v["version"] for v in page["items"]] == [3] and page["next_cursor"] is None
        reply = await c.get(f"/v1/templates/{tid}/versions?cursor=x", headers=read)
        assert error_of(reply) == (400, "validation_failed", ["cursor"])
        assert (await c.get(f"/v1/templates/{MISSING}/versions", headers=read)).status_code == 404
        assert (await c.get(f"/v1/templates/{tid}/versions", headers=other_scope)).status_code == 403

        # Publishing without a version publishes the latest; the older draft stays a draft.
        reply = await c.post(f"/v1/templates/{tid}/publish", headers=write)
        assert (reply.json()["version"], reply.json()["state"]) == (3, "PUBLISHED"), reply.text
        assert (await c.get(f"/v1/templates/{tid}", headers=read)).json()["published_version"] == 3

        # --- reject ----------------------------------------------------------------------------
        reply = await c.post(
            f"/v1/templates/{tid}/reject", json={"version": 2, "reason": "superseded"}, headers=write
        )
        assert reply.status_code == 200, reply.text
        assert (reply.json()["state"], reply.json()["rejection_reason"]) == ("REJECTED", "superseded")
        reply = await c.post(
            f"/v1/templates/{tid}/reject", json={"version": 3, "reason": "late"}, headers=write
        )
        assert error_of(reply)[:2] == (409, "template_wrong_state")
        reply = await c.post(f"/v1/templates/{tid}/reject", json={"version": 2}, headers=write)
        assert error_of(reply) == (400, "validation_failed", ["reason"])
        reply = await c.post(f"/v1/templates/{tid}/reject", json={"reason": "no"}, headers=read)
        assert reply.status_code == 403
        reply = await c.post(f"/v1/templates/{MISSING}/reject", json={"reason": "no"}, headers=write)
        assert reply.status_code == 404

        # --- preview ---------------------------------------------------------------------------
        async def preview(
            template_id: str, body: dict[str, Any], headers: dict[str, str] = read
        ) -> httpx.Response:
            return await c.post(f"/v1/templates/{template_id}/preview", json=body, headers=headers)

        reply = await preview(tid, {"version": 1, "contact": {"first_name": "Ada"}})
        assert reply.status_code == 200, reply.text
        shown = reply.json()
        assert (shown["version"], shown["channel"], shown["billing_unit"], shown["units"]) == (
            1,
            "EMAIL",
            "EMAIL",
            1,
        )
        assert shown["content"]["email"]["subject"] == "Welcome Ada"
        assert shown["content"]["email"]["html"] == "<p>Hi Ada!</p>"
        # A missing required variable: 422 naming it (as a send would fail) ...
        reply = await preview(tid, {"version": 1, "contact": {"last_name": "Lovelace"}})
        assert error_of(reply) == (422, "missing_variable", ["contact.first_name"]), reply.text
        assert "contact.first_name" in reply.json()["message"]
        reply = await preview(tid, {"version": 1, "contact": {"first_name": {"nested": True}}})
        assert error_of(reply) == (422, "missing_variable", ["contact.first_name"])
        # ... or a visible placeholder when asked for.
        reply = await preview(tid, {"version": 1, "fill_missing": True})
        assert reply.json()["content"]["email"]["subject"] == "Welcome [contact.first_name]", reply.text
        # Without a version: the published one (3), whose variable is optional with a default.
        reply = await c.post(f"/v1/templates/{tid}/preview", headers=read)
        assert (reply.json()["version"], reply.json()["content"]["email"]["subject"]) == (
            3,
            "Welcome aboard, friend",
        ), reply.text
        # SMS: the segments the rendered text needs.
        reply = await preview(sms_id, {"data": {"order_id": "A-4711"}})
        assert reply.status_code == 200, reply.text
        assert reply.json()["content"]["sms"]["text"] == "Order A-4711 is on its way."
        assert (reply.json()["billing_unit"], reply.json()["units"]) == ("SMS_SEGMENT", 1)
        reply = await preview(sms_id, {"data": {"order_id": "A" * 200}})
        assert (reply.json()["billing_unit"], reply.json()["units"]) == ("SMS_SEGMENT", 2), reply.text
        reply = await preview(sms_id, {"data": {"order_id": 4711}})
        assert reply.json()["content"]["sms"]["text"] == "Order 4711 is on its way."
        reply = await preview(sms_id, {"contact": {"order_id": "A-1"}})
        assert error_of(reply) == (422, "missing_variable", ["data.order_id"])
        # Rendered beyond what an SMS can carry: 422 naming the limit.
        reply = await preview(sms_id, {"data": {"order_id": "A" * 1600}})
        assert error_of(reply) == (422, "render_failed", ["content.sms.text"]), reply.text
        assert "1600" in reply.json()["message"]
        # A newsletter carries the List-Unsubscribe headers.
        reply = await preview(news_id, {"contact": {"id": "c_1"}})
        assert reply.json()["headers"]["List-Unsubscribe"].endswith("/c_1>"), reply.text
        assert (await preview(tid, {"version": 9})).status_code == 404
        assert (await preview(MISSING, {})).status_code == 404
        assert error_of(await preview(tid, {"sample": {}})) == (400, "validation_failed", ["sample"])
        assert error_of(await preview(tid, {"contact": []}))[:2] == (400, "validation_failed")
        assert (await preview(tid, {}, headers=other_scope)).status_code == 403
        # Sample values a message cannot carry, or nested beyond reason: 400 naming the field.
        reply = await preview(sms_id, {"data": {"order_id": 10**400}})
        assert error_of(reply) == (400, "validation_failed", ["data"]), reply.text
        deep: dict[str, Any] = {}
        for _ in range(40):
            deep = {"x": deep}
        assert error_of(await preview(sms_id, {"contact": deep}))[:2] == (400, "validation_failed")

        # --- RCS: the provider approves (the sandbox default) -----------------------------------
        reply = await c.post("/v1/templates", json=RICH_RCS, headers=write)
        assert reply.status_code == 201, reply.text
        rcs = reply.json()
        assert rcs["current"]["content"]["rcs"] == {
            "text": "Our spring offer",
            "suggestions": [
                {"text": "Shop", "postback": None, "url": "https://shop.example.com"},
                {"text": "Stop", "postback": "stop", "url": None},
            ],
            "rich_card": {
                "title": "Spring",
                "description": "20% off",
                "media_url": "https://cdn.example.com/spring.png",
                "suggestions": [{"text": "Buy", "postback": None, "url": "https://shop.example.com/buy"}],
            },
            "carousel": [],
        }
        reply = await c.post(f"/v1/templates/{rcs['id']}/publish", json={"version": 1}, headers=write)
        assert (reply.status_code, reply.json()["state"]) == (200, "PUBLISHED"), reply.text
        reply = await preview(rcs["id"], {})
        assert (reply.json()["billing_unit"], reply.json()["units"]) == ("RCS_SINGLE", 1), reply.text
        assert reply.json()["content"]["rcs"]["rich_card"]["title"] == "Spring"
        plain = (await c.post("/v1/templates", json=PLAIN_RCS, headers=write)).json()
        reply = await preview(plain["id"], {})
        assert (reply.json()["billing_unit"], reply.json()["content"]["rcs"]["text"]) == (
            "RCS_BASIC",
            "Hello there",
        )
        assert await listed("?channel=RCS&state=PUBLISHED") == [rcs["id"]]

        # --- another workspace sees none of it -------------------------------------------------
        stranger = await rest.key("ws_stranger", "templates:write")
        assert (await c.get(f"/v1/templates/{tid}", headers=stranger)).status_code == 404
        assert (
            await c.patch(f"/v1/templates/{tid}", json={"name": "mine"}, headers=stranger)
        ).status_code == 404
        assert (await preview(tid, {}, headers=stranger)).status_code == 404
        assert await listed("", headers=stranger) == []


async def test_rcs_publish_waits_for_the_provider(
    nats_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The provider answers later: versions wait in PENDING_APPROVAL until the answer is recorded.
    monkeypatch.setenv("SHOAL_TEMPLATE_RCS_APPROVAL", "manual")
    async with rest_mesh(nats_url, tmp_path) as (m, rest):
        ws = m.workspace_id
        c = rest.client
        write = await rest.key(ws, "templates:write")
        admin = await rest.key(ws, "admin")
        tid = (await c.post("/v1/templates", json=RICH_RCS, headers=write)).json()["id"]

        reply = await c.post(f"/v1/templates/{tid}/publish", json={"version": 1}, headers=write)
        assert (reply.status_code, reply.json()["state"]) == (200, "PENDING_APPROVAL"), reply.text
        template = (await c.get(f"/v1/templates/{tid}", headers=write)).json()
        assert (template["published_version"], template["current"]["state"]) == (None, "PENDING_APPROVAL")
        # Not sendable yet, so not what the flow builder offers.
        assert (await c.get("/v1/templates?state=PUBLISHED", headers=write)).json()["items"] == []
        pending = (await c.get("/v1/templates?state=PENDING_APPROVAL", headers=write)).json()["items"]
        assert [t["id"] for t in pending] == [tid]

        # Recording the provider's approval is not the customer's to do.
        reply = await c.post(f"/v1/templates/{tid}/publish", json={"version": 1}, headers=write)
        assert (reply.status_code, reply.json()["error"]) == (403, "forbidden"), reply.text
        held = await m.template.ListVersions(tpb.ListVersionsRequest(workspace_id=ws, template_id=tid))
        assert held.versions[0].state == tpb.TEMPLATE_STATE_PENDING_APPROVAL
        reply = await c.post(f"/v1/templates/{tid}/publish", json={"version": 1}, headers=admin)
        assert (reply.status_code, reply.json()["state"]) == (200, "PUBLISHED"), reply.text
        assert (await c.get(f"/v1/templates/{tid}", headers=write)).json()["published_version"] == 1

        # The provider turns down the next version: recorded as REJECTED with its reason.
        reply = await c.patch(
            f"/v1/templates/{tid}",
            json={"content": {"rcs": {"text": "Spring offer, 30% off"}}},
            headers=write,
        )
        assert reply.json()["current"]["version"] == 2, reply.text
        reply = await c.post(f"/v1/templates/{tid}/publish", headers=write)
        assert reply.json()["state"] == "PENDING_APPROVAL", reply.text
        reply = await c.post(
            f"/v1/templates/{tid}/reject", json={"reason": "misleading discount"}, headers=write
        )
        assert reply.status_code == 200, reply.text
        assert (reply.json()["version"], reply.json()["state"], reply.json()["rejection_reason"]) == (
            2,
            "REJECTED",
            "misleading discount",
        )
        # A rejected version is final; version 1 stays the published one.
        reply = await c.post(f"/v1/templates/{tid}/publish", json={"version": 2}, headers=admin)
        assert (reply.status_code, reply.json()["error"]) == (409, "template_wrong_state")
        assert (await c.get(f"/v1/templates/{tid}", headers=write)).json()["published_version"] == 1
