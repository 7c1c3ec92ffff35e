"""`python -m shoal.runner` as a real process: everything healthy in time, Ctrl-C leaves nothing.

The runner is started in a session of its own, so "Ctrl-C" is what a terminal does: SIGINT to
its process group. Its children must already be in groups of their own and be stopped by the
runner, in order. Components are taken from the runner's own table; while some services are still
being written, the mesh test runs what exists and `test_every_component_is_runnable` says what
is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import nats
import pytest

from shoal.grpc import wait_healthy
from shoal.runner import COMPONENTS, RUNNER_FILE
from shoal.v1 import campaign_pb2, campaign_pb2_grpc
from tests.helpers import wait_for

READY = re.compile(r"shoal: ready in (\d+(?:\.\d+)?)s")
RUNNABLE = [c.name for c in COMPONENTS if importlib.util.find_spec(f"{c.module}.__main__") is not None]
# What the brief promises: every service SERVING within 30 s.
HEALTH_BUDGET = 30.0


@dataclass
class Runner:
    proc: asyncio.subprocess.Process
    data_dir: Path
    output: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "".join(self.output)

    async def read_until(self, pattern: re.Pattern[str], within: float) -> re.Match[str]:
        """Lines until one matches; fails on EOF (the runner exited) or after `within` seconds."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + within
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {pattern.pattern!r} within {within}s; output:\n{self.text()}")
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), timeout=remaining)
            except TimeoutError:
                continue
            if not line:
                await self.proc.wait()
                code = self.proc.returncode
                raise AssertionError(
                    f"runner exited ({code}) before {pattern.pattern!r}; output:\n{self.text()}"
                )
            self.output.append(line.decode(errors="replace"))
            match = pattern.search(self.output[-1])
            if match:
                return match

    async def finish(self, within: float) -> int:
        """Exit code, once the runner exits (bounded); the rest of its output is kept."""
        assert self.proc.stdout is not None
        rest = await asyncio.wait_for(self.proc.stdout.read(), timeout=within)
        self.output.append(rest.decode(errors="replace"))
        return await asyncio.wait_for(self.proc.wait(), timeout=within)

    def info(self) -> dict[str, object]:
        return dict(json.loads((self.data_dir / RUNNER_FILE).read_text()))


@contextlib.asynccontextmanager
async def runner(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> AsyncIterator[Runner]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shoal.runner",
        "--ports",
        "auto",
        "--data-dir",
        str(data_dir),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **(env or {}), "COLUMNS": "200"},
    )
    handle = Runner(proc, data_dir)
    try:
        yield handle
    finally:
        if proc.returncode is None:
            # The test failed half-way: do not leave a mesh running behind it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        for pid in processes_using(data_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """Running, and not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def descendants(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = {root}
    while frontier:
        children = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= children
        frontier = children
    return found


def processes_using(data_dir: Path) -> set[int]:
    """Live processes started for this data folder: by their environment or their command line."""
    needle_env = f"SHOAL_DATA_DIR={data_dir}".encode()
    needle_cmd = str(data_dir).encode()
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes()
            if (needle_env in environ or needle_cmd in cmdline) and alive(int(entry.name)):
                found.add(int(entry.name))
    return found


async def assert_gone(pids: set[int], within: float, output: str = "") -> None:
    await wait_for(
        lambda: not {p for p in pids if alive(p)},
        timeout=within,
        message=lambda: f"still alive: {sorted(p for p in pids if alive(p))}; runner output:\n{output}",
    )


def assert_logs_in(data_dir: Path, components: dict[str, dict[str, object]]) -> None:
    for comp in components.values():
        log = Path(str(comp["log"]))
        assert log.parent == data_dir / "logs" and log.exists()


ADMIN_KEY = re.compile(r"admin API key of \S+: (shoal_\S+)")


async def assert_status_crosses_gateway_and_campaign(
    components: dict[str, dict[str, object]], output: str, data_dir: Path
) -> None:
    """A campaign made over gRPC is read back through the REST gateway, both real processes,
    with the admin key the runner printed once (and stored nowhere in plain text)."""
    found = ADMIN_KEY.search(output)
    assert found, output
    key = found.group(1)
    assert key not in (data_dir / RUNNER_FILE).read_text()
    assert (data_dir / "sandbox-callback.secret").stat().st_mode & 0o777 == 0o600
    async with grpc.aio.insecure_channel(str(components["campaign"]["address"])) as channel:
        created = await campaign_pb2_grpc.CampaignServiceStub(channel).CreateCampaign(
            campaign_pb2.CreateCampaignRequest(
                workspace_id="ws_default",
                name="runner smoke",
                segment_id="seg_smoke",
                trigger=campaign_pb2.Trigger(manual=campaign_pb2.ManualTrigger()),
            ),
            timeout=5,
        )
    campaign_id = created.campaign.id
    async with httpx.AsyncClient(base_url=str(components["gateway"]["address"]), timeout=5) as client:
        assert (await client.get(f"/v1/campaigns/{campaign_id}/status")).status_code == 401
        reply = await client.get(
            f"/v1/campaigns/{campaign_id}/status", headers={"Authorization": f"Bearer {key}"}
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["id"] == campaign_id
        assert reply.json()["state"] == "DRAFT"
        assert (await client.get("/readyz")).status_code == 200
        # A wrong key and a bad callback signature are refused and logged without the secrets.
        assert (
            await client.get("/v1/campaigns/x/status", headers={"Authorization": f"Bearer {key}x"})
        ).status_code == 401
        assert (
            await client.post(
                "/v1/providers/sandbox/events", content=b"{}", headers={"X-Sandbox-Signature": "sha256=00"}
            )
        ).status_code == 401
    secret = (data_dir / "sandbox-callback.secret").read_text().strip()
    assert secret
    for log in (data_dir / "logs").glob("*.log"):
        text = log.read_text(errors="replace")
        assert key not in text and key.rsplit("_", 1)[-1] not in text, f"the admin key leaked into {log.name}"
        assert secret not in text, f"the callback secret leaked into {log.name}"


async def test_mesh_is_healthy_within_budget_and_ctrl_c_leaves_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    async with runner(data_dir, "--only", ",".join(RUNNABLE)) as mesh:
        ready = await mesh.read_until(READY, within=HEALTH_BUDGET + 15)
        assert float(ready.group(1)) < HEALTH_BUDGET, mesh.text()

        info = mesh.info()
        components = dict(info["components"])  # type: ignore[call-overload]
        assert sorted(components) == sorted(RUNNABLE)
        assert info["workspace_id"] == "ws_default"
        for name, comp in components.items():
            if comp["kind"] == "grpc":
                await wait_healthy(comp["address"], within=2.0)  # raises unless SERVING
            else:
                async with httpx.AsyncClient(timeout=2.0) as client:
                    reply = await client.get(f"{comp['address']}/healthz")
                    assert reply.status_code == 200, (name, reply.text)
        nats_info = dict(info["nats"])  # type: ignore[call-overload]
        assert not str(nats_info["url"]).endswith(":4222")  # never the system NATS
        nc = await nats.connect(str(nats_info["url"]), connect_timeout=2, max_reconnect_attempts=0)
        assert (await nc.jetstream().account_info()) is not None  # JetStream is on
        await nc.close()
        assert_logs_in(data_dir, components)

        if {"campaign", "gateway"} <= set(components):
            await assert_status_crosses_gateway_and_campaign(components, mesh.text(), data_dir)

        tree = descendants(mesh.proc.pid)
        recorded = {int(c["pid"]) for c in components.values()} | {int(nats_info["pid"])}
        assert recorded <= tree, (recorded, tree)
        started = time.monotonic()
        os.killpg(mesh.proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        code = await mesh.finish(within=30)
        assert code == 0, mesh.text()
        assert time.monotonic() - started < 30
        assert "shoal: stopped" in mesh.text()
        await assert_gone(tree, within=2.0, output=mesh.text())
        assert processes_using(data_dir) == set()
        assert not (data_dir / RUNNER_FILE).exists()


def test_every_component_is_runnable() -> None:
    # Fails (naming them) while a service of the table has no `python -m` entry point yet.
    missing = [c.module for c in COMPONENTS if c.name not in RUNNABLE]
    assert missing == [], f"not runnable yet: {missing}"


@pytest.mark.skipif("sandbox" not in RUNNABLE, reason="needs services.sandbox")
async def test_fresh_wipes_the_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    (data_dir / "logs").mkdir(parents=True)
    (data_dir / "logs" / "old.log").write_text("from an earlier run\n")
    (data_dir / "sandbox.db").write_text("not a database: --fresh must remove it\n")
    async with runner(data_dir, "--fresh", "--only", "sandbox") as mesh:
        await mesh.read_until(READY, within=HEALTH_BUDGET + 15)
        assert f"wiped {data_dir}" in mesh.text()
        assert not (data_dir / "logs" / "old.log").exists()
        # The sandbox came up on a new database in place of the junk file.
        assert "not a database" not in (data_dir / "sandbox.db").read_bytes().decode(errors="replace")
        os.killpg(mesh.proc.pid, signal.SIGINT)
        assert await mesh.finish(within=30) == 0, mesh.text()


async def test_fresh_refuses_a_folder_that_is_not_a_data_dir(tmp_path: Path) -> None:
    (tmp_path / "thesis.tex").write_text("years of work\n")
    async with runner(tmp_path, "--fresh", "--only", RUNNABLE[0]) as mesh:
        assert await mesh.finish(within=30) == 2, mesh.text()
        assert "does not look like a Shoal data folder" in mesh.text()
    assert (tmp_path / "thesis.tex").read_text() == "years of work\n"


@pytest.mark.skipif("sandbox" not in RUNNABLE, reason="needs services.sandbox")
async def test_a_child_failing_at_start_stops_everything(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    # A setting the sandbox refuses at start-up: it exits at once with a config error.
    async with runner(data_dir, "--only", "sandbox", env={"SHOAL_SANDBOX_LOG_LEVEL": "LOUD"}) as mesh:
        code = await mesh.finish(within=HEALTH_BUDGET + 15)
        assert code == 1, mesh.text()
        assert "sandbox failed to start" in mesh.text()
        assert "SHOAL_SANDBOX_LOG_LEVEL" in mesh.text()  # the tail of its log, printed
        await assert_gone(processes_using(data_dir), within=2.0, output=mesh.text())


@pytest.mark.skipif("sandbox" not in RUNNABLE, reason="needs services.sandbox")
async def test_a_killed_runner_takes_its_children_along_and_the_next_start_reaps_the_rest(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    async with runner(data_dir, "--only", "sandbox") as first:
        await first.read_until(READY, within=HEALTH_BUDGET + 15)
        info = first.info()
        child = int(dict(info["components"])["sandbox"]["pid"])  # type: ignore[call-overload]
        everything = descendants(first.proc.pid)
        assert child in everything and len(everything) >= 3  # the sandbox, the NATS wrapper, nats-server
        # A stopped child cannot act on the kernel's SIGTERM: it stands for anything left behind.
        os.kill(child, signal.SIGSTOP)
        os.kill(first.proc.pid, signal.SIGKILL)  # no finally, no atexit: only the kernel can help
        await first.proc.wait()
        # PR_SET_PDEATHSIG: every child gets SIGTERM when the runner dies (NATS stops nats-server).
        await assert_gone(everything - {child}, within=10.0, output=first.text())
        assert alive(child)

        # The next start on the same data folder finds what is left and stops it.
        async with runner(data_dir, "--only", "sandbox") as second:
            await second.read_until(READY, within=HEALTH_BUDGET + 15)
            assert f"killed process(es) {child} left behind by a runner that crashed" in second.text()
            await assert_gone({child}, within=1.0, output=second.text())
            os.killpg(second.proc.pid, signal.SIGINT)
            assert await second.finish(within=30) == 0, second.text()
        assert processes_using(data_dir) == set()
