"""The billing service over real gRPC, real NATS and both databases: holds racing over a short
balance, idempotency of every money move, limits, prices, the events (once per episode) and
auto-reload with a clock the test controls."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import nats
import pytest
from nats.aio.msg import Msg
from sqlalchemy import func, select

from services.billing import ledger
from services.billing.config import BillingSettings
from services.billing.models import AutoReloadAttempt, LedgerEntry, OutboxEvent
from services.billing.payments import SandboxPayments
from services.billing.server import build
from shoal.errors import InvalidArgument, from_rpc_error
from shoal.grpc import GrpcServer, channel
from shoal.v1 import billing_pb2 as pb
from shoal.v1 import billing_pb2_grpc, events_pb2
from shoal.v1 import common_pb2 as common
from tests.helpers import wait_for

WS = "ws_billing"
SMS_PRICE = 7  # the default price of one SMS segment


class FakeClock:
    """A UTC clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = datetime(2026, 3, 10, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@dataclass
class Events:
    """Every billing event of the test's namespace, from a plain core NATS subscription."""

    received: list[tuple[str, Any]] = field(default_factory=list)

    def of(self, kind: str) -> list[Any]:
        return [m for k, m in self.received if k == kind]


@dataclass
class Billing:
    server: GrpcServer
    stub: billing_pb2_grpc.BillingServiceStub
    clock: FakeClock
    payments: SandboxPayments
    events: Events
    nc: Any

    @property
    def db(self) -> Any:
        return self.server.bindings[0].servicer.db

    async def settled(self) -> None:
        """Wait until every outboxed event is published and has reached our subscription."""

        async def published() -> bool:
            left = await self.db.run(
                lambda s: s.execute(
                    select(func.count()).select_from(OutboxEvent).where(OutboxEvent.published.is_(False))
                ).scalar_one()
            )
            return left == 0

        await wait_for(published, timeout=10)
        # A PING/PONG round trip: the server sent us everything it routed before the PONG.
        await self.nc.flush()

    async def balance(self) -> pb.Balance:
        return (await self.stub.GetBalance(pb.GetBalanceRequest(workspace_id=WS))).balance

    async def rebuilt(self) -> tuple[int, int]:
        return await self.db.run(lambda s: ledger.rebuild_balance(s, workspace_id=WS))

    async def hold(self, keys: list[str], *, campaign_id: str = "cmp-1") -> pb.HoldBatchResponse:
        return await self.stub.HoldBatch(
            pb.HoldBatchRequest(
                workspace_id=WS,
                items=[
                    pb.HoldItem(
                        key=k,
                        channel=common.CHANNEL_SMS,
                        message_type=common.MESSAGE_TYPE_MESSAGE,
                        units=1,
                        campaign_id=campaign_id,
                    )
                    for k in keys
                ],
            )
        )

    async def top_up(self, cents: int, key: str = "") -> pb.Balance:
        reply = await self.stub.TopUp(
            pb.TopUpRequest(workspace_id=WS, amount_cents=cents, idempotency_key=key)
        )
        return reply.balance


_KINDS = {
    "balance_exhausted": events_pb2.BalanceEvent,
    "balance_short": events_pb2.BalanceEvent,
    "balance_low": events_pb2.BalanceEvent,
    "auto_reload_succeeded": events_pb2.AutoReloadResult,
    "auto_reload_failed": events_pb2.AutoReloadResult,
}


@pytest.fixture
async def billing(database_url: str, nats_url: str, tmp_path: Path) -> AsyncIterator[Billing]:
    namespace = f"b{uuid.uuid4().hex[:10]}"
    clock = FakeClock()
    payments = SandboxPayments("succeed", slow_seconds=1.0)
    settings = BillingSettings.load(
        port=0,
        database_url=database_url,
        nats_url=nats_url,
        data_dir=tmp_path,
        background_interval_seconds=0.05,
        default_low_balance_threshold_cents=0,
    )
    server = await build(settings, namespace=namespace, clock=clock, payments=payments)
    await server.start()
    events = Events()
    nc = await nats.connect(nats_url)

    async def on_message(msg: Msg) -> None:
        kind = msg.subject.rsplit(".", 1)[1]
        events.received.append((kind, _KINDS[kind].FromString(msg.data)))

    await nc.subscribe(f"{namespace}.shoal.events.billing.>", cb=on_message)
    await nc.flush()
    async with channel(server.address) as ch:
        yield Billing(server, billing_pb2_grpc.BillingServiceStub(ch), clock, payments, events, nc)
    await nc.close()
    await server.stop(grace=0.5)


def _error(exc: pytest.ExceptionInfo[grpc.aio.AioRpcError]) -> Any:
    return from_rpc_error(exc.value)


# -- holds ----------------------------------------------------------------------------------------


async def test_fifty_concurrent_batches_never_overdraw(billing: Billing) -> None:
    await billing.top_up(5_000)
    batches = [[f"e{b}-{i}:n1" for i in range(20)] for b in range(50)]
    replies = await asyncio.gather(*(billing.hold(keys) for keys in batches))

    results = [r for reply in replies for r in reply.results]
    held = [r for r in results if r.status == pb.HOLD_STATUS_HELD]
    short = [r for r in results if r.status == pb.HOLD_STATUS_INSUFFICIENT_BALANCE]
    assert len(results) == 1000
    assert len(held) == 5_000 // SMS_PRICE
    assert len(held) + len(short) == 1000
    assert len({r.key for r in held}) == len(held)
    balance = await billing.balance()
    assert balance.free_cents == 5_000 % SMS_PRICE
    assert balance.reserved_cents == len(held) * SMS_PRICE
    assert balance.total_cents == 5_000
    assert await billing.rebuilt() == (balance.free_cents, balance.reserved_cents)
    holds_in_ledger = await billing.db.run(
        lambda s: s.execute(
            select(func.count()).select_from(LedgerEntry).where(LedgerEntry.kind == pb.LEDGER_ENTRY_KIND_HOLD)
        ).scalar_one()
    )
    assert holds_in_ledger == len(held)
    # Many batches came up short: one episode, one event.
    await billing.settled()
    exhausted = billing.events.of("balance_exhausted")
    assert len(exhausted) == 1
    assert list(exhausted[0].campaign_ids) == ["cmp-1"]


async def test_same_keys_answer_the_same_and_hold_nothing_new(billing: Billing) -> None:
    await billing.top_up(1_000)
    first = await billing.hold([f"x{i}:n1" for i in range(150)])
    before = await billing.balance()
    again = await billing.hold([f"x{i}:n1" for i in range(150)])
    assert [(r.key, r.status, r.amount_cents) for r in again.results] == [
        (r.key, r.status, r.amount_cents) for r in first.results
    ]
    assert await billing.balance() == before
    assert sum(r.status == pb.HOLD_STATUS_HELD for r in first.results) == 1_000 // SMS_PRICE
    # A short item is not remembered as short: after a top-up the same key holds.
    await billing.top_up(1_000)
    later = await billing.hold(["x149:n1"])
    assert later.results[0].status == pb.HOLD_STATUS_HELD
    assert await billing.rebuilt() == (
        (await billing.balance()).free_cents,
        (await billing.balance()).reserved_cents,
    )

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await billing.hold(["dup", "dup"])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_capture_and_release_are_idempotent(billing: Billing) -> None:
    await billing.top_up(1_000)
    await billing.hold(["a", "b", "c"])
    stub = billing.stub
    for _ in range(2):
        captured = await stub.CaptureBatch(pb.CaptureBatchRequest(workspace_id=WS, keys=["a", "a"]))
        assert [r.status for r in captured.results] == [pb.HOLD_STATUS_CAPTURED] * 2
        released = await stub.ReleaseBatch(pb.ReleaseBatchRequest(workspace_id=WS, keys=["b"]))
        assert [(r.status, r.amount_cents) for r in released.results] == [
            (pb.HOLD_STATUS_RELEASED, SMS_PRICE)
        ]
    # A settled hold keeps its first outcome whatever comes after; an unknown key blocks nothing.
    late = await stub.ReleaseBatch(pb.ReleaseBatchRequest(workspace_id=WS, keys=["a", "nope", "c"]))
    assert [r.status for r in late.results] == [
        pb.HOLD_STATUS_CAPTURED,
        pb.HOLD_STATUS_UNSPECIFIED,
        pb.HOLD_STATUS_RELEASED,
    ]
    late = await stub.CaptureBatch(pb.CaptureBatchRequest(workspace_id=WS, keys=["b"]))
    assert late.results[0].status == pb.HOLD_STATUS_RELEASED
    balance = await billing.balance()
    assert (balance.free_cents, balance.reserved_cents) == (1_000 - SMS_PRICE, 0)
    assert await billing.rebuilt() == (balance.free_cents, balance.reserved_cents)
    page = await stub.ListLedger(pb.ListLedgerRequest(workspace_id=WS))
    kinds = [e.kind for e in page.entries]
    assert kinds == [pb.LEDGER_ENTRY_KIND_TOP_UP] + [pb.LEDGER_ENTRY_KIND_HOLD] * 3 + [
        pb.LEDGER_ENTRY_KIND_CAPTURE,
        pb.LEDGER_ENTRY_KIND_RELEASE,
        pb.LEDGER_ENTRY_KIND_RELEASE,
    ]
    # Every entry carries the service clock's UTC time, however it was written.
    assert {e.create_time.ToDatetime(tzinfo=UTC) for e in page.entries} == {billing.clock.now}
    # A replayed hold of a captured key answers CAPTURED and holds nothing.
    replay = await billing.hold(["a"])
    assert replay.results[0].status == pb.HOLD_STATUS_CAPTURED
    assert (await billing.balance()).free_cents == balance.free_cents


async def test_price_change_applies_to_new_holds_only(billing: Billing) -> None:
    await billing.top_up(1_000)
    await billing.hold(["old"])
    await billing.stub.SetPrice(
        pb.SetPriceRequest(
            workspace_id=WS,
            price=pb.Price(
                channel=common.CHANNEL_SMS,
                message_type=common.MESSAGE_TYPE_MESSAGE,
                unit=common.BILLING_UNIT_SMS_SEGMENT,
                cents=11,
            ),
        )
    )
    new = await billing.hold(["new"])
    assert new.results[0].amount_cents == 11
    assert (await billing.hold(["old"])).results[0].amount_cents == SMS_PRICE
    released = await billing.stub.ReleaseBatch(pb.ReleaseBatchRequest(workspace_id=WS, keys=["old", "new"]))
    assert [r.amount_cents for r in released.results] == [SMS_PRICE, 11]
    assert (await billing.balance()).free_cents == 1_000
    cost = await billing.stub.EstimateCost(
        pb.EstimateCostRequest(
            workspace_id=WS,
            audience_size=100,
            sends=[
                pb.SendProfileItem(
                    channel=common.CHANNEL_SMS,
                    message_type=common.MESSAGE_TYPE_MESSAGE,
                    units=1,
                    expected_share_bp=10_000,
                    on_upper_path=True,
                )
            ],
        )
    )
    assert (cost.expected_cents, cost.upper_bound_cents, cost.covered) == (1_100, 1_100, False)


# -- top-ups and limits ---------------------------------------------------------------------------


async def test_top_up_minimum_maximum_and_raised_maximum(billing: Billing) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await billing.top_up(999)
    error = _error(err)
    assert isinstance(error, InvalidArgument)
    assert (error.reason, error.violations[0].field) == ("top_up_too_small", "amount_cents")

    assert (await billing.top_up(500_000)).free_cents == 500_000
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await billing.top_up(1_000)
    error = _error(err)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.reason, error.violations[0].field) == ("balance_limit", "amount_cents")
    # Reserved money counts toward the maximum too.
    await billing.hold(["r1"])
    with pytest.raises(grpc.aio.AioRpcError):
        await billing.top_up(1_000)

    raised = await billing.stub.SetBalanceLimit(
        pb.SetBalanceLimitRequest(workspace_id=WS, max_balance_cents=600_000)
    )
    assert raised.balance.max_balance_cents == 600_000
    assert (await billing.top_up(99_993, key="t-1")).total_cents == 599_993
    # The same idempotency key credits once.
    assert (await billing.top_up(99_993, key="t-1")).total_cents == 599_993
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await billing.stub.SetBalanceLimit(pb.SetBalanceLimitRequest(workspace_id=WS, max_balance_cents=0))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    balance = await billing.balance()
    assert await billing.rebuilt() == (balance.free_cents, balance.reserved_cents)


# -- events ---------------------------------------------------------------------------------------


async def test_exhausted_and_low_once_per_episode(billing: Billing) -> None:
    await billing.top_up(1_000)
    await billing.stub.SetLowBalanceThreshold(
        pb.SetLowBalanceThresholdRequest(workspace_id=WS, threshold_cents=500)
    )
    # 1000 -> 510: above the threshold, nothing yet.
    await billing.hold([f"a{i}" for i in range(70)])
    await billing.settled()
    assert billing.events.received == []
    # Crossing below 500: one low event, however many batches follow below it.
    for n in range(3):
        await billing.hold([f"b{n}-{i}" for i in range(10)])
    # Shortage in several batches and items: one exhausted event.
    for n in range(4):
        await billing.hold([f"c{n}-{i}" for i in range(20)], campaign_id=f"cmp-{n}")
    await billing.settled()
    assert len(billing.events.of("balance_low")) == 1
    assert billing.events.of("balance_low")[0].threshold_cents == 500
    exhausted = billing.events.of("balance_exhausted")
    assert len(exhausted) == 1
    assert exhausted[0].free_cents == 1_000 % SMS_PRICE
    # The batch that first came up short names its campaign.
    assert list(exhausted[0].campaign_ids) == ["cmp-2"]
    assert [list(e.campaign_ids) for e in billing.events.of("balance_short")] == [["cmp-3"]]

    # A release raises free balance: the episode ends; the next shortage is a new episode.
    await billing.stub.ReleaseBatch(pb.ReleaseBatchRequest(workspace_id=WS, keys=["a0"]))
    await billing.hold(["d0", "d1"])
    await billing.settled()
    assert len(billing.events.of("balance_exhausted")) == 2
    # A top-up above the threshold re-arms low and ends the episode; falling below the threshold,
    # then short again, publishes each once more.
    await billing.top_up(1_000)
    await billing.hold([f"e{i}" for i in range(150)])
    await billing.settled()
    assert len(billing.events.of("balance_low")) == 2
    assert len(billing.events.of("balance_exhausted")) == 3


# -- auto-reload ----------------------------------------------------------------------------------


async def _set_auto_reload(billing: Billing, *, threshold: int, amount: int) -> None:
    reply = await billing.stub.SetAutoReload(
        pb.SetAutoReloadRequest(
            workspace_id=WS,
            auto_reload=pb.AutoReload(
                enabled=True, trigger_threshold_cents=threshold, reload_amount_cents=amount
            ),
        )
    )
    assert reply.auto_reload.reload_amount_cents == amount
    got = await billing.stub.GetAutoReload(pb.GetAutoReloadRequest(workspace_id=WS))
    assert got.auto_reload == reply.auto_reload


async def _attempts(billing: Billing) -> list[tuple[str, int | None]]:
    t = AutoReloadAttempt.__table__.c
    return await billing.db.run(
        lambda s: [(r[0], r[1]) for r in s.execute(select(t.status, t.retry_of).order_by(t.id)).all()]
    )


async def test_auto_reload_fires_at_most_three_times_a_day(billing: Billing) -> None:
    await _set_auto_reload(billing, threshold=1_000, amount=1_000)
    await billing.top_up(1_400)
    n = 0
    for expected in (1, 2, 3):
        # Each round takes free balance from >= 1000 to below it: one reload fires.
        start = (await billing.balance()).free_cents
        count = (start - 1_000) // SMS_PRICE + 1
        await billing.hold([f"h{n + i}" for i in range(count)])
        n += count
        await wait_for(lambda e=expected: len(billing.payments.charges) == e, timeout=5)
        await wait_for(lambda e=expected: _free_at_least(billing, 1_000), timeout=5)
    # The fourth crossing the same UTC day does not fire.
    start = (await billing.balance()).free_cents
    await billing.hold([f"h{n + i}" for i in range(((start - 1_000) // SMS_PRICE) + 1)])
    await billing.settled()
    assert len(billing.payments.charges) == 3
    assert len(billing.events.of("auto_reload_succeeded")) == 3
    # Holds keep landing below the threshold: still nothing until the next UTC day.
    await billing.hold(["late-1"])
    assert len(await _attempts(billing)) == 3
    billing.clock.advance(timedelta(days=1))
    await billing.hold(["late-2"])
    # The event, not the charge: it is published only once the credit has committed.
    await wait_for(lambda: len(billing.events.of("auto_reload_succeeded")) == 4, timeout=10)
    assert len(billing.payments.charges) == 4
    balance = await billing.balance()
    assert await billing.rebuilt() == (balance.free_cents, balance.reserved_cents)
    reloads = await billing.db.run(
        lambda s: s.execute(
            select(func.count())
            .select_from(LedgerEntry)
            .where(LedgerEntry.kind == pb.LEDGER_ENTRY_KIND_AUTO_RELOAD)
        ).scalar_one()
    )
    assert reloads == 4


async def _free_at_least(billing: Billing, cents: int) -> bool:
    return (await billing.balance()).free_cents >= cents


async def test_failed_payment_is_retried_once_after_a_day(billing: Billing) -> None:
    billing.payments.set_mode("fail")
    await _set_auto_reload(billing, threshold=1_000, amount=2_000)
    await billing.top_up(1_000)
    await billing.hold(["f1"])
    await wait_for(lambda: len(billing.events.of("auto_reload_failed")) == 1, timeout=5)
    # While the failed reload waits for its retry, more holds below the threshold fire nothing.
    await billing.hold(["f2", "f3"])
    await billing.settled()
    assert await _attempts(billing) == [("failed", None)]
    failure = billing.events.of("auto_reload_failed")[0]
    assert (failure.succeeded, failure.amount_cents, failure.error) == (False, 2_000, "card_declined")

    # Not yet due a second before the day is over.
    billing.clock.advance(timedelta(hours=24) - timedelta(seconds=1))
    await asyncio.sleep(0.2)  # several background passes (interval 0.05 s)
    assert len(await _attempts(billing)) == 1
    billing.payments.set_mode("succeed")
    billing.clock.advance(timedelta(seconds=1))
    await wait_for(lambda: len(billing.events.of("auto_reload_succeeded")) == 1, timeout=5)
    attempts = await _attempts(billing)
    assert [a[0] for a in attempts] == ["failed", "succeeded"]
    assert attempts[1][1] is not None
    assert (await billing.balance()).free_cents == 1_000 - 3 * SMS_PRICE + 2_000
    # Once retried, a failure is final: a failing retry is not retried again.
    billing.payments.set_mode("fail")
    free = (await billing.balance()).free_cents
    await billing.hold([f"g{i}" for i in range((free - 1_000) // SMS_PRICE + 1)])
    await wait_for(lambda: len(billing.events.of("auto_reload_failed")) == 2, timeout=5)
    billing.clock.advance(timedelta(days=1))
    await wait_for(lambda: len(billing.events.of("auto_reload_failed")) == 3, timeout=5)
    billing.clock.advance(timedelta(days=2))
    await asyncio.sleep(0.2)  # several background passes: nothing more may happen
    await billing.settled()
    assert len(billing.events.of("auto_reload_failed")) == 3
    assert [a[0] for a in await _attempts(billing)] == ["failed", "succeeded", "failed", "failed"]
    assert len(billing.payments.charges) == 1


async def test_slow_payment_never_blocks_holds(billing: Billing) -> None:
    billing.payments.set_mode("slow", slow_seconds=2.0)
    await _set_auto_reload(billing, threshold=1_000, amount=1_000)
    await billing.top_up(1_000)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for n in range(5):
        reply = await billing.hold([f"s{n}"])
        assert reply.results[0].status == pb.HOLD_STATUS_HELD
    # Every hold answered while the payment was still running: none waited for it.
    assert loop.time() - started < 2.0
    # One reload in flight at a time, whatever the number of holds below the threshold.
    assert await _attempts(billing) == [("pending", None)]
    await wait_for(lambda: len(billing.events.of("auto_reload_succeeded")) == 1, timeout=10)
    assert (await billing.balance()).free_cents == 2_000 - 5 * SMS_PRICE
    assert billing.payments.calls == 1
