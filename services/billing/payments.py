"""The payment interface auto-reload charges through, and a sandbox implementation.

A real gateway (a card processor) goes behind `PaymentGateway`; it must treat `idempotency_key`
as its own idempotency key, because an attempt interrupted by a crash is charged again with the
same key. The sandbox is what `make run`, tests and benchmarks use: it succeeds, fails, or is
slow on demand (`SHOAL_BILLING_PAYMENT_MODE` at start, `set_mode` at run time).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

PaymentMode = Literal["succeed", "fail", "slow"]


@dataclass(frozen=True)
class PaymentResult:
    succeeded: bool
    error: str = ""
    reference: str = ""


class PaymentGateway(ABC):
    @abstractmethod
    async def charge(self, *, workspace_id: str, amount_cents: int, idempotency_key: str) -> PaymentResult:
        """Charge the workspace's payment method; the same key charges at most once."""


class SandboxPayments(PaymentGateway):
    """Charges nothing real. `charges` lists the keys actually charged, for tests to count."""

    def __init__(self, mode: PaymentMode = "succeed", *, slow_seconds: float = 5.0) -> None:
        self.mode: PaymentMode = mode
        self.slow_seconds = slow_seconds
        self.charges: list[tuple[str, str, int]] = []
        self.calls = 0
        self._done: dict[str, PaymentResult] = {}

    def set_mode(self, mode: PaymentMode, *, slow_seconds: float | None = None) -> None:
        self.mode = mode
        if slow_seconds is not None:
            self.slow_seconds = slow_seconds

    async def charge(self, *, workspace_id: str, amount_cents: int, idempotency_key: str) -> PaymentResult:
        self.calls += 1
        if idempotency_key in self._done:
            return self._done[idempotency_key]
        if self.mode == "fail":
            # A decline is not remembered: the retry with the same key may succeed.
            return PaymentResult(False, error="card_declined")
        if self.mode == "slow":
            await asyncio.sleep(self.slow_seconds)
        result = PaymentResult(True, reference=f"sandbox_{len(self.charges) + 1}")
        self._done[idempotency_key] = result
        self.charges.append((workspace_id, idempotency_key, amount_cents))
        return result
