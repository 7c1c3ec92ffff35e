"""Real processes the tests start: the sandbox carrier, and a blocking bounded-poll helper."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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

        def port() -> int | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.logs()}")
            text = self.port_file.read_text() if self.port_file.exists() else ""
            return int(text) if text else None

        self.address = f"127.0.0.1:{wait_until(port, timeout=30, what=f'{self.name} port file')}"

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
