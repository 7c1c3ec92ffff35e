"""`GET /v1/campaigns/{id}/funnel` over a real run of a flow with a CONDITION and an AB_TEST, and
the execution service's `node_id` filter behind `GET /v1/campaigns/{id}/executions`."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from tests.e2e.rest import rest_mesh
from tests.e2e.test_rest_authoring import restricted_key
from tests.e2e.test_thin_run import seed
from tests.helpers import wait_for

MISSING = "9a4c0d5e-0000-4000-8000-123456789abc"


def send(step_id: str, template_id: str) -> dict[str, Any]:
    return {
        "id": step_id,
        "send": {"channel": "EMAIL", "message_type": "MESSAGE", "template": {"template_id": template_id}},
    }


def split_flow(template_id: str) -> dict[str, Any]:
    """s1 -> c1 (first name is Ada?) { yes: e1 | no: ab { A: s2 -> e2 | B: e3 } }."""
    return {
        "steps": [
            send("s1", template_id),
            {
                "id": "c1",
                "condition": {
                    "predicate": {"field": "first_name", "op": "eq", "value": "Ada"},
                    "yes": [{"id": "e1", "end": {}}],
                    "no": [
                        {
                            "id": "ab",
                            "ab_test": {
                                "variants": [
                                    {
                                        "name": "A",
                                        "weight": 50,
                                        "steps": [send("s2", template_id), {"id": "e2", "end": {}}],
                                    },
                                    {"name": "B", "weight": 50, "steps": [{"id": "e3", "end": {}}]},
                                ]
                            },
                        }
                    ],
                },
            },
        ]
    }


async def test_funnel_of_a_real_run(nats_url: str, tmp_path: Path) -> None:
    async with rest_mesh(nats_url, tmp_path) as (m, rest):
        ws = m.workspace_id
        segment_id, template_id = await seed(m, tag="funnel")
        write = await rest.key(ws, "campaigns:write")
        read = await rest.key(ws, "campaigns:read")
        c = rest.client
        body = {
            "name": "funnel",
            "segment_id": segment_id,
            "trigger": {"manual": {}},
            "flow": split_flow(template_id),
        }
        made = await c.post("/v1/campaigns", json=body, headers=write)
        assert made.status_code == 201, made.text
        cid = made.json()["id"]

        # Before any run: the current flow with zeros.
        before = await c.get(f"/v1/campaigns/{cid}/funnel", headers=read)
        assert before.status_code == 200, before.text
        assert before.json()["run_id"] is None and before.json()["executions"] == 0
        assert [n["node_id"] for n in before.json()["nodes"]] == ["s1", "c1", "e1", "ab", "s2", "e2", "e3"]
        assert {n["entered"] for n in before.json()["nodes"]} == {0}

        started = await c.post(f"/v1/campaigns/{cid}/start", headers=write)
        assert started.status_code == 202, started.text
        run_id = started.json()["run_id"]

        async def completed() -> Any:
            status = (await c.get(f"/v1/campaigns/{cid}/status", headers=read)).json()
            return status if status["state"] in ("COMPLETED", "COMPLETED_PARTIAL") else None

        status = await wait_for(completed, timeout=30, message=m.sandbox.logs)
        assert status["counts"]["completed"] == 3

        # The run is over, but the carrier's delivery receipts arrive on their own; the sandbox
        # delivers every message, so wait until no send is still only `accepted` (two reads
        # taken while receipts land would differ).
        async def settled() -> Any:
            reply = await c.get(f"/v1/campaigns/{cid}/funnel", headers=read)
            assert reply.status_code == 200, reply.text
            body = reply.json()
            sends = [n["sends"] for n in body["nodes"] if n["sends"] is not None]
            return body if sends and all(s["accepted"] == 0 for s in sends) else None

        funnel = await wait_for(settled, timeout=30, message=m.sandbox.logs)
        assert (funnel["campaign_id"], funnel["run_id"], funnel["executions"], funnel["unplaced"]) == (
            cid,
            run_id,
            3,
            0,
        )
        nodes = {n["node_id"]: n for n in funnel["nodes"]}
        # The same figures, from the executions the API lists.
        executions = (await c.get(f"/v1/campaigns/{cid}/executions", headers=read)).json()["items"]
        at = Counter(e["node_id"] for e in executions)
        variants = Counter((e["ab_variant"] or "").removeprefix("ab=") for e in executions if e["ab_variant"])
        assert nodes["s1"]["entered"] == 3 and nodes["s1"]["sent"] == 3
        assert nodes["c1"]["condition"] == {"yes": 1, "no": 2}  # only Ada is Ada
        assert nodes["e1"]["entered"] == at["e1"] == 1
        assert nodes["ab"]["entered"] == 2
        assert {v["name"]: v["count"] for v in nodes["ab"]["variants"]} == {
            "A": variants["A"],
            "B": variants["B"],
        }
        assert variants["A"] + variants["B"] == 2
        assert nodes["s2"]["entered"] == variants["A"] and nodes["s2"]["sent"] == variants["A"]
        assert nodes["e2"]["at"]["completed"] == at["e2"] and nodes["e3"]["at"]["completed"] == at["e3"]
        assert nodes["s2"]["path"] == ["s1", "c1", "ab", "s2"]
        assert (nodes["s2"]["parent_id"], nodes["s2"]["branch"], nodes["s2"]["depth"]) == ("ab", "A", 2)
        sent = nodes["s1"]["sends"]
        assert (sent["accepted"], sent["delivered"], sent["failed"]) == (0, 3, 0)
        assert nodes["c1"]["sent"] is None and nodes["s1"]["skipped"] == [] and nodes["s1"]["failed"] == []

        # The explicit run id answers the same.
        explicit = await c.get(f"/v1/campaigns/{cid}/funnel", params={"run_id": run_id}, headers=read)
        assert explicit.status_code == 200 and explicit.json()["nodes"] == funnel["nodes"]

        # The node filter of the executions list is the execution service's now: exact pages.
        url = f"/v1/campaigns/{cid}/executions"
        page = (await c.get(url, params={"node_id": "e1", "limit": 1}, headers=read)).json()
        assert len(page["items"]) == 1 and page["items"][0]["node_id"] == "e1" and page["next_cursor"] is None
        assert (await c.get(url, params={"node_id": "s1"}, headers=read)).json()["items"] == []

        # 404: unknown campaign, unknown run, a run of another campaign.
        missing = await c.get(f"/v1/campaigns/{MISSING}/funnel", headers=read)
        assert (missing.status_code, missing.json()["error"]) == (404, "not_found")
        no_run = await c.get(f"/v1/campaigns/{cid}/funnel", params={"run_id": MISSING}, headers=read)
        assert (no_run.status_code, no_run.json()["error"]) == (404, "not_found"), no_run.text
        other = (await c.post("/v1/campaigns", json={**body, "name": "other"}, headers=write)).json()["id"]
        foreign = await c.get(f"/v1/campaigns/{other}/funnel", params={"run_id": run_id}, headers=read)
        assert (foreign.status_code, foreign.json()["error"]) == (404, "not_found"), foreign.text
        # Another workspace's key does not see it.
        stranger = await rest.key("ws_other", "campaigns:read")
        assert (await c.get(f"/v1/campaigns/{cid}/funnel", headers=stranger)).status_code == 404

        # 400: malformed ids, naming the field.
        bad = await c.get(f"/v1/campaigns/{cid}/funnel", params={"run_id": "nope"}, headers=read)
        assert bad.status_code == 400 and bad.json()["details"][0]["field"] == "run_id", bad.text
        bad = await c.get("/v1/campaigns/not-a-uuid/funnel", headers=read)
        assert bad.status_code == 400 and bad.json()["details"][0]["field"] == "campaign_id", bad.text

        # 401 without a key, 403 for a key without campaigns:read (and one restricted to others).
        assert (await c.get(f"/v1/campaigns/{cid}/funnel")).status_code == 401
        lacking = await rest.key(ws, "contacts:read", "billing:read")
        denied = await c.get(f"/v1/campaigns/{cid}/funnel", headers=lacking)
        assert (denied.status_code, denied.json()["error"]) == (403, "forbidden")
        restricted = await restricted_key(rest, ws, ["campaigns:read"], [other])
        denied = await c.get(f"/v1/campaigns/{cid}/funnel", headers=restricted)
        assert (denied.status_code, denied.json()["error"]) == (403, "forbidden")
