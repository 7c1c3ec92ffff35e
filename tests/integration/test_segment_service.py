"""The segment service over real gRPC (port 0) on a real database (SQLite, and PostgreSQL when set)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from google.protobuf import struct_pb2

from services.segment import servicer
from services.segment.config import SegmentSettings
from services.segment.server import build
from shoal.bus import Bus
from shoal.errors import from_rpc_error
from shoal.grpc import GrpcServer
from shoal.v1 import common_pb2, segment_pb2_grpc
from shoal.v1 import segment_pb2 as pb
from tests.fixtures_db import POSTGRES_URL, postgres_database

WS = "ws_a"
OTHER_WS = "ws_b"
_workspaces = itertools.count()
pytestmark = pytest.mark.asyncio(loop_scope="module")
EMAIL, SMS, RCS = common_pb2.CHANNEL_EMAIL, common_pb2.CHANNEL_SMS, common_pb2.CHANNEL_RCS
NEWSLETTER, MESSAGE = common_pb2.MESSAGE_TYPE_NEWSLETTER, common_pb2.MESSAGE_TYPE_MESSAGE
GRANTED, REVOKED, PENDING = pb.CONSENT_STATUS_GRANTED, pb.CONSENT_STATUS_REVOKED, pb.CONSENT_STATUS_PENDING


@dataclass
class Harness:
    stub: segment_pb2_grpc.SegmentServiceStub
    server: GrpcServer
    lookups: list[list[str]] = field(default_factory=list)
    # Each test works in workspaces of its own, so one server and database serve the module.
    ws: str = WS
    other: str = OTHER_WS


async def start(url: str, tmp_path: Path, bus: Bus | None = None) -> tuple[Harness, grpc.aio.Channel]:
    settings = SegmentSettings.load(
        database_url=url,
        port=0,
        publish_events=bus is not None,
        consume_receipts=bus is not None,
        data_dir=tmp_path,
    )
    lookups: list[list[str]] = []

    async def lookup(addresses: Sequence[str]) -> dict[str, bool]:
        lookups.append(list(addresses))
        # The test provider: numbers ending in an odd digit are RCS capable.
        return {a: int(a[-1]) % 2 == 1 for a in addresses}

    server = await build(settings, bus=bus, capability_lookup=lookup)
    await server.start()
    channel = grpc.aio.insecure_channel(server.address)
    return Harness(segment_pb2_grpc.SegmentServiceStub(channel), server, lookups), channel


@pytest_asyncio.fixture(
    scope="module",
    loop_scope="module",
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
)
async def shared(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Harness]:
    """One server and database per backend for the module (PostgreSQL pays its setup once)."""
    made: Iterator[str] | None = None
    tmp = tmp_path_factory.mktemp("segment")
    if request.param == "sqlite":
        url = f"sqlite:///{tmp / 'segment.db'}"
    elif not POSTGRES_URL:
        pytest.skip("PostgreSQL not configured: set SHOAL_TEST_POSTGRES_URL to run this case")
    else:
        made = postgres_database()
        url = next(made)
    harness, channel = await start(url, tmp)
    yield harness
    await channel.close()
    await harness.server.stop(0)
    if made is not None:
        for _ in made:
            pass


@pytest.fixture
def svc(shared: Harness) -> Harness:
    n = next(_workspaces)
    shared.lookups.clear()
    return replace(shared, ws=f"ws_{n}", other=f"ws_{n}_other")


def violations(exc: grpc.aio.AioRpcError) -> list[str]:
    return [v.field for v in from_rpc_error(exc).violations]


async def create(svc: Harness, ws: str | None = None, **fields: object) -> pb.Contact:
    tags = fields.pop("tags", [])
    custom = fields.pop("fields", {})
    contact = pb.ContactInput(tags=tags, **fields)  # type: ignore[arg-type]
    for name, value in custom.items():  # type: ignore[attr-defined]
        contact.fields[name].CopyFrom(value)
    reply = await svc.stub.CreateContact(pb.CreateContactRequest(workspace_id=ws or svc.ws, contact=contact))
    return reply.contact


def fv(value: object) -> common_pb2.FieldValue:
    if isinstance(value, bool):
        return common_pb2.FieldValue(bool_value=value)
    if isinstance(value, int | float):
        return common_pb2.FieldValue(number_value=float(value))
    return common_pb2.FieldValue(string_value=str(value))


# -- contacts -------------------------------------------------------------------------------------


async def test_create_get_update_delete(svc: Harness) -> None:
    created = await create(
        svc,
        email="Ada@Example.COM",
        phone="+33 6 12 34 56 78",
        first_name=" Ada ",
        tags=["vip", "vip", "beta"],
        fields={"plan": fv("gold"), "score": fv(7), "opted": fv(True)},
    )
    assert created.id.startswith("c_") and len(created.id) == 22
    assert created.email == "ada@example.com"
    assert created.phone == "+33612345678"
    assert created.first_name == "Ada"
    assert created.status == pb.CONTACT_STATUS_ACTIVE
    assert sorted(created.tags) == ["beta", "vip"]
    assert created.fields["score"].number_value == 7.0

    got = (
        await svc.stub.GetContact(pb.GetContactRequest(workspace_id=svc.ws, contact_id=created.id))
    ).contact
    assert got == created

    update = pb.ContactInput(last_name="Lovelace", tags=["new"])
    update.fields["score"].number_value = 9
    update.fields["since"].timestamp_value = "2026-01-31T12:00:00+02:00"
    update.fields["opted"].Clear()  # an empty value removes the field
    updated = (
        await svc.stub.UpdateContact(
            pb.UpdateContactRequest(workspace_id=svc.ws, contact_id=created.id, contact=update)
        )
    ).contact
    assert updated.last_name == "Lovelace"
    assert updated.email == "ada@example.com"  # not named, not blanked
    assert list(updated.tags) == ["new"]  # tags replace
    assert dict(updated.fields) == {
        "plan": fv("gold"),
        "score": fv(9),
        "since": common_pb2.FieldValue(timestamp_value="2026-01-31T10:00:00Z"),
    }  # fields merge

    # With a mask only the named fields change, and an empty one clears.
    masked = (
        await svc.stub.UpdateContact(
            pb.UpdateContactRequest(
                workspace_id=svc.ws,
                contact_id=created.id,
                contact=pb.ContactInput(email="", first_name="Augusta", status=pb.CONTACT_STATUS_BLOCKED),
                update_mask=["email", "status"],
            )
        )
    ).contact
    assert masked.email == "" and masked.first_name == "Ada" and masked.status == pb.CONTACT_STATUS_BLOCKED

    await svc.stub.DeleteContact(pb.DeleteContactRequest(workspace_id=svc.ws, contact_id=created.id))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await svc.stub.GetContact(pb.GetContactRequest(workspace_id=svc.ws, contact_id=created.id))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


INVALID_CONTACTS: list[tuple[pb.ContactInput, str]] = [
    (pb.ContactInput(email="not-an-email"), "contact.email"),
    (pb.ContactInput(phone="0612345678"), "contact.phone"),
    (pb.ContactInput(phone="+1 000"), "contact.phone"),
    (pb.ContactInput(status=99), "contact.status"),  # type: ignore[arg-type]
    (pb.ContactInput(tags=[" "]), "contact.tags[0]"),
    (pb.ContactInput(tags=["x" * 65]), "contact.tags[0]"),
    (pb.ContactInput(first_name="x" * 256), "contact.first_name"),
    (pb.ContactInput(last_name="a\x00b"), "contact.last_name"),
    (pb.ContactInput(fields={"bad name": fv("x")}), "contact.fields"),
    (
        pb.ContactInput(fields={"when": common_pb2.FieldValue(timestamp_value="yesterday")}),
        "contact.fields[when]",
    ),
    (
        pb.ContactInput(fields={"when": common_pb2.FieldValue(timestamp_value="2026-01-01T00:00:00")}),
        "contact.fields[when]",
    ),
    (pb.ContactInput(fields={"n": common_pb2.FieldValue(number_value=float("nan"))}), "contact.fields[n]"),
    (
        pb.ContactInput(consents=[pb.ConsentInput(channel=EMAIL, status=GRANTED)]),
        "contact.consents[0].message_type",
    ),
]


async def test_create_rejects_invalid_input(svc: Harness) -> None:
    for contact, field_name in INVALID_CONTACTS:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await svc.stub.CreateContact(pb.CreateContactRequest(workspace_id=svc.ws, contact=contact))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violations(err.value) == [field_name], field_name
    listed = await svc.stub.ListContacts(pb.ListContactsRequest(workspace_id=svc.ws))
    assert not listed.contacts  # nothing half-written


async def test_required_ids_and_workspace(svc: Harness) -> None:
    for request, name in [
        (pb.GetContactRequest(workspace_id="", contact_id="c_00000000000000000000"), "workspace_id"),
        (pb.GetContactRequest(workspace_id=svc.ws, contact_id="x'; DROP TABLE contacts;--"), "contact_id"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await svc.stub.GetContact(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violations(err.value) == [name]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await svc.stub.UpdateContact(
            pb.UpdateContactRequest(
                workspace_id=svc.ws, contact_id="c_00000000000000000000", update_mask=["nope"]
            )
        )
    assert violations(err.value) == ["update_mask"]


async def test_external_id_unique_per_workspace(svc: Harness) -> None:
    first = await create(svc, external_id="crm-1", email="a@example.com")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create(svc, external_id="crm-1")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert violations(err.value) == ["contact.external_id"]
    # Another workspace may use the same external id.
    await create(svc, ws=svc.other, external_id="crm-1")
    second = await create(svc, external_id="crm-2")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await svc.stub.UpdateContact(
            pb.UpdateContactRequest(
                workspace_id=svc.ws, contact_id=second.id, contact=pb.ContactInput(external_id="crm-1")
            )
        )
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert first.id != second.id


async def test_upsert_by_external_id_then_email(svc: Harness) -> None:
    up = svc.stub.UpsertContact
    r1 = await up(
        pb.UpsertContactRequest(
            workspace_id=svc.ws, contact=pb.ContactInput(external_id="e1", first_name="A")
        )
    )
    assert r1.created
    r2 = await up(
        pb.UpsertContactRequest(workspace_id=svc.ws, contact=pb.ContactInput(external_id="e1", last_name="B"))
    )
    assert not r2.created and r2.contact.id == r1.contact.id
    assert (r2.contact.first_name, r2.contact.last_name) == ("A", "B")
    r3 = await up(
        pb.UpsertContactRequest(workspace_id=svc.ws, contact=pb.ContactInput(email="x@example.com"))
    )
    r4 = await up(
        pb.UpsertContactRequest(
            workspace_id=svc.ws, contact=pb.ContactInput(email="X@Example.com", tags=["t"])
        )
    )
    assert r3.created and not r4.created and r4.contact.id == r3.contact.id and list(r4.contact.tags) == ["t"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await up(pb.UpsertContactRequest(workspace_id=svc.ws, contact=pb.ContactInput(first_name="nobody")))
    assert violations(err.value) == ["contact.external_id"]


async def test_list_contacts_pages_and_filter(svc: Harness) -> None:
    made = [await create(svc, first_name=f"n{i}", tags=["even"] if i % 2 == 0 else []) for i in range(7)]
    await create(svc, ws=svc.other, first_name="elsewhere")
    seen: list[str] = []
    token = ""
    while True:
        reply = await svc.stub.ListContacts(
            pb.ListContactsRequest(
                workspace_id=svc.ws, page=common_pb2.PageRequest(page_size=3, page_token=token)
            )
        )
        seen.extend(c.id for c in reply.contacts)
        token = reply.page.next_page_token
        if not token:
            break
    assert seen == sorted(c.id for c in made)
    reply = await svc.stub.ListContacts(
        pb.ListContactsRequest(workspace_id=svc.ws, filter=pb.Filter(tag=pb.TagCondition(tag="even")))
    )
    assert [c.first_name for c in reply.contacts] == ["n0", "n2", "n4", "n6"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await svc.stub.ListContacts(
            pb.ListContactsRequest(workspace_id=svc.ws, page=common_pb2.PageRequest(page_token="' OR 1=1"))
        )
    assert violations(err.value) == ["page.page_token"]


async def test_workspace_isolation(svc: Harness) -> None:
    mine = await create(svc, email="a@example.com", tags=["t"])
    theirs = await create(svc, ws=svc.other, email="a@example.com", tags=["t"])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await svc.stub.GetContact(pb.GetContactRequest(workspace_id=svc.other, contact_id=mine.id))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    for call in (
        svc.stub.DeleteContact(pb.DeleteContactRequest(workspace_id=svc.other, contact_id=mine.id)),
        svc.stub.AddTag(pb.AddTagRequest(workspace_id=svc.other, contact_id=mine.id, tag="x")),
        svc.stub.SetConsent(
            pb.SetConsentRequest(
                workspace_id=svc.other,
                contact_id=mine.id,
                consent=pb.ConsentInput(channel=EMAIL, message_type=NEWSLETTER, status=GRANTED),
            )
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    listed = await svc.stub.ListContacts(pb.ListContactsRequest(workspace_id=svc.ws))
    assert [c.id for c in listed.contacts] == [mine.id]
    estimate = await svc.stub.EstimateAudience(
        pb.EstimateAudienceRequest(workspace_id=svc.ws, filter=pb.Filter(tag=pb.TagCondition(tag="t")))
    )
    assert estimate.size == 1
    elig = await svc.stub.CheckEligibility(
        pb.CheckEligibilityRequest(
            workspace_id=svc.ws, contact_ids=[theirs.id], channel=EMAIL, message_type=NEWSLETTER
        )
    )
    assert elig.results[0].reason == pb.INELIGIBLE_REASON_UNKNOWN_CONTACT
    upserted = await svc.stub.UpsertContact(
        pb.UpsertContactRequest(workspace_id=svc.other, contact=pb.ContactInput(email="a@example.com"))
    )
    assert upserted.contact.id == theirs.id


# -- tags, consent, eligibility -------------------------------------------------------------------


async def test_tags_are_idempotent(svc: Harness) -> None:
    contact = await create(svc)
    add = pb.AddTagRequest(workspace_id=svc.ws, contact_id=contact.id, tag="vip")
    assert (await svc.stub.AddTag(add)).changed
    assert not (await svc.stub.AddTag(add)).changed
    got = await svc.stub.GetContact(pb.GetContactRequest(workspace_id=svc.ws, contact_id=contact.id))
    assert list(got.contact.tags) == ["vip"]
    remove = pb.RemoveTagRequest(workspace_id=svc.ws, contact_id=contact.id, tag="vip")
    assert (await svc.stub.RemoveTag(remove)).changed
    assert not (await svc.stub.RemoveTag(remove)).changed
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await svc.stub.AddTag(pb.AddTagRequest(workspace_id=svc.ws, contact_id=contact.id, tag=""))
    assert violations(err.value) == ["tag"]


async def test_consent_history_and_double_opt_in(svc: Harness) -> None:
    contact = await create(svc, email="a@example.com")
    set_consent = svc.stub.SetConsent

    def req(status: int, *, confirm: bool = False, source: str = "") -> pb.SetConsentRequest:
        return pb.SetConsentRequest(
            workspace_id=svc.ws,
            contact_id=contact.id,
            consent=pb.ConsentInput(channel=EMAIL, message_type=NEWSLETTER, status=status, source=source),  # type: ignore[arg-type]
            confirm=confirm,
        )

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await set_consent(req(0, confirm=True))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    pending = (await set_consent(req(PENDING, source="signup form"))).consent
    assert pending.status == PENDING and not pending.HasField("confirm_time")
    confirmed = (await set_consent(req(0, confirm=True))).consent
    assert confirmed.status == GRANTED and confirmed.HasField("confirm_time")
    assert confirmed.source == "signup form"
    await set_consent(
        pb.SetConsentRequest(
            workspace_id=svc.ws,
            contact_id=contact.id,
            consent=pb.ConsentInput(channel=SMS, message_type=MESSAGE, status=REVOKED),
        )
    )
    current = await svc.stub.ListConsent(pb.ListConsentRequest(workspace_id=svc.ws, contact_id=contact.id))
    assert [(r.channel, r.status) for r in current.consents] == [(EMAIL, GRANTED), (SMS, REVOKED)]
    history = await svc.stub.ListConsent(
        pb.ListConsentRequest(workspace_id=svc.ws, contact_id=contact.id, include_history=True)
    )
    assert [r.status for r in history.consents] == [PENDING, GRANTED, REVOKED]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await set_consent(req(7))
    assert violations(err.value) == ["consent.status"]


async def test_check_eligibility_reasons(svc: Harness) -> None:
    granted = pb.ConsentInput(channel=EMAIL, message_type=NEWSLETTER, status=GRANTED)
    ok = await create(
        svc, email="ok@example.com", first_name="Ok", fields={"plan": fv("gold")}, consents=[granted]
    )
    no_consent = await create(svc, email="nc@example.com")
    revoked = await create(
        svc,
        email="rv@example.com",
        consents=[granted, pb.ConsentInput(channel=EMAIL, message_type=NEWSLETTER, status=REVOKED)],
    )
    other_type = await create(
        svc,
        email="ot@example.com",
        consents=[pb.ConsentInput(channel=EMAIL, message_type=MESSAGE, status=GRANTED)],
    )
    inactive = await create(
        svc, email="in@example.com", status=pb.CONTACT_STATUS_UNSUBSCRIBED, consents=[granted]
    )
    no_address = await create(svc, phone="+14155552671", consents=[granted])
    ids = [
        ok.id,
        no_consent.id,
        revoked.id,
        other_type.id,
        inactive.id,
        no_address.id,
        "c_00000000000000000000",
    ]
    reply = await svc.stub.CheckEligibility(
        pb.CheckEligibilityRequest(
            workspace_id=svc.ws, contact_ids=ids, channel=EMAIL, message_type=NEWSLETTER
        )
    )
    got = [(r.contact_id, r.eligible, r.reason) for r in reply.results]
    assert got == [
        (ok.id, True, pb.INELIGIBLE_REASON_UNSPECIFIED),
        (no_consent.id, False, pb.INELIGIBLE_REASON_NO_CONSENT),
        (revoked.id, False, pb.INELIGIBLE_REASON_NO_CONSENT),
        (other_type.id, False, pb.INELIGIBLE_REASON_NO_CONSENT),
        (inactive.id, False, pb.INELIGIBLE_REASON_NOT_ACTIVE),
        (no_address.id, False, pb.INELIGIBLE_REASON_NO_ADDRESS),
        ("c_00000000000000000000", False, pb.INELIGIBLE_REASON_UNKNOWN_CONTACT),
    ]
    first = reply.results[0]
    assert (first.address, first.first_name, first.fields["plan"].string_value) == (
        "ok@example.com",
        "Ok",
        "gold",
    )
    sms = await svc.stub.CheckEligibility(
        pb.CheckEligibilityRequest(
            workspace_id=svc.ws, contact_ids=[ok.id], channel=SMS, message_type=NEWSLETTER
        )
    )
    assert sms.results[0].reason == pb.INELIGIBLE_REASON_NO_ADDRESS
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await svc.stub.CheckEligibility(pb.CheckEligibilityRequest(workspace_id=svc.ws, contact_ids=[ok.id]))
    assert violations(err.value) == ["channel"]


# -- segments, estimate, stream -------------------------------------------------------------------


def tag(name: str) -> pb.Filter:
    return pb.Filter(tag=pb.TagCondition(tag=name))


async def test_segment_crud_estimate_and_stream(svc: Harness) -> None:
    members = [await create(svc, first_name=f"m{i}", tags=["fans"]) for i in range(5)]
    await create(svc, first_name="outsider")
    segment = (
        await svc.stub.CreateSegment(
            pb.CreateSegmentRequest(workspace_id=svc.ws, name="Fans", filter=tag("fans"))
        )
    ).segment
    assert segment.id.startswith("seg_") and segment.filter == tag("fans")
    got = await svc.stub.GetSegment(pb.GetSegmentRequest(workspace_id=svc.ws, segment_id=segment.id))
    assert got.segment == segment
    size = await svc.stub.EstimateAudience(
        pb.EstimateAudienceRequest(workspace_id=svc.ws, segment_id=segment.id)
    )
    assert size.size == 5

    pages = [
        [m.contact_id for m in page.members]
        async for page in svc.stub.StreamMembers(
            pb.StreamMembersRequest(workspace_id=svc.ws, segment_id=segment.id, page_size=2)
        )
    ]
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [i for p in pages for i in p] == sorted(m.id for m in members)
    resumed = [
        m.contact_id
        async for page in svc.stub.StreamMembers(
            pb.StreamMembersRequest(
                workspace_id=svc.ws, segment_id=segment.id, page_size=2, after_contact_id=pages[0][1]
            )
        )
        for m in page.members
    ]
    assert resumed == sorted(m.id for m in members)[2:]

    renamed = await svc.stub.UpdateSegment(
        pb.UpdateSegmentRequest(
            workspace_id=svc.ws,
            segment_id=segment.id,
            name="Not fans",
            filter=pb.Filter(negate=tag("fans")),
        )
    )
    assert renamed.segment.name == "Not fans"
    size = await svc.stub.EstimateAudience(
        pb.EstimateAudienceRequest(workspace_id=svc.ws, segment_id=segment.id)
    )
    assert size.size == 1
    listed = await svc.stub.ListSegments(pb.ListSegmentsRequest(workspace_id=svc.ws))
    assert [s.id for s in listed.segments] == [segment.id]
    assert not (await svc.stub.ListSegments(pb.ListSegmentsRequest(workspace_id=svc.other))).segments
    await svc.stub.DeleteSegment(pb.DeleteSegmentRequest(workspace_id=svc.ws, segment_id=segment.id))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await svc.stub.GetSegment(pb.GetSegmentRequest(workspace_id=svc.ws, segment_id=segment.id))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_segment_filter_errors_name_tree_paths(svc: Harness) -> None:
    bad = pb.Filter(
        all_of=pb.FilterList(
            filters=[
                tag("ok"),
                pb.Filter(field=pb.FieldCondition(field="email")),
                pb.Filter(
                    any_of=pb.FilterList(
                        filters=[pb.Filter(field=pb.FieldCondition(field="x; DROP", operator=pb.OPERATOR_EQ))]
                    )
                ),
            ]
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await svc.stub.CreateSegment(pb.CreateSegmentRequest(workspace_id=svc.ws, name="bad", filter=bad))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(err.value) == [
        "filter.all_of.filters[1].field.operator",
        "filter.all_of.filters[2].any_of.filters[0].field.field",
    ]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await svc.stub.CreateSegment(pb.CreateSegmentRequest(workspace_id=svc.ws, name=" ", filter=tag("x")))
    assert violations(err.value) == ["name"]


async def test_stream_is_stable_under_concurrent_writes(svc: Harness) -> None:
    made = [(await create(svc, tags=["s"])).id for _ in range(6)]
    assert made == sorted(made)  # ids sort by creation
    segment = (
        await svc.stub.CreateSegment(pb.CreateSegmentRequest(workspace_id=svc.ws, name="s", filter=tag("s")))
    ).segment
    seen: list[str] = []
    late = ""
    stream = svc.stub.StreamMembers(
        pb.StreamMembersRequest(workspace_id=svc.ws, segment_id=segment.id, page_size=2)
    )
    async for page in stream:
        seen.extend(m.contact_id for m in page.members)
        if not late:
            # A member already read leaves, one not yet read may leave, a new one joins.
            await svc.stub.DeleteContact(pb.DeleteContactRequest(workspace_id=svc.ws, contact_id=made[0]))
            await svc.stub.RemoveTag(pb.RemoveTagRequest(workspace_id=svc.ws, contact_id=made[4], tag="s"))
            late = (await create(svc, tags=["s"])).id
    # Keyset pages never repeat or skip a contact that stayed a member; gRPC may have sent pages
    # ahead of the writes, so the contacts that changed mid-stream may or may not appear.
    assert seen == sorted(set(seen))
    assert {made[0], made[1], made[2], made[3], made[5]} <= set(seen)
    assert set(seen) <= {*made, late}


# -- import ---------------------------------------------------------------------------------------


async def test_import_mixed_rows(svc: Harness) -> None:
    existing = await create(svc, external_id="crm-9", first_name="Old")
    rows = [
        pb.ContactInput(external_id="crm-1", email="one@example.com", tags=["imported"]),
        pb.ContactInput(email="broken"),
        pb.ContactInput(external_id="crm-9", first_name="New"),
        pb.ContactInput(
            phone="+14155552671",
            consents=[pb.ConsentInput(channel=SMS, message_type=MESSAGE, status=GRANTED, source="import")],
        ),
        pb.ContactInput(external_id="crm-1", first_name="dup"),
        pb.ContactInput(fields={"1bad": fv("x")}),
        pb.ContactInput(email="two@example.com", fields={"score": fv(3)}),
    ]
    reply = await svc.stub.ImportContacts(pb.ImportContactsRequest(workspace_id=svc.ws, contacts=rows))
    assert (reply.imported, reply.updated) == (3, 1)
    assert [(r.index, r.field) for r in reply.rejected] == [
        (1, "contacts[1].email"),
        (4, "contacts[4].external_id"),
        (5, "contacts[5].fields"),
    ]
    assert "repeats row 0" in reply.rejected[1].reason
    got = await svc.stub.GetContact(pb.GetContactRequest(workspace_id=svc.ws, contact_id=existing.id))
    assert got.contact.first_name == "New"
    size = await svc.stub.EstimateAudience(
        pb.EstimateAudienceRequest(
            workspace_id=svc.ws,
            filter=pb.Filter(consent=pb.ConsentCondition(channel=SMS, message_type=MESSAGE, status=GRANTED)),
        )
    )
    assert size.size == 1
    # Importing the same file again updates instead of duplicating.
    again = await svc.stub.ImportContacts(
        pb.ImportContactsRequest(workspace_id=svc.ws, contacts=[rows[0], rows[6]])
    )
    assert (again.imported, again.updated, len(again.rejected)) == (0, 2, 0)


async def test_import_limit(svc: Harness) -> None:
    rows = [pb.ContactInput(first_name="x")] * 10_001
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await svc.stub.ImportContacts(pb.ImportContactsRequest(workspace_id=svc.ws, contacts=rows))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(err.value) == ["contacts"]


async def test_import_ten_thousand_in_one_call(svc: Harness) -> None:
    rows = [
        pb.ContactInput(external_id=f"e{i}", email=f"u{i}@example.com", tags=["bulk"]) for i in range(10_000)
    ]
    reply = await svc.stub.ImportContacts(
        pb.ImportContactsRequest(workspace_id=svc.ws, contacts=rows), timeout=60
    )
    assert (reply.imported, reply.updated, len(reply.rejected)) == (10_000, 0, 0)
    size = await svc.stub.EstimateAudience(
        pb.EstimateAudienceRequest(workspace_id=svc.ws, filter=tag("bulk"))
    )
    assert size.size == 10_000


async def test_import_in_parts_behaves_as_one_call(svc: Harness) -> None:
    """Rows are validated and written in parts (servicer.IMPORT_PART); across part boundaries a
    repeated key is still refused, indexes stay those of the whole call, and every row is matched
    against the contacts as they were before the call."""
    part = servicer.IMPORT_PART
    moved = await create(svc, external_id="moves", email="old@example.com", first_name="Old")
    rows = [pb.ContactInput(external_id=f"p{i}", tags=[f"t{i % 3}"]) for i in range(2 * part + 10)]
    rows[1] = pb.ContactInput(external_id="moves", email="new@example.com")
    rows[part + 1] = pb.ContactInput(external_id="p0", first_name="again")
    rows[part + 2] = pb.ContactInput(email="broken")
    # Keyed by the email `moves` had before the call, though row 1 changed it in an earlier part.
    rows[2 * part + 1] = pb.ContactInput(email="old@example.com", last_name="Matched")
    reply = await svc.stub.ImportContacts(
        pb.ImportContactsRequest(workspace_id=svc.ws, contacts=rows), timeout=60
    )
    assert [(r.index, r.field) for r in reply.rejected] == [
        (part + 1, f"contacts[{part + 1}].external_id"),
        (part + 2, f"contacts[{part + 2}].email"),
    ]
    assert "repeats row 0" in reply.rejected[0].reason
    assert (reply.imported, reply.updated) == (len(rows) - 4, 2)
    got = (await svc.stub.GetContact(pb.GetContactRequest(workspace_id=svc.ws, contact_id=moved.id))).contact
    # Applied in row order: row 1 moved the email, the later row (keyed by the old one) set it back.
    assert (got.email, got.first_name, got.last_name) == ("old@example.com", "Old", "Matched")
    size = await svc.stub.EstimateAudience(pb.EstimateAudienceRequest(workspace_id=svc.ws, filter=tag("t0")))
    assert size.size == sum(1 for r in rows if "t0" in r.tags)


async def test_import_failing_in_a_later_part_writes_nothing(
    svc: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One transaction per call: parts already written are rolled back when a later one fails."""
    part = servicer.IMPORT_PART
    validate = servicer.parse_import_rows

    def failing(items: Sequence[pb.ContactInput], start: int = 0, stop: int | None = None) -> object:
        if start >= part:
            raise RuntimeError("validation crashed")
        return validate(items, start, stop)

    monkeypatch.setattr(servicer, "parse_import_rows", failing)
    rows = [pb.ContactInput(external_id=f"f{i}", tags=["doomed"]) for i in range(part + 5)]
    with pytest.raises(grpc.aio.AioRpcError):
        await svc.stub.ImportContacts(
            pb.ImportContactsRequest(workspace_id=svc.ws, contacts=rows), timeout=60
        )
    monkeypatch.setattr(servicer, "parse_import_rows", validate)
    size = await svc.stub.EstimateAudience(
        pb.EstimateAudienceRequest(workspace_id=svc.ws, filter=tag("doomed"))
    )
    assert size.size == 0
    # The same rows go in whole afterwards: nothing of the failed call is left to collide with.
    reply = await svc.stub.ImportContacts(
        pb.ImportContactsRequest(workspace_id=svc.ws, contacts=rows), timeout=60
    )
    assert (reply.imported, reply.updated, len(reply.rejected)) == (len(rows), 0, 0)


# -- capabilities and events ----------------------------------------------------------------------


async def test_capabilities_cached(svc: Harness) -> None:
    odd = await create(svc, phone="+14155552671")
    even = await create(svc, phone="+12025550142")
    no_phone = await create(svc, email="a@example.com")
    request = pb.GetCapabilitiesRequest(workspace_id=svc.ws, contact_ids=[odd.id, even.id, no_phone.id])
    first = await svc.stub.GetCapabilities(request)
    assert [(c.contact_id, c.rcs_capable, c.HasField("check_time")) for c in first.capabilities] == [
        (odd.id, True, True),
        (even.id, False, True),
        (no_phone.id, False, False),
    ]
    second = await svc.stub.GetCapabilities(request)
    assert second == first
    assert svc.lookups == [["+12025550142", "+14155552671"]]  # one batch, then the cache


async def test_record_and_query_events(svc: Harness) -> None:
    contact = await create(svc)
    other = await create(svc)
    now = datetime.now(UTC)
    props = struct_pb2.Struct()
    props.update({"url": "https://example.com"})

    def event(contact_id: str, kind: str, ago: timedelta, **extra: str) -> pb.ContactEventInput:
        e = pb.ContactEventInput(contact_id=contact_id, type=kind, properties=props, **extra)
        e.occur_time.FromDatetime(now - ago)
        return e

    recorded = await svc.stub.RecordEvents(
        pb.RecordEventsRequest(
            workspace_id=svc.ws,
            events=[
                event(contact.id, "email.opened", timedelta(hours=2), node_id="n1", message_id="msg_1"),
                event(contact.id, "email.clicked", timedelta(days=3)),
                event(other.id, "email.opened", timedelta(minutes=1)),
                event("c_00000000000000000000", "email.opened", timedelta(0)),
            ],
        )
    )
    assert recorded.recorded == 3  # the unknown contact's event is skipped

    def q(contact_id: str, kind: str, since: timedelta | None = None, **extra: str) -> pb.EventQuery:
        query = pb.EventQuery(contact_id=contact_id, type=kind, **extra)
        if since is not None:
            query.since.FromDatetime(now - since)
        return query

    reply = await svc.stub.QueryEvents(
        pb.QueryEventsRequest(
            workspace_id=svc.ws,
            queries=[
                q(contact.id, "email.opened"),
                q(contact.id, "email.opened", timedelta(hours=1)),
                q(contact.id, "email.opened", node_id="n1"),
                q(contact.id, "email.opened", node_id="n2"),
                q(contact.id, "email.opened", message_id="msg_1", since=timedelta(hours=3)),
                q(contact.id, "email.clicked", timedelta(days=1)),
                q(other.id, "email.opened", timedelta(hours=1)),
                q(other.id, "email.clicked"),
            ],
        )
    )
    assert list(reply.occurred) == [True, False, True, False, True, False, True, False]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await svc.stub.RecordEvents(
            pb.RecordEventsRequest(
                workspace_id=svc.ws, events=[pb.ContactEventInput(contact_id=contact.id, type="bad type")]
            )
        )
    assert violations(err.value) == ["events[0].type"]
    estimate = await svc.stub.EstimateAudience(
        pb.EstimateAudienceRequest(
            workspace_id=svc.ws,
            filter=pb.Filter(
                event=pb.EventCondition(type="email.opened", min_count=1, within_seconds=3 * 3600)
            ),
        )
    )
    assert estimate.size == 2
