"""The http provider against a real HTTP carrier, and the provider registry's configuration.

No mocks: a small carrier (`http.server` on port 0, in a thread) implements the REST contract
documented in `services/execution/providers/http.py` — batch send de-duplicated by each message's
idempotency key, capability lookup, bearer auth — with switches for outages and slowness, and
records every request it sees.
"""

from __future__ import annotations

import json
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from services.execution.config import ExecutionSettings
from services.execution.providers import (
    Channel,
    OutboundMessage,
    ProviderRequestError,
    ProviderUnavailable,
    build_providers,
    close_providers,
    default_provider_for,
    registry,
)
from services.execution.providers.http import IDEMPOTENCY_HEADER, HttpProvider, batch_key
from services.execution.providers.registry import ProviderConfigError
from shoal.config import ConfigError, SharedSettings

TOKEN = "carrier-token-123"
PREFIX = "/api/v2"


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


class Carrier(ThreadingHTTPServer):
    """A carrier REST API: `POST {PREFIX}/messages` and `POST {PREFIX}/capabilities`."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), CarrierHandler)
        self.lock = threading.Lock()
        self.requests: list[Request] = []
        self.accepted: dict[str, str] = {}  # idempotency key -> message id
        self.status = 200  # anything else: answer the whole call with it
        self.hold = threading.Event()  # cleared: requests wait (up to 5 s) before answering
        self.hold.set()
        self.drop_key: str | None = None  # answer without this key's result

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{PREFIX}"

    def answer_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        results = []
        for m in messages:
            key, to = m["idempotency_key"], m["to"]
            if not to.startswith("+"):
                results.append(
                    {"idempotency_key": key, "status": "failed", "code": 400, "error": "to: not E.164"}
                )
            elif to.startswith("+999"):
                results.append(
                    {"idempotency_key": key, "status": "failed", "code": 429, "error": "throttled"}
                )
            elif to.startswith("+888"):
                # An explicit flag wins over the code.
                results.append(
                    {
                        "idempotency_key": key,
                        "status": "failed",
                        "code": 500,
                        "retryable": False,
                        "error": "x",
                    }
                )
            elif key in self.accepted:
                results.append(
                    {"idempotency_key": key, "status": "duplicate", "message_id": self.accepted[key]}
                )
            else:
                self.accepted[key] = f"cm_{uuid.uuid4().hex[:12]}"
                results.append(
                    {"idempotency_key": key, "status": "accepted", "message_id": self.accepted[key]}
                )
        # Answer in reverse order: the provider must match results by key, not position.
        return [r for r in reversed(results) if r["idempotency_key"] != self.drop_key]


class CarrierHandler(BaseHTTPRequestHandler):
    server: Carrier

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.hold.wait(timeout=5)
        with self.server.lock:
            self.server.requests.append(Request(self.path, dict(self.headers.items()), body))
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                return self.reply(401, {"error": "bad token"})
            if self.server.status != 200:
                return self.reply(self.server.status, {"error": "carrier says no"})
            if self.path == f"{PREFIX}/messages":
                return self.reply(200, {"results": self.server.answer_messages(body["messages"])})
            if self.path == f"{PREFIX}/capabilities":
                # Deterministic: numbers ending in an even digit have an RCS device.
                results = [{"address": a, "rcs_capable": int(a[-1]) % 2 == 0} for a in body["addresses"]]
                return self.reply(200, {"results": results})
        return self.reply(404, {"error": "no such path"})

    def reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def carrier() -> Iterator[Carrier]:
    server = Carrier()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.hold.set()
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
async def provider(carrier: Carrier) -> AsyncIterator[HttpProvider]:
    p = HttpProvider(carrier.url, token=TOKEN, timeout=5)
    yield p
    await p.close()


def sms(key: str, to: str, channel: Channel = Channel.SMS) -> OutboundMessage:
    return OutboundMessage(
        key=key, workspace_id="ws_1", channel=channel, to=to, text="Hi", payload={"campaign_id": "c1"}
    )


def keys(n: int) -> list[str]:
    run = uuid.uuid4().hex[:8]
    return [f"exe_{run}_{i}:node_send" for i in range(n)]


async def test_batch_carries_keys_and_token_and_retries_are_duplicates(
    carrier: Carrier, provider: HttpProvider
) -> None:
    k = keys(3)
    batch = [
        sms(k[0], "+4915100000001"),
        sms(k[1], "+4915100000002", Channel.RCS),
        sms(k[2], "+4915100000003"),
    ]

    first = await provider.send_batch(batch)
    again = await provider.send_batch([batch[2], batch[0]])

    assert [(r.key, r.status) for r in first] == [(m.key, "accepted") for m in batch]
    assert all(r.provider_message_id and r.provider_message_id.startswith("cm_") for r in first)
    ids = {r.key: r.provider_message_id for r in first}
    assert [(r.key, r.status, r.provider_message_id) for r in again] == [
        (k[2], "duplicate", ids[k[2]]),
        (k[0], "duplicate", ids[k[0]]),
    ]
    request = carrier.requests[0]
    assert request.path == f"{PREFIX}/messages"
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert request.headers[IDEMPOTENCY_HEADER] == batch_key(batch)
    assert carrier.requests[1].headers[IDEMPOTENCY_HEADER] == batch_key([batch[2], batch[0]])
    assert batch_key(batch) != batch_key([batch[2], batch[0]])
    assert request.body["messages"][1] == {
        "idempotency_key": k[1],
        "workspace_id": "ws_1",
        "channel": "RCS",
        "to": "+4915100000002",
        "text": "Hi",
        "payload": {"campaign_id": "c1"},
    }
    assert len(carrier.accepted) == 3


async def test_item_errors_map_to_retryable_or_not(carrier: Carrier, provider: HttpProvider) -> None:
    k = keys(4)
    batch = [
        sms(k[0], "not-a-number"),
        sms(k[1], "+4915100000001"),
        sms(k[2], "+9990001"),
        sms(k[3], "+8880001"),
    ]

    results = await provider.send_batch(batch)

    assert [(r.key, r.status, r.retryable) for r in results] == [
        (k[0], "failed", False),  # 400: the request for this item is wrong
        (k[1], "accepted", False),
        (k[2], "failed", True),  # 429 for the item: later
        (k[3], "failed", False),  # the carrier's explicit retryable=false wins over 500
    ]
    assert results[0].error == "400 to: not E.164"
    assert results[0].provider_message_id is None
    assert set(carrier.accepted) == {k[1]}


async def test_email_is_refused_per_item_without_reaching_the_carrier(
    carrier: Carrier, provider: HttpProvider
) -> None:
    k = keys(2)
    mail = OutboundMessage(key=k[0], workspace_id="ws_1", channel=Channel.EMAIL, to="a@b.co", text="x")

    alone = await provider.send_batch([mail])
    mixed = await provider.send_batch([mail, sms(k[1], "+4915100000001")])

    assert [(r.status, r.retryable) for r in alone] == [("failed", False)]
    assert alone[0].error is not None and alone[0].error.startswith("channel:")
    assert [r.status for r in mixed] == ["failed", "accepted"]
    assert [[m["idempotency_key"] for m in r.body["messages"]] for r in carrier.requests] == [[k[1]]]


async def test_whole_call_failures(carrier: Carrier, provider: HttpProvider) -> None:
    k = keys(2)
    batch = [sms(k[0], "+4915100000001"), sms(k[1], "+4915100000002")]
    for status in (503, 500, 429, 408):
        carrier.status = status
        with pytest.raises(ProviderUnavailable, match=str(status)) as raised:
            await provider.send_batch(batch)
        assert raised.value.provider == "http"
    carrier.status = 400
    with pytest.raises(ProviderRequestError, match="400"):
        await provider.send_batch(batch)
    carrier.status = 200
    wrong_token = HttpProvider(carrier.url, token="nope")
    try:
        with pytest.raises(ProviderRequestError, match="401"):
            await wrong_token.send_batch(batch)
    finally:
        await wrong_token.close()
    assert carrier.accepted == {}

    # An answer missing an item cannot be trusted for any item; the carrier de-duplicates the retry.
    carrier.drop_key = k[1]
    with pytest.raises(ProviderUnavailable, match="no result for key"):
        await provider.send_batch(batch)
    carrier.drop_key = None
    # The carrier stored both the first time; the retry learns both ids.
    assert [r.status for r in await provider.send_batch(batch)] == ["duplicate", "duplicate"]


async def test_unreachable_or_slow_carrier_is_unavailable(carrier: Carrier) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    nobody = HttpProvider(f"http://127.0.0.1:{closed_port}", token=TOKEN)
    impatient = HttpProvider(carrier.url, token=TOKEN, timeout=0.2)
    batch = [sms(keys(1)[0], "+4915100000001")]
    try:
        with pytest.raises(ProviderUnavailable, match="cannot reach"):
            await nobody.send_batch(batch)
        carrier.hold.clear()
        with pytest.raises(ProviderUnavailable, match="timed out"):
            await impatient.send_batch(batch)
        with pytest.raises(ProviderUnavailable, match="timed out"):
            await impatient.rcs_capable(["+4915100000001"])
    finally:
        carrier.hold.set()
        await nobody.close()
        await impatient.close()


async def test_capability_lookup(carrier: Carrier, provider: HttpProvider) -> None:
    addresses = ["+4915100000001", "+4915100000002", "+4915100000004", "+4915100000001"]

    capable = await provider.rcs_capable(addresses)

    assert capable == {"+4915100000001": False, "+4915100000002": True, "+4915100000004": True}
    request = carrier.requests[-1]
    assert request.path == f"{PREFIX}/capabilities"
    assert request.body == {"addresses": ["+4915100000001", "+4915100000002", "+4915100000004"]}
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert await provider.rcs_capable([]) == {}
    carrier.status = 503
    with pytest.raises(ProviderUnavailable, match="503"):
        await provider.rcs_capable(addresses)


# -- registry ----------------------------------------------------------------------------------


@pytest.fixture
def restore_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """build_providers sets process-wide channel defaults; give them back after the test."""
    monkeypatch.setattr(registry, "_defaults", dict(registry._defaults))


@pytest.mark.usefixtures("restore_defaults")
async def test_registry_builds_configured_providers_and_channel_defaults(carrier: Carrier) -> None:
    settings = ExecutionSettings.load(
        smtp_host="127.0.0.1",
        smtp_port=2525,
        smtp_from="campaigns@shoal.example",
        http_provider_url=carrier.url,
        http_provider_token=TOKEN,
        email_provider="smtp",
        sms_provider="HTTP",
        rcs_provider="http",
    )
    providers = build_providers(settings)
    try:
        assert set(providers) == {"sandbox", "smtp", "http"}
        assert {c: default_provider_for(c) for c in Channel} == {
            Channel.EMAIL: "smtp",
            Channel.SMS: "http",
            Channel.RCS: "http",
        }
        assert default_provider_for("CHANNEL_SMS") == "http"
        result = await providers["http"].send_batch([sms(keys(1)[0], "+4915100000001")])
        assert result[0].status == "accepted"
        assert carrier.requests[-1].headers["Authorization"] == f"Bearer {TOKEN}"
    finally:
        await close_providers(providers)

    # Shared settings alone (no provider fields): the sandbox, for every channel.
    providers = build_providers(SharedSettings(sandbox_url="http://127.0.0.1:1"))
    try:
        assert set(providers) == {"sandbox"}
        assert {default_provider_for(c) for c in Channel} == {"sandbox"}
    finally:
        await close_providers(providers)
    with pytest.raises(ValueError, match="unknown channel"):
        default_provider_for("FAX")


@pytest.mark.parametrize(
    ("overrides", "variable", "reason"),
    [
        ({"email_provider": "smtp"}, "SHOAL_EXECUTION_EMAIL_PROVIDER", "set SHOAL_EXECUTION_SMTP_HOST"),
        ({"sms_provider": "http"}, "SHOAL_EXECUTION_SMS_PROVIDER", "set SHOAL_EXECUTION_HTTP_PROVIDER_URL"),
        (
            {"rcs_provider": "smtp", "smtp_host": "h", "smtp_from": "a@b.co"},
            "SHOAL_EXECUTION_RCS_PROVIDER",
            "only sends EMAIL",
        ),
        (
            {"email_provider": "http", "http_provider_url": "http://x"},
            "SHOAL_EXECUTION_EMAIL_PROVIDER",
            "only sends RCS, SMS",
        ),
        ({"sms_provider": "twilio"}, "SHOAL_EXECUTION_SMS_PROVIDER", "names no provider"),
        ({"smtp_host": "h"}, "SHOAL_EXECUTION_SMTP_FROM", "required when SHOAL_EXECUTION_SMTP_HOST"),
        ({"smtp_host": "h", "smtp_from": "nobody"}, "SHOAL_EXECUTION_SMTP_FROM", "must be an address"),
    ],
)
def test_settings_refuse_a_provider_configuration_that_cannot_work(
    overrides: dict[str, Any], variable: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        ExecutionSettings.load(**overrides)
    message = str(raised.value)
    assert f"{variable}:" in message
    assert reason in message


@dataclass(frozen=True)
class PlainSettings:
    """Settings from elsewhere than ExecutionSettings: build_providers checks them itself."""

    sandbox_url: str = "http://127.0.0.1:1"
    smtp_host: str = ""
    smtp_from: str = ""
    http_provider_url: str = ""
    email_provider: str = "sandbox"
    sms_provider: str = "sandbox"
    rcs_provider: str = "sandbox"


@pytest.mark.usefixtures("restore_defaults")
def test_build_providers_fails_fast_before_building_anything() -> None:
    before = {c: default_provider_for(c) for c in Channel}
    with pytest.raises(ProviderConfigError, match=r"SHOAL_EXECUTION_RCS_PROVIDER='http'.*PROVIDER_URL"):
        build_providers(PlainSettings(rcs_provider="http"))
    with pytest.raises(ProviderConfigError, match="SHOAL_EXECUTION_SMTP_FROM"):
        build_providers(PlainSettings(smtp_host="mail.example"))
    assert {c: default_provider_for(c) for c in Channel} == before
