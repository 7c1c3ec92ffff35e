"""BillingService over gRPC: proto in, domain calls, proto out. Logic lives in ledger.py."""

from __future__ import annotations

import logging
from typing import Any

from google.protobuf import timestamp_pb2

from services.billing import ledger
from services.billing.config import BillingSettings
from services.billing.models import Account, LedgerEntry, Price
from services.billing.pricing import SendCost, estimate, price_of
from shoal.bus import Bus
from shoal.db import Database
from shoal.errors import InvalidArgument
from shoal.v1 import billing_pb2 as pb
from shoal.v1 import billing_pb2_grpc, events_pb2

log = logging.getLogger(__name__)


def require_workspace(workspace_id: str) -> str:
    if not workspace_id:
        raise InvalidArgument.of("workspace_id", "is required")
    return workspace_id


def balance_pb(account: Account) -> pb.Balance:
    return pb.Balance(
        workspace_id=account.workspace_id,
        free_cents=account.free_cents,
        reserved_cents=account.reserved_cents,
        total_cents=account.free_cents + account.reserved_cents,
        currency=account.currency,
        max_balance_cents=account.max_balance_cents,
        low_balance_threshold_cents=account.low_balance_threshold_cents,
    )


class BillingServicer(billing_pb2_grpc.BillingServiceServicer):
    def __init__(self, *, db: Database, bus: Bus | None, settings: BillingSettings) -> None:
        self.db = db
        self.bus = bus
        self.settings = settings

    def _lock(self, session: Any, workspace_id: str) -> Account:
        return ledger.lock_account(
            session,
            workspace_id=workspace_id,
            max_balance_cents=self.settings.default_max_balance_cents,
            low_threshold_cents=self.settings.default_low_balance_threshold_cents,
        )

    async def GetBalance(self, request: pb.GetBalanceRequest, context: Any) -> pb.GetBalanceResponse:
        ws = require_workspace(request.workspace_id)
        account = await self.db.run(self._lock, ws)
        return pb.GetBalanceResponse(balance=balance_pb(account))

    async def TopUp(self, request: pb.TopUpRequest, context: Any) -> pb.TopUpResponse:
        ws = require_workspace(request.workspace_id)
        if request.amount_cents < self.settings.min_top_up_cents:
            raise InvalidArgument.of(
                "amount_cents",
                f"must be at least {self.settings.min_top_up_cents} cents",
                reason="top_up_too_small",
            )

        def work(session: Any) -> Account:
            account = self._lock(session, ws)
            ledger.top_up(
                session,
                account=account,
                amount_cents=request.amount_cents,
                idempotency_key=request.idempotency_key,
                kind=pb.LEDGER_ENTRY_KIND_TOP_UP,
            )
            return account

        account = await self.db.run(work)
        return pb.TopUpResponse(balance=balance_pb(account))

    async def ListPrices(self, request: pb.ListPricesRequest, context: Any) -> pb.ListPricesResponse:
        ws = require_workspace(request.workspace_id)

        def work(session: Any) -> dict[tuple[int, int, int], int]:
            self._lock(session, ws)
            return ledger.load_prices(session, workspace_id=ws)

        prices = await self.db.run(work)
        return pb.ListPricesResponse(
            prices=[
                pb.Price(channel=c, message_type=m, unit=u, cents=v)
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

        await self.db.run(work)
        return pb.SetPriceResponse(price=price)

    async def EstimateCost(self, request: pb.EstimateCostRequest, context: Any) -> pb.EstimateCostResponse:
        ws = require_workspace(request.workspace_id)
        if request.audience_size < 0:
            raise InvalidArgument.of("audience_size", "must not be negative")

        def work(session: Any) -> tuple[Account, dict[tuple[int, int, int], int]]:
            account = self._lock(session, ws)
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
        items = []
        for i, item in enumerate(request.items):
            if not item.key:
                raise InvalidArgument.of(f"items[{i}].key", "is required")
            items.append(
                ledger.HoldRequest(
                    item.key, item.channel, item.message_type, item.unit, item.units, item.campaign_id
                )
            )

        def work(session: Any) -> ledger.BatchOutcome:
            return ledger.hold_batch(session, account=self._lock(session, ws), items=items)

        outcome = await self.db.run(work)
        if outcome.exhausted_now and self.bus is not None:
            event = events_pb2.BalanceEvent(
                workspace_id=ws, free_cents=outcome.account.free_cents, campaign_ids=outcome.short_campaigns
            )
            event.time.GetCurrentTime()
            await self.bus.publish(self.bus.event_subject("billing", "balance_exhausted"), event)
        return pb.HoldBatchResponse(
            results=[
                pb.HoldResult(key=a.key, status=a.status, amount_cents=a.amount_cents)
                for a in outcome.answers
            ],
            balance=balance_pb(outcome.account),
        )

    async def _settle(self, workspace_id: str, keys: list[str], *, capture: bool) -> list[pb.HoldResult]:
        ws = require_workspace(workspace_id)

        def work(session: Any) -> list[ledger.HoldAnswer]:
            return ledger.settle_batch(session, account=self._lock(session, ws), keys=keys, capture=capture)

        answers = await self.db.run(work)
        return [pb.HoldResult(key=a.key, status=a.status, amount_cents=a.amount_cents) for a in answers]

    async def CaptureBatch(self, request: pb.CaptureBatchRequest, context: Any) -> pb.CaptureBatchResponse:
        return pb.CaptureBatchResponse(
            results=await self._settle(request.workspace_id, list(request.keys), capture=True)
        )

    async def ReleaseBatch(self, request: pb.ReleaseBatchRequest, context: Any) -> pb.ReleaseBatchResponse:
        return pb.ReleaseBatchResponse(
            results=await self._settle(request.workspace_id, list(request.keys), capture=False)
        )

    async def ListLedger(self, request: pb.ListLedgerRequest, context: Any) -> pb.ListLedgerResponse:
        ws = require_workspace(request.workspace_id)
        size = min(request.page.page_size or 100, 1000)
        after = int(request.page.page_token or 0)

        def work(session: Any) -> list[LedgerEntry]:
            from sqlalchemy import select

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
