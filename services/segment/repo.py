"""Storage of the segment service: keyword-only functions that take a session and return plain values.

Every statement is scoped by workspace_id. Hot paths (import, eligibility, members, events) are
Core statements over whole batches: one statement per table per batch, never one per contact.
Large IN lists are cut into chunks that stay under SQLite's bound-parameter limit. The import's
inserts and updates go to the driver as plain tuples (COPY on PostgreSQL, executemany on SQLite:
`_BulkInsert`, `_BulkUpdate`), StreamMembers pages are built straight from the stored columns
(`stream_page`), and EstimateAudience counts from the smallest indexed condition
(`count_audience`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Table, delete, exists, func, insert, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.util import ClauseAdapter
from sqlmodel import Session

from services.segment import ids
from services.segment.contacts import (
    ACTIVE,
    ConsentData,
    ContactData,
    ContactView,
    FieldVal,
    as_utc,
    fields_to_json,
    row_to_view,
    tag_set,
    tags_to_json,
)
from services.segment.filters import Anchor, CountPlan
from services.segment.models import (
    Capability,
    ConsentCurrent,
    ConsentRecord,
    Contact,
    ContactEvent,
    ContactField,
    ContactTag,
    Segment,
)
from shoal.errors import Conflict, FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from shoal.v1 import common_pb2
from shoal.v1 import segment_pb2 as pb

contacts: Table = Contact.__table__  # type: ignore[attr-defined]
contact_tags: Table = ContactTag.__table__  # type: ignore[attr-defined]
contact_fields: Table = ContactField.__table__  # type: ignore[attr-defined]
consents: Table = ConsentRecord.__table__  # type: ignore[attr-defined]
consent_current: Table = ConsentCurrent.__table__  # type: ignore[attr-defined]
contact_events: Table = ContactEvent.__table__  # type: ignore[attr-defined]
capabilities: Table = Capability.__table__  # type: ignore[attr-defined]
segments: Table = Segment.__table__  # type: ignore[attr-defined]

# SQLite allows 32,766 bound parameters per statement; stay well below with room for the rest.
CHUNK = 5000
T = TypeVar("T")

_SCALARS = ("external_id", "email", "phone", "first_name", "last_name", "status")
# The columns `_lookup` may match on (they become SQL text, so only these constants).
_LOOKUP_COLUMNS = frozenset({"external_id", "email", "phone"})


def chunks(items: Sequence[T], size: int = CHUNK) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _upsert(session: Session, table: Table, rows: list[dict[str, Any]], *, keys: Sequence[str]) -> None:
    """INSERT ... ON CONFLICT (keys) DO UPDATE every other column, on SQLite and PostgreSQL.

    Rows are de-duplicated by key first (last wins): PostgreSQL refuses to touch one row twice
    in one statement.
    """
    if not rows:
        return
    unique = list({tuple(r[k] for k in keys): r for r in rows}.values())
    dialect = session.get_bind().dialect.name
    stmt: Any = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
    others = [c.name for c in table.columns if c.name not in keys]
    stmt = stmt.on_conflict_do_update(index_elements=list(keys), set_={c: stmt.excluded[c] for c in others})
    for part in chunks(unique, 1000):
        session.execute(stmt, list(part))


class _BulkInsert:
    """A plain INSERT of many rows with no per-row work in SQLAlchemy: COPY on PostgreSQL, the
    driver's own executemany on SQLite.

    SQLAlchemy's executemany turns every row into a dict and runs every value through its bind
    processing; on the import path that cost more than the database work (PostgreSQL: 1,000-row
    INSERT ... VALUES statements load the contacts table ~5x slower than COPY of the same rows).
    Rows are tuples in `columns` order holding values the drivers take as they are: str, int,
    float, bool, None, and timestamps converted once by `_DbTime`.
    """

    def __init__(self, table: Table, columns: Sequence[str]) -> None:
        self.columns = tuple(columns)
        names = ", ".join(self.columns)
        # Table and column names are our own constants, never input.
        self.copy_sql = f"COPY {table.name} ({names}) FROM STDIN"
        self.sqlite_sql = f"INSERT INTO {table.name} ({names}) VALUES ({', '.join('?' * len(self.columns))})"

    def run(self, session: Session, rows: Sequence[tuple[Any, ...]]) -> None:
        if not rows:
            return
        conn = session.connection()
        dialect = conn.dialect.name
        if dialect == "postgresql":
            driver = conn.connection.driver_connection
            try:
                with driver.cursor() as cursor, cursor.copy(self.copy_sql) as copy:  # type: ignore[union-attr]
                    for row in rows:
                        copy.write_row(row)
            except conn.dialect.loaded_dbapi.Error as exc:
                # As SQLAlchemy would raise it (IntegrityError for a unique key...), so callers
                # handle a COPY's failure like any statement's.
                raise DBAPIError.instance(
                    self.copy_sql, None, exc, conn.dialect.loaded_dbapi.Error, dialect=conn.dialect
                ) from exc
        else:
            conn.exec_driver_sql(self.sqlite_sql, list(rows))


class _DbTime:
    """Timestamps as the bulk statements hand them to the driver on this session's dialect.

    SQLite stores SQLAlchemy's text form, rendered by the column type's own bind processing (the
    same function SQLAlchemy would call per value). PostgreSQL gets ISO 8601 text with its offset,
    which a timestamptz column parses to the same instant: psycopg's own datetime dumper cost
    ~1.7 µs per value in COPY, most of the formatting of a contact row; text costs nothing there,
    and reaches an UPDATE's parameters as an untyped literal the column casts.
    """

    def __init__(self, session: Session) -> None:
        dialect = session.connection().dialect
        self.convert: Callable[[Any], Any] | None = (
            datetime.isoformat
            if dialect.name == "postgresql"
            else contacts.c.created_at.type.dialect_impl(dialect).bind_processor(dialect)
        )

    def __call__(self, value: Any) -> Any:
        if value is None or self.convert is None:
            return value
        return self.convert(value)


_CONTACT_COLUMNS = (
    "id",
    "workspace_id",
    "external_id",
    "email",
    "phone",
    "first_name",
    "last_name",
    "status",
    "tags_json",
    "fields_json",
    "created_at",
    "updated_at",
)
_insert_contact_rows = _BulkInsert(contacts, _CONTACT_COLUMNS)
_insert_tag_rows = _BulkInsert(contact_tags, ("contact_id", "tag", "workspace_id"))
_insert_field_rows = _BulkInsert(
    contact_fields,
    ("contact_id", "name", "workspace_id", "kind", "str_value", "num_value", "bool_value", "ts_value"),
)
_CONSENT_COLUMNS = (
    "id",
    "workspace_id",
    "contact_id",
    "channel",
    "message_type",
    "status",
    "source",
    "proof",
    "recorded_at",
    "confirmed_at",
)
_insert_consent_rows = _BulkInsert(consents, _CONSENT_COLUMNS)
_CURRENT_COLUMNS = ("contact_id", "channel", "message_type", "workspace_id", "status", "record_id")
_insert_current_rows = _BulkInsert(consent_current, _CURRENT_COLUMNS)


class _BulkUpdate:
    """An UPDATE run once per row tuple by the driver's executemany (psycopg pipelines them)."""

    def __init__(self, table: Table, set_columns: Sequence[str], key_columns: Sequence[str]) -> None:
        self.set_columns = tuple(set_columns)
        self.key_columns = tuple(key_columns)

        def sql(mark: str) -> str:
            assignments = ", ".join(f"{c} = {mark}" for c in self.set_columns)
            keys = " AND ".join(f"{c} = {mark}" for c in self.key_columns)
            return f"UPDATE {table.name} SET {assignments} WHERE {keys}"

        self.postgres_sql, self.sqlite_sql = sql("%s"), sql("?")

    def run(self, session: Session, rows: Sequence[tuple[Any, ...]]) -> None:
        """Each row: the SET values, then the key values, in the constructor's orders."""
        if not rows:
            return
        conn = session.connection()
        dialect = conn.dialect.name
        conn.exec_driver_sql(self.postgres_sql if dialect == "postgresql" else self.sqlite_sql, list(rows))


class _InsertNew:
    """INSERT of many rows, skipping those whose key is already stored (ON CONFLICT DO NOTHING),
    as driver SQL: the driver's executemany on SQLite, multi-row VALUES on PostgreSQL.

    For the receipts consumer, which records every receipt of a campaign as a contact event:
    SQLAlchemy's per-row parameter processing was most of its cost.
    """

    def __init__(self, table: Table, columns: Sequence[str], key: str) -> None:
        self.columns = tuple(columns)
        self.head = f"INSERT INTO {table.name} ({', '.join(self.columns)}) VALUES "
        self.tail = f" ON CONFLICT ({key}) DO NOTHING"

    def run(self, session: Session, rows: Sequence[tuple[Any, ...]]) -> None:
        if not rows:
            return
        conn = session.connection()
        if conn.dialect.name != "postgresql":
            marks = "(" + ", ".join("?" * len(self.columns)) + ")"
            conn.exec_driver_sql(self.head + marks + self.tail, list(rows))
            return
        marks = "(" + ", ".join(["%s"] * len(self.columns)) + ")"
        for part in chunks(rows, 1000):
            sql = self.head + ", ".join([marks] * len(part)) + self.tail
            conn.exec_driver_sql(sql, tuple(v for row in part for v in row))


_insert_new_events = _InsertNew(
    contact_events,
    (
        "id",
        "workspace_id",
        "contact_id",
        "type",
        "occurred_at",
        "properties_json",
        "message_id",
        "campaign_id",
        "node_id",
        "run_id",
        "recorded_at",
    ),
    key="id",
)
# json.dumps(doc, separators=(",", ":"), sort_keys=True), without building an encoder per call.
_to_json_sorted = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode


_update_contact_rows = _BulkUpdate(
    contacts, (*_SCALARS, "tags_json", "fields_json", "updated_at"), ("workspace_id", "id")
)


# -- contacts -------------------------------------------------------------------------------------


def load_contacts(
    session: Session, *, workspace_id: str, contact_ids: Sequence[str]
) -> dict[str, ContactView]:
    out: dict[str, ContactView] = {}
    for part in chunks(list(dict.fromkeys(contact_ids))):
        rows = session.execute(
            select(contacts).where(contacts.c.workspace_id == workspace_id, contacts.c.id.in_(part))
        ).all()
        out.update((r.id, row_to_view(r)) for r in rows)
    return out


def get_contact(session: Session, *, workspace_id: str, contact_id: str) -> ContactView:
    found = load_contacts(session, workspace_id=workspace_id, contact_ids=[contact_id])
    if contact_id not in found:
        raise NotFound(f"contact {contact_id} not found", reason="contact_not_found")
    return found[contact_id]


def _lookup(session: Session, *, workspace_id: str, column: str, values: Iterable[str]) -> dict[str, str]:
    """value -> contact id for the contacts whose `column` is one of `values` (oldest wins).

    Run as driver SQL: an import asks for 10,000 keys at once, and SQLAlchemy's rendering of an
    expanding IN cost more than the index lookups. PostgreSQL takes the keys as one array.
    """
    if column not in _LOOKUP_COLUMNS:
        raise ValueError(f"not a lookup column: {column}")
    wanted = sorted(set(values))
    out: dict[str, str] = {}
    if not wanted:
        return out
    conn = session.connection()
    head = f"SELECT {column}, min(id) FROM {contacts.name} WHERE workspace_id = "
    if conn.dialect.name == "postgresql":
        sql = head + f"%s AND {column} = ANY(%s) GROUP BY {column}"
        out.update((r[0], r[1]) for r in conn.exec_driver_sql(sql, (workspace_id, wanted)))
        return out
    for part in chunks(wanted):
        sql = head + f"? AND {column} IN ({', '.join('?' * len(part))}) GROUP BY {column}"
        out.update((r[0], r[1]) for r in conn.exec_driver_sql(sql, (workspace_id, *part)))
    return out


def _existing_ids(session: Session, *, workspace_id: str, contact_ids: Iterable[str]) -> set[str]:
    """Which of `contact_ids` are stored contacts of the workspace (driver SQL, as `_lookup`)."""
    wanted = sorted(set(contact_ids))
    out: set[str] = set()
    if not wanted:
        return out
    conn = session.connection()
    head = f"SELECT id FROM {contacts.name} WHERE workspace_id = "
    if conn.dialect.name == "postgresql":
        out.update(r[0] for r in conn.exec_driver_sql(head + "%s AND id = ANY(%s)", (workspace_id, wanted)))
        return out
    for part in chunks(wanted):
        sql = head + f"? AND id IN ({', '.join('?' * len(part))})"
        out.update(r[0] for r in conn.exec_driver_sql(sql, (workspace_id, *part)))
    return out


def _side_rows(
    workspace_id: str,
    contact_id: str,
    tags: Iterable[str],
    fields: dict[str, FieldVal],
    *,
    db_time: _DbTime,
    tag_rows: list[tuple[Any, ...]],
    field_rows: list[tuple[Any, ...]],
) -> None:
    """Append the contact_tags and contact_fields rows of one contact (in the _BulkInsert orders)."""
    tag_rows.extend((contact_id, t, workspace_id) for t in tag_set(tuple(tags)))
    for name, value in fields.items():
        kind, v = value.kind, value.value
        if kind == "string":
            field_rows.append((contact_id, name, workspace_id, kind, v, None, None, None))
        elif kind == "number":
            field_rows.append((contact_id, name, workspace_id, kind, None, v, None, None))
        elif kind == "bool":
            field_rows.append((contact_id, name, workspace_id, kind, None, None, v, None))
        else:
            field_rows.append((contact_id, name, workspace_id, kind, None, None, None, db_time(v)))


def insert_contacts(
    session: Session, *, workspace_id: str, items: Sequence[tuple[str, ContactData]], now: datetime
) -> None:
    """Insert new contacts (ids chosen by the caller) with their tags, fields and consents."""
    db_time = _DbTime(session)
    stamp = db_time(now)
    contact_rows: list[tuple[Any, ...]] = []
    tag_rows: list[tuple[Any, ...]] = []
    field_rows: list[tuple[Any, ...]] = []
    consent_items: list[tuple[str, ConsentData]] = []
    for contact_id, data in items:
        fields = {k: v for k, v in data.fields.items() if v is not None}
        tags = data.tags or []
        contact_rows.append(
            (
                contact_id,
                workspace_id,
                data.external_id,
                data.email,
                data.phone,
                data.first_name,
                data.last_name,
                data.status or ACTIVE,
                tags_to_json(tags),
                fields_to_json(fields),
                stamp,
                stamp,
            )
        )
        _side_rows(
            workspace_id, contact_id, tags, fields, db_time=db_time, tag_rows=tag_rows, field_rows=field_rows
        )
        consent_items.extend((contact_id, c) for c in data.consents)
    _insert_contact_rows.run(session, contact_rows)
    _insert_tag_rows.run(session, tag_rows)
    _insert_field_rows.run(session, field_rows)
    append_consents(session, workspace_id=workspace_id, items=consent_items, now=now, fresh=True)


def update_contacts(
    session: Session,
    *,
    workspace_id: str,
    items: Sequence[tuple[str, ContactData]],
    only: frozenset[str] | None,
    now: datetime,
) -> dict[str, tuple[str, ...]]:
    """Apply changes to existing contacts: scalars set, tags replaced, fields merged, consents added.

    Returns each contact's tags after the change (for the contact.updated events).

    Without `only`, a value left empty (None) keeps what is stored; with `only` (an update mask),
    exactly the named fields are written and an empty one clears the stored value.
    """
    current = load_contacts(session, workspace_id=workspace_id, contact_ids=[i for i, _ in items])
    db_time = _DbTime(session)
    stamp = db_time(now)
    updates: list[tuple[Any, ...]] = []
    rewrite_ids: list[str] = []
    tag_rows: list[tuple[Any, ...]] = []
    field_rows: list[tuple[Any, ...]] = []
    consent_items: list[tuple[str, ConsentData]] = []
    tags_after: dict[str, tuple[str, ...]] = {}
    for contact_id, data in items:
        view = current[contact_id]
        row: list[Any] = []
        for name in _SCALARS:
            value = getattr(data, name)
            if only is None:
                row.append(getattr(view, name) if value is None else value)
            elif name in only:
                row.append(value if name != "status" else (value or view.status))
            else:
                row.append(getattr(view, name))
        tags = list(view.tags) if data.tags is None else data.tags
        fields = dict(view.fields)
        for name, value in data.fields.items():
            if value is None:
                fields.pop(name, None)
            else:
                fields[name] = value
        tags_after[contact_id] = tag_set(tuple(tags))
        updates.append((*row, tags_to_json(tags), fields_to_json(fields), stamp, workspace_id, contact_id))
        if data.tags is not None or data.fields:
            rewrite_ids.append(contact_id)
            _side_rows(
                workspace_id,
                contact_id,
                tags,
                fields,
                db_time=db_time,
                tag_rows=tag_rows,
                field_rows=field_rows,
            )
        consent_items.extend((contact_id, c) for c in data.consents)
    _update_contact_rows.run(session, updates)
    # Side tables are rewritten whole for the touched contacts: simpler than diffing, same cost.
    for id_part in chunks(rewrite_ids):
        for table in (contact_tags, contact_fields):
            session.execute(
                delete(table).where(table.c.workspace_id == workspace_id, table.c.contact_id.in_(id_part))
            )
    _insert_tag_rows.run(session, tag_rows)
    _insert_field_rows.run(session, field_rows)
    append_consents(session, workspace_id=workspace_id, items=consent_items, now=now)
    return tags_after


def _external_id_taken(session: Session, *, workspace_id: str, external_id: str, other_than: str) -> None:
    owner = _lookup(session, workspace_id=workspace_id, column="external_id", values=[external_id])
    if external_id in owner and owner[external_id] != other_than:
        raise Conflict(
            f"external_id {external_id!r} belongs to contact {owner[external_id]}",
            reason="external_id_taken",
            violations=[FieldViolation("contact.external_id", "is already used by another contact")],
        )


def create_contact(session: Session, *, workspace_id: str, data: ContactData, now: datetime) -> ContactView:
    if data.external_id:
        _external_id_taken(session, workspace_id=workspace_id, external_id=data.external_id, other_than="")
    contact_id = ids.new_id(ids.CONTACT)
    insert_contacts(session, workspace_id=workspace_id, items=[(contact_id, data)], now=now)
    return get_contact(session, workspace_id=workspace_id, contact_id=contact_id)


def upsert_contact(
    session: Session, *, workspace_id: str, data: ContactData, now: datetime
) -> tuple[ContactView, bool]:
    """Create or update, matched by external_id, else by email. Returns (contact, created)."""
    if data.external_id:
        column, key = "external_id", data.external_id
    elif data.email:
        column, key = "email", data.email
    else:
        raise InvalidArgument.of("contact.external_id", "external_id or email is required to upsert")
    existing = _lookup(session, workspace_id=workspace_id, column=column, values=[key]).get(key)
    if existing is None:
        return create_contact(session, workspace_id=workspace_id, data=data, now=now), True
    update_contacts(session, workspace_id=workspace_id, items=[(existing, data)], only=None, now=now)
    return get_contact(session, workspace_id=workspace_id, contact_id=existing), False


def update_contact(
    session: Session,
    *,
    workspace_id: str,
    contact_id: str,
    data: ContactData,
    only: frozenset[str] | None,
    now: datetime,
) -> ContactView:
    get_contact(session, workspace_id=workspace_id, contact_id=contact_id)
    if data.external_id and (only is None or "external_id" in only):
        _external_id_taken(
            session, workspace_id=workspace_id, external_id=data.external_id, other_than=contact_id
        )
    update_contacts(session, workspace_id=workspace_id, items=[(contact_id, data)], only=only, now=now)
    return get_contact(session, workspace_id=workspace_id, contact_id=contact_id)


def delete_contact(session: Session, *, workspace_id: str, contact_id: str) -> None:
    get_contact(session, workspace_id=workspace_id, contact_id=contact_id)
    for table in (contact_tags, contact_fields, consent_current, consents, contact_events):
        session.execute(
            delete(table).where(table.c.workspace_id == workspace_id, table.c.contact_id == contact_id)
        )
    session.execute(
        delete(contacts).where(contacts.c.workspace_id == workspace_id, contacts.c.id == contact_id)
    )


def members_page(
    session: Session, *, workspace_id: str, where: ColumnElement[bool], after: str, limit: int
) -> list[ContactView]:
    """One keyset page of matching contacts, ordered by id, strictly after `after`."""
    stmt = select(contacts).where(contacts.c.workspace_id == workspace_id, where)
    if after:
        stmt = stmt.where(contacts.c.id > after)
    rows = session.execute(stmt.order_by(contacts.c.id).limit(limit)).all()
    return [row_to_view(r) for r in rows]


def stream_page(
    session: Session, *, workspace_id: str, where: ColumnElement[bool], after: str, limit: int
) -> tuple[pb.StreamMembersResponse, str, int]:
    """One keyset page of matching contacts as a StreamMembersResponse: (page, last id, size).

    The Member is built from the row's columns as they are stored: no ContactView, no timestamp
    parsing (a stored field timestamp is already the RFC 3339 UTC text the message carries), and
    empty tag/field documents are not decoded at all.
    """
    c = contacts.c
    stmt = select(
        c.id, c.email, c.phone, c.status, c.tags_json, c.fields_json, c.first_name, c.last_name
    ).where(c.workspace_id == workspace_id, where)
    if after:
        stmt = stmt.where(c.id > after)
    rows = session.execute(stmt.order_by(c.id).limit(limit)).all()
    page = pb.StreamMembersResponse()
    add = page.members.add
    loads = json.loads
    for contact_id, email, phone, status, tags_json, fields_json, first_name, last_name in rows:
        member = add(
            contact_id=contact_id,
            email=email or "",
            phone=phone or "",
            status=status,
            first_name=first_name or "",
            last_name=last_name or "",
        )
        if tags_json != "[]":
            member.tags.extend(loads(tags_json))
        if fields_json != "{}":
            _set_fields(member.fields, fields_json)
    return page, rows[-1][0] if rows else after, len(rows)


def _set_fields(target: Any, fields_json: str) -> None:
    """A stored fields document into a FieldValue map, with no FieldVal in between."""
    for name, (kind, raw) in json.loads(fields_json).items():
        setattr(target[name], _FIELD_VALUE_ATTR[kind], raw)


# FieldVal kind -> the FieldValue attribute holding it (fields_to_json stores timestamps as text).
_FIELD_VALUE_ATTR = {
    "string": "string_value",
    "number": "number_value",
    "bool": "bool_value",
    "timestamp": "timestamp_value",
}


def count_members(session: Session, *, workspace_id: str, where: ColumnElement[bool]) -> int:
    stmt = select(func.count()).select_from(contacts).where(contacts.c.workspace_id == workspace_id, where)
    return int(session.execute(stmt).scalar_one())


# `count_audience` on SQLite first counts each anchor up to this many index entries.
ANCHOR_FIRST_CAP = 10_000


def _anchor_size(session: Session, workspace_id: str, anchor: Anchor, cap: int | None) -> int:
    """How many rows `anchor` has, counted no further than `cap` (an index-only range scan)."""
    table = anchor.table
    rows = select(table.c.contact_id).where(table.c.workspace_id == workspace_id, *anchor.conditions)
    if cap is not None:
        rows = rows.limit(cap)
    return int(session.execute(select(func.count()).select_from(rows.subquery())).scalar_one())


def _anchor_sizes(session: Session, workspace_id: str, anchors: Sequence[Anchor]) -> list[int]:
    """Sizes good enough to order the anchors: exact for the smallest, at least that for the rest.

    Each is counted up to ANCHOR_FIRST_CAP; when all reach it, one after the other up to the
    smallest so far, so the work stays near (first anchor + anchors x smallest) index entries.
    """
    sizes = [_anchor_size(session, workspace_id, a, ANCHOR_FIRST_CAP) for a in anchors]
    if min(sizes) < ANCHOR_FIRST_CAP:
        return sizes
    best: int | None = None
    for i, anchor in enumerate(anchors):
        sizes[i] = _anchor_size(session, workspace_id, anchor, best)
        best = sizes[i] if best is None else min(best, sizes[i])
    return sizes


def count_audience(session: Session, *, workspace_id: str, plan: CountPlan) -> int:
    """The number of contacts matching a filter (EstimateAudience), started from an index.

    Counted the obvious way (every contact of the workspace, each probed for each condition),
    1,000,000 contacts cost ~1.5 s of SQLite CPU for a 3-condition filter. When the filter is
    a conjunction with anchors (filters.CountPlan: has tag, consent status, custom field value),
    the count starts from the smallest anchor's index instead (its rows are unique per contact:
    the side tables' keys), probes the other anchors by contact id, smallest first, and checks
    the contact row last (workspace, and every other condition): ~0.5 s there.

    SQLite plans in the order written, so the anchors are ordered by their sizes, counted on
    their indexes (_anchor_sizes; an empty one answers 0 at once). PostgreSQL turns the same
    EXISTS terms into joins and orders them by its own statistics.
    """
    if not plan.anchors:
        return count_members(session, workspace_id=workspace_id, where=plan.where)
    anchors = list(plan.anchors)
    if session.get_bind().dialect.name != "postgresql" and len(anchors) > 1:
        sizes = _anchor_sizes(session, workspace_id, anchors)
        if min(sizes) == 0:
            return 0
        anchors = [a for _, _, a in sorted(zip(sizes, range(len(anchors)), anchors, strict=True))]
    driver, *others = anchors
    start = driver.table.alias("anchor")
    conditions: list[ColumnElement[bool]] = [
        start.c.workspace_id == workspace_id,
        *(ClauseAdapter(start).traverse(c) for c in driver.conditions),
    ]
    for anchor in others:
        table = anchor.table
        conditions.append(
            exists().where(
                table.c.contact_id == start.c.contact_id,
                table.c.workspace_id == workspace_id,
                *anchor.conditions,
            )
        )
    conditions.append(
        exists().where(
            contacts.c.id == start.c.contact_id, contacts.c.workspace_id == workspace_id, plan.rest
        )
    )
    stmt = select(func.count()).select_from(start).where(*conditions)
    return int(session.execute(stmt).scalar_one())


# -- import ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rejection:
    index: int
    field: str
    reason: str


@dataclass
class ImportOutcome:
    # (contact id, its tags) per created and per updated contact.
    created: list[tuple[str, tuple[str, ...]]]
    updated: list[tuple[str, tuple[str, ...]]]
    rejected: list[Rejection]


def import_contacts(
    session: Session, *, workspace_id: str, rows: Sequence[tuple[int, ContactData]], now: datetime
) -> ImportOutcome:
    """Create or update each row (matched like upsert) in the caller's one transaction.

    Rows are already validated; here a row is only rejected for repeating the key of an earlier
    row of the same call, since applying both would make the result depend on row order.
    """
    external_ids = {d.external_id for _, d in rows if d.external_id}
    emails = {d.email for _, d in rows if d.email and not d.external_id}
    return import_contact_parts(
        session, workspace_id=workspace_id, external_ids=external_ids, emails=emails, parts=[rows], now=now
    )


def import_contact_parts(
    session: Session,
    *,
    workspace_id: str,
    external_ids: Iterable[str],
    emails: Iterable[str],
    parts: Iterable[Sequence[tuple[int, ContactData]]],
    now: datetime,
) -> ImportOutcome:
    """`import_contacts` over rows that arrive in parts, each written as soon as it arrives.

    The servicer validates the next part while this writes the current one. Stored contacts are
    looked up for the whole call first, by every key a valid row may have (`external_ids`,
    `emails`: contacts.import_keys), before anything is written: so a row's match never depends
    on which part it is in or on what earlier rows of the call wrote, exactly as if all rows
    were applied at once. A key repeated in a later part is still rejected: `seen` spans the
    parts.
    """
    by_external = _lookup(session, workspace_id=workspace_id, column="external_id", values=external_ids)
    by_email = _lookup(session, workspace_id=workspace_id, column="email", values=emails)
    seen: dict[tuple[str, str], int] = {}
    outcome = ImportOutcome([], [], [])
    for rows in parts:
        new_rows: list[ContactData] = []
        updates: list[tuple[str, ContactData]] = []
        for index, data in rows:
            key: tuple[str, str] | None = None
            if data.external_id:
                key = ("external_id", data.external_id)
            elif data.email:
                key = ("email", data.email)
            if key is not None:
                if key in seen:
                    outcome.rejected.append(
                        Rejection(index, f"contacts[{index}].{key[0]}", f"repeats row {seen[key]}")
                    )
                    continue
                seen[key] = index
                existing = (by_external if key[0] == "external_id" else by_email).get(key[1])
                if existing is not None:
                    updates.append((existing, data))
                    continue
            new_rows.append(data)
        creates = list(zip(ids.new_ids(ids.CONTACT, len(new_rows)), new_rows, strict=True))
        insert_contacts(session, workspace_id=workspace_id, items=creates, now=now)
        tags_after = update_contacts(session, workspace_id=workspace_id, items=updates, only=None, now=now)
        outcome.created.extend((c, tag_set(tuple(d.tags or ()))) for c, d in creates)
        outcome.updated.extend((u, tags_after[u]) for u, _ in updates)
    return outcome


def refresh_statistics(session: Session, *, grown: int) -> bool:
    """ANALYZE the contact tables on PostgreSQL after an import that changed their size a lot.

    Right after a bulk import the planner still believes the tables are nearly empty and picks
    nested loops for filter subqueries (seconds instead of milliseconds at 10,000 contacts).
    Autovacuum would catch up within a minute or so; a campaign launched right after an import
    should not wait for that. Small imports leave it to autovacuum. True when it analyzed.
    """
    if session.get_bind().dialect.name != "postgresql" or grown < 1000:
        return False
    estimated = session.execute(
        text("SELECT reltuples FROM pg_class WHERE relname = :name"), {"name": contacts.name}
    ).scalar()
    if estimated is not None and estimated > 0 and grown < 0.1 * float(estimated):
        return False
    for table in (contacts, contact_tags, contact_fields, consent_current):
        # Table names are our own constants, never input.
        session.execute(text(f"ANALYZE {table.name}"))
    return True


# -- tags -----------------------------------------------------------------------------------------


def change_tag(
    session: Session, *, workspace_id: str, contact_id: str, tag: str, add: bool, now: datetime
) -> tuple[bool, tuple[str, ...]]:
    """Add or remove one tag; (changed, tags after). Idempotent: a no-op answers changed=False."""
    view = get_contact(session, workspace_id=workspace_id, contact_id=contact_id)
    has = tag in view.tags
    if has == add:
        return False, view.tags
    if add:
        session.execute(
            insert(contact_tags).values(contact_id=contact_id, tag=tag, workspace_id=workspace_id)
        )
        tags = (*view.tags, tag)
    else:
        session.execute(
            delete(contact_tags).where(
                contact_tags.c.workspace_id == workspace_id,
                contact_tags.c.contact_id == contact_id,
                contact_tags.c.tag == tag,
            )
        )
        tags = tuple(t for t in view.tags if t != tag)
    session.execute(
        update(contacts)
        .where(contacts.c.workspace_id == workspace_id, contacts.c.id == contact_id)
        .values(tags_json=tags_to_json(tags), updated_at=now)
    )
    return True, tuple(sorted(tags))


# -- consent --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConsentView:
    contact_id: str
    channel: int
    message_type: int
    status: int
    source: str
    proof: str
    recorded_at: datetime
    confirmed_at: datetime | None


def _consent_view(row: Any) -> ConsentView:
    return ConsentView(
        row.contact_id,
        row.channel,
        row.message_type,
        row.status,
        row.source,
        row.proof,
        as_utc(row.recorded_at),
        as_utc(row.confirmed_at) if row.confirmed_at is not None else None,
    )


def _sqlite_insert_returning_ids(session: Session, rows: Sequence[tuple[Any, ...]]) -> list[int]:
    """Insert consent rows (without their id) on SQLite; the new ids, in the order of `rows`.

    One multi-row INSERT per chunk: SQLite gives an INTEGER PRIMARY KEY the next rowid row by
    row in VALUES order within the statement, so the ids sorted ascending are the rows' ids in
    order (RETURNING itself promises no order). SQLAlchemy's own `sort_by_parameter_order` runs
    one statement per row here, which was most of the cost of a consent-heavy import.
    """
    conn = session.connection()
    columns = ", ".join(_CONSENT_COLUMNS[1:])
    marks = "(" + ", ".join("?" * (len(_CONSENT_COLUMNS) - 1)) + ")"
    out: list[int] = []
    for part in chunks(rows, 500):
        sql = f"INSERT INTO {consents.name} ({columns}) VALUES {', '.join([marks] * len(part))} RETURNING id"
        result = conn.exec_driver_sql(sql, tuple(v for row in part for v in row))
        out.extend(sorted(r[0] for r in result))
    return out


def append_consents(
    session: Session,
    *,
    workspace_id: str,
    items: Sequence[tuple[str, ConsentData]],
    now: datetime,
    confirmed_at: datetime | None = None,
    fresh: bool = False,
) -> list[int]:
    """Append history records and move the current pointer of each (contact, channel, type).

    `fresh`: the contacts were created in this transaction, so none has a current record yet
    and the pointers are plain inserts.
    """
    if not items:
        return []
    db_time = _DbTime(session)
    stamp, confirmed = db_time(now), db_time(confirmed_at)
    rows = [
        (workspace_id, contact_id, c.channel, c.message_type, c.status, c.source, c.proof, stamp, confirmed)
        for contact_id, c in items
    ]
    if session.get_bind().dialect.name == "postgresql":
        # Ids from the sequence first, then COPY with them: unique under concurrent writers.
        # One array value, not a result row per id (a row cost ~2 µs to fetch); sorted, so the
        # history keeps the order of `items`.
        record_ids = sorted(
            session.connection()
            .exec_driver_sql(
                f"SELECT array_agg(nextval(pg_get_serial_sequence('{consents.name}', 'id')))"
                " FROM generate_series(1, %s)",
                (len(items),),
            )
            .scalar_one()
        )
        _insert_consent_rows.run(session, [(rid, *row) for rid, row in zip(record_ids, rows, strict=True)])
    else:
        record_ids = _sqlite_insert_returning_ids(session, rows)
    # The last record per (contact, channel, message type) of this batch becomes current.
    current = {
        (contact_id, c.channel, c.message_type): (
            contact_id,
            c.channel,
            c.message_type,
            workspace_id,
            c.status,
            rid,
        )
        for (contact_id, c), rid in zip(items, record_ids, strict=True)
    }
    if fresh:
        _insert_current_rows.run(session, list(current.values()))
    else:
        _upsert(
            session,
            consent_current,
            [dict(zip(_CURRENT_COLUMNS, row, strict=True)) for row in current.values()],
            keys=("contact_id", "channel", "message_type"),
        )
    return record_ids


def set_consent(
    session: Session,
    *,
    workspace_id: str,
    contact_id: str,
    consent: ConsentData,
    confirm: bool,
    now: datetime,
) -> ConsentView:
    """Record a consent change; `confirm` turns the current PENDING record into GRANTED."""
    get_contact(session, workspace_id=workspace_id, contact_id=contact_id)
    confirmed_at = None
    if confirm:
        current = session.execute(
            select(consent_current.c.status, consents.c.source, consents.c.proof)
            .join(consents, consents.c.id == consent_current.c.record_id)
            .where(
                consent_current.c.workspace_id == workspace_id,
                consent_current.c.contact_id == contact_id,
                consent_current.c.channel == consent.channel,
                consent_current.c.message_type == consent.message_type,
            )
        ).first()
        if current is None or current.status != pb.CONSENT_STATUS_PENDING:
            raise FailedPrecondition(
                "no pending double opt-in to confirm for this channel and message type",
                reason="consent_not_pending",
            )
        consent = ConsentData(
            consent.channel,
            consent.message_type,
            pb.CONSENT_STATUS_GRANTED,
            consent.source or current.source,
            consent.proof or current.proof,
        )
        confirmed_at = now
    (record_id,) = append_consents(
        session, workspace_id=workspace_id, items=[(contact_id, consent)], now=now, confirmed_at=confirmed_at
    )
    row = session.execute(select(consents).where(consents.c.id == record_id)).one()
    return _consent_view(row)


def list_consent(
    session: Session, *, workspace_id: str, contact_id: str, include_history: bool
) -> list[ConsentView]:
    get_contact(session, workspace_id=workspace_id, contact_id=contact_id)
    stmt = select(consents).where(
        consents.c.workspace_id == workspace_id, consents.c.contact_id == contact_id
    )
    if not include_history:
        stmt = stmt.where(
            consents.c.id.in_(
                select(consent_current.c.record_id).where(
                    consent_current.c.workspace_id == workspace_id, consent_current.c.contact_id == contact_id
                )
            )
        )
    rows = session.execute(stmt.order_by(consents.c.id)).all()
    return [_consent_view(r) for r in rows]


# -- eligibility ----------------------------------------------------------------------------------


def check_eligibility(
    session: Session, *, workspace_id: str, contact_ids: Sequence[str], channel: int, message_type: int
) -> pb.CheckEligibilityResponse:
    """One answer per id, in order: one query per chunk, not per id.

    The execution service asks this for every batch it sends, so it is built like `stream_page`:
    driver SQL (SQLAlchemy's rendering of a 1,000-id IN list cost more than the query), the
    GRANTED consent as an EXISTS column on the contact row (a probe of consent_current's key),
    and the answers built straight from the stored columns.
    """
    conn = session.connection()
    postgres = conn.dialect.name == "postgresql"
    mark = "%s" if postgres else "?"
    # Column and table names are our own constants, never input.
    address = "email" if channel == common_pb2.CHANNEL_EMAIL else "phone"
    head = (
        f"SELECT c.id, c.{address}, c.status, c.first_name, c.last_name, c.fields_json,"
        f" EXISTS (SELECT 1 FROM {consent_current.name} k WHERE k.contact_id = c.id"
        f" AND k.channel = {mark} AND k.message_type = {mark} AND k.status = {mark}"
        f" AND k.workspace_id = c.workspace_id)"
        f" FROM {contacts.name} c WHERE c.workspace_id = {mark} AND "
    )
    consent = (channel, message_type, pb.CONSENT_STATUS_GRANTED, workspace_id)
    found: dict[str, Any] = {}
    unique = list(dict.fromkeys(contact_ids))
    if postgres:
        found.update((r[0], r) for r in conn.exec_driver_sql(head + "c.id = ANY(%s)", (*consent, unique)))
    else:
        for part in chunks(unique):
            sql = head + f"c.id IN ({', '.join('?' * len(part))})"
            found.update((r[0], r) for r in conn.exec_driver_sql(sql, (*consent, *part)))
    response = pb.CheckEligibilityResponse()
    add = response.results.add
    for contact_id in contact_ids:
        row = found.get(contact_id)
        if row is None:
            add(contact_id=contact_id, eligible=False, reason=pb.INELIGIBLE_REASON_UNKNOWN_CONTACT)
            continue
        _, to, status, first_name, last_name, fields_json, granted = row
        if status != ACTIVE:
            reason = pb.INELIGIBLE_REASON_NOT_ACTIVE
        elif not to:
            reason = pb.INELIGIBLE_REASON_NO_ADDRESS
        elif not granted:
            reason = pb.INELIGIBLE_REASON_NO_CONSENT
        else:
            reason = pb.INELIGIBLE_REASON_UNSPECIFIED
        item = add(
            contact_id=contact_id,
            eligible=reason == pb.INELIGIBLE_REASON_UNSPECIFIED,
            reason=reason,
            address=to or "",
            first_name=first_name or "",
            last_name=last_name or "",
        )
        if fields_json != "{}":
            _set_fields(item.fields, fields_json)
    return response


# -- contact events -------------------------------------------------------------------------------


@dataclass(frozen=True)
class EventData:
    contact_id: str
    type: str
    occurred_at: datetime
    properties: dict[str, Any]
    message_id: str = ""
    campaign_id: str = ""
    node_id: str = ""
    run_id: str = ""
    # A deterministic id makes recording idempotent (receipts redelivered by JetStream).
    event_id: str = ""


@dataclass(frozen=True)
class EventQueryData:
    contact_id: str
    type: str
    node_id: str = ""
    message_id: str = ""
    run_id: str = ""
    since: datetime | None = None


def record_events(
    session: Session, *, workspace_id: str, events: Sequence[EventData], now: datetime
) -> list[tuple[str, EventData]]:
    """Store events of known contacts; events of unknown (e.g. deleted) contacts are skipped.

    Returns (event id, event) of what was stored, for publishing.
    """
    known = _existing_ids(session, workspace_id=workspace_id, contact_ids={e.contact_id for e in events})
    stored = [(e.event_id or ids.new_id(ids.EVENT), e) for e in events if e.contact_id in known]
    db_time = _DbTime(session)
    stamp = db_time(now)
    _insert_new_events.run(
        session,
        [
            (
                event_id,
                workspace_id,
                e.contact_id,
                e.type,
                db_time(e.occurred_at),
                _to_json_sorted(e.properties),
                e.message_id,
                e.campaign_id,
                e.node_id,
                e.run_id,
                stamp,
            )
            for event_id, e in stored
        ],
    )
    return stored


def mark_bounced(session: Session, *, workspace_id: str, contact_ids: Sequence[str], now: datetime) -> int:
    """ACTIVE contacts whose email hard-bounced become BOUNCED; other statuses are kept.

    Driver SQL, as `_existing_ids`: the receipts consumer runs this for most of its batches, and
    SQLAlchemy's rendering of the expanding IN cost more than the update of a few rows.
    """
    wanted = sorted(set(contact_ids))
    if not wanted:
        return 0
    conn = session.connection()
    stamp = _DbTime(session)(now)
    values = (pb.CONTACT_STATUS_BOUNCED, stamp, workspace_id, ACTIVE)
    if conn.dialect.name == "postgresql":
        sql = (
            f"UPDATE {contacts.name} SET status = %s, updated_at = %s WHERE workspace_id = %s AND status = %s"
        )
        result = conn.exec_driver_sql(sql + " AND id = ANY(%s)", (*values, wanted))
        return int(result.rowcount or 0)
    head = f"UPDATE {contacts.name} SET status = ?, updated_at = ? WHERE workspace_id = ? AND status = ?"
    changed = 0
    for part in chunks(wanted):
        result = conn.exec_driver_sql(head + f" AND id IN ({', '.join('?' * len(part))})", (*values, *part))
        changed += int(result.rowcount or 0)
    return changed


def query_events(session: Session, *, workspace_id: str, queries: Sequence[EventQueryData]) -> list[bool]:
    """Answer every query from one read of the candidate events (per chunk of contacts)."""
    if not queries:
        return []
    types = sorted({q.type for q in queries})
    since_all = [q.since for q in queries]
    earliest = None if any(s is None for s in since_all) else min(s for s in since_all if s is not None)
    seen: dict[tuple[str, str], list[tuple[str, str, str, datetime]]] = {}
    for part in chunks(sorted({q.contact_id for q in queries})):
        stmt = select(
            contact_events.c.contact_id,
            contact_events.c.type,
            contact_events.c.node_id,
            contact_events.c.message_id,
            contact_events.c.run_id,
            contact_events.c.occurred_at,
        ).where(
            contact_events.c.workspace_id == workspace_id,
            contact_events.c.contact_id.in_(part),
            contact_events.c.type.in_(types),
        )
        if earliest is not None:
            stmt = stmt.where(contact_events.c.occurred_at >= earliest)
        for r in session.execute(stmt):
            seen.setdefault((r.contact_id, r.type), []).append(
                (r.node_id, r.message_id, r.run_id, as_utc(r.occurred_at))
            )
    answers = []
    for q in queries:
        answers.append(
            any(
                (not q.node_id or node == q.node_id)
                and (not q.message_id or message == q.message_id)
                and (not q.run_id or run == q.run_id)
                and (q.since is None or at >= q.since)
                for node, message, run, at in seen.get((q.contact_id, q.type), [])
            )
        )
    return answers


# -- capabilities ---------------------------------------------------------------------------------


def contact_phones(
    session: Session, *, workspace_id: str, contact_ids: Sequence[str]
) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for part in chunks(list(dict.fromkeys(contact_ids))):
        rows = session.execute(
            select(contacts.c.id, contacts.c.phone).where(
                contacts.c.workspace_id == workspace_id, contacts.c.id.in_(part)
            )
        ).all()
        out.update((r.id, r.phone) for r in rows)
    return out


def cached_capabilities(
    session: Session, *, workspace_id: str, addresses: Sequence[str], fresh_after: datetime
) -> dict[str, tuple[bool, datetime]]:
    out: dict[str, tuple[bool, datetime]] = {}
    for part in chunks(sorted(set(addresses))):
        rows = session.execute(
            select(capabilities.c.address, capabilities.c.rcs_capable, capabilities.c.checked_at).where(
                capabilities.c.workspace_id == workspace_id,
                capabilities.c.address.in_(part),
                capabilities.c.checked_at >= fresh_after,
            )
        ).all()
        out.update((r.address, (bool(r.rcs_capable), as_utc(r.checked_at))) for r in rows)
    return out


def store_capabilities(
    session: Session, *, workspace_id: str, results: dict[str, bool], now: datetime
) -> None:
    _upsert(
        session,
        capabilities,
        [
            {"workspace_id": workspace_id, "address": a, "rcs_capable": capable, "checked_at": now}
            for a, capable in results.items()
        ],
        keys=("workspace_id", "address"),
    )


# -- segments -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentView:
    id: str
    workspace_id: str
    name: str
    filter_proto: bytes
    created_at: datetime
    updated_at: datetime


def _segment_view(row: Any) -> SegmentView:
    return SegmentView(
        row.id,
        row.workspace_id,
        row.name,
        bytes(row.filter_proto),
        as_utc(row.created_at),
        as_utc(row.updated_at),
    )


def create_segment(
    session: Session, *, workspace_id: str, name: str, filter_proto: bytes, now: datetime
) -> SegmentView:
    segment_id = ids.new_id(ids.SEGMENT)
    session.execute(
        insert(segments).values(
            id=segment_id,
            workspace_id=workspace_id,
            name=name,
            filter_proto=filter_proto,
            created_at=now,
            updated_at=now,
        )
    )
    return get_segment(session, workspace_id=workspace_id, segment_id=segment_id)


def get_segment(session: Session, *, workspace_id: str, segment_id: str) -> SegmentView:
    row = session.execute(
        select(segments).where(segments.c.workspace_id == workspace_id, segments.c.id == segment_id)
    ).first()
    if row is None:
        raise NotFound(f"segment {segment_id} not found", reason="segment_not_found")
    return _segment_view(row)


def update_segment(
    session: Session,
    *,
    workspace_id: str,
    segment_id: str,
    name: str | None,
    filter_proto: bytes | None,
    now: datetime,
) -> SegmentView:
    get_segment(session, workspace_id=workspace_id, segment_id=segment_id)
    values: dict[str, Any] = {"updated_at": now}
    if name is not None:
        values["name"] = name
    if filter_proto is not None:
        values["filter_proto"] = filter_proto
    session.execute(
        update(segments)
        .where(segments.c.workspace_id == workspace_id, segments.c.id == segment_id)
        .values(values)
    )
    return get_segment(session, workspace_id=workspace_id, segment_id=segment_id)


def delete_segment(session: Session, *, workspace_id: str, segment_id: str) -> None:
    get_segment(session, workspace_id=workspace_id, segment_id=segment_id)
    session.execute(
        delete(segments).where(segments.c.workspace_id == workspace_id, segments.c.id == segment_id)
    )


def list_segments(session: Session, *, workspace_id: str, after: str, limit: int) -> list[SegmentView]:
    stmt = select(segments).where(segments.c.workspace_id == workspace_id)
    if after:
        stmt = stmt.where(segments.c.id > after)
    return [_segment_view(r) for r in session.execute(stmt.order_by(segments.c.id).limit(limit)).all()]
