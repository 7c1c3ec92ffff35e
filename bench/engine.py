"""Engine benchmark: contacts per second through a flow, every service as its own process.

    .venv/bin/python bench/engine.py                      # 100k SEND->END on SQLite
    .venv/bin/python bench/engine.py --contacts 20000 --flow send-condition-tag-end
    .venv/bin/python bench/engine.py --db postgres --postgres-url postgresql://postgres@127.0.0.1/test
    .venv/bin/python bench/engine.py --contacts 3000 --tracing off,0.1,1 --repeat 3   # tracing cost
    .venv/bin/python bench/engine.py --contacts 100000 --processes 2 --repeat 3         # 2 worker processes

It starts the whole mesh with the runner (`python -m shoal.runner --ports auto`) on a fresh data
folder, imports the audience, and first measures the raw ceiling on the same machine in the same
run: a bare JetStream fetch -> one batched UPDATE -> publish follow-up -> ack loop over the same
number (at most 100,000) of messages, with no Shoal code. Its fetch is `shoal.bus.fetch`, the lean
pull fetch the services use (the same pull requests as nats-py's, minus a task and a timer per
message): a client-library primitive, not engine logic, so the ceiling stays the true raw limit of
what the services run on rather than of nats-py's slower fetch. It waits until the mesh is idle (the
import's contact events consumed), launches the campaign and reports contacts/s, the ratio to
that ceiling, p50/p99 time from launch to a contact's send, CPU per contact of every component
(a component's processes together: the execution service's worker processes, the nats-server
binary; from launch until the mesh is idle again, so the receipts that trail COMPLETED count
too) and peak RSS per component. With `--repeat` every run gets a fresh mesh and its own
ceiling (on a shared machine both move with the load), every run is listed with the load average
at its launch, and the detailed table is the median run. The data folders are removed at the end
(`--keep-data` keeps them).

`--tracing` measures what tracing costs: one fresh mesh per value, `off` (no OTLP endpoint, the
default deployment) or a parent-based sample ratio with every process exporting for real (the
SDK's BatchSpanProcessor and OTLP/gRPC exporter, default settings) to an OTLP collector inside
this process that only counts the spans. A real exporter, not a no-op one: building, batching,
encoding and sending the spans is the cost a deployment pays, and the collector's own work stays
out of the services' CPU figures, as Jaeger's would. One run is one trace (design.md §5), so a
ratio below 1 samples a run or not as a whole: the table says whether this run was traced and,
with ratio 1 measured too, what the ratio costs on average over many runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import httpx
import nats
from rich.console import Console
from rich.table import Table
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    bindparam,
    create_engine,
    insert,
    text,
    update,
)
from sqlalchemy import (
    Table as SqlTable,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shoal.bus import fetch  # noqa: E402
from shoal.db import make_engine  # noqa: E402
from shoal.v1 import billing_pb2 as bpb  # noqa: E402
from shoal.v1 import billing_pb2_grpc, campaign_pb2_grpc, segment_pb2_grpc, template_pb2_grpc  # noqa: E402
from shoal.v1 import campaign_pb2 as cpb  # noqa: E402
from shoal.v1 import common_pb2 as common  # noqa: E402
from shoal.v1 import segment_pb2 as spb  # noqa: E402
from shoal.v1 import template_pb2 as tpb  # noqa: E402
from tests.otlp_collector import OtlpCollector  # noqa: E402

EMAIL, MESSAGE = common.CHANNEL_EMAIL, common.MESSAGE_TYPE_MESSAGE
console = Console()
READY = re.compile(r"shoal: ready in")


# -- the raw ceiling -----------------------------------------------------------------------------


async def raw_ceiling(nats_url: str, db_url: str, count: int, batch: int = 500) -> float:
    """Messages/s of a bare step loop: fetch, one batched UPDATE, publish follow-up, ack.

    The fetch is `shoal.bus.fetch` (see the module docstring): the services' own fetch primitive.
    """
    engine = make_engine(db_url)
    meta = MetaData()
    rows = SqlTable(
        f"raw_{uuid.uuid4().hex[:8]}",
        meta,
        Column("id", String, primary_key=True),
        Column("state", Integer, nullable=False),
    )
    meta.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(rows), [{"id": f"e{i}", "state": 0} for i in range(count)])
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    stream = f"RAW{uuid.uuid4().hex[:8]}"
    await js.add_stream(name=stream, subjects=[f"{stream}.>"], retention="workqueue")
    for i in range(0, count, 1000):
        futs = [
            await js.publish_async(f"{stream}.step", f"e{j}".encode()) for j in range(i, min(i + 1000, count))
        ]
        await asyncio.gather(*futs)
    sub = await js.pull_subscribe(f"{stream}.step", durable="raw")
    done = 0
    t0 = time.perf_counter()
    stmt = update(rows).where(rows.c.id == bindparam("b_id")).values(state=1)
    while done < count:
        msgs = await fetch(sub, batch, timeout=5)
        ids = [m.data.decode() for m in msgs]
        with engine.begin() as conn:
            conn.execute(stmt, [{"b_id": i} for i in ids])
        futs = [await js.publish_async(f"{stream}.next", i.encode()) for i in ids]
        await asyncio.gather(*futs)
        for m in msgs:
            await m.ack()
        done += len(msgs)
    elapsed = time.perf_counter() - t0
    await js.delete_stream(stream)
    await nc.close()
    meta.drop_all(engine)
    engine.dispose()
    return count / elapsed


# -- the mesh ------------------------------------------------------------------------------------


class Mesh:
    def __init__(self, data: Path, env: dict[str, str], only: str = "") -> None:
        self.data = data
        self.env = env
        self.only = only
        self.proc: subprocess.Popen[str] | None = None
        self.info: dict[str, Any] = {}

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "shoal.runner",
                "--ports",
                "auto",
                "--fresh",
                "--data-dir",
                str(self.data),
                *(["--only", self.only] if self.only else []),
            ],
            cwd=REPO,
            env={**os.environ, **self.env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 90
        for line in self.proc.stdout:
            if READY.search(line):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("mesh not ready in 90 s")
        else:
            raise RuntimeError(f"runner exited: {self.proc.wait()}")
        self.info = json.loads((self.data / "runner.json").read_text())

    def address(self, name: str) -> str:
        return str(self.info["components"][name]["address"])

    def peak_rss_mb(self) -> dict[str, float]:
        """Peak RSS per component; with several processes, the largest one's."""
        out = {}
        for name, pid in self.pids().items():
            peaks = []
            for p in _tree(pid):
                try:
                    text = Path(f"/proc/{p}/status").read_text()
                except OSError:
                    continue
                match = re.search(r"VmHWM:\s+(\d+) kB", text)
                if match:
                    peaks.append(int(match.group(1)) / 1024)
            if peaks:
                out[name] = max(peaks)
        return out

    def pids(self) -> dict[str, int]:
        out = {name: int(comp["pid"]) for name, comp in self.info["components"].items()}
        if self.info.get("nats", {}).get("pid"):
            out["nats"] = int(self.info["nats"]["pid"])
        return out

    def cpu_seconds(self) -> dict[str, float]:
        """User + system CPU seconds each component has used so far (from /proc), with every
        process it started (the execution service's worker processes, the nats-server binary)."""
        return {name: sum(_cpu(p) for p in _tree(pid)) for name, pid in self.pids().items()}

    def processes(self) -> dict[str, int]:
        return {name: len(_tree(pid)) for name, pid in self.pids().items()}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def _tree(pid: int) -> list[int]:
    """`pid` and all its descendants (Linux /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
    return out


def _cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


async def settle(mesh: Mesh, *, idle_cores: float = 0.05, within: float = 120.0) -> bool:
    """Wait until the mesh is idle (before a launch: the import's contact events consumed, caches
    warm; after it: the receipts settled), so CPU figures are the run's alone. False when it was
    still busy after `within` seconds."""
    deadline = time.monotonic() + within
    before = sum(mesh.cpu_seconds().values())
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)  # a benchmark's idle poll, not a test synchronisation
        now = sum(mesh.cpu_seconds().values())
        if (now - before) / 0.5 < idle_cores:
            return True
        before = now


def flow_of(kind: str, template_id: str) -> cpb.Flow:
    send = cpb.Step(
        id="s1",
        send=cpb.SendStep(
            channel=EMAIL, message_type=MESSAGE, template=tpb.TemplateRef(template_id=template_id)
        ),
    )
    end = cpb.Step(id="e1", end=cpb.EndStep())
    if kind == "send-end":
        return cpb.Flow(steps=[send, end])
    tag = cpb.Step(id="t1", tag=cpb.TagStep(tag="reached", action=cpb.TAG_ACTION_ADD))
    condition = cpb.Step(
        id="c1",
        condition=cpb.ConditionStep(
            predicate=cpb.Predicate(channel_used=cpb.ChannelUsedPredicate(node_id="s1", channel=EMAIL)),
            yes=cpb.Branch(steps=[tag, end]),
            no=cpb.Branch(steps=[cpb.Step(id="e2", end=cpb.EndStep())]),
        ),
    )
    return cpb.Flow(steps=[send, condition])


async def run_campaign(mesh: Mesh, contacts: int, flow_kind: str, ws: str) -> dict[str, Any]:
    chans = {
        n: grpc.aio.insecure_channel(
            mesh.address(n),
            options=[
                ("grpc.max_receive_message_length", 64 << 20),
                ("grpc.max_send_message_length", 64 << 20),
            ],
        )
        for n in ("segment", "template", "billing", "campaign")
    }
    seg = segment_pb2_grpc.SegmentServiceStub(chans["segment"])
    tpl = template_pb2_grpc.TemplateServiceStub(chans["template"])
    bil = billing_pb2_grpc.BillingServiceStub(chans["billing"])
    cmp_ = campaign_pb2_grpc.CampaignServiceStub(chans["campaign"])
    t0 = time.perf_counter()
    for start in range(0, contacts, 10_000):
        batch = [
            spb.ContactInput(
                external_id=f"x{i}",
                email=f"c{i}@example.com",
                first_name=f"C{i}",
                tags=["bench"],
                consents=[
                    spb.ConsentInput(
                        channel=EMAIL, message_type=MESSAGE, status=spb.CONSENT_STATUS_GRANTED, source="bench"
                    )
                ],
            )
            for i in range(start, min(start + 10_000, contacts))
        ]
        await seg.ImportContacts(spb.ImportContactsRequest(workspace_id=ws, contacts=batch), timeout=600)
    import_rate = contacts / (time.perf_counter() - t0)
    segment = await seg.CreateSegment(
        spb.CreateSegmentRequest(
            workspace_id=ws, name="bench", filter=spb.Filter(tag=spb.TagCondition(tag="bench"))
        )
    )
    template = await tpl.CreateTemplate(
        tpb.CreateTemplateRequest(
            workspace_id=ws,
            name="bench",
            channel=EMAIL,
            message_type=MESSAGE,
            content=tpb.TemplateContent(
                email=tpb.EmailContent(subject="Hi {{ contact.first_name }}", html="<p>Hello</p>")
            ),
            variables=[tpb.Variable(name="contact.first_name", type=tpb.VARIABLE_TYPE_STRING, required=True)],
        )
    )
    await tpl.PublishTemplate(
        tpb.PublishTemplateRequest(workspace_id=ws, template_id=template.template.id, version=1)
    )
    # Price 0 keeps a million sends inside the default balance limit; holds and captures still happen.
    await bil.SetPrice(
        bpb.SetPriceRequest(
            workspace_id=ws,
            price=bpb.Price(channel=EMAIL, message_type=MESSAGE, unit=common.BILLING_UNIT_EMAIL, cents=0),
        )
    )
    await bil.TopUp(bpb.TopUpRequest(workspace_id=ws, amount_cents=10_000))
    created = await cmp_.CreateCampaign(
        cpb.CreateCampaignRequest(
            workspace_id=ws,
            name="bench",
            segment_id=segment.segment.id,
            trigger=cpb.Trigger(manual=cpb.ManualTrigger()),
            flow=flow_of(flow_kind, template.template.id),
        )
    )
    await settle(mesh)
    load_before = load_average()
    cpu_before = mesh.cpu_seconds()
    launch_wall = time.time()
    t_launch = time.perf_counter()
    await cmp_.StartCampaign(cpb.StartCampaignRequest(workspace_id=ws, campaign_id=created.campaign.id))
    while True:
        status = await cmp_.GetCampaignStatus(
            cpb.GetCampaignStatusRequest(workspace_id=ws, campaign_id=created.campaign.id)
        )
        if status.state in (cpb.CAMPAIGN_STATE_COMPLETED, cpb.CAMPAIGN_STATE_COMPLETED_PARTIAL):
            break
        await asyncio.sleep(0.2)  # a benchmark's progress poll, not a test synchronisation
    elapsed = time.perf_counter() - t_launch
    # The run's work goes on after COMPLETED: the carrier's receipts (delivered, opened, clicked)
    # are settled, recorded as contact events and published for webhooks. A contact's CPU is all
    # of it, so the closing reading waits until the mesh is idle again.
    idle = await settle(mesh)
    trailing = time.perf_counter() - t_launch - elapsed
    cpu_after = mesh.cpu_seconds()
    cpu_us = {n: (cpu_after[n] - cpu_before.get(n, 0.0)) * 1e6 / contacts for n in cpu_after}
    latencies = await first_send_latencies(mesh, launch_wall)
    for ch in chans.values():
        await ch.close()
    return {
        "load": f"{load_before} -> {load_average()}",
        "contacts_per_s": contacts / elapsed,
        "seconds": elapsed,
        "import_per_s": import_rate,
        "completed": status.counts.completed,
        "latency": latencies,
        "cpu_us": cpu_us,
        "trailing_s": trailing if idle else None,
    }


async def first_send_latencies(mesh: Mesh, launch_wall: float) -> tuple[float, float]:
    """p50/p99 seconds from launch to the carrier accepting each contact's message."""
    from datetime import datetime

    address = str(mesh.info["components"]["sandbox"]["address"])
    url = address if address.startswith("http") else f"http://{address}"
    stamps: list[float] = []
    after = 0
    async with httpx.AsyncClient(timeout=60) as client:
        while True:
            page = (await client.get(f"{url}/v1/messages", params={"limit": 1000, "after": after})).json()
            stamps.extend(
                datetime.fromisoformat(m["accepted_at"]).timestamp() - launch_wall for m in page["messages"]
            )
            if not page.get("next_after"):
                break
            after = page["next_after"]
    stamps.sort()
    if not stamps:
        return (0.0, 0.0)
    return stamps[len(stamps) // 2], stamps[min(len(stamps) - 1, int(len(stamps) * 0.99))]


def tracing_modes(text: str) -> list[float | None]:
    """`off,0.1,1` -> [None, 0.1, 1.0]; None is tracing off."""
    modes: list[float | None] = []
    for raw in text.split(","):
        part = raw.strip().lower()
        if part == "off":
            modes.append(None)
            continue
        try:
            ratio = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: use off or a ratio between 0 and 1") from None
        if not 0.0 <= ratio <= 1.0:
            raise argparse.ArgumentTypeError(f"{part!r}: a ratio is between 0 and 1")
        modes.append(ratio)
    return modes


def mode_name(mode: float | None) -> str:
    return "off" if mode is None else f"ratio {mode:g}"


async def measure(
    args: argparse.Namespace,
    data: Path,
    env: dict[str, str],
    mode: float | None,
    *,
    with_ceiling: bool,
    pg_url: str,
) -> dict[str, Any]:
    """One fresh mesh with this tracing mode: the campaign's figures (and the raw ceiling)."""
    collector: OtlpCollector | None = None
    env = dict(env)
    if mode is None:
        # No exporter at all, whatever the caller's shell says: the default deployment.
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = ""
    else:
        collector = OtlpCollector(keep=False)
        await collector.start()
        env.update(
            OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint,
            OTEL_EXPORTER_OTLP_INSECURE="true",
            SHOAL_TRACE_SAMPLE_RATIO=str(mode),
        )
    only = "sandbox,segment,template,billing,execution,campaign" if args.without_gateway else ""
    mesh = Mesh(data, env, only)
    # In a thread: the collector shares this event loop and must keep answering exports meanwhile.
    await asyncio.to_thread(mesh.start)
    try:
        ceiling = 0.0
        if with_ceiling:
            raw_db = pg_url or f"sqlite:///{data.parent / 'raw.db'}"
            ceiling = await raw_ceiling(mesh.info["nats"]["url"], raw_db, min(args.contacts, 100_000))
        result = await run_campaign(
            mesh, args.contacts, args.flow, mesh.info.get("workspace_id", "ws_default")
        )
        result["rss"] = mesh.peak_rss_mb()
        result["processes"] = mesh.processes()
    finally:
        # The processes flush their last spans as they exit; the collector is still serving.
        await asyncio.to_thread(mesh.stop)
        if collector is not None:
            await collector.stop()
    result["ceiling"] = ceiling
    result["spans"] = collector.count if collector is not None else 0
    return result


def runs_table(title: str, results: list[dict[str, Any]], modes: list[float | None]) -> Table:
    """Every run on its own line: on a shared machine the spread matters as much as the median."""
    table = Table(title=f"{title}: every run")
    for column in ("run", "tracing", "load at launch", "contacts/s", "ceiling msg/s", "ratio", "CPU/contact"):
        table.add_column(column, justify="left" if column in ("tracing", "load at launch") else "right")
    for i, (mode, r) in enumerate(zip(modes * len(results), results, strict=False)):
        table.add_row(
            str(i + 1),
            mode_name(mode),
            r["load"].split(" -> ")[0],
            f"{r['contacts_per_s']:,.0f}",
            f"{r['ceiling']:,.0f}",
            f"{r['contacts_per_s'] / r['ceiling']:.2f}",
            f"{sum(r['cpu_us'].values()):,.0f} µs",
        )
    return table


def tracing_table(
    args: argparse.Namespace, modes: list[float | None], runs: dict[float | None, list[dict[str, Any]]]
) -> Table:
    """Medians over the repeats of each mode (fresh mesh per run, the modes interleaved)."""
    repeats = f", median of {args.repeat} runs each" if args.repeat > 1 else ""
    table = Table(title=f"Tracing cost: {args.contacts:,} contacts, {args.flow}{repeats}")
    for column in ("tracing", "contacts/s", "vs off", "CPU per contact, all processes", "spans per contact"):
        table.add_column(column, justify="left" if column == "tracing" else "right")

    def rate(rs: list[dict[str, Any]]) -> float:
        return float(statistics.median(r["contacts_per_s"] for r in rs))

    def traced(r: dict[str, Any]) -> bool:
        return bool(r["spans"] / args.contacts >= 1)

    off = rate(runs[None]) if None in runs else None
    for mode in dict.fromkeys(modes):
        rs = runs[mode]
        note = ""
        if mode is not None and 0.0 < mode < 1.0:
            note = f"  (runs traced: {sum(traced(r) for r in rs)} of {len(rs)})"
        table.add_row(
            f"{mode_name(mode)}{note}",
            f"{rate(rs):,.0f}",
            f"{rate(rs) / off:.2f}" if off else "-",
            f"{statistics.median(sum(r['cpu_us'].values()) for r in rs):,.0f} µs",
            "-" if mode is None else f"{statistics.median(r['spans'] for r in rs) / args.contacts:.2f}",
        )
    # One run is one trace: a ratio r traces a run or not. Over many runs the time per contact
    # averages (1 - r) x untraced + r x traced; both are measured when ratio 1 and untraced runs
    # of ratio r are in the table.
    for mode in dict.fromkeys(modes):
        untraced = [r for r in runs[mode] if not traced(r)]
        if 1.0 not in runs or mode is None or not 0.0 < mode < 1.0 or not untraced:
            continue
        mixed = 1 / ((1 - mode) / rate(untraced) + mode / rate(runs[1.0]))
        table.add_row(
            f"{mode_name(mode)}, average over many runs",
            f"{mixed:,.0f}",
            f"{mixed / off:.2f}" if off else "-",
        )
    return table


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contacts", type=int, default=100_000)
    parser.add_argument("--flow", choices=["send-end", "send-condition-tag-end"], default="send-end")
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument(
        "--without-gateway",
        action="store_true",
        help="leave the gateway out: the sandbox then sends no receipt callbacks (engine cost alone)",
    )
    parser.add_argument(
        "--tracing",
        type=tracing_modes,
        default=[None],
        metavar="MODES",
        help=(
            "comma separated: off, or a parent-based sample ratio (0..1) exporting over OTLP to an "
            "in-process collector; one fresh mesh per value, e.g. off,0.1,1 (default: off)"
        ),
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run every tracing mode this many times (modes interleaved) and report medians",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=0,
        help="execution service processes sharing the step consumer (SHOAL_EXECUTION_PROCESSES; "
        "default: the service's own default or the caller's environment)",
    )
    parser.add_argument("--keep-data", action="store_true", help="keep the meshes' data folders")
    args = parser.parse_args()
    modes: list[float | None] = args.tracing

    data = Path(tempfile.mkdtemp(prefix="shoal-bench-"))
    env = {"SHOAL_LOG_LEVEL": "WARNING"}
    if args.processes:
        env["SHOAL_EXECUTION_PROCESSES"] = str(args.processes)
    pg_dbs: list[str] = []
    admin = None
    if args.db == "postgres":
        admin = create_engine(
            args.postgres_url.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT"
        )
    results: list[dict[str, Any]] = []
    runs: dict[float | None, list[dict[str, Any]]] = {m: [] for m in modes}
    try:
        for i, mode in enumerate(modes * args.repeat):
            pg_url = ""
            if admin is not None:
                # Fresh databases per mesh, as the SQLite files are.
                with admin.connect() as conn:
                    for svc in ("segment", "template", "billing", "campaign", "execution", "raw"):
                        name = f"bench_{svc}_{uuid.uuid4().hex[:6]}"
                        conn.execute(text(f'CREATE DATABASE "{name}"'))
                        pg_dbs.append(name)
                        url = args.postgres_url.rsplit("/", 1)[0] + "/" + name
                        if svc == "raw":
                            pg_url = url
                        else:
                            env[f"SHOAL_{svc.upper()}_DATABASE_URL"] = url
            console.print(f"[bold]{mode_name(mode)}[/bold]: starting a fresh mesh")
            # The ceiling is measured on every mesh, just before its run: on a shared machine it
            # moves with the load as much as the run does, so each run has its own ratio.
            result = await measure(args, data / f"mesh-{i}", env, mode, with_ceiling=True, pg_url=pg_url)
            results.append(result)
            runs[mode].append(result)
    finally:
        if admin is not None:
            with admin.connect() as conn:
                for name in pg_dbs:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        if not args.keep_data:
            shutil.rmtree(data, ignore_errors=True)

    title = f"Shoal engine: {args.contacts:,} contacts, {args.flow}, {args.db}"
    first = runs[modes[0]]
    if len(results) > 1:
        console.print(runs_table(title, results, modes))
    # The detailed table is the median run (by contacts/s) of the first mode.
    result = sorted(first, key=lambda r: r["contacts_per_s"])[len(first) // 2]
    ceiling = result["ceiling"]
    median = f", median of {len(first)} runs" if len(first) > 1 else ""
    table = Table(title=f"{title}, tracing {mode_name(modes[0])}{median}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("load average (1/5/15 min) at launch -> at the end", result["load"])
    table.add_row("execution service processes", str(result["processes"].get("execution", 1)))
    table.add_row("raw ceiling (fetch -> UPDATE -> publish -> ack)", f"{ceiling:,.0f} msg/s")
    table.add_row("Shoal, launch to COMPLETED", f"{result['contacts_per_s']:,.0f} contacts/s")
    table.add_row("ratio to the ceiling", f"{result['contacts_per_s'] / ceiling:.2f}")
    table.add_row("run time", f"{result['seconds']:.1f} s")
    trailing = result.get("trailing_s")
    table.add_row(
        "receipts settled, COMPLETED -> mesh idle",
        f"{trailing:.1f} s" if trailing is not None else "still busy after 120 s",
    )
    table.add_row("completed", f"{result['completed']:,}")
    table.add_row("launch -> send p50 / p99", f"{result['latency'][0]:.2f} s / {result['latency'][1]:.2f} s")
    table.add_row("import (ImportContacts, 10k per call)", f"{result['import_per_s']:,.0f} contacts/s")
    for name, us in sorted(result["cpu_us"].items(), key=lambda kv: -kv[1]):
        table.add_row(f"CPU per contact: {name}", f"{us:,.0f} µs")
    table.add_row("CPU per contact: all processes", f"{sum(result['cpu_us'].values()):,.0f} µs")
    for name, mb in sorted(result["rss"].items()):
        table.add_row(f"peak RSS {name}", f"{mb:,.0f} MB")
    console.print(table)
    if len(runs) > 1 or modes[0] is not None:
        console.print(tracing_table(args, modes, runs))


if __name__ == "__main__":
    asyncio.run(main())
