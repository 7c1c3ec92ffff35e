"""The adapter for the sandbox carrier simulator (`services.sandbox`), over its HTTP JSON API."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from typing import Any

import httpx
from opentelemetry import trace

from services.execution.providers.base import (
    OutboundMessage,
    Provider,
    ProviderRequestError,
    ProviderUnavailable,
    SendResult,
    client_reference,
)
from shoal import telemetry

SIGNATURE_HEADER = "X-Sandbox-Signature"
_STATUSES = frozenset({"accepted", "duplicate", "failed"})
tracer = trace.get_tracer(__name__)


def verify_signature(body: bytes, header: str | None, secret: bytes) -> bool:
    """Check a receipt callback's `X-Sandbox-Signature: sha256=<hex>` against the raw body."""
    if not header or not header.startswith("sha256="):
        return False
    expected = hmac.new(secret, body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, header.removeprefix("sha256="))


def _wire(message: OutboundMessage) -> dict[str, Any]:
    item = {
        "idempotency_key": message.key,
        "workspace_id": message.workspace_id,
        "channel": str(message.channel),
        "to": message.to,
        "subject": message.subject,
        "text": message.text,
        "html": message.html,
        "payload": message.payload,
    }
    # Echoed in the receipts, so the gateway needs no execution lookup per receipt.
    reference = client_reference(message)
    if reference is not None:
        item["client_reference"] = reference
    return item


class SandboxProvider(Provider):
    name = "sandbox"

    def __init__(self, base_url: str, *, timeout: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        # One client for the provider's lifetime: its pool keeps connections warm across batches.
        self._client = httpx.AsyncClient(base_url=self.base_url, timeout=timeout)

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            # W3C trace context, so the carrier's spans join the send's trace.
            response = await self._client.post(path, json=body, headers=telemetry.inject({}))
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
        return answer

    async def send_batch(self, messages: Sequence[OutboundMessage]) -> list[SendResult]:
        if not messages:
            return []
        with tracer.start_as_current_span("sandbox send_batch", kind=trace.SpanKind.CLIENT) as span:
            span.set_attribute("messaging.batch.message_count", len(messages))
            answer = await self._post("/v1/messages:batch", {"messages": [_wire(m) for m in messages]})
            items = answer["results"]
            if len(items) != len(messages):
                raise ProviderUnavailable(self.name, f"{len(items)} results for {len(messages)} messages")
            results = [self._result(m, item) for m, item in zip(messages, items, strict=True)]
            span.set_attribute("shoal.provider.failed", sum(1 for r in results if not r.ok))
            return results

    def _result(self, message: OutboundMessage, item: Any) -> SendResult:
        # The sandbox answers in request order; a result for another key means the answer
        # cannot be trusted for any item, so the whole call counts as failed.
        if not isinstance(item, dict) or item.get("idempotency_key") != message.key:
            raise ProviderUnavailable(self.name, f"result out of order at key {message.key!r}")
        status = item.get("status")
        if status not in _STATUSES:
            raise ProviderUnavailable(self.name, f"unknown status {status!r} for key {message.key!r}")
        return SendResult(
            key=message.key,
            status=status,
            provider_message_id=item.get("provider_message_id"),
            error=item.get("error"),
            retryable=bool(item.get("retryable", False)),
        )

    async def rcs_capable(self, addresses: Sequence[str]) -> dict[str, bool]:
        unique = list(dict.fromkeys(addresses))
        if not unique:
            return {}
        answer = await self._post("/v1/capabilities:batch", {"addresses": unique})
        capable = {
            item["address"]: bool(item["rcs_capable"])
            for item in answer["results"]
            if isinstance(item, dict) and "address" in item
        }
        missing = [a for a in unique if a not in capable]
        if missing:
            raise ProviderUnavailable(self.name, f"no capability answer for {len(missing)} addresses")
        return capable

    async def close(self) -> None:
        await self._client.aclose()
