"""The smtp provider against a real SMTP server: aiosmtpd listening on port 0 in the test's loop.

No mocks: the provider speaks SMTP over TCP to aiosmtpd, whose handler records every transaction
and answers with the reply codes a test asks for (451 once, 550, 421, ...).
"""

from __future__ import annotations

import asyncio
import socket
import uuid
import warnings
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP as SmtpServer
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

from services.execution.providers import Channel, OutboundMessage, ProviderRequestError, ProviderUnavailable
from services.execution.providers.smtp import IDEMPOTENCY_HEADER, SmtpProvider, message_id_for
from tests.helpers import wait_for

FROM = "Shoal Campaigns <campaigns@shoal.example>"


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage


@dataclass
class Handler:
    """Records accepted mail; `rcpt_replies`/`data_replies` give scripted answers per recipient.

    A scripted answer is a list consumed one reply per attempt; once empty, the server accepts.
    """

    received: list[Received] = field(default_factory=list)
    data_attempts: list[EmailMessage] = field(default_factory=list)
    rcpt_replies: dict[str, list[str]] = field(default_factory=dict)
    data_replies: dict[str, list[str]] = field(default_factory=dict)
    peers: set[Any] = field(default_factory=set)
    active: int = 0
    most_active: int = 0
    # Set to hold every DATA until released (to observe concurrency).
    gate: asyncio.Event | None = None

    async def handle_RCPT(
        self, server: SmtpServer, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.peers.add(session.peer)
        script = self.rcpt_replies.get(address)
        if script:
            return script.pop(0)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SmtpServer, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes)
        parsed = message_from_bytes(envelope.content, policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        self.data_attempts.append(parsed)
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            if self.gate is not None:
                await self.gate.wait()
        finally:
            self.active -= 1
        script = self.data_replies.get(envelope.rcpt_tos[0])
        if script:
            return script.pop(0)
        self.received.append(Received(str(envelope.mail_from), list(envelope.rcpt_tos), parsed))
        return "250 2.0.0 queued"


@dataclass
class Server:
    handler: Handler
    port: int


async def start_server(handler: Handler, **options: Any) -> tuple[asyncio.Server, int]:
    loop = asyncio.get_running_loop()

    def protocol() -> SmtpServer:
        with warnings.catch_warnings():
            # aiosmtpd warns about AUTH without TLS, which the login test does on purpose over
            # loopback; pytest turns warnings into errors.
            warnings.filterwarnings("ignore", message="Requiring AUTH while not requiring TLS")
            return SmtpServer(handler, hostname="mx.test", loop=loop, **options)

    server = await loop.create_server(protocol, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.fixture
async def smtp_server() -> AsyncIterator[Server]:
    handler = Handler()
    server, port = await start_server(handler)
    yield Server(handler, port)
    server.close()
    await server.wait_closed()


@pytest.fixture
async def provider(smtp_server: Server) -> AsyncIterator[SmtpProvider]:
    p = SmtpProvider(host="127.0.0.1", port=smtp_server.port, from_address=FROM, starttls=False, timeout=5)
    yield p
    await p.close()


def email(key: str, to: str, **fields: Any) -> OutboundMessage:
    values: dict[str, Any] = {"subject": "Spring sale", "text": "Hi there", "html": "<p>Hi there</p>"}
    values.update(fields)
    return OutboundMessage(key=key, workspace_id="ws_1", channel=Channel.EMAIL, to=to, **values)


def run_key() -> Callable[[str], str]:
    run = uuid.uuid4().hex[:8]
    return lambda name: f"exe_{run}_{name}:node_send"


async def test_message_is_rfc5322_with_alternatives_and_template_headers(
    smtp_server: Server, provider: SmtpProvider
) -> None:
    key = run_key()
    headers = {
        "List-Unsubscribe": "<https://shoal.example/u/c1>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        "From": "someone-else@evil.example",  # reserved: the provider's From wins
    }
    newsletter = email(key("a"), "ann@example.com", subject="Grüße", payload={"headers": headers})
    text_only = email(key("b"), "bob@example.com", html=None)
    html_only = email(key("c"), "cy@example.com", text=None)

    results = await provider.send_batch([newsletter, text_only, html_only])

    assert [(r.key, r.status) for r in results] == [
        (m.key, "accepted") for m in (newsletter, text_only, html_only)
    ]
    got = {r.rcpt_tos[0]: r for r in smtp_server.handler.received}
    assert set(got) == {"ann@example.com", "bob@example.com", "cy@example.com"}
    ann = got["ann@example.com"]
    assert ann.mail_from == "campaigns@shoal.example"
    m = ann.message
    assert m["From"] == FROM
    assert m["To"] == "ann@example.com"
    assert m["Subject"] == "Grüße"
    assert m["Date"]
    assert (
        m["Message-ID"] == message_id_for(newsletter.key, "shoal.example") == results[0].provider_message_id
    )
    assert m[IDEMPOTENCY_HEADER] == newsletter.key
    assert m["List-Unsubscribe"] == "<https://shoal.example/u/c1>"
    assert m["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert m.get_all("From") == [FROM]
    assert m.get_content_type() == "multipart/alternative"
    plain, html = (m.get_body(("plain",)), m.get_body(("html",)))
    assert plain is not None and plain.get_content().strip() == "Hi there"
    assert html is not None and html.get_content().strip() == "<p>Hi there</p>"
    assert got["bob@example.com"].message.get_content_type() == "text/plain"
    assert got["cy@example.com"].message.get_content_type() == "text/html"
    # Distinct keys, distinct ids; the left part does not reveal the key.
    ids = {r.provider_message_id for r in results}
    assert len(ids) == 3
    assert all(m.key not in str(i) for m, i in zip((newsletter, text_only, html_only), ids, strict=False))


async def test_451_is_retryable_and_the_retry_carries_the_same_message_id(
    smtp_server: Server, provider: SmtpProvider
) -> None:
    key = run_key()
    smtp_server.handler.data_replies["flaky@example.com"] = ["451 4.3.0 local error, try later"]
    message = email(key("a"), "flaky@example.com")

    first = await provider.send_batch([message])
    again = await provider.send_batch([message])

    assert (first[0].status, first[0].retryable) == ("failed", True)
    assert first[0].error is not None and "451" in first[0].error
    assert again[0].status == "accepted"
    attempts = smtp_server.handler.data_attempts
    assert len(attempts) == 2
    assert attempts[0]["Message-ID"] == attempts[1]["Message-ID"] == again[0].provider_message_id
    assert attempts[0][IDEMPOTENCY_HEADER] == attempts[1][IDEMPOTENCY_HEADER] == message.key
    assert len(smtp_server.handler.received) == 1


async def test_refusals_fail_per_item_transient_retryable_permanent_not(
    smtp_server: Server, provider: SmtpProvider
) -> None:
    key = run_key()
    replies = smtp_server.handler.rcpt_replies
    replies["unknown@example.com"] = ["550 5.1.1 no such user"]
    replies["bad@example.com"] = ["553 5.1.3 mailbox name not allowed"]
    replies["full@example.com"] = ["452 4.2.2 mailbox full"]
    replies["busy@example.com"] = ["450 4.2.1 mailbox busy"]
    batch = [
        email(key("ok"), "ok@example.com"),
        email(key("unknown"), "unknown@example.com"),
        email(key("bad"), "bad@example.com"),
        email(key("full"), "full@example.com"),
        email(key("busy"), "busy@example.com"),
        email(key("nobody"), ""),
        email(key("empty"), "e@example.com", text=None, html=None),
        email(key("inject"), "i@example.com", payload={"headers": {"List-Unsubscribe": "<x>\r\nBcc: a@b.c"}}),
        OutboundMessage(
            key=key("sms"), workspace_id="ws_1", channel=Channel.SMS, to="+4915100000001", text="x"
        ),
    ]

    results = await provider.send_batch(batch)

    outcome = [(r.status, r.retryable) for r in results]
    assert outcome == [
        ("accepted", False),
        ("failed", False),
        ("failed", False),
        ("failed", True),
        ("failed", True),
        ("failed", False),
        ("failed", False),
        ("failed", False),
        ("failed", False),
    ]
    errors = [r.error or "" for r in results]
    assert "550" in errors[1] and "553" in errors[2] and "452" in errors[3] and "450" in errors[4]
    assert errors[5].startswith("to:") and errors[6].startswith("text:")
    assert [a["To"] for a in smtp_server.handler.data_attempts] == ["ok@example.com"]
    assert errors[8].startswith("channel:")
    assert [r.rcpt_tos for r in smtp_server.handler.received] == [["ok@example.com"]]


async def test_421_everywhere_is_unavailable_but_after_an_acceptance_it_is_per_item(
    smtp_server: Server, provider: SmtpProvider
) -> None:
    key = run_key()
    replies = smtp_server.handler.rcpt_replies
    replies["a@example.com"] = ["421 4.3.2 shutting down"]
    replies["b@example.com"] = ["421 4.3.2 shutting down"]

    with pytest.raises(ProviderUnavailable, match="421") as raised:
        await provider.send_batch([email(key("a"), "a@example.com"), email(key("b"), "b@example.com")])
    assert raised.value.provider == "smtp"

    # One accepted in the same batch: raising would lose that acceptance (and resend it, since
    # SMTP does not de-duplicate), so the unreached item fails alone, retryable.
    replies["c@example.com"] = ["421 4.3.2 shutting down"]
    mixed = await provider.send_batch([email(key("ok"), "ok@example.com"), email(key("c"), "c@example.com")])
    assert [(r.status, r.retryable) for r in mixed] == [("accepted", False), ("failed", True)]


async def test_unreachable_or_silent_server_is_provider_unavailable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    nobody = SmtpProvider(host="127.0.0.1", port=closed_port, from_address=FROM, starttls=False)

    hold = asyncio.Event()

    async def never_greets(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await hold.wait()
        writer.close()

    silent = await asyncio.start_server(never_greets, "127.0.0.1", 0)
    impatient = SmtpProvider(
        host="127.0.0.1",
        port=silent.sockets[0].getsockname()[1],
        from_address=FROM,
        starttls=False,
        timeout=0.3,
    )
    key = run_key()
    batch = [email(key(str(i)), f"u{i}@example.com") for i in range(20)]
    try:
        with pytest.raises(ProviderUnavailable, match="cannot connect"):
            await nobody.send_batch(batch)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ProviderUnavailable, match="cannot connect"):
            await impatient.send_batch(batch)
        # One timeout for the batch, not one per message (20 x 0.3 s).
        assert loop.time() - started < 2.0
    finally:
        hold.set()
        await nobody.close()
        await impatient.close()
        silent.close()
        await silent.wait_closed()


async def test_batch_runs_over_a_bounded_pool_reused_across_batches(smtp_server: Server) -> None:
    provider = SmtpProvider(
        host="127.0.0.1", port=smtp_server.port, from_address=FROM, starttls=False, pool_size=3
    )
    handler = smtp_server.handler
    handler.gate = asyncio.Event()
    key = run_key()
    try:
        sending = asyncio.create_task(
            provider.send_batch([email(key(str(i)), f"u{i}@example.com") for i in range(12)])
        )

        await wait_for(lambda: handler.active == 3, timeout=5, message=lambda: f"active={handler.active}")
        handler.gate.set()
        first = await sending
        second = await provider.send_batch([email(key(f"x{i}"), f"x{i}@example.com") for i in range(6)])
    finally:
        await provider.close()

    assert [r.status for r in first + second] == ["accepted"] * 18
    assert handler.most_active == 3
    assert len(handler.received) == 18
    # Three connections carried both batches.
    assert len(handler.peers) == 3


async def test_login_is_used_and_a_refused_login_is_a_request_error() -> None:
    def authenticator(
        server: SmtpServer, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"shoal", b"s3cret")
        return AuthResult(success=ok, handled=False)

    handler = Handler()
    server, port = await start_server(
        handler, authenticator=authenticator, auth_required=True, auth_require_tls=False
    )
    good = SmtpProvider(
        host="127.0.0.1", port=port, from_address=FROM, username="shoal", password="s3cret", starttls=False
    )
    bad = SmtpProvider(
        host="127.0.0.1", port=port, from_address=FROM, username="shoal", password="wrong", starttls=False
    )
    key = run_key()
    try:
        assert [r.status for r in await good.send_batch([email(key("a"), "a@example.com")])] == ["accepted"]
        with pytest.raises(ProviderRequestError, match="login refused"):
            await bad.send_batch([email(key("b"), "b@example.com")])
    finally:
        await good.close()
        await bad.close()
        server.close()
        await server.wait_closed()
    assert len(handler.received) == 1


async def test_starttls_required_but_not_offered_is_a_request_error(smtp_server: Server) -> None:
    strict = SmtpProvider(host="127.0.0.1", port=smtp_server.port, from_address=FROM, starttls=True)
    try:
        with pytest.raises(ProviderRequestError):
            await strict.send_batch([email(run_key()("a"), "a@example.com")])
    finally:
        await strict.close()
    assert smtp_server.handler.received == []


async def test_no_address_is_rcs_capable(provider: SmtpProvider) -> None:
    assert await provider.rcs_capable(["+4915100000001", "a@b.co", "+4915100000001"]) == {
        "+4915100000001": False,
        "a@b.co": False,
    }
    assert await provider.send_batch([]) == []


def test_message_id_is_a_stable_function_of_the_key() -> None:
    assert message_id_for("exe_1:n1", "shoal.example") == message_id_for("exe_1:n1", "shoal.example")
    assert message_id_for("exe_1:n1", "shoal.example") != message_id_for("exe_1:n2", "shoal.example")
    with pytest.raises(ValueError, match="addr@domain"):
        SmtpProvider(host="h", port=25, from_address="no address")
