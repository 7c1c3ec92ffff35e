"""The `http` provider: SMS and RCS through a carrier/aggregator REST API (httpx).

The contract Shoal expects of the carrier (SHOAL_EXECUTION_HTTP_PROVIDER_URL is `{base}`; every
request carries `Authorization: Bearer <SHOAL_EXECUTION_HTTP_PROVIDER_TOKEN>`):

Send, `POST {base}/messages`::

    Idempotency-Key: batch-<sha256 hex of the batch's keys, newline-joined>
    {"messages": [{"idempotency_key": "<execution_id:node_id>", "workspace_id": "...",
                   "channel": "SMS" | "RCS", "to": "+4915...", "text": "...", "payload": {...},
                   "client_reference": "o1:<contact_id>:<campaign_id>:<run_id>"}]}

  The per-message `idempotency_key` is authoritative: the carrier must answer a key it already
  accepted with `duplicate` and the original message id, across its own restarts; that is what
  makes a retry after our crash safe. The request's `Idempotency-Key` only lets a carrier (or a
  proxy) replay its stored answer to the very same batch; it must not reject a different batch
  that shares some keys. `client_reference` (at most 512 characters, absent when the message has
  no origin to give) is opaque to the carrier: it keeps it with the message and echoes it in every
  receipt, like Infobip's callbackData or Sinch's client_reference.

  Answer 200 (or 207), one result per distinct key, in any order::

    {"results": [{"idempotency_key": "...", "status": "accepted" | "duplicate" | "failed",
                  "message_id": "...", "code": 400, "error": "to: not a mobile number",
                  "retryable": false}]}

  A failed item is retried later when `retryable` is true; without `retryable`, its `code`
  decides like an HTTP status (408, 429 and 5xx retryable, any other code not); without either
  it is not retried.

Capabilities, `POST {base}/capabilities`::

    {"addresses": ["+4915..."]}  ->  {"results": [{"address": "+4915...", "rcs_capable": true}]}

Whole-call outcomes: a timeout, no connection, 5xx, 408 or 429 -> `ProviderUnavailable` (the
breaker counts it; the batch is retried with the same keys); another 4xx (401 bad token, 400 bad
request) -> `ProviderRequestError`; a 2xx whose body is not the shape above (a key missing,
an unknown status) -> `ProviderUnavailable`, because its answer cannot be trusted for any item and
the carrier's de-duplication makes the retry safe.

Delivery callbacks (verified by the gateway, not here): the carrier POSTs to
`{gateway}/v1/providers/http/events` with `X-Http-Signature: sha256=<hex HMAC-SHA256 of the raw
body>` under the secret SHOAL_GATEWAY_PROVIDER_SECRET_HTTP, and the body::

    {"receipts": [{"provider_message_id": "<message_id>", "idempotency_key": "<the send key>",
                   "workspace_id": "...", "channel": "SMS" | "RCS",
                   "status": "delivered" | "failed" | "opened" | "clicked" | "bounced",
                   "time": "<RFC 3339 with offset>", "error": "...",
                   "client_reference": "<as given at send time>"}]}

  The gateway answers 202 once stored, 401 on a bad signature, 503 when the carrier should retry.
  A replayed receipt is stored once (keyed on provider, message id and status). A receipt with
  the echoed `client_reference` is published straight away; one without it costs the gateway a
  lookup of the execution (once per execution, cached).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import httpx
from opentelemetry import trace

from services.execution.providers.base import (
    Channel,
    OutboundMessage,
    Provider,
    ProviderRequestError,
    ProviderUnavailable,
    SendResult,
    client_reference,
)

IDEMPOTENCY_HEADER = "Idempotency-Key"
CHANNELS = frozenset({Channel.SMS, Channel.RCS})
_STATUSES = frozenset({"accepted", "duplicate", "failed"})
tracer = trace.get_tracer(__name__)


def batch_key(messages: Sequence[OutboundMessage]) -> str:
    """The request's Idempotency-Key: the same for a retry of the same batch."""
    return "batch-" + hashlib.sha256("\n".join(m.key for m in messages).encode()).hexdigest()


def _wire(message: OutboundMessage) -> dict[str, Any]:
    item = {
        "idempotency_key": message.key,
        "workspace_id": message.workspace_id,
        "channel": str(message.channel),
        "to": message.to,
        "text": message.text,
        "payload": message.payload,
    }
    reference = client_reference(message)
    if reference is not None:
        item["client_reference"] = reference
    return item


def _retryable(item: dict[str, Any]) -> bool:
    explicit = item.get("retryable")
    if isinstance(explicit, bool):
        return explicit
    code = item.get("code")
    if isinstance(code, int) and not isinstance(code, bool):
        return code >= 500 or code in (408, 429)
    return False


class HttpProvider(Provider):
    name = "http"

    def __init__(self, base_url: str, *, token: str = "", timeout: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # One client for the provider's lifetime: its pool keeps connections warm across batches.
        self._client = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, headers=headers)

    async def _post(self, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
        try:
            response = await self._client.post(path, json=body, headers=headers)
        except httpx.TimeoutException as exc:
            raise ProviderUnavailable(self.name, f"timed out calling {path}") from exc
        except httpx.TransportError as exc:
            raise ProviderUnavailable(self.name, f"cannot reach {self.base_url}: {exc!r}") from exc
        status = response.status_code
        if status >= 500 or status in (408, 429):
            raise ProviderUnavailable(self.name, f"HTTP {status} from {path}: {response.text[:200]}")
        if status >= 400:
            raise ProviderRequestError(self.name, f"HTTP {status} from {path}: {response.text[:500]}")
        try:
            answer = response.json()
        except ValueError as exc:
            raise ProviderUnavailable(self.name, f"malformed JSON from {path}") from exc
        if not isinstance(answer, dict) or not isinstance(answer.get("results"), list):
            raise ProviderUnavailable(self.name, f"answer from {path} has no results list")
        return answer["results"]

    async def send_batch(self, messages: Sequence[OutboundMessage]) -> list[SendResult]:
        # An EMAIL routed here (a SEND node naming this provider) fails alone; it never reaches
        # the carrier, and the rest of the batch goes on.
        wrong = {m.key for m in messages if m.channel not in CHANNELS}
        sendable = [m for m in messages if m.key not in wrong]
        if not sendable:
            return [self._wrong_channel(m) for m in messages]
        with tracer.start_as_current_span("http send_batch", kind=trace.SpanKind.CLIENT) as span:
            span.set_attribute("messaging.batch.message_count", len(sendable))
            items = await self._post(
                "/messages",
                {"messages": [_wire(m) for m in sendable]},
                headers={IDEMPOTENCY_HEADER: batch_key(sendable)},
            )
            # Matched by key, not position: a carrier may answer in its own order.
            by_key = {
                item["idempotency_key"]: item
                for item in items
                if isinstance(item, dict) and isinstance(item.get("idempotency_key"), str)
            }
            results = [
                self._wrong_channel(m) if m.key in wrong else self._result(m, by_key.get(m.key))
                for m in messages
            ]
            span.set_attribute("shoal.provider.failed", sum(1 for r in results if not r.ok))
            return results

    def _wrong_channel(self, message: OutboundMessage) -> SendResult:
        return SendResult(
            key=message.key,
            status="failed",
            error=f"channel: the http provider only sends SMS and RCS, not {message.channel}",
            retryable=False,
        )

    def _result(self, message: OutboundMessage, item: dict[str, Any] | None) -> SendResult:
        if item is None:
            raise ProviderUnavailable(self.name, f"no result for key {message.key!r}")
        status = item.get("status")
        if status not in _STATUSES:
            raise ProviderUnavailable(self.name, f"unknown status {status!r} for key {message.key!r}")
        if status == "failed":
            code = item.get("code")
            error = str(item.get("error") or "failed")
            return SendResult(
                key=message.key,
                status="failed",
                error=f"{code} {error}" if code is not None else error,
                retryable=_retryable(item),
            )
        message_id = item.get("message_id")
        if not isinstance(message_id, str) or not message_id:
            # Without an id, receipts could never be matched to the send.
            raise ProviderUnavailable(self.name, f"{status} without a message_id for key {message.key!r}")
        return SendResult(key=message.key, status=status, provider_message_id=message_id)

    async def rcs_capable(self, addresses: Sequence[str]) -> dict[str, bool]:
        unique = list(dict.fromkeys(addresses))
        if not unique:
            return {}
        items = await self._post("/capabilities", {"addresses": unique})
        capable = {
            item["address"]: bool(item.get("rcs_capable"))
            for item in items
            if isinstance(item, dict) and isinstance(item.get("address"), str)
        }
        missing = [a for a in unique if a not in capable]
        if missing:
            raise ProviderUnavailable(self.name, f"no capability answer for {len(missing)} addresses")
        return {a: capable[a] for a in unique}

    async def close(self) -> None:
        await self._client.aclose()
