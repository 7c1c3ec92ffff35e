"""`/v1/billing` over the real mesh: balance, top-ups and their limits, auto-reload, prices, the
low-balance threshold, the balance limit (admin only), the ledger and cost estimates, each workspace
seeing only its own account.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from shoal.v1 import billing_pb2 as bpb
from tests.e2e.rest import rest_mesh


def error_of(reply: httpx.Response) -> tuple[int, str, list[str]]:
    body = reply.json()
    return reply.status_code, body["error"], [d["field"] for d in body["details"]]


def price_of(items: list[dict[str, Any]], channel: str, message_type: str, unit: str) -> int:
    (found,) = [
        p["amount_cents"]
        for p in items
        if (p["channel"], p["message_type"], p["billing_unit"]) == (channel, message_type, unit)
    ]
    return int(found)


async def test_billing_over_rest(nats_url: str, tmp_path: Path) -> None:
    async with rest_mesh(nats_url, tmp_path) as (m, rest):
        ws = m.workspace_id
        c = rest.client
        read = await rest.key(ws, "billing:read")
        write = await rest.key(ws, "billing:write")
        admin = await rest.key(ws, "admin")
        unrelated = await rest.key(ws, "templates:write", "campaigns:write")

        # --- balance ----------------------------------------------------------------------------
        reply = await c.get("/v1/billing/balance", headers=read)
        assert reply.status_code == 200, reply.text
        assert reply.json() == {
            "free_cents": 0,
            "reserved_cents": 0,
            "total_cents": 0,
            "max_balance_cents": 500_000,
            "low_balance_threshold_cents": 1_000,
            "currency": "EUR",
        }
        assert error_of(await c.get("/v1/billing/balance", headers=unrelated))[:2] == (403, "forbidden")
        assert (await c.get("/v1/billing/balance")).status_code == 401

        # --- top-ups ----------------------------------------------------------------------------
        top_up = {"amount_cents": 5_000, "idempotency_key": "invoice-1"}
        reply = await c.post("/v1/billing/top-ups", json=top_up, headers=write)
        assert reply.status_code == 201, reply.text
        assert (reply.json()["free_cents"], reply.json()["total_cents"]) == (5_000, 5_000)
        # The same key credits once.
        reply = await c.post("/v1/billing/top-ups", json=top_up, headers=write)
        assert (reply.status_code, reply.json()["free_cents"]) == (201, 5_000), reply.text
        held = await m.billing.GetBalance(bpb.GetBalanceRequest(workspace_id=ws))
        assert held.balance.free_cents == 5_000
        # Below the minimum, above the maximum: the service's rule, 422 naming amount_cents.
        reply = await c.post("/v1/billing/top-ups", json={"amount_cents": 999}, headers=write)
        assert error_of(reply) == (422, "top_up_too_small", ["amount_cents"]), reply.text
        assert "1000" in reply.json()["message"]
        reply = await c.post("/v1/billing/top-ups", json={"amount_cents": 0}, headers=write)
        assert error_of(reply) == (422, "top_up_too_small", ["amount_cents"])
        reply = await c.post("/v1/billing/top-ups", json={"amount_cents": 496_000}, headers=write)
        assert error_of(reply) == (422, "balance_limit", ["amount_cents"]), reply.text
        assert "500000" in reply.json()["message"]
        # Malformed: 400.
        for bad in ({"amount_cents": -1}, {"amount_cents": "lots"}, {}, {"amount_cents": 1_000, "card": "x"}):
            reply = await c.post("/v1/billing/top-ups", json=bad, headers=write)
            assert error_of(reply)[:2] == (400, "validation_failed"), (bad, reply.text)
        reply = await c.post(
            "/v1/billing/top-ups", json={"amount_cents": 1_000, "idempotency_key": ""}, headers=write
        )
        assert error_of(reply) == (400, "validation_failed", ["idempotency_key"])
        assert (await c.post("/v1/billing/top-ups", json=top_up, headers=read)).status_code == 403
        reply = await c.post("/v1/billing/top-ups", json={"amount_cents": 2_000}, headers=write)
        assert reply.json()["free_cents"] == 7_000, reply.text

        # --- the ledger shows the top-ups (the replay credited nothing) -------------------------
        reply = await c.get("/v1/billing/ledger", headers=read)
        assert reply.status_code == 200, reply.text
        entries = reply.json()["items"]
        assert [(e["kind"], e["amount_cents"], e["free_delta_cents"], e["key"]) for e in entries] == [
            ("TOP_UP", 5_000, 5_000, "invoice-1"),
            ("TOP_UP", 2_000, 2_000, None),
        ]
        assert entries[0]["reserved_delta_cents"] == 0 and entries[0]["created_at"].endswith("Z")
        assert reply.json()["next_cursor"] is None
        first = (await c.get("/v1/billing/ledger?limit=1", headers=read)).json()
        assert [e["key"] for e in first["items"]] == ["invoice-1"] and first["next_cursor"]
        second = (
            await c.get(f"/v1/billing/ledger?limit=1&cursor={first['next_cursor']}", headers=read)
        ).json()
        assert [e["amount_cents"] for e in second["items"]] == [2_000]
        reply = await c.get("/v1/billing/ledger?cursor=abc", headers=read)
        assert error_of(reply) == (400, "validation_failed", ["cursor"]), reply.text
        reply = await c.get(f"/v1/billing/ledger?cursor={'9' * 40}", headers=read)
        assert error_of(reply) == (400, "validation_failed", ["cursor"]), reply.text
        assert error_of(await c.get("/v1/billing/ledger?limit=501", headers=read)) == (
            400,
            "validation_failed",
            ["limit"],
        )
        assert (await c.get("/v1/billing/ledger", headers=unrelated)).status_code == 403

        # --- auto-reload ------------------------------------------------------------------------
        reply = await c.get("/v1/billing/auto-reload", headers=read)
        assert reply.json() == {"enabled": False, "trigger_threshold_cents": 0, "reload_amount_cents": 0}
        wanted = {"enabled": True, "trigger_threshold_cents": 2_000, "reload_amount_cents": 10_000}
        reply = await c.put("/v1/billing/auto-reload", json=wanted, headers=write)
        assert (reply.status_code, reply.json()) == (200, wanted), reply.text
        assert (await c.get("/v1/billing/auto-reload", headers=read)).json() == wanted
        held_reload = await m.billing.GetAutoReload(bpb.GetAutoReloadRequest(workspace_id=ws))
        assert held_reload.auto_reload.reload_amount_cents == 10_000
        reply = await c.put(
            "/v1/billing/auto-reload", json={**wanted, "reload_amount_cents": 500}, headers=write
        )
        assert error_of(reply) == (422, "top_up_too_small", ["reload_amount_cents"]), reply.text
        reply = await c.put(
            "/v1/billing/auto-reload", json={**wanted, "reload_amount_cents": 600_000}, headers=write
        )
        assert error_of(reply) == (422, "balance_limit", ["reload_amount_cents"]), reply.text
        reply = await c.put(
            "/v1/billing/auto-reload", json={**wanted, "trigger_threshold_cents": 0}, headers=write
        )
        assert error_of(reply) == (400, "validation_failed", ["trigger_threshold_cents"]), reply.text
        reply = await c.put("/v1/billing/auto-reload", json={"enabled": False}, headers=write)
        assert error_of(reply)[:2] == (400, "validation_failed")
        assert (await c.put("/v1/billing/auto-reload", json=wanted, headers=read)).status_code == 403
        assert (await c.get("/v1/billing/auto-reload", headers=unrelated)).status_code == 403
        off = {"enabled": False, "trigger_threshold_cents": 0, "reload_amount_cents": 0}
        assert (await c.put("/v1/billing/auto-reload", json=off, headers=write)).json() == off
        # Unchanged by the refused attempts above.
        assert (await c.get("/v1/billing/auto-reload", headers=read)).json() == off

        # --- prices -----------------------------------------------------------------------------
        reply = await c.get("/v1/billing/prices", headers=read)
        assert reply.status_code == 200, reply.text
        prices = reply.json()["items"]
        assert len(prices) == 12 and reply.json()["next_cursor"] is None
        assert price_of(prices, "SMS", "MESSAGE", "SMS_SEGMENT") == 7
        new_price = {
            "channel": "SMS",
            "message_type": "MESSAGE",
            "billing_unit": "SMS_SEGMENT",
            "amount_cents": 9,
        }
        # The price list is the platform's: billing:write is not enough.
        assert error_of(await c.put("/v1/billing/prices", json=new_price, headers=write))[:2] == (
            403,
            "forbidden",
        )
        reply = await c.put("/v1/billing/prices", json=new_price, headers=admin)
        assert (reply.status_code, reply.json()) == (200, new_price), reply.text
        prices = (await c.get("/v1/billing/prices", headers=read)).json()["items"]
        assert price_of(prices, "SMS", "MESSAGE", "SMS_SEGMENT") == 9
        assert price_of(prices, "SMS", "NEWSLETTER", "SMS_SEGMENT") == 7
        reply = await c.put(
            "/v1/billing/prices", json={**new_price, "billing_unit": "RCS_BASIC"}, headers=admin
        )
        assert error_of(reply) == (422, "billing_unit_mismatch", ["billing_unit"]), reply.text
        reply = await c.put("/v1/billing/prices", json={**new_price, "amount_cents": -1}, headers=admin)
        assert error_of(reply) == (400, "validation_failed", ["amount_cents"])
        reply = await c.put("/v1/billing/prices", json={**new_price, "channel": "FAX"}, headers=admin)
        assert error_of(reply) == (400, "validation_failed", ["channel"])
        page = (await c.get("/v1/billing/prices?limit=5", headers=read)).json()
        assert len(page["items"]) == 5 and page["next_cursor"]
        seen = list(page["items"])
        while page["next_cursor"]:
            page = (
                await c.get(f"/v1/billing/prices?limit=5&cursor={page['next_cursor']}", headers=read)
            ).json()
            seen.extend(page["items"])
        assert seen == prices
        assert error_of(await c.get("/v1/billing/prices?cursor=-1", headers=read))[:2] == (
            400,
            "validation_failed",
        )
        assert (await c.get("/v1/billing/prices", headers=unrelated)).status_code == 403

        # --- estimate with today's prices --------------------------------------------------------
        profile = {
            "audience_size": 100,
            "sends": [
                {"channel": "EMAIL", "message_type": "MESSAGE"},
                {"channel": "SMS", "message_type": "MESSAGE", "units": 2, "expected_share_bp": 5_000},
            ],
        }
        reply = await c.post("/v1/billing/estimate", json=profile, headers=read)
        assert reply.status_code == 200, reply.text
        # EMAIL 1 cent each, SMS 2 segments x 9 cents for half of them (upper bound: all of them).
        assert reply.json() == {
            "expected_cents": 100 + 900,
            "upper_bound_cents": 100 + 1_800,
            "free_cents": 7_000,
            "covered": True,
        }
        wrong_unit = {
            "audience_size": 1,
            "sends": [{"channel": "SMS", "message_type": "MESSAGE", "billing_unit": "EMAIL"}],
        }
        reply = await c.post("/v1/billing/estimate", json=wrong_unit, headers=read)
        assert error_of(reply) == (422, "billing_unit_mismatch", ["sends.0.billing_unit"]), reply.text
        reply = await c.post("/v1/billing/estimate", json={**profile, "audience_size": -1}, headers=read)
        assert error_of(reply) == (400, "validation_failed", ["audience_size"])
        reply = await c.post("/v1/billing/estimate", json={"audience_size": 1, "sends": []}, headers=read)
        assert error_of(reply) == (400, "validation_failed", ["sends"])
        assert (await c.post("/v1/billing/estimate", json=profile, headers=unrelated)).status_code == 403

        # --- low-balance threshold --------------------------------------------------------------
        reply = await c.put(
            "/v1/billing/low-balance-threshold", json={"threshold_cents": 2_500}, headers=write
        )
        assert (reply.status_code, reply.json()["low_balance_threshold_cents"]) == (200, 2_500), reply.text
        assert (await c.get("/v1/billing/balance", headers=read)).json()[
            "low_balance_threshold_cents"
        ] == 2_500
        reply = await c.put("/v1/billing/low-balance-threshold", json={"threshold_cents": -5}, headers=write)
        assert error_of(reply) == (400, "validation_failed", ["threshold_cents"])
        reply = await c.put("/v1/billing/low-balance-threshold", json={"threshold_cents": 1}, headers=read)
        assert reply.status_code == 403

        # --- balance limit: admin only ------------------------------------------------------------
        raise_to = {"max_balance_cents": 1_000_000}
        reply = await c.put("/v1/billing/balance-limit", json=raise_to, headers=write)
        assert error_of(reply)[:2] == (403, "forbidden"), reply.text
        assert "admin" in reply.json()["message"]
        reply = await c.put("/v1/billing/balance-limit", json={"max_balance_cents": 0}, headers=admin)
        assert error_of(reply) == (400, "validation_failed", ["max_balance_cents"])
        reply = await c.put("/v1/billing/balance-limit", json={"max_balance_cents": 2**63}, headers=admin)
        assert error_of(reply) == (400, "validation_failed", ["max_balance_cents"])
        reply = await c.put("/v1/billing/balance-limit", json=raise_to, headers=admin)
        assert (reply.status_code, reply.json()["max_balance_cents"]) == (200, 1_000_000), reply.text
        # The top-up refused before fits now.
        reply = await c.post("/v1/billing/top-ups", json={"amount_cents": 496_000}, headers=write)
        assert (reply.status_code, reply.json()["free_cents"]) == (201, 503_000), reply.text

        # --- another workspace: its own account ----------------------------------------------------
        other = await rest.key("ws_other", "billing:write")
        reply = await c.get("/v1/billing/balance", headers=other)
        assert (reply.json()["free_cents"], reply.json()["max_balance_cents"]) == (0, 500_000), reply.text
        reply = await c.post(
            "/v1/billing/top-ups", json={"amount_cents": 1_000, "idempotency_key": "invoice-1"}, headers=other
        )
        assert (reply.status_code, reply.json()["free_cents"]) == (201, 1_000), reply.text
        ledger = (await c.get("/v1/billing/ledger", headers=other)).json()["items"]
        assert [(e["amount_cents"], e["key"]) for e in ledger] == [(1_000, "invoice-1")]
        assert (
            price_of(
                (await c.get("/v1/billing/prices", headers=other)).json()["items"],
                "SMS",
                "MESSAGE",
                "SMS_SEGMENT",
            )
            == 7
        )
        assert (await c.get("/v1/billing/auto-reload", headers=other)).json()["enabled"] is False
        # This workspace's balance did not move.
        assert (await c.get("/v1/billing/balance", headers=read)).json()["free_cents"] == 503_000
