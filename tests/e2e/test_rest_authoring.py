"""Campaign authoring and management over REST, in front of the real mesh.

A multi-node flow written as JSON goes in and comes back identical; validation reports broken
rules as data with node ids and JSON paths; a manual launch runs to COMPLETED and leaves runs,
transitions and executions (with trace ids and sends) to read; scheduling round-trips; and the
status codes: 400 naming the path, 402, 403 for scopes and campaign restrictions, 404, 409, 422.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.keys import create_key
from shoal.v1 import billing_pb2 as bpb
from shoal.v1 import template_pb2 as tpb
from tests.e2e.rest import Rest, rest_mesh
from tests.e2e.test_thin_run import EMAIL, MESSAGE, seed
from tests.helpers import wait_for

MISSING = "9a4c0d5e-0000-4000-8000-123456789abc"
MISSING_EXECUTION = "ex_" + "0" * 32


def send(step_id: str, template_id: str) -> dict[str, Any]:
    return {
        "id": step_id,
        "send": {
            "channel": "EMAIL",
            "message_type": "MESSAGE",
            "template": {"template_id": template_id, "version": 0},
        },
    }


def end(step_id: str) -> dict[str, Any]:
    return {"id": step_id, "end": {}}


def full_flow(template_id: str) -> dict[str, Any]:
    """Every node type: SEND, WAIT, CONDITION (engagement), TAG, AB_TEST, END; short enough to finish."""
    return {
        "steps": [
            {**send("s1", template_id), "name": "welcome"},
            {"id": "w1", "wait": {"duration": "PT1S"}},
            {
                "id": "c1",
                "name": "opened?",
                "condition": {
                    "predicate": {"engagement": {"node_id": "s1", "event": "opened"}},
                    "yes": [{"id": "t1", "tag": {"tag": "engaged", "action": "ADD"}}, end("e1")],
                    "no": [
                        {
                            "id": "ab",
                            "ab_test": {
                                "variants": [
                                    {
                                        "name": "A",
                                        "weight": 50,
                                        "steps": [send("s2", template_id), end("e2")],
                                    },
                                    {"name": "B", "weight": 50, "steps": [end("e3")]},
                                ]
                            },
                        }
                    ],
                },
            },
        ]
    }


def broken_flow(template_id: str) -> dict[str, Any]:
    """A/B weights summing to 90, and variant A's path ends in a TAG instead of END."""
    return {
        "steps": [
            send("s1", template_id),
            {
                "id": "ab",
                "ab_test": {
                    "variants": [
                        {
                            "name": "A",
                            "weight": 60,
                            "steps": [{"id": "t1", "tag": {"tag": "x", "action": "ADD"}}],
                        },
                        {"name": "B", "weight": 30, "steps": [end("e2")]},
                    ]
                },
            },
        ]
    }


async def restricted_key(
    rest: Rest, workspace: str, scopes: list[str], campaigns: list[str]
) -> dict[str, str]:
    created = await rest.app.state.auth.db.run(
        create_key, workspace_id=workspace, scopes=scopes, campaign_ids=campaigns
    )
    return {"Authorization": f"Bearer {created.key}"}


def assert_error(reply: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    body: dict[str, Any] = reply.json()
    assert set(body) == {"error", "message", "details"}, body
    assert body["error"] == code, body
    return body


async def test_author_validate_launch_and_inspect_a_campaign(
    nats_url: str, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    async with rest_mesh(nats_url, tmp_path) as (m, rest):
        ws = m.workspace_id
        segment_id, template_id = await seed(m, tag="authoring")
        write = await rest.key(ws, "campaigns:write")
        read = await rest.key(ws, "campaigns:read")
        c = rest.client

        # Create: 201, a DRAFT whose trigger and flow are exactly what was posted.
        body = {
            "name": "Welcome series",
            "segment_id": segment_id,
            "trigger": {"manual": {}},
            "flow": full_flow(template_id),
        }
        created = await c.post("/v1/campaigns", json=body, headers=write)
        assert created.status_code == 201, created.text
        campaign = created.json()
        cid = campaign["id"]
        assert (campaign["state"], campaign["flow_version"], campaign["current_run_id"]) == ("DRAFT", 1, None)
        assert (campaign["name"], campaign["segment_id"], campaign["trigger"]) == (
            "Welcome series",
            segment_id,
            {"manual": {}},
        )
        assert campaign["flow"] == body["flow"]
        got = await c.get(f"/v1/campaigns/{cid}", headers=read)
        assert got.status_code == 200, got.text
        assert got.json() == campaign

        # Lists: the campaign, without its flow; filtered by state.
        listed = await c.get("/v1/campaigns", headers=read)
        assert listed.status_code == 200, listed.text
        assert [i["id"] for i in listed.json()["items"]] == [cid]
        assert "flow" not in listed.json()["items"][0] and listed.json()["next_cursor"] is None
        assert (await c.get("/v1/campaigns?state=DRAFT", headers=read)).json()["items"][0]["id"] == cid
        assert (await c.get("/v1/campaigns?state=RUNNING", headers=read)).json()["items"] == []

        # Valid as authored.
        valid = await c.post(f"/v1/campaigns/{cid}/validate", headers=read)
        assert (valid.status_code, valid.json()) == (200, {"valid": True, "errors": []}), valid.text

        # A DRAFT's flow can be replaced; broken rules are data from validate, a 422 from start.
        patched = await c.patch(
            f"/v1/campaigns/{cid}", json={"flow": broken_flow(template_id)}, headers=write
        )
        assert patched.status_code == 200, patched.text
        assert patched.json()["flow"] == broken_flow(template_id)
        assert (patched.json()["flow_version"], patched.json()["name"]) == (2, "Welcome series")
        report = (await c.post(f"/v1/campaigns/{cid}/validate", headers=read)).json()
        assert report["valid"] is False
        problems = {(e["node_id"], e["rule"], e["field"]) for e in report["errors"]}
        assert ("ab", "ab_test.weights", "flow.steps.1.ab_test.variants") in problems, report
        assert ("t1", "path.ends_in_end", "flow.steps.1.ab_test.variants.0.steps.0") in problems, report
        blocked = assert_error(
            await c.post(f"/v1/campaigns/{cid}/start", headers=write), 422, "launch_blocked"
        )
        fields = {d["field"]: d["message"] for d in blocked["details"]}
        assert fields["flow.steps.1.ab_test.variants"].startswith("ab: ab_test.weights"), blocked
        assert fields["flow.steps.1.ab_test.variants.0.steps.0"].startswith("t1: path.ends_in_end"), blocked

        # A template that is not published is named at its node's template path.
        unpublished = (
            await m.template.CreateTemplate(
                tpb.CreateTemplateRequest(
                    workspace_id=ws,
                    name="draft",
                    channel=EMAIL,
                    message_type=MESSAGE,
                    content=tpb.TemplateContent(email=tpb.EmailContent(subject="Hi", html="<p>Hi</p>")),
                )
            )
        ).template.id
        bad_template = {"steps": [send("s1", template_id), send("s9", unpublished), end("e1")]}
        assert (
            await c.patch(f"/v1/campaigns/{cid}", json={"flow": bad_template}, headers=write)
        ).status_code == 200
        report = (await c.post(f"/v1/campaigns/{cid}/validate", headers=read)).json()
        assert [(e["node_id"], e["field"], e["rule"]) for e in report["errors"]] == [
            ("s9", "flow.steps.1.send.template", "send.template_launchable")
        ], report
        blocked = assert_error(
            await c.post(f"/v1/campaigns/{cid}/start", headers=write), 422, "launch_blocked"
        )
        assert [d["field"] for d in blocked["details"]] == ["flow.steps.1.send.template"], blocked
        assert blocked["details"][0]["message"].startswith("s9: "), blocked

        # Back to the full flow: identical again, a new version.
        restored = await c.patch(
            f"/v1/campaigns/{cid}", json={"flow": full_flow(template_id), "name": "Welcome"}, headers=write
        )
        assert restored.status_code == 200, restored.text
        assert (restored.json()["flow"], restored.json()["flow_version"]) == (full_flow(template_id), 4)
        assert (await c.get(f"/v1/campaigns/{cid}", headers=read)).json()["flow"] == full_flow(template_id)

        # Estimate: 3 contacts, a cost the balance covers.
        estimate = await c.get(f"/v1/campaigns/{cid}/estimate", headers=read)
        assert estimate.status_code == 200, estimate.text
        figures = estimate.json()
        assert figures["audience_size"] == 3 and figures["balance_sufficient"] is True, figures
        assert 0 < figures["expected_cost_cents"] <= figures["upper_bound_cost_cents"], figures
        assert figures["free_balance_cents"] == 10_000

        # Start: 202 with the run; the short flow runs to COMPLETED.
        started = await c.post(f"/v1/campaigns/{cid}/start", headers=write)
        assert started.status_code == 202, started.text
        run_id = started.json()["run_id"]
        assert started.json() == {"run_id": run_id, "status": "RUNNING"}

        async def completed() -> Any:
            status = (await c.get(f"/v1/campaigns/{cid}/status", headers=read)).json()
            return status if status["state"] == "COMPLETED" else None

        status = await wait_for(completed, timeout=30, message=m.sandbox.logs)
        assert status["counts"]["completed"] == 3 and status["run_id"] == run_id

        # Launched: the flow is frozen (409), a second start is refused (409).
        frozen = await c.patch(f"/v1/campaigns/{cid}", json={"flow": broken_flow(template_id)}, headers=write)
        assert "COMPLETED" in assert_error(frozen, 409, "wrong_state")["message"]
        assert_error(await c.post(f"/v1/campaigns/{cid}/start", headers=write), 409, "wrong_state")

        # Runs and transitions.
        runs = (await c.get(f"/v1/campaigns/{cid}/runs", headers=read)).json()
        assert [(r["id"], r["state"], r["flow_version"]) for r in runs["items"]] == [(run_id, "COMPLETED", 4)]
        assert runs["items"][0]["ended_at"] and runs["next_cursor"] is None
        history = (await c.get(f"/v1/campaigns/{cid}/transitions", headers=read)).json()
        key_id = write["Authorization"].split("_")[1]
        assert [(t["from_state"], t["to_state"], t["actor"]) for t in history["items"]] == [
            ("DRAFT", "RUNNING", f"api_key:{key_id}"),
            ("RUNNING", "COMPLETED", "execution"),
        ], history
        assert history["items"][1]["reason"] == "all executions terminal"
        assert history["items"][1]["run_id"] == run_id
        first = (await c.get(f"/v1/campaigns/{cid}/transitions?limit=1", headers=read)).json()
        assert len(first["items"]) == 1 and first["next_cursor"]
        rest_of = await c.get(
            f"/v1/campaigns/{cid}/transitions",
            params={"limit": 1, "cursor": first["next_cursor"]},
            headers=read,
        )
        assert [t["to_state"] for t in rest_of.json()["items"]] == ["COMPLETED"]
        assert rest_of.json()["next_cursor"] is None
        bad_cursor = await c.get(f"/v1/campaigns/{cid}/runs", params={"cursor": "nope"}, headers=read)
        assert assert_error(bad_cursor, 400, "validation_failed")["details"][0]["field"] == "cursor"

        # Executions: three, all completed at an END node; the filters and the cursor work.
        url = f"/v1/campaigns/{cid}/executions"
        everything = (await c.get(url, headers=read)).json()
        executions = everything["items"]
        assert len(executions) == 3 and everything["next_cursor"] is None
        assert {e["state"] for e in executions} == {"completed"}
        assert {e["run_id"] for e in executions} == {run_id}
        assert {e["node_id"] for e in executions} <= {"e1", "e2", "e3"}
        assert len((await c.get(url, params={"run_id": run_id}, headers=read)).json()["items"]) == 3
        assert (await c.get(url, params={"run_id": MISSING}, headers=read)).json()["items"] == []
        assert len((await c.get(url, params={"state": "completed"}, headers=read)).json()["items"]) == 3
        assert (await c.get(url, params={"state": "failed"}, headers=read)).json()["items"] == []
        by_node: dict[str, int] = {}
        for node in ("e1", "e2", "e3"):
            page = (await c.get(url, params={"node_id": node}, headers=read)).json()
            assert {e["node_id"] for e in page["items"]} <= {node}
            by_node[node] = len(page["items"])
        assert sum(by_node.values()) == 3, by_node
        assert (await c.get(url, params={"node_id": "s1"}, headers=read)).json()["items"] == []
        seen, cursor = [], None
        while True:
            params: dict[str, Any] = {"limit": 1, **({"cursor": cursor} if cursor else {})}
            page = (await c.get(url, params=params, headers=read)).json()
            seen += [e["id"] for e in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == [e["id"] for e in executions]
        node = next(n for n, count in by_node.items() if count)
        paged = (await c.get(url, params={"node_id": node, "limit": 1}, headers=read)).json()
        assert len(paged["items"]) == 1 and (paged["next_cursor"] is not None) == (by_node[node] > 1)

        # One execution: its trace id and its sends.
        one = executions[0]
        detail = await c.get(f"/v1/executions/{one['id']}", headers=read)
        assert detail.status_code == 200, detail.text
        got_one = detail.json()
        assert {k: v for k, v in got_one.items() if k != "sends"} == one
        trace_id = got_one["trace_id"]
        assert trace_id and re.fullmatch(r"[0-9a-f]{32}", trace_id), got_one
        # The id finds the run's trace: the execution's node spans are in it.
        traced = {s.name for s in spans.get_finished_spans() if f"{s.context.trace_id:032x}" == trace_id}
        assert "shoal.node send" in traced, sorted(traced)
        assert got_one["sends"] and got_one["sends"][0]["node_id"] == "s1"
        assert got_one["sends"][0]["channel"] == "EMAIL" and got_one["sends"][0]["cost_cents"] >= 0
        assert got_one["sends"][0]["status"] in ("ACCEPTED", "DELIVERED")
        if got_one["node_id"] == "e2":
            assert [s["node_id"] for s in got_one["sends"]] == ["s1", "s2"]
            assert got_one["ab_variant"] == "ab=A"
        assert_error(await c.get(f"/v1/executions/{MISSING_EXECUTION}", headers=read), 404, "not_found")

        # A key restricted to another campaign: 403 on this one and its executions, empty lists.
        other = (
            await c.post(
                "/v1/campaigns",
                json={"name": "other", "trigger": {"api": {}}, "flow": {"steps": []}},
                headers=write,
            )
        ).json()["id"]
        only_other = await restricted_key(rest, ws, ["campaigns:write"], [other])
        for method, path in [
            ("GET", f"/v1/campaigns/{cid}"),
            ("GET", f"/v1/campaigns/{cid}/runs"),
            ("GET", f"/v1/campaigns/{cid}/transitions"),
            ("GET", f"/v1/campaigns/{cid}/executions"),
            ("GET", f"/v1/campaigns/{cid}/estimate"),
            ("POST", f"/v1/campaigns/{cid}/validate"),
            ("POST", f"/v1/campaigns/{cid}/archive"),
            ("PATCH", f"/v1/campaigns/{cid}"),
            ("GET", f"/v1/executions/{one['id']}"),
        ]:
            reply = await c.request(
                method, path, headers=only_other, json={"name": "x"} if method == "PATCH" else None
            )
            assert_error(reply, 403, "forbidden")
        mine = (await c.get("/v1/campaigns", headers=only_other)).json()
        assert [i["id"] for i in mine["items"]] == [other] and mine["next_cursor"] is None
        assert (await c.get("/v1/campaigns?state=RUNNING", headers=only_other)).json()["items"] == []
        assert (await c.get(f"/v1/campaigns/{other}", headers=only_other)).status_code == 200
        refused = await c.post(
            "/v1/campaigns", json={"name": "n", "trigger": {"manual": {}}}, headers=only_other
        )
        assert "cannot create" in assert_error(refused, 403, "forbidden")["message"]
        # Restricted to the launched campaign: its execution is visible.
        only_this = await restricted_key(rest, ws, ["campaigns:read"], [cid])
        assert (await c.get(f"/v1/executions/{one['id']}", headers=only_this)).status_code == 200

        # Archive: from COMPLETED; archived twice is 409.
        archived = await c.post(f"/v1/campaigns/{cid}/archive", headers=write)
        assert (archived.status_code, archived.json()["state"]) == (200, "ARCHIVED"), archived.text
        assert archived.json()["flow"] == full_flow(template_id)
        assert_error(await c.post(f"/v1/campaigns/{cid}/archive", headers=write), 409, "wrong_state")


async def test_schedule_balance_scopes_and_malformed_requests(nats_url: str, tmp_path: Path) -> None:
    async with rest_mesh(nats_url, tmp_path) as (m, rest):
        ws = m.workspace_id
        segment_id, template_id = await seed(m, tag="schedule")
        write = await rest.key(ws, "campaigns:write")
        read = await rest.key(ws, "campaigns:read")
        c = rest.client
        flow = {"steps": [send("s1", template_id), end("e1")]}

        # Schedule round trip: authored local time in Paris -> SCHEDULED at the UTC instant.
        paris = ZoneInfo("Europe/Paris")
        local = (datetime.now(paris) + timedelta(days=30)).replace(hour=9, minute=30, second=0, microsecond=0)
        at = local.strftime("%Y-%m-%dT%H:%M")
        trigger = {"schedule": {"at": at, "time_zone": "Europe/Paris"}}
        made = await c.post(
            "/v1/campaigns",
            json={"name": "Launch day", "segment_id": segment_id, "trigger": trigger, "flow": flow},
            headers=write,
        )
        assert made.status_code == 201, made.text
        assert made.json()["trigger"] == trigger and made.json()["due_at"] is None
        cid = made.json()["id"]
        scheduled = await c.post(f"/v1/campaigns/{cid}/schedule", headers=write)
        assert scheduled.status_code == 200, scheduled.text
        assert scheduled.json()["state"] == "SCHEDULED"
        due = datetime.fromisoformat(scheduled.json()["due_at"])
        assert due == local.astimezone(UTC), (due, local)
        assert (await c.get(f"/v1/campaigns/{cid}/status", headers=read)).json()["state"] == "SCHEDULED"
        # Not a DRAFT any more: no edits, no second schedule.
        assert_error(
            await c.patch(f"/v1/campaigns/{cid}", json={"name": "x"}, headers=write), 409, "wrong_state"
        )
        assert_error(await c.post(f"/v1/campaigns/{cid}/schedule", headers=write), 409, "wrong_state")
        unscheduled = await c.post(f"/v1/campaigns/{cid}/unschedule", headers=write)
        assert unscheduled.status_code == 200, unscheduled.text
        assert (unscheduled.json()["state"], unscheduled.json()["due_at"]) == ("DRAFT", None)
        assert unscheduled.json()["trigger"] == trigger
        assert_error(await c.post(f"/v1/campaigns/{cid}/unschedule", headers=write), 409, "wrong_state")
        # An RFC 3339 instant is kept as the zone's wall-clock time.
        instant = (datetime.now(UTC) + timedelta(days=40)).replace(hour=7, minute=0, second=0, microsecond=0)
        again = await c.post(
            f"/v1/campaigns/{cid}/schedule",
            json={"at": instant.isoformat().replace("+00:00", "Z"), "time_zone": "Europe/Paris"},
            headers=write,
        )
        assert again.status_code == 200, again.text
        assert datetime.fromisoformat(again.json()["due_at"]) == instant
        expected_local = instant.astimezone(paris).strftime("%Y-%m-%dT%H:%M:%S")
        assert again.json()["trigger"] == {"schedule": {"at": expected_local, "time_zone": "Europe/Paris"}}
        assert (await c.post(f"/v1/campaigns/{cid}/unschedule", headers=write)).status_code == 200
        # A time in the past names `at`; a schedule without a zone names `time_zone`.
        past = await c.post(
            f"/v1/campaigns/{cid}/schedule",
            json={"at": "2020-01-01T09:00", "time_zone": "Europe/Paris"},
            headers=write,
        )
        assert [d["field"] for d in assert_error(past, 400, "validation_failed")["details"]] == ["at"]
        zoneless = await c.post(
            f"/v1/campaigns/{cid}/schedule", json={"at": "2099-01-01T09:00"}, headers=write
        )
        assert [d["field"] for d in assert_error(zoneless, 400, "validation_failed")["details"]] == [
            "time_zone"
        ]
        bad_zone = await c.post(
            f"/v1/campaigns/{cid}/schedule",
            json={"at": "2099-01-01T09:00", "time_zone": "Mars/Olympus"},
            headers=write,
        )
        assert [d["field"] for d in assert_error(bad_zone, 400, "validation_failed")["details"]] == [
            "time_zone"
        ]

        # A manual campaign cannot be scheduled (409); an API campaign cannot be started (409).
        manual = (
            await c.post(
                "/v1/campaigns",
                json={"name": "m", "segment_id": segment_id, "trigger": {"manual": {}}, "flow": flow},
                headers=write,
            )
        ).json()["id"]
        assert_error(await c.post(f"/v1/campaigns/{manual}/schedule", headers=write), 409, "not_scheduled")
        api = (
            await c.post(
                "/v1/campaigns",
                json={"name": "a", "segment_id": segment_id, "trigger": {"api": {}}, "flow": flow},
                headers=write,
            )
        ).json()["id"]
        assert_error(await c.post(f"/v1/campaigns/{api}/start", headers=write), 409, "api_triggered")

        # 402: with the free balance held elsewhere, start is refused and the estimate says so.
        free = (await m.billing.GetBalance(bpb.GetBalanceRequest(workspace_id=ws))).balance.free_cents
        await m.billing.HoldBatch(
            bpb.HoldBatchRequest(
                workspace_id=ws,
                items=[bpb.HoldItem(key="drain:1", channel=EMAIL, message_type=MESSAGE, units=int(free))],
            )
        )
        assert (await m.billing.GetBalance(bpb.GetBalanceRequest(workspace_id=ws))).balance.free_cents == 0
        short = (await c.get(f"/v1/campaigns/{manual}/estimate", headers=read)).json()
        assert (short["free_balance_cents"], short["balance_sufficient"]) == (0, False), short
        assert_error(
            await c.post(f"/v1/campaigns/{manual}/start", headers=write), 402, "insufficient_balance"
        )
        assert (await c.get(f"/v1/campaigns/{manual}", headers=read)).json()["state"] == "DRAFT"
        await m.billing.ReleaseBatch(bpb.ReleaseBatchRequest(workspace_id=ws, keys=["drain:1"]))

        # PATCH: segment_id null clears it; an empty body and a null name are 400.
        cleared = await c.patch(f"/v1/campaigns/{manual}", json={"segment_id": None}, headers=write)
        assert (cleared.status_code, cleared.json()["segment_id"]) == (200, None), cleared.text
        assert cleared.json()["flow"] == flow and cleared.json()["flow_version"] == 1
        assert_error(
            await c.patch(f"/v1/campaigns/{manual}", json={}, headers=write), 400, "validation_failed"
        )
        null_name = await c.patch(f"/v1/campaigns/{manual}", json={"name": None}, headers=write)
        assert [d["field"] for d in assert_error(null_name, 400, "validation_failed")["details"]] == ["name"]
        no_segment = (await c.post(f"/v1/campaigns/{manual}/validate", headers=read)).json()
        assert [(e["node_id"], e["field"], e["rule"]) for e in no_segment["errors"]] == [
            (None, "segment_id", "campaign.segment")
        ]

        # 400 for malformed flow JSON, naming the path; nothing is created.
        before = len((await c.get("/v1/campaigns", headers=read)).json()["items"])
        cases: list[tuple[dict[str, Any], str]] = [
            ({"steps": [{"id": "s1", "send": {"channel": "FAX"}}]}, "flow.steps.0.send.channel"),
            (
                {"steps": [end("e0"), {"id": "w1", "wait": {"duration": "1 hour"}}]},
                "flow.steps.1.wait.duration",
            ),
            ({"steps": [{"id": "x", "send": {}, "end": {}}]}, "flow.steps.0"),
            ({"steps": [{"id": "x", "sned": {}}]}, "flow.steps.0.sned"),
            (
                {
                    "steps": [
                        {"id": "c", "condition": {"predicate": {"field": "age", "op": "eq", "value": 1}}}
                    ]
                },
                "flow.steps.0.condition.predicate.field",
            ),
            (
                {
                    "steps": [
                        {
                            "id": "c",
                            "condition": {
                                "predicate": {"tag": "a"},
                                "yes": [{"id": "t", "tag": {"action": "FLIP"}}],
                            },
                        }
                    ]
                },
                "flow.steps.0.condition.yes.0.tag.action",
            ),
            (
                {"steps": [{"id": "a", "ab_test": {"variants": [{"name": "A", "weight": 101}]}}]},
                "flow.steps.0.ab_test.variants.0.weight",
            ),
            (
                {"steps": [{"id": "s", "send": {"template": {"template_id": "nope"}}}]},
                "flow.steps.0.send.template.template_id",
            ),
            ({"steps": "s1"}, "flow.steps"),
        ]
        for bad, field in cases:
            reply = await c.post(
                "/v1/campaigns", json={"name": "bad", "trigger": {"manual": {}}, "flow": bad}, headers=write
            )
            details = assert_error(reply, 400, "validation_failed")["details"]
            assert field in [d["field"] for d in details], (bad, details)
        reply = await c.post(
            "/v1/campaigns", json={"name": "bad", "trigger": {"manual": {}, "api": {}}}, headers=write
        )
        assert "trigger" in [d["field"] for d in assert_error(reply, 400, "validation_failed")["details"]]
        reply = await c.post(
            "/v1/campaigns",
            json={
                "name": "bad",
                "trigger": {"schedule": {"at": "2099-01-01T09:00+02:00", "time_zone": "UTC"}},
            },
            headers=write,
        )
        assert "trigger.schedule.at" in [
            d["field"] for d in assert_error(reply, 400, "validation_failed")["details"]
        ]
        reply = await c.patch(
            f"/v1/campaigns/{manual}",
            json={"flow": {"steps": [{"id": "w", "wait": {"duration": "PT"}}]}},
            headers=write,
        )
        assert "flow.steps.0.wait.duration" in [
            d["field"] for d in assert_error(reply, 400, "validation_failed")["details"]
        ]
        for params, field in [({"limit": 0}, "limit"), ({"state": "BOGUS"}, "state")]:
            reply = await c.get("/v1/campaigns", params=params, headers=read)
            assert field in [d["field"] for d in assert_error(reply, 400, "validation_failed")["details"]]
        reply = await c.get(f"/v1/campaigns/{manual}/executions", params={"state": "RUNNING"}, headers=read)
        assert "state" in [d["field"] for d in assert_error(reply, 400, "validation_failed")["details"]]
        assert_error(await c.get("/v1/campaigns/not-a-uuid", headers=read), 400, "validation_failed")
        assert_error(await c.get("/v1/executions/ex_nothex", headers=read), 400, "validation_failed")
        assert len((await c.get("/v1/campaigns", headers=read)).json()["items"]) == before

        # A duration comes back in its canonical spelling.
        canonical = await c.patch(
            f"/v1/campaigns/{manual}",
            json={"flow": {"steps": [{"id": "w", "wait": {"duration": "PT90M"}}, end("e")]}},
            headers=write,
        )
        assert canonical.json()["flow"]["steps"][0]["wait"] == {"duration": "PT1H30M"}

        # 404 for unknown campaigns and executions.
        for method, path in [
            ("GET", f"/v1/campaigns/{MISSING}"),
            ("PATCH", f"/v1/campaigns/{MISSING}"),
            ("POST", f"/v1/campaigns/{MISSING}/validate"),
            ("GET", f"/v1/campaigns/{MISSING}/estimate"),
            ("POST", f"/v1/campaigns/{MISSING}/schedule"),
            ("POST", f"/v1/campaigns/{MISSING}/unschedule"),
            ("POST", f"/v1/campaigns/{MISSING}/start"),
            ("POST", f"/v1/campaigns/{MISSING}/archive"),
            ("GET", f"/v1/campaigns/{MISSING}/runs"),
            ("GET", f"/v1/campaigns/{MISSING}/transitions"),
            ("GET", f"/v1/campaigns/{MISSING}/executions"),
            ("GET", f"/v1/executions/{MISSING_EXECUTION}"),
        ]:
            reply = await c.request(
                method, path, headers=write, json={"name": "x"} if method == "PATCH" else None
            )
            assert_error(reply, 404, "not_found")
        # Another workspace does not see this one's campaigns.
        stranger = await rest.key("ws_other", "admin")
        assert_error(await c.get(f"/v1/campaigns/{manual}", headers=stranger), 404, "not_found")
        assert (await c.get("/v1/campaigns", headers=stranger)).json()["items"] == []

        # 403: a read key may not write; a key without campaign scopes may not read.
        for method, path in [
            ("POST", "/v1/campaigns"),
            ("PATCH", f"/v1/campaigns/{manual}"),
            ("POST", f"/v1/campaigns/{manual}/schedule"),
            ("POST", f"/v1/campaigns/{manual}/unschedule"),
            ("POST", f"/v1/campaigns/{manual}/start"),
            ("POST", f"/v1/campaigns/{manual}/archive"),
        ]:
            assert_error(await c.request(method, path, headers=read), 403, "forbidden")
        nothing = await rest.key(ws, "contacts:read", "campaigns:trigger")
        for path in [
            "/v1/campaigns",
            f"/v1/campaigns/{manual}",
            f"/v1/campaigns/{manual}/estimate",
            f"/v1/campaigns/{manual}/runs",
            f"/v1/campaigns/{manual}/transitions",
            f"/v1/campaigns/{manual}/executions",
            f"/v1/executions/{MISSING_EXECUTION}",
        ]:
            assert_error(await c.get(path, headers=nothing), 403, "forbidden")
        assert_error(await c.post(f"/v1/campaigns/{manual}/validate", headers=nothing), 403, "forbidden")
