"""Kill -9 the billing process after a HoldBatch committed and before it replied; a new process on
the same database answers the retried call exactly as the lost reply would have, and nothing is
held twice."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from sqlalchemy import func, select
from sqlmodel import Session

from services.billing import ledger
from services.billing.models import Hold, LedgerEntry
from shoal.db import make_engine
from shoal.grpc import channel, wait_healthy
from shoal.v1 import billing_pb2 as pb
from shoal.v1 import billing_pb2_grpc
from shoal.v1 import common_pb2 as common
from tests.helpers import wait_for
from tests.processes import REPO

WS = "ws_crash"
PRICE = 7


class BillingProcess:
    def __init__(self, tmp_path: Path, database_url: str, nats_url: str, name: str, **env: str) -> None:
        self.port_file = tmp_path / f"{name}.port"
        self.log = tmp_path / f"{name}.log"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")},
            "SHOAL_NATS_URL": nats_url,
            "SHOAL_DATA_DIR": str(tmp_path),
            "SHOAL_LOG_JSON": "false",
            "SHOAL_BILLING_DATABASE_URL": database_url,
            "SHOAL_BILLING_PORT": "0",
            "SHOAL_PORT_FILE": str(self.port_file),
            "SHOAL_SHUTDOWN_GRACE_SECONDS": "0.5",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.billing"], cwd=REPO, env=self.env, stdout=out, stderr=out
            )

    async def start(self) -> str:
        self.spawn()

        def port() -> int | None:
            assert self.proc is not None
            assert self.proc.poll() is None, f"billing exited early:\n{self.log.read_text()[-3000:]}"
            text = self.port_file.read_text() if self.port_file.exists() else ""
            return int(text) if text else None

        address = f"127.0.0.1:{await wait_for(port, timeout=30)}"
        await wait_healthy(address, within=20)
        return address

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _request(keys: list[str]) -> pb.HoldBatchRequest:
    return pb.HoldBatchRequest(
        workspace_id=WS,
        items=[
            pb.HoldItem(key=k, channel=common.CHANNEL_SMS, message_type=common.MESSAGE_TYPE_MESSAGE, units=1)
            for k in keys
        ],
    )


async def test_killed_between_commit_and_reply(database_url: str, nats_url: str, tmp_path: Path) -> None:
    engine = make_engine(database_url)
    first = BillingProcess(
        tmp_path, database_url, nats_url, "first", SHOAL_BILLING_DEBUG_REPLY_DELAY_SECONDS="60"
    )
    second = BillingProcess(tmp_path, database_url, nats_url, "second")
    keys = [f"exec-{i}:node-1" for i in range(200)]
    try:
        address = await first.start()
        async with channel(address, deadline=90) as ch:
            stub = billing_pb2_grpc.BillingServiceStub(ch)
            await stub.TopUp(pb.TopUpRequest(workspace_id=WS, amount_cents=1_000))
            lost = asyncio.ensure_future(stub.HoldBatch(_request(keys)))

            def committed() -> bool:
                with engine.connect() as conn:
                    return conn.execute(select(func.count()).select_from(Hold)).scalar_one() > 0

            await wait_for(committed, timeout=20)
            first.kill()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await lost
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE

        address = await second.start()
        async with channel(address) as ch:
            stub = billing_pb2_grpc.BillingServiceStub(ch)
            replies = [await stub.HoldBatch(_request(keys)) for _ in range(2)]
    finally:
        first.stop()
        second.stop()

    held = 1_000 // PRICE
    expected = [(k, pb.HOLD_STATUS_HELD, PRICE) for k in keys[:held]] + [
        (k, pb.HOLD_STATUS_INSUFFICIENT_BALANCE, PRICE) for k in keys[held:]
    ]
    for reply in replies:
        assert [(r.key, r.status, r.amount_cents) for r in reply.results] == expected
        assert (reply.balance.free_cents, reply.balance.reserved_cents) == (
            1_000 - held * PRICE,
            held * PRICE,
        )
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(Hold)).scalar_one() == held
        hold_entries = conn.execute(
            select(func.count()).select_from(LedgerEntry).where(LedgerEntry.kind == pb.LEDGER_ENTRY_KIND_HOLD)
        ).scalar_one()
    assert hold_entries == held
    with Session(engine) as session:
        assert ledger.rebuild_balance(session, workspace_id=WS) == (1_000 - held * PRICE, held * PRICE)
    engine.dispose()
