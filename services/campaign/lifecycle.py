"""What a campaign is and which state it is in: authoring, launch checks, every state move.

Every move goes through `move()`: the row is locked, the move is checked against the state
machine, the new state and an audit row are written in one transaction, and only after the
commit is the state put in the workers' key-value bucket and published as an event.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2
from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from services.campaign import states as st
from services.campaign.models import Campaign, CampaignRun, FlowVersion, Transition, TriggerKey
from services.campaign.peers import Peers
from services.campaign.schedule import due_instant
from shoal import flow as flows
from shoal.bus import Bus
from shoal.campaign_states import CampaignStates
from shoal.db import Database
from shoal.errors import (
    FailedPrecondition,
    FieldViolation,
    InsufficientBalance,
    InvalidArgument,
    NotFound,
    ShoalError,
    Unavailable,
)
from shoal.v1 import billing_pb2 as bpb
from shoal.v1 import campaign_pb2 as cpb
from shoal.v1 import common_pb2 as common
from shoal.v1 import events_pb2 as ev
from shoal.v1 import execution_pb2 as epb
from shoal.v1 import segment_pb2 as spb
from shoal.v1 import template_pb2 as tpb

log = logging.getLogger(__name__)

C = Campaign.__table__  # type: ignore[attr-defined]
RUNS = CampaignRun.__table__  # type: ignore[attr-defined]
T = Transition.__table__  # type: ignore[attr-defined]
FV = FlowVersion.__table__  # type: ignore[attr-defined]
TK = TriggerKey.__table__  # type: ignore[attr-defined]

MAX_RECIPIENTS = 10_000
_EVENT_TYPE = re.compile(r"^contact\.[a-z][a-z0-9_.-]{0,63}$")


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class Launch:
    run_id: str
    replayed: bool = False


@dataclass
class Estimate:
    audience: int
    expected_cents: int
    upper_cents: int
    free_cents: int
    per_contact_cents: int


@dataclass
class Progress:
    counts: common.ExecutionCounts
    sent: int
    remaining_cents: int


class Lifecycle:
    def __init__(
        self,
        *,
        db: Database,
        bus: Bus | None,
        kv: CampaignStates | None,
        peers: Peers,
        schedule_grace: timedelta,
        idempotency_ttl: timedelta,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.db = db
        self.bus = bus
        self.kv = kv
        self.peers = peers
        self.schedule_grace = schedule_grace
        self.idempotency_ttl = idempotency_ttl
        self.clock = clock
        # Event campaigns per workspace, briefly cached for the contact-event stream.
        self._event_cache: dict[str, tuple[datetime, list[tuple[str, cpb.EventTrigger, str]]]] = {}

    # -- reading --------------------------------------------------------------------------------

    async def get(self, workspace_id: str, campaign_id: str) -> Any:
        row = await self.db.run(
            lambda s: s.execute(
                select(C).where(C.c.id == campaign_id, C.c.workspace_id == workspace_id)
            ).first()
        )
        if row is None:
            raise NotFound(f"campaign {campaign_id} not found")
        return row

    async def flow_of(self, campaign_id: str, version: int) -> cpb.Flow:
        blob = await self.db.run(
            lambda s: s.execute(
                select(FV.c.flow).where(FV.c.campaign_id == campaign_id, FV.c.version == version)
            ).scalar()
        )
        return cpb.Flow.FromString(blob or b"")

    async def progress(self, row: Any) -> Progress:
        """Live counts of the current run and what its unfinished executions should still cost."""
        if not row.current_run_id:
            return Progress(common.ExecutionCounts(), 0, 0)
        live = await self.peers.execution.GetRunCounts(
            epb.GetRunCountsRequest(workspace_id=row.workspace_id, run_id=row.current_run_id)
        )
        per_contact = await self.db.run(
            lambda s: s.execute(
                select(RUNS.c.cost_per_contact_cents).where(RUNS.c.id == row.current_run_id)
            ).scalar()
        )
        # Each pending or processing contact priced as a whole pass through the flow: an upper
        # figure for those already past a SEND, never an under-estimate.
        remaining = (live.counts.pending + live.counts.processing) * (per_contact or 0)
        return Progress(live.counts, live.sent, remaining)

    def to_pb(self, row: Any, flow: cpb.Flow | None = None) -> cpb.Campaign:
        out = cpb.Campaign(
            id=row.id,
            workspace_id=row.workspace_id,
            name=row.name,
            segment_id=row.segment_id,
            trigger=cpb.Trigger.FromString(row.trigger),
            flow_version=row.flow_version,
            state=row.state,
            current_run_id=row.current_run_id,
        )
        if flow is not None:
            out.flow.CopyFrom(flow)
        out.create_time.FromDatetime(row.created_at)
        out.update_time.FromDatetime(row.updated_at)
        if row.due_at is not None:
            out.due_time.FromDatetime(row.due_at)
        return out

    # -- authoring ------------------------------------------------------------------------------

    async def create(
        self, *, workspace_id: str, name: str, segment_id: str, trigger: cpb.Trigger, flow: cpb.Flow
    ) -> Any:
        _check_authoring(name=name, trigger=trigger)
        campaign_id = str(uuid.uuid4())
        now = self.clock()

        def work(session: Any) -> None:
            session.execute(
                insert(C).values(
                    id=campaign_id,
                    workspace_id=workspace_id,
                    name=name,
                    segment_id=segment_id,
                    trigger=trigger.SerializeToString(),
                    trigger_kind=trigger.WhichOneof("kind"),
                    flow_version=1,
                    state=st.DRAFT,
                    current_run_id="",
                    providers=",".join(flows.providers_of(flow)),
                    due_at=None,
                    created_at=now,
                    updated_at=now,
                )
            )
            session.execute(
                insert(FV).values(
                    campaign_id=campaign_id, version=1, flow=flow.SerializeToString(), created_at=now
                )
            )

        await self.db.run(work)
        return await self.get(workspace_id, campaign_id)

    async def update(self, *, workspace_id: str, campaign_id: str, request: cpb.UpdateCampaignRequest) -> Any:
        mask = set(request.update_mask) or {"name", "segment_id", "trigger", "flow"}
        unknown = mask - {"name", "segment_id", "trigger", "flow"}
        if unknown:
            raise InvalidArgument.of("update_mask", f"unknown fields: {', '.join(sorted(unknown))}")
        current = await self.get(workspace_id, campaign_id)
        name = request.name if "name" in mask else current.name
        trigger = request.trigger if "trigger" in mask else cpb.Trigger.FromString(current.trigger)
        _check_authoring(name=name, trigger=trigger)

        def work(session: Any) -> None:
            row = session.execute(select(C).where(C.c.id == campaign_id).with_for_update()).first()
            if row.state != st.DRAFT:
                raise FailedPrecondition(
                    f"only a DRAFT campaign can be edited; this one is {st.name(row.state)}",
                    reason="wrong_state",
                )
            values: dict[str, Any] = {"name": name, "updated_at": self.clock()}
            if "segment_id" in mask:
                values["segment_id"] = request.segment_id
            if "trigger" in mask:
                values["trigger"] = trigger.SerializeToString()
                values["trigger_kind"] = trigger.WhichOneof("kind")
            if "flow" in mask:
                version = row.flow_version + 1
                session.execute(
                    insert(FV).values(
                        campaign_id=campaign_id,
                        version=version,
                        flow=request.flow.SerializeToString(),
                        created_at=self.clock(),
                    )
                )
                values["flow_version"] = version
                values["providers"] = ",".join(flows.providers_of(request.flow))
            session.execute(update(C).where(C.c.id == campaign_id).values(**values))

        await self.db.run(work)
        return await self.get(workspace_id, campaign_id)

    async def validate(self, row: Any, flow: cpb.Flow) -> list[cpb.FlowError]:
        """Every problem with the flow and its templates: node id, path and rule."""
        errors = [
            cpb.FlowError(node_id=e.node_id, path=e.path, rule=e.rule, message=e.message)
            for e in flows.validate(flow)
        ]
        trigger = cpb.Trigger.FromString(row.trigger)
        if trigger.WhichOneof("kind") in ("manual", "scheduled") and not row.segment_id:
            errors.append(
                cpb.FlowError(path="segment_id", rule="campaign.segment", message="a segment is required")
            )
        if errors:
            return errors
        checks = []
        for share in flows.send_profile(flow):
            send = share.step.send
            checks.append(
                tpb.LaunchCheck(
                    node_id=share.step.id,
                    template=send.template,
                    channel=send.channel,
                    message_type=send.message_type,
                )
            )
            if send.fallback == cpb.RCS_FALLBACK_SMS_CUSTOM:
                checks.append(
                    tpb.LaunchCheck(
                        node_id=share.step.id,
                        template=send.sms_template,
                        channel=common.CHANNEL_SMS,
                        message_type=send.message_type,
                    )
                )
        if checks:
            reply = await self.peers.template.ValidateForLaunch(
                tpb.ValidateForLaunchRequest(workspace_id=row.workspace_id, checks=checks)
            )
            errors.extend(
                cpb.FlowError(
                    node_id=p.node_id,
                    path=f"node:{p.node_id}",
                    rule="send.template_launchable",
                    message=p.reason,
                )
                for p in reply.problems
            )
        return errors

    async def estimate(self, row: Any, flow: cpb.Flow, *, recipients: int | None = None) -> Estimate:
        if recipients is not None:
            audience = recipients
        elif row.segment_id:
            reply = await self.peers.segment.EstimateAudience(
                spb.EstimateAudienceRequest(workspace_id=row.workspace_id, segment_id=row.segment_id)
            )
            audience = reply.size
        else:
            audience = 0
        prices = await self.peers.billing.ListPrices(bpb.ListPricesRequest(workspace_id=row.workspace_id))
        by_kind: dict[tuple[int, int], int] = {}
        for p in prices.prices:
            key = (p.channel, p.message_type)
            by_kind[key] = max(by_kind.get(key, 0), p.cents)

        def price(step: cpb.Step) -> int:
            # The dearest unit of the channel: the upper bound must not promise less than a send costs.
            cents = by_kind.get((step.send.channel, step.send.message_type), 0)
            if step.send.fallback in (cpb.RCS_FALLBACK_SMS, cpb.RCS_FALLBACK_SMS_CUSTOM):
                cents = max(cents, by_kind.get((common.CHANNEL_SMS, step.send.message_type), 0))
            return cents

        sends = [
            bpb.SendProfileItem(
                channel=s.step.send.channel,
                message_type=s.step.send.message_type,
                units=1,
                expected_share_bp=s.expected_share_bp,
                on_upper_path=s.on_upper_path,
            )
            for s in flows.send_profile(flow, cost=price)
        ]
        # Priced for the real audience (billing rounds each send up once, not once per contact);
        # an empty or open-ended audience is priced for one contact, for the per-contact figure.
        cost = await self.peers.billing.EstimateCost(
            bpb.EstimateCostRequest(
                workspace_id=row.workspace_id, audience_size=max(audience, 1), sends=sends
            )
        )
        per_contact = -(-cost.expected_cents // max(audience, 1))
        if audience == 0:
            return Estimate(0, 0, 0, cost.free_cents, per_contact)
        return Estimate(audience, cost.expected_cents, cost.upper_bound_cents, cost.free_cents, per_contact)

    # -- moves ----------------------------------------------------------------------------------

    async def move(
        self,
        workspace_id: str,
        campaign_id: str,
        action: str,
        *,
        actor: str,
        reason: str = "",
        extra: Callable[[Any, Any], dict[str, Any]] | None = None,
    ) -> tuple[int, int, Any]:
        """Apply one state-machine move; returns (from, to, row after)."""

        def work(session: Any) -> tuple[int, int, Any]:
            row = session.execute(
                select(C).where(C.c.id == campaign_id, C.c.workspace_id == workspace_id).with_for_update()
            ).first()
            if row is None:
                raise NotFound(f"campaign {campaign_id} not found")
            target = st.next_state(row.state, action)
            values: dict[str, Any] = {"state": target, "updated_at": self.clock()}
            if extra is not None:
                values.update(extra(session, row))
            session.execute(update(C).where(C.c.id == campaign_id).values(**values))
            session.execute(
                insert(T).values(
                    workspace_id=workspace_id,
                    campaign_id=campaign_id,
                    from_state=row.state,
                    to_state=target,
                    actor=actor,
                    reason=reason[:1000],
                    run_id=values.get("current_run_id", row.current_run_id),
                    created_at=self.clock(),
                )
            )
            after = session.execute(select(C).where(C.c.id == campaign_id)).first()
            return row.state, target, after

        before, after_state, row = await self.db.run(work)
        self._event_cache.clear()
        await self.announce(row, before, after_state, actor, reason)
        return before, after_state, row

    async def announce(self, row: Any, before: int, after: int, actor: str, reason: str) -> None:
        if self.kv is not None:
            await self.kv.put(row.id, after)
        if self.bus is not None:
            event = ev.CampaignStateChanged(
                workspace_id=row.workspace_id,
                campaign_id=row.id,
                run_id=row.current_run_id,
                from_state=before,
                to_state=after,
                actor=actor,
                reason=reason,
                providers=[p for p in row.providers.split(",") if p],
            )
            event.time.GetCurrentTime()
            await self.bus.publish(self.bus.event_subject("campaign", "state_changed"), event)

    async def launch(
        self,
        workspace_id: str,
        campaign_id: str,
        action: str,
        *,
        actor: str,
        idempotency_key: str = "",
        recipients: Sequence[str] = (),
        data: struct_pb2.Struct | None = None,
    ) -> Launch:
        """Start a run (manual start, schedule due, API trigger, event activation)."""
        row = await self.get(workspace_id, campaign_id)
        kind = cpb.Trigger.FromString(row.trigger).WhichOneof("kind")
        if action == "trigger" and kind != "api":
            raise FailedPrecondition(
                "only an API-triggered campaign can be triggered", reason="not_api_triggered"
            )
        if action in ("start", "activate"):
            action = "activate" if kind == "event" else "start"
            if kind == "api":
                raise FailedPrecondition(
                    "an API-triggered campaign starts with a trigger call", reason="api_triggered"
                )
        if idempotency_key:
            replay = await self._replay(campaign_id, idempotency_key)
            if replay is not None:
                return Launch(replay, replayed=True)
        st.next_state(row.state, action)  # refuse early, before any remote call
        if len(recipients) > MAX_RECIPIENTS:
            raise InvalidArgument.of("recipients", f"at most {MAX_RECIPIENTS} recipients per trigger")
        if kind == "api" and not recipients and not row.segment_id:
            raise InvalidArgument.of("recipients", "the campaign has no segment: name the recipients")
        flow = await self.flow_of(campaign_id, row.flow_version)
        await self._check_launchable(row, flow)
        open_ended = kind == "event"
        # An event campaign's audience is whoever matches later: nothing to cover up front
        # (each entry is held for when it sends); the run still records its per-contact cost.
        audience = len(recipients) if recipients else (0 if open_ended else None)
        cost = await self.estimate(row, flow, recipients=audience)
        if cost.free_cents < cost.expected_cents:
            raise InsufficientBalance(
                f"free balance {cost.free_cents} cents does not cover "
                f"the estimated cost {cost.expected_cents} cents"
            )
        run_id = str(uuid.uuid4())
        now = self.clock()

        def new_run(session: Any, current: Any) -> dict[str, Any]:
            session.execute(
                insert(RUNS).values(
                    id=run_id,
                    workspace_id=workspace_id,
                    campaign_id=campaign_id,
                    flow_version=current.flow_version,
                    state=cpb.RUN_STATE_RUNNING,
                    idempotency_key=idempotency_key,
                    cost_per_contact_cents=cost.per_contact_cents,
                    counts="{}",
                    sent=0,
                    started_at=now,
                )
            )
            if idempotency_key:
                # A key older than the window is free again: its old row must not block the new one.
                session.execute(
                    TK.delete().where(
                        TK.c.campaign_id == campaign_id,
                        TK.c.key == idempotency_key,
                        TK.c.created_at < now - self.idempotency_ttl,
                    )
                )
                # Unique per campaign: a racing trigger with the same key fails here and replays.
                session.execute(
                    insert(TK).values(
                        workspace_id=workspace_id,
                        campaign_id=campaign_id,
                        key=idempotency_key,
                        run_id=run_id,
                        created_at=now,
                    )
                )
            return {"current_run_id": run_id, "due_at": None}

        try:
            before, _, row = await self.move(
                workspace_id, campaign_id, action, actor=actor, reason=action, extra=new_run
            )
        except IntegrityError:
            replay = await self._replay(campaign_id, idempotency_key)
            if replay is None:
                raise
            return Launch(replay, replayed=True)
        try:
            await self.peers.execution.StartRun(
                epb.StartRunRequest(
                    workspace_id=workspace_id,
                    campaign_id=campaign_id,
                    run_id=run_id,
                    flow_version=row.flow_version,
                    flow=flow,
                    segment_id="" if recipients or open_ended else row.segment_id,
                    contact_ids=list(recipients),
                    data=data or struct_pb2.Struct(),
                    open_ended=open_ended,
                )
            )
        except grpc.aio.AioRpcError as exc:
            # Undo the move so nothing half-launched stays behind: the run never started.
            await self._undo_launch(row, before, run_id, f"launch failed: {exc.details()}")
            raise Unavailable(f"the execution service did not accept the run: {exc.details()}") from None
        return Launch(run_id)

    async def _check_launchable(self, row: Any, flow: cpb.Flow) -> None:
        problems = await self.validate(row, flow)
        if problems:
            raise FailedPrecondition(
                f"campaign cannot launch: {problems[0].node_id or problems[0].path}: {problems[0].message}",
                reason="launch_blocked",
                violations=[
                    FieldViolation(p.path or p.node_id, f"{p.node_id}: {p.rule}: {p.message}")
                    for p in problems
                ],
            )

    async def _undo_launch(self, row: Any, before: int, run_id: str, reason: str) -> None:
        def work(session: Any) -> Any:
            session.execute(
                update(C)
                .where(C.c.id == row.id)
                .values(state=before, current_run_id="", updated_at=self.clock())
            )
            session.execute(RUNS.delete().where(RUNS.c.id == run_id))
            session.execute(TK.delete().where(TK.c.run_id == run_id))
            session.execute(
                insert(T).values(
                    workspace_id=row.workspace_id,
                    campaign_id=row.id,
                    from_state=row.state,
                    to_state=before,
                    actor="system",
                    reason=reason,
                    run_id=run_id,
                    created_at=self.clock(),
                )
            )
            return session.execute(select(C).where(C.c.id == row.id)).first()

        after = await self.db.run(work)
        await self.announce(after, row.state, before, "system", reason)

    async def _replay(self, campaign_id: str, key: str) -> str | None:
        since = self.clock() - self.idempotency_ttl
        return await self.db.run(
            lambda s: s.execute(
                select(TK.c.run_id).where(
                    TK.c.campaign_id == campaign_id, TK.c.key == key, TK.c.created_at >= since
                )
            ).scalar()
        )

    async def pause(
        self, workspace_id: str, campaign_id: str, *, actor: str, reason: str = "", action: str = "pause"
    ) -> int:
        _, after, _ = await self.move(workspace_id, campaign_id, action, actor=actor, reason=reason or action)
        return after

    async def resume(self, workspace_id: str, campaign_id: str, *, actor: str) -> tuple[int, int]:
        row = await self.get(workspace_id, campaign_id)
        st.next_state(row.state, "resume")
        pending = 0
        if row.current_run_id:
            counts = await self.peers.execution.GetRunCounts(
                epb.GetRunCountsRequest(workspace_id=workspace_id, run_id=row.current_run_id)
            )
            pending = counts.counts.pending + counts.counts.processing
        if pending:
            # Priced with today's prices, not the run's launch-time figure: after a price rise the
            # old figure let a campaign resume that could not pay, and its holds then failed again
            # inside the same balance_exhausted episode (no new event): it stayed RUNNING, stuck.
            version = await self.db.run(
                lambda s: s.execute(
                    select(RUNS.c.flow_version).where(RUNS.c.id == row.current_run_id)
                ).scalar()
            )
            flow = await self.flow_of(campaign_id, version or row.flow_version)
            cost = await self.estimate(row, flow, recipients=pending)
            if cost.free_cents < cost.expected_cents:
                raise InsufficientBalance(
                    f"free balance {cost.free_cents} cents does not cover "
                    f"the {pending} pending contacts ({cost.expected_cents} cents estimated)"
                )
        _, after, row = await self.move(workspace_id, campaign_id, "resume", actor=actor, reason="resume")
        requeued = 0
        if row.current_run_id:
            reply = await self.peers.execution.RequeuePending(
                epb.RequeuePendingRequest(workspace_id=workspace_id, campaign_id=campaign_id)
            )
            requeued = reply.requeued
            await self.check_completion(workspace_id, row.current_run_id)
        return after, requeued

    # -- reactions ------------------------------------------------------------------------------

    async def check_completion(
        self, workspace_id: str, run_id: str, progress: ev.RunProgress | None = None
    ) -> None:
        """Complete the campaign when its run has no pending or processing execution left."""
        run = await self.db.run(lambda s: s.execute(select(RUNS).where(RUNS.c.id == run_id)).first())
        if run is None or run.state != cpb.RUN_STATE_RUNNING:
            return
        if progress is not None:
            await self.db.run(
                lambda s: s.execute(
                    update(RUNS)
                    .where(RUNS.c.id == run_id)
                    .values(counts=json.dumps(json_format.MessageToDict(progress.counts)), sent=progress.sent)
                )
            )
        row = await self.get(workspace_id, run.campaign_id)
        if row.current_run_id != run_id or row.state != st.RUNNING or row.trigger_kind == "event":
            return
        # Progress events can arrive late or out of order: decide on the live counts.
        live = await self.peers.execution.GetRunCounts(
            epb.GetRunCountsRequest(workspace_id=workspace_id, run_id=run_id)
        )
        c = live.counts
        if not live.fanout_done or c.pending or c.processing:
            return
        partial = bool(c.failed or c.skipped)
        action = "complete_partial" if partial else "complete"

        def finish(session: Any, current: Any) -> dict[str, Any]:
            session.execute(
                update(RUNS)
                .where(RUNS.c.id == run_id)
                .values(
                    state=cpb.RUN_STATE_COMPLETED_PARTIAL if partial else cpb.RUN_STATE_COMPLETED,
                    ended_at=self.clock(),
                    counts=json.dumps(json_format.MessageToDict(c)),
                    sent=live.sent,
                )
            )
            return {}

        try:
            await self.move(
                workspace_id,
                run.campaign_id,
                action,
                actor="execution",
                reason="all executions terminal",
                extra=finish,
            )
        except FailedPrecondition:
            # Another progress event completed it first, or it was paused meanwhile.
            return

    async def on_breaker(self, event: ev.ProviderBreakerChanged) -> None:
        if event.state != ev.BREAKER_STATE_OPEN:
            return
        rows = await self.db.run(
            lambda s: s.execute(
                select(C.c.workspace_id, C.c.id, C.c.providers).where(C.c.state == st.RUNNING)
            ).all()
        )
        default_for = [common.Channel.Name(c).removeprefix("CHANNEL_") for c in event.default_for]
        for ws, cid, providers in rows:
            if flows.uses_provider(providers.split(","), event.provider, default_for):
                try:
                    await self.pause(
                        ws,
                        cid,
                        actor=f"breaker:{event.provider}",
                        reason=event.reason or "provider breaker open",
                        action="breaker_open",
                    )
                except FailedPrecondition:
                    continue

    async def on_request_refused(self, event: ev.ProviderRequestRefused) -> None:
        """A provider refuses this campaign's requests (credentials, configuration): PAUSED_ERROR
        with the provider's words; resume after fixing it sends what is still pending."""
        try:
            await self.pause(
                event.workspace_id,
                event.campaign_id,
                actor=f"provider:{event.provider}",
                reason=event.reason or f"provider {event.provider} refused our request",
                # The product's one move to PAUSED_ERROR: the provider cannot take this
                # campaign's messages, as when its breaker opens.
                action="breaker_open",
            )
        except (FailedPrecondition, NotFound):
            return

    async def on_balance_exhausted(self, event: ev.BalanceEvent) -> None:
        rows = await self.db.run(
            lambda s: (
                s.execute(
                    select(C.c.id).where(C.c.workspace_id == event.workspace_id, C.c.state == st.RUNNING)
                )
                .scalars()
                .all()
            )
        )
        for cid in rows:
            try:
                await self.pause(
                    event.workspace_id,
                    cid,
                    actor="billing",
                    reason="free balance exhausted",
                    action="balance_exhausted",
                )
            except FailedPrecondition:
                continue

    async def on_contact_events(self, events: Sequence[ev.ContactEvent]) -> None:
        """Event triggers: each matching contact enters the campaign's open run.

        Works per batch: one lookup of a workspace's event campaigns (cached for a second, and
        dropped on any state move made here) and one EnterContacts per campaign, so a bulk import
        of 10,000 contacts costs a handful of calls, not 10,000 queries.
        """
        by_workspace: dict[str, list[ev.ContactEvent]] = {}
        for event in events:
            by_workspace.setdefault(event.workspace_id, []).append(event)
        for workspace_id, items in by_workspace.items():
            for cid, rule, run_id in await self._event_campaigns(workspace_id):
                matched = [
                    e.contact_id
                    for e in items
                    if _event_matches(rule.event_type, e.type)
                    and (not rule.required_tag or rule.required_tag in e.tags)
                ]
                if not matched:
                    continue
                await self.peers.execution.EnterContacts(
                    epb.EnterContactsRequest(
                        workspace_id=workspace_id,
                        run_id=run_id,
                        contact_ids=list(dict.fromkeys(matched)),
                        allow_reentry=rule.allow_reentry,
                    )
                )
                log.info("%d contacts entered campaign %s", len(matched), cid)

    async def _event_campaigns(self, workspace_id: str) -> list[tuple[str, cpb.EventTrigger, str]]:
        now = self.clock()
        cached = self._event_cache.get(workspace_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        rows = await self.db.run(
            lambda s: s.execute(
                select(C.c.id, C.c.trigger, C.c.current_run_id).where(
                    C.c.workspace_id == workspace_id,
                    C.c.trigger_kind == "event",
                    C.c.state.in_(st.ACTIVE_STATES),
                )
            ).all()
        )
        found = [(cid, cpb.Trigger.FromString(blob).event, run_id) for cid, blob, run_id in rows if run_id]
        self._event_cache[workspace_id] = (now + timedelta(seconds=1), found)
        return found

    # -- scheduling -----------------------------------------------------------------------------

    async def schedule(
        self, workspace_id: str, campaign_id: str, schedule: cpb.ScheduledTrigger, *, actor: str
    ) -> Any:
        row = await self.get(workspace_id, campaign_id)
        stored = cpb.Trigger.FromString(row.trigger)
        if stored.WhichOneof("kind") != "scheduled":
            raise FailedPrecondition(
                "only a campaign with a scheduled trigger can be scheduled", reason="not_scheduled"
            )
        if not schedule.local_time and not schedule.time_zone:
            schedule = stored.scheduled  # the time the campaign was authored with
        due = due_instant(schedule.local_time, schedule.time_zone)
        if due <= self.clock():
            raise InvalidArgument.of("schedule.local_time", "must be in the future")
        st.next_state(row.state, "schedule")  # refuse early, before any remote call
        # Refused now rather than found at the due time, when nobody is watching.
        await self._check_launchable(row, await self.flow_of(campaign_id, row.flow_version))
        trigger = cpb.Trigger(scheduled=schedule)

        def values(session: Any, current: Any) -> dict[str, Any]:
            return {"due_at": due, "trigger": trigger.SerializeToString()}

        _, _, after = await self.move(
            workspace_id, campaign_id, "schedule", actor=actor, reason=f"due {due.isoformat()}", extra=values
        )
        return after

    async def _unschedule_refused(self, workspace_id: str, campaign_id: str, exc: ShoalError) -> None:
        try:
            await self.move(
                workspace_id,
                campaign_id,
                "unschedule",
                actor="scheduler",
                reason=_refusal(exc),
                extra=lambda _s, _r: {"due_at": None},
            )
        except FailedPrecondition:
            return  # moved meanwhile (unscheduled by the operator)

    async def tick_scheduler(self) -> list[str]:
        """Start SCHEDULED campaigns that are due; mark those found too late as missed."""
        now = self.clock()
        due = await self.db.run(
            lambda s: s.execute(
                select(C.c.workspace_id, C.c.id, C.c.due_at).where(
                    C.c.state == st.SCHEDULED, C.c.due_at <= now
                )
            ).all()
        )
        started = []
        for ws, cid, due_at in due:
            late = now - (due_at if due_at.tzinfo else due_at.replace(tzinfo=UTC))
            try:
                if late > self.schedule_grace:
                    await self.move(
                        ws,
                        cid,
                        "missed",
                        actor="scheduler",
                        reason=f"missed: due at {due_at.isoformat()}, {int(late.total_seconds())}s late",
                    )
                    continue
                await self.launch(ws, cid, "due", actor="scheduler")
                started.append(cid)
            except (FailedPrecondition, InsufficientBalance, InvalidArgument) as exc:
                # Refused for good (flow, templates, balance): trying every tick would only fill
                # the log. Back to DRAFT with the reason; the operator fixes it and schedules again.
                log.warning("scheduled start of campaign %s refused: %s", cid, exc.message)
                await self._unschedule_refused(ws, cid, exc)
            except Exception:
                # Transient (a peer down): the next tick tries again, until the grace runs out.
                log.exception("scheduled start of campaign %s failed", cid)
        return started


def _refusal(exc: ShoalError) -> str:
    detail = "; ".join(f"{v.field}: {v.description}" for v in exc.violations)
    return f"launch refused ({exc.reason}): {exc.message}" + (f" [{detail}]" if detail else "")


def _event_matches(rule_type: str, event_type: str) -> bool:
    """A rule names the event with its domain ("contact.created"); a ContactEvent carries the
    bare type ("created"), its subject the domain."""
    return rule_type.removeprefix("contact.") == event_type


def _check_authoring(*, name: str, trigger: cpb.Trigger) -> None:
    if not name or len(name) > 200:
        raise InvalidArgument.of("name", "is required, at most 200 characters")
    kind = trigger.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument.of("trigger", "one of manual, scheduled, event or api is required")
    if kind == "scheduled" and trigger.scheduled.time_zone:
        due_instant(trigger.scheduled.local_time, trigger.scheduled.time_zone)
    if kind == "event" and not _EVENT_TYPE.match(trigger.event.event_type):
        raise InvalidArgument.of(
            "trigger.event.event_type", "must be a contact event: contact.<type>, e.g. contact.created"
        )
