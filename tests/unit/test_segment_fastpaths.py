"""The segment service's fast paths decide exactly what the plain, slow paths decide.

`normalise_email` answers plain addresses from a per-domain cache of email-validator's verdict;
these tests hold it to the library's own answer on every input, accepted or refused. The storage
fast paths (bulk COPY/executemany inserts, `stream_page`, `count_audience`) are held to the slow
ones (`members_page` and `member_pb`, the compiled filter) on SQLite and PostgreSQL: the database
fixture, the audience builders and the plain-Python filter evaluator are test_segment_filters'.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from email_validator import EmailNotValidError, validate_email
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.exc import IntegrityError

from services.segment import ids, repo
from services.segment.contacts import (
    ConsentData,
    ContactData,
    ContactView,
    FieldVal,
    as_utc,
    field_value_pb,
    normalise_email,
)
from services.segment.filters import compile_count, compile_filter
from services.segment.server import MIGRATIONS
from shoal.db import Database
from shoal.v1 import segment_pb2 as pb
from tests.fixtures_db import module_database
from tests.unit.test_segment_filters import (
    ACTIVE,
    BOUNCED,
    EMAIL,
    GRANTED,
    MESSAGE,
    NEWSLETTER,
    NOW,
    PAIRS,
    PENDING,
    REVOKED,
    SMS,
    Person,
    all_of,
    any_of,
    cond,
    consent,
    custom_condition,
    evaluate,
    filters,
    leaf,
    negate,
    person,
    select_ids,
    store,
    tag,
)


def reference(raw: str) -> str | None:
    """What email-validator alone says: the lower-cased normalised address, or None (refused)."""
    try:
        return validate_email(raw, check_deliverability=False).normalized.lower()
    except EmailNotValidError:
        return None


def ours(raw: str) -> str | None:
    try:
        return normalise_email(raw)
    except ValueError:
        return None


EDGES = [
    "ada@example.com",
    "Ada.Lovelace+news@Example.COM",
    "o'brien@example.ie",
    "a!#$%&'*+-/=?^_`{|}~@example.com",
    ".ada@example.com",
    "ada.@example.com",
    "a..b@example.com",
    "ada@example",  # no dot: not globally deliverable
    "ada@localhost",
    "ada@printer.local",
    "ada@site.test",
    "ada@site.invalid",
    "ada@site.onion",
    "ada@example.123",  # all-numeric top-level label
    "ada@-example.com",
    "ada@example-.com",
    "ada@ex--ample.com",
    "ada@ab--example.com",
    "ada@xn--bcher-kva.example",  # Punycode: normalised to Unicode
    "ada@xn--zz.example",  # invalid Punycode
    "ada@xn--.example",
    "ada@example..com",
    "ada@example.com.",
    "ada@.example.com",
    "ada@@example.com",
    "ada@exa_mple.com",
    "ada@[127.0.0.1]",
    '"ada"@example.com',
    "Ada <ada@example.com>",
    "ada@bücher.example",
    "pöstmaster@example.com",
    "POSTMASTER@example.com",
    "ada@example.com\n",
    "a" * 64 + "@example.com",
    "a" * 65 + "@example.com",
    "a@" + ".".join(["b" * 63] * 3) + "." + "c" * 61,  # a 253-character domain: address too long
    "a@" + ".".join(["b" * 63] * 3) + "." + "c" * 62,  # a 254-character domain
    "a@" + "b" * 64 + ".com",  # label too long
    "a" * 60 + "@" + ".".join(["b" * 60] * 3) + ".com",  # address over 254
    "a" * 10 + "@" + ".".join(["b" * 60] * 3) + ".co",
    "a" * 63 + "@" + ".".join(["b" * 60] * 3) + "." + "c" * 7,  # 254 characters: the limit
    "a" * 63 + "@" + ".".join(["b" * 60] * 3) + "." + "c" * 8,  # 255: one over
    "a@xn--bcher-kva." + "b" * 60 + "." + "c" * 60 + "." + "d" * 60 + ".e",
]


@pytest.mark.parametrize("raw", EDGES)
def test_edge_addresses_decided_like_the_library(raw: str) -> None:
    assert ours(raw) == reference(raw)


def test_refusals_keep_the_library_reason() -> None:
    with pytest.raises(ValueError, match=r"is not a valid email address: .*period"):
        normalise_email("a..b@example.com")
    with pytest.raises(ValueError, match="is not a valid email address"):
        normalise_email("ada@localhost")


_LOCAL = st.text(alphabet="aZ09._+-!#'`{|}~\"@<> \\é", min_size=0, max_size=12)
_DOMAIN = st.lists(
    st.sampled_from(
        [
            "example",
            "com",
            "EXAMPLE",
            "xn--bcher-kva",
            "xn--zz",
            "a-b",
            "-a",
            "a-",
            "ab--c",
            "123",
            "",
            "test",
            "local",
            "bücher",
            "a_b",
            "co",
            "x" * 63,
            "x" * 64,
        ]
    ),
    min_size=1,
    max_size=5,
).map(".".join)


@settings(max_examples=600, deadline=None)
@given(local=_LOCAL, domain=_DOMAIN)
def test_random_addresses_decided_like_the_library(local: str, domain: str) -> None:
    raw = f"{local}@{domain}"
    assert ours(raw) == reference(raw)
    # The second answer comes from the warm domain cache and must not differ.
    assert ours(raw) == reference(raw)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_arbitrary_text_decided_like_the_library(raw: str) -> None:
    assert ours(raw) == reference(raw)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    """One database per backend for the module; every test stores into workspaces of its own."""
    yield from module_database(request, tmp_path_factory, MIGRATIONS, "fastpaths")


# -- ids ------------------------------------------------------------------------------------------


def _reference_encode(value: int, length: int = 10) -> str:
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    return "".join(alphabet[(value >> (5 * i)) & 31] for i in reversed(range(length)))


def test_batched_ids_increase_with_single_ones() -> None:
    made = ids.new_ids(ids.CONTACT, 3000) + [ids.new_id(ids.CONTACT) for _ in range(10)]
    made += ids.new_ids(ids.CONTACT, 5) + ids.new_ids(ids.CONTACT, 0)
    assert made == sorted(made) and len(set(made)) == len(made)
    assert all(ids.is_id(i, ids.CONTACT) for i in made)
    for value in (0, 1, 31, 32, 1023, 1024, (1 << 50) - 1, 0x2_5A5A_5A5A_5A5A):
        assert ids._encode10(value) == _reference_encode(value)


# -- storage fast paths against the slow ones, on SQLite and PostgreSQL -----------------------------


def _people_with_everything() -> list[Person]:
    stamp = datetime(2026, 2, 3, 4, 5, 6, 789012, tzinfo=UTC)
    return [
        Person(
            ContactData(
                external_id="crm-1",
                email="ann@example.com",
                phone="+14155552671",
                first_name="Ann",
                last_name="Lovelace",
                status=ACTIVE,
                tags=["vip", "bêta", "two words"],
                fields={
                    "plan": FieldVal("string", 'gold "quoted" \\ back'),
                    "score": FieldVal("number", 10.25),
                    "big": FieldVal("number", 1e20),
                    "opted": FieldVal("bool", False),
                    "since": FieldVal("timestamp", stamp),
                    "empty": FieldVal("string", ""),
                },
                consents=[
                    ConsentData(EMAIL, NEWSLETTER, GRANTED, "form", "proof\nline"),
                    ConsentData(EMAIL, NEWSLETTER, REVOKED, "unsubscribe"),
                    ConsentData(SMS, MESSAGE, PENDING),
                ],
            )
        ),
        Person(ContactData(email="bob@test.org", status=BOUNCED)),
        Person(ContactData(first_name="Cy", tags=[], fields={"opted": FieldVal("bool", True)})),
    ]


def member_pb(view: ContactView) -> pb.Member:
    """The Member of a stored contact the long way (the servicer's conversion before stream_page)."""
    member = pb.Member(
        contact_id=view.id,
        email=view.email or "",
        phone=view.phone or "",
        status=view.status,  # type: ignore[arg-type]
        tags=list(view.tags),
        first_name=view.first_name or "",
        last_name=view.last_name or "",
    )
    for name, value in view.fields.items():
        member.fields[name].CopyFrom(field_value_pb(value))
    return member


def test_stream_page_is_the_member_of_each_stored_contact(db: Database) -> None:
    people = _people_with_everything() + [
        Person(ContactData(email=f"p{i}@example.com", tags=[f"t{i % 3}"])) for i in range(7)
    ]
    ws = store(db, people)
    where = compile_filter(None, workspace_id=ws, now=NOW)
    with db.session() as s:
        views = repo.members_page(s, workspace_id=ws, where=where, after="", limit=100)
        expected = [member_pb(v) for v in views]
        streamed: list[pb.Member] = []
        after = ""
        while True:
            page, after, count = repo.stream_page(s, workspace_id=ws, where=where, after=after, limit=4)
            streamed.extend(page.members)
            if count < 4:
                break
    assert len(expected) == len(people)
    assert streamed == expected


def eligibility_pb(view: ContactView | None, contact_id: str, channel: int, granted: bool) -> pb.Eligibility:
    """The answer of CheckEligibility the long way (the servicer's conversion before the fast path)."""
    if view is None:
        return pb.Eligibility(contact_id=contact_id, reason=pb.INELIGIBLE_REASON_UNKNOWN_CONTACT)
    address = (view.email if channel == EMAIL else view.phone) or ""
    if view.status != ACTIVE:
        reason = pb.INELIGIBLE_REASON_NOT_ACTIVE
    elif not address:
        reason = pb.INELIGIBLE_REASON_NO_ADDRESS
    elif not granted:
        reason = pb.INELIGIBLE_REASON_NO_CONSENT
    else:
        reason = pb.INELIGIBLE_REASON_UNSPECIFIED
    item = pb.Eligibility(
        contact_id=contact_id,
        eligible=reason == pb.INELIGIBLE_REASON_UNSPECIFIED,
        reason=reason,  # type: ignore[arg-type]
        address=address,
        first_name=view.first_name or "",
        last_name=view.last_name or "",
    )
    for name, value in view.fields.items():
        item.fields[name].CopyFrom(field_value_pb(value))
    return item


@pytest.mark.parametrize(("channel", "message_type"), [(EMAIL, NEWSLETTER), (SMS, MESSAGE), (EMAIL, MESSAGE)])
def test_check_eligibility_answers_from_the_stored_contact(
    db: Database, channel: int, message_type: int
) -> None:
    people = [
        *_people_with_everything(),
        Person(
            ContactData(
                email="dee@example.com",
                phone="+12025550142",
                consents=[ConsentData(channel, message_type, GRANTED)],
            )
        ),
        Person(ContactData(email="eve@example.com", consents=[ConsentData(channel, message_type, PENDING)])),
    ]
    ws = store(db, people)
    unknown = "c_00000000000000000000"
    asked = [p.id for p in people] + [unknown, people[0].id]
    with db.session() as s:
        views = repo.load_contacts(s, workspace_id=ws, contact_ids=[p.id for p in people])
        answer = repo.check_eligibility(
            s, workspace_id=ws, contact_ids=asked, channel=channel, message_type=message_type
        )
    granted = {p.id for p in people if p.consent.get((channel, message_type)) == GRANTED}
    expected = [eligibility_pb(views.get(i), i, channel, i in granted) for i in asked]
    assert list(answer.results) == expected
    assert any(r.eligible for r in answer.results)


def test_recorded_events_are_stored_once_per_id(db: Database) -> None:
    """The receipts consumer's events: a redelivered receipt (same event id) is stored once,
    events of unknown contacts are skipped, and each reads back as it was recorded."""
    people = [Person(ContactData(email=f"ev{i}@example.com")) for i in range(3)]
    ws = store(db, people)
    at = NOW - timedelta(hours=1, microseconds=250)

    def event(contact_id: str, event_id: str) -> repo.EventData:
        return repo.EventData(
            contact_id,
            "email.opened",
            at,
            {"provider": "p", "n": [1, {"b": 2, "a": 1}]},
            "m1",
            "cmp",
            "n1",
            "r1",
            event_id,
        )

    first = [
        event(people[0].id, "evt_AAAAAAAAAAAAAAAAAAAA"),
        event("c_00000000000000000000", "evt_BBBBBBBBBBBBBBBBBBBB"),
    ]
    first += [event(people[1].id, "evt_CCCCCCCCCCCCCCCCCCCC")] * 2
    with db.session() as s:
        stored = repo.record_events(s, workspace_id=ws, events=first, now=NOW)
    assert [event_id for event_id, _ in stored] == [
        "evt_AAAAAAAAAAAAAAAAAAAA",
        "evt_CCCCCCCCCCCCCCCCCCCC",
        "evt_CCCCCCCCCCCCCCCCCCCC",
    ]
    with db.session() as s:
        repo.record_events(
            s,
            workspace_id=ws,
            events=[event(people[0].id, "evt_AAAAAAAAAAAAAAAAAAAA"), event(people[2].id, "")],
            now=NOW,
        )
        rows = s.execute(
            repo.contact_events.select()
            .where(repo.contact_events.c.workspace_id == ws)
            .order_by(repo.contact_events.c.contact_id)
        ).all()
        found = repo.query_events(
            s,
            workspace_id=ws,
            queries=[
                repo.EventQueryData(
                    p.id, "email.opened", node_id="n1", message_id="m1", run_id="r1", since=at
                )
                for p in people
            ]
            + [repo.EventQueryData(people[0].id, "email.opened", since=at + timedelta(microseconds=1))],
        )
    assert [r.contact_id for r in rows] == sorted(p.id for p in people)
    assert {r.properties_json for r in rows} == {'{"n":[1,{"a":1,"b":2}],"provider":"p"}'}
    assert {(r.campaign_id, as_utc(r.occurred_at), as_utc(r.recorded_at)) for r in rows} == {("cmp", at, NOW)}
    assert found == [True, True, True, False]


def test_bounces_move_only_active_contacts_of_the_workspace(db: Database) -> None:
    """mark_bounced (driver SQL): ACTIVE -> BOUNCED with updated_at, other statuses and other
    workspaces untouched, unknown and repeated ids harmless; the count is of contacts changed."""
    people = [
        Person(ContactData(email=f"b{i}@example.com", status=status))
        for i, status in enumerate([ACTIVE, ACTIVE, pb.CONTACT_STATUS_UNSUBSCRIBED, ACTIVE])
    ]
    ws = store(db, people)
    stranger = Person(ContactData(email="b0@example.com"))
    other = store(db, [stranger])
    later = NOW + timedelta(minutes=5, microseconds=7)
    asked = [people[0].id, people[0].id, people[1].id, people[2].id, stranger.id, "c_00000000000000000000"]
    with db.session() as s:
        changed = repo.mark_bounced(s, workspace_id=ws, contact_ids=asked, now=later)
        again = repo.mark_bounced(s, workspace_id=ws, contact_ids=asked, now=later)
        nothing = repo.mark_bounced(s, workspace_id=ws, contact_ids=[], now=later)
        views = repo.load_contacts(s, workspace_id=ws, contact_ids=[p.id for p in people])
        untouched = repo.get_contact(s, workspace_id=other, contact_id=stranger.id)
    assert (changed, again, nothing) == (2, 0, 0)
    assert [views[p.id].status for p in people] == [BOUNCED, BOUNCED, pb.CONTACT_STATUS_UNSUBSCRIBED, ACTIVE]
    assert [views[p.id].updated_at for p in people] == [later, later, NOW, NOW]
    assert (untouched.status, untouched.updated_at) == (ACTIVE, NOW)


def test_bulk_insert_round_trips_every_value_and_consent(db: Database) -> None:
    people = _people_with_everything()
    ws = store(db, people)
    with db.session() as s:
        views = repo.load_contacts(s, workspace_id=ws, contact_ids=[p.id for p in people])
        history = repo.list_consent(s, workspace_id=ws, contact_id=people[0].id, include_history=True)
        current = repo.list_consent(s, workspace_id=ws, contact_id=people[0].id, include_history=False)
    for p in people:
        view = views[p.id]
        assert (view.external_id, view.email, view.phone, view.first_name, view.last_name) == (
            p.data.external_id,
            p.data.email,
            p.data.phone,
            p.data.first_name,
            p.data.last_name,
        )
        assert view.status == (p.data.status or ACTIVE)
        assert view.tags == tuple(sorted(p.data.tags or []))
        assert dict(view.fields) == p.data.fields
        assert view.created_at == view.updated_at == NOW
    # History in order of the input; the current record per (channel, type) is the last one.
    assert [(r.channel, r.message_type, r.status, r.source, r.proof) for r in history] == [
        (EMAIL, NEWSLETTER, GRANTED, "form", "proof\nline"),
        (EMAIL, NEWSLETTER, REVOKED, "unsubscribe", ""),
        (SMS, MESSAGE, PENDING, "", ""),
    ]
    assert sorted((r.channel, r.status) for r in current) == sorted([(EMAIL, REVOKED), (SMS, PENDING)])
    # Typed side rows: each value findable by its kind, and by nothing else.
    for f, expected in [
        (cond("fields.since", "eq", datetime(2026, 2, 3, 4, 5, 6, 789012, tzinfo=UTC)), {people[0].id}),
        (cond("fields.opted", "eq", False), {people[0].id}),
        (cond("fields.opted", "eq", True), {people[2].id}),
        (cond("fields.big", "gt", 1e19), {people[0].id}),
        (cond("fields.empty", "eq", ""), {people[0].id}),
        (cond("fields.plan", "contains", '"QUOTED" \\'), {people[0].id}),
        (tag("two words"), {people[0].id}),
        (consent(EMAIL, NEWSLETTER, REVOKED), {people[0].id}),
        (consent(EMAIL, NEWSLETTER, GRANTED), set()),
    ]:
        assert select_ids(db, ws, f) == expected, f


def test_import_updates_and_creates_in_bulk(db: Database) -> None:
    """More keys than one lookup chunk, half of them known: updated in place, the rest created."""
    ws = f"ws_bulk_{next(_bulk)}"
    first = [
        (i, ContactData(external_id=f"x{i}", tags=["old"], fields={"n": FieldVal("number", 1.0)}))
        for i in range(0, 12_000, 2)
    ]
    with db.session() as s:
        outcome = repo.import_contacts(s, workspace_id=ws, rows=first, now=NOW)
    assert len(outcome.created) == 6000 and not outcome.updated
    second = [
        (
            i,
            ContactData(
                external_id=f"x{i}",
                tags=["new"],
                fields={"m": FieldVal("string", "v")},
                consents=[ConsentData(EMAIL, NEWSLETTER, GRANTED)],
            ),
        )
        for i in range(12_000)
    ]
    later = NOW + timedelta(hours=1)
    with db.session() as s:
        outcome = repo.import_contacts(s, workspace_id=ws, rows=second, now=later)
    assert len(outcome.created) == 6000 and len(outcome.updated) == 6000
    assert all(tags == ("new",) for _, tags in outcome.updated)
    with db.session() as s:
        views = repo.load_contacts(s, workspace_id=ws, contact_ids=[c for c, _ in outcome.updated[:50]])
    for view in views.values():
        assert view.tags == ("new",) and view.updated_at == later and view.created_at == NOW
        assert dict(view.fields) == {"n": FieldVal("number", 1.0), "m": FieldVal("string", "v")}
    assert len(select_ids(db, ws, tag("old"))) == 0
    assert len(select_ids(db, ws, all_of(tag("new"), consent(EMAIL, NEWSLETTER, GRANTED)))) == 12_000
    assert len(select_ids(db, ws, cond("fields.n", "eq", 1.0))) == 6000


_bulk = itertools.count()


def test_a_copy_that_breaks_a_unique_key_raises_integrity_error(db: Database) -> None:
    """The servicer turns IntegrityError into "external_id_taken": COPY must raise it too."""
    ws = store(db, [Person(ContactData(external_id="dup"))])
    with pytest.raises(IntegrityError), db.session() as s:
        repo.insert_contacts(
            s, workspace_id=ws, items=[(ids.new_id(ids.CONTACT), ContactData(external_id="dup"))], now=NOW
        )


# -- EstimateAudience's count against the members the same filter selects --------------------------


def count(db: Database, ws: str, f: pb.Filter | None) -> int:
    plan = compile_count(f, workspace_id=ws, now=NOW)
    with db.session() as s:
        return repo.count_audience(s, workspace_id=ws, plan=plan)


anchor = st.one_of(
    st.sampled_from(["a", "b", "c", "d"]).map(tag),
    st.builds(
        lambda pair, s: consent(pair[0], pair[1], s),
        st.sampled_from(PAIRS),
        st.sampled_from([GRANTED, REVOKED, PENDING]),
    ),
    custom_condition().filter(
        lambda f: f.field.operator not in (pb.OPERATOR_NEQ, pb.OPERATOR_EXISTS)  # the drivable ones
    ),
)
conjunction = st.builds(
    lambda anchors, others: all_of(*anchors, *others),
    st.lists(anchor, min_size=1, max_size=3),
    st.lists(st.one_of(leaf, filters), max_size=2),
)


@pytest.mark.parametrize("first_cap", [10_000, 1])  # 1: every anchor counted in the second pass
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(people=st.lists(person, max_size=8), f=st.one_of(conjunction, filters, anchor))
def test_count_matches_the_selected_members(
    db: Database, monkeypatch: pytest.MonkeyPatch, first_cap: int, people: list[Person], f: pb.Filter
) -> None:
    monkeypatch.setattr(repo, "ANCHOR_FIRST_CAP", first_cap)
    ws = store(db, people)
    expected = {p.id for p in people if evaluate(f, p)}
    assert select_ids(db, ws, f) == expected
    assert count(db, ws, f) == len(expected)


def test_count_plan_splits_nested_conjunctions() -> None:
    f = all_of(
        tag("a"),
        all_of(cond("fields.plan", "eq", "gold"), negate(tag("b"))),
        cond("fields.plan", "neq", "x"),
        cond("fields.plan", "exists"),
        cond("status", "eq", "ACTIVE"),
        consent(EMAIL, NEWSLETTER, GRANTED),
    )
    plan = compile_count(f, workspace_id="ws", now=NOW)
    assert [a.table.name for a in plan.anchors] == ["contact_tags", "contact_fields", "consent_current"]
    assert compile_count(tag("a"), workspace_id="ws", now=NOW).anchors
    assert not compile_count(any_of(tag("a"), tag("b")), workspace_id="ws", now=NOW).anchors
    assert not compile_count(None, workspace_id="ws", now=NOW).anchors


def test_count_is_workspace_scoped_and_skips_orphans(db: Database) -> None:
    people = [Person(ContactData(email=f"o{i}@example.com", tags=["t"], consents=[])) for i in range(4)]
    ws = store(db, people)
    other = store(db, [Person(ContactData(tags=["t"])) for _ in range(3)])
    with db.session() as s:
        # A side row whose contact is gone (a delete racing a tag change) counts for nobody.
        s.execute(repo.contacts.delete().where(repo.contacts.c.id == people[0].id))
    assert count(db, ws, tag("t")) == 3
    assert count(db, ws, all_of(tag("t"), cond("email", "exists"))) == 3
    assert count(db, other, tag("t")) == 3
    assert count(db, ws, all_of(tag("t"), tag("missing"))) == 0
    assert count(db, ws, None) == 3
