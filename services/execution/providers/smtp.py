"""The `smtp` provider: EMAIL over a real SMTP server (aiosmtplib).

Each message is an RFC 5322 `EmailMessage`: From (SHOAL_EXECUTION_SMTP_FROM), To, Subject, Date,
a text part and an html alternative (multipart/alternative when both exist), the template's extra
headers from `payload["headers"]` (List-Unsubscribe, List-Unsubscribe-Post), an
`X-Shoal-Idempotency-Key` with the send key, and a `Message-ID` derived from the send key alone,
so every attempt of one send carries the same id. That id is the `provider_message_id`.

**SMTP has no idempotency.** The design's exactly-once delivery relies on the provider
de-duplicating by key; an SMTP server does not. If the server accepted a message (its 250 after
DATA) and the worker dies, or the connection drops before we read that 250, before the batch's
commit, the retry sends the message again with the same Message-ID. Whether the recipient then
sees one copy or two depends on the receiving side: some mail systems drop a second message with
a Message-ID they already hold, many deliver both. Sends through this provider are therefore
at-least-once, not exactly-once; billing stays exactly-once (the hold is keyed on the send key).
A relay that de-duplicates on `X-Shoal-Idempotency-Key` or Message-ID closes the gap.

Outcomes:
- accepted (250 after DATA) -> `accepted`; SMTP never answers "duplicate".
- 4xx on MAIL/RCPT/DATA (450, 451, 452, ...) -> that item `failed`, retryable.
- 5xx (550, 553, ...) -> that item `failed`, not retryable; so is a message we cannot build
  (not EMAIL, no recipient, no body, a header with a line break, a non-ASCII address the server
  cannot take).
- no connection, a timeout, a dropped connection or 421 (the server closing the channel) ->
  `ProviderUnavailable` for the whole call when no item of the batch got a verdict from the server
  (the breaker counts it); once some item did, the unreached items fail as retryable instead, so
  the items the server accepted are still recorded as sent.
- the server refusing our login -> `ProviderRequestError` (configuration, not the server's health).

Throughput: aiosmtplib does not pipeline (RFC 2920), so a batch's messages go out in parallel over
a bounded pool of connections (SHOAL_EXECUTION_SMTP_POOL_SIZE), each reused across messages and
batches (RSET between transactions is aiosmtplib's). An idle connection is probed with NOOP
before reuse, and a connection is retired after `MAX_MESSAGES_PER_CONNECTION` messages, since
servers commonly cap messages per session. Once connecting fails within a batch, the batch's
remaining messages do not try again: a down server costs one connect timeout, not one per message.

SMTP gives no delivery receipts: bounces come back as mail to the envelope sender, outside Shoal.
`rcs_capable` answers False for every address.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr

import aiosmtplib
from opentelemetry import trace

from services.execution.providers.base import (
    Channel,
    OutboundMessage,
    Provider,
    ProviderRequestError,
    ProviderUnavailable,
    SendResult,
)

IDEMPOTENCY_HEADER = "X-Shoal-Idempotency-Key"
MAX_MESSAGES_PER_CONNECTION = 100
# An idle connection older than this gets a NOOP before reuse: servers close idle sessions, and
# finding that out in the middle of a transaction would make the message's outcome ambiguous.
PROBE_IDLE_AFTER_SECONDS = 15.0
# 421: "service not available, closing transmission channel" concerns the server, not the message.
_SERVICE_CLOSING = 421
# Headers this provider sets itself; the template's extra headers cannot replace them.
_RESERVED = frozenset(
    h.lower()
    for h in (
        "From",
        "Sender",
        "To",
        "Cc",
        "Bcc",
        "Subject",
        "Date",
        "Message-ID",
        "MIME-Version",
        "Content-Type",
        "Content-Transfer-Encoding",
        "Return-Path",
        IDEMPOTENCY_HEADER,
    )
)
tracer = trace.get_tracer(__name__)


def message_id_for(key: str, domain: str) -> str:
    """The Message-ID of send `key`: the same for every attempt, unique per key.

    A hash rather than the key itself keeps internal ids out of recipients' mail and keeps the
    left part within the characters RFC 5322 allows.
    """
    digest = hashlib.sha256(key.encode()).hexdigest()[:40]
    return f"<{digest}@{domain}>"


@dataclass(frozen=True, slots=True)
class _Unreached:
    """The item never got a verdict from the server (connection-level failure)."""

    reason: str
    # True when the server refused us as a client (login), which no retry of the call fixes.
    refused: bool = False


@dataclass(slots=True)
class _Connection:
    smtp: aiosmtplib.SMTP
    sent: int = 0
    last_used: float = field(default_factory=time.monotonic)


@dataclass(slots=True)
class _Call:
    """State shared by the messages of one `send_batch`."""

    broken: _Unreached | None = None
    # Items the server accepted or refused with a reply code.
    verdicts: int = 0


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return f"SMTP {exc.code} {exc.message}".strip()
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class SmtpProvider(Provider):
    name = "smtp"

    def __init__(
        self,
        *,
        host: str,
        port: int,
        from_address: str,
        username: str | None = None,
        password: str | None = None,
        starttls: bool = True,
        tls: bool = False,
        timeout: float = 10.0,
        pool_size: int = 4,
    ) -> None:
        envelope_from = parseaddr(from_address)[1]
        if "@" not in envelope_from:
            raise ValueError(f"from address {from_address!r} has no addr@domain")
        self.host = host
        self.port = port
        self.from_header = from_address
        self.envelope_from = envelope_from
        self.message_id_domain = envelope_from.rpartition("@")[2]
        self._username = username
        self._password = password
        self._tls = tls
        # aiosmtplib: True requires STARTTLS, False never tries it. Implicit TLS replaces it.
        self._starttls = starttls and not tls
        self._timeout = timeout
        self._slots = asyncio.Semaphore(pool_size)
        self._idle: list[_Connection] = []
        self._closed = False

    # -- messages ---------------------------------------------------------------------------------

    def build(self, message: OutboundMessage, *, now: datetime | None = None) -> EmailMessage:
        """The RFC 5322 message for `message`; ValueError names what makes it unsendable."""
        if message.channel != Channel.EMAIL:
            raise ValueError(f"channel: the smtp provider only sends EMAIL, not {message.channel}")
        if not message.to:
            raise ValueError("to: an email needs a recipient address")
        if not message.text and not message.html:
            raise ValueError("text: an email needs a text or an html body")
        email = EmailMessage()
        email["From"] = self.from_header
        email["To"] = message.to
        if message.subject:
            email["Subject"] = message.subject
        email["Date"] = format_datetime(now or datetime.now(UTC))
        email["Message-ID"] = message_id_for(message.key, self.message_id_domain)
        email[IDEMPOTENCY_HEADER] = message.key
        extra = message.payload.get("headers") or {}
        if not isinstance(extra, dict):
            raise ValueError("headers: payload headers must be a mapping")
        for name, value in extra.items():
            if str(name).lower() not in _RESERVED:
                # The email policy refuses CR/LF in a value, so no header can inject another.
                email[str(name)] = str(value)
        if message.text:
            email.set_content(message.text)
            if message.html:
                email.add_alternative(message.html, subtype="html")
        else:
            email.set_content(message.html or "", subtype="html")
        return email

    async def send_batch(self, messages: Sequence[OutboundMessage]) -> list[SendResult]:
        if not messages:
            return []
        if self._closed:
            raise ProviderUnavailable(self.name, "provider is closed")
        with tracer.start_as_current_span("smtp send_batch", kind=trace.SpanKind.CLIENT) as span:
            span.set_attribute("messaging.batch.message_count", len(messages))
            call = _Call()
            outcomes = await asyncio.gather(*(self._send_one(m, call) for m in messages))
            unreached = [o for o in outcomes if isinstance(o, _Unreached)]
            if unreached and call.verdicts == 0:
                # No item reached the server's verdict: the call as a whole failed.
                first = unreached[0]
                if first.refused:
                    raise ProviderRequestError(self.name, first.reason)
                raise ProviderUnavailable(self.name, first.reason)
            results = [
                SendResult(key=m.key, status="failed", error=o.reason, retryable=True)
                if isinstance(o, _Unreached)
                else o
                for m, o in zip(messages, outcomes, strict=True)
            ]
            span.set_attribute("shoal.provider.failed", sum(1 for r in results if not r.ok))
            return results

    async def _send_one(self, message: OutboundMessage, call: _Call) -> SendResult | _Unreached:
        try:
            email = self.build(message)
        except ValueError as exc:
            return SendResult(key=message.key, status="failed", error=str(exc), retryable=False)
        async with self._slots:
            if call.broken is not None:
                return call.broken
            try:
                conn = await self._checkout()
            except aiosmtplib.SMTPAuthenticationError as exc:
                call.broken = _Unreached(f"login refused: {_describe(exc)}", refused=True)
                return call.broken
            except (aiosmtplib.SMTPException, OSError) as exc:
                if type(exc) is aiosmtplib.SMTPException:
                    # aiosmtplib raises the bare class when the server lacks an extension our
                    # settings require (STARTTLS, AUTH): configuration, not an outage.
                    call.broken = _Unreached(f"{self.host}:{self.port}: {exc}", refused=True)
                else:
                    call.broken = _Unreached(f"cannot connect to {self.host}:{self.port}: {_describe(exc)}")
                return call.broken
            keep = False
            try:
                await conn.smtp.send_message(email, sender=self.envelope_from, recipients=[message.to])
                keep = True
                call.verdicts += 1
                return self._accepted(message, email)
            except aiosmtplib.SMTPRecipientsRefused as exc:
                keep = True  # aiosmtplib sent RSET: the session is clean for the next message
                refusal = exc.recipients[0]
                if refusal.code == _SERVICE_CLOSING:
                    keep = False
                    return _Unreached(_describe(refusal))
                call.verdicts += 1
                return self._refused(message, refusal.code, refusal.message)
            except aiosmtplib.SMTPResponseException as exc:
                if exc.code == _SERVICE_CLOSING:
                    return _Unreached(_describe(exc))
                keep = True
                call.verdicts += 1
                return self._refused(message, exc.code, exc.message)
            except (aiosmtplib.SMTPNotSupported, ValueError) as exc:
                # SMTPUTF8 needed but not offered, or an address aiosmtplib cannot put on the wire.
                keep = True
                return SendResult(key=message.key, status="failed", error=f"to: {exc}", retryable=False)
            except (aiosmtplib.SMTPException, OSError) as exc:
                # Dropped or timed out mid-transaction: if it was after DATA, the server may hold
                # the message and the retry sends it again (see the module docstring).
                return _Unreached(f"connection lost: {_describe(exc)}")
            finally:
                await self._checkin(conn, keep=keep)

    def _accepted(self, message: OutboundMessage, email: EmailMessage) -> SendResult:
        return SendResult(key=message.key, status="accepted", provider_message_id=str(email["Message-ID"]))

    def _refused(self, message: OutboundMessage, code: int, text: str) -> SendResult:
        # 4xx is "try again later" by definition (RFC 5321 4.2.1); 5xx will not change.
        return SendResult(
            key=message.key,
            status="failed",
            error=f"SMTP {code} {text}".strip(),
            retryable=400 <= code < 500,
        )

    # -- connections ------------------------------------------------------------------------------

    async def _connect(self) -> _Connection:
        smtp = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            username=self._username,
            password=self._password,
            use_tls=self._tls,
            start_tls=self._starttls,
            timeout=self._timeout,
        )
        await smtp.connect()  # greeting, EHLO, STARTTLS and login when configured
        return _Connection(smtp)

    async def _checkout(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.smtp.is_connected:
                continue
            if time.monotonic() - conn.last_used > PROBE_IDLE_AFTER_SECONDS:
                try:
                    await conn.smtp.noop()
                except (aiosmtplib.SMTPException, OSError):
                    conn.smtp.close()
                    continue
            return conn
        return await self._connect()

    async def _checkin(self, conn: _Connection, *, keep: bool) -> None:
        conn.sent += 1
        conn.last_used = time.monotonic()
        if not keep or not conn.smtp.is_connected:
            conn.smtp.close()  # state unknown after an error: never reuse it
        elif self._closed or conn.sent >= MAX_MESSAGES_PER_CONNECTION:
            await self._quit(conn)
        else:
            self._idle.append(conn)

    async def _quit(self, conn: _Connection) -> None:
        try:
            await asyncio.wait_for(conn.smtp.quit(), timeout=self._timeout)
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            conn.smtp.close()

    async def rcs_capable(self, addresses: Sequence[str]) -> dict[str, bool]:
        return dict.fromkeys(addresses, False)

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        await asyncio.gather(*(self._quit(c) for c in idle))
