"""`/v1/contacts` over the real mesh: CRUD, list filters and paging, bulk import with bad rows,
upsert, tags, consent with double opt-in, custom events, validation, scopes and workspaces."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shoal.v1 import segment_pb2 as spb
from tests.e2e.rest import rest_mesh

UNKNOWN = "c_0000000000AAAAAAAAAA"


def error(reply: Any) -> tuple[int, str, list[str]]:
    body = reply.json()
    return reply.status_code, body["error"], [d["field"] for d in body["details"]]


async def test_contact_crud_list_validation_scopes_and_workspaces(nats_url: str, tmp_path: Path) -> None:
    async with rest_mesh(nats_url, tmp_path) as (m, rest):
        ws = m.workspace_id
        c = rest.client
        write = await rest.key(ws, "contacts:write")
        read = await rest.key(ws, "contacts:read")
        wrong = await rest.key(ws, "campaigns:write", "templates:write")
        other = await rest.key("ws_other", "contacts:write")

        # Create: values normalised by the service, custom fields typed both ways.
        made = await c.post(
            "/v1/contacts",
            json={
                "external_id": "crm-1",
                "email": "Ada@Example.com",
                "phone": "+49 151 23456789",
                "first_name": "Ada",
                "tags": ["vip"],
                "fields": {
                    "plan": "pro",
                    "seats": 5,
                    "ratio": 0.5,
                    "trial": True,
                    "renews": {"timestamp": "2026-07-01T02:00:00+02:00"},
                },
            },
            headers=write,
        )
        assert made.status_code == 201, made.text
        contact = made.json()
        cid = contact["id"]
        assert cid.startswith("c_")
        assert contact["email"] == "ada@example.com"
        assert contact["phone"] == "+4915123456789"
        assert (contact["status"], contact["tags"], contact["last_name"]) == ("ACTIVE", ["vip"], None)
        assert contact["fields"] == {
            "plan": "pro",
            "seats": 5,
            "ratio": 0.5,
            "trial": True,
            "renews": {"timestamp": "2026-07-01T00:00:00Z"},
        }
        assert contact["created_at"].endswith("Z")

        # Read with a read key: the same contact.
        got = await c.get(f"/v1/contacts/{cid}", headers=read)
        assert (got.status_code, got.json()) == (200, contact)

        # A duplicate external_id: what the service answers (409), naming the field.
        dup = await c.post("/v1/contacts", json={"external_id": "crm-1"}, headers=write)
        assert error(dup) == (409, "external_id_taken", ["external_id"]), dup.text

        # Validation: the service's rules, named as JSON paths; untypable values at the edge.
        bad = await c.post(
            "/v1/contacts", json={"email": "nope", "tags": ["ok", " "], "phone": "123"}, headers=write
        )
        assert bad.status_code == 400, bad.text
        assert set(error(bad)[2]) == {"email", "tags.1", "phone"}
        untyped = await c.post("/v1/contacts", json={"fields": {"list": [1, 2], "ok": 1}}, headers=write)
        assert error(untyped) == (400, "validation_failed", ["fields.list"]), untyped.text
        stamp = await c.post(
            "/v1/contacts", json={"fields": {"at": {"timestamp": "yesterday"}}}, headers=write
        )
        assert error(stamp) == (400, "validation_failed", ["fields.at"]), stamp.text
        typed = await c.post("/v1/contacts", json={"email": 42, "status": "GONE"}, headers=write)
        assert (typed.status_code, set(error(typed)[2])) == (400, {"email", "status"}), typed.text
        extra = await c.post("/v1/contacts", json={"nickname": "x"}, headers=write)
        assert error(extra) == (400, "validation_failed", ["nickname"])

        # PATCH: only given fields change; tags replace, fields merge (null removes), null clears.
        patched = await c.patch(
            f"/v1/contacts/{cid}",
            json={
                "first_name": "Augusta",
                "phone": None,
                "tags": ["gold"],
                "fields": {"plan": "team", "trial": None},
            },
            headers=write,
        )
        assert patched.status_code == 200, patched.text
        after = patched.json()
        assert (after["first_name"], after["phone"], after["tags"]) == ("Augusta", None, ["gold"])
        assert after["email"] == "ada@example.com" and after["external_id"] == "crm-1"
        assert after["fields"] == {
            "plan": "team",
            "seats": 5,
            "ratio": 0.5,
            "renews": {"timestamp": "2026-07-01T00:00:00Z"},
        }
        unchanged = await c.patch(f"/v1/contacts/{cid}", json={}, headers=write)
        assert (unchanged.status_code, unchanged.json()) == (200, after)
        for body, field in (
            ({"status": None}, "status"),
            ({"fields": None}, "fields"),
            ({"fields": {"x": {"a": 1}}}, "fields.x"),
            ({"email": "not-an-email"}, "email"),
        ):
            reply = await c.patch(f"/v1/contacts/{cid}", json=body, headers=write)
            assert error(reply) == (400, "validation_failed", [field]), (body, reply.text)
        second = await c.post(
            "/v1/contacts", json={"external_id": "crm-2", "email": "b@example.com"}, headers=write
        )
        assert second.status_code == 201, second.text
        taken = await c.patch(f"/v1/contacts/{cid}", json={"external_id": "crm-2"}, headers=write)
        assert error(taken) == (409, "external_id_taken", ["external_id"]), taken.text

        # List: oldest first in pages, filters combined.
        first_page = await c.get("/v1/contacts", params={"limit": 1}, headers=read)
        assert first_page.status_code == 200, first_page.text
        assert [i["id"] for i in first_page.json()["items"]] == [cid]
        cursor = first_page.json()["next_cursor"]
        assert cursor
        page2 = await c.get("/v1/contacts", params={"limit": 1, "cursor": cursor}, headers=read)
        assert [i["id"] for i in page2.json()["items"]] == [second.json()["id"]]
        everything = await c.get("/v1/contacts", headers=read)
        assert [i["id"] for i in everything.json()["items"]] == [cid, second.json()["id"]]
        assert everything.json()["next_cursor"] is None
        for params, expected in (
            ({"tag": "gold"}, [cid]),
            ({"tag": ["gold", "vip"]}, []),
            ({"email": "ADA@example.com"}, [cid]),
            ({"external_id": "crm-2"}, [second.json()["id"]]),
            ({"status": "ACTIVE", "tag": "gold"}, [cid]),
            ({"status": "BLOCKED"}, []),
        ):
            reply = await c.get("/v1/contacts", params=params, headers=read)
            assert reply.status_code == 200, (params, reply.text)
            assert [i["id"] for i in reply.json()["items"]] == expected, params
        for params, field in (
            ({"cursor": "garbage"}, "cursor"),
            ({"limit": 0}, "limit"),
            ({"limit": 501}, "limit"),
            ({"status": "GONE"}, "status"),
            ({"tag": " "}, "tag"),
            ({"segment_id": "nope"}, "segment_id"),
        ):
            reply = await c.get("/v1/contacts", params=params, headers=read)
            assert (reply.status_code, error(reply)[2]) == (400, [field]), (params, reply.text)
        missing_segment = await c.get(
            "/v1/contacts", params={"segment_id": "seg_0000000000AAAAAAAAAA"}, headers=read
        )
        assert error(missing_segment)[:2] == (404, "not_found")

        # Scopes: a read key cannot write, a key without contacts scopes cannot read.
        for method, path, body in (
            ("POST", "/v1/contacts", {"email": "x@example.com"}),
            ("PATCH", f"/v1/contacts/{cid}", {"first_name": "X"}),
            ("DELETE", f"/v1/contacts/{cid}", None),
        ):
            reply = await c.request(method, path, json=body, headers=read)
            assert error(reply)[:2] == (403, "forbidden"), (method, path)
        for path in ("/v1/contacts", f"/v1/contacts/{cid}"):
            reply = await c.get(path, headers=wrong)
            assert error(reply)[:2] == (403, "forbidden"), path

        # Another workspace sees none of it.
        assert error(await c.get(f"/v1/contacts/{cid}", headers=other))[:2] == (404, "not_found")
        assert error(await c.patch(f"/v1/contacts/{cid}", json={"first_name": "X"}, headers=other))[0] == 404
        assert error(await c.delete(f"/v1/contacts/{cid}", headers=other))[0] == 404
        assert (await c.get("/v1/contacts", headers=other)).json() == {"items": [], "next_cursor": None}
        assert (await c.get(f"/v1/contacts/{cid}", headers=read)).status_code == 200

        # 404 for an unknown id, 400 for a malformed one; delete answers 204, then 404.
        assert error(await c.get(f"/v1/contacts/{UNKNOWN}", headers=read))[:2] == (404, "not_found")
        assert error(await c.get("/v1/contacts/nope", headers=read))[:2] == (400, "validation_failed")
        assert (
            error(await c.patch(f"/v1/contacts/{UNKNOWN}", json={"first_name": "X"}, headers=write))[0] == 404
        )
        deleted = await c.delete(f"/v1/contacts/{cid}", headers=write)
        assert (deleted.status_code, deleted.content) == (204, b"")
        assert error(await c.get(f"/v1/contacts/{cid}", headers=read))[0] == 404
        assert error(await c.delete(f"/v1/contacts/{cid}", headers=write))[0] == 404


async def test_import_upsert_tags_consent_and_events(nats_url: str, tmp_path: Path) -> None:
    async with rest_mesh(nats_url, tmp_path) as (m, rest):
        ws = m.workspace_id
        c = rest.client
        write = await rest.key(ws, "contacts:write")
        read = await rest.key(ws, "contacts:read")

        # Import: good rows land, each bad row is rejected on its own with its field and reason.
        existing = await c.post(
            "/v1/contacts", json={"external_id": "imp-9", "first_name": "Old"}, headers=write
        )
        assert existing.status_code == 201, existing.text
        rows: list[Any] = [
            {"external_id": "imp-1", "email": "one@example.com", "tags": ["imported"]},  # 0 created
            {"email": "not-an-email"},  # 1
            {
                "email": "two@example.com",
                "fields": {"n": 1, "since": {"timestamp": "2025-01-01T00:00:00Z"}},
            },  # 2
            {"email": "three@example.com", "fields": {"x": [1]}},  # 3 untypable
            {"email": 42},  # 4 wrong JSON type
            {"external_id": "imp-1", "email": "again@example.com"},  # 5 repeats row 0
            {"phone": "12345"},  # 6
            "not an object",  # 7
            {"status": "GONE"},  # 8
            {"external_id": "imp-9", "first_name": "New"},  # 9 updates the existing contact
            {
                "email": "four@example.com",
                "consents": [{"channel": "EMAIL", "message_type": "NEWSLETTER", "status": "MAYBE"}],
            },  # 10
        ]
        reply = await c.post("/v1/contacts/import", json={"contacts": rows}, headers=write)
        assert reply.status_code == 200, reply.text
        result = reply.json()
        assert (result["imported"], result["updated"]) == (2, 1), result
        rejected = {r["index"]: (r["field"], r["reason"]) for r in result["rejected"]}
        assert [r["index"] for r in result["rejected"]] == [1, 3, 4, 5, 6, 7, 8, 10]
        assert {i: f for i, (f, _) in rejected.items()} == {
            1: "email",
            3: "fields.x",
            4: "email",
            5: "external_id",
            6: "phone",
            7: "row",
            8: "status",
            10: "consents.0.status",
        }
        assert "not a valid email" in rejected[1][1]
        assert "repeats row 0" in rejected[5][1]
        assert "E.164" in rejected[6][1]
        listed = (await c.get("/v1/contacts", headers=read)).json()["items"]
        by_email = {i["email"]: i for i in listed}
        assert set(by_email) == {None, "one@example.com", "two@example.com"}
        assert by_email["one@example.com"]["tags"] == ["imported"]
        assert by_email["two@example.com"]["fields"] == {
            "n": 1,
            "since": {"timestamp": "2025-01-01T00:00:00Z"},
        }
        updated = (await c.get(f"/v1/contacts/{existing.json()['id']}", headers=read)).json()
        assert updated["first_name"] == "New"
        # Exactly 10,000 rows in one call (the CLI's chunk size) are all imported.
        full = [{"email": f"bulk{i}@example.com", "tags": ["bulk"]} for i in range(10_000)]
        bulk = await c.post("/v1/contacts/import", json={"contacts": full}, headers=write, timeout=120)
        assert (bulk.status_code, bulk.json()) == (200, {"imported": 10_000, "updated": 0, "rejected": []})
        tagged = await c.get("/v1/contacts", params={"tag": "bulk", "limit": 500}, headers=read)
        assert len(tagged.json()["items"]) == 500 and tagged.json()["next_cursor"]
        # More than 10,000 rows: 400 naming the field and the limit; the body shape is checked.
        too_many = await c.post("/v1/contacts/import", json={"contacts": [{}] * 10_001}, headers=write)
        assert error(too_many)[:3] == (400, "validation_failed", ["contacts"]), too_many.text
        assert "10000" in too_many.json()["message"]
        assert error(await c.post("/v1/contacts/import", json={"rows": []}, headers=write))[0] == 400
        assert error(await c.post("/v1/contacts/import", json={"contacts": []}, headers=read))[0] == 403
        empty = await c.post("/v1/contacts/import", json={"contacts": []}, headers=write)
        assert empty.json() == {"imported": 0, "updated": 0, "rejected": []}

        # Upsert: created, then updated by email; a key (external_id or email) is required.
        up = await c.post(
            "/v1/contacts/upsert", json={"email": "up@example.com", "first_name": "U"}, headers=write
        )
        assert (up.status_code, up.json()["created"]) == (200, True), up.text
        again = await c.post(
            "/v1/contacts/upsert", json={"email": "UP@example.com", "last_name": "V"}, headers=write
        )
        assert (again.status_code, again.json()["created"]) == (200, False), again.text
        assert again.json()["contact"]["id"] == up.json()["contact"]["id"]
        assert (again.json()["contact"]["first_name"], again.json()["contact"]["last_name"]) == ("U", "V")
        keyless = await c.post("/v1/contacts/upsert", json={"first_name": "Nobody"}, headers=write)
        assert error(keyless) == (400, "validation_failed", ["external_id"]), keyless.text
        assert (
            error(await c.post("/v1/contacts/upsert", json={"email": "x@example.com"}, headers=read))[0]
            == 403
        )
        cid = up.json()["contact"]["id"]

        # Tags: add and remove are idempotent.
        added = await c.post(f"/v1/contacts/{cid}/tags/vip", headers=write)
        assert (added.status_code, added.json()) == (200, {"tag": "vip", "changed": True}), added.text
        added_again = await c.post(f"/v1/contacts/{cid}/tags/vip", headers=write)
        assert added_again.json() == {"tag": "vip", "changed": False}
        assert (await c.get(f"/v1/contacts/{cid}", headers=read)).json()["tags"] == ["vip"]
        for _ in range(2):
            removed = await c.delete(f"/v1/contacts/{cid}/tags/vip", headers=write)
            assert removed.status_code == 204, removed.text
        assert (await c.get(f"/v1/contacts/{cid}", headers=read)).json()["tags"] == []
        assert error(await c.post(f"/v1/contacts/{cid}/tags/{'t' * 65}", headers=write))[0] == 400
        assert error(await c.post(f"/v1/contacts/{UNKNOWN}/tags/vip", headers=write))[:2] == (
            404,
            "not_found",
        )
        assert error(await c.delete(f"/v1/contacts/{UNKNOWN}/tags/vip", headers=write))[0] == 404
        assert error(await c.post(f"/v1/contacts/{cid}/tags/vip", headers=read))[0] == 403
        assert error(await c.delete(f"/v1/contacts/{cid}/tags/vip", headers=read))[0] == 403

        # Consent: a double opt-in (PENDING, then confirmed), a revocation, current and history.
        consent_path = f"/v1/contacts/{cid}/consent"
        pending = await c.post(
            consent_path,
            json={
                "channel": "EMAIL",
                "message_type": "NEWSLETTER",
                "status": "PENDING",
                "source": "signup-form",
                "proof": "checkbox ticked from 203.0.113.7",
            },
            headers=write,
        )
        assert pending.status_code == 201, pending.text
        assert (pending.json()["status"], pending.json()["confirmed_at"]) == ("PENDING", None)
        confirmed = await c.post(
            consent_path,
            json={"channel": "EMAIL", "message_type": "NEWSLETTER", "confirm": True},
            headers=write,
        )
        assert confirmed.status_code == 201, confirmed.text
        assert confirmed.json()["status"] == "GRANTED"
        assert confirmed.json()["confirmed_at"] is not None
        assert (confirmed.json()["source"], confirmed.json()["proof"]) == (
            "signup-form",
            "checkbox ticked from 203.0.113.7",
        )
        not_pending = await c.post(
            consent_path,
            json={"channel": "EMAIL", "message_type": "NEWSLETTER", "confirm": True},
            headers=write,
        )
        assert error(not_pending)[:2] == (409, "consent_not_pending"), not_pending.text
        revoked = await c.post(
            consent_path,
            json={"channel": "SMS", "message_type": "MESSAGE", "status": "REVOKED", "source": "STOP reply"},
            headers=write,
        )
        assert revoked.status_code == 201, revoked.text
        consent = await c.get(consent_path, headers=read)
        assert consent.status_code == 200, consent.text
        current = {(r["channel"], r["message_type"]): r["status"] for r in consent.json()["current"]}
        assert current == {("EMAIL", "NEWSLETTER"): "GRANTED", ("SMS", "MESSAGE"): "REVOKED"}
        assert [r["status"] for r in consent.json()["history"]] == ["PENDING", "GRANTED", "REVOKED"]
        for body, field in (
            ({"channel": "EMAIL", "message_type": "NEWSLETTER"}, "status"),
            ({"channel": "FAX", "message_type": "NEWSLETTER", "status": "GRANTED"}, "channel"),
            (
                {"channel": "EMAIL", "message_type": "NEWSLETTER", "status": "REVOKED", "confirm": True},
                "status",
            ),
        ):
            reply = await c.post(consent_path, json=body, headers=write)
            assert error(reply) == (400, "validation_failed", [field]), (body, reply.text)
        body = {"channel": "EMAIL", "message_type": "NEWSLETTER", "status": "GRANTED"}
        assert error(await c.post(f"/v1/contacts/{UNKNOWN}/consent", json=body, headers=write))[0] == 404
        assert error(await c.get(f"/v1/contacts/{UNKNOWN}/consent", headers=read))[0] == 404
        assert error(await c.post(consent_path, json=body, headers=read))[0] == 403

        # Events: stored at once, as QueryEvents on the segment service shows.
        events_path = f"/v1/contacts/{cid}/events"
        recorded = await c.post(
            events_path,
            json={
                "events": [
                    {
                        "type": "order.placed",
                        "occurred_at": "2026-01-31T12:00:00+01:00",
                        "properties": {"total_cents": 2390, "items": ["a", "b"]},
                    },
                    {"type": "cart.viewed"},
                ]
            },
            headers=write,
        )
        assert (recorded.status_code, recorded.json()) == (201, {"recorded": 2}), recorded.text
        answer = await m.segment.QueryEvents(
            spb.QueryEventsRequest(
                workspace_id=ws,
                queries=[
                    spb.EventQuery(contact_id=cid, type="order.placed"),
                    spb.EventQuery(contact_id=cid, type="cart.viewed"),
                    spb.EventQuery(contact_id=cid, type="never.happened"),
                ],
            )
        )
        assert list(answer.occurred) == [True, True, False]
        for body, field in (
            ({"events": [{"type": "bad type!"}]}, "events.0.type"),
            ({"events": []}, "events"),
            ({"events": [{"type": "x", "occurred_at": "2026-01-31T12:00:00"}]}, "events.0.occurred_at"),
            ({"events": [{"type": "x", "properties": []}]}, "events.0.properties"),
            # Engagement events come from providers only: a key cannot fake an open.
            ({"events": [{"type": "email.opened"}]}, "events.0.type"),
            ({"events": [{"type": "x"}, {"type": "Message.Delivered"}]}, "events.1.type"),
        ):
            reply = await c.post(events_path, json=body, headers=write)
            assert error(reply) == (400, "validation_failed", [field]), (body, reply.text)
        one = {"events": [{"type": "x"}]}
        assert error(await c.post(f"/v1/contacts/{UNKNOWN}/events", json=one, headers=write))[:2] == (
            404,
            "not_found",
        )
        assert error(await c.post(events_path, json=one, headers=read))[0] == 403
