"""API keys, scopes, campaign restriction, rate limits, and the four operational endpoints'
status codes and bodies, against the stand-in campaign service of `test_gateway`."""

from __future__ import annotations

import hmac
import importlib
import json
import os
import pkgutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute

from gateway import keys as keys_module
from gateway import routers as gateway_routers
from gateway.keys import Scope
from tests.integration import test_gateway as base
from tests.integration.test_gateway import (
    DRAFT,
    KNOWN,
    Gateway,
    StandInCampaigns,
    assert_error_shape,
    gateway,
)

# The stand-in campaign service and the gateway in front of it, shared with test_gateway.
campaign_server = base.campaign_server
gw = base.gw

OTHER = "9a4c0d5e-0000-4000-8000-123456789abc"
EXEMPT = {"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc", "/"}
TRIGGER = f"/v1/campaigns/{KNOWN}/trigger"
REPO = Path(__file__).resolve().parents[2]


def api_routes(gw: Gateway) -> list[tuple[str, str]]:
    """Every documented (method, path) that needs a key, with ids filled in."""
    out = []
    for path, operations in gw.app.openapi()["paths"].items():
        if path in EXEMPT or path.startswith("/v1/providers"):
            continue
        for method in operations:
            out.append((method.upper(), path.replace("{campaign_id}", KNOWN)))
    return sorted(out)


async def test_every_route_but_health_docs_and_callbacks_needs_a_key(gw: Gateway) -> None:
    routes = api_routes(gw)
    assert {p for _, p in routes} >= {
        f"/v1/campaigns/{KNOWN}/status",
        TRIGGER,
        f"/v1/campaigns/{KNOWN}/pause",
        f"/v1/campaigns/{KNOWN}/resume",
    }
    good = await gw.key("admin")
    revoked = await gw.key("admin")
    await gw.revoke(revoked)
    wrong_secret = {"Authorization": good["Authorization"][:-4] + "AAAA"}
    unknown_id = {"Authorization": "Bearer shoal_kaaaaaaaaaaaaaaaa_" + "A" * 43}
    for headers in (
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer not-a-key"},
        {"Authorization": "Bearer " + "x" * 5000},
        wrong_secret,
        unknown_id,
        revoked,
    ):
        for method, path in routes:
            reply = await gw.client.request(method, path, headers=headers)
            assert reply.status_code == 401, (method, path, headers, reply.text)
            assert_error_shape(reply.json())
            assert reply.json()["error"] == "unauthorized"
            assert reply.headers["WWW-Authenticate"] == "Bearer"
    for path in ("/healthz", "/openapi.json", "/docs"):
        assert (await gw.client.get(path)).status_code == 200, path


async def test_the_secret_is_compared_in_constant_time(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, Any]] = []
    original = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return original(a, b)

    monkeypatch.setattr(keys_module.hmac, "compare_digest", spy)
    headers = await gw.key("campaigns:read")
    assert (await gw.client.get(f"/v1/campaigns/{KNOWN}/status", headers=headers)).status_code == 200
    bad = {
        "Authorization": headers["Authorization"][:-1] + ("A" if headers["Authorization"][-1] != "A" else "B")
    }
    assert (await gw.client.get(f"/v1/campaigns/{KNOWN}/status", headers=bad)).status_code == 401
    # An unknown key id is compared too, so it costs what a wrong secret costs.
    unknown = {"Authorization": "Bearer shoal_kaaaaaaaaaaaaaaaa_" + "A" * 43}
    assert (await gw.client.get(f"/v1/campaigns/{KNOWN}/status", headers=unknown)).status_code == 401
    assert len(calls) == 3
    # Only digests are compared, never the raw secret.
    assert all(len(a) == 64 and len(b) == 64 for a, b in calls)


def required_scopes() -> dict[tuple[str, str], Scope]:
    """(method, path template) -> the scope its `require` dependency asks for, for every API route."""
    found: dict[tuple[str, str], Scope] = {}
    routes = [
        route
        for info in pkgutil.iter_modules(gateway_routers.__path__)
        for route in importlib.import_module(f"gateway.routers.{info.name}").router.routes
    ]
    for route in routes:
        if not isinstance(route, APIRoute):
            continue
        scopes = [d.call.scope for d in route.dependant.dependencies if hasattr(d.call, "scope")]
        for method in route.methods:
            if scopes:
                found[(method, route.path)] = scopes[0]
    return found


def fill(path: str) -> str:
    """A path template with well-formed ids, so only the key decides the answer."""
    return (
        path.replace("{campaign_id}", KNOWN)
        .replace("{contact_id}", "c_abc123")
        .replace("{template_id}", "tpl_abc123")
        .replace("{segment_id}", "seg_abc123")
        .replace("{execution_id}", "exe_abc123")
        .replace("{endpoint_id}", "wh_abc123")
        .replace("{delivery_id}", "whd_abc123")
        .replace("{tag}", "vip")
    )


async def test_every_route_refuses_a_key_without_its_scope(gw: Gateway) -> None:
    """The security matrix: for each route, a key holding every scope but the one the route needs (and
    the ones implying it) gets 403 before any backend is asked; a route without a declared scope fails."""
    scopes = required_scopes()
    documented = {
        (m.upper(), p)
        for p, ops in gw.app.openapi()["paths"].items()
        if p not in EXEMPT and not p.startswith("/v1/providers")
        for m in ops
    }
    assert documented <= set(scopes), f"routes without a declared scope: {sorted(documented - set(scopes))}"
    for (method, path), needed in sorted(scopes.items()):
        granting = {needed, Scope.ADMIN}
        if needed.value.endswith(":read"):
            granting.add(Scope(needed.value.replace(":read", ":write")))
        headers = await gw.key(*(s.value for s in Scope if s not in granting))
        reply = await gw.client.request(method, fill(path), headers=headers)
        assert reply.status_code == 403, (method, path, needed, reply.text)
        assert_error_shape(reply.json())
        assert reply.json()["error"] == "forbidden"


@pytest.mark.parametrize(
    ("scope", "allowed"),
    [
        ("campaigns:read", {"status"}),
        ("campaigns:trigger", {"trigger"}),
        ("campaigns:write", {"status", "pause", "resume"}),
        ("contacts:write", set()),
        ("billing:write", set()),
        ("admin", {"status", "trigger", "pause", "resume"}),
    ],
)
async def test_scopes_decide_what_a_key_may_do(gw: Gateway, scope: str, allowed: set[str]) -> None:
    headers = await gw.key(scope)
    for action in ("status", "trigger", "pause", "resume"):
        path = f"/v1/campaigns/{KNOWN}/{action}"
        reply = await (gw.client.get if action == "status" else gw.client.post)(path, headers=headers)
        if action in allowed:
            assert reply.status_code in (200, 202), (scope, action, reply.text)
        else:
            assert reply.status_code == 403, (scope, action, reply.text)
            assert_error_shape(reply.json())
            assert reply.json()["error"] == "forbidden"
            assert scope not in reply.json()["message"]


async def test_a_key_restricted_to_campaigns_touches_only_those(
    gw: Gateway, campaign_server: tuple[Any, StandInCampaigns]
) -> None:
    headers = await gw.key("admin", campaigns=(KNOWN,))
    assert (await gw.client.get(f"/v1/campaigns/{KNOWN}/status", headers=headers)).status_code == 200
    before = len(campaign_server[1].requests)
    for method, path in [
        ("GET", f"/v1/campaigns/{DRAFT}/status"),
        ("POST", f"/v1/campaigns/{DRAFT}/trigger"),
        ("POST", f"/v1/campaigns/{DRAFT}/pause"),
        ("POST", f"/v1/campaigns/{OTHER}/resume"),
    ]:
        reply = await gw.client.request(method, path, headers=headers)
        assert reply.status_code == 403, (path, reply.text)
        assert reply.json()["error"] == "forbidden"
    assert len(campaign_server[1].requests) == before, "refused before any backend call"


async def test_the_workspace_comes_from_the_key_never_the_client(
    gw: Gateway, campaign_server: tuple[Any, StandInCampaigns]
) -> None:
    headers = {**(await gw.key("admin", workspace="ws_acme")), "X-Workspace-Id": "ws_default"}
    await gw.client.get(
        f"/v1/campaigns/{KNOWN}/status", params={"workspace_id": "ws_default"}, headers=headers
    )
    await gw.client.post(TRIGGER, json={}, headers=headers)
    await gw.client.post(f"/v1/campaigns/{KNOWN}/pause", headers=headers)
    await gw.client.post(f"/v1/campaigns/{KNOWN}/resume", headers=headers)
    requests = campaign_server[1].requests[-4:]
    assert [r.workspace_id for r in requests] == ["ws_acme"] * 4
    key_id = headers["Authorization"].split("_")[1]
    assert [r.actor for r in requests[1:]] == [f"api_key:{key_id}"] * 3


async def test_rate_limit_answers_429_with_retry_after(
    campaign_server: tuple[Any, StandInCampaigns], tmp_path: Path
) -> None:
    async with gateway(campaign_server[0].address, tmp_path, rate_limit="3/minute") as g:
        first, second = await g.key("admin"), await g.key("admin")
        path = f"/v1/campaigns/{KNOWN}/status"
        for _ in range(3):
            assert (await g.client.get(path, headers=first)).status_code == 200
        limited = await g.client.get(path, headers=first)
        assert limited.status_code == 429, limited.text
        body = limited.json()
        assert set(body) == {"error", "message", "details", "retry_after"}
        assert body["error"] == "rate_limited" and body["details"] == []
        assert 1 <= body["retry_after"] <= 60
        assert limited.headers["Retry-After"] == str(body["retry_after"])
        # Limits are per key: another key of the same workspace is unaffected.
        assert (await g.client.get(path, headers=second)).status_code == 200
        # A bad key is 401 whatever the limit; it never spends a real key's budget.
        assert (await g.client.get(path)).status_code == 401


# ---- the four endpoints ----------------------------------------------------------------------


@pytest.fixture
async def admin(gw: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    gw.client.headers.update(await gw.key("admin"))
    yield gw.client


async def test_trigger_answers_202_with_run_id_and_passes_the_body(
    admin: httpx.AsyncClient, campaign_server: tuple[Any, StandInCampaigns]
) -> None:
    body = {
        "idempotency_key": "order-1",
        "recipients": ["c_1", "c_2", "c_1"],
        "data": {"n": 1, "o": {"x": "y"}},
    }
    reply = await admin.post(TRIGGER, json=body)
    assert reply.status_code == 202, reply.text
    assert reply.json() == {"run_id": "run_new", "status": "RUNNING"}
    assert "Idempotent-Replayed" not in reply.headers
    sent = campaign_server[1].requests[-1]
    assert (sent.idempotency_key, list(sent.recipients)) == ("order-1", ["c_1", "c_2", "c_1"])
    assert dict(sent.data) == {"n": 1.0, "o": sent.data["o"]} and sent.data["o"]["x"] == "y"
    # No body at all is a trigger of the campaign's segment.
    bare = await admin.post(TRIGGER)
    assert bare.status_code == 202, bare.text
    assert list(campaign_server[1].requests[-1].recipients) == []


async def test_trigger_replay_answers_the_original_run(admin: httpx.AsyncClient) -> None:
    reply = await admin.post(TRIGGER, json={"idempotency_key": "seen-before"})
    assert reply.status_code == 202
    assert reply.json() == {"run_id": "run_first", "status": "RUNNING"}
    assert reply.headers["Idempotent-Replayed"] == "true"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"recipients": ["bob@example.com"]}, "recipients.0"),
        ({"recipients": "c_1"}, "recipients"),
        ({"recipients": [f"c_{i}" for i in range(10_001)]}, "recipients"),
        ({"data": [1, 2]}, "data"),
        ({"data": "x"}, "data"),
        ({"idempotency_key": ""}, "idempotency_key"),
        ({"idempotency_key": "x" * 201}, "idempotency_key"),
        ({"idempotency_key": "has space"}, "idempotency_key"),
        ({"unknown": 1}, "unknown"),
    ],
)
async def test_trigger_body_is_validated_at_the_edge(
    admin: httpx.AsyncClient, campaign_server: tuple[Any, StandInCampaigns], body: Any, field: str
) -> None:
    before = len(campaign_server[1].requests)
    reply = await admin.post(TRIGGER, json=body)
    assert reply.status_code == 400, reply.text
    assert_error_shape(reply.json())
    assert reply.json()["error"] == "validation_failed"
    assert field in [d["field"] for d in reply.json()["details"]], reply.json()
    assert len(campaign_server[1].requests) == before


async def test_trigger_body_that_is_not_json_is_400(admin: httpx.AsyncClient) -> None:
    reply = await admin.post(TRIGGER, content=b"{not json", headers={"Content-Type": "application/json"})
    assert reply.status_code == 400
    assert_error_shape(reply.json())


@pytest.mark.parametrize(
    ("action", "campaign_id", "status", "code"),
    [
        ("trigger", "00000000-0000-4000-8000-000000000402", 402, "insufficient_balance"),
        ("trigger", OTHER, 404, "not_found"),
        ("trigger", "00000000-0000-4000-8000-000000000409", 409, "wrong_state"),
        ("trigger", "00000000-0000-4000-8000-000000000422", 422, "launch_blocked"),
        ("pause", OTHER, 404, "not_found"),
        ("pause", "00000000-0000-4000-8000-000000000409", 409, "wrong_state"),
        ("resume", "00000000-0000-4000-8000-000000000402", 402, "insufficient_balance"),
        ("resume", "00000000-0000-4000-8000-000000000409", 409, "wrong_state"),
        ("resume", OTHER, 404, "not_found"),
    ],
)
async def test_operations_map_service_errors(
    admin: httpx.AsyncClient, action: str, campaign_id: str, status: int, code: str
) -> None:
    reply = await admin.post(f"/v1/campaigns/{campaign_id}/{action}")
    assert reply.status_code == status, reply.text
    assert_error_shape(reply.json())
    assert reply.json()["error"] == code


async def test_pause_and_resume_answer_the_product_bodies(admin: httpx.AsyncClient) -> None:
    paused = await admin.post(f"/v1/campaigns/{KNOWN}/pause")
    assert (paused.status_code, paused.json()) == (200, {"status": "PAUSED"})
    resumed = await admin.post(f"/v1/campaigns/{KNOWN}/resume")
    assert (resumed.status_code, resumed.json()) == (200, {"status": "RUNNING"})
    assert (await admin.post("/v1/campaigns/nope/pause")).status_code == 400


async def test_openapi_documents_keys_and_every_code(gw: Gateway) -> None:
    schema = (await gw.client.get("/openapi.json")).json()
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
    trigger = schema["paths"]["/v1/campaigns/{campaign_id}/trigger"]["post"]
    assert {"202", "400", "401", "402", "403", "404", "409", "422", "429"} <= set(trigger["responses"])
    assert "ErrorBody" in str(trigger["responses"]["422"])
    assert {"200", "401", "402", "403", "404", "409", "429"} <= set(
        schema["paths"]["/v1/campaigns/{campaign_id}/resume"]["post"]["responses"]
    )


def test_admin_cli_prints_a_key_once_that_the_gateway_accepts(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env["SHOAL_DATA_DIR"] = str(tmp_path)
    argv = [sys.executable, "-m", "gateway.keys", "create", "--workspace", "ws_default", "--scope", "admin"]
    done = subprocess.run(
        [*argv, "--output", "json"], env=env, cwd=REPO, capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["key"].startswith(f"shoal_{printed['id']}_")
    stored = (tmp_path / "gateway.db").read_bytes()
    assert printed["key"].split("_", 2)[2].encode() not in stored, "the secret is stored hashed"
    listed = subprocess.run(
        [sys.executable, "-m", "gateway.keys", "list", "--workspace", "ws_default"],
        env=env,
        cwd=REPO,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert printed["id"] in listed.stdout.decode() and printed["key"] not in listed.stdout.decode()
    refused = subprocess.run(
        [*argv[:-1], "root"], env=env, cwd=REPO, capture_output=True, timeout=60, check=False
    )
    assert refused.returncode == 2 and b"unknown scope" in refused.stderr


async def test_oversized_bodies_are_413_declared_or_streamed(admin: httpx.AsyncClient) -> None:
    big = json.dumps({"data": {"blob": "x" * (2 * 1024 * 1024)}}).encode()
    declared = await admin.post(TRIGGER, content=big, headers={"Content-Type": "application/json"})
    assert declared.status_code == 413, declared.text
    assert_error_shape(declared.json())
    assert declared.json()["error"] == "payload_too_large"

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 64 * 1024):
            yield big[start : start + 64 * 1024]

    # No Content-Length: counted while it streams in.
    streamed = await admin.post(TRIGGER, content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413, streamed.text
    assert streamed.json()["error"] == "payload_too_large"

    # The bulk import has its own, larger cap: the same size passes the body limit there (and is
    # judged by the route: no contacts list), and a body over the import cap is 413 too.
    imported = await admin.post(
        "/v1/contacts/import", content=big, headers={"Content-Type": "application/json"}
    )
    assert imported.status_code == 400, imported.text
    huge = b'{"contacts": [' + b"1," * (9 * 1024 * 1024) + b"1]}"
    refused = await admin.post(
        "/v1/contacts/import", content=huge, headers={"Content-Type": "application/json"}
    )
    assert refused.status_code == 413, refused.text


async def test_trigger_data_nested_too_deep_is_400_naming_the_field(gw: Gateway) -> None:
    """A protobuf Struct refuses ~100 levels when decoded; the edge refuses past 32 with a 400."""
    headers = await gw.key("admin")
    value: Any = 1
    for _ in range(150):
        value = {"a": value}
    reply = await gw.client.post(TRIGGER, json={"data": value}, headers=headers)
    assert reply.status_code == 400, reply.text
    assert_error_shape(reply.json())
    assert reply.json()["details"][0]["field"] == "data"
