"""Bus micro-benchmark: CPU per message of `Bus.publish_many` and of `consume`, nothing else.

    .venv/bin/python bench/bus.py                    # 100k messages, batches of 500
    .venv/bin/python bench/bus.py --messages 20000 --repeat 3
    .venv/bin/python bench/bus.py --fetch stock      # consume with nats-py's own fetch, to compare

It starts a private nats-server, publishes `--messages` small step messages to the EXEC stream
with `publish_many` in chunks of `--batch` (no parent context: one PRODUCER span and one trace
header per chunk, as a batch's follow-ups have), then consumes them all through `consume` with a
handler that does nothing, `--batch` per fetch. Tracing is set up as in a deployment with no
OTLP endpoint (spans not sampled, trace context still propagated).

It reports CPU microseconds per message of this process (user + system, `time.process_time`) and
of the nats-server process for each phase. On a shared machine wall time moves with the load; CPU
per message is the figure to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shoal import bus as shoal_bus  # noqa: E402
from shoal import telemetry  # noqa: E402
from shoal.bus import STREAM_EXEC, Bus, Delivery, Outgoing, consume  # noqa: E402
from shoal.natsserver import NatsServer  # noqa: E402
from shoal.v1.events_pb2 import StepMessage  # noqa: E402

DURABLE = "bench"


def _server_cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _timed(
    server: NatsServer, n: int, work: Callable[[], Awaitable[None]]
) -> tuple[float, float, float]:
    """(µs CPU per message here, µs CPU per message in nats-server, wall seconds) of `work`."""
    cpu0, srv0, wall0 = time.process_time(), _server_cpu(server.pid), time.perf_counter()
    await work()
    cpu1, srv1, wall1 = time.process_time(), _server_cpu(server.pid), time.perf_counter()
    return (cpu1 - cpu0) * 1e6 / n, (srv1 - srv0) * 1e6 / n, wall1 - wall0


async def one_run(server: NatsServer, args: argparse.Namespace, run: int) -> dict[str, Any]:
    bus = await Bus.connect(server.url, name="bench-bus", namespace=f"b{run}")
    await bus.ensure_streams()
    await bus.ensure_consumer(STREAM_EXEC, DURABLE, max_ack_pending=100_000)
    n, batch = args.messages, args.batch
    subject = bus.step_subject("c1")
    items = [
        Outgoing(
            subject,
            StepMessage(workspace_id="ws1", campaign_id="c1", run_id="r1", execution_id=f"e{i}", step_seq=1),
            msg_id=f"e{i}:1",
        )
        for i in range(n)
    ]

    async def publish() -> None:
        for i in range(0, n, batch):
            await bus.publish_many(items[i : i + batch])

    pub = await _timed(server, n, publish)

    done = 0
    stop = asyncio.Event()

    async def handler(deliveries: list[Delivery[StepMessage]]) -> None:
        nonlocal done
        done += len(deliveries)
        if done >= n:
            stop.set()

    async def consume_all() -> None:
        await consume(
            bus,
            stream=STREAM_EXEC,
            durable=DURABLE,
            decode=StepMessage,
            handler=handler,
            batch=batch,
            fetch_timeout=1.0,
            stop=stop,
        )

    con = await _timed(server, n, consume_all)
    # Acks are fire-and-forget: give the server a moment (bounded) to have applied the last ones.
    await bus.nc.flush()
    for _ in range(50):
        info = await bus.consumer_info(STREAM_EXEC, DURABLE)
        if not (info.num_ack_pending or info.num_pending):
            break
        await asyncio.sleep(0.1)
    if done != n or info.num_ack_pending or info.num_pending:
        raise RuntimeError(
            f"consumed {done} of {n}; ack pending {info.num_ack_pending}, pending {info.num_pending}"
        )
    for stream in ("EXEC", "EVENTS"):
        await bus.js.delete_stream(bus.stream_name(stream))
    await bus.close()
    return {"publish": pub, "consume": con}


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=500, help="items per publish_many and per fetch")
    parser.add_argument("--repeat", type=int, default=1, help="runs (fresh streams each); medians reported")
    parser.add_argument(
        "--fetch",
        choices=["shoal", "stock"],
        default="shoal",
        help="stock: consume through nats-py's PullSubscription.fetch instead of shoal.bus.fetch",
    )
    args = parser.parse_args()
    telemetry.init("bench-bus", log_level="WARNING", log_json=False)
    if args.fetch == "stock" and hasattr(shoal_bus, "fetch"):

        async def stock_fetch(psub: Any, batch: int, **options: Any) -> Any:
            return await psub.fetch(batch, **options)

        shoal_bus.fetch = stock_fetch

    with tempfile.TemporaryDirectory(prefix="shoal-bench-bus-") as tmp:
        server = NatsServer(store_dir=Path(tmp) / "store")
        server.start()
        try:
            runs = [await one_run(server, args, i) for i in range(args.repeat)]
        finally:
            server.stop()

    print(
        f"{args.messages:,} messages, batch {args.batch}, fetch {args.fetch}, {args.repeat} run(s), medians"
    )
    print(f"{'phase':<10}{'µs CPU/msg here':>18}{'µs CPU/msg nats':>18}{'msg/s':>12}")
    for phase in ("publish", "consume"):
        here = statistics.median(r[phase][0] for r in runs)
        srv = statistics.median(r[phase][1] for r in runs)
        rate = statistics.median(args.messages / r[phase][2] for r in runs)
        print(f"{phase:<10}{here:>18.1f}{srv:>18.1f}{rate:>12,.0f}")


if __name__ == "__main__":
    asyncio.run(main())
