"""A circuit breaker per provider.

Closed: calls go through; each outcome is recorded in a sliding time window. It opens when the
failure rate over the window reaches the threshold (once the window holds a minimum number of
calls, so two failures of three don't trip it), or after N consecutive failures. Open: no call
goes through until the cool-down has passed; then half-open: one probe call at a time; a
successful probe closes the breaker, a failed one opens it again.

Opening is published (`provider.breaker_opened`) so the campaign service moves the campaigns
using the provider to PAUSED_ERROR; executions that could not be sent stay pending.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass(frozen=True)
class BreakerPolicy:
    window_seconds: float = 30.0
    min_calls: int = 10
    failure_rate: float = 0.5
    consecutive_failures: int = 5
    open_seconds: float = 10.0


class Breaker:
    def __init__(
        self, name: str, policy: BreakerPolicy, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.name = name
        self.policy = policy
        self.clock = clock
        self.state = CLOSED
        self.reason = ""
        self._calls: deque[tuple[float, bool]] = deque()
        self._consecutive = 0
        self._opened_at = 0.0
        self._probe_in_flight = False

    def allow(self) -> bool:
        """May a call go to the provider now? (In half-open, the caller becomes the probe.)"""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            if self.clock() - self._opened_at < self.policy.open_seconds:
                return False
            self.state = HALF_OPEN
        if self._probe_in_flight:
            return False
        self._probe_in_flight = True
        return True

    def record(self, ok: bool) -> str | None:
        """Record one call's outcome; returns the new state when it changed."""
        now = self.clock()
        if self.state == HALF_OPEN:
            self._probe_in_flight = False
            if ok:
                self._reset()
                return CLOSED
            return self._open(now, "probe failed while half-open")
        if self.state == OPEN:
            return None
        self._calls.append((now, ok))
        horizon = now - self.policy.window_seconds
        while self._calls and self._calls[0][0] < horizon:
            self._calls.popleft()
        self._consecutive = 0 if ok else self._consecutive + 1
        if self._consecutive >= self.policy.consecutive_failures:
            return self._open(now, f"{self._consecutive} consecutive failures")
        if len(self._calls) >= self.policy.min_calls:
            failures = sum(1 for _, good in self._calls if not good)
            rate = failures / len(self._calls)
            if rate >= self.policy.failure_rate:
                return self._open(now, f"failure rate {rate:.0%} over the last {len(self._calls)} calls")
        return None

    def _open(self, now: float, reason: str) -> str:
        self.state = OPEN
        self.reason = reason
        self._opened_at = now
        self._probe_in_flight = False
        return OPEN

    def _reset(self) -> None:
        self.state = CLOSED
        self.reason = ""
        self._calls.clear()
        self._consecutive = 0
