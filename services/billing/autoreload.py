"""Auto-reload: run recorded attempts through the payment gateway, outside any hold transaction.

The hold transaction only records a pending attempt (ledger.maybe_fire_auto_reload); the payment
runs afterwards in a task of its own, so a slow or failing gateway never delays a hold. The
outcome is written in a second transaction (credit, attempt status, event). The background loop,
driven by an injectable clock, retries a failed payment once after `retry_after`, re-runs attempts
a crash left pending (same idempotency key: the gateway charges once) and flushes the outbox.
Auto-reload never resumes a campaign: it only credits the balance; resuming is the operator's act.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from services.billing import ledger
from services.billing.outbox import Outbox, prune
from services.billing.payments import PaymentGateway
from shoal.db import Database

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

# Published events are kept this long in the outbox table, for inspection after an incident.
OUTBOX_RETENTION = timedelta(days=7)


def utc_now() -> datetime:
    return datetime.now(UTC)


class AutoReloader:
    def __init__(
        self,
        *,
        db: Database,
        payments: PaymentGateway,
        outbox: Outbox,
        defaults: ledger.Defaults,
        clock: Clock = utc_now,
        retry_after: timedelta = timedelta(days=1),
        payment_timeout: float = 30.0,
    ) -> None:
        self.db = db
        self.payments = payments
        self.outbox = outbox
        self.defaults = defaults
        self.clock = clock
        self.retry_after = retry_after
        self.payment_timeout = payment_timeout
        self._running: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, attempt_id: int) -> None:
        """Run an attempt in the background (the caller's reply does not wait for the payment)."""
        if attempt_id in self._running:
            return
        self._running.add(attempt_id)
        task = asyncio.create_task(self._run(attempt_id), name=f"auto-reload-{attempt_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, attempt_id: int) -> None:
        try:
            await self.run_attempt(attempt_id)
        except Exception:
            # Left pending: the background loop picks it up again.
            log.exception("auto-reload attempt %s failed to run", attempt_id)
        finally:
            self._running.discard(attempt_id)

    async def run_attempt(self, attempt_id: int) -> None:
        attempt = await self.db.run(ledger.get_attempt, attempt_id)
        if attempt is None or attempt.status != ledger.PENDING:
            return
        try:
            result = await asyncio.wait_for(
                self.payments.charge(
                    workspace_id=attempt.workspace_id,
                    amount_cents=attempt.amount_cents,
                    idempotency_key=attempt.key,
                ),
                timeout=self.payment_timeout,
            )
            succeeded, error = result.succeeded, result.error
        except TimeoutError:
            succeeded, error = False, "payment_timeout"
        except Exception as exc:
            succeeded, error = False, f"payment_error: {exc!r}"
        log.info(
            "auto-reload %s for %s: %s %s",
            attempt.key,
            attempt.workspace_id,
            "succeeded" if succeeded else "failed",
            error,
        )
        events = await self.db.run(
            lambda s: ledger.finish_attempt(
                s,
                attempt=attempt,
                defaults=self.defaults,
                succeeded=succeeded,
                error=error,
                now=self.clock(),
                retry_after=self.retry_after,
            )
        )
        if events:
            self.outbox.kick()

    async def tick(self) -> None:
        """One pass of the background loop: due retries, interrupted attempts, unsent events."""
        retries = await self.db.run(lambda s: ledger.due_retries(s, now=self.clock()))
        pending = await self.db.run(ledger.pending_attempts)
        for attempt_id in [*retries, *pending]:
            self.start(attempt_id)
        await self.outbox.flush()
        await self.db.run(lambda s: prune(s, before=self.clock() - OUTBOX_RETENTION))

    async def loop(self, stop: asyncio.Event, interval: float) -> None:
        while not stop.is_set():
            try:
                await self.tick()
            except Exception:
                log.exception("billing background pass failed; trying again in %.1fs", interval)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
