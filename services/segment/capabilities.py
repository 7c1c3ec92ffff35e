"""Device capability lookup: is an address (E.164 phone) RCS capable, asked of the provider.

`CapabilityLookup` is the interface: one call per batch of addresses, answering a dict
address -> capable. `SandboxCapabilities` asks the sandbox provider over HTTP; tests pass a plain
async function instead. The cache (4 h by default) lives in the service's database (repo.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import httpx

from shoal.errors import Unavailable

CapabilityLookup = Callable[[Sequence[str]], Awaitable[dict[str, bool]]]


class SandboxCapabilities:
    """`POST {base_url}/v1/capabilities:batch {addresses:[...]}` -> `{results:[{address, rcs_capable}]}`."""

    def __init__(
        self, base_url: str, *, timeout: float = 5.0, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.client = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout, transport=transport)

    async def __call__(self, addresses: Sequence[str]) -> dict[str, bool]:
        try:
            response = await self.client.post("/v1/capabilities:batch", json={"addresses": list(addresses)})
            response.raise_for_status()
            results = response.json()["results"]
            return {str(r["address"]): bool(r["rcs_capable"]) for r in results}
        except (httpx.HTTPError, KeyError, TypeError, ValueError) as exc:
            raise Unavailable(
                f"capability provider did not answer: {type(exc).__name__}", reason="capability_lookup_failed"
            ) from exc

    async def close(self) -> None:
        await self.client.aclose()
