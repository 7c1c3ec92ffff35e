"""The filter compiler against a real database (SQLite, and PostgreSQL when configured).

Each operator and combinator on a small known audience; validation errors naming tree paths;
injection attempts; and a property test: random filters over random contacts select exactly what a
plain-Python evaluator of the same semantics selects.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.segment import ids, repo
from services.segment.contacts import ConsentData, ContactData, FieldVal, format_timestamp
from services.segment.filters import compile_filter
from services.segment.server import MIGRATIONS
from shoal.db import Database
from shoal.errors import InvalidArgument
from shoal.v1 import common_pb2
from shoal.v1 import segment_pb2 as pb
from tests.fixtures_db import module_database

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
EMAIL, SMS = common_pb2.CHANNEL_EMAIL, common_pb2.CHANNEL_SMS
NEWSLETTER, MESSAGE = common_pb2.MESSAGE_TYPE_NEWSLETTER, common_pb2.MESSAGE_TYPE_MESSAGE
GRANTED, REVOKED, PENDING = pb.CONSENT_STATUS_GRANTED, pb.CONSENT_STATUS_REVOKED, pb.CONSENT_STATUS_PENDING
ACTIVE, BOUNCED = pb.CONTACT_STATUS_ACTIVE, pb.CONTACT_STATUS_BOUNCED
OPS = {
    "eq": pb.OPERATOR_EQ,
    "neq": pb.OPERATOR_NEQ,
    "in": pb.OPERATOR_IN,
    "gt": pb.OPERATOR_GT,
    "gte": pb.OPERATOR_GTE,
    "lt": pb.OPERATOR_LT,
    "lte": pb.OPERATOR_LTE,
    "contains": pb.OPERATOR_CONTAINS,
    "exists": pb.OPERATOR_EXISTS,
}
_workspaces = itertools.count()


@dataclass
class Person:
    """A contact as both sides see it: stored through the repository, evaluated in Python."""

    data: ContactData
    events: list[tuple[str, datetime]] = field(default_factory=list)
    id: str = ""

    @property
    def consent(self) -> dict[tuple[int, int], int]:
        current: dict[tuple[int, int], int] = {}
        for c in self.data.consents:
            current[(c.channel, c.message_type)] = c.status
        return current


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    """One database per backend for the whole module: every test stores into workspaces of its own,
    so sharing is safe, and PostgreSQL pays for CREATE DATABASE and migrations once."""
    yield from module_database(request, tmp_path_factory, MIGRATIONS, "filters")


def store(db: Database, people: list[Person]) -> str:
    """Store `people` in a fresh workspace (so examples never see each other) and return it."""
    ws = f"ws_{next(_workspaces)}"
    with db.session() as s:
        for p in people:
            p.id = ids.new_id(ids.CONTACT)
        repo.insert_contacts(s, workspace_id=ws, items=[(p.id, p.data) for p in people], now=NOW)
        repo.record_events(
            s,
            workspace_id=ws,
            events=[repo.EventData(p.id, kind, at, {}) for p in people for kind, at in p.events],
            now=NOW,
        )
    return ws


def select_ids(db: Database, ws: str, f: pb.Filter) -> set[str]:
    where = compile_filter(f, workspace_id=ws, now=NOW)
    with db.session() as s:
        return {v.id for v in repo.members_page(s, workspace_id=ws, where=where, after="", limit=100_000)}


# -- builders -------------------------------------------------------------------------------------


def value(v: object) -> common_pb2.FieldValue:
    if isinstance(v, bool):
        return common_pb2.FieldValue(bool_value=v)
    if isinstance(v, int | float):
        return common_pb2.FieldValue(number_value=float(v))
    if isinstance(v, datetime):
        return common_pb2.FieldValue(timestamp_value=format_timestamp(v))
    return common_pb2.FieldValue(string_value=str(v))


def cond(name: str, op: str, v: object = None) -> pb.Filter:
    c = pb.FieldCondition(field=name, operator=OPS[op])  # type: ignore[arg-type]
    if op == "in":
        c.values.extend(value(x) for x in v)  # type: ignore[attr-defined]
    elif v is not None:
        c.value.CopyFrom(value(v))
    return pb.Filter(field=c)


def all_of(*fs: pb.Filter) -> pb.Filter:
    return pb.Filter(all_of=pb.FilterList(filters=fs))


def any_of(*fs: pb.Filter) -> pb.Filter:
    return pb.Filter(any_of=pb.FilterList(filters=fs))


def negate(f: pb.Filter) -> pb.Filter:
    return pb.Filter(negate=f)


def tag(t: str) -> pb.Filter:
    return pb.Filter(tag=pb.TagCondition(tag=t))


def consent(channel: int, message_type: int, status: int) -> pb.Filter:
    return pb.Filter(consent=pb.ConsentCondition(channel=channel, message_type=message_type, status=status))  # type: ignore[arg-type]


def event(kind: str, min_count: int = 0, max_count: int = 0, within: int = 0) -> pb.Filter:
    return pb.Filter(
        event=pb.EventCondition(type=kind, min_count=min_count, max_count=max_count, within_seconds=within)
    )


# -- each operator on a known audience ------------------------------------------------------------

T1 = datetime(2026, 1, 1, tzinfo=UTC)
T2 = datetime(2026, 3, 1, tzinfo=UTC)


def audience() -> dict[str, Person]:
    def f(**kv: object) -> dict[str, FieldVal | None]:
        kinds = {bool: "bool", float: "number", int: "number", str: "string", datetime: "timestamp"}
        return {
            k: FieldVal(kinds[type(v)], float(v) if isinstance(v, int) and not isinstance(v, bool) else v)
            for k, v in kv.items()
        }  # type: ignore[misc]

    return {
        "ann": Person(
            ContactData(
                email="ann@example.com",
                first_name="Ann",
                status=ACTIVE,
                tags=["vip", "beta"],
                fields=f(plan="gold", score=10, opted=True, since=T1),
                consents=[ConsentData(EMAIL, NEWSLETTER, GRANTED)],
            ),
            events=[
                ("open", NOW - timedelta(hours=1)),
                ("open", NOW - timedelta(days=2)),
                ("click", NOW - timedelta(days=40)),
            ],
        ),
        "bob": Person(
            ContactData(
                email="bob@test.org",
                first_name="Bob",
                status=BOUNCED,
                tags=["beta"],
                fields=f(plan="silver", score=3.5, opted=False, since=T2),
                consents=[ConsentData(EMAIL, NEWSLETTER, GRANTED), ConsentData(EMAIL, NEWSLETTER, REVOKED)],
            ),
            events=[("open", NOW - timedelta(days=10))],
        ),
        "cy": Person(
            ContactData(
                phone="+14155552671",
                first_name="100%_sure",
                status=ACTIVE,
                fields=f(plan="Gold plan", score="10"),  # a string score: never compared as a number
                consents=[ConsentData(SMS, MESSAGE, PENDING)],
            )
        ),
    }


CASES: list[tuple[str, pb.Filter, set[str]]] = [
    ("eq builtin", cond("email", "eq", "ann@example.com"), {"ann"}),
    ("neq builtin includes missing", cond("email", "neq", "ann@example.com"), {"bob", "cy"}),
    ("in builtin", cond("first_name", "in", ["Ann", "Bob", "Zed"]), {"ann", "bob"}),
    ("contains is case-insensitive", cond("email", "contains", "EXAMPLE"), {"ann"}),
    ("contains escapes % and _", cond("first_name", "contains", "0%_"), {"cy"}),
    ("contains % is literal", cond("first_name", "contains", "%"), {"cy"}),
    ("exists builtin", cond("phone", "exists"), {"cy"}),
    ("status by name", cond("status", "eq", "BOUNCED"), {"bob"}),
    ("status by enum name", cond("status", "in", ["CONTACT_STATUS_ACTIVE"]), {"ann", "cy"}),
    ("status neq", cond("status", "neq", "active"), {"bob"}),
    ("create_time gte", cond("create_time", "gte", NOW), {"ann", "bob", "cy"}),
    ("string field eq", cond("fields.plan", "eq", "gold"), {"ann"}),
    ("string field contains", cond("fields.plan", "contains", "gold"), {"ann", "cy"}),
    ("number field gt", cond("fields.score", "gt", 3.5), {"ann"}),
    ("number field gte", cond("fields.score", "gte", 3.5), {"ann", "bob"}),
    ("number field lt", cond("fields.score", "lt", 10), {"bob"}),
    ("number field lte", cond("fields.score", "lte", 10), {"ann", "bob"}),
    ("number eq ignores a string value", cond("fields.score", "eq", 10), {"ann"}),
    ("string eq ignores a number value", cond("fields.score", "eq", "10"), {"cy"}),
    ("number neq", cond("fields.score", "neq", 10), {"bob", "cy"}),
    ("number in", cond("fields.score", "in", [3.5, 99]), {"bob"}),
    ("bool eq", cond("fields.opted", "eq", False), {"bob"}),
    ("timestamp lt", cond("fields.since", "lt", T2), {"ann"}),
    ("timestamp eq", cond("fields.since", "eq", T2), {"bob"}),
    ("field exists", cond("fields.opted", "exists"), {"ann", "bob"}),
    ("unknown custom field", cond("fields.nothing", "exists"), set()),
    ("tag", tag("beta"), {"ann", "bob"}),
    ("not tag", negate(tag("vip")), {"bob", "cy"}),
    ("consent latest record counts", consent(EMAIL, NEWSLETTER, GRANTED), {"ann"}),
    ("consent revoked", consent(EMAIL, NEWSLETTER, REVOKED), {"bob"}),
    ("consent pending", consent(SMS, MESSAGE, PENDING), {"cy"}),
    ("event at least once", event("open", min_count=1), {"ann", "bob"}),
    ("event at least twice", event("open", min_count=2), {"ann"}),
    ("event within window", event("open", min_count=1, within=3 * 86400), {"ann"}),
    ("event at most once (none counts)", event("open", max_count=1), {"bob", "cy"}),
    ("event between", event("open", min_count=1, max_count=1), {"bob"}),
    ("event old outside window", event("click", min_count=1, within=30 * 86400), set()),
    ("all_of", all_of(tag("beta"), cond("status", "eq", "ACTIVE")), {"ann"}),
    ("any_of", any_of(tag("vip"), cond("phone", "exists")), {"ann", "cy"}),
    (
        "nested",
        any_of(all_of(tag("beta"), negate(consent(EMAIL, NEWSLETTER, GRANTED))), negate(any_of(tag("beta")))),
        {"bob", "cy"},
    ),
    ("double negation", negate(negate(cond("fields.plan", "eq", "gold"))), {"ann"}),
]


def test_id_in_narrows_to_given_contacts(db: Database) -> None:
    people = audience()
    ws = store(db, list(people.values()))
    wanted = [people["ann"].id, people["bob"].id, "c_00000000000000000000"]
    f = all_of(tag("beta"), cond("id", "in", wanted))
    assert select_ids(db, ws, f) == {people["ann"].id, people["bob"].id}
    assert select_ids(db, ws, all_of(negate(tag("vip")), cond("id", "in", wanted))) == {people["bob"].id}


@pytest.mark.parametrize(("name", "f", "expected"), CASES, ids=[c[0] for c in CASES])
def test_operator(db: Database, name: str, f: pb.Filter, expected: set[str]) -> None:
    people = audience()
    ws = store(db, list(people.values()))
    by_id = {p.id: n for n, p in people.items()}
    assert {by_id[i] for i in select_ids(db, ws, f)} == expected
    # The Python evaluator agrees on every hand-written case too.
    assert {n for n, p in people.items() if evaluate(f, p)} == expected


def test_empty_filter_selects_everyone(db: Database) -> None:
    ws = store(db, list(audience().values()))
    assert len(select_ids(db, ws, pb.Filter())) == 3


# -- validation -----------------------------------------------------------------------------------

ERRORS: list[tuple[pb.Filter, list[str]]] = [
    (all_of(), ["filter.all_of.filters"]),
    (all_of(tag("a"), pb.Filter()), ["filter.all_of.filters[1]"]),
    (
        all_of(tag("a"), pb.Filter(field=pb.FieldCondition(field="email"))),
        ["filter.all_of.filters[1].field.operator"],
    ),
    (cond("nope", "eq", "x"), ["filter.field.field"]),
    (cond("fields.", "eq", "x"), ["filter.field.field"]),
    (cond("fields.a.b", "eq", "x"), ["filter.field.field"]),
    (cond("email", "eq"), ["filter.field.value"]),
    (cond("email", "gt", "a"), ["filter.field.value"]),
    (cond("email", "eq", 3), ["filter.field.value"]),
    (cond("fields.n", "contains", 3), ["filter.field.value"]),
    (cond("fields.n", "lt", True), ["filter.field.value"]),
    (cond("fields.n", "in", []), ["filter.field.values"]),
    (cond("fields.n", "in", ["a", 1]), ["filter.field.values"]),
    (cond("fields.n", "exists", "x"), ["filter.field.value"]),
    (cond("fields.t", "gt", "2026-13-01T00:00:00Z"), ["filter.field.value"]),
    (cond("status", "eq", "SLEEPING"), ["filter.field.value"]),
    (cond("status", "gt", 1), ["filter.field.operator"]),
    (negate(any_of(tag(""))), ["filter.negate.any_of.filters[0].tag.tag"]),
    (consent(0, NEWSLETTER, GRANTED), ["filter.consent.channel"]),
    (consent(EMAIL, 0, 0), ["filter.consent.message_type", "filter.consent.status"]),
    (event("open"), ["filter.event.min_count"]),
    (event("open", min_count=3, max_count=2), ["filter.event.max_count"]),
    (event("", min_count=1, within=-1), ["filter.event.type", "filter.event.within_seconds"]),
]


@pytest.mark.parametrize(("f", "paths"), ERRORS)
def test_errors_name_the_path_and_rule(f: pb.Filter, paths: list[str]) -> None:
    with pytest.raises(InvalidArgument) as err:
        compile_filter(f, workspace_id="ws", now=NOW)
    assert [v.field for v in err.value.violations] == paths
    assert all(v.description for v in err.value.violations)
    assert err.value.reason == "invalid_filter"


def test_depth_and_size_are_bounded() -> None:
    deep = tag("x")
    for _ in range(20):
        deep = negate(deep)
    with pytest.raises(InvalidArgument, match="nest at most"):
        compile_filter(deep, workspace_id="ws", now=NOW)
    wide = any_of(*[tag(str(i)) for i in range(300)])
    with pytest.raises(InvalidArgument, match="at most 200 conditions"):
        compile_filter(wide, workspace_id="ws", now=NOW)


# -- injection ------------------------------------------------------------------------------------

NASTY = [
    "' OR '1'='1",
    "x'); DROP TABLE contacts; --",
    '" OR 1=1 --',
    "%",
    "_",
    "\\",
    "ann@example.com' --",
    "1; SELECT * FROM contact_fields",
    "\x00",
]


@pytest.mark.parametrize("text", NASTY)
def test_injection_in_values_selects_nothing_unexpected(db: Database, text: str) -> None:
    people = audience()
    ws = store(db, list(people.values()))
    everyone = {p.id for p in people.values()}
    for f in (
        cond("email", "eq", text),
        cond("first_name", "in", [text, "nobody"]),
        cond("fields.plan", "eq", text),
        cond("email", "contains", text),
        tag(text),
        event(text, min_count=1),
    ):
        try:
            selected = select_ids(db, ws, f)
        except InvalidArgument:
            continue  # refused at the edge is fine; a database error is not
        expected = {p.id for p in people.values() if evaluate(f, p)}
        assert selected == expected
    assert select_ids(db, ws, pb.Filter()) == everyone  # nothing was dropped or altered


@pytest.mark.parametrize(
    "name",
    [f"fields.{t}" for t in NASTY if t != "_"] + NASTY + ["fields.plan; DROP TABLE x", "fields.plan--"],
)
def test_injection_in_field_names_is_refused(name: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        compile_filter(cond(name, "eq", "x"), workspace_id="ws", now=NOW)
    assert [v.field for v in err.value.violations] == ["filter.field.field"]


def test_filters_are_workspace_scoped(db: Database) -> None:
    people = audience()
    ws = store(db, list(people.values()))
    other = store(db, list(audience().values()))
    for f, _ in [(c[1], c[2]) for c in CASES]:
        assert select_ids(db, ws, f).isdisjoint(select_ids(db, other, f))


# -- the plain-Python evaluator and the property test ---------------------------------------------


def evaluate(f: pb.Filter, p: Person) -> bool:
    kind = f.WhichOneof("expr")
    if kind is None:
        return True
    if kind == "all_of":
        return all(evaluate(c, p) for c in f.all_of.filters)
    if kind == "any_of":
        return any(evaluate(c, p) for c in f.any_of.filters)
    if kind == "negate":
        return not evaluate(f.negate, p)
    if kind == "tag":
        return f.tag.tag.strip() in (p.data.tags or [])
    if kind == "consent":
        c = f.consent
        return p.consent.get((c.channel, c.message_type)) == c.status
    if kind == "event":
        e = f.event
        since = NOW - timedelta(seconds=e.within_seconds) if e.within_seconds else None
        count = sum(1 for k, at in p.events if k == e.type.strip() and (since is None or at >= since))
        return count >= e.min_count and (e.max_count == 0 or count <= e.max_count)
    return evaluate_field(f.field, p)


def _operand(v: common_pb2.FieldValue) -> tuple[str, object]:
    which = v.WhichOneof("kind")
    if which == "string_value":
        return "string", v.string_value
    if which == "number_value":
        return "number", v.number_value
    if which == "bool_value":
        return "bool", v.bool_value
    return "timestamp", datetime.fromisoformat(v.timestamp_value)


def evaluate_field(c: pb.FieldCondition, p: Person) -> bool:
    op = c.operator
    if c.field.startswith("fields."):
        stored = p.data.fields.get(c.field.removeprefix("fields."))
        current: tuple[str, object] | None = (stored.kind, stored.value) if stored else None
    else:
        column = {"create_time": None, "update_time": None}.get(c.field, getattr(p.data, c.field, None))
        if c.field in ("create_time", "update_time"):
            current = ("timestamp", NOW)
        elif c.field == "status":
            current = ("status", column or ACTIVE)
        else:
            current = None if column is None else ("string", column)
    if op == pb.OPERATOR_EXISTS:
        return current is not None
    if current is None:
        return op == pb.OPERATOR_NEQ
    operands = [_operand(v) for v in c.values] if op == pb.OPERATOR_IN else [_operand(c.value)]
    if current[0] == "status":
        names = {pb.ContactStatus.Name(s).removeprefix("CONTACT_STATUS_"): s for s in (1, 2, 3, 4)}
        operands = [("status", names[str(v).upper().removeprefix("CONTACT_STATUS_")]) for _, v in operands]
    matching = [v for k, v in operands if k == current[0]]
    value = current[1]
    if op == pb.OPERATOR_EQ:
        return value in matching
    if op == pb.OPERATOR_NEQ:
        return value not in matching
    if op == pb.OPERATOR_IN:
        return value in matching
    if not matching:
        return False
    x = matching[0]
    if op == pb.OPERATOR_CONTAINS:
        return str(x).lower() in str(value).lower()
    return {
        pb.OPERATOR_GT: lambda: value > x,  # type: ignore[operator]
        pb.OPERATOR_GTE: lambda: value >= x,  # type: ignore[operator]
        pb.OPERATOR_LT: lambda: value < x,  # type: ignore[operator]
        pb.OPERATOR_LTE: lambda: value <= x,  # type: ignore[operator]
    }[op]()


STRINGS = st.sampled_from(["", "a", "ab", "Ab", "b%", "a_b", "zz"])
NUMBERS = st.sampled_from([-1.0, 0.0, 1.5, 2.0, 10.0])
TIMES = st.sampled_from([T1, T2, NOW])
TYPED = st.one_of(
    STRINGS.map(lambda v: FieldVal("string", v)),
    NUMBERS.map(lambda v: FieldVal("number", v)),
    st.booleans().map(lambda v: FieldVal("bool", v)),
    TIMES.map(lambda v: FieldVal("timestamp", v)),
)
PAIRS = [(EMAIL, NEWSLETTER), (SMS, MESSAGE)]
person = st.builds(
    lambda email, first, status, tags, fields, consents, events: Person(
        ContactData(
            email=email,
            first_name=first,
            status=status,
            tags=sorted(tags),
            fields=fields,
            consents=[ConsentData(ch, mt, s) for (ch, mt), s in consents],
        ),
        events=events,
    ),
    st.sampled_from([None, "a@example.com", "b@test.org"]),
    st.sampled_from([None, "Ann", "ann", "A_b%"]),
    st.sampled_from([1, 2, 3, 4]),
    st.sets(st.sampled_from(["a", "b", "c"])),
    st.dictionaries(st.sampled_from(["f1", "f2"]), TYPED, max_size=2),
    st.lists(st.tuples(st.sampled_from(PAIRS), st.sampled_from([GRANTED, REVOKED, PENDING])), max_size=3),
    st.lists(
        st.tuples(
            st.sampled_from(["open", "click"]),
            st.sampled_from([timedelta(hours=1), timedelta(days=2), timedelta(days=40)]).map(
                lambda d: NOW - d
            ),
        ),
        max_size=4,
    ),
)


def _value_of(kind: str) -> st.SearchStrategy[object]:
    return {"string": STRINGS, "number": NUMBERS, "bool": st.booleans(), "timestamp": TIMES}[kind]


@st.composite
def custom_condition(draw: st.DrawFn) -> pb.Filter:
    name = draw(st.sampled_from(["fields.f1", "fields.f2"]))
    kind = draw(st.sampled_from(["string", "number", "bool", "timestamp"]))
    ops = ["eq", "neq", "in", "exists"]
    ops += ["gt", "gte", "lt", "lte"] if kind in ("number", "timestamp") else []
    ops += ["contains"] if kind == "string" else []
    op = draw(st.sampled_from(ops))
    if op == "exists":
        return cond(name, op)
    if op == "in":
        return cond(name, op, draw(st.lists(_value_of(kind), min_size=1, max_size=3)))
    return cond(name, op, draw(_value_of(kind)))


@st.composite
def builtin_condition(draw: st.DrawFn) -> pb.Filter:
    name = draw(st.sampled_from(["email", "first_name", "status", "create_time"]))
    if name == "status":
        op = draw(st.sampled_from(["eq", "neq", "in", "exists"]))
        names = st.sampled_from(["ACTIVE", "unsubscribed", "BOUNCED", "CONTACT_STATUS_BLOCKED"])
    elif name == "create_time":
        op = draw(st.sampled_from(["eq", "neq", "gt", "gte", "lt", "lte", "exists"]))
        names = TIMES  # type: ignore[assignment]
    else:
        op = draw(st.sampled_from(["eq", "neq", "in", "contains", "exists"]))
        names = st.sampled_from(["a@example.com", "Ann", "ann", "a", "%", "_b", "example"])
    if op == "exists":
        return cond(name, op)
    if op == "in":
        return cond(name, op, draw(st.lists(names, min_size=1, max_size=3)))
    return cond(name, op, draw(names))


leaf = st.one_of(
    custom_condition(),
    builtin_condition(),
    st.sampled_from(["a", "b", "c", "d"]).map(tag),
    st.builds(
        lambda pair, s: consent(pair[0], pair[1], s),
        st.sampled_from(PAIRS),
        st.sampled_from([GRANTED, REVOKED, PENDING]),
    ),
    st.builds(
        lambda kind, lo, hi, within: (
            event(kind, lo, max(hi, lo) if hi else 0, within) if lo or hi else event(kind, 1)
        ),
        st.sampled_from(["open", "click"]),
        st.integers(0, 2),
        st.integers(0, 2),
        st.sampled_from([0, 3 * 3600, 7 * 86400]),
    ),
)
filters = st.recursive(
    leaf,
    lambda children: st.one_of(
        st.lists(children, min_size=1, max_size=3).map(lambda fs: all_of(*fs)),
        st.lists(children, min_size=1, max_size=3).map(lambda fs: any_of(*fs)),
        children.map(negate),
    ),
    max_leaves=8,
)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(people=st.lists(person, max_size=8), f=filters)
def test_sql_matches_python_evaluator(db: Database, people: list[Person], f: pb.Filter) -> None:
    ws = store(db, people)
    expected = {p.id for p in people if evaluate(f, p)}
    assert select_ids(db, ws, f) == expected
