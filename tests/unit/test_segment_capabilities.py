"""The sandbox capability lookup: one request per batch, answers parsed, failures UNAVAILABLE."""

from __future__ import annotations

import json

import httpx
import pytest

from services.segment.capabilities import SandboxCapabilities
from shoal.errors import Unavailable


async def test_one_request_per_batch() -> None:
    seen: list[dict[str, object]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        assert (request.method, request.url.path) == ("POST", "/v1/capabilities:batch")
        body = json.loads(request.content)
        seen.append(body)
        return httpx.Response(
            200, json={"results": [{"address": a, "rcs_capable": a.endswith("1")} for a in body["addresses"]]}
        )

    lookup = SandboxCapabilities("http://sandbox/", transport=httpx.MockTransport(answer))
    try:
        assert await lookup(["+14155552671", "+12025550142"]) == {"+14155552671": True, "+12025550142": False}
    finally:
        await lookup.close()
    assert seen == [{"addresses": ["+14155552671", "+12025550142"]}]


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(503, json={"error": "outage"}),
        httpx.Response(200, json={"nope": []}),
        httpx.Response(200),
    ],
)
async def test_provider_failure_is_unavailable(response: httpx.Response) -> None:
    lookup = SandboxCapabilities("http://sandbox", transport=httpx.MockTransport(lambda _: response))
    try:
        with pytest.raises(Unavailable) as err:
            await lookup(["+14155552671"])
        assert err.value.reason == "capability_lookup_failed"
    finally:
        await lookup.close()
