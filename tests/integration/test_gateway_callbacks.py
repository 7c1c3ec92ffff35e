"""Provider callbacks: HMAC verified over the raw body before parsing, receipts published to NATS.

The gateway runs in-process against a real NATS (a namespace per test) and a stand-in execution
service answering GetExecution; bodies are built and signed with the sandbox carrier's own code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.backends import EXECUTION_SERVICE
from gateway.config import GatewaySettings
from gateway.routers import providers as providers_router
from services.execution.providers.base import Channel, OutboundMessage, client_reference
from services.sandbox.receipts import Receipt, sign
from shoal.bus import STREAM_EVENTS, Bus
from shoal.errors import NotFound, Unavailable
from shoal.grpc import GrpcServer, ServiceBinding
from shoal.v1 import common_pb2, events_pb2, execution_pb2, execution_pb2_grpc
from tests.helpers import wait_for
from tests.integration.test_gateway import assert_error_shape

SECRET = "s3cret-for-tests-0123456789abcdef"
PATH = "/v1/providers/sandbox/events"
WS = "ws_test"


class StandInExecutions(execution_pb2_grpc.ExecutionServiceServicer):  # type: ignore[misc]  # generated
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.down = False

    async def GetExecution(
        self, request: execution_pb2.GetExecutionRequest, context: Any
    ) -> execution_pb2.GetExecutionResponse:
        self.calls.append(request.execution_id)
        if self.down:
            raise Unavailable("database is down")
        if not request.execution_id.startswith("ex_") or request.workspace_id != WS:
            raise NotFound(f"execution {request.execution_id} not found")
        n = request.execution_id.removeprefix("ex_")
        return execution_pb2.GetExecutionResponse(
            execution=execution_pb2.Execution(
                id=request.execution_id,
                workspace_id=WS,
                campaign_id="cmp_1",
                run_id="run_1",
                contact_id=f"c_{n}",
            )
        )


@dataclass
class Harness:
    client: httpx.AsyncClient
    bus: Bus
    executions: StandInExecutions
    received: list[tuple[str, events_pb2.MessageReceipt, str]] = field(default_factory=list)

    async def stored(self) -> int:
        info = await self.bus.stream_info(STREAM_EVENTS)
        return int(info.state.messages)


def receipt(execution: str, status: str = "delivered", *, pmid: str = "", channel: str = "EMAIL") -> Receipt:
    return Receipt(
        provider_message_id=pmid or f"sbx_{execution}",
        idempotency_key=f"{execution}:s1",
        workspace_id=WS,
        channel=channel,
        status=status,  # type: ignore[arg-type]
        time=datetime(2026, 11, 26, 6, 0, tzinfo=UTC),
        error="rcs_not_reachable" if status == "failed" else None,
    )


def body_of(*receipts: Receipt) -> bytes:
    # The sandbox's own serialisation (ReceiptSender._deliver).
    return json.dumps({"receipts": [r.to_json() for r in receipts]}, separators=(",", ":")).encode()


def signed(body: bytes, secret: str = SECRET) -> dict[str, str]:
    return {"Content-Type": "application/json", "X-Sandbox-Signature": sign(body, secret.encode())}


@contextlib.asynccontextmanager
async def harness(nats_url: str, bus: Bus, tmp_path: Path, **overrides: Any) -> AsyncIterator[Harness]:
    executions = StandInExecutions()
    server = GrpcServer(
        "execution-stand-in",
        [
            ServiceBinding(
                execution_pb2_grpc.add_ExecutionServiceServicer_to_server, executions, EXECUTION_SERVICE
            )
        ],
    )
    await server.start()
    settings = GatewaySettings.load(
        **{
            "execution_addr": server.address,
            "campaign_addr": server.address,
            "nats_url": nats_url,
            "namespace": bus.namespace,
            "data_dir": tmp_path,
            "sandbox_callback_secret": SECRET,
            "grpc_deadline_seconds": 3.0,
            **overrides,
        }
    )
    app = create_app(settings)
    h: Harness | None = None

    async def on_message(msg: Any) -> None:
        assert h is not None
        event = events_pb2.MessageReceipt()
        event.ParseFromString(msg.data)
        h.received.append((msg.subject, event, (msg.headers or {}).get("Nats-Msg-Id", "")))

    sub = await bus.nc.subscribe(bus.subject("shoal.events.message.>"), cb=on_message)
    try:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client,
        ):
            h = Harness(client, bus, executions)
            yield h
    finally:
        await sub.unsubscribe()
        await server.stop(0)


@pytest.fixture
async def h(nats_url: str, bus: Bus, tmp_path: Path) -> AsyncIterator[Harness]:
    async with harness(nats_url, bus, tmp_path) as made:
        yield made


async def test_signed_receipts_are_published_one_event_each(h: Harness) -> None:
    body = body_of(
        receipt("ex_1"),
        receipt("ex_1", "opened"),
        receipt("ex_2", "failed", channel="RCS"),
        receipt("ex_1", "clicked"),
    )
    reply = await h.client.post(PATH, content=body, headers=signed(body))
    assert reply.status_code == 202, reply.text
    assert reply.json() == {"accepted": 4}
    await wait_for(lambda: len(h.received) == 4)
    by_status = {event.status: (subject, event, msg_id) for subject, event, msg_id in h.received}
    subject, delivered, msg_id = by_status[events_pb2.RECEIPT_STATUS_DELIVERED]
    assert subject == h.bus.subject("shoal.events.message.delivered")
    assert msg_id == "sandbox:sbx_ex_1:delivered"
    assert (delivered.workspace_id, delivered.contact_id, delivered.campaign_id, delivered.run_id) == (
        WS,
        "c_1",
        "cmp_1",
        "run_1",
    )
    assert (delivered.send_key, delivered.node_id, delivered.provider) == ("ex_1:s1", "s1", "sandbox")
    assert delivered.channel == common_pb2.CHANNEL_EMAIL
    assert delivered.time.ToDatetime(tzinfo=UTC) == datetime(2026, 11, 26, 6, 0, tzinfo=UTC)
    failed = by_status[events_pb2.RECEIPT_STATUS_FAILED][1]
    assert (failed.contact_id, failed.channel, failed.error) == (
        "c_2",
        common_pb2.CHANNEL_RCS,
        "rcs_not_reachable",
    )
    assert by_status[events_pb2.RECEIPT_STATUS_OPENED][0].endswith(".message.opened")
    assert by_status[events_pb2.RECEIPT_STATUS_CLICKED][0].endswith(".message.clicked")
    # One lookup per execution, not per receipt.
    assert sorted(h.executions.calls) == ["ex_1", "ex_2"]


async def test_a_replayed_callback_is_accepted_but_stored_once(h: Harness) -> None:
    body = body_of(receipt("ex_1"), receipt("ex_1", "opened"))
    for _ in range(3):
        reply = await h.client.post(PATH, content=body, headers=signed(body))
        assert reply.status_code == 202
    await wait_for(h.stored, message="nothing stored")
    assert await h.stored() == 2
    assert h.executions.calls == ["ex_1"], "the execution is looked up once, then cached"


async def test_a_receipt_for_an_unknown_execution_is_published_without_a_contact(h: Harness) -> None:
    body = body_of(receipt("nobody"), dataclasses.replace(receipt("x"), idempotency_key="no-colon"))
    reply = await h.client.post(PATH, content=body, headers=signed(body))
    assert reply.status_code == 202, reply.text
    await wait_for(lambda: len(h.received) == 2)
    assert {e.contact_id for _, e, _ in h.received} == {""}


def reference_for(contact: str, campaign: str = "cmp_1", run: str = "run_1") -> str:
    """The reference a provider gives the carrier for a message the engine sent."""
    message = OutboundMessage(
        key="ex_x:s1",
        workspace_id=WS,
        channel=Channel.EMAIL,
        to="a@b.co",
        payload={"campaign_id": campaign, "run_id": run, "node_id": "s1", "contact_id": contact},
    )
    reference = client_reference(message)
    assert reference is not None
    return reference


async def test_a_receipt_echoing_its_client_reference_costs_no_lookup(h: Harness) -> None:
    referenced = [
        dataclasses.replace(receipt("ex_1"), client_reference=reference_for("c_1")),
        dataclasses.replace(
            receipt("ex_2", "opened"), client_reference=reference_for("c_2", "cmp_7", "run_7")
        ),
    ]
    body = body_of(*referenced)
    reply = await h.client.post(PATH, content=body, headers=signed(body))
    assert reply.status_code == 202, reply.text
    await wait_for(lambda: len(h.received) == 2)
    assert h.executions.calls == [], "the signed reference is trusted, nothing is looked up"
    events = {e.send_key: e for _, e, _ in h.received}
    assert (events["ex_2:s1"].contact_id, events["ex_2:s1"].campaign_id, events["ex_2:s1"].run_id) == (
        "c_2",
        "cmp_7",
        "run_7",
    )

    # The same receipt without a reference (an older message) is looked up, and its event is the
    # same one, field for field.
    plain = receipt("ex_1", pmid="sbx_ex_1_plain")
    body = body_of(plain)
    reply = await h.client.post(PATH, content=body, headers=signed(body))
    assert reply.status_code == 202, reply.text
    await wait_for(lambda: len(h.received) == 3)
    assert h.executions.calls == ["ex_1"]
    looked_up = next(e for _, e, _ in h.received if e.provider_message_id == "sbx_ex_1_plain")
    looked_up.provider_message_id = events["ex_1:s1"].provider_message_id
    assert looked_up == events["ex_1:s1"]


@pytest.mark.parametrize(
    "reference", ["o2:c_1:cmp_1:run_1", "o1:c_1:cmp_1", "o1::cmp_1:run_1", "o1:c_1:cmp_1:run_1:x", "junk"]
)
async def test_a_reference_the_gateway_cannot_read_falls_back_to_the_lookup(
    h: Harness, reference: str
) -> None:
    body = body_of(dataclasses.replace(receipt("ex_4"), client_reference=reference))
    reply = await h.client.post(PATH, content=body, headers=signed(body))
    assert reply.status_code == 202, reply.text
    await wait_for(lambda: len(h.received) == 1)
    assert h.executions.calls == ["ex_4"]
    event = h.received[0][1]
    assert (event.contact_id, event.campaign_id, event.run_id) == ("c_4", "cmp_1", "run_1")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-Sandbox-Signature": ""},
        {"X-Sandbox-Signature": "sha256="},
        {"X-Sandbox-Signature": "md5=abc"},
        {"X-Sandbox-Signature": "sha256=" + "0" * 64},
        {"X-Sandbox-Signature": "sha256=zz"},
        "wrong secret",
        "tampered",
    ],
)
async def test_a_bad_signature_is_401_and_nothing_is_published(h: Harness, headers: Any) -> None:
    body = body_of(receipt("ex_1"))
    if headers == "wrong secret":
        headers = signed(body, "another-secret-0123456789abcdef")
    elif headers == "tampered":
        headers = signed(body)
        body = body.replace(b"delivered", b"clicked\x20\x20")
    reply = await h.client.post(PATH, content=body, headers=headers)
    assert reply.status_code == 401, reply.text
    assert_error_shape(reply.json())
    assert reply.json()["error"] == "bad_signature"
    assert h.executions.calls == []
    assert await h.stored() == 0


async def test_the_callback_signature_is_compared_in_constant_time(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every verdict on a signature goes through hmac.compare_digest, right or wrong, so the time
    it takes says nothing about how much of a forged signature was right."""
    calls: list[tuple[bytes, bytes]] = []
    original = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return original(a, b)

    monkeypatch.setattr(providers_router.hmac, "compare_digest", spy)
    body = body_of(receipt("ex_1"))
    good = signed(body)
    assert (await h.client.post(PATH, content=body, headers=good)).status_code == 202
    forged = {"X-Sandbox-Signature": good["X-Sandbox-Signature"][:-1] + "0"}
    if forged == good:
        forged = {"X-Sandbox-Signature": good["X-Sandbox-Signature"][:-1] + "1"}
    assert (await h.client.post(PATH, content=body, headers=forged)).status_code == 401
    assert len(calls) == 2
    # The full hex digests are compared, never a prefix or the parsed body.
    assert all(len(a) == 64 for a, _b in calls)


async def test_the_signature_is_checked_before_the_body_is_parsed(h: Harness) -> None:
    garbage = b'{"receipts": [{"status": "exploded"'
    unsigned = await h.client.post(PATH, content=garbage, headers={"X-Sandbox-Signature": "sha256=00"})
    assert unsigned.status_code == 401
    reply = await h.client.post(PATH, content=garbage, headers=signed(garbage))
    assert reply.status_code == 400
    assert reply.json()["error"] == "validation_failed"
    wrong = json.dumps({"receipts": [{**receipt("ex_1").to_json(), "status": "exploded"}]}).encode()
    reply = await h.client.post(PATH, content=wrong, headers=signed(wrong))
    assert reply.status_code == 400
    assert reply.json()["details"][0]["field"] == "receipts.0.status"


async def test_a_bad_body_names_the_field_and_publishes_nothing(h: Harness) -> None:
    good = receipt("ex_1").to_json()
    missing = {k: v for k, v in receipt("ex_2").to_json().items() if k != "workspace_id"}
    cases = {
        json.dumps({"receipts": [good, missing]}).encode(): "receipts.1.workspace_id",
        json.dumps({"receipts": [{**good, "time": "yesterday"}]}).encode(): "receipts.0.time",
        json.dumps({"receipts": [{**good, "idempotency_key": "a b"}]}).encode(): "receipts.0.idempotency_key",
        json.dumps([good]).encode(): "request",
    }
    for body, field_name in cases.items():
        reply = await h.client.post(PATH, content=body, headers=signed(body))
        assert reply.status_code == 400, body
        assert reply.json()["error"] == "validation_failed"
        assert reply.json()["details"][0]["field"] == field_name, body
    # Unknown fields are ignored, as a carrier may add its own.
    extra = json.dumps({"receipts": [{**good, "carrier_note": "x"}], "carrier": "sandbox"}).encode()
    reply = await h.client.post(PATH, content=extra, headers=signed(extra))
    assert reply.status_code == 202
    assert reply.json() == {"accepted": 1}
    await wait_for(lambda: len(h.received) == 1)
    assert [e.send_key for _, e, _ in h.received] == [good["idempotency_key"]]


async def test_unknown_provider_is_404_and_big_bodies_413(h: Harness) -> None:
    body = body_of(receipt("ex_1"))
    reply = await h.client.post("/v1/providers/acme/events", content=body, headers=signed(body))
    assert reply.status_code == 404
    assert_error_shape(reply.json())
    big = b"x" * (8 * 1024 * 1024 + 1)
    reply = await h.client.post(PATH, content=big, headers=signed(big))
    assert reply.status_code == 413
    assert reply.json()["error"] == "payload_too_large"


async def test_a_provider_secret_of_its_own(
    nats_url: str, bus: Bus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHOAL_GATEWAY_PROVIDER_SECRET_HTTP", "http-provider-secret-0123456789")
    async with harness(nats_url, bus, tmp_path) as made:
        body = body_of(receipt("ex_3"))
        sig = sign(body, b"http-provider-secret-0123456789")
        path = "/v1/providers/http/events"
        ok = await made.client.post(path, content=body, headers={"X-Http-Signature": sig})
        assert ok.status_code == 202, ok.text
        # The sandbox's secret does not open another provider's endpoint.
        wrong = await made.client.post(path, content=body, headers=signed(body))
        assert wrong.status_code == 401
        await wait_for(lambda: len(made.received) == 1)
        assert made.received[0][1].provider == "http"


async def test_backends_down_is_503_so_the_carrier_retries(nats_url: str, bus: Bus, tmp_path: Path) -> None:
    async with harness(nats_url, bus, tmp_path) as made:
        made.executions.down = True
        body = body_of(receipt("ex_1"))
        reply = await made.client.post(PATH, content=body, headers=signed(body))
        assert reply.status_code == 503
        assert_error_shape(reply.json())
        assert "database" not in reply.text
    async with harness("nats://127.0.0.1:1", bus, tmp_path, bus_connect_timeout_seconds=0.5) as made:
        reply = await made.client.post(PATH, content=body, headers=signed(body))
        assert reply.status_code == 503, reply.text
        assert reply.json()["error"] == "unavailable"


async def test_callbacks_need_no_api_key_but_the_api_still_does(h: Harness) -> None:
    # The provider route is exempt from keys (the signature is its credential); nothing else is.
    assert (
        await h.client.get("/v1/campaigns/3f2b9c1e-8d4a-4c1b-9f5e-2a7d6c0b1e94/status")
    ).status_code == 401


async def test_a_streamed_callback_over_the_cap_is_413(h: Harness) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(9):
            yield b"x" * (1024 * 1024)

    reply = await h.client.post(PATH, content=chunks(), headers={"X-Sandbox-Signature": "sha256=00"})
    assert reply.status_code == 413
    assert await h.stored() == 0
