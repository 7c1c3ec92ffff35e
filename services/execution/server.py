"""Wiring of the execution service: database, bus, peers, providers, workers, timers, gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from sqlalchemy import event, func, select

from services.execution import receipts, repo
from services.execution.config import ExecutionSettings
from services.execution.engine import Engine
from services.execution.fanout import Fanout
from services.execution.peers import Peers
from services.execution.providers.registry import build_providers, close_providers
from services.execution.servicer import ExecutionServicer
from services.execution.timers import TimerLoop
from shoal.bus import STREAM_EVENTS, STREAM_EXEC, Bus, consume
from shoal.campaign_states import CampaignStates
from shoal.db import Database
from shoal.grpc import GrpcServer, ServiceBinding
from shoal.metrics import EXECUTION_STATES, ConsumerLagPoller, Metrics
from shoal.metrics import default as default_metrics
from shoal.v1 import events_pb2, execution_pb2, execution_pb2_grpc

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"
WORKERS_DURABLE = "execution-workers"
# How often `shoal_executions_by_state` is recounted (one SUM over the runs' counters).
STATE_COUNT_SECONDS = 5.0


def count_by_state(session: Any) -> dict[str, int]:
    """Executions per state over all runs, from the run counters (moved in the same transactions
    as the executions): one aggregate over the runs table, never a scan of the executions."""
    row = session.execute(
        select(*(func.coalesce(func.sum(getattr(repo.R.c, s)), 0) for s in EXECUTION_STATES))
    ).one()
    return {state: int(n) for state, n in zip(EXECUTION_STATES, row, strict=True)}


async def count_states(db: Database, stop: asyncio.Event, *, metrics: Metrics, interval: float) -> None:
    """Publish `shoal_executions_by_state` every `interval` seconds until `stop`."""
    while not stop.is_set():
        try:
            metrics.set_executions_by_state(await db.run(count_by_state))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("counting executions by state failed", exc_info=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)


def _sqlite_tuning(db: Database) -> None:
    """64 MB of page cache instead of SQLite's 2 MB: the executions table and its indexes are
    read and rewritten in every batch, and re-reading their pages from the OS costs CPU. (The
    checkpoint interval, which matters as much here, is set for every service in shoal.db.)"""

    @event.listens_for(db.engine, "connect")
    def _tune(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute("PRAGMA cache_size=-65536")

    db.engine.dispose()  # connections opened for the migration reconnect with the pragmas


def step_workers(
    bus: Bus, engine: Engine, settings: ExecutionSettings, stop: asyncio.Event
) -> list[asyncio.Task[None]]:
    """`worker_concurrency` consume loops on the shared durable consumer, until `stop`."""
    return [
        asyncio.create_task(
            consume(
                bus,
                stream=STREAM_EXEC,
                durable=WORKERS_DURABLE,
                decode=events_pb2.StepMessage,
                handler=engine.handle,
                batch=settings.batch_size,
                fetch_timeout=settings.fetch_timeout_seconds,
                stop=stop,
                max_deliver=settings.max_deliver,
            ),
            name=f"step-worker-{n}",
        )
        for n in range(settings.worker_concurrency)
    ]


# -- step-worker processes -----------------------------------------------------------------------

PARENT_PID_ENV = "SHOAL_EXECUTION_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def worker_env(settings: ExecutionSettings, *, namespace: str) -> dict[str, str]:
    """The environment of a step-worker process: this one's, plus every setting this process
    runs with (it may have been given settings that are not in its environment, as tests do)."""
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        text = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
        env[f"SHOAL_EXECUTION_{name.upper()}"] = text
    env["SHOAL_EXECUTION_DATABASE_URL"] = settings.resolved_database_url("execution")
    env["SHOAL_EXECUTION_NAMESPACE"] = namespace
    env["SHOAL_EXECUTION_PROCESSES"] = "1"
    env.pop("SHOAL_EXECUTION_METRICS_PORT", None)  # one /metrics endpoint, this process's
    env.pop("SHOAL_PORT_FILE", None)
    env[PARENT_PID_ENV] = str(os.getpid())
    return env


class WorkerProcesses:
    """The extra step-worker processes: started, started again when one dies, stopped with us.

    Each is `python -m services.execution --worker`: step workers only (no API, timers, fan-outs
    or receipts, which stay in this process), on the same durable consumer, database and peers.
    A worker asks Linux to SIGTERM it when this process dies (even by SIGKILL), so none outlives
    the service; it then finishes the batch in hand like any stopping worker.
    """

    def __init__(self, count: int, *, env: dict[str, str], grace: float, restart_after: float = 1.0) -> None:
        self.count = count
        self.env = env
        self.grace = grace
        self.restart_after = restart_after
        self.procs: list[asyncio.subprocess.Process | None] = [None] * count

    async def _spawn(self) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.execution",
            "--worker",
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
        )

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p is not None and p.returncode is None]

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                for i, proc in enumerate(self.procs):
                    if proc is not None and proc.returncode is None:
                        continue
                    if proc is not None:
                        log.warning(
                            "step worker process %s exited with %s; starting another",
                            proc.pid,
                            proc.returncode,
                        )
                    try:
                        self.procs[i] = await self._spawn()
                    except OSError:
                        log.exception("could not start a step worker process")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.restart_after)
        finally:
            await self._stop_all()

    async def _stop_all(self) -> None:
        live = [p for p in self.procs if p is not None and p.returncode is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        try:
            # The batch in hand finishes and is settled, as in this process.
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in live)), timeout=self.grace + 2)
        except (TimeoutError, asyncio.CancelledError):
            for proc in live:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            raise


def _die_with_parent() -> None:
    """SIGTERM this worker process when the service process that started it dies (Linux)."""
    parent = int(os.environ.get(PARENT_PID_ENV, "0") or 0)
    if sys.platform.startswith("linux"):
        libc_name = ctypes.util.find_library("c")
        if libc_name is not None:
            ctypes.CDLL(libc_name, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    # The parent may have died before the request above: then no signal would ever come.
    if parent and os.getppid() != parent:
        raise SystemExit("execution worker: the service process that started it is gone")


async def run_worker_process(settings: ExecutionSettings, *, ready: Callable[[], None] | None = None) -> None:
    """`python -m services.execution --worker`: step workers only, until SIGTERM or SIGINT.

    The service process that starts it has migrated the database and created the stream and the
    durable consumer. Exits non-zero when a consume loop fails, so that process starts another.
    """
    _die_with_parent()
    db = Database(settings.resolved_database_url("execution"))
    if db.sqlite:
        _sqlite_tuning(db)
    bus = await Bus.connect(settings.nats_url, name="execution-worker", namespace=settings.namespace)
    states = await CampaignStates.open(bus)
    peers = Peers.connect(settings)
    providers = build_providers(settings)
    engine = Engine(db=db, bus=bus, peers=peers, providers=providers, states=states, settings=settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = step_workers(bus, engine, settings, stop)
    if ready is not None:
        ready()
    log.info("step worker process %s started (%s consume loops)", os.getpid(), len(tasks))
    stopping = asyncio.create_task(stop.wait())
    failed: BaseException | None = None
    try:
        done, _ = await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stopping and not task.cancelled() and task.exception() is not None:
                failed = task.exception()
                log.error("a consume loop of step worker %s failed: %r", os.getpid(), failed)
        stop.set()
        try:
            await asyncio.wait_for(
                asyncio.gather(*tasks, return_exceptions=True), timeout=settings.shutdown_grace_seconds + 5
            )
        except TimeoutError:
            for task in tasks:
                task.cancel()
    finally:
        stopping.cancel()
        await close_providers(providers)
        await peers.close()
        await bus.close()
        await db.close()
    if failed is not None:
        raise SystemExit(1)


async def build(settings: ExecutionSettings, *, namespace: str = "") -> GrpcServer:
    db = Database(settings.resolved_database_url("execution"), migrations_dir=MIGRATIONS)
    await db.call(db.migrate)
    if db.sqlite:
        _sqlite_tuning(db)
    bus = await Bus.connect(settings.nats_url, name="execution", namespace=namespace or settings.namespace)
    await bus.ensure_streams()
    states = await CampaignStates.open(bus)
    peers = Peers.connect(settings)
    stop = asyncio.Event()
    tasks: list[asyncio.Task[Any]] = []
    fanout: Fanout | None = None
    providers = build_providers(settings)
    renudge = timedelta(seconds=settings.renudge_seconds)

    if settings.workers:
        metrics = default_metrics()
        await bus.ensure_consumer(
            STREAM_EXEC,
            WORKERS_DURABLE,
            filter_subjects=[bus.subject("shoal.exec.step.>")],
            max_deliver=settings.max_deliver,
            ack_wait=max(30.0, settings.lease_seconds),
        )
        engine = Engine(
            db=db,
            bus=bus,
            peers=peers,
            providers=providers,
            states=states,
            settings=settings,
            metrics=metrics,
        )
        fanout = Fanout(
            db=db,
            bus=bus,
            segment=peers.segment,
            page_size=settings.fanout_page_size,
            owner=f"{socket.gethostname()}:{os.getpid()}",
            renudge=renudge,
            on_progress=engine.publish_progress,
            metrics=metrics,
        )
        timer = TimerLoop(
            db=db, bus=bus, states=states, interval=settings.timer_interval_seconds, renudge=renudge
        )
        tasks.extend(step_workers(bus, engine, settings, stop))
        if settings.processes > 1:
            pool = WorkerProcesses(
                settings.processes - 1,
                env=worker_env(settings, namespace=bus.namespace),
                grace=settings.shutdown_grace_seconds,
            )
            tasks.append(asyncio.create_task(pool.run(stop), name="worker-processes"))
        tasks.append(asyncio.create_task(timer.run(stop), name="timers"))
        tasks.append(asyncio.create_task(receipts.run(bus, db, stop), name="receipts"))
        tasks.append(
            asyncio.create_task(
                count_states(db, stop, metrics=metrics, interval=STATE_COUNT_SECONDS), name="state-counts"
            )
        )
        lag = ConsumerLagPoller(
            bus, [(STREAM_EXEC, WORKERS_DURABLE), (STREAM_EVENTS, receipts.DURABLE)], metrics
        )
        tasks.append(asyncio.create_task(lag.run(stop), name="consumer-lag"))
        await fanout.resume_all()
        tasks.append(asyncio.create_task(fanout.watch(stop), name="fanout-watch"))

    servicer = ExecutionServicer(db=db, bus=bus, states=states, fanout=fanout, renudge=renudge)
    server = GrpcServer(
        "execution",
        [
            ServiceBinding(
                execution_pb2_grpc.add_ExecutionServiceServicer_to_server,
                servicer,
                execution_pb2.DESCRIPTOR.services_by_name["ExecutionService"].full_name,
            )
        ],
        host=settings.host,
        port=settings.port,
    )

    async def stop_workers() -> None:
        # The batch in hand finishes and is settled; then nothing new is fetched.
        stop.set()
        if fanout is not None:
            await fanout.stop()
        for task in tasks:
            try:
                await asyncio.wait_for(task, timeout=settings.shutdown_grace_seconds + 5)
            except (TimeoutError, asyncio.CancelledError):
                task.cancel()
            except Exception:
                log.exception("worker task %s ended with an error", task.get_name())

    async def close_providers_() -> None:
        await close_providers(providers)

    # Closers run in reverse: workers stop first, then peers and providers, then NATS, then the db.
    server.closers.extend([db.close, bus.close, peers.close, close_providers_, stop_workers])
    return server
