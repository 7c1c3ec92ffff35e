"""Real processes the tests start: the sandbox carrier, services, a private PostgreSQL, and a
blocking bounded-poll helper."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def wait_until(check: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.02) -> T:
    """Blocking twin of `tests.helpers.wait_for`, for the synchronous module fixtures."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class SandboxProcess:
    """`python -m services.sandbox` on port 0, learning its port from the port file."""

    def __init__(self, data_dir: Path, **env: str) -> None:
        self.data_dir = data_dir
        self.port_file = data_dir / "sandbox.port"
        self.log_file = data_dir / "sandbox.log"
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> None:
        self.port_file.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
        env.update(
            SHOAL_SANDBOX_PORT="0",
            SHOAL_SANDBOX_PORT_FILE=str(self.port_file),
            SHOAL_SANDBOX_DATA_DIR=str(self.data_dir),
            SHOAL_SANDBOX_LOG_JSON="false",
            **self.env,
        )
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.sandbox"], cwd=REPO, env=env, stdout=log, stderr=log
            )

        def port() -> int | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"sandbox exited with {self.proc.returncode}:\n{self.logs()}")
            return int(self.port_file.read_text()) if self.port_file.exists() else None

        self.url = f"http://127.0.0.1:{wait_until(port, timeout=15, what='the port file')}"

        def healthy() -> bool:
            try:
                return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, timeout=15, what="/healthz")

    def logs(self) -> str:
        return self.log_file.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def get(self, path: str, **params: Any) -> Any:
        response = httpx.get(f"{self.url}{path}", params=params, timeout=5)
        response.raise_for_status()
        return response.json()

    def control(self, **switches: Any) -> dict[str, Any]:
        response = httpx.put(f"{self.url}/v1/control", json=switches, timeout=5)
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body


class ServiceProcess:
    """`python -m services.<name>` on port 0 (learned from SHOAL_PORT_FILE), killable and restartable."""

    def __init__(self, name: str, data_dir: Path, **env: str) -> None:
        self.name = name
        self.data_dir = data_dir
        self.port_file = data_dir / f"{name}.port"
        self.log_file = data_dir / f"{name}.log"
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = ""

    def start(self) -> None:
        self.spawn()
        self.wait_started()

    def spawn(self) -> None:
        """Launch the process without waiting (several can start at once; then `wait_started`)."""
        self.port_file.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
        # A restart keeps the address, as a restarted service behind a fixed address would.
        port = self.address.rsplit(":", 1)[1] if self.address else "0"
        env.update(
            {
                f"SHOAL_{self.name.upper()}_PORT": port,
                "SHOAL_PORT_FILE": str(self.port_file),
                "SHOAL_DATA_DIR": str(self.data_dir),
                "SHOAL_LOG_JSON": "false",
                **self.env,
            }
        )
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", f"services.{self.name}"], cwd=REPO, env=env, stdout=log, stderr=log
            )

    def wait_started(self, timeout: float = 30) -> None:
        """Block until the spawned process wrote its port file (it listens from then on)."""

        def port() -> int | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.logs()}")
            text = self.port_file.read_text() if self.port_file.exists() else ""
            return int(text) if text else None

        self.address = f"127.0.0.1:{wait_until(port, timeout=timeout, what=f'{self.name} port file')}"

    def logs(self) -> str:
        return self.log_file.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        """kill -9: no shutdown, no flush, whatever was in flight is left as it was."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def postgres_bin_dir() -> Path | None:
    """The newest PostgreSQL server binaries on this machine (initdb, pg_ctl), or None."""
    found = sorted(
        (d for d in Path("/usr/lib/postgresql").glob("*/bin") if (d / "initdb").exists()),
        key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0,
    )
    return found[-1] if found else None


class PostgresInstance:
    """A private PostgreSQL cluster (initdb in a temporary folder, its own free port) that a test
    may stop and start at will without disturbing the machine's shared server.

    initdb refuses to run as root, so as root every command runs as the `postgres` user (runuser)
    and the folder is handed to that user. `fsync=off` (speed) keeps commits safe across a
    server crash: the WAL is written to the OS before a commit returns, and the OS stays up.
    """

    def __init__(self, bin_dir: Path | None = None) -> None:
        found = bin_dir or postgres_bin_dir()
        if found is None:
            raise FileNotFoundError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
        self.bin_dir = found
        self.root = Path(tempfile.mkdtemp(prefix="shoal-pg-"))
        self.data = self.root / "data"
        self.log_file = self.root / "postgres.log"
        self.port = 0
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            self.as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.root, user="postgres")

    def _run(self, *args: str, timeout: float = 60) -> None:
        done = subprocess.run(
            [*self.as_user, str(self.bin_dir / args[0]), *args[1:]],
            cwd=self.root,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{args[0]} exited with {done.returncode}: {done.stderr.decode(errors='replace')[-2000:]}"
                f"\n{self.logs()}"
            )

    def logs(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no log)"

    def start(self) -> None:
        if not self.data.exists():
            self._run(
                "initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"
            )
        attempts = 1 if self.port else 5
        for attempt in range(attempts):
            port = self.port or free_port()
            options = (
                f"-p {port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
            )
            try:
                self._run(
                    "pg_ctl", "-D", str(self.data), "-l", str(self.log_file), "-o", options, "-w", "start"
                )
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
                continue  # the port was taken meanwhile: another one
            self.port = port
            return

    def stop(self, mode: str = "fast") -> None:
        """`fast` is a clean shutdown; `immediate` is a crash (recovery from the WAL on start)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self, mode: str = "immediate") -> None:
        self.stop(mode)
        self.start()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        from sqlalchemy import create_engine, text

        from shoal.db import normalise_url

        admin = create_engine(normalise_url(self.url()), isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            admin.dispose()
        return self.url(name)

    def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def free_port() -> int:
    """A port nobody listens on right now (for servers that cannot be told to pick their own)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
