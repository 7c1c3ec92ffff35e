"""The private nats-server: free ports, readiness, restart on the same port, failures."""

from __future__ import annotations

import socket
from pathlib import Path

import nats
import pytest

from shoal.natsserver import NatsServer, NatsServerError


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_port_zero_gives_each_server_a_free_port_and_restart_keeps_it(tmp_path: Path) -> None:
    with NatsServer(store_dir=tmp_path / "a") as a, NatsServer(store_dir=tmp_path / "b") as b:
        assert a.port != b.port
        assert a.url == f"nats://127.0.0.1:{a.port}"
        assert accepts(a.port)
        old_pid, port = a.pid, a.port
        a.restart()
        assert a.port == port
        assert a.pid != old_pid
        assert accepts(a.port)
    assert not a.running
    assert not accepts(port)
    assert (tmp_path / "nats-server-a.log").read_text().count("Server is ready") == 2


async def test_async_context_manager_serves_jetstream(tmp_path: Path) -> None:
    async with NatsServer(store_dir=tmp_path / "store", log_path=tmp_path / "logs" / "nats.log") as server:
        nc = await nats.connect(server.url)
        try:
            info = await nc.jetstream().account_info()
            assert info.limits is not None
        finally:
            await nc.close()
    assert not server.running
    assert (tmp_path / "logs" / "nats.log").exists()
    assert (tmp_path / "store" / "jetstream").is_dir()


def test_start_failure_reports_the_log(tmp_path: Path) -> None:
    with NatsServer(store_dir=tmp_path / "ok") as first:
        # The port is taken: the second server exits and start() says why.
        second = NatsServer(store_dir=tmp_path / "second", port=first.port, startup_timeout=5)
        with pytest.raises(NatsServerError, match="exited") as err:
            second.start()
        assert "address already in use" in str(err.value)
        assert not second.running


def test_port_before_start_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(NatsServerError, match="not been started"):
        _ = NatsServer(store_dir=tmp_path).port
