"""`/v1/segments` over the real mesh: CRUD, the JSON filter tree (round trip, every node kind),
saved and ad-hoc estimates equal to the contacts that match, 400/422 naming the tree path,
404, scopes and workspaces."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.e2e.rest import rest_mesh

UNKNOWN = "seg_0000000000AAAAAAAAAA"


def error(reply: Any) -> tuple[int, str, list[str]]:
    body = reply.json()
    return reply.status_code, body["error"], [d["field"] for d in body["details"]]


PEOPLE: list[dict[str, Any]] = [
    # 0: pro, vip, newsletter consent
    {
        "email": "a@example.com",
        "tags": ["vip"],
        "fields": {"plan": "pro", "seats": 10},
        "consents": [{"channel": "EMAIL", "message_type": "NEWSLETTER", "status": "GRANTED"}],
    },
    # 1: pro, no tag
    {"email": "b@example.com", "fields": {"plan": "pro", "seats": 2}},
    # 2: basic, vip
    {"email": "c@example.com", "tags": ["vip"], "fields": {"plan": "basic"}},
    # 3: pro, vip, newsletter consent revoked
    {
        "email": "d@example.com",
        "tags": ["vip"],
        "fields": {"plan": "pro", "renews": {"timestamp": "2026-09-01T00:00:00Z"}},
        "consents": [{"channel": "EMAIL", "message_type": "NEWSLETTER", "status": "REVOKED"}],
    },
    # 4: no plan, blocked
    {"phone": "+4915123456789", "status": "BLOCKED", "fields": {"plan": 3}},
]


async def test_segments_crud_filters_estimates_and_errors(nats_url: str, tmp_path: Path) -> None:
    async with rest_mesh(nats_url, tmp_path) as (m, rest):
        ws = m.workspace_id
        c = rest.client
        write = await rest.key(ws, "contacts:write")
        read = await rest.key(ws, "contacts:read")
        wrong = await rest.key(ws, "campaigns:write")
        other = await rest.key("ws_other", "contacts:write")

        ids = []
        for person in PEOPLE:
            made = await c.post("/v1/contacts", json=person, headers=write)
            assert made.status_code == 201, made.text
            ids.append(made.json()["id"])
        events = {"events": [{"type": "order.placed"}, {"type": "order.placed"}]}
        assert (await c.post(f"/v1/contacts/{ids[1]}/events", json=events, headers=write)).status_code == 201
        one_event = {"events": [{"type": "order.placed"}]}
        assert (
            await c.post(f"/v1/contacts/{ids[2]}/events", json=one_event, headers=write)
        ).status_code == 201

        # Create: the filter comes back exactly as written; the estimate counts the matches.
        pro_vips = {"and": [{"field": "fields.plan", "op": "eq", "value": "pro"}, {"tag": "vip"}]}
        made = await c.post("/v1/segments", json={"name": "Pro VIPs", "filter": pro_vips}, headers=write)
        assert made.status_code == 201, made.text
        segment = made.json()
        sid = segment["id"]
        assert sid.startswith("seg_")
        assert (segment["name"], segment["filter"]) == ("Pro VIPs", pro_vips)
        assert segment["created_at"].endswith("Z")
        got = await c.get(f"/v1/segments/{sid}", headers=read)
        assert (got.status_code, got.json()) == (200, segment)
        size = await c.get(f"/v1/segments/{sid}/estimate", headers=read)
        assert (size.status_code, size.json()) == (200, {"size": 2}), size.text
        members = await c.get("/v1/contacts", params={"segment_id": sid}, headers=read)
        assert [i["id"] for i in members.json()["items"]] == [ids[0], ids[3]]
        narrowed = await c.get(
            "/v1/contacts", params={"segment_id": sid, "email": "d@example.com"}, headers=read
        )
        assert [i["id"] for i in narrowed.json()["items"]] == [ids[3]]

        # Ad-hoc estimates: one per node kind, each equal to the contacts built to match.
        cases: list[tuple[Any, set[int]]] = [
            (
                {"and": [*pro_vips["and"], {"consent": {"channel": "EMAIL", "message_type": "NEWSLETTER"}}]},
                {0},
            ),
            (
                {"consent": {"channel": "EMAIL", "message_type": "NEWSLETTER", "status": "REVOKED"}},
                {3},
            ),
            ({"or": [{"tag": "vip"}, {"field": "fields.seats", "op": "gte", "value": 2}]}, {0, 1, 2, 3}),
            ({"not": {"tag": "vip"}}, {1, 4}),
            ({"field": "fields.plan", "op": "in", "value": ["pro", "basic"]}, {0, 1, 2, 3}),
            ({"field": "fields.plan", "op": "eq", "value": 3}, {4}),
            ({"field": "fields.plan", "op": "neq", "value": "pro"}, {2, 4}),
            ({"field": "fields.seats", "op": "GT", "value": 5}, {0}),
            ({"field": "fields.renews", "op": "gt", "value": "2026-01-01T00:00:00Z"}, {3}),
            (
                {"field": "fields.renews", "op": "eq", "value": {"timestamp": "2026-09-01T02:00:00+02:00"}},
                {3},
            ),
            ({"field": "phone", "op": "exists"}, {4}),
            ({"field": "email", "op": "contains", "value": "B@EXAMPLE"}, {1}),
            ({"field": "status", "op": "eq", "value": "BLOCKED"}, {4}),
            ({"field": "created_at", "op": "gte", "value": "2000-01-01T00:00:00Z"}, {0, 1, 2, 3, 4}),
            ({"event": {"type": "order.placed"}}, {1, 2}),
            ({"event": {"type": "order.placed", "min_count": 2, "within_seconds": 3600}}, {1}),
            ({"event": {"type": "order.placed", "max_count": 1}}, {0, 2, 3, 4}),
            (None, {0, 1, 2, 3, 4}),
        ]
        for tree, expected in cases:
            reply = await c.post("/v1/segments/estimate", json={"filter": tree}, headers=read)
            assert (reply.status_code, reply.json()) == (200, {"size": len(expected)}), (tree, reply.text)
            if tree is None:
                continue
            saved = await c.post("/v1/segments", json={"name": "case", "filter": tree}, headers=write)
            assert saved.status_code == 201, (tree, saved.text)
            listed = await c.get("/v1/contacts", params={"segment_id": saved.json()["id"]}, headers=read)
            assert {i["id"] for i in listed.json()["items"]} == {ids[i] for i in expected}, tree
            assert (await c.delete(f"/v1/segments/{saved.json()['id']}", headers=write)).status_code == 204
        assert (await c.post("/v1/segments/estimate", json={}, headers=read)).json() == {"size": 5}

        # Round trip: timestamps come back plain where plain strings mean timestamps, wrapped
        # elsewhere; an upper-case operator comes back in lower case; defaults are spelled out.
        tree = {
            "and": [
                {"field": "created_at", "op": "gte", "value": "2000-01-01T00:00:00Z"},
                {"field": "fields.renews", "op": "in", "value": [{"timestamp": "2026-09-01T00:00:00Z"}]},
                {"field": "fields.seats", "op": "LT", "value": 2.5},
                {"consent": {"channel": "SMS", "message_type": "MESSAGE"}},
                {"event": {"type": "order.placed"}},
            ]
        }
        saved = (
            await c.post("/v1/segments", json={"name": "round trip", "filter": tree}, headers=write)
        ).json()
        assert saved["filter"] == {
            "and": [
                {"field": "created_at", "op": "gte", "value": "2000-01-01T00:00:00Z"},
                {"field": "fields.renews", "op": "in", "value": [{"timestamp": "2026-09-01T00:00:00Z"}]},
                {"field": "fields.seats", "op": "lt", "value": 2.5},
                {"consent": {"channel": "SMS", "message_type": "MESSAGE", "status": "GRANTED"}},
                {"event": {"type": "order.placed", "min_count": 1}},
            ]
        }

        # List: oldest first, in pages.
        page1 = await c.get("/v1/segments", params={"limit": 1}, headers=read)
        assert page1.status_code == 200, page1.text
        assert [s["id"] for s in page1.json()["items"]] == [sid]
        assert page1.json()["items"][0] == segment
        page2 = await c.get(
            "/v1/segments", params={"limit": 1, "cursor": page1.json()["next_cursor"]}, headers=read
        )
        assert [s["id"] for s in page2.json()["items"]] == [saved["id"]]
        whole = (await c.get("/v1/segments", headers=read)).json()
        assert ([s["id"] for s in whole["items"]], whole["next_cursor"]) == ([sid, saved["id"]], None)
        assert error(await c.get("/v1/segments", params={"cursor": "x"}, headers=read))[2] == ["cursor"]

        # PATCH: the name alone, the filter alone; `filter: null` matches everyone.
        renamed = await c.patch(f"/v1/segments/{sid}", json={"name": "Pro VIPs (all)"}, headers=write)
        assert (renamed.status_code, renamed.json()["name"], renamed.json()["filter"]) == (
            200,
            "Pro VIPs (all)",
            pro_vips,
        )
        refiltered = await c.patch(f"/v1/segments/{sid}", json={"filter": {"tag": "vip"}}, headers=write)
        assert (refiltered.json()["name"], refiltered.json()["filter"]) == ("Pro VIPs (all)", {"tag": "vip"})
        assert (await c.get(f"/v1/segments/{sid}/estimate", headers=read)).json() == {"size": 3}
        cleared = await c.patch(f"/v1/segments/{sid}", json={"filter": None}, headers=write)
        assert (cleared.status_code, cleared.json()["filter"]) == (200, None), cleared.text
        assert (await c.get(f"/v1/segments/{sid}/estimate", headers=read)).json() == {"size": 5}
        same = await c.patch(f"/v1/segments/{sid}", json={}, headers=write)
        assert (same.status_code, same.json()) == (200, cleared.json())

        # Shape errors: 400 naming the path in the tree.
        for bad, field in (
            ({"and": {"tag": "x"}}, "filter.and"),
            (
                {"and": [{"tag": "vip"}, {"field": "fields.plan", "op": "like", "value": "x"}]},
                "filter.and.1.op",
            ),
            (
                {"or": [{"tag": "vip"}, {"field": "fields.plan", "op": "eq", "value": ["a"]}]},
                "filter.or.1.value",
            ),
            ({"field": "fields.plan", "op": "in", "value": "pro"}, "filter.value"),
            ({"field": "fields.plan", "op": "eq"}, "filter.value"),
            ({"field": "fields.plan", "op": "eq", "value": {"a": 1}}, "filter.value"),
            ({"field": "phone", "op": "exists", "value": 1}, "filter.value"),
            ({"tag": "vip", "colour": "red"}, "filter.colour"),
            ({"tag": 5}, "filter.tag"),
            ({"not": [1]}, "filter.not"),
            ({}, "filter"),
            ({"tag": "a", "not": {"tag": "b"}}, "filter"),
            ({"consent": {"channel": "FAX", "message_type": "MESSAGE"}}, "filter.consent.channel"),
            ({"consent": {"channel": "SMS"}}, "filter.consent.message_type"),
            ({"event": {"type": "x", "min_count": "1"}}, "filter.event.min_count"),
            ({"event": {"type": "x", "min_count": 2**40}}, "filter.event.min_count"),
            ({"event": {"type": "x", "every": 1}}, "filter.event.every"),
        ):
            for path, key in (("/v1/segments", write), ("/v1/segments/estimate", read)):
                reply = await c.post(
                    path,
                    json={"name": "bad", "filter": bad} if "estimate" not in path else {"filter": bad},
                    headers=key,
                )
                assert error(reply) == (400, "validation_failed", [field]), (bad, path, reply.text)
        # Semantic errors (the service's rules): 422 `invalid_filter`, same paths.
        deep: dict[str, Any] = {"tag": "vip"}
        for _ in range(14):
            deep = {"not": deep}
        for bad, field in (
            (
                {"and": [{"tag": "vip"}, {"field": "fields.plan", "op": "gt", "value": "pro"}]},
                "filter.and.1.value",
            ),
            ({"field": "first_name", "op": "eq", "value": 5}, "filter.value"),
            ({"field": "fields.plan", "op": "contains", "value": 5}, "filter.value"),
            ({"field": "plan", "op": "eq", "value": "pro"}, "filter.field"),
            ({"field": "fields.bad-name", "op": "eq", "value": "pro"}, "filter.field"),
            ({"or": [{"tag": "vip"}, {"and": []}]}, "filter.or.1.and"),
            ({"field": "status", "op": "eq", "value": "GONE"}, "filter.value"),
            ({"tag": " "}, "filter.tag"),
            ({"event": {"type": "x", "min_count": 3, "max_count": 1}}, "filter.event.max_count"),
            ({"event": {"type": "bad type!"}}, "filter.event.type"),
        ):
            for path, key in (("/v1/segments", write), ("/v1/segments/estimate", read)):
                reply = await c.post(
                    path,
                    json={"name": "bad", "filter": bad} if "estimate" not in path else {"filter": bad},
                    headers=key,
                )
                assert error(reply) == (422, "invalid_filter", [field]), (bad, path, reply.text)
        too_deep = await c.post("/v1/segments/estimate", json={"filter": deep}, headers=read)
        assert error(too_deep)[:2] == (422, "invalid_filter"), too_deep.text
        assert error(await c.patch(f"/v1/segments/{sid}", json={"filter": {"and": []}}, headers=write)) == (
            422,
            "invalid_filter",
            ["filter.and"],
        )
        # Other validation: the name, unknown keys, malformed ids.
        assert error(await c.post("/v1/segments", json={"name": " "}, headers=write)) == (
            400,
            "validation_failed",
            ["name"],
        )
        assert error(await c.post("/v1/segments", json={"filter": {"tag": "x"}}, headers=write))[2] == [
            "name"
        ]
        assert error(await c.post("/v1/segments", json={"name": "x", "size": 1}, headers=write))[2] == [
            "size"
        ]
        assert error(await c.patch(f"/v1/segments/{sid}", json={"name": ""}, headers=write))[2] == ["name"]
        assert error(await c.get("/v1/segments/nope", headers=read))[:2] == (400, "validation_failed")

        # 404: unknown here, or another workspace's.
        for method, path in (
            ("GET", f"/v1/segments/{UNKNOWN}"),
            ("GET", f"/v1/segments/{UNKNOWN}/estimate"),
            ("PATCH", f"/v1/segments/{UNKNOWN}"),
            ("DELETE", f"/v1/segments/{UNKNOWN}"),
        ):
            reply = await c.request(
                method, path, json={"name": "x"} if method == "PATCH" else None, headers=write
            )
            assert error(reply)[:2] == (404, "not_found"), (method, path, reply.text)
        for method, path in (("GET", f"/v1/segments/{sid}"), ("GET", f"/v1/segments/{sid}/estimate")):
            assert error(await c.request(method, path, headers=other))[:2] == (404, "not_found")
        assert (await c.get("/v1/segments", headers=other)).json() == {"items": [], "next_cursor": None}
        assert (await c.post("/v1/segments/estimate", json={}, headers=other)).json() == {"size": 0}

        # Scopes: reading needs contacts:read, writing contacts:write.
        for method, path, body, key in (
            ("POST", "/v1/segments", {"name": "x"}, read),
            ("PATCH", f"/v1/segments/{sid}", {"name": "x"}, read),
            ("DELETE", f"/v1/segments/{sid}", None, read),
            ("GET", "/v1/segments", None, wrong),
            ("GET", f"/v1/segments/{sid}", None, wrong),
            ("GET", f"/v1/segments/{sid}/estimate", None, wrong),
            ("POST", "/v1/segments/estimate", {}, wrong),
        ):
            reply = await c.request(method, path, json=body, headers=key)
            assert error(reply)[:2] == (403, "forbidden"), (method, path)

        # Delete: 204, then 404.
        deleted = await c.delete(f"/v1/segments/{sid}", headers=write)
        assert (deleted.status_code, deleted.content) == (204, b"")
        assert error(await c.get(f"/v1/segments/{sid}", headers=read))[0] == 404
        assert error(await c.delete(f"/v1/segments/{sid}", headers=write))[0] == 404
