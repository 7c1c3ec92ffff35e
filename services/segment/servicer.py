"""SegmentService over gRPC: proto in, validation, repository calls, proto out.

Rules live in contacts.py (input), filters.py (segment filters) and repo.py (storage); this module
only translates and sequences them. Contact events are published after the transaction commits,
with the event id as `Nats-Msg-Id` so a retried publish is dropped by JetStream.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import json_format, struct_pb2
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from services.segment import contacts as c
from services.segment import ids, repo
from services.segment.capabilities import CapabilityLookup
from services.segment.config import SegmentSettings
from services.segment.filters import compile_count, compile_filter
from shoal.bus import Bus, Outgoing
from shoal.db import Database
from shoal.errors import Conflict, FieldViolation, InvalidArgument
from shoal.v1 import common_pb2, events_pb2, segment_pb2_grpc
from shoal.v1 import segment_pb2 as pb

log = logging.getLogger(__name__)

MAX_BATCH = 10_000
# ImportContacts validates and writes its rows in parts of this many (see ImportContacts).
IMPORT_PART = 2_000
DEFAULT_PAGE = 100
MAX_PAGE = 1000
DEFAULT_STREAM_PAGE = 1000
MAX_STREAM_PAGE = 5000
MAX_WORKSPACE_ID = 64


def now() -> datetime:
    return datetime.now(UTC)


def require_workspace(workspace_id: str) -> str:
    if not workspace_id:
        raise InvalidArgument.of("workspace_id", "is required")
    if len(workspace_id) > MAX_WORKSPACE_ID:
        raise InvalidArgument.of("workspace_id", f"must be at most {MAX_WORKSPACE_ID} characters")
    return workspace_id


def require_id(value: str, prefix: str, field_name: str) -> str:
    if not value:
        raise InvalidArgument.of(field_name, "is required")
    if not ids.is_id(value, prefix):
        raise InvalidArgument.of(field_name, f"must be a {prefix}_ id")
    return value


def page_size(requested: int, default: int, cap: int, field_name: str) -> int:
    if requested < 0:
        raise InvalidArgument.of(field_name, "must not be negative")
    return min(requested or default, cap)


def cursor(token: str, prefix: str, field_name: str) -> str:
    """Page tokens are the last id of the previous page; anything else is refused."""
    if token and not ids.is_id(token, prefix):
        raise InvalidArgument.of(field_name, "is not a token this service issued")
    return token


def consent_pb(view: repo.ConsentView) -> pb.ConsentRecord:
    record = pb.ConsentRecord(
        contact_id=view.contact_id,
        channel=view.channel,  # type: ignore[arg-type]
        message_type=view.message_type,  # type: ignore[arg-type]
        status=view.status,  # type: ignore[arg-type]
        source=view.source,
        proof=view.proof,
    )
    record.record_time.FromDatetime(view.recorded_at)
    if view.confirmed_at is not None:
        record.confirm_time.FromDatetime(view.confirmed_at)
    return record


def segment_pb(view: repo.SegmentView) -> pb.Segment:
    segment = pb.Segment(id=view.id, workspace_id=view.workspace_id, name=view.name)
    segment.filter.ParseFromString(view.filter_proto)
    segment.create_time.FromDatetime(view.created_at)
    segment.update_time.FromDatetime(view.updated_at)
    return segment


def segment_name(name: str) -> str:
    name = name.strip()
    if not name:
        raise InvalidArgument.of("name", "is required")
    if len(name) > 255:
        raise InvalidArgument.of("name", "must be at most 255 characters")
    return name


def external_id_conflict() -> Conflict:
    """A unique constraint lost to a concurrent writer: the only one we have is external_id."""
    return Conflict(
        "external_id is already used by another contact",
        reason="external_id_taken",
        violations=[FieldViolation("contact.external_id", "is already used by another contact")],
    )


def parse_import_rows(
    items: Sequence[pb.ContactInput], start: int = 0, stop: int | None = None
) -> tuple[list[tuple[int, c.ContactData]], list[repo.Rejection]]:
    """Valid rows with their index, and one rejection per invalid row (its first field, all rules).

    Only `items[start:stop]`, indexed as in the whole of `items`.
    """
    rows: list[tuple[int, c.ContactData]] = []
    rejected: list[repo.Rejection] = []
    for i, item in enumerate(items[start:stop], start):
        try:
            rows.append((i, c.parse_contact_input(item, prefix=f"contacts[{i}]")))
        except InvalidArgument as exc:
            first = exc.violations[0]
            reason = "; ".join(
                v.description if v.field == first.field else f"{v.field}: {v.description}"
                for v in exc.violations
            )
            rejected.append(repo.Rejection(i, first.field, reason))
    return rows, rejected


class SegmentServicer(segment_pb2_grpc.SegmentServiceServicer):  # type: ignore[misc]  # generated, untyped
    def __init__(
        self,
        *,
        db: Database,
        bus: Bus | None,
        settings: SegmentSettings,
        capability_lookup: CapabilityLookup | None = None,
    ) -> None:
        self.db = db
        self.bus = bus
        self.settings = settings
        self.capability_lookup = capability_lookup

    # -- events out ------------------------------------------------------------------------------

    def _event(
        self,
        ws: str,
        contact_id: str,
        kind: str,
        *,
        tags: Sequence[str] = (),
        properties: struct_pb2.Struct | None = None,
        event_id: str | None = None,
        at: datetime | None = None,
        custom: bool = False,
    ) -> Outgoing | None:
        """A contact event for `_publish`: lifecycle kinds on contact.<kind>, recorded events on
        contact.custom with their own type (so a custom type named "created" stays custom)."""
        if self.bus is None:
            return None
        message = events_pb2.ContactEvent(
            workspace_id=ws,
            contact_id=contact_id,
            type=kind,
            tags=list(tags),
            event_id=event_id or ids.new_id(ids.EVENT),
        )
        if properties is not None:
            message.properties.CopyFrom(properties)
        message.time.FromDatetime(at or now())
        subject_kind = "custom" if custom else kind
        return Outgoing(self.bus.event_subject("contact", subject_kind), message, msg_id=message.event_id)

    async def _publish(self, items: Sequence[Outgoing | None]) -> None:
        """After the commit: a failed publish is logged, never turned into a failed RPC."""
        batch = [i for i in items if i is not None]
        if not batch or self.bus is None:
            return
        try:
            await self.bus.publish_many(batch)
        except Exception:
            log.exception("publishing %d contact events failed", len(batch))

    # -- contacts --------------------------------------------------------------------------------

    async def CreateContact(self, request: pb.CreateContactRequest, context: Any) -> pb.CreateContactResponse:
        ws = require_workspace(request.workspace_id)
        data = c.parse_contact_input(request.contact)
        try:
            view = await self.db.run(lambda s: repo.create_contact(s, workspace_id=ws, data=data, now=now()))
        except IntegrityError as exc:
            raise external_id_conflict() from exc
        await self._publish([self._event(ws, view.id, "created", tags=view.tags)])
        return pb.CreateContactResponse(contact=c.contact_pb(view))

    async def UpsertContact(self, request: pb.UpsertContactRequest, context: Any) -> pb.UpsertContactResponse:
        ws = require_workspace(request.workspace_id)
        data = c.parse_contact_input(request.contact)
        try:
            view, created = await self.db.run(
                lambda s: repo.upsert_contact(s, workspace_id=ws, data=data, now=now())
            )
        except IntegrityError as exc:
            raise external_id_conflict() from exc
        await self._publish([self._event(ws, view.id, "created" if created else "updated", tags=view.tags)])
        return pb.UpsertContactResponse(contact=c.contact_pb(view), created=created)

    async def GetContact(self, request: pb.GetContactRequest, context: Any) -> pb.GetContactResponse:
        ws = require_workspace(request.workspace_id)
        contact_id = require_id(request.contact_id, ids.CONTACT, "contact_id")
        view = await self.db.run(lambda s: repo.get_contact(s, workspace_id=ws, contact_id=contact_id))
        return pb.GetContactResponse(contact=c.contact_pb(view))

    async def UpdateContact(self, request: pb.UpdateContactRequest, context: Any) -> pb.UpdateContactResponse:
        ws = require_workspace(request.workspace_id)
        contact_id = require_id(request.contact_id, ids.CONTACT, "contact_id")
        only = c.parse_update_mask(request.update_mask)
        data = c.parse_contact_input(request.contact, only=only)
        try:
            view = await self.db.run(
                lambda s: repo.update_contact(
                    s, workspace_id=ws, contact_id=contact_id, data=data, only=only, now=now()
                )
            )
        except IntegrityError as exc:
            raise external_id_conflict() from exc
        await self._publish([self._event(ws, view.id, "updated", tags=view.tags)])
        return pb.UpdateContactResponse(contact=c.contact_pb(view))

    async def DeleteContact(self, request: pb.DeleteContactRequest, context: Any) -> pb.DeleteContactResponse:
        ws = require_workspace(request.workspace_id)
        contact_id = require_id(request.contact_id, ids.CONTACT, "contact_id")
        await self.db.run(lambda s: repo.delete_contact(s, workspace_id=ws, contact_id=contact_id))
        return pb.DeleteContactResponse()

    async def ListContacts(self, request: pb.ListContactsRequest, context: Any) -> pb.ListContactsResponse:
        ws = require_workspace(request.workspace_id)
        size = page_size(request.page.page_size, DEFAULT_PAGE, MAX_PAGE, "page.page_size")
        after = cursor(request.page.page_token, ids.CONTACT, "page.page_token")
        where = compile_filter(
            request.filter if request.HasField("filter") else None, workspace_id=ws, now=now()
        )
        views = await self.db.run(
            lambda s: repo.members_page(s, workspace_id=ws, where=where, after=after, limit=size)
        )
        token = views[-1].id if len(views) == size else ""
        return pb.ListContactsResponse(
            contacts=[c.contact_pb(v) for v in views], page={"next_page_token": token}
        )

    async def ImportContacts(
        self, request: pb.ImportContactsRequest, context: Any
    ) -> pb.ImportContactsResponse:
        ws = require_workspace(request.workspace_id)
        if len(request.contacts) > MAX_BATCH:
            raise InvalidArgument.of("contacts", f"at most {MAX_BATCH} contacts per call; split the file")
        # Validation (CPU in this process) and the writes (mostly the database server's work) of
        # one call overlap: a thread validates the rows in parts, in order, while the database
        # thread writes each part as soon as it is ready, in the call's one transaction: a
        # failure on either side rolls the whole call back, and so does a call cancelled while
        # parts are still waiting to be validated (they are dropped, the writer sees that).
        items = request.contacts
        at = now()
        rejected: list[repo.Rejection] = []
        validator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="segment-import-validate")
        try:
            validated: list[Future[tuple[list[tuple[int, c.ContactData]], list[repo.Rejection]]]] = [
                validator.submit(parse_import_rows, items, start, start + IMPORT_PART)
                for start in range(0, len(items), IMPORT_PART)
            ]

            def parts() -> Iterator[list[tuple[int, c.ContactData]]]:
                for part in validated:
                    rows, refused = part.result()
                    rejected.extend(refused)
                    yield rows

            def write(session: Session) -> repo.ImportOutcome:
                external_ids, emails = c.import_keys(items)
                return repo.import_contact_parts(
                    session,
                    workspace_id=ws,
                    external_ids=external_ids,
                    emails=emails,
                    parts=parts(),
                    now=at,
                )

            outcome = await self.db.run(write)
        finally:
            validator.shutdown(wait=False, cancel_futures=True)
        rejected.extend(outcome.rejected)
        grown = len(outcome.created)
        await self.db.run(lambda s: repo.refresh_statistics(s, grown=grown))
        await self._publish(
            [self._event(ws, cid, "created", tags=tags) for cid, tags in outcome.created]
            + [self._event(ws, cid, "updated", tags=tags) for cid, tags in outcome.updated]
        )
        return pb.ImportContactsResponse(
            imported=len(outcome.created),
            updated=len(outcome.updated),
            rejected=[
                pb.ImportRejection(index=r.index, field=r.field, reason=r.reason)
                for r in sorted(rejected, key=lambda r: r.index)
            ],
        )

    # -- tags ------------------------------------------------------------------------------------

    async def _change_tag(self, workspace_id: str, contact_id: str, raw_tag: str, *, add: bool) -> bool:
        ws = require_workspace(workspace_id)
        cid = require_id(contact_id, ids.CONTACT, "contact_id")
        try:
            tag = c.normalise_tag(raw_tag)
        except ValueError as exc:
            raise InvalidArgument.of("tag", str(exc)) from None
        changed, tags = await self.db.run(
            lambda s: repo.change_tag(s, workspace_id=ws, contact_id=cid, tag=tag, add=add, now=now())
        )
        if changed:
            await self._publish(
                [
                    self._event(ws, cid, "tagged", tags=[tag])
                    if add
                    else self._event(ws, cid, "updated", tags=tags)
                ]
            )
        return changed

    async def AddTag(self, request: pb.AddTagRequest, context: Any) -> pb.AddTagResponse:
        return pb.AddTagResponse(
            changed=await self._change_tag(request.workspace_id, request.contact_id, request.tag, add=True)
        )

    async def RemoveTag(self, request: pb.RemoveTagRequest, context: Any) -> pb.RemoveTagResponse:
        return pb.RemoveTagResponse(
            changed=await self._change_tag(request.workspace_id, request.contact_id, request.tag, add=False)
        )

    # -- consent and eligibility -----------------------------------------------------------------

    async def SetConsent(self, request: pb.SetConsentRequest, context: Any) -> pb.SetConsentResponse:
        ws = require_workspace(request.workspace_id)
        contact_id = require_id(request.contact_id, ids.CONTACT, "contact_id")
        try:
            consent = c.parse_consent_input(request.consent, allow_unspecified_status=request.confirm)
        except InvalidArgument as exc:
            violations = [FieldViolation(f"consent.{v.field}", v.description) for v in exc.violations]
            raise InvalidArgument(exc.message, violations=violations) from None
        if request.confirm and consent.status not in (
            pb.CONSENT_STATUS_UNSPECIFIED,
            pb.CONSENT_STATUS_GRANTED,
        ):
            raise InvalidArgument.of(
                "consent.status", "confirming a double opt-in grants consent; leave it unset"
            )
        view = await self.db.run(
            lambda s: repo.set_consent(
                s, workspace_id=ws, contact_id=contact_id, consent=consent, confirm=request.confirm, now=now()
            )
        )
        # contact.consent_updated: outgoing webhooks turn it into `consent.updated`.
        props = struct_pb2.Struct()
        props.update(
            {
                "channel": common_pb2.Channel.Name(view.channel).removeprefix("CHANNEL_"),
                "message_type": common_pb2.MessageType.Name(view.message_type).removeprefix("MESSAGE_TYPE_"),
                "status": pb.ConsentStatus.Name(view.status).removeprefix("CONSENT_STATUS_"),
                "source": view.source,
            }
        )
        await self._publish(
            [self._event(ws, contact_id, "consent_updated", properties=props, at=view.recorded_at)]
        )
        return pb.SetConsentResponse(consent=consent_pb(view))

    async def ListConsent(self, request: pb.ListConsentRequest, context: Any) -> pb.ListConsentResponse:
        ws = require_workspace(request.workspace_id)
        contact_id = require_id(request.contact_id, ids.CONTACT, "contact_id")
        views = await self.db.run(
            lambda s: repo.list_consent(
                s, workspace_id=ws, contact_id=contact_id, include_history=request.include_history
            )
        )
        return pb.ListConsentResponse(consents=[consent_pb(v) for v in views])

    async def CheckEligibility(
        self, request: pb.CheckEligibilityRequest, context: Any
    ) -> pb.CheckEligibilityResponse:
        ws = require_workspace(request.workspace_id)
        if request.channel not in c.CHANNELS:
            raise InvalidArgument.of("channel", "must be EMAIL, SMS or RCS")
        if request.message_type not in c.MESSAGE_TYPES:
            raise InvalidArgument.of("message_type", "must be MESSAGE, CONVERSATION or NEWSLETTER")
        if len(request.contact_ids) > MAX_BATCH:
            raise InvalidArgument.of("contact_ids", f"at most {MAX_BATCH} per call")
        contact_ids = list(request.contact_ids)
        response: pb.CheckEligibilityResponse = await self.db.run(
            lambda s: repo.check_eligibility(
                s,
                workspace_id=ws,
                contact_ids=contact_ids,
                channel=request.channel,
                message_type=request.message_type,
            )
        )
        return response

    # -- capabilities ----------------------------------------------------------------------------

    async def GetCapabilities(
        self, request: pb.GetCapabilitiesRequest, context: Any
    ) -> pb.GetCapabilitiesResponse:
        ws = require_workspace(request.workspace_id)
        if len(request.contact_ids) > MAX_BATCH:
            raise InvalidArgument.of("contact_ids", f"at most {MAX_BATCH} per call")
        contact_ids = list(request.contact_ids)
        phones = await self.db.run(lambda s: repo.contact_phones(s, workspace_id=ws, contact_ids=contact_ids))
        addresses = sorted({p for p in phones.values() if p})
        at = now()
        fresh_after = at - timedelta(seconds=self.settings.capability_ttl_seconds)
        known = await self.db.run(
            lambda s: repo.cached_capabilities(
                s, workspace_id=ws, addresses=addresses, fresh_after=fresh_after
            )
        )
        missing = [a for a in addresses if a not in known]
        if missing and self.capability_lookup is not None:
            answers = await self.capability_lookup(missing)
            answered = {a: bool(answers[a]) for a in missing if a in answers}
            await self.db.run(lambda s: repo.store_capabilities(s, workspace_id=ws, results=answered, now=at))
            known.update((a, (capable, at)) for a, capable in answered.items())
        out = []
        for contact_id in contact_ids:
            cap = pb.Capability(contact_id=contact_id)
            phone = phones.get(contact_id)
            if phone and phone in known:
                capable, checked = known[phone]
                cap.rcs_capable = capable
                cap.check_time.FromDatetime(checked)
            out.append(cap)
        return pb.GetCapabilitiesResponse(capabilities=out)

    # -- contact events --------------------------------------------------------------------------

    async def RecordEvents(self, request: pb.RecordEventsRequest, context: Any) -> pb.RecordEventsResponse:
        ws = require_workspace(request.workspace_id)
        if len(request.events) > MAX_BATCH:
            raise InvalidArgument.of("events", f"at most {MAX_BATCH} per call")
        at = now()
        events: list[repo.EventData] = []
        for i, e in enumerate(request.events):
            require_id(e.contact_id, ids.CONTACT, f"events[{i}].contact_id")
            if not c.EVENT_TYPE_RE.match(e.type):
                raise InvalidArgument.of(f"events[{i}].type", f"must match {c.EVENT_TYPE_RE.pattern}")
            for name in ("message_id", "campaign_id", "node_id", "run_id"):
                if len(getattr(e, name)) > 64:
                    raise InvalidArgument.of(f"events[{i}].{name}", "must be at most 64 characters")
            occurred = c.as_utc(e.occur_time.ToDatetime()) if e.HasField("occur_time") else at
            events.append(
                repo.EventData(
                    contact_id=e.contact_id,
                    type=e.type,
                    occurred_at=occurred,
                    properties=json_format.MessageToDict(e.properties),
                    message_id=e.message_id,
                    campaign_id=e.campaign_id,
                    node_id=e.node_id,
                    run_id=e.run_id,
                )
            )
        stored = await self.db.run(lambda s: repo.record_events(s, workspace_id=ws, events=events, now=at))
        outgoing = []
        for event_id, stored_event in stored:
            props = struct_pb2.Struct()
            props.update(stored_event.properties)
            outgoing.append(
                self._event(
                    ws,
                    stored_event.contact_id,
                    stored_event.type,
                    properties=props,
                    event_id=event_id,
                    at=stored_event.occurred_at,
                    custom=True,
                )
            )
        await self._publish(outgoing)
        return pb.RecordEventsResponse(recorded=len(stored))

    async def QueryEvents(self, request: pb.QueryEventsRequest, context: Any) -> pb.QueryEventsResponse:
        ws = require_workspace(request.workspace_id)
        if len(request.queries) > MAX_BATCH:
            raise InvalidArgument.of("queries", f"at most {MAX_BATCH} per call")
        queries = []
        for i, q in enumerate(request.queries):
            require_id(q.contact_id, ids.CONTACT, f"queries[{i}].contact_id")
            if not c.EVENT_TYPE_RE.match(q.type):
                raise InvalidArgument.of(f"queries[{i}].type", f"must match {c.EVENT_TYPE_RE.pattern}")
            queries.append(
                repo.EventQueryData(
                    contact_id=q.contact_id,
                    type=q.type,
                    node_id=q.node_id,
                    message_id=q.message_id,
                    run_id=q.run_id,
                    since=c.as_utc(q.since.ToDatetime()) if q.HasField("since") else None,
                )
            )
        answers = await self.db.run(lambda s: repo.query_events(s, workspace_id=ws, queries=queries))
        return pb.QueryEventsResponse(occurred=answers)

    # -- segments --------------------------------------------------------------------------------

    async def CreateSegment(self, request: pb.CreateSegmentRequest, context: Any) -> pb.CreateSegmentResponse:
        ws = require_workspace(request.workspace_id)
        name = segment_name(request.name)
        compile_filter(request.filter, workspace_id=ws, now=now())
        blob = request.filter.SerializeToString()
        view = await self.db.run(
            lambda s: repo.create_segment(s, workspace_id=ws, name=name, filter_proto=blob, now=now())
        )
        return pb.CreateSegmentResponse(segment=segment_pb(view))

    async def GetSegment(self, request: pb.GetSegmentRequest, context: Any) -> pb.GetSegmentResponse:
        ws = require_workspace(request.workspace_id)
        segment_id = require_id(request.segment_id, ids.SEGMENT, "segment_id")
        view = await self.db.run(lambda s: repo.get_segment(s, workspace_id=ws, segment_id=segment_id))
        return pb.GetSegmentResponse(segment=segment_pb(view))

    async def UpdateSegment(self, request: pb.UpdateSegmentRequest, context: Any) -> pb.UpdateSegmentResponse:
        ws = require_workspace(request.workspace_id)
        segment_id = require_id(request.segment_id, ids.SEGMENT, "segment_id")
        name = segment_name(request.name) if request.name else None
        blob = None
        if request.HasField("filter"):
            compile_filter(request.filter, workspace_id=ws, now=now())
            blob = request.filter.SerializeToString()
        view = await self.db.run(
            lambda s: repo.update_segment(
                s, workspace_id=ws, segment_id=segment_id, name=name, filter_proto=blob, now=now()
            )
        )
        return pb.UpdateSegmentResponse(segment=segment_pb(view))

    async def DeleteSegment(self, request: pb.DeleteSegmentRequest, context: Any) -> pb.DeleteSegmentResponse:
        ws = require_workspace(request.workspace_id)
        segment_id = require_id(request.segment_id, ids.SEGMENT, "segment_id")
        await self.db.run(lambda s: repo.delete_segment(s, workspace_id=ws, segment_id=segment_id))
        return pb.DeleteSegmentResponse()

    async def ListSegments(self, request: pb.ListSegmentsRequest, context: Any) -> pb.ListSegmentsResponse:
        ws = require_workspace(request.workspace_id)
        size = page_size(request.page.page_size, DEFAULT_PAGE, MAX_PAGE, "page.page_size")
        after = cursor(request.page.page_token, ids.SEGMENT, "page.page_token")
        views = await self.db.run(lambda s: repo.list_segments(s, workspace_id=ws, after=after, limit=size))
        token = views[-1].id if len(views) == size else ""
        return pb.ListSegmentsResponse(
            segments=[segment_pb(v) for v in views], page={"next_page_token": token}
        )

    async def _segment_filter(self, ws: str, segment_id: str) -> pb.Filter:
        view = await self.db.run(lambda s: repo.get_segment(s, workspace_id=ws, segment_id=segment_id))
        stored = pb.Filter()
        stored.ParseFromString(view.filter_proto)
        return stored

    async def EstimateAudience(
        self, request: pb.EstimateAudienceRequest, context: Any
    ) -> pb.EstimateAudienceResponse:
        ws = require_workspace(request.workspace_id)
        target = request.WhichOneof("target")
        if target == "segment_id":
            segment_id = require_id(request.segment_id, ids.SEGMENT, "segment_id")
            plan = compile_count(await self._segment_filter(ws, segment_id), workspace_id=ws, now=now())
        elif target == "filter":
            plan = compile_count(request.filter, workspace_id=ws, now=now())
        else:
            raise InvalidArgument.of("target", "set segment_id or filter")
        size = await self.db.run(lambda s: repo.count_audience(s, workspace_id=ws, plan=plan))
        return pb.EstimateAudienceResponse(size=size)

    async def StreamMembers(
        self, request: pb.StreamMembersRequest, context: Any
    ) -> AsyncIterator[pb.StreamMembersResponse]:
        ws = require_workspace(request.workspace_id)
        segment_id = require_id(request.segment_id, ids.SEGMENT, "segment_id")
        size = page_size(request.page_size, DEFAULT_STREAM_PAGE, MAX_STREAM_PAGE, "page_size")
        after = cursor(request.after_contact_id, ids.CONTACT, "after_contact_id")
        # One `now` for the whole stream, so event windows do not slide between pages.
        where = compile_filter(await self._segment_filter(ws, segment_id), workspace_id=ws, now=now())
        while True:
            page, after, count = await self.db.run(
                lambda s, cursor_at=after: repo.stream_page(
                    s, workspace_id=ws, where=where, after=cursor_at, limit=size
                )
            )
            if count:
                yield page
            if count < size:
                return
