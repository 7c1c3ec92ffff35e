"""Fixtures shared by every test suite: a private nats-server, a namespaced Bus, span capture.

`--nats-url nats://host:port` points the bus fixtures at an existing server instead of a private
one (tests that restart the server still start their own).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator

import nats.errors
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shoal import telemetry
from shoal.bus import STREAM_EVENTS, STREAM_EXEC, Bus
from shoal.natsserver import NatsServer

pytest_plugins = ["tests.fixtures_db", "tests.secrets_scan"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--nats-url", default="", help="use this NATS server instead of a private nats-server")


@pytest.fixture(scope="session")
def span_exporter() -> InMemorySpanExporter:
    """The process's one TracerProvider exports here (set once: OpenTelemetry refuses a second)."""
    exporter = InMemorySpanExporter()
    telemetry.init("tests", exporter=exporter, log_json=False)
    return exporter


@pytest.fixture
def spans(span_exporter: InMemorySpanExporter) -> InMemorySpanExporter:
    """The span exporter, emptied at the start of the test."""
    span_exporter.clear()
    return span_exporter


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A private nats-server with JetStream on a free port and a temporary store, per module."""
    server = NatsServer(store_dir=tmp_path_factory.mktemp("nats") / "store")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def nats_url(request: pytest.FixtureRequest) -> str:
    external = str(request.config.getoption("--nats-url"))
    if external:
        return external
    server: NatsServer = request.getfixturevalue("nats_server")
    return server.url


@pytest.fixture
async def bus(nats_url: str, request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    """A connected Bus in a namespace of its own, with EXEC and EVENTS ensured; deleted after."""
    namespace = f"t{uuid.uuid4().hex[:12]}"
    connected = await Bus.connect(nats_url, name=f"test:{request.node.name}", namespace=namespace)
    await connected.ensure_streams()
    yield connected
    if connected.nc.is_connected:
        for stream in (STREAM_EXEC, STREAM_EVENTS):
            with contextlib.suppress(nats.errors.Error):
                await connected.js.delete_stream(connected.stream_name(stream))
    await connected.close()
