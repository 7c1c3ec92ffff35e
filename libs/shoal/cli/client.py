"""Every HTTP call the `shoal` command makes, in one place: paths, bodies and answers.

A thin synchronous httpx client over the REST API (`/v1/...`). Answers are plain JSON objects
(`dict`); a non-2xx answer raises `ApiError` carrying the API's `{error, message, details[]}`,
a transport failure raises `Unreachable` naming the URL. A 429 is retried after its
`Retry-After` (bounded), since the request was not processed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote

import httpx

from shoal.cli.config import Settings

JSON = dict[str, Any]
# A page size the list routes accept (1..500).
PAGE = 200
RETRIES_429 = 5
MAX_RETRY_WAIT = 30.0
REPLAYED_HEADER = "Idempotent-Replayed"


class ApiError(Exception):
    """The API answered with an error status."""

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        details: Sequence[JSON] = (),
        *,
        method: str = "",
        path: str = "",
    ) -> None:
        super().__init__(f"{status} {error}: {message}")
        self.status = status
        self.error = error
        self.message = message
        self.details = [dict(d) for d in details]
        self.method = method
        self.path = path

    def as_json(self) -> JSON:
        return {
            "status": self.status,
            "error": self.error,
            "message": self.message,
            "details": self.details,
        }


class Unreachable(Exception):
    """No HTTP answer at all: connection refused, DNS, timeout, TLS."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach the Shoal API at {url}: {reason}")
        self.url = url
        self.reason = reason


def _seg(value: str) -> str:
    """An id as one path segment: whatever it holds, it cannot reach another route."""
    return quote(value, safe="") or "-"


def _error_from(response: httpx.Response) -> ApiError:
    method, path = response.request.method, response.request.url.path
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "error" in body:
        details = [d for d in body.get("details") or [] if isinstance(d, dict)]
        return ApiError(
            response.status_code,
            str(body.get("error")),
            str(body.get("message") or response.reason_phrase),
            details,
            method=method,
            path=path,
        )
    text = response.text.strip()[:200] or response.reason_phrase
    code = response.reason_phrase.lower().replace(" ", "_") or "http_error"
    return ApiError(response.status_code, code, text, method=method, path=path)


def _transport_reason(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.ConnectError):
        text = str(exc)
        if "refused" in text.lower():
            return "connection refused (is the gateway running? `shoal up` starts it)"
        return f"cannot connect ({text or type(exc).__name__})"
    if isinstance(exc, httpx.TimeoutException):
        return "no answer in time"
    return str(exc) or type(exc).__name__


class ShoalClient:
    """The REST API, one method per route the CLI uses."""

    def __init__(
        self,
        settings: Settings,
        *,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        headers = {"User-Agent": "shoal-cli"}
        if settings.api_key:
            headers["Authorization"] = f"Bearer {settings.api_key}"
        self.base_url = settings.api_url.rstrip("/")
        self.has_key = bool(settings.api_key)
        self._sleep = sleep
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=settings.timeout, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ShoalClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- plumbing ----------------------------------------------------------------------------

    def request(
        self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None
    ) -> httpx.Response:
        clean = {k: v for k, v in (params or {}).items() if v is not None}
        for attempt in range(RETRIES_429 + 1):
            try:
                response = self._http.request(method, path, json=json, params=clean or None)
            except httpx.TransportError as exc:
                raise Unreachable(self.base_url, _transport_reason(exc)) from None
            if response.status_code == 429 and attempt < RETRIES_429:
                try:
                    wait = float(response.headers.get("Retry-After", "1"))
                except ValueError:
                    wait = 1.0
                self._sleep(min(max(wait, 0.1), MAX_RETRY_WAIT))
                continue
            if response.status_code >= 400:
                raise _error_from(response)
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    def _json(self, method: str, path: str, **kwargs: Any) -> JSON:
        response = self.request(method, path, **kwargs)
        if response.status_code == 204 or not response.content:
            return {}
        body = response.json()
        return body if isinstance(body, dict) else {"items": body}

    def _pages(self, path: str, params: dict[str, Any] | None = None, limit: int | None = None) -> list[JSON]:
        """Every item of a list route, following `next_cursor` (at most `limit` items)."""
        items: list[JSON] = []
        cursor: str | None = None
        while True:
            page_size = PAGE if limit is None else max(1, min(PAGE, limit - len(items)))
            page = self._json("GET", path, params={**(params or {}), "limit": page_size, "cursor": cursor})
            items.extend(page.get("items") or [])
            cursor = page.get("next_cursor")
            if not cursor or (limit is not None and len(items) >= limit):
                return items if limit is None else items[:limit]

    # ---- campaigns ---------------------------------------------------------------------------

    def list_campaigns(self, *, state: str | None = None, limit: int | None = None) -> list[JSON]:
        return self._pages("/v1/campaigns", {"state": state}, limit)

    def get_campaign(self, campaign_id: str) -> JSON:
        return self._json("GET", f"/v1/campaigns/{_seg(campaign_id)}")

    def create_campaign(self, body: JSON) -> JSON:
        return self._json("POST", "/v1/campaigns", json=body)

    def update_campaign(self, campaign_id: str, body: JSON) -> JSON:
        return self._json("PATCH", f"/v1/campaigns/{_seg(campaign_id)}", json=body)

    def start_campaign(self, campaign_id: str) -> JSON:
        return self._json("POST", f"/v1/campaigns/{_seg(campaign_id)}/start")

    def trigger_campaign(self, campaign_id: str, body: JSON) -> tuple[JSON, bool]:
        """The answer and whether it was an idempotent replay."""
        response = self.request("POST", f"/v1/campaigns/{_seg(campaign_id)}/trigger", json=body)
        replayed = response.headers.get(REPLAYED_HEADER, "").lower() == "true"
        return dict(response.json()), replayed

    def pause_campaign(self, campaign_id: str) -> JSON:
        return self._json("POST", f"/v1/campaigns/{_seg(campaign_id)}/pause")

    def resume_campaign(self, campaign_id: str) -> JSON:
        return self._json("POST", f"/v1/campaigns/{_seg(campaign_id)}/resume")

    def campaign_status(self, campaign_id: str) -> JSON:
        return self._json("GET", f"/v1/campaigns/{_seg(campaign_id)}/status")

    # ---- executions --------------------------------------------------------------------------

    def get_execution(self, execution_id: str) -> JSON:
        return self._json("GET", f"/v1/executions/{_seg(execution_id)}")

    # ---- contacts ----------------------------------------------------------------------------

    def import_contacts(self, contacts: Sequence[JSON]) -> JSON:
        """`{imported, updated, rejected: [{index, field, reason}]}` for one chunk."""
        return self._json("POST", "/v1/contacts/import", json={"contacts": list(contacts)})

    # ---- segments ----------------------------------------------------------------------------

    def list_segments(self) -> list[JSON]:
        return self._pages("/v1/segments")

    def create_segment(self, body: JSON) -> JSON:
        return self._json("POST", "/v1/segments", json=body)

    def update_segment(self, segment_id: str, body: JSON) -> JSON:
        return self._json("PATCH", f"/v1/segments/{_seg(segment_id)}", json=body)

    # ---- templates ---------------------------------------------------------------------------

    def list_templates(self) -> list[JSON]:
        return self._pages("/v1/templates")

    def get_template(self, template_id: str) -> JSON:
        return self._json("GET", f"/v1/templates/{_seg(template_id)}")

    def create_template(self, body: JSON) -> JSON:
        return self._json("POST", "/v1/templates", json=body)

    def update_template(self, template_id: str, body: JSON) -> JSON:
        return self._json("PATCH", f"/v1/templates/{_seg(template_id)}", json=body)

    def publish_template(self, template_id: str, version: int) -> JSON:
        return self._json("POST", f"/v1/templates/{_seg(template_id)}/publish", json={"version": version})
