"""The step worker: takes a batch of step messages and moves each execution until it parks.

Per batch, never per contact: one claim transaction, one CheckEligibility / RenderBatch /
HoldBatch per SEND node group, provider calls in batches with bounded concurrency, captures
and releases, one commit of every outcome, then progress events and acks (by the consume loop,
after this returns). A crash anywhere before the commit leaves the executions `processing` until
their lease expires; they are retried with the same send keys, so billing and the provider answer
"already done" instead of holding, capturing or sending twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, cast

from google.protobuf import struct_pb2
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN, Link, Span, Status, StatusCode

from services.execution import repo
from services.execution.breaker import OPEN, Breaker, BreakerPolicy
from services.execution.config import ExecutionSettings
from services.execution.peers import Peers
from services.execution.providers.base import (
    Channel,
    OutboundMessage,
    Provider,
    ProviderError,
    ProviderRequestError,
    ProviderUnavailable,
    SendResult,
)
from services.execution.providers.registry import default_provider_for, defaults_of
from services.execution.repo import COMPLETED, FAILED, PENDING, SKIPPED, ExecRow, NewSend, Outcome
from shoal import flow as flows
from shoal import metrics as shoal_metrics
from shoal.bus import Bus, Delivery, Outgoing
from shoal.campaign_states import RUNNING, CampaignStates
from shoal.db import Database
from shoal.telemetry import (
    ATTR_CAMPAIGN_ID,
    ATTR_CONTACT_ID,
    ATTR_EXECUTION_ID,
    ATTR_NODE_ID,
    ATTR_NODE_TYPE,
    ATTR_RUN_ID,
    ATTR_WORKSPACE_ID,
)
from shoal.v1 import billing_pb2 as bpb
from shoal.v1 import campaign_pb2 as cpb
from shoal.v1 import common_pb2 as common
from shoal.v1 import events_pb2 as ev
from shoal.v1 import execution_pb2 as epb
from shoal.v1 import segment_pb2 as spb
from shoal.v1 import template_pb2 as tpb

log = logging.getLogger(__name__)
tracer = trace.get_tracer("shoal.execution")

# A valid flow has at most flows.MAX_STEPS nodes on any path.
MAX_HOPS = flows.MAX_STEPS + 1
# One span per execution per step: the span Jaeger's tag search finds by `shoal.execution.id`.
EXECUTION_SPAN_NAME = "shoal.execution"
ATTR_STEP_SEQ = "shoal.execution.step_seq"
ATTR_STATE = "shoal.execution.state"
ATTR_NEXT_NODE = "shoal.execution.next_node"
ATTR_REASON = "shoal.execution.reason"
ATTR_WAKE_AT = "shoal.execution.wake_at"
_STATE_NAMES: dict[int, str] = {
    PENDING: "pending",
    COMPLETED: "completed",
    FAILED: "failed",
    SKIPPED: "skipped",
}


@dataclass
class RunInfo:
    id: str
    workspace_id: str
    campaign_id: str
    flow: flows.CompiledFlow
    data: dict[str, Any]


class RunCache:
    """Compiled flows by run id: a run's flow never changes, so it is loaded once."""

    def __init__(self, db: Database, *, capacity: int = 1024) -> None:
        self.db = db
        self.capacity = capacity
        self.runs: dict[str, RunInfo] = {}

    async def get_many(self, run_ids: set[str]) -> dict[str, RunInfo]:
        missing = [r for r in run_ids if r not in self.runs]
        if missing:

            def load(session: Any) -> list[Any]:
                return [repo.get_run(session, run_id=r) for r in missing]

            for row in await self.db.run(load):
                if row is None:
                    continue
                parsed = cpb.Flow.FromString(row.flow)
                if len(self.runs) >= self.capacity:
                    self.runs.pop(next(iter(self.runs)))
                self.runs[row.id] = RunInfo(
                    row.id,
                    row.workspace_id,
                    row.campaign_id,
                    flows.compile_flow(parsed),
                    json.loads(row.data or "{}"),
                )
        return {r: self.runs[r] for r in run_ids if r in self.runs}


@dataclass
class Work:
    """One claimed execution moving through nodes in this batch.

    `context` is the CONSUMER span of the message that delivered it (its run's trace); `span` is
    its own `shoal.execution` span, linked to every node span that works on it.
    """

    row: ExecRow
    run: RunInfo
    node_id: str
    outcome: Outcome | None = None
    context: Context | None = None
    span: Span = INVALID_SPAN

    def park(self, state: int, *, reason: str = "", wake_at: Any = None, node_id: str | None = None) -> None:
        self.outcome = Outcome(self.row, state, node_id or self.node_id, reason, wake_at)


@dataclass
class BatchResult:
    outcomes: list[Outcome] = field(default_factory=list)
    sends: list[NewSend] = field(default_factory=list)
    # (workspace, key) of holds to capture after the commit (the provider holds the message).
    capture: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    release: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))


class Engine:
    def __init__(
        self,
        *,
        db: Database,
        bus: Bus,
        peers: Peers,
        providers: dict[str, Provider],
        states: CampaignStates,
        settings: ExecutionSettings,
        metrics: shoal_metrics.Metrics | None = None,
    ) -> None:
        self.db = db
        self.bus = bus
        self.peers = peers
        self.providers = providers
        self.states = states
        self.settings = settings
        self.runs = RunCache(db)
        self.lease = timedelta(seconds=settings.lease_seconds)
        self.renudge = timedelta(seconds=settings.renudge_seconds)
        self.provider_slots = asyncio.Semaphore(settings.provider_concurrency)
        policy = BreakerPolicy(
            window_seconds=settings.breaker_window_seconds,
            min_calls=settings.breaker_min_calls,
            failure_rate=settings.breaker_failure_rate,
            consecutive_failures=settings.breaker_consecutive_failures,
            open_seconds=settings.breaker_open_seconds,
        )
        self.breakers = {name: Breaker(name, policy) for name in providers}
        # Metrics: labelled children bound once, so the hot path is one .inc(n) / .observe per group.
        self.metrics = metrics or shoal_metrics.default()
        self._node_seconds = {
            kind: self.metrics.node_seconds.labels(node_type=kind) for kind in flows.NODE_TYPES
        }
        self._breaker_gauges = {name: self.metrics.breaker_state.labels(provider=name) for name in providers}
        for breaker in self.breakers.values():
            self._show_breaker(breaker)
        self._send_counters: dict[tuple[str, str], dict[str, Any]] = {}

    # -- the batch ------------------------------------------------------------------------------

    async def handle(self, deliveries: list[Delivery[ev.StepMessage]]) -> None:
        """The consume loop's handler: process, commit; the loop acks after this returns."""
        steps = [d.payload for d in deliveries]
        states = await self.states.get_many({s.campaign_id for s in steps})
        # A paused campaign's step messages are acked and their executions stay pending;
        # resume re-queues them.
        candidates = [(s.execution_id, s.step_seq) for s in steps if states.get(s.campaign_id) == RUNNING]
        if not candidates:
            return
        claimed = await self.db.run(repo.claim, candidates=candidates, lease=self.lease)
        if not claimed:
            return
        await self.advance(claimed, {d.payload.execution_id: d.context for d in deliveries})

    async def advance(
        self, claimed: Sequence[ExecRow], contexts: Mapping[str, Context] | None = None
    ) -> None:
        """Run the claimed executions until they park and commit; `contexts` maps an execution id
        to the trace context of the message that delivered it."""
        contexts = contexts or {}
        spans = {row.id: _execution_span(row, contexts.get(row.id)) for row in claimed}
        try:
            result = await self._advance(claimed, contexts, spans)
        except BaseException as exc:
            for span in spans.values():
                span.set_status(Status(StatusCode.ERROR, repr(exc)))
                span.end()
            raise
        for outcome in result.outcomes:
            if outcome.row.id in spans:
                _end_execution_span(spans.pop(outcome.row.id), outcome)
        for span in spans.values():
            span.end()

    async def _advance(
        self, claimed: Sequence[ExecRow], contexts: Mapping[str, Context], spans: Mapping[str, Span]
    ) -> BatchResult:
        runs = await self.runs.get_many({c.run_id for c in claimed})
        work: list[Work] = []
        orphans: list[Outcome] = []
        for row in claimed:
            run = runs.get(row.run_id)
            if run is None or row.node_id not in run.flow.nodes:
                orphans.append(Outcome(row, FAILED, row.node_id, "unknown run or node"))
            else:
                work.append(Work(row, run, row.node_id, context=contexts.get(row.id), span=spans[row.id]))
        result = BatchResult(outcomes=orphans)
        await self.run_until_parked(work, result)
        result.outcomes.extend(w.outcome for w in work if w.outcome is not None)

        def commit(session: Any) -> list[Any]:
            repo.record_sends(session, result.sends)
            repo.finish(session, result.outcomes, renudge=self.renudge)
            return repo.counters_of(session, {o.row.run_id for o in result.outcomes})

        # Captures and releases go before the commit: both are idempotent by send key, and a hold
        # answers CAPTURED to the retry, so a crash between them and the commit is repaired by the
        # retry. After the commit nothing would retry them (the executions are done), and a crash
        # there left the holds reserved for good.
        await self.settle(result)
        counters = await self.db.run(commit)
        await self.publish_progress(counters)
        return result

    async def run_until_parked(self, work: list[Work], result: BatchResult) -> None:
        active = list(work)
        for _ in range(MAX_HOPS):
            if not active:
                return
            groups: dict[tuple[str, str], list[Work]] = defaultdict(list)
            for w in active:
                groups[(w.run.id, w.node_id)].append(w)
            await asyncio.gather(
                *(
                    self.run_node(ws[0].run.flow.node(node_id), ws, result)
                    for (_, node_id), ws in groups.items()
                )
            )
            active = [w for w in active if w.outcome is None]
        for w in active:
            w.park(FAILED, reason="flow did not reach a parking node")

    async def run_node(self, node: flows.Node, work: list[Work], result: BatchResult) -> None:
        started = time.perf_counter()
        try:
            await self._run_node(node, work, result)
        finally:
            histogram = self._node_seconds.get(node.kind)
            if histogram is not None:
                histogram.observe(time.perf_counter() - started)

    async def _run_node(self, node: flows.Node, work: list[Work], result: BatchResult) -> None:
        run = work[0].run
        # The batch span belongs to the trace of the batch's first message. A group of another
        # run's executions (one run is one trace) goes under its own message's CONSUMER span
        # instead, linked to the batch, so its calls show up in its own trace.
        parent: Context | None = None
        links: list[Link] = []
        own = work[0].context
        if own is not None:
            batch = trace.get_current_span().get_span_context()
            if trace.get_current_span(own).get_span_context().trace_id != batch.trace_id:
                parent = own
                if batch.is_valid:
                    links.append(Link(batch))
        with tracer.start_as_current_span(
            f"shoal.node {node.kind}",
            context=parent,
            links=links,
            attributes={
                ATTR_NODE_ID: node.id,
                ATTR_NODE_TYPE: node.kind,
                ATTR_RUN_ID: run.id,
                ATTR_CAMPAIGN_ID: run.campaign_id,
                "shoal.batch.size": len(work),
            },
        ) as span:
            if span.is_recording():
                here = span.get_span_context()
                for w in work:
                    w.span.add_link(here)
            if node.kind == flows.END:
                for w in work:
                    w.park(COMPLETED)
            elif node.kind == flows.WAIT:
                delay = timedelta(
                    seconds=node.step.wait.duration.seconds,
                    microseconds=node.step.wait.duration.nanos // 1000,
                )
                wake = repo.now() + delay
                for w in work:
                    w.park(PENDING, wake_at=wake, node_id=node.next)
            elif node.kind == flows.AB_TEST:
                for w in work:
                    variant = flows.ab_variant(run.id, w.row.contact_id, node.id, node.weights)
                    w.row.ab_variant = f"{w.row.ab_variant};{node.id}={variant}".lstrip(";")
                    w.node_id = node.branches[variant]
            elif node.kind == flows.TAG:
                await self.run_tag(node, work)
            elif node.kind == flows.CONDITION:
                await self.run_condition(node, work)
            elif node.kind == flows.SEND:
                await self.run_send(node, work, result)
            else:
                for w in work:
                    w.park(FAILED, reason=f"unknown node kind {node.kind!r}")

    # -- TAG ------------------------------------------------------------------------------------

    async def run_tag(self, node: flows.Node, work: list[Work]) -> None:
        tag = node.step.tag
        call = self.peers.segment.AddTag if tag.action == cpb.TAG_ACTION_ADD else self.peers.segment.RemoveTag
        request = spb.AddTagRequest if tag.action == cpb.TAG_ACTION_ADD else spb.RemoveTagRequest
        results = await asyncio.gather(
            *(
                call(request(workspace_id=w.run.workspace_id, contact_id=w.row.contact_id, tag=tag.tag))
                for w in work
            ),
            return_exceptions=True,
        )
        for w, res in zip(work, results, strict=True):
            if isinstance(res, BaseException):
                w.park(PENDING, reason=f"tag failed: {res}", wake_at=self._retry_at())
            else:
                w.node_id = node.next

    # -- CONDITION ------------------------------------------------------------------------------

    async def run_condition(self, node: flows.Node, work: list[Work]) -> None:
        pred = node.step.condition.predicate
        which = pred.WhichOneof("kind")
        answers: list[bool]
        if which == "engagement":
            queries = [
                spb.EventQuery(
                    contact_id=w.row.contact_id,
                    type=_engagement_type(pred.engagement.event),
                    node_id=pred.engagement.node_id,
                    run_id=w.run.id,
                )
                for w in work
            ]
            reply = await self.peers.segment.QueryEvents(
                spb.QueryEventsRequest(workspace_id=work[0].run.workspace_id, queries=queries)
            )
            answers = list(reply.occurred)
        elif which == "channel_used":
            keys = [f"{w.row.id}:{pred.channel_used.node_id}" for w in work]
            sends = await self.db.run(repo.known_sends, keys)
            answers = [k in sends and sends[k].channel == pred.channel_used.channel for k in keys]
        else:
            answers = await self._contact_predicate(pred, work)
        for w, yes in zip(work, answers, strict=True):
            w.node_id = node.branches["yes" if yes else "no"]

    async def _contact_predicate(self, pred: cpb.Predicate, work: list[Work]) -> list[bool]:
        """Attribute, tag and consent predicates, asked of the segment service as a filter."""
        which = pred.WhichOneof("kind")
        filt = spb.Filter()
        if which == "attribute":
            filt.field.CopyFrom(pred.attribute)
        elif which == "tag":
            filt.tag.CopyFrom(pred.tag)
        else:
            filt.consent.CopyFrom(pred.consent)
        ids = [w.row.contact_id for w in work]
        reply = await self.peers.segment.ListContacts(
            spb.ListContactsRequest(
                workspace_id=work[0].run.workspace_id,
                filter=spb.Filter(all_of=spb.FilterList(filters=[filt, _ids_filter(ids)])),
                page=common.PageRequest(page_size=len(ids)),
            )
        )
        matched = {c.id for c in reply.contacts}
        return [cid in matched for cid in ids]

    # -- SEND -----------------------------------------------------------------------------------

    async def run_send(self, node: flows.Node, work: list[Work], result: BatchResult) -> None:
        """Eligibility for the node's channel, then delivery. On RCS, contacts whose device cannot
        take RCS follow the node's fallback: `none` skips them (`rcs_not_reachable`), `sms` sends
        the RCS template flattened to SMS, `sms_custom` sends the node's SMS template; a fallback
        SMS needs SMS consent too, and is billed as the SMS it is."""
        send = node.step.send
        eligible = await self._eligible(work, send.channel, send.message_type)
        if not eligible:
            return
        if send.channel != common.CHANNEL_RCS:
            await self._deliver(
                node, eligible, result, channel=send.channel, template=send.template, as_sms=False
            )
            return
        capabilities = await self.peers.segment.GetCapabilities(
            spb.GetCapabilitiesRequest(
                workspace_id=work[0].run.workspace_id, contact_ids=[w.row.contact_id for w, _ in eligible]
            )
        )
        capable = {c.contact_id for c in capabilities.capabilities if c.rcs_capable}
        rcs = [(w, e) for w, e in eligible if w.row.contact_id in capable]
        unreachable = [w for w, _ in eligible if w.row.contact_id not in capable]
        if rcs:
            await self._deliver(
                node, rcs, result, channel=common.CHANNEL_RCS, template=send.template, as_sms=False
            )
        if not unreachable:
            return
        if send.fallback == cpb.RCS_FALLBACK_NONE:
            for w in unreachable:
                w.park(SKIPPED, reason="rcs_not_reachable")
            return
        fallback = await self._eligible(unreachable, common.CHANNEL_SMS, send.message_type)
        if not fallback:
            return
        if send.fallback == cpb.RCS_FALLBACK_SMS_CUSTOM:
            await self._deliver(
                node, fallback, result, channel=common.CHANNEL_SMS, template=send.sms_template, as_sms=False
            )
        else:
            await self._deliver(
                node, fallback, result, channel=common.CHANNEL_SMS, template=send.template, as_sms=True
            )

    async def _eligible(
        self, work: list[Work], channel: common.Channel, message_type: common.MessageType
    ) -> list[tuple[Work, spb.Eligibility]]:
        """The executions whose contact may receive this channel + message type; the others are
        parked `skipped` with the reason (no consent, not active, no address, unknown)."""
        reply = await self.peers.segment.CheckEligibility(
            spb.CheckEligibilityRequest(
                workspace_id=work[0].run.workspace_id,
                contact_ids=[w.row.contact_id for w in work],
                channel=channel,
                message_type=message_type,
            )
        )
        by_contact = {e.contact_id: e for e in reply.results}
        eligible: list[tuple[Work, spb.Eligibility]] = []
        for w in work:
            e = by_contact.get(w.row.contact_id)
            if e is None or not e.eligible:
                reason = spb.IneligibleReason.Name(
                    e.reason if e is not None else spb.INELIGIBLE_REASON_UNKNOWN_CONTACT
                )
                w.park(SKIPPED, reason=reason.removeprefix("INELIGIBLE_REASON_").lower())
            else:
                eligible.append((w, e))
        return eligible

    async def _deliver(
        self,
        node: flows.Node,
        eligible: list[tuple[Work, spb.Eligibility]],
        result: BatchResult,
        *,
        channel: common.Channel,
        template: tpb.TemplateRef,
        as_sms: bool,
    ) -> None:
        """Render, hold, hand to the provider and record, for one channel actually used."""
        send = node.step.send
        run = eligible[0][0].run
        ws = run.workspace_id
        # The run's trigger data is the same for every contact: converted to a Struct once.
        run_data: struct_pb2.Struct | None = None
        if run.data:
            run_data = struct_pb2.Struct()
            run_data.update(run.data)
        contexts = [_render_context(w, e, run_data) for w, e in eligible]
        size = self.settings.render_batch_size
        answers = await asyncio.gather(
            *(
                self.peers.template.RenderBatch(
                    tpb.RenderBatchRequest(
                        workspace_id=ws, template=template, contexts=contexts[i : i + size], as_sms=as_sms
                    )
                )
                for i in range(0, len(contexts), size)
            )
        )
        by_key = {m.key: m for rendered in answers for m in rendered.messages}
        ready: list[tuple[Work, spb.Eligibility, tpb.RenderedMessage]] = []
        for w, e in eligible:
            msg = by_key.get(w.row.id)
            if msg is None or msg.error:
                w.park(FAILED, reason=f"render: {msg.error if msg is not None else 'no output'}")
            else:
                ready.append((w, e, msg))
        if not ready:
            return
        holds = await self.peers.billing.HoldBatch(
            bpb.HoldBatchRequest(
                workspace_id=ws,
                items=[
                    bpb.HoldItem(
                        key=_send_key(w, node),
                        channel=channel,
                        message_type=send.message_type,
                        unit=m.billing_unit,
                        units=max(m.units, 1),
                        campaign_id=run.campaign_id,
                    )
                    for w, _, m in ready
                ],
            )
        )
        hold_by_key = {h.key: h for h in holds.results}
        to_send: list[tuple[Work, spb.Eligibility, tpb.RenderedMessage, int]] = []
        for w, e, m in ready:
            h = hold_by_key[_send_key(w, node)]
            if h.status in (bpb.HOLD_STATUS_HELD, bpb.HOLD_STATUS_CAPTURED):
                to_send.append((w, e, m, h.amount_cents))
            elif h.status == bpb.HOLD_STATUS_INSUFFICIENT_BALANCE:
                # Stays pending at this node; the campaign moves to PAUSED_BALANCE and resume re-queues it.
                w.park(PENDING, reason="insufficient_balance")
            else:
                w.park(FAILED, reason="hold released earlier")
        if not to_send:
            return
        used = Channel.parse(common.Channel.Name(channel))
        # A node's provider serves its own channel; a fallback SMS goes to the SMS default.
        provider_name = (send.provider if channel == send.channel else "") or default_provider_for(used)
        provider = self.providers.get(provider_name)
        if provider is None:
            # A flow naming a provider this deployment does not have: nothing can send it.
            for w, _e, _m, _amount in to_send:
                result.release[ws].append(_send_key(w, node))
                w.park(FAILED, reason=f"provider {provider_name!r} is not configured")
            return
        outbound = [_outbound(w, e, m, node, used) for w, e, m, _ in to_send]
        results = await self._send_in_chunks(provider, outbound)
        unavailable = accepted = duplicate = retryable = failed = 0
        refused: ProviderRequestError | None = None
        for (w, _e, m, amount), res in zip(to_send, results, strict=True):
            key = _send_key(w, node)
            if isinstance(res, ProviderRequestError):
                # Our request itself was refused (credentials, configuration): no retry can help.
                # The message stays pending (held) and the campaign is paused below.
                unavailable += 1
                refused = res
                w.park(PENDING, reason=f"provider refused: {res.reason}", wake_at=self._retry_at())
            elif isinstance(res, ProviderError):
                unavailable += 1
                w.park(PENDING, reason=f"provider unavailable: {res.reason}", wake_at=self._retry_at())
            elif res.ok:
                if res.status == "duplicate":
                    duplicate += 1
                else:
                    accepted += 1
                result.sends.append(
                    NewSend(
                        key,
                        ws,
                        w.row.id,
                        run.id,
                        run.campaign_id,
                        node.id,
                        channel,
                        provider_name,
                        res.provider_message_id or "",
                        epb.SEND_STATUS_ACCEPTED,
                        m.billing_unit,
                        max(m.units, 1),
                        amount,
                        traceparent=_traceparent(w.span),
                    )
                )
                result.capture[ws].append(key)
                w.node_id = node.next
            elif res.retryable:
                retryable += 1
                w.park(PENDING, reason=f"provider: {res.error}", wake_at=self._retry_at())
            else:
                failed += 1
                result.release[ws].append(key)
                w.park(FAILED, reason=f"provider: {res.error}")
        counters = self._sends_of(used, provider_name)
        for outcome, count in (
            ("accepted", accepted),
            ("duplicate", duplicate),
            ("retryable", retryable),
            ("failed", failed),
            ("unavailable", unavailable),
        ):
            if count:
                counters[outcome].inc(count)
        if refused is not None:
            await self.announce_refusal(run, provider_name, refused)

    def _sends_of(self, channel: Channel, provider: str) -> dict[str, Any]:
        """`shoal_sends_total` children of one channel and provider, one per outcome (bound once)."""
        counters = self._send_counters.get((channel, provider))
        if counters is None:
            sends = self.metrics.sends
            counters = self._send_counters[(channel, provider)] = {
                outcome: sends.labels(channel=channel.value, provider=provider, outcome=outcome)
                for outcome in shoal_metrics.SEND_OUTCOMES
            }
        return counters

    def _show_breaker(self, breaker: Breaker) -> None:
        gauge = self._breaker_gauges.get(breaker.name)
        if gauge is not None:
            gauge.set(shoal_metrics.BREAKER_STATES[breaker.state])

    async def _send_in_chunks(
        self, provider: Provider, messages: list[OutboundMessage]
    ) -> list[SendResult | ProviderError]:
        size = self.settings.provider_batch_size
        chunks = [messages[i : i + size] for i in range(0, len(messages), size)]

        breaker = self.breakers[provider.name]

        async def one(chunk: list[OutboundMessage]) -> list[SendResult | ProviderError]:
            async with self.provider_slots:
                allowed = breaker.allow()
                self._show_breaker(breaker)  # allow() moves an open breaker to half-open
                if not allowed:
                    return [ProviderUnavailable(provider.name, "circuit breaker open")] * len(chunk)
                try:
                    results: list[SendResult | ProviderError] = list(await provider.send_batch(chunk))
                    changed = breaker.record(ok=True)
                except ProviderUnavailable as exc:
                    results = [exc] * len(chunk)
                    changed = breaker.record(ok=False)
                except ProviderError as exc:
                    # Our request was refused: the provider answered, so it is up. Recorded as a
                    # success (it says nothing against the provider's health), which also ends a
                    # half-open probe instead of leaving it in flight for good.
                    results = [exc] * len(chunk)
                    changed = breaker.record(ok=True)
                self._show_breaker(breaker)
            if changed is not None:
                await self.announce_breaker(breaker, changed)
            return results

        out: list[SendResult | ProviderError] = []
        for part in await asyncio.gather(*(one(c) for c in chunks)):
            out.extend(part)
        return out

    async def announce_refusal(self, run: RunInfo, provider: str, error: ProviderRequestError) -> None:
        """Ask the campaign service to pause this campaign (PAUSED_ERROR): its provider refuses
        our requests. Once per run, provider and minute (NATS dedupe); pausing twice is a no-op."""
        log.warning("provider %s refused campaign %s: %s", provider, run.campaign_id, error.reason)
        event = ev.ProviderRequestRefused(
            workspace_id=run.workspace_id,
            campaign_id=run.campaign_id,
            run_id=run.id,
            provider=provider,
            reason=f"provider {provider} refused our request: {error.reason}"[:500],
        )
        event.time.GetCurrentTime()
        minute = int(event.time.seconds // 60)
        await self.bus.publish(
            self.bus.event_subject("provider", "request_refused"),
            event,
            msg_id=f"refused:{run.id}:{provider}:{minute}",
        )

    async def announce_breaker(self, breaker: Breaker, state: str) -> None:
        opened = state == OPEN
        log.warning("provider %s breaker %s: %s", breaker.name, state, breaker.reason)
        event = ev.ProviderBreakerChanged(
            provider=breaker.name,
            state=ev.BREAKER_STATE_OPEN if opened else ev.BREAKER_STATE_CLOSED,
            reason=breaker.reason,
            default_for=[
                cast(common.Channel, common.Channel.Value(f"CHANNEL_{c.value}"))
                for c in defaults_of(breaker.name)
            ],
        )
        event.time.GetCurrentTime()
        await self.bus.publish(
            self.bus.event_subject("provider", "breaker_opened" if opened else "breaker_closed"), event
        )

    def _retry_at(self) -> Any:
        return repo.now() + timedelta(seconds=self.settings.retry_backoff_seconds)

    # -- after the commit -----------------------------------------------------------------------

    async def settle(self, result: BatchResult) -> None:
        """Capture holds of messages the provider took, release those it refused for good.
        Both are idempotent by key; called before the batch's commit (see `advance`)."""
        for ws, keys in result.capture.items():
            await self.peers.billing.CaptureBatch(bpb.CaptureBatchRequest(workspace_id=ws, keys=keys))
        for ws, keys in result.release.items():
            await self.peers.billing.ReleaseBatch(bpb.ReleaseBatchRequest(workspace_id=ws, keys=keys))

    async def publish_progress(self, counters: list[Any]) -> None:
        items = []
        for c in counters:
            progress = ev.RunProgress(
                workspace_id=c.workspace_id,
                campaign_id=c.campaign_id,
                run_id=c.id,
                counts=common.ExecutionCounts(
                    pending=c.pending,
                    processing=c.processing,
                    completed=c.completed,
                    failed=c.failed,
                    skipped=c.skipped,
                ),
                sent=c.sent,
                fanout_done=bool(c.fanout_done),
            )
            progress.time.GetCurrentTime()
            items.append(Outgoing(self.bus.event_subject("execution", "run_progress"), progress))
        if items:
            await self.bus.publish_many(items)


def _execution_span(row: ExecRow, context: Context | None) -> Span:
    """The `shoal.execution` span of one step of one execution, child of its message's CONSUMER span.

    Under a parent that is not sampled the span would not record either (sampling is parent-based,
    DESIGN §6): no span is built then, which is most of a batch's tracing cost when tracing is off.
    """
    if context is not None:
        parent = trace.get_current_span(context).get_span_context()
        if parent.is_valid and not parent.trace_flags.sampled:
            return INVALID_SPAN
    return tracer.start_span(
        EXECUTION_SPAN_NAME,
        context=context,
        attributes={
            ATTR_EXECUTION_ID: row.id,
            ATTR_CONTACT_ID: row.contact_id,
            ATTR_RUN_ID: row.run_id,
            ATTR_CAMPAIGN_ID: row.campaign_id,
            ATTR_WORKSPACE_ID: row.workspace_id,
            ATTR_NODE_ID: row.node_id,
            ATTR_STEP_SEQ: row.step_seq,
        },
    )


def _traceparent(span: Span) -> str:
    """W3C traceparent of a recording span, "" otherwise (nothing to link to)."""
    if not span.is_recording():
        return ""
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def _end_execution_span(span: Span, outcome: Outcome) -> None:
    if span.is_recording():
        span.set_attribute(ATTR_STATE, _STATE_NAMES.get(outcome.state, str(outcome.state)))
        span.set_attribute(ATTR_NEXT_NODE, outcome.node_id)
        if outcome.reason:
            span.set_attribute(ATTR_REASON, outcome.reason)
        if outcome.wake_at is not None:
            span.set_attribute(ATTR_WAKE_AT, outcome.wake_at.isoformat())
        if outcome.state == FAILED:
            span.set_status(Status(StatusCode.ERROR, outcome.reason))
    span.end()


def _send_key(w: Work, node: flows.Node) -> str:
    return f"{w.row.id}:{node.id}"


def _engagement_type(event: str) -> str:
    return {
        "opened": "email.opened",
        "clicked": "email.clicked",
        "delivered": "message.delivered",
        "failed": "message.failed",
    }.get(event, event)


def _ids_filter(ids: list[str]) -> spb.Filter:
    return spb.Filter(
        field=spb.FieldCondition(
            field="id", operator=spb.OPERATOR_IN, values=[common.FieldValue(string_value=i) for i in ids]
        )
    )


def _render_context(w: Work, e: spb.Eligibility, data: struct_pb2.Struct | None) -> tpb.RenderContext:
    ctx = tpb.RenderContext(key=w.row.id) if data is None else tpb.RenderContext(key=w.row.id, data=data)
    # The built-in fields are strings: set directly, not through Struct.update (pure Python).
    contact = ctx.contact.fields
    contact["id"].string_value = w.row.contact_id
    contact["first_name"].string_value = e.first_name
    contact["last_name"].string_value = e.last_name
    contact["email" if "@" in e.address else "phone"].string_value = e.address
    if e.fields:
        custom: dict[str, Any] = {}
        for name, value in e.fields.items():
            kind = value.WhichOneof("kind")
            custom[name] = getattr(value, kind) if kind else None
        ctx.contact.update(custom)
    return ctx


def _outbound(
    w: Work, e: spb.Eligibility, m: tpb.RenderedMessage, node: flows.Node, channel: Channel
) -> OutboundMessage:
    return OutboundMessage(
        key=_send_key(w, node),
        workspace_id=w.run.workspace_id,
        channel=channel,
        to=e.address,
        subject=m.subject or None,
        text=m.text or None,
        html=m.html or None,
        payload={
            "campaign_id": w.run.campaign_id,
            "run_id": w.run.id,
            "node_id": node.id,
            "contact_id": w.row.contact_id,
            "headers": dict(m.headers) if m.headers else {},
        },
    )
