"""Storage of templates and versions. Every function is keyword-only, takes the session, filters
on workspace_id, and returns plain records: ORM rows never leave this module."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from google.protobuf import json_format
from sqlalchemy import and_, case, select, update
from sqlmodel import Session, col

from services.template.models import TemplateRow, VersionRow
from shoal.v1 import template_pb2 as pb

DRAFT, PENDING, PUBLISHED, REJECTED = (
    pb.TEMPLATE_STATE_DRAFT,
    pb.TEMPLATE_STATE_PENDING_APPROVAL,
    pb.TEMPLATE_STATE_PUBLISHED,
    pb.TEMPLATE_STATE_REJECTED,
)


@dataclass(frozen=True)
class TemplateRecord:
    id: str
    workspace_id: str
    name: str
    channel: int
    message_type: int
    latest_version: int
    latest_state: int
    published_version: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class VersionRecord:
    workspace_id: str
    template_id: str
    version: int
    state: int
    content: pb.TemplateContent
    variables: tuple[pb.Variable, ...]
    rejection_reason: str
    created_at: datetime
    published_at: datetime | None


@dataclass(frozen=True)
class VersionState:
    """The part of a version that launch checks need (no content)."""

    template_id: str
    version: int
    state: int
    rejection_reason: str


def now() -> datetime:
    return datetime.now(UTC)


def encode_content(content: pb.TemplateContent) -> str:
    return json.dumps(json_format.MessageToDict(content, preserving_proto_field_name=True), sort_keys=True)


def encode_variables(variables: Iterable[pb.Variable]) -> str:
    return json.dumps(
        [
            {"name": v.name, "type": v.type, "required": v.required, "default_value": v.default_value}
            for v in variables
        ]
    )


def _template(row: TemplateRow) -> TemplateRecord:
    return TemplateRecord(
        id=row.id,
        workspace_id=row.workspace_id,
        name=row.name,
        channel=row.channel,
        message_type=row.message_type,
        latest_version=row.latest_version,
        latest_state=row.latest_state,
        published_version=row.published_version,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _version(row: VersionRow) -> VersionRecord:
    content = json_format.ParseDict(json.loads(row.content), pb.TemplateContent())
    variables = tuple(pb.Variable(**v) for v in json.loads(row.variables))
    return VersionRecord(
        workspace_id=row.workspace_id,
        template_id=row.template_id,
        version=row.version,
        state=row.state,
        content=content,
        variables=variables,
        rejection_reason=row.rejection_reason,
        created_at=row.created_at,
        published_at=row.published_at,
    )


def insert_template(
    session: Session,
    *,
    workspace_id: str,
    template_id: str,
    name: str,
    channel: int,
    message_type: int,
    content: pb.TemplateContent,
    variables: Sequence[pb.Variable],
) -> tuple[TemplateRecord, VersionRecord]:
    at = now()
    template = TemplateRow(
        id=template_id,
        workspace_id=workspace_id,
        name=name,
        channel=channel,
        message_type=message_type,
        latest_version=1,
        latest_state=DRAFT,
        published_version=0,
        created_at=at,
        updated_at=at,
    )
    version = VersionRow(
        workspace_id=workspace_id,
        template_id=template_id,
        version=1,
        state=DRAFT,
        content=encode_content(content),
        variables=encode_variables(variables),
        rejection_reason="",
        created_at=at,
        updated_at=at,
    )
    session.add(template)
    session.add(version)
    session.flush()
    return _template(template), _version(version)


def get_template(
    session: Session, *, workspace_id: str, template_id: str, for_update: bool = False
) -> TemplateRecord | None:
    query = select(TemplateRow).where(
        col(TemplateRow.workspace_id) == workspace_id, col(TemplateRow.id) == template_id
    )
    if for_update:
        # Serialises concurrent edits of one template on PostgreSQL (SQLite has one writer).
        query = query.with_for_update()
    row = session.execute(query).scalars().first()
    return None if row is None else _template(row)


def get_templates(
    session: Session, *, workspace_id: str, template_ids: Sequence[str]
) -> dict[str, TemplateRecord]:
    rows = session.execute(
        select(TemplateRow).where(
            col(TemplateRow.workspace_id) == workspace_id, col(TemplateRow.id).in_(template_ids)
        )
    ).scalars()
    return {row.id: _template(row) for row in rows}


def get_version(
    session: Session, *, workspace_id: str, template_id: str, version: int
) -> VersionRecord | None:
    row = session.get(VersionRow, (workspace_id, template_id, version))
    return None if row is None else _version(row)


def list_versions(session: Session, *, workspace_id: str, template_id: str) -> list[VersionRecord]:
    rows = session.execute(
        select(VersionRow)
        .where(col(VersionRow.workspace_id) == workspace_id, col(VersionRow.template_id) == template_id)
        .order_by(col(VersionRow.version))
    ).scalars()
    return [_version(row) for row in rows]


def version_states(
    session: Session, *, workspace_id: str, template_ids: Sequence[str]
) -> dict[tuple[str, int], VersionState]:
    rows = session.execute(
        select(
            col(VersionRow.template_id),
            col(VersionRow.version),
            col(VersionRow.state),
            col(VersionRow.rejection_reason),
        ).where(col(VersionRow.workspace_id) == workspace_id, col(VersionRow.template_id).in_(template_ids))
    ).all()
    return {(r[0], r[1]): VersionState(r[0], r[1], r[2], r[3]) for r in rows}


def list_templates(
    session: Session,
    *,
    workspace_id: str,
    channel: int,
    message_type: int,
    state: int,
    before_seq: int | None,
    limit: int,
) -> tuple[list[tuple[TemplateRecord, VersionRecord]], int | None]:
    """A page, newest first, each template with its latest version; and the next cursor."""
    query = (
        select(TemplateRow, VersionRow)
        .join(
            VersionRow,
            and_(
                col(VersionRow.workspace_id) == col(TemplateRow.workspace_id),
                col(VersionRow.template_id) == col(TemplateRow.id),
                col(VersionRow.version) == col(TemplateRow.latest_version),
            ),
        )
        .where(col(TemplateRow.workspace_id) == workspace_id)
    )
    if channel:
        query = query.where(col(TemplateRow.channel) == channel)
    if message_type:
        query = query.where(col(TemplateRow.message_type) == message_type)
    if state == PUBLISHED:
        # What the flow builder offers: anything a SEND can use, even with a newer draft on top.
        query = query.where(col(TemplateRow.published_version) > 0)
    elif state:
        query = query.where(col(TemplateRow.latest_state) == state)
    if before_seq is not None:
        query = query.where(col(TemplateRow.seq) < before_seq)
    rows = session.execute(query.order_by(col(TemplateRow.seq).desc()).limit(limit + 1)).all()
    page = [(_template(t), _version(v)) for t, v in rows[:limit]]
    next_seq = rows[limit - 1][0].seq if len(rows) > limit else None
    return page, next_seq


def add_version(
    session: Session,
    *,
    template: TemplateRecord,
    content: pb.TemplateContent,
    variables: Sequence[pb.Variable],
    name: str,
) -> VersionRecord:
    at = now()
    number = template.latest_version + 1
    row = VersionRow(
        workspace_id=template.workspace_id,
        template_id=template.id,
        version=number,
        state=DRAFT,
        content=encode_content(content),
        variables=encode_variables(variables),
        rejection_reason="",
        created_at=at,
        updated_at=at,
    )
    session.add(row)
    session.execute(
        update(TemplateRow)
        .where(col(TemplateRow.workspace_id) == template.workspace_id, col(TemplateRow.id) == template.id)
        .values(latest_version=number, latest_state=DRAFT, name=name, updated_at=at)
    )
    session.flush()
    return _version(row)


def rename(session: Session, *, template: TemplateRecord, name: str) -> None:
    session.execute(
        update(TemplateRow)
        .where(col(TemplateRow.workspace_id) == template.workspace_id, col(TemplateRow.id) == template.id)
        .values(name=name, updated_at=now())
    )


def move_state(
    session: Session,
    *,
    workspace_id: str,
    template_id: str,
    version: int,
    from_state: int,
    to_state: int,
    reason: str = "",
) -> VersionRecord | None:
    """Compare-and-set one version's state; None when it was no longer `from_state`."""
    at = now()
    values: dict[str, object] = {"state": to_state, "updated_at": at}
    if to_state == PUBLISHED:
        values["published_at"] = at
    if to_state == REJECTED:
        values["rejection_reason"] = reason
    moved = session.execute(
        update(VersionRow)
        .where(
            col(VersionRow.workspace_id) == workspace_id,
            col(VersionRow.template_id) == template_id,
            col(VersionRow.version) == version,
            col(VersionRow.state) == from_state,
        )
        .values(**values)
    )
    if moved.rowcount != 1:  # type: ignore[attr-defined]  # CursorResult of an UPDATE
        return None
    template_values: dict[str, object] = {"updated_at": at}
    if to_state == PUBLISHED:
        # "Latest published" is the highest published number, so publishing an older draft
        # later never moves SENDs that follow the latest back to it.
        template_values["published_version"] = case(
            (col(TemplateRow.published_version) < version, version), else_=col(TemplateRow.published_version)
        )
    session.execute(
        update(TemplateRow)
        .where(col(TemplateRow.workspace_id) == workspace_id, col(TemplateRow.id) == template_id)
        .values(**template_values)
    )
    session.execute(
        update(TemplateRow)
        .where(
            col(TemplateRow.workspace_id) == workspace_id,
            col(TemplateRow.id) == template_id,
            col(TemplateRow.latest_version) == version,
        )
        .values(latest_state=to_state)
    )
    row = session.get(VersionRow, (workspace_id, template_id, version), populate_existing=True)
    return None if row is None else _version(row)
