"""The REST gateway in-process against a real grpc.aio campaign server on a free port.

The campaign service is a stand-in servicer (status, trigger, pause, resume) served by the kit's
own `GrpcServer`, so domain errors travel as rich gRPC statuses exactly as a real service sends
them. Every request carries an API key made in the gateway's own (temporary) key store.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.app import create_app
from gateway.backends import CAMPAIGN_SERVICE
from gateway.config import GatewaySettings
from gateway.keys import create_key, revoke_key
from shoal.errors import (
    FailedPrecondition,
    FieldViolation,
    InsufficientBalance,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from shoal.grpc import GrpcServer, ServiceBinding
from shoal.v1 import campaign_pb2, campaign_pb2_grpc, common_pb2
from tests.helpers import span_tree

KNOWN = "3f2b9c1e-8d4a-4c1b-9f5e-2a7d6c0b1e94"
DRAFT = "0b8f3c2a-1111-4c1b-9f5e-2a7d6c0b1e94"
UNSPECIFIED = "0b8f3c2a-2222-4c1b-9f5e-2a7d6c0b1e94"
STATUS_PATH = "/v1/campaigns/{campaign_id}/status"

# Campaign id -> the error the stand-in raises, to drive every mapping through a real hop.
FAILURES: dict[str, Exception] = {
    "00000000-0000-4000-8000-000000000400": InvalidArgument.of("campaign_id", "must be a campaign of yours"),
    "00000000-0000-4000-8000-000000000402": InsufficientBalance("free balance 100 < estimated cost 250"),
    "00000000-0000-4000-8000-000000000403": PermissionDenied("workspace may not read this campaign"),
    "00000000-0000-4000-8000-000000000409": FailedPrecondition("campaign is archived"),
    "00000000-0000-4000-8000-000000000422": FailedPrecondition(
        "campaign cannot launch: s1: template tpl_1 is not published",
        reason="launch_blocked",
        violations=[FieldViolation("steps.0.send.template", "s1: template_published: not published")],
    ),
    "00000000-0000-4000-8000-000000000500": RuntimeError("boom: secret internals at /srv/db"),
}


class StandInCampaigns(campaign_pb2_grpc.CampaignServiceServicer):  # type: ignore[misc]  # generated, untyped
    def __init__(self) -> None:
        self.requests: list[Any] = []

    def _fail(self, request: Any) -> None:
        self.requests.append(request)
        if request.campaign_id in FAILURES:
            raise FAILURES[request.campaign_id]
        if request.campaign_id not in (KNOWN, DRAFT):
            raise NotFound(f"campaign {request.campaign_id} not found")

    async def TriggerCampaign(
        self, request: campaign_pb2.TriggerCampaignRequest, context: Any
    ) -> campaign_pb2.TriggerCampaignResponse:
        self._fail(request)
        replayed = request.idempotency_key == "seen-before"
        return campaign_pb2.TriggerCampaignResponse(
            run_id="run_first" if replayed else "run_new",
            state=campaign_pb2.CAMPAIGN_STATE_RUNNING,
            replayed=replayed,
        )

    async def PauseCampaign(
        self, request: campaign_pb2.PauseCampaignRequest, context: Any
    ) -> campaign_pb2.PauseCampaignResponse:
        self._fail(request)
        return campaign_pb2.PauseCampaignResponse(state=campaign_pb2.CAMPAIGN_STATE_PAUSED)

    async def ResumeCampaign(
        self, request: campaign_pb2.ResumeCampaignRequest, context: Any
    ) -> campaign_pb2.ResumeCampaignResponse:
        self._fail(request)
        return campaign_pb2.ResumeCampaignResponse(state=campaign_pb2.CAMPAIGN_STATE_RUNNING, requeued=3)

    async def GetCampaignStatus(
        self, request: campaign_pb2.GetCampaignStatusRequest, context: Any
    ) -> campaign_pb2.GetCampaignStatusResponse:
        self.requests.append(request)
        if request.campaign_id in FAILURES:
            raise FAILURES[request.campaign_id]
        if request.campaign_id == DRAFT:
            return campaign_pb2.GetCampaignStatusResponse(
                id=DRAFT, state=campaign_pb2.CAMPAIGN_STATE_DRAFT, counts=common_pb2.ExecutionCounts()
            )
        if request.campaign_id == UNSPECIFIED:
            return campaign_pb2.GetCampaignStatusResponse(id=UNSPECIFIED)
        if request.campaign_id != KNOWN:
            raise NotFound(f"campaign {request.campaign_id} not found")
        return campaign_pb2.GetCampaignStatusResponse(
            id=KNOWN,
            state=campaign_pb2.CAMPAIGN_STATE_RUNNING,
            run_id="run_7",
            counts=common_pb2.ExecutionCounts(pending=3, processing=2, completed=40, failed=1, skipped=4),
            sent=41,
            estimated_remaining_cost_cents=1536,
        )


@pytest.fixture
async def campaign_server() -> AsyncIterator[tuple[GrpcServer, StandInCampaigns]]:
    servicer = StandInCampaigns()
    server = GrpcServer(
        "campaign-stand-in",
        [ServiceBinding(campaign_pb2_grpc.add_CampaignServiceServicer_to_server, servicer, CAMPAIGN_SERVICE)],
    )
    await server.start()
    yield server, servicer
    await server.stop(0)


@dataclass
class Gateway:
    app: FastAPI
    client: httpx.AsyncClient

    async def key(
        self, *scopes: str, workspace: str = "ws_default", campaigns: tuple[str, ...] = ()
    ) -> dict[str, str]:
        """Authorization headers of a new key made in the gateway's own store."""
        created = await self.app.state.auth.db.run(
            create_key,
            workspace_id=workspace,
            scopes=list(scopes or ("admin",)),
            campaign_ids=list(campaigns),
        )
        return {"Authorization": f"Bearer {created.key}"}

    async def revoke(self, headers: dict[str, str]) -> None:
        key_id = headers["Authorization"].split("_")[1]
        assert await self.app.state.auth.db.run(revoke_key, key_id)


@contextlib.asynccontextmanager
async def gateway(campaign_addr: str, data_dir: Path, **overrides: Any) -> AsyncIterator[Gateway]:
    settings = GatewaySettings.load(
        campaign_addr=campaign_addr, grpc_deadline_seconds=3.0, data_dir=data_dir, **overrides
    )
    app = create_app(settings)
    # ASGITransport does not run the lifespan; the app's channels and key store open in it.
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client,
    ):
        yield Gateway(app, client)


@pytest.fixture
async def gw(campaign_server: tuple[GrpcServer, StandInCampaigns], tmp_path: Path) -> AsyncIterator[Gateway]:
    async with gateway(campaign_server[0].address, tmp_path) as g:
        yield g


@pytest.fixture
async def client(gw: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    """A client whose every request carries an admin key of ws_default."""
    gw.client.headers.update(await gw.key("admin"))
    yield gw.client


def closed_port() -> int:
    """A port nothing listens on (bound by us, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def assert_error_shape(body: dict[str, Any]) -> None:
    assert set(body) == {"error", "message", "details"}, body
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body["message"], str) and body["message"]
    assert isinstance(body["details"], list)
    for detail in body["details"]:
        assert set(detail) == {"field", "message"}, detail


async def test_status_answers_the_product_shape(
    client: httpx.AsyncClient, campaign_server: tuple[GrpcServer, StandInCampaigns]
) -> None:
    reply = await client.get(f"/v1/campaigns/{KNOWN}/status")
    assert reply.status_code == 200, reply.text
    assert reply.json() == {
        "id": KNOWN,
        "state": "RUNNING",
        "run_id": "run_7",
        "counts": {"pending": 3, "processing": 2, "completed": 40, "failed": 1, "skipped": 4},
        "sent": 41,
        "estimated_remaining_cost": 1536,
    }
    (request,) = campaign_server[1].requests
    assert request.workspace_id == "ws_default"
    assert request.campaign_id == KNOWN


async def test_status_of_a_draft_has_no_run(client: httpx.AsyncClient) -> None:
    reply = await client.get(f"/v1/campaigns/{DRAFT}/status")
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["state"] == "DRAFT"
    assert body["run_id"] is None
    assert body["counts"] == {"pending": 0, "processing": 0, "completed": 0, "failed": 0, "skipped": 0}


async def test_unknown_campaign_is_404_with_the_error_shape(client: httpx.AsyncClient) -> None:
    missing = "9a4c0d5e-0000-4000-8000-123456789abc"
    reply = await client.get(f"/v1/campaigns/{missing}/status")
    assert reply.status_code == 404
    body = reply.json()
    assert_error_shape(body)
    assert body["error"] == "not_found"
    assert missing in body["message"]
    assert body["details"] == []


async def test_malformed_id_is_400_naming_the_field_and_never_reaches_the_service(
    client: httpx.AsyncClient, campaign_server: tuple[GrpcServer, StandInCampaigns]
) -> None:
    reply = await client.get("/v1/campaigns/not-a-uuid/status")
    assert reply.status_code == 400
    body = reply.json()
    assert_error_shape(body)
    assert body["error"] == "validation_failed"
    assert [d["field"] for d in body["details"]] == ["campaign_id"]
    assert "UUID" in body["details"][0]["message"]
    assert campaign_server[1].requests == []


@pytest.mark.parametrize(
    ("campaign_id", "status", "code"),
    [
        ("00000000-0000-4000-8000-000000000400", 400, "validation_failed"),
        ("00000000-0000-4000-8000-000000000402", 402, "insufficient_balance"),
        ("00000000-0000-4000-8000-000000000403", 403, "forbidden"),
        ("00000000-0000-4000-8000-000000000409", 409, "wrong_state"),
        ("00000000-0000-4000-8000-000000000422", 422, "launch_blocked"),
        ("00000000-0000-4000-8000-000000000500", 500, "internal"),
        (UNSPECIFIED, 500, "internal"),
    ],
)
async def test_grpc_errors_map_to_http(
    client: httpx.AsyncClient, campaign_id: str, status: int, code: str
) -> None:
    reply = await client.get(f"/v1/campaigns/{campaign_id}/status")
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert_error_shape(body)
    assert body["error"] == code
    if status == 400:
        assert body["details"] == [{"field": "campaign_id", "message": "must be a campaign of yours"}]
    if status == 422:
        assert body["details"] == [
            {"field": "steps.0.send.template", "message": "s1: template_published: not published"}
        ]
    if status == 500:
        # Nothing of the upstream failure reaches the client.
        assert body["message"] == "internal error; it has been logged"
        assert "boom" not in reply.text and "Traceback" not in reply.text


async def test_campaign_service_down_is_503_without_internals(tmp_path: Path) -> None:
    port = closed_port()
    async with gateway(f"127.0.0.1:{port}", tmp_path) as g:
        client = g.client
        client.headers.update(await g.key("campaigns:read"))
        reply = await client.get(f"/v1/campaigns/{KNOWN}/status")
        assert reply.status_code == 503, reply.text
        body = reply.json()
        assert_error_shape(body)
        assert body["error"] == "unavailable"
        assert "Traceback" not in reply.text
        assert str(port) not in reply.text  # no upstream address leaks

        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert_error_shape(ready.json())
        assert ready.json()["details"] == [{"field": "campaign", "message": "UNAVAILABLE"}]

        # Liveness does not depend on the backends.
        assert (await client.get("/healthz")).json() == {"status": "ok"}


async def test_health_and_readiness(client: httpx.AsyncClient) -> None:
    live = await client.get("/healthz")
    assert live.status_code == 200
    assert live.json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json() == {"status": "ready", "checks": {"campaign": "SERVING"}}


async def test_unknown_route_uses_the_error_shape(client: httpx.AsyncClient) -> None:
    reply = await client.get("/v1/nothing-here")
    assert reply.status_code == 404
    assert_error_shape(reply.json())
    assert reply.json()["error"] == "not_found"


async def test_openapi_lists_the_route_with_its_errors(client: httpx.AsyncClient) -> None:
    reply = await client.get("/openapi.json")
    assert reply.status_code == 200
    schema = reply.json()
    assert schema["info"]["title"] == "Shoal API"
    assert schema["info"]["version"]
    operation = schema["paths"][STATUS_PATH]["get"]
    assert {"200", "400", "404", "503"} <= set(operation["responses"])
    assert "422" not in operation["responses"]  # validation answers 400 here
    status_schema = schema["components"]["schemas"]["CampaignStatus"]
    assert "cents" in status_schema["properties"]["estimated_remaining_cost"]["description"]
    assert "/healthz" in schema["paths"]
    docs = await client.get("/docs")
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()


async def test_request_span_continues_the_callers_trace_into_grpc(
    spans: InMemorySpanExporter, campaign_server: tuple[GrpcServer, StandInCampaigns], tmp_path: Path
) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    caller_span = "00f067aa0ba902b7"
    async with gateway(campaign_server[0].address, tmp_path) as g:
        client = g.client
        headers = {"traceparent": f"00-{trace_id}-{caller_span}-01", **(await g.key("campaigns:read"))}
        reply = await client.get(f"/v1/campaigns/{KNOWN}/status", headers=headers)
        assert reply.status_code == 200
        assert (await client.get("/healthz")).status_code == 200
    finished = [
        s for s in spans.get_finished_spans() if s.context and s.context.trace_id == int(trace_id, 16)
    ]
    # One trace: the caller's, through the gateway's request span, into the campaign service.
    assert span_tree(finished) == "\n".join(
        [
            f"GET {STATUS_PATH} [SERVER]",
            "    /shoal.v1.CampaignService/GetCampaignStatus [CLIENT]",
            "        /shoal.v1.CampaignService/GetCampaignStatus [SERVER]",
        ]
    )
    (request_span,) = [s for s in finished if s.name == f"GET {STATUS_PATH}"]
    assert request_span.parent is not None and format(request_span.parent.span_id, "016x") == caller_span
    assert request_span.attributes is not None
    assert request_span.attributes["http.response.status_code"] == 200
    assert request_span.attributes["http.route"] == STATUS_PATH
    # Probes are not traced.
    assert not [s for s in spans.get_finished_spans() if "healthz" in s.name]
