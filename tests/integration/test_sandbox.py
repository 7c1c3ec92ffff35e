"""The sandbox carrier as a real process, driven through the SandboxProvider adapter.

No mocks: `python -m services.sandbox` runs as a subprocess on port 0 with its own data folder,
receipts go to a real HTTP receiver in this process, and a kill -9 proves the de-dup log is
durable.
"""

from __future__ import annotations

import json
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from services.execution.providers import (
    Channel,
    OutboundMessage,
    ProviderUnavailable,
    SandboxProvider,
    build_providers,
    close_providers,
    default_provider_for,
    verify_signature,
)
from services.execution.providers.base import client_reference
from shoal.config import SharedSettings
from tests.helpers import wait_for
from tests.processes import SandboxProcess

REPO = Path(__file__).resolve().parents[2]
SECRET = b"test-callback-secret"
T = TypeVar("T")


class ReceiptReceiver(ThreadingHTTPServer):
    """Records every callback POST (headers and raw body) the sandbox makes."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ReceiptHandler)
        self.calls: list[tuple[dict[str, str], bytes]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/webhooks/sandbox"

    def receipts(self) -> list[dict[str, Any]]:
        with self.lock:
            bodies = [body for _, body in self.calls]
        return [r for body in bodies for r in json.loads(body)["receipts"]]


class ReceiptHandler(BaseHTTPRequestHandler):
    server: ReceiptReceiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            self.server.calls.append((dict(self.headers.items()), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def receiver() -> Iterator[ReceiptReceiver]:
    server = ReceiptReceiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory, receiver: ReceiptReceiver) -> Iterator[SandboxProcess]:
    process = SandboxProcess(
        tmp_path_factory.mktemp("sandbox"),
        SHOAL_SANDBOX_CALLBACK_URL=receiver.url,
        SHOAL_SANDBOX_CALLBACK_SECRET=SECRET.decode(),
        SHOAL_SANDBOX_RECEIPT_FLUSH_MS="20",
        SHOAL_SANDBOX_FAILURE_SEED="7",
    )
    process.start()
    yield process
    process.terminate()


@pytest.fixture(autouse=True)
def calm_carrier(request: pytest.FixtureRequest) -> None:
    """Every test starts from a healthy carrier, whatever the previous one switched."""
    if "sandbox" in request.fixturenames:
        request.getfixturevalue("sandbox").control(
            latency_ms=0, failure_rate=0, outage=False, rcs_capable_rate=0.5, open_rate=0, click_rate=0
        )


@pytest.fixture
async def provider(sandbox: SandboxProcess) -> AsyncIterator[SandboxProvider]:
    p = SandboxProvider(sandbox.url, timeout=5)
    yield p
    await p.close()


def workspace() -> str:
    return f"ws_{uuid.uuid4().hex[:10]}"


def emails(ws: str, n: int, prefix: str = "e") -> list[OutboundMessage]:
    return [
        OutboundMessage(
            key=f"{ws}:{prefix}{i}",
            workspace_id=ws,
            channel=Channel.EMAIL,
            to=f"user{i}@example.com",
            subject=f"Hello {i}",
            text=f"Hi user {i}",
            html=f"<p>Hi user {i}</p>",
        )
        for i in range(n)
    ]


async def test_batch_is_accepted_and_logged_with_its_content(
    sandbox: SandboxProcess, provider: SandboxProvider
) -> None:
    ws = workspace()
    messages = [
        *emails(ws, 2),
        OutboundMessage(
            key=f"{ws}:sms", workspace_id=ws, channel=Channel.SMS, to="+4915112345678", text="Hi"
        ),
        OutboundMessage(
            key=f"{ws}:rcs",
            workspace_id=ws,
            channel=Channel.parse("CHANNEL_RCS"),
            to="+4915187654321",
            text="Rich hi",
            payload={"suggestions": [{"reply": "Yes"}]},
        ),
    ]
    results = await provider.send_batch(messages)

    assert [r.key for r in results] == [m.key for m in messages]
    assert [r.status for r in results] == ["accepted"] * 4
    ids = [r.provider_message_id for r in results]
    assert all(i and i.startswith("msg_") for i in ids)
    assert len(set(ids)) == 4
    logged = sandbox.get("/v1/messages", workspace_id=ws)["messages"]
    assert [m["idempotency_key"] for m in logged] == [m.key for m in messages]
    first, rcs = logged[0], logged[3]
    assert (first["to"], first["subject"], first["text"], first["html"]) == (
        "user0@example.com",
        "Hello 0",
        "Hi user 0",
        "<p>Hi user 0</p>",
    )
    assert first["provider_message_id"] == ids[0]
    assert (rcs["channel"], rcs["payload"]) == ("RCS", {"suggestions": [{"reply": "Yes"}]})
    assert datetime.fromisoformat(first["accepted_at"]).utcoffset() == UTC.utcoffset(None)
    assert sandbox.get("/v1/messages/count", workspace_id=ws) == {"count": 4}


async def test_same_keys_again_are_duplicates_with_the_original_ids(
    sandbox: SandboxProcess, provider: SandboxProvider
) -> None:
    ws = workspace()
    batch = emails(ws, 3)
    first = await provider.send_batch(batch)
    # The repeat also carries one key twice and one new key, in a mixed order.
    extra = emails(ws, 1, prefix="new")
    again = await provider.send_batch([batch[2], *extra, batch[0], batch[1], batch[0]])

    original = {r.key: r.provider_message_id for r in first}
    assert [r.status for r in again] == ["duplicate", "accepted", "duplicate", "duplicate", "duplicate"]
    assert again[0].provider_message_id == original[batch[2].key]
    assert again[2].provider_message_id == again[4].provider_message_id == original[batch[0].key]
    assert again[3].provider_message_id == original[batch[1].key]
    assert sandbox.get("/v1/messages/count", workspace_id=ws) == {"count": 4}


async def test_dedup_survives_kill_9_and_restart(tmp_path: Path) -> None:
    process = SandboxProcess(tmp_path)
    process.start()
    ws = workspace()
    batch = emails(ws, 5)
    try:
        provider = SandboxProvider(process.url)
        first = await provider.send_batch(batch)
        await provider.close()
        assert [r.status for r in first] == ["accepted"] * 5
        process.kill()

        process.start()
        provider = SandboxProvider(process.url)
        again = await provider.send_batch(batch)
        await provider.close()
        count = process.get("/v1/messages/count")["count"]
    finally:
        code = process.terminate()

    assert [r.status for r in again] == ["duplicate"] * 5
    assert [r.provider_message_id for r in again] == [r.provider_message_id for r in first]
    assert count == 5
    # SIGTERM is a clean shutdown: status 0 and the port file cleaned up.
    assert code == 0, process.logs()
    assert not process.port_file.exists()


async def test_outage_raises_provider_unavailable_and_stores_nothing(
    sandbox: SandboxProcess, provider: SandboxProvider
) -> None:
    ws = workspace()
    sandbox.control(outage=True)

    with pytest.raises(ProviderUnavailable) as raised:
        await provider.send_batch(emails(ws, 3))
    assert raised.value.provider == "sandbox"
    assert "503" in raised.value.reason
    with pytest.raises(ProviderUnavailable):
        await provider.rcs_capable(["+4915112345678"])
    assert sandbox.get("/v1/messages/count", workspace_id=ws) == {"count": 0}

    sandbox.control(outage=False)
    assert [r.status for r in await provider.send_batch(emails(ws, 3))] == ["accepted"] * 3


async def test_failure_rate_one_fails_every_item_as_retryable(
    sandbox: SandboxProcess, provider: SandboxProvider
) -> None:
    ws = workspace()
    batch = emails(ws, 4)
    sandbox.control(failure_rate=1.0)

    results = await provider.send_batch(batch)

    assert [(r.status, r.retryable, r.provider_message_id) for r in results] == [("failed", True, None)] * 4
    assert all(r.error for r in results)
    assert sandbox.get("/v1/messages/count", workspace_id=ws) == {"count": 0}
    # Retryable means it: the same keys go through once the carrier recovers.
    sandbox.control(failure_rate=0.0)
    assert [r.status for r in await provider.send_batch(batch)] == ["accepted"] * 4


async def test_invalid_items_fail_alone_not_retryable_naming_the_field(
    sandbox: SandboxProcess, provider: SandboxProvider
) -> None:
    ws = workspace()
    good = emails(ws, 1)[0]
    no_to = OutboundMessage(key=f"{ws}:no-to", workspace_id=ws, channel=Channel.SMS, to="", text="Hi")
    bad_phone = OutboundMessage(key=f"{ws}:bad", workspace_id=ws, channel=Channel.SMS, to="12", text="Hi")
    no_subject = OutboundMessage(
        key=f"{ws}:nosub", workspace_id=ws, channel=Channel.EMAIL, to="a@b.co", text="x"
    )

    results = await provider.send_batch([no_to, good, bad_phone, no_subject])

    assert [r.key for r in results] == [no_to.key, good.key, bad_phone.key, no_subject.key]
    assert results[1].status == "accepted"
    for result, field in ((results[0], "to"), (results[2], "to"), (results[3], "subject")):
        assert (result.status, result.retryable) == ("failed", False)
        assert result.error is not None
        assert result.error.startswith(f"{field}:"), result.error
    assert sandbox.get("/v1/messages/count", workspace_id=ws) == {"count": 1}


async def test_capabilities_are_deterministic_per_address(
    sandbox: SandboxProcess, provider: SandboxProvider
) -> None:
    addresses = [f"+49151{n:08d}" for n in range(200)]
    first = await provider.rcs_capable([*addresses, addresses[0]])
    second = await provider.rcs_capable(list(reversed(addresses)))

    assert set(first) == set(addresses)
    assert first == second
    assert 50 < sum(first.values()) < 150  # rate 0.5 by hash: neither all nor none

    sandbox.control(rcs_capable_rate=0.0)
    assert not any((await provider.rcs_capable(addresses[:20])).values())
    sandbox.control(rcs_capable_rate=1.0)
    assert all((await provider.rcs_capable(addresses[:20])).values())
    assert await provider.rcs_capable([]) == {}


async def test_unreachable_or_slow_carrier_raises_provider_unavailable(sandbox: SandboxProcess) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    nobody = SandboxProvider(f"http://127.0.0.1:{closed_port}")
    impatient = SandboxProvider(sandbox.url, timeout=0.1)
    ws = workspace()
    try:
        with pytest.raises(ProviderUnavailable, match="cannot reach"):
            await nobody.send_batch(emails(ws, 1))
        sandbox.control(latency_ms=400)
        with pytest.raises(ProviderUnavailable, match="timed out"):
            await impatient.send_batch(emails(ws, 1))
    finally:
        await nobody.close()
        await impatient.close()


async def test_receipts_arrive_signed_for_every_accepted_message(
    sandbox: SandboxProcess, provider: SandboxProvider, receiver: ReceiptReceiver
) -> None:
    ws = workspace()
    sandbox.control(open_rate=1.0, click_rate=1.0, rcs_capable_rate=0.0)
    batch = emails(ws, 3)
    rcs = OutboundMessage(
        key=f"{ws}:rcs", workspace_id=ws, channel=Channel.RCS, to="+4915100000001", text="x"
    )
    results = await provider.send_batch([*batch, rcs])
    ids = {r.key: r.provider_message_id for r in results}
    expected = 3 * 3 + 1  # delivered, opened, clicked per email; the RCS device cannot take RCS

    def ours() -> list[dict[str, Any]] | None:
        mine = [r for r in receiver.receipts() if r["workspace_id"] == ws]
        return mine if len(mine) >= expected else None

    mine: list[dict[str, Any]] = await wait_for(ours, timeout=10, message=f"{expected} receipts for {ws}")

    assert len(mine) == expected
    for message in batch:
        statuses = [r["status"] for r in mine if r["idempotency_key"] == message.key]
        assert statuses == ["delivered", "opened", "clicked"]
    rcs_receipts = [r for r in mine if r["idempotency_key"] == rcs.key]
    assert [(r["status"], r["error"]) for r in rcs_receipts] == [("failed", "rcs_not_reachable")]
    for receipt in mine:
        assert receipt["provider"] == "sandbox"
        assert receipt["provider_message_id"] == ids[receipt["idempotency_key"]]
        assert datetime.fromisoformat(receipt["time"]).utcoffset() == UTC.utcoffset(None)
    with receiver.lock:
        calls = list(receiver.calls)
    for headers, body in calls:
        signature = headers["X-Sandbox-Signature"]
        assert verify_signature(body, signature, SECRET)
        assert not verify_signature(body + b" ", signature, SECRET)
        assert not verify_signature(body, signature, b"another secret")


async def test_receipts_echo_the_client_reference_given_at_send_time(
    sandbox: SandboxProcess, provider: SandboxProvider, receiver: ReceiptReceiver
) -> None:
    ws = workspace()
    sandbox.control(open_rate=1.0, click_rate=0.0)
    origin = {"campaign_id": "cmp_1", "run_id": "run_1", "node_id": "s1", "contact_id": "c_1", "headers": {}}
    engine_made = OutboundMessage(
        key=f"{ws}:ref",
        workspace_id=ws,
        channel=Channel.EMAIL,
        to="a@b.co",
        subject="s",
        text="t",
        payload=origin,
    )
    no_origin = emails(ws, 1)[0]
    reference = client_reference(engine_made)
    assert reference == "o1:c_1:cmp_1:run_1"
    results = await provider.send_batch([engine_made, no_origin])
    assert [r.status for r in results] == ["accepted", "accepted"]

    def ours() -> list[dict[str, Any]] | None:
        mine = [r for r in receiver.receipts() if r["workspace_id"] == ws]
        return mine if len(mine) >= 4 else None

    mine: list[dict[str, Any]] = await wait_for(ours, timeout=10, message=f"4 receipts for {ws}")
    by_key: dict[str, list[dict[str, Any]]] = {}
    for r in mine:
        by_key.setdefault(r["idempotency_key"], []).append(r)
    assert [(r["status"], r["client_reference"]) for r in by_key[engine_made.key]] == [
        ("delivered", reference),
        ("opened", reference),
    ]
    assert all("client_reference" not in r for r in by_key[no_origin.key])


async def test_a_client_reference_that_is_not_a_short_string_fails_the_item(sandbox: SandboxProcess) -> None:
    ws = workspace()
    item = {
        "idempotency_key": f"{ws}:x",
        "workspace_id": ws,
        "channel": "SMS",
        "to": "+4915112345678",
        "text": "Hi",
    }
    batch = [
        {**item, "client_reference": "r" * 513},
        {**item, "idempotency_key": f"{ws}:y", "client_reference": 7},
    ]
    async with httpx.AsyncClient(base_url=sandbox.url, timeout=5) as client:
        response = await client.post("/v1/messages:batch", json={"messages": batch})
    assert response.status_code == 200, response.text
    for result in response.json()["results"]:
        assert (result["status"], result["retryable"]) == ("failed", False)
        assert result["error"].startswith("client_reference:"), result["error"]
    assert sandbox.get("/v1/messages/count", workspace_id=ws) == {"count": 0}


async def test_registry_builds_the_sandbox_for_every_channel(sandbox: SandboxProcess) -> None:
    providers = build_providers(SharedSettings(sandbox_url=sandbox.url))
    try:
        assert set(providers) == {"sandbox"}
        assert {default_provider_for(c) for c in Channel} == {"sandbox"}
        assert default_provider_for("CHANNEL_SMS") == "sandbox"
        with pytest.raises(ValueError, match="unknown channel"):
            default_provider_for("FAX")
        ws = workspace()
        assert [r.status for r in await providers["sandbox"].send_batch(emails(ws, 2))] == ["accepted"] * 2
    finally:
        await close_providers(providers)
