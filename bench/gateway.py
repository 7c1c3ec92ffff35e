"""REST gateway load check: trigger + status at fixed request rates, p50/p99 latency.

    .venv/bin/python bench/gateway.py                       # 200 and 500 requests/s, 15 s each
    .venv/bin/python bench/gateway.py --rates 100,200,500,800 --seconds 20

It starts the whole mesh with the runner (every component its own process, SQLite, the sandbox
carrier) on a fresh data folder, makes an admin key in the gateway's store, and seeds through
the REST API: a top-up, a published EMAIL template, one contact, and `--campaigns` API-triggered
campaigns (SEND -> END). Then, per rate, an open-loop schedule (a request starts every 1/rate s
whether or not earlier ones have answered, so a slow server shows as latency, not as a lower
offered rate) sends this mix:

- 50 % `GET /v1/campaigns/{id}/status`;
- 25 % `POST .../trigger` with a new idempotency key (202 a new run, or 409 while that campaign's
  previous run is still going: both are correct answers);
- 25 % `POST .../trigger` replaying a key already used (202 with `Idempotent-Replayed: true`).

The raw limit, measured first in the same run: the same client against the gateway's
`GET /healthz` (no key, no backend call) as fast as it answers, closed loop with the same
concurrency. The table reports the achieved rate, latency percentiles per kind, answers by status
code, and the achieved rate as a share of that ceiling. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine import Mesh  # noqa: E402  # the runner-driven mesh of the engine bench

from gateway.keys import create_key  # noqa: E402
from shoal.db import Database  # noqa: E402

WORKSPACE = "bench_gateway"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def admin_key(data: Path) -> str:
    db = Database(f"sqlite:///{data / 'gateway.db'}")
    try:
        created = await db.run(create_key, workspace_id=WORKSPACE, scopes=["admin"], name="bench")
        return created.key
    finally:
        await db.close()


async def seed(client: httpx.AsyncClient, campaigns: int) -> tuple[list[str], str]:
    async def ok(reply: httpx.Response) -> dict[str, Any]:
        if reply.status_code >= 300:
            raise RuntimeError(
                f"{reply.request.method} {reply.request.url}: {reply.status_code} {reply.text}"
            )
        body: dict[str, Any] = reply.json()
        return body

    await ok(await client.post("/v1/billing/top-ups", json={"amount_cents": 500_000}))
    template = await ok(
        await client.post(
            "/v1/templates",
            json={
                "name": "bench",
                "channel": "EMAIL",
                "message_type": "MESSAGE",
                "content": {"email": {"subject": "Hi", "html": "<p>Hi</p>"}},
            },
        )
    )
    await ok(await client.post(f"/v1/templates/{template['id']}/publish", json={}))
    contact = await ok(
        await client.post(
            "/v1/contacts",
            json={
                "email": "bench@example.com",
                "consents": [
                    {"channel": "EMAIL", "message_type": "MESSAGE", "status": "GRANTED", "source": "bench"}
                ],
            },
        )
    )
    ids = []
    for n in range(campaigns):
        made = await ok(
            await client.post(
                "/v1/campaigns",
                json={
                    "name": f"bench-{n}",
                    "trigger": {"api": {}},
                    "flow": {
                        "steps": [
                            {
                                "id": "s1",
                                "send": {
                                    "channel": "EMAIL",
                                    "message_type": "MESSAGE",
                                    "template": {"template_id": template["id"]},
                                },
                            },
                            {"id": "e1", "end": {}},
                        ]
                    },
                },
            )
        )
        ids.append(made["id"])
    return ids, str(contact["id"])


async def raw_ceiling(client: httpx.AsyncClient, seconds: float, concurrency: int) -> float:
    """Requests/s of `GET /healthz` (no key, no backend), closed loop."""
    done = 0
    stop = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < stop:
            reply = await client.get("/healthz")
            reply.raise_for_status()
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.monotonic() - started)


async def load(
    client: httpx.AsyncClient, campaigns: list[str], contact: str, rate: int, seconds: float, concurrency: int
) -> dict[str, Any]:
    latencies: dict[str, list[float]] = defaultdict(list)
    statuses: Counter[str] = Counter()
    used_keys: list[tuple[str, str]] = []
    slots = asyncio.Semaphore(concurrency)
    total = int(rate * seconds)

    async def one(i: int) -> None:
        campaign = campaigns[i % len(campaigns)]
        kind = ("status", "trigger", "status", "replay")[i % 4]
        if kind == "replay" and not used_keys:
            kind = "trigger"
        async with slots:
            started = time.perf_counter()
            try:
                if kind == "status":
                    reply = await client.get(f"/v1/campaigns/{campaign}/status")
                elif kind == "trigger":
                    key = uuid.uuid4().hex
                    reply = await client.post(
                        f"/v1/campaigns/{campaign}/trigger",
                        json={"idempotency_key": key, "recipients": [contact]},
                    )
                    if reply.status_code == 202:
                        used_keys.append((campaign, key))
                else:
                    campaign, key = used_keys[i % len(used_keys)]
                    reply = await client.post(
                        f"/v1/campaigns/{campaign}/trigger",
                        json={"idempotency_key": key, "recipients": [contact]},
                    )
                code = str(reply.status_code)
            except httpx.HTTPError as exc:
                code = type(exc).__name__
            latencies[kind].append(time.perf_counter() - started)
            statuses[f"{kind} {code}"] += 1

    started = time.monotonic()
    tasks = []
    for i in range(total):
        due = started + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - started
    every = [x for values in latencies.values() for x in values]
    return {
        "rate": rate,
        "achieved": total / elapsed,
        "p50": percentile(every, 0.50),
        "p99": percentile(every, 0.99),
        "by_kind": {k: (percentile(v, 0.5), percentile(v, 0.99), len(v)) for k, v in latencies.items()},
        "statuses": statuses,
        "errors": sum(n for k, n in statuses.items() if not k.split()[1].isdigit() or k.split()[1][0] == "5"),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rates", default="200,500", help="requests/s, comma separated")
    parser.add_argument("--seconds", type=float, default=15.0, help="duration of each rate")
    parser.add_argument("--campaigns", type=int, default=50, help="API campaigns the triggers rotate over")
    parser.add_argument("--concurrency", type=int, default=256, help="requests in flight at most")
    args = parser.parse_args()
    rates = [int(r) for r in args.rates.split(",") if r.strip()]
    console = Console(width=150)

    with tempfile.TemporaryDirectory(prefix="shoal-bench-gw-") as tmp:
        data = Path(tmp) / "data"
        # The bench is one key sending as fast as it can: lift the per-key limit.
        mesh = Mesh(data, {"SHOAL_GATEWAY_RATE_LIMIT": "1000000/second", "SHOAL_LOG_LEVEL": "WARNING"})
        mesh.start()
        try:
            key = await admin_key(data)
            base = mesh.address("gateway")
            limits = httpx.Limits(
                max_connections=args.concurrency, max_keepalive_connections=args.concurrency
            )
            async with httpx.AsyncClient(
                base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30, limits=limits
            ) as client:
                campaigns, contact = await seed(client, args.campaigns)
                ceiling = await raw_ceiling(client, 5.0, min(args.concurrency, 64))
                results = [
                    await load(client, campaigns, contact, rate, args.seconds, args.concurrency)
                    for rate in rates
                ]
        finally:
            mesh.stop()

    table = Table(title=f"REST gateway under load ({args.seconds:.0f} s per rate, open loop)")
    for column in (
        "offered/s",
        "achieved/s",
        "p50 ms",
        "p99 ms",
        "status p50/p99",
        "trigger p50/p99",
        "replay p50/p99",
        "errors",
        "of raw limit",
    ):
        table.add_column(column, justify="right")
    for r in results:

        def pair(kind: str, r: dict[str, Any] = r) -> str:
            p50, p99, _n = r["by_kind"].get(kind, (float("nan"), float("nan"), 0))
            return f"{p50 * 1000:.0f}/{p99 * 1000:.0f}"

        table.add_row(
            str(r["rate"]),
            f"{r['achieved']:.0f}",
            f"{r['p50'] * 1000:.1f}",
            f"{r['p99'] * 1000:.1f}",
            pair("status"),
            pair("trigger"),
            pair("replay"),
            str(r["errors"]),
            f"{r['achieved'] / ceiling:.2f}",
        )
    console.print(table)
    console.print(
        f"raw limit: GET /healthz closed loop, {ceiling:,.0f} requests/s on this machine in this run"
    )
    for r in results:
        answers = ", ".join(f"{k}: {n}" for k, n in sorted(r["statuses"].items()))
        console.print(f"{r['rate']}/s answers: {answers}")
    console.print(f"median p50 over rates: {statistics.median(r['p50'] for r in results) * 1000:.1f} ms")


if __name__ == "__main__":
    asyncio.run(main())
