"""The domain metrics move as a real campaign runs through the whole mesh.

Every service of the mesh runs in this process, so they share one registry (`shoal.metrics.default()`),
which the in-process gateway serves on its `/metrics`: the test scrapes that real endpoint before
and after a run and asserts deltas (other tests of the session move the same counters). The
sandbox carrier is a process of its own, with a registry and a `/metrics` of its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.execution import server as execution_server
from shoal.bus import STREAM_EVENTS, STREAM_EXEC
from shoal.metrics import default as default_metrics
from shoal.v1 import billing_pb2 as bpb
from shoal.v1 import campaign_pb2 as cpb
from tests.e2e.rest import rest_mesh
from tests.e2e.test_thin_run import PEOPLE, seed, send_end_flow
from tests.helpers import wait_for
from tests.integration.test_execution_faults import email_template, seed_audience, start_campaign, wait_state
from tests.mesh import mesh

AUDIENCE = len(PEOPLE)
SANDBOX_EMAIL = {"channel": "EMAIL", "provider": "sandbox"}
STATUS_ROUTE = "/v1/campaigns/{campaign_id}/status"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def get(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when the series does not exist (yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def series(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for n, labels in samples if n == name]


async def scrape(client: httpx.AsyncClient, url: str) -> Samples:
    reply = await client.get(url)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/plain")
    return parse(reply.text)


@pytest.fixture
def quick_state_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    # `shoal_executions_by_state` is recounted every 5 s in production; every 0.1 s here.
    monkeypatch.setattr(execution_server, "STATE_COUNT_SECONDS", 0.1)


async def test_a_run_moves_the_domain_and_http_metrics(
    nats_url: str, tmp_path: Path, quick_state_counts: None
) -> None:
    async with rest_mesh(nats_url, tmp_path) as (m, rest):
        gateway_metrics = "/metrics"
        sandbox_metrics = f"{m.sandbox.url}/metrics"
        segment_id, template_id = await seed(m, tag="metrics")
        created = await m.campaign.CreateCampaign(
            cpb.CreateCampaignRequest(
                workspace_id=m.workspace_id,
                name="metrics",
                segment_id=segment_id,
                trigger=cpb.Trigger(manual=cpb.ManualTrigger()),
                flow=send_end_flow(template_id),
            )
        )
        cid = created.campaign.id
        before = await scrape(rest.client, gateway_metrics)

        await m.campaign.StartCampaign(cpb.StartCampaignRequest(workspace_id=m.workspace_id, campaign_id=cid))

        async def completed() -> Any:
            reply = await m.campaign.GetCampaignStatus(
                cpb.GetCampaignStatusRequest(workspace_id=m.workspace_id, campaign_id=cid)
            )
            return reply if reply.state == cpb.CAMPAIGN_STATE_COMPLETED else None

        final = await wait_for(completed, timeout=30)
        assert final.counts.completed == AUDIENCE

        # One authenticated status read, two probes and a scrape through the gateway.
        headers = await rest.key(m.workspace_id, "campaigns:read")
        status = await rest.client.get(f"/v1/campaigns/{cid}/status", headers=headers)
        assert status.status_code == 200, status.text
        for probe in ("/healthz", "/readyz"):
            assert (await rest.client.get(probe)).status_code == 200

        # The state gauge is recounted on its own clock: wait for the count after completion.
        async def counted() -> Samples | None:
            now = await scrape(rest.client, gateway_metrics)
            done = get(now, "shoal_executions_by_state", state="completed") == AUDIENCE
            idle = all(get(now, "shoal_executions_by_state", state=s) == 0 for s in ("pending", "processing"))
            return now if done and idle else None

        after = await wait_for(counted, timeout=10, message="executions_by_state never showed the run done")

        def delta(name: str, **labels: str) -> float:
            return get(after, name, **labels) - get(before, name, **labels)

        # Sends: every contact accepted by the sandbox, nothing else.
        assert delta("shoal_sends_total", **SANDBOX_EMAIL, outcome="accepted") == AUDIENCE
        for outcome in ("duplicate", "retryable", "failed", "unavailable"):
            assert delta("shoal_sends_total", **SANDBOX_EMAIL, outcome=outcome) == 0, outcome
        # Holds: one held per contact (captured later, which HoldBatch does not count).
        assert delta("shoal_holds_total", outcome="held") == AUDIENCE
        assert delta("shoal_holds_total", outcome="insufficient_balance") == 0
        # Fan-out: the whole audience became executions.
        assert delta("shoal_fanout_contacts_total") == AUDIENCE
        # Node latencies: the SEND and END groups were timed (one or more batches each).
        for node in ("send", "end"):
            assert delta("shoal_node_seconds_count", node_type=node) >= 1, node
            assert delta("shoal_node_seconds_sum", node_type=node) > 0, node
            assert delta("shoal_node_seconds_bucket", node_type=node, le="+Inf") == delta(
                "shoal_node_seconds_count", node_type=node
            )
        assert delta("shoal_node_seconds_count", node_type="wait") == 0
        # The sandbox breaker stayed closed.
        assert ("shoal_breaker_state", frozenset({"provider": "sandbox"}.items())) in after
        assert get(after, "shoal_breaker_state", provider="sandbox") == 0
        # Consumer lag of this mesh's durables (streams carry the mesh's namespace).
        lag = series(after, "shoal_consumer_lag")
        assert {"stream": f"{m.namespace}_{STREAM_EXEC}", "consumer": "execution-workers"} in lag
        for durable in ("campaign-progress", "campaign-breaker", "campaign-balance", "campaign-contacts"):
            assert {"stream": f"{m.namespace}_{STREAM_EVENTS}", "consumer": durable} in lag
            assert (
                "shoal_consumer_ack_pending",
                frozenset({"stream": f"{m.namespace}_{STREAM_EVENTS}", "consumer": durable}.items()),
            ) in after
        # The gateway's HTTP metrics: by route template, probes and scrapes not counted.
        assert delta("http_server_requests_total", method="GET", route=STATUS_ROUTE, status="200") == 1
        assert (
            delta(
                "http_server_request_duration_seconds_count", method="GET", route=STATUS_ROUTE, status="200"
            )
            == 1
        )
        routes = {labels["route"] for labels in series(after, "http_server_requests_total")}
        assert not routes & {"/healthz", "/readyz", "/metrics"}
        assert not any(cid in route for route in routes), "ids must not become series"
        # gRPC request metrics share the registry: the run's HoldBatch calls are there.
        holds_calls = get(
            after,
            "grpc_server_handled_total",
            grpc_service="shoal.v1.BillingService",
            grpc_method="HoldBatch",
            grpc_type="unary",
            grpc_code="OK",
        )
        assert holds_calls >= 1

        # The sandbox, a process of its own: its send endpoint counted, its probe not.
        async with httpx.AsyncClient(timeout=5) as client:
            sandbox = await scrape(client, sandbox_metrics)
        assert (
            get(
                sandbox, "http_server_requests_total", method="POST", route="/v1/messages:batch", status="200"
            )
            >= 1
        )
        sandbox_routes = {labels["route"] for labels in series(sandbox, "http_server_requests_total")}
        assert "/healthz" not in sandbox_routes
        assert "/metrics" not in sandbox_routes


async def test_an_outage_shows_as_unavailable_sends_and_an_open_breaker(
    nats_url: str, tmp_path: Path
) -> None:
    """Read straight from the process registry this time: the breaker gauge goes to open (2) while
    the campaign sits in PAUSED_ERROR and back to closed (0) once a probe succeeds after resume."""
    registry = default_metrics().registry

    def value(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    audience = 60
    async with mesh(
        nats_url=nats_url,
        tmp_path=tmp_path,
        execution={
            "batch_size": 20,
            "provider_batch_size": 10,
            "provider_concurrency": 2,
            "breaker_consecutive_failures": 3,
            "breaker_open_seconds": 0.5,
            "retry_backoff_seconds": 0.3,
        },
        sandbox_env={"SHOAL_SANDBOX_LATENCY_MS": "20"},
    ) as m:
        assert value("shoal_breaker_state", provider="sandbox") == 0, "closed at start"
        before = {
            o: value("shoal_sends_total", **SANDBOX_EMAIL, outcome=o) for o in ("accepted", "unavailable")
        }
        await m.billing.TopUp(bpb.TopUpRequest(workspace_id=m.workspace_id, amount_cents=10_000))
        campaign_id = await start_campaign(
            m, await seed_audience(m, audience, tag="metrics-outage"), await email_template(m)
        )
        await wait_for(lambda: m.sandbox.get("/v1/messages/count")["count"] >= 10, timeout=30)
        m.sandbox.control(outage=True)
        await wait_state(m, campaign_id, cpb.CAMPAIGN_STATE_PAUSED_ERROR, timeout=15)
        # Open while paused (a probe in flight shows half-open, 1, for a moment).
        await wait_for(lambda: value("shoal_breaker_state", provider="sandbox") == 2, timeout=5)
        assert value("shoal_sends_total", **SANDBOX_EMAIL, outcome="unavailable") > before["unavailable"]

        m.sandbox.control(outage=False)
        await m.campaign.ResumeCampaign(
            cpb.ResumeCampaignRequest(workspace_id=m.workspace_id, campaign_id=campaign_id)
        )
        done = await wait_state(m, campaign_id, cpb.CAMPAIGN_STATE_COMPLETED, timeout=60)
        assert done.counts.completed == audience
        assert value("shoal_breaker_state", provider="sandbox") == 0, "closed after a good probe"
        assert (
            value("shoal_sends_total", **SANDBOX_EMAIL, outcome="accepted") - before["accepted"] == audience
        )
