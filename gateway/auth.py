"""Bearer API keys on every route but health and docs: who calls, what they may do, how often.

`require(scope)` is the dependency a route declares. It answers 401 without a key or with a bad
one (malformed, unknown, wrong secret, revoked: the client is not told which), 429 when the key
spent its rate limit, 403 when the key lacks the scope. The workspace every backend call carries
comes from the key, never from the request.

Rate limits are per key id, in memory, in a moving window (the `limits` library): one gateway
process enforces its own budget; several replicas would each allow the full limit (a shared
storage such as Redis would fix that, `limits` supports it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from gateway.errors import ApiError
from gateway.keys import Principal, Scope, verify_key
from shoal.db import Database

# auto_error=False: a missing header answers our 401 shape, not FastAPI's 403.
_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer shoal_...`")
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


class Authenticator:
    """Verifies keys against the store and meters them."""

    def __init__(self, db: Database, rate_limit: str) -> None:
        self.db = db
        self.limits: list[RateLimitItem] = parse_many(rate_limit)
        self.limiter = MovingWindowRateLimiter(MemoryStorage())

    async def authenticate(self, credentials: HTTPAuthorizationCredentials | None) -> Principal:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise ApiError(
                401, "unauthorized", "an API key is required: Authorization: Bearer <key>", _CHALLENGE
            )
        key = credentials.credentials.strip()
        principal = await self.db.run(verify_key, key) if len(key) <= 128 else None
        if principal is None:
            raise ApiError(401, "unauthorized", "the API key is not valid", _CHALLENGE)
        return principal

    def meter(self, principal: Principal) -> None:
        for item in self.limits:
            if not self.limiter.hit(item, principal.key_id):
                stats = self.limiter.get_window_stats(item, principal.key_id)
                retry_after = max(1, math.ceil(stats.reset_time - time.time()))
                raise ApiError(
                    429,
                    "rate_limited",
                    f"rate limit of {item} for this key reached; retry in {retry_after}s",
                    {"Retry-After": str(retry_after)},
                    retry_after=retry_after,
                )


async def get_authenticator(request: Request) -> Authenticator:
    auth: Authenticator = request.app.state.auth
    return auth


def require(scope: Scope) -> Callable[..., Awaitable[Principal]]:
    """The dependency of a route needing `scope` (the `admin` scope allows everything)."""

    async def dependency(
        auth: Annotated[Authenticator, Depends(get_authenticator)],
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal:
        principal = await auth.authenticate(credentials)
        auth.meter(principal)
        if not principal.allows(scope):
            raise ApiError(403, "forbidden", f"this API key lacks the scope {scope.value}")
        return principal

    # The security tests read it to build every route's scope matrix.
    dependency.scope = scope  # type: ignore[attr-defined]
    return dependency


def check_campaign(principal: Principal, campaign_id: str) -> None:
    """403 when the key is restricted to other campaigns (answered before any backend call)."""
    if not principal.may_touch_campaign(campaign_id):
        raise ApiError(403, "forbidden", "this API key is restricted to other campaigns")
