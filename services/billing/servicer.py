"""BillingService over gRPC: proto in, domain calls, proto out. Logic lives in ledger.py."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from operator import attrgetter
from typing import Any

from google.protobuf import timestamp_pb2
from sqlalchemy import select

from services.billing import ledger
from services.billing.autoreload import AutoReloader, Clock, utc_now
from services.billing.config import BillingSettings
from services.billing.models import LedgerEntry, Price
from services.billing.outbox import Outbox
from services.billing.pricing import SendCost, estimate, price_of
from shoal import metrics as shoal_metrics
from shoal.db import Database
from shoal.errors import InvalidArgument
from shoal.v1 import billing_pb2 as pb
from shoal.v1 import billing_pb2_grpc

log = logging.getLogger(__name__)

MAX_HOLD_ITEMS = 10_000

# `shoal_holds_total{outcome}` by the status HoldBatch answers.
_HOLD_OUTCOME_OF = {
    pb.HOLD_STATUS_HELD: "held",
    pb.HOLD_STATUS_CAPTURED: "captured",
    pb.HOLD_STATUS_INSUFFICIENT_BALANCE: "insufficient_balance",
    pb.HOLD_STATUS_RELEASED: "released",
}


def require_workspace(workspace_id: str) -> str:
    if not workspace_id:
        raise InvalidArgument.of("workspace_id", "is required")
    return workspace_id


def balance_pb(account: ledger.AccountState) -> pb.Balance:
    return pb.Balance(
        workspace_id=account.workspace_id,
        free_cents=account.free_cents,
        reserved_cents=account.reserved_cents,
        total_cents=account.total_cents,
        currency=account.currency,
        max_balance_cents=account.max_balance_cents,
        low_balance_threshold_cents=account.low_balance_threshold_cents,
    )


def auto_reload_pb(account: ledger.AccountState) -> pb.AutoReload:
    return pb.AutoReload(
        enabled=account.auto_reload_enabled,
        trigger_threshold_cents=account.auto_reload_threshold_cents,
        reload_amount_cents=account.auto_reload_amount_cents,
    )


def _fill(results: Any, answers: list[ledger.HoldAnswer]) -> None:
    """Append one HoldResult per answer to a response's repeated field, in place: building each
    message apart and copying the list in costs twice as much per item."""
    add = results.add
    for a in answers:
        add(key=a.key, status=a.status, amount_cents=a.amount_cents)


class BillingServicer(billing_pb2_grpc.BillingServiceServicer):
    def __init__(
        self,
        *,
        db: Database,
        outbox: Outbox,
        reloader: AutoReloader,
        settings: BillingSettings,
        clock: Clock = utc_now,
        metrics: shoal_metrics.Metrics | None = None,
    ) -> None:
        self.db = db
        holds = (metrics or shoal_metrics.default()).holds
        self._holds = {status: holds.labels(outcome=name) for status, name in _HOLD_OUTCOME_OF.items()}
        self.outbox = outbox
        self.reloader = reloader
        self.settings = settings
        self.clock = clock
        self.defaults = ledger.Defaults(
            max_balance_cents=settings.default_max_balance_cents,
            low_threshold_cents=settings.default_low_balance_threshold_cents,
        )

    def _read(self, session: Any, workspace_id: str) -> ledger.AccountState:
        return ledger.read_account(
            session, workspace_id=workspace_id, defaults=self.defaults, now=self.clock()
        )

    def _lock(self, session: Any, workspace_id: str) -> ledger.AccountState:
        return ledger.lock_account(
            session, workspace_id=workspace_id, defaults=self.defaults, now=self.clock()
        )

    async def GetBalance(self, request: pb.GetBalanceRequest, context: Any) -> pb.GetBalanceResponse:
        ws = require_workspace(request.workspace_id)
        account = await self.db.run(self._read, ws)
        return pb.GetBalanceResponse(balance=balance_pb(account))

    async def TopUp(self, request: pb.TopUpRequest, context: Any) -> pb.TopUpResponse:
        ws = require_workspace(request.workspace_id)
        if request.amount_cents < self.settings.min_top_up_cents:
            raise InvalidArgument.of(
                "amount_cents",
                f"must be at least {self.settings.min_top_up_cents} cents",
                reason="top_up_too_small",
            )

        def work(session: Any) -> tuple[ledger.AccountState, int]:
            account = self._lock(session, ws)
            _, events = ledger.top_up(
                session,
                account=account,
                amount_cents=request.amount_cents,
                idempotency_key=request.idempotency_key,
                kind=pb.LEDGER_ENTRY_KIND_TOP_UP,
                now=self.clock(),
            )
            return account, events

        account, events = await self.db.run(work)
        if events:
            self.outbox.kick()
        return pb.TopUpResponse(balance=balance_pb(account))

    async def SetBalanceLimit(
        self, request: pb.SetBalanceLimitRequest, context: Any
    ) -> pb.SetBalanceLimitResponse:
        ws = require_workspace(request.workspace_id)
        if request.max_balance_cents <= 0:
            raise InvalidArgument.of("max_balance_cents", "must be positive")

        def work(session: Any) -> ledger.AccountState:
            account = self._lock(session, ws)
            # Lowering below the current balance takes nothing away; it only refuses top-ups.
            account.max_balance_cents = request.max_balance_cents
            ledger.write_account(session, account, self.clock())
            return account

        return pb.SetBalanceLimitResponse(balance=balance_pb(await self.db.run(work)))

    async def SetLowBalanceThreshold(
        self, request: pb.SetLowBalanceThresholdRequest, context: Any
    ) -> pb.SetLowBalanceThresholdResponse:
        ws = require_workspace(request.workspace_id)
        if request.threshold_cents < 0:
            raise InvalidArgument.of("threshold_cents", "must not be negative")

        def work(session: Any) -> tuple[ledger.AccountState, int]:
            account = self._lock(session, ws)
            account.low_balance_threshold_cents = request.threshold_cents
            # A new threshold re-arms the event: already below it means it is crossed now.
            account.low = False
            now = self.clock()
            events = ledger.update_flags(session, account, now)
            ledger.write_account(session, account, now)
            return account, events

        account, events = await self.db.run(work)
        if events:
            self.outbox.kick()
        return pb.SetLowBalanceThresholdResponse(balance=balance_pb(account))

    async def SetAutoReload(self, request: pb.SetAutoReloadRequest, context: Any) -> pb.SetAutoReloadResponse:
        ws = require_workspace(request.workspace_id)
        wanted = request.auto_reload
        if wanted.enabled:
            if wanted.reload_amount_cents < self.settings.min_top_up_cents:
                raise InvalidArgument.of(
                    "auto_reload.reload_amount_cents",
                    f"must be at least {self.settings.min_top_up_cents} cents (the minimum top-up)",
                )
            if wanted.trigger_threshold_cents <= 0:
                raise InvalidArgument.of("auto_reload.trigger_threshold_cents", "must be positive")

        def work(session: Any) -> ledger.AccountState:
            account = self._lock(session, ws)
            if wanted.enabled and wanted.reload_amount_cents > account.max_balance_cents:
                raise InvalidArgument.of(
                    "auto_reload.reload_amount_cents",
                    f"exceeds the account maximum of {account.max_balance_cents} cents",
                    reason="balance_limit",
                )
            account.auto_reload_enabled = wanted.enabled
            account.auto_reload_threshold_cents = wanted.trigger_threshold_cents
            account.auto_reload_amount_cents = wanted.reload_amount_cents
            ledger.write_account(session, account, self.clock())
            return account

        return pb.SetAutoReloadResponse(auto_reload=auto_reload_pb(await self.db.run(work)))

    async def GetAutoReload(self, request: pb.GetAutoReloadRequest, context: Any) -> pb.GetAutoReloadResponse:
        ws = require_workspace(request.workspace_id)
        return pb.GetAutoReloadResponse(auto_reload=auto_reload_pb(await self.db.run(self._read, ws)))

    async def ListPrices(self, request: pb.ListPricesRequest, context: Any) -> pb.ListPricesResponse:
        ws = require_workspace(request.workspace_id)

        def work(session: Any) -> dict[tuple[int, int, int], int]:
            self._read(session, ws)
            return ledger.load_prices(session, workspace_id=ws)

        prices = await self.db.run(work)
        return pb.ListPricesResponse(
            prices=[
                pb.Price(channel=c, message_type=m, unit=u, cents=v)  # type: ignore[arg-type]
                for (c, m, u), v in sorted(prices.items())
            ]
        )

    async def SetPrice(self, request: pb.SetPriceRequest, context: Any) -> pb.SetPriceResponse:
        ws = require_workspace(request.workspace_id)
        price = request.price
        if price.cents < 0:
            raise InvalidArgument.of("price.cents", "must not be negative")
        for name in ("channel", "message_type", "unit"):
            if getattr(price, name) == 0:
                raise InvalidArgument.of(f"price.{name}", "is required")

        def work(session: Any) -> None:
            # Under the account lock, so a price change lands between two hold batches, never
            # inside one; holds already placed keep the amount they were placed with.
            self._lock(session, ws)
            row = session.get(Price, (ws, price.channel, price.message_type, price.unit))
            if row is None:
                session.add(
                    Price(
                        workspace_id=ws,
                        channel=price.channel,
                        message_type=price.message_type,
                        unit=price.unit,
                        cents=price.cents,
                    )
                )
            else:
                row.cents = price.cents
                row.updated_at = self.clock()

        await self.db.run(work)
        return pb.SetPriceResponse(price=price)

    async def EstimateCost(self, request: pb.EstimateCostRequest, context: Any) -> pb.EstimateCostResponse:
        ws = require_workspace(request.workspace_id)
        if request.audience_size < 0:
            raise InvalidArgument.of("audience_size", "must not be negative")

        def work(session: Any) -> tuple[ledger.AccountState, dict[tuple[int, int, int], int]]:
            account = self._read(session, ws)
            return account, ledger.load_prices(session, workspace_id=ws)

        account, prices = await self.db.run(work)
        costs = []
        for i, item in enumerate(request.sends):
            cents = price_of(prices, item.channel, item.message_type, item.unit, item.units)
            if cents is None:
                raise InvalidArgument.of(f"sends[{i}]", "no price for this channel, message type and unit")
            costs.append(SendCost(cents, item.expected_share_bp, item.on_upper_path))
        expected, upper = estimate(request.audience_size, costs)
        return pb.EstimateCostResponse(
            expected_cents=expected,
            upper_bound_cents=upper,
            free_cents=account.free_cents,
            covered=account.free_cents >= upper,
        )

    async def HoldBatch(self, request: pb.HoldBatchRequest, context: Any) -> pb.HoldBatchResponse:
        ws = require_workspace(request.workspace_id)
        if len(request.items) > MAX_HOLD_ITEMS:
            # One batch is one transaction under the account lock: bound how long it holds it.
            raise InvalidArgument.of("items", f"at most {MAX_HOLD_ITEMS} items per call")
        items = []
        for i, item in enumerate(request.items):
            if not item.key:
                raise InvalidArgument.of(f"items[{i}].key", "is required")
            items.append(
                ledger.HoldRequest(
                    item.key, item.channel, item.message_type, item.unit, item.units, item.campaign_id
                )
            )
        cap = self.settings.auto_reload_daily_cap

        def work(session: Any) -> ledger.BatchOutcome:
            now = self.clock()
            account = ledger.lock_account(session, workspace_id=ws, defaults=self.defaults, now=now)
            return ledger.hold_batch(session, account=account, items=items, now=now, daily_reload_cap=cap)

        outcome = await self.db.run(work)
        for status, count in Counter(map(attrgetter("status"), outcome.answers)).items():
            counter = self._holds.get(status)
            if counter is not None:
                counter.inc(count)
        # After the commit, and without waiting: neither NATS nor the payment gateway may slow a hold.
        if outcome.events:
            self.outbox.kick()
        if outcome.reload_attempt_id is not None:
            self.reloader.start(outcome.reload_attempt_id)
        if self.settings.debug_reply_delay_seconds:
            await asyncio.sleep(self.settings.debug_reply_delay_seconds)
        response = pb.HoldBatchResponse(balance=balance_pb(outcome.account))
        _fill(response.results, outcome.answers)
        return response

    async def _settle(self, workspace_id: str, keys: list[str], *, capture: bool) -> list[ledger.HoldAnswer]:
        ws = require_workspace(workspace_id)

        def work(session: Any) -> tuple[list[ledger.HoldAnswer], int]:
            now = self.clock()
            account = ledger.lock_account(session, workspace_id=ws, defaults=self.defaults, now=now)
            return ledger.settle_batch(session, account=account, keys=keys, capture=capture, now=now)

        answers, events = await self.db.run(work)
        if events:
            self.outbox.kick()
        return answers

    async def CaptureBatch(self, request: pb.CaptureBatchRequest, context: Any) -> pb.CaptureBatchResponse:
        response = pb.CaptureBatchResponse()
        _fill(response.results, await self._settle(request.workspace_id, list(request.keys), capture=True))
        return response

    async def ReleaseBatch(self, request: pb.ReleaseBatchRequest, context: Any) -> pb.ReleaseBatchResponse:
        response = pb.ReleaseBatchResponse()
        _fill(response.results, await self._settle(request.workspace_id, list(request.keys), capture=False))
        return response

    async def ListLedger(self, request: pb.ListLedgerRequest, context: Any) -> pb.ListLedgerResponse:
        ws = require_workspace(request.workspace_id)
        size = min(request.page.page_size or 100, 1000)
        try:
            after = int(request.page.page_token or 0)
        except ValueError:
            raise InvalidArgument.of("page.page_token", "is not a token this service returned") from None

        def work(session: Any) -> list[LedgerEntry]:
            return list(
                session.execute(
                    select(LedgerEntry)
                    .where(LedgerEntry.workspace_id == ws, LedgerEntry.id > after)
                    .order_by(LedgerEntry.id)
                    .limit(size)
                ).scalars()
            )

        rows = await self.db.run(work)
        entries = []
        for r in rows:
            ts = timestamp_pb2.Timestamp()
            ts.FromDatetime(r.created_at)
            entries.append(
                pb.LedgerEntry(
                    id=r.id or 0,
                    kind=r.kind,
                    free_delta_cents=r.free_delta_cents,
                    reserved_delta_cents=r.reserved_delta_cents,
                    key=r.key or "",
                    create_time=ts,
                )
            )
        token = str(rows[-1].id) if len(rows) == size else ""
        return pb.ListLedgerResponse(entries=entries, page={"next_page_token": token})
