"""`python -m shoal.runner`: the whole mesh on one machine, what `make run` starts.

A private nats-server with JetStream (never the system one on 4222), then the sandbox carrier,
the five services and the gateway as child processes, in dependency order, each waited for until
it reports healthy (gRPC health SERVING, or `/healthz` for the HTTP ones) within one overall
budget. Then a table of what runs where, `<data-dir>/runner.json` for tools and tests, and one
`shoal: ready in N.Ns` line. Ctrl-C / SIGTERM stops the children in reverse order, then NATS.

Nothing may outlive the runner: every child runs in its own process group (so a terminal Ctrl-C
reaches only the runner, which then stops them in order, grandchildren included), asks the kernel
to SIGTERM it when the runner dies (`PR_SET_PDEATHSIG`, Linux), and an `atexit` hook kills what
is left if the runner leaves through an unexpected path. NATS is such a child too: `python -m
shoal.natsserver` (NatsServer's own entry point) runs nats-server inside the child's group, so a
Ctrl-C cannot stop NATS before the services have drained their connections.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import ctypes.util
import enum
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Annotated, Any, Literal

import httpx
import typer
from rich.console import Console
from rich.table import Table

from shoal.config import ConfigError, SharedSettings
from shoal.grpc import wait_healthy

HOST = "127.0.0.1"
# 4222 belongs to a system-wide NATS on many machines: the private one must never take it.
NATS_DEFAULT_PORT = 4322
RUNNER_FILE = "runner.json"
# The HMAC secret the sandbox signs its receipt callbacks with and the gateway checks them by.
CALLBACK_SECRET_FILE = "sandbox-callback.secret"  # noqa: S105  # a file name, not a secret
CALLBACK_PATH = "/v1/providers/sandbox/events"
LOG_TAIL_LINES = 40

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Component:
    """One child process of the mesh.

    `stage` orders start-up: every component of a stage is started together and must be healthy
    before the next stage starts; shutdown walks the stages backwards.
    """

    name: str
    module: str
    kind: Literal["grpc", "http", "nats"]
    default_port: int
    stage: int

    @property
    def env_prefix(self) -> str:
        return f"SHOAL_{self.name.upper()}_"


# The one table of what the mesh is made of. Execution resumes unfinished fan-outs at start-up,
# calling segment, template, billing and the sandbox, so those come first; campaign and execution
# only meet at run time (over NATS, or gRPC calls that retry), so they start together; the
# gateway is the door, opened last. Fewer stages is faster: a stage waits for its slowest member.
COMPONENTS: tuple[Component, ...] = (
    Component("sandbox", "services.sandbox", "http", 8025, 0),
    Component("segment", "services.segment", "grpc", 50051, 0),
    Component("template", "services.template", "grpc", 50052, 0),
    Component("billing", "services.billing", "grpc", 50053, 0),
    Component("execution", "services.execution", "grpc", 50055, 1),
    Component("campaign", "services.campaign", "grpc", 50054, 1),
    Component("gateway", "gateway", "http", 8080, 2),
)
COMPONENT_NAMES = tuple(c.name for c in COMPONENTS)
# Not in the table (always there, not selectable): started first, stopped last.
NATS = Component("nats", "shoal.natsserver", "nats", NATS_DEFAULT_PORT, -1)


class Ports(enum.StrEnum):
    AUTO = "auto"
    DEFAULT = "default"


class UsageError(Exception):
    """The command line or the machine state forbids starting (exit 2)."""


class StartError(Exception):
    """A child exited or did not become healthy in time (exit 1)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


@dataclass
class Child:
    component: Component
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes]
    log_offset: int
    started_at: float
    healthy_after: float | None = None

    @property
    def address(self) -> str:
        """`host:port` for gRPC components, the base URL for HTTP ones, the URL of NATS."""
        if self.component.kind == "grpc":
            return f"{HOST}:{self.port}"
        if self.component.kind == "nats":
            return f"nats://{HOST}:{self.port}"
        return f"http://{HOST}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class Plan:
    """Everything decided before the first process starts."""

    data_dir: Path
    components: list[Component]
    ports: dict[str, int]
    nats_port: int
    budget: float
    stop_timeout: float
    workspace_id: str
    reaped: list[int] = field(default_factory=list)
    # Shared by the sandbox (signs) and the gateway (verifies); kept in the data folder, 0600.
    callback_secret: str = ""
    # Created on a fresh key store and printed once in the table; never written anywhere.
    admin_key: str | None = None

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    def sandbox_url(self) -> str:
        return f"http://{HOST}:{self.ports['sandbox']}"

    def gateway_url(self) -> str:
        return f"http://{HOST}:{self.ports['gateway']}"

    def selected(self, name: str) -> bool:
        return any(c.name == name for c in self.components)

    def nats_url(self) -> str:
        return f"nats://{HOST}:{self.nats_port}"

    @property
    def nats_store(self) -> Path:
        return self.data_dir / "nats"


# ---- process hygiene -------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _parent_death_hook() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when the runner dies, or None elsewhere.

    libc is loaded here, in the parent: between fork and exec only async-signal-safe work is
    allowed, so the child just makes the one syscall.
    """
    if not sys.platform.startswith("linux"):
        return None
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return None
    prctl = ctypes.CDLL(libc_name, use_errno=True).prctl
    runner_pid = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        # The runner may have died between fork and prctl; then no signal would ever come.
        if os.getppid() != runner_pid:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def _signal_group(pid: int, sig: signal.Signals) -> None:
    # Children lead their own group; signalling the group also reaches anything they spawned.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR so a port in TIME_WAIT from the previous run does not count as busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    """`count` distinct ports the OS calls free right now.

    All sockets stay open until every port is picked, so the OS cannot hand one out twice.
    """
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((HOST, 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _log_tail(path: Path, offset: int, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines this run wrote to `path` (earlier runs' lines are above `offset`)."""
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else "(log is empty)"


def _pid_is_runner(pid: int) -> bool:
    """Whether `pid` is a live runner (the cmdline check guards against a recycled pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        with contextlib.suppress(OSError):
            return b"shoal.runner" in cmdline.read_bytes()
    return True


# ---- planning --------------------------------------------------------------------------------


def select_components(only: str | None) -> list[Component]:
    if not only:
        return list(COMPONENTS)
    wanted = [n.strip() for n in only.split(",") if n.strip()]
    unknown = sorted(set(wanted) - set(COMPONENT_NAMES))
    if unknown:
        raise UsageError(
            f"--only: unknown component(s) {', '.join(unknown)}; known: {', '.join(COMPONENT_NAMES)}"
        )
    return [c for c in COMPONENTS if c.name in wanted]


def check_modules(components: Sequence[Component]) -> None:
    missing = [c.module for c in components if importlib.util.find_spec(f"{c.module}.__main__") is None]
    if missing:
        raise UsageError(
            f"not runnable yet (no __main__ module): {', '.join(missing)}; "
            "start the others with --only <names>"
        )


def _cmdline(pid: int) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None


def reap_leftovers(info: dict[str, Any]) -> list[int]:
    """Kill what a crashed runner (recorded in `info`, its runner.json) left running.

    Children die with the runner through PDEATHSIG; this is for the rest (a child that ignored
    it, a platform without it), which would hold ports and the JetStream store. A pid is only
    killed when its command line still says it is the recorded process, so a recycled pid is
    left alone; its whole group goes with it (nats-server lives in its wrapper's group).
    """
    expected: list[tuple[int, bytes]] = []
    for comp in dict(info.get("components") or {}).values():
        expected.append((int(comp["pid"]), f"-m\0{comp['module']}\0".encode()))
    nats = dict(info.get("nats") or {})
    if nats.get("pid"):
        expected.append((int(nats["pid"]), str(nats.get("store_dir", "nats-server")).encode()))
    killed = []
    for pid, marker in expected:
        cmdline = _cmdline(pid)
        if cmdline is not None and marker in cmdline:
            _signal_group(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    deadline = time.monotonic() + 5.0
    # Bounded poll: the port and the store lock are free only once the processes are gone.
    while any(_cmdline(pid) for pid in killed) and time.monotonic() < deadline:
        time.sleep(0.05)
    return killed


def check_data_dir(data_dir: Path, *, fresh: bool) -> list[int]:
    """Refuse to share a data folder with a live runner, or to wipe a folder that is not ours.

    Returns the pids of processes a crashed runner left behind that were killed.
    """
    killed: list[int] = []
    runner_file = data_dir / RUNNER_FILE
    if runner_file.exists():
        try:
            info = dict(json.loads(runner_file.read_text()))
            pid = int(info["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            info, pid = {}, 0
        if pid and pid != os.getpid() and _pid_is_runner(pid):
            raise UsageError(f"another runner (pid {pid}) is using {data_dir}; stop it first")
        if info:
            killed = reap_leftovers(info)
        runner_file.unlink(missing_ok=True)
    if not fresh or not data_dir.exists():
        return killed
    cwd = Path.cwd().resolve()
    if (
        data_dir in (Path(data_dir.anchor), Path.home().resolve())
        or data_dir in cwd.parents
        or data_dir == cwd
    ):
        raise UsageError(f"--fresh refuses to wipe {data_dir}: it holds the working directory or more")
    ours = any((data_dir / marker).exists() for marker in ("nats", "logs", RUNNER_FILE))
    if any(data_dir.iterdir()) and not ours:
        raise UsageError(f"--fresh refuses to wipe {data_dir}: it does not look like a Shoal data folder")
    return killed


def make_plan(
    *,
    data_dir: Path,
    ports: Ports,
    only: str | None,
    budget: float,
    stop_timeout: float,
    fresh: bool,
) -> Plan:
    components = select_components(only)
    check_modules(components)
    data_dir = data_dir.expanduser().resolve()
    reaped = check_data_dir(data_dir, fresh=fresh)
    try:
        workspace_id = SharedSettings.load().workspace_id
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if ports is Ports.AUTO:
        # Every component gets a port, selected or not, so peer addresses are always complete.
        picked = _free_ports(len(COMPONENTS) + 1)
        port_of = {c.name: picked[i] for i, c in enumerate(COMPONENTS)}
        nats_port = picked[-1]
    else:
        port_of = {c.name: c.default_port for c in COMPONENTS}
        nats_port = NATS_DEFAULT_PORT
        wanted = [(c.name, port_of[c.name]) for c in components] + [("nats", nats_port)]
        busy = [f"{port} ({name})" for name, port in wanted if not _port_is_free(port)]
        if busy:
            raise UsageError(
                f"port(s) already in use: {', '.join(busy)}; stop what holds them or run with --ports auto"
            )
    return Plan(
        data_dir=data_dir,
        components=components,
        ports=port_of,
        nats_port=nats_port,
        budget=budget,
        stop_timeout=stop_timeout,
        workspace_id=workspace_id,
        reaped=reaped,
    )


def callback_secret(data_dir: Path) -> str:
    """The data folder's callback secret, made (random, 256 bits, mode 0600) on first use."""
    path = data_dir / CALLBACK_SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        # Whatever made it, only the owner may read it from here on.
        path.chmod(0o600)
        return path.read_text().strip()
    secret = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret + "\n")
    return secret


def child_argv(plan: Plan, component: Component) -> list[str]:
    argv = [sys.executable, "-m", component.module]
    if component.kind == "nats":
        argv += ["--host", HOST, "--port", str(plan.nats_port), "--store", str(plan.nats_store)]
        argv += ["--log", str(plan.log_dir / "nats-server.log")]
    return argv


def child_env(plan: Plan, component: Component) -> dict[str, str]:
    """The environment of one child: the caller's, plus where everything is."""
    env = dict(os.environ)
    # Log lines must reach the log file as they happen, not when a buffer fills.
    env["PYTHONUNBUFFERED"] = "1"
    if component.kind == "nats":
        return env
    shared = {
        "NATS_URL": plan.nats_url(),
        "DATA_DIR": str(plan.data_dir),
        "SANDBOX_URL": plan.sandbox_url(),
        **{f"{c.name.upper()}_ADDR": f"{HOST}:{plan.ports[c.name]}" for c in COMPONENTS if c.kind == "grpc"},
    }
    for key, value in shared.items():
        env[f"SHOAL_{key}"] = value
        # A service reads its own prefix (SHOAL_BILLING_NATS_URL) before the shared name; set
        # both, so a stray variable in the caller's shell cannot point one child elsewhere
        # (say, at the system NATS on 4222) while the runner believes it knows where it is.
        env[f"{component.env_prefix}{key}"] = value
    env[f"{component.env_prefix}HOST"] = HOST
    env[f"{component.env_prefix}PORT"] = str(plan.ports[component.name])
    if plan.callback_secret and plan.selected("gateway"):
        # Receipts go to the gateway only when it runs; a lone sandbox keeps them to itself.
        if component.name == "sandbox":
            env["SHOAL_SANDBOX_CALLBACK_URL"] = plan.gateway_url() + CALLBACK_PATH
            env["SHOAL_SANDBOX_CALLBACK_SECRET"] = plan.callback_secret
        elif component.name == "gateway":
            env["SHOAL_GATEWAY_SANDBOX_CALLBACK_SECRET"] = plan.callback_secret
    return env


# ---- the runner ------------------------------------------------------------------------------


@dataclass
class Runner:
    plan: Plan
    console: Console
    errors: Console
    children: list[Child] = field(default_factory=list)
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    forced: asyncio.Event = field(default_factory=asyncio.Event)
    _logs: list[IO[bytes]] = field(default_factory=list)

    def request_stop(self, signum: signal.Signals) -> None:
        if self.stop_requested.is_set():
            # A second Ctrl-C means "now": skip the graceful wait.
            self.forced.set()
            self.errors.print(f"shoal: {signum.name} again, killing what is left")
        else:
            self.errors.print(f"shoal: {signum.name} received, stopping")
        self.stop_requested.set()

    # -- start

    def port_of(self, component: Component) -> int:
        return self.plan.nats_port if component.kind == "nats" else self.plan.ports[component.name]

    def spawn(self, component: Component, preexec: Callable[[], None] | None) -> Child:
        log_path = self.plan.log_dir / f"{component.name}.log"
        log = log_path.open("ab")
        self._logs.append(log)
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        log.write(f"\n===== shoal.runner started {component.module} at {stamp} =====\n".encode())
        log.flush()
        offset = log.tell()
        # preexec_fn is unsafe only with other Python threads forking concurrently: the runner
        # spawns from its loop thread alone, and the hook is one syscall.
        proc = subprocess.Popen(
            child_argv(self.plan, component),
            env=child_env(self.plan, component),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec,  # noqa: PLW1509
        )
        child = Child(component, self.port_of(component), log_path, proc, offset, time.monotonic())
        self.children.append(child)
        return child

    async def _probe(self, child: Child, within: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        if child.component.kind == "nats":
            # What NatsServer itself waits for: the client port accepts connections.
            while True:
                with contextlib.suppress(OSError, TimeoutError):
                    _, writer = await asyncio.wait_for(asyncio.open_connection(HOST, child.port), timeout=1.0)
                    writer.close()
                    await writer.wait_closed()
                    return
                if loop.time() >= deadline:
                    raise StartError("nats", f"not accepting connections within {self.plan.budget:.0f}s")
                await asyncio.sleep(0.05)
        if child.component.kind == "grpc":
            try:
                await wait_healthy(child.address, within=within)
            except TimeoutError:
                raise StartError(
                    child.component.name, f"not SERVING within {self.plan.budget:.0f}s"
                ) from None
            return
        async with httpx.AsyncClient(timeout=1.0) as client:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    reply = await client.get(f"{child.address}/healthz")
                    if reply.status_code == 200:
                        return
                if loop.time() >= deadline:
                    raise StartError(child.component.name, f"/healthz not 200 within {self.plan.budget:.0f}s")
                await asyncio.sleep(0.1)

    async def wait_ready(self, child: Child, deadline: float) -> None:
        """Until healthy; fails as soon as the process exits instead of waiting out the budget."""
        loop = asyncio.get_running_loop()
        probe = asyncio.create_task(self._probe(child, max(deadline - loop.time(), 0.1)))
        try:
            while True:
                done, _ = await asyncio.wait({probe}, timeout=0.1)
                if done:
                    probe.result()
                    child.healthy_after = time.monotonic() - child.started_at
                    return
                if not child.alive:
                    raise StartError(
                        child.component.name, f"exited with status {child.proc.returncode} during start-up"
                    )
        finally:
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError, StartError, TimeoutError):
                await probe

    async def bootstrap_keys(self, within: float) -> None:
        """An admin key when the gateway's key store is new (`python -m gateway.keys bootstrap`).

        A child process, beside the first stages: it pays for its imports and the migration
        while the services start, and the key reaches the runner through a pipe only.
        """
        gateway = next(c for c in self.plan.components if c.name == "gateway")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.keys",
            "bootstrap",
            "--workspace",
            self.plan.workspace_id,
            env=child_env(self.plan, gateway),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout=max(within, 0.1))
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise StartError("gateway", "the API key store did not open in time") from None
        if proc.returncode != 0:
            tail = err.decode(errors="replace").strip().splitlines()[-5:]
            raise StartError("gateway", "the API key store failed: " + " | ".join(tail))
        self.plan.admin_key = json.loads(out or b"{}").get("key")

    async def start_all(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.plan.budget
        self.plan.log_dir.mkdir(parents=True, exist_ok=True)
        preexec = _parent_death_hook()
        everything = [NATS, *self.plan.components]
        gateway_stage = next((c.stage for c in self.plan.components if c.name == "gateway"), None)
        keys = None
        if gateway_stage is not None:
            keys = asyncio.create_task(self.bootstrap_keys(deadline - loop.time()))
        try:
            await self._start_stages(everything, deadline, preexec, gateway_stage, keys)
        finally:
            if keys is not None and not keys.done():
                keys.cancel()
                with contextlib.suppress(asyncio.CancelledError, StartError):
                    await keys

    async def _start_stages(
        self,
        everything: list[Component],
        deadline: float,
        preexec: Callable[[], None] | None,
        gateway_stage: int | None,
        keys: asyncio.Task[None] | None,
    ) -> None:
        for stage in sorted({c.stage for c in everything}):
            if stage == gateway_stage and keys is not None:
                await keys
            batch = [self.spawn(c, preexec) for c in everything if c.stage == stage]
            waits = [asyncio.create_task(self.wait_ready(child, deadline)) for child in batch]
            done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_EXCEPTION)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for task in done:
                task.result()
            for child in batch:
                kind = {"grpc": "SERVING", "http": "healthy", "nats": "with JetStream"}[child.component.kind]
                took = child.healthy_after or 0.0
                self.console.print(f"shoal: {child.component.name} {kind} on {child.address} ({took:.1f}s)")

    # -- stop

    async def _wait_exit(self, children: Sequence[Child], within: float) -> None:
        """Until every child exited, `within` passed, or a second signal asked for force."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while any(c.alive for c in children) and loop.time() < deadline and not self.forced.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.forced.wait(), timeout=0.05)

    async def stop_all(self) -> None:
        """Reverse stage order: SIGTERM, bounded wait, SIGKILL; then NATS."""
        for stage in sorted({c.component.stage for c in self.children}, reverse=True):
            group = [c for c in self.children if c.component.stage == stage]
            began = time.monotonic()
            for child in group:
                if child.alive:
                    _signal_group(child.proc.pid, signal.SIGTERM)
            await self._wait_exit(group, self.plan.stop_timeout)
            names = ", ".join(c.component.name for c in group)
            self.console.print(f"shoal: stopped {names} ({time.monotonic() - began:.1f}s)")
            for child in group:
                if child.alive:
                    waited = self.plan.stop_timeout
                    self.errors.print(
                        f"shoal: {child.component.name} still running after {waited:.0f}s, killing it"
                    )
                # Also for those that exited: whatever they spawned must not outlive them.
                _signal_group(child.proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.proc.wait(timeout=5)
                if child.proc.returncode not in (0, None):
                    # A clean SIGTERM shutdown exits 0; anything else deserves a look at the log.
                    self.errors.print(
                        f"shoal: {child.component.name} exited with status {child.proc.returncode}"
                        f" (log: {child.log_path})"
                    )
        for log in self._logs:
            log.close()
        self._logs.clear()
        with contextlib.suppress(FileNotFoundError):
            (self.plan.data_dir / RUNNER_FILE).unlink()

    def emergency_stop(self) -> None:
        """atexit: kill without waiting whatever an unexpected exit path left running."""
        for child in self.children:
            if child.alive:
                _signal_group(child.proc.pid, signal.SIGKILL)

    # -- report

    def describe(self) -> dict[str, Any]:
        """The content of runner.json: where everything is, and the pids to watch."""
        by_name = {c.component.name: c for c in self.children}
        nats = by_name.get("nats")
        urls: dict[str, str] = {}
        if "gateway" in by_name:
            base = by_name["gateway"].address
            urls = {
                "api": f"{base}/v1",
                "docs": f"{base}/docs",
                "openapi": f"{base}/openapi.json",
                "dashboard": f"{base}/dashboard",
            }
        return {
            "pid": os.getpid(),
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "workspace_id": self.plan.workspace_id,
            "data_dir": str(self.plan.data_dir),
            "log_dir": str(self.plan.log_dir),
            "nats": {
                "url": self.plan.nats_url(),
                "pid": nats.proc.pid if nats else None,
                "store_dir": str(self.plan.nats_store),
                "log": str(self.plan.log_dir / "nats-server.log"),
            },
            "urls": urls,
            "components": {
                c.component.name: {
                    "kind": c.component.kind,
                    "module": c.component.module,
                    "address": c.address,
                    "port": c.port,
                    "pid": c.proc.pid,
                    "log": str(c.log_path),
                }
                for c in self.children
                if c.component.kind != "nats"
            },
        }

    def write_runner_file(self) -> None:
        target = self.plan.data_dir / RUNNER_FILE
        tmp = target.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.describe(), indent=2) + "\n")
        # Rename so a reader never sees half a file.
        tmp.replace(target)

    def print_table(self) -> None:
        info = self.describe()
        table = Table(title="Shoal is running", show_header=False, title_justify="left")
        table.add_column("what", style="bold")
        table.add_column("where")
        if info["urls"]:
            table.add_row("REST API", info["urls"]["api"])
            table.add_row("API docs", info["urls"]["docs"])
            table.add_row("Dashboard", info["urls"]["dashboard"])
        for name, comp in info["components"].items():
            if comp["kind"] == "grpc":
                table.add_row(f"{name} (gRPC)", comp["address"])
        if "sandbox" in info["components"]:
            table.add_row("sandbox carrier", info["components"]["sandbox"]["address"])
        table.add_row("NATS", str(info["nats"]["url"]))
        table.add_row("Workspace", self.plan.workspace_id)
        if self.plan.admin_key:
            # The key itself goes on a line of its own below: a table cell would cut or fold it.
            table.add_row("Admin API key", "new, printed below (shown once: store it now)")
        elif self.plan.selected("gateway"):
            table.add_row("API keys", "python -m gateway.keys create --help")
        table.add_row("Data", info["data_dir"])
        table.add_row("Logs", info["log_dir"])
        self.console.print(table)
        if self.plan.admin_key:
            self.console.print(
                f"shoal: admin API key of {self.plan.workspace_id}: {self.plan.admin_key}",
                markup=False,
                highlight=False,
            )

    def report_failure(self, exc: StartError) -> None:
        self.errors.print(f"shoal: {exc.name} failed to start: {exc.reason}")
        for child in self.children:
            if child.component.name == exc.name:
                self.errors.print(f"--- last lines of {child.log_path} ---", markup=False)
                self.errors.print(_log_tail(child.log_path, child.log_offset), markup=False, highlight=False)
                self.errors.print("---", markup=False)

    def crashed(self) -> Child | None:
        return next((c for c in self.children if not c.alive), None)

    # -- the whole life

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(signum, self.request_stop, signum)
        began = time.monotonic()
        try:
            starting = asyncio.create_task(self.start_all())
            stopping = asyncio.create_task(self.stop_requested.wait())
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError, StartError):
                    await starting
                return EXIT_INTERRUPTED
            stopping.cancel()
            try:
                starting.result()
            except StartError as exc:
                self.report_failure(exc)
                return EXIT_FAILED
            self.write_runner_file()
            self.print_table()
            self.console.print(f"shoal: ready in {time.monotonic() - began:.1f}s (Ctrl-C stops everything)")
            # Bounded polling: a crashed child or NATS ends the run instead of leaving half a mesh.
            while not self.stop_requested.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop_requested.wait(), timeout=0.5)
                crashed = self.crashed()
                if crashed is not None:
                    self.report_failure(
                        StartError(crashed.component.name, f"exited with status {crashed.proc.returncode}")
                    )
                    return EXIT_FAILED
            return EXIT_OK
        finally:
            await self.stop_all()
            self.console.print("shoal: stopped")


def run(
    *,
    data_dir: Path,
    ports: Ports,
    fresh: bool,
    only: str | None,
    budget: float,
    stop_timeout: float,
) -> int:
    # soft_wrap: a message stays one line however narrow the terminal (or pipe) is, so it can be grepped.
    console = Console(highlight=False, soft_wrap=True)
    errors = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        plan = make_plan(
            data_dir=data_dir, ports=ports, only=only, budget=budget, stop_timeout=stop_timeout, fresh=fresh
        )
    except UsageError as exc:
        errors.print(f"shoal: {exc}", markup=False)
        return EXIT_USAGE
    if plan.reaped:
        pids = ", ".join(str(p) for p in plan.reaped)
        errors.print(f"shoal: killed process(es) {pids} left behind by a runner that crashed")
    if fresh and plan.data_dir.exists():
        shutil.rmtree(plan.data_dir)
        console.print(f"shoal: wiped {plan.data_dir}")
    plan.data_dir.mkdir(parents=True, exist_ok=True)
    if plan.selected("gateway"):
        plan.callback_secret = callback_secret(plan.data_dir)

    async def main() -> int:
        runner = Runner(plan=plan, console=console, errors=errors)
        atexit.register(runner.emergency_stop)
        try:
            return await runner.run()
        finally:
            atexit.unregister(runner.emergency_stop)

    return asyncio.run(main())


app = typer.Typer(
    add_completion=False, help="Run the whole Shoal mesh on this machine (what `make run` does)."
)


@app.command()
def cli(
    *,
    fresh: Annotated[bool, typer.Option("--fresh", help="Wipe the data folder first.")] = False,
    data_dir: Annotated[Path, typer.Option("--data-dir", help="Databases, JetStream store, logs.")] = Path(
        ".data"
    ),
    ports: Annotated[
        Ports, typer.Option("--ports", help="default: fixed ports (gateway 8080, ...); auto: free ports.")
    ] = Ports.DEFAULT,
    only: Annotated[
        str | None,
        typer.Option("--only", help=f"Comma-separated subset of: {', '.join(COMPONENT_NAMES)}."),
    ] = None,
    budget: Annotated[
        float, typer.Option("--timeout", min=1.0, help="Seconds for everything to become healthy.")
    ] = 30.0,
    stop_timeout: Annotated[
        float, typer.Option("--stop-timeout", min=0.1, help="Seconds each stage gets to stop before SIGKILL.")
    ] = 10.0,
) -> None:
    """Start NATS, the sandbox, the five services and the gateway; Ctrl-C stops them all."""
    code = run(
        data_dir=data_dir, ports=ports, fresh=fresh, only=only, budget=budget, stop_timeout=stop_timeout
    )
    raise typer.Exit(code)


if __name__ == "__main__":
    app()
