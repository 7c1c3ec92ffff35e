"""The metrics kit without servers: registries, names, labels, the helpers' checks, the lag poller
and the HTTP middleware."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry
from pydantic_settings import SettingsConfigDict

from shoal import metrics
from shoal.config import ConfigError, ServiceSettings
from shoal.flow import NODE_TYPES


def scrape(m: metrics.Metrics) -> dict[str, Any]:
    """Metric families by name, from the registry's exposition text."""
    from prometheus_client import generate_latest

    return {f.name: f for f in text_string_to_metric_families(generate_latest(m.registry).decode())}


def sample(m: metrics.Metrics, name: str, **labels: str) -> float | None:
    value = m.registry.get_sample_value(name, labels)
    return value


# Every metric the kit declares: its exposed family name, type and label names.
DECLARED = {
    "grpc_server_handled": ("counter", {"grpc_service", "grpc_method", "grpc_type", "grpc_code"}),
    "grpc_server_handling_seconds": ("histogram", {"grpc_service", "grpc_method", "grpc_type", "grpc_code"}),
    "http_server_requests": ("counter", {"method", "route", "status"}),
    "http_server_request_duration_seconds": ("histogram", {"method", "route", "status"}),
    "shoal_executions_by_state": ("gauge", {"state"}),
    "shoal_node_seconds": ("histogram", {"node_type"}),
    "shoal_sends": ("counter", {"channel", "provider", "outcome"}),
    "shoal_breaker_state": ("gauge", {"provider"}),
    "shoal_holds": ("counter", {"outcome"}),
    "shoal_consumer_lag": ("gauge", {"stream", "consumer"}),
    "shoal_consumer_ack_pending": ("gauge", {"stream", "consumer"}),
    "shoal_fanout_contacts": ("counter", set()),
}


def exercise(m: metrics.Metrics) -> None:
    import grpc

    m.record_grpc("/shoal.v1.TemplateService/GetTemplate", "unary", grpc.StatusCode.OK, 0.01)
    m.record_http("GET", "/v1/campaigns/{campaign_id}", 200, 0.02)
    m.set_executions_by_state({"pending": 3})
    m.observe_node("send", 0.5)
    m.record_sends("email", "sandbox", "accepted", 2)
    m.set_breaker_state("sandbox", "open")
    m.record_holds("held", 2)
    m.consumer_lag.labels(stream="EXEC", consumer="execution-workers").set(5)
    m.consumer_ack_pending.labels(stream="EXEC", consumer="execution-workers").set(1)
    m.record_fanout(10)


def test_every_declared_metric_is_exposed_with_its_type_and_labels() -> None:
    m = metrics.Metrics(process=False)
    exercise(m)
    families = scrape(m)
    for name, (kind, labels) in DECLARED.items():
        assert name in families, name
        family = families[name]
        assert family.type == kind, name
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            assert set(s.labels) - {"le"} == labels, (name, s.labels)
    # prometheus_client adds a `<name>_created` timestamp next to each counter and histogram.
    undeclared = {n for n in families if not n.endswith("_created")} - set(DECLARED)
    assert not undeclared, f"metrics without a row in DECLARED (and docs/operations.md): {undeclared}"


def test_registries_are_per_instance_and_default_is_one_per_process() -> None:
    a, b = metrics.Metrics(process=False), metrics.Metrics(process=False)
    a.record_fanout(5)
    assert sample(a, "shoal_fanout_contacts_total") == 5
    assert sample(b, "shoal_fanout_contacts_total") == 0
    assert metrics.default() is metrics.default()
    # An explicit registry is used as given.
    reg = CollectorRegistry()
    c = metrics.Metrics(reg, process=False)
    assert c.registry is reg


def test_process_collectors_are_on_by_default() -> None:
    families = scrape(metrics.Metrics())
    assert "python_info" in families
    assert "process_cpu_seconds" in families


def test_helpers_record_what_they_are_given() -> None:
    m = metrics.Metrics(process=False)
    m.record_sends("email", "sandbox", "accepted", 3)
    m.record_sends("EMAIL", "sandbox", "accepted")
    m.record_sends("SMS", "sandbox", "unavailable", 0)  # zero: no series at all
    assert sample(m, "shoal_sends_total", channel="EMAIL", provider="sandbox", outcome="accepted") == 4
    assert sample(m, "shoal_sends_total", channel="SMS", provider="sandbox", outcome="unavailable") is None

    m.set_executions_by_state({"pending": 7, "completed": 2})
    m.set_executions_by_state({"completed": 9})  # a fresh count: pending went to zero
    assert sample(m, "shoal_executions_by_state", state="pending") == 0
    assert sample(m, "shoal_executions_by_state", state="completed") == 9
    assert sample(m, "shoal_executions_by_state", state="skipped") == 0

    for state, value in (("open", 2), ("half_open", 1), ("closed", 0)):
        m.set_breaker_state("sandbox", state)
        assert sample(m, "shoal_breaker_state", provider="sandbox") == value

    m.record_holds("insufficient_balance", 4)
    assert sample(m, "shoal_holds_total", outcome="insufficient_balance") == 4

    for node_type in NODE_TYPES:
        m.observe_node(node_type, 0.003)
    assert sample(m, "shoal_node_seconds_count", node_type="wait") == 1
    assert sample(m, "shoal_node_seconds_bucket", node_type="wait", le="0.005") == 1
    assert sample(m, "shoal_node_seconds_bucket", node_type="wait", le="0.001") == 0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m.record_sends("EMAIL", "sandbox", "sent"), "send outcome 'sent'"),
        (lambda m: m.record_holds("ok"), "hold outcome 'ok'"),
        (lambda m: m.set_breaker_state("sandbox", "halfopen"), "breaker state 'halfopen'"),
        (lambda m: m.set_executions_by_state({"waiting": 1}), "execution state 'waiting'"),
        (lambda m: m.observe_node("split", 1.0), "node type 'split'"),
    ],
)
def test_unknown_label_values_are_refused(call: Any, message: str) -> None:
    m = metrics.Metrics(process=False)
    with pytest.raises(ValueError, match=message):
        call(m)


def test_split_method() -> None:
    assert metrics.split_method("/shoal.v1.TemplateService/GetTemplate") == (
        "shoal.v1.TemplateService",
        "GetTemplate",
    )
    assert metrics.split_method("odd") == ("unknown", "odd")


class FakeJetStream:
    def __init__(self) -> None:
        self.pending = {"EXEC": 120, "EVENTS": 0}
        self.down = False

    async def consumer_info(self, stream: str, durable: str) -> Any:
        if self.down:
            raise ConnectionError("nats restarting")
        return SimpleNamespace(
            stream_name=f"ns_{stream}", num_pending=self.pending[stream], num_ack_pending=7
        )


async def test_consumer_lag_poller_publishes_pending_and_keeps_last_values_when_nats_is_down() -> None:
    m = metrics.Metrics(process=False)
    js = FakeJetStream()
    poller = metrics.ConsumerLagPoller(
        js, [("EXEC", "execution-workers"), ("EVENTS", "segment-receipts")], metrics=m, interval=0.01
    )
    await poller.poll_once()
    assert sample(m, "shoal_consumer_lag", stream="ns_EXEC", consumer="execution-workers") == 120
    assert sample(m, "shoal_consumer_ack_pending", stream="ns_EXEC", consumer="execution-workers") == 7
    assert sample(m, "shoal_consumer_lag", stream="ns_EVENTS", consumer="segment-receipts") == 0

    js.down = True
    await poller.poll_once()
    assert sample(m, "shoal_consumer_lag", stream="ns_EXEC", consumer="execution-workers") == 120

    js.down = False
    js.pending["EXEC"] = 3
    import asyncio

    stop = asyncio.Event()
    task = asyncio.create_task(poller.run(stop))
    for _ in range(100):
        if sample(m, "shoal_consumer_lag", stream="ns_EXEC", consumer="execution-workers") == 3:
            break
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, timeout=2)
    assert sample(m, "shoal_consumer_lag", stream="ns_EXEC", consumer="execution-workers") == 3


async def test_http_middleware_labels_by_route_template_and_skips_probes() -> None:
    m = metrics.Metrics(process=False)
    app = FastAPI()

    @app.get("/v1/campaigns/{campaign_id}")
    async def get_campaign(campaign_id: str) -> dict[str, str]:
        return {"id": campaign_id}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"ok": "yes"}

    wrapped = metrics.HttpMetricsMiddleware(app, m)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=wrapped), base_url="http://t") as client:
        assert (await client.get("/v1/campaigns/c1")).status_code == 200
        assert (await client.get("/v1/campaigns/c2")).status_code == 200
        assert (await client.get("/nowhere/123")).status_code == 404
        assert (await client.get("/healthz")).status_code == 200

    route = "/v1/campaigns/{campaign_id}"
    assert sample(m, "http_server_requests_total", method="GET", route=route, status="200") == 2
    assert (
        sample(m, "http_server_request_duration_seconds_count", method="GET", route=route, status="200") == 2
    )
    assert sample(m, "http_server_requests_total", method="GET", route="unmatched", status="404") == 1
    text = str(scrape(m)["http_server_requests"].samples)
    assert "healthz" not in text
    assert "c1" not in text


def test_endpoint_serves_the_registry_and_stops() -> None:
    m = metrics.Metrics(process=False)
    m.record_fanout(42)
    endpoint = metrics.MetricsEndpoint(m, "127.0.0.1", 0)
    port = endpoint.start()
    try:
        assert port > 0
        body = httpx.get(endpoint.url, timeout=5).text
        assert "shoal_fanout_contacts_total 42.0" in body
    finally:
        endpoint.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)


class ProbeSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SHOAL_PROBE_", extra="ignore", frozen=True)


def test_metrics_port_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHOAL_PROBE_METRICS_PORT", raising=False)
    assert ProbeSettings.load().metrics_port is None  # off unless asked for
    monkeypatch.setenv("SHOAL_PROBE_METRICS_PORT", "9464")
    assert ProbeSettings.load().metrics_port == 9464
    monkeypatch.setenv("SHOAL_PROBE_METRICS_PORT", "0")
    assert ProbeSettings.load().metrics_port == 0
    monkeypatch.setenv("SHOAL_PROBE_METRICS_PORT", "70000")
    with pytest.raises(ConfigError, match="SHOAL_PROBE_METRICS_PORT"):
        ProbeSettings.load()
