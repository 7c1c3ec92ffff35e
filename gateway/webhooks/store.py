"""Storage of webhook endpoints, deliveries and attempts. Every function takes the session of the
caller's transaction (`Database.run`) and returns plain dataclasses, never ORM instances.

Deliveries move only by compare-and-set: `claim` leases due rows with one UPDATE whose WHERE
repeats the "due and not leased" test (so of two processes racing for a row one wins), and
`record` writes an attempt's outcome only while the lease token still matches (a process whose
lease ran out, its row taken over by another, writes nothing).
"""

from __future__ import annotations

import random
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, insert, literal, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session

from gateway.models import (
    DELIVERY_DELIVERED,
    DELIVERY_FAILED,
    DELIVERY_PENDING,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
)
from gateway.webhooks.catalogue import TEST_EVENT, Event, envelope, subscribed

EP = WebhookEndpoint.__table__  # type: ignore[attr-defined]
D = WebhookDelivery.__table__  # type: ignore[attr-defined]
A = WebhookAttempt.__table__  # type: ignore[attr-defined]

ENDPOINT_PREFIX = "wh"
DELIVERY_PREFIX = "whd"
SECRET_PREFIX = "whsec_"  # noqa: S105  # a prefix, not a secret
_ERROR_MAX = 1000

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


class WrongState(Exception):
    """The delivery is not in a state the operation accepts (replaying a pending one)."""


# -- ids and secrets ---------------------------------------------------------------------------------


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


class _Ids:
    """`<prefix>_` + 10 characters of milliseconds + 10 random ones: ids sort by creation, and
    within one millisecond one process's ids still increase (the random part counts up)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = -1
        self._last_rand = 0

    def new(self, prefix: str) -> str:
        millis = time.time_ns() // 1_000_000
        with self._lock:
            if millis <= self._last_ms:
                millis, rand = self._last_ms, self._last_rand + 1
            else:
                rand = secrets.randbits(45)
            self._last_ms, self._last_rand = millis, rand
        return f"{prefix}_{_encode(millis, 10)}{_encode(rand, 10)}"


_ids = _Ids()


def new_id(prefix: str) -> str:
    return _ids.new(prefix)


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


# -- rows ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EndpointRow:
    id: str
    workspace_id: str
    url: str
    description: str
    events: list[str]
    enabled: bool
    secret: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class DeliveryRow:
    id: str
    endpoint_id: str
    event_id: str
    event: str
    body: str
    state: str
    attempts: int
    replays: int
    next_attempt_at: datetime | None
    last_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str
    delivered_at: datetime | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class AttemptRow:
    number: int
    replay: int
    started_at: datetime
    duration_ms: int
    status_code: int | None
    error: str
    succeeded: bool


@dataclass(frozen=True)
class Claimed:
    """A leased delivery with what sending it needs."""

    id: str
    workspace_id: str
    endpoint_id: str
    event: str
    body: str
    token: str
    attempts: int
    replays: int
    round_attempts: int
    url: str
    secret: str


@dataclass(frozen=True)
class AttemptResult:
    started_at: datetime
    duration_ms: int
    status_code: int | None
    error: str

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


_ENDPOINT_COLUMNS = (
    EP.c.id,
    EP.c.workspace_id,
    EP.c.url,
    EP.c.description,
    EP.c.events,
    EP.c.enabled,
    EP.c.secret,
    EP.c.created_at,
    EP.c.updated_at,
)
_DELIVERY_COLUMNS = (
    D.c.id,
    D.c.endpoint_id,
    D.c.event_id,
    D.c.event,
    D.c.body,
    D.c.state,
    D.c.attempts,
    D.c.replays,
    D.c.next_attempt_at,
    D.c.last_attempt_at,
    D.c.last_status_code,
    D.c.last_error,
    D.c.delivered_at,
    D.c.created_at,
    D.c.updated_at,
)


def _endpoint(r: Any) -> EndpointRow:
    return EndpointRow(
        id=r.id,
        workspace_id=r.workspace_id,
        url=r.url,
        description=r.description,
        events=r.events.split(),
        enabled=bool(r.enabled),
        secret=r.secret,
        created_at=r.created_at,
        updated_at=r.updated_at,
    )


def _delivery(r: Any) -> DeliveryRow:
    return DeliveryRow(
        id=r.id,
        endpoint_id=r.endpoint_id,
        event_id=r.event_id,
        event=r.event,
        body=r.body,
        state=r.state,
        attempts=r.attempts,
        replays=r.replays,
        next_attempt_at=r.next_attempt_at,
        last_attempt_at=r.last_attempt_at,
        last_status_code=r.last_status_code,
        last_error=r.last_error,
        delivered_at=r.delivered_at,
        created_at=r.created_at,
        updated_at=r.updated_at,
    )


def _pending() -> Any:
    """`state = 'pending'` with a literal: the partial due-index is only usable with one."""
    return D.c.state == literal(DELIVERY_PENDING, literal_execute=True)


# -- endpoints ------------------------------------------------------------------------------------------


def count_endpoints(session: Session, *, workspace_id: str) -> int:
    return int(session.execute(select(func.count()).where(EP.c.workspace_id == workspace_id)).scalar_one())


def create_endpoint(
    session: Session, *, workspace_id: str, url: str, events: Sequence[str], description: str, now: datetime
) -> EndpointRow:
    endpoint_id = new_id(ENDPOINT_PREFIX)
    session.execute(
        insert(EP).values(
            id=endpoint_id,
            workspace_id=workspace_id,
            url=url,
            description=description,
            events=" ".join(events),
            enabled=True,
            secret=new_secret(),
            created_at=now,
            updated_at=now,
        )
    )
    found = get_endpoint(session, workspace_id=workspace_id, endpoint_id=endpoint_id)
    assert found is not None
    return found


def get_endpoint(session: Session, *, workspace_id: str, endpoint_id: str) -> EndpointRow | None:
    row = session.execute(
        select(*_ENDPOINT_COLUMNS).where(EP.c.workspace_id == workspace_id, EP.c.id == endpoint_id)
    ).first()
    return _endpoint(row) if row is not None else None


def list_endpoints(
    session: Session, *, workspace_id: str, after: str | None, limit: int
) -> list[EndpointRow]:
    q = select(*_ENDPOINT_COLUMNS).where(EP.c.workspace_id == workspace_id)
    if after is not None:
        q = q.where(EP.c.id > after)
    return [_endpoint(r) for r in session.execute(q.order_by(EP.c.id).limit(limit)).all()]


def update_endpoint(
    session: Session, *, workspace_id: str, endpoint_id: str, values: dict[str, Any], now: datetime
) -> EndpointRow | None:
    """Change the given columns (`url`, `description`, `events` as a list, `enabled`, `secret`)."""
    changes = dict(values)
    if "events" in changes:
        changes["events"] = " ".join(changes["events"])
    result = session.execute(
        update(EP)
        .where(EP.c.workspace_id == workspace_id, EP.c.id == endpoint_id)
        .values(**changes, updated_at=now)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        return None
    return get_endpoint(session, workspace_id=workspace_id, endpoint_id=endpoint_id)


def delete_endpoint(session: Session, *, workspace_id: str, endpoint_id: str) -> bool:
    """Remove the endpoint with its deliveries and their attempts (nothing more is sent to it)."""
    owned = select(D.c.id).where(D.c.workspace_id == workspace_id, D.c.endpoint_id == endpoint_id)
    session.execute(delete(A).where(A.c.delivery_id.in_(owned.scalar_subquery())))
    session.execute(delete(D).where(D.c.workspace_id == workspace_id, D.c.endpoint_id == endpoint_id))
    result = session.execute(delete(EP).where(EP.c.workspace_id == workspace_id, EP.c.id == endpoint_id))
    return bool(result.rowcount)  # type: ignore[attr-defined]


# -- enqueueing -----------------------------------------------------------------------------------------


def _insert_ignoring_duplicates(session: Session) -> Any:
    """INSERT that skips a row whose (endpoint_id, event_id) is already there."""
    dialect = session.connection().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(D).on_conflict_do_nothing(index_elements=["endpoint_id", "event_id"])
    if dialect == "sqlite":
        return sqlite.insert(D).on_conflict_do_nothing(index_elements=["endpoint_id", "event_id"])
    raise NotImplementedError(f"webhook deliveries on {dialect}")


def _delivery_values(
    *, event: Event, endpoint_id: str, body: str, first_delay: float, now: datetime
) -> dict[str, Any]:
    return {
        "id": new_id(DELIVERY_PREFIX),
        "workspace_id": event.workspace_id,
        "endpoint_id": endpoint_id,
        "event_id": event.id,
        "event": event.name,
        "body": body,
        "state": DELIVERY_PENDING,
        "attempts": 0,
        "replays": 0,
        "round_attempts": 0,
        "next_attempt_at": now + timedelta(seconds=first_delay),
        "leased_until": None,
        "lease_token": "",
        "last_attempt_at": None,
        "last_status_code": None,
        "last_error": "",
        "delivered_at": None,
        "created_at": now,
        "updated_at": now,
    }


def enqueue(session: Session, events: Sequence[Event], *, first_delay: float, now: datetime) -> int:
    """One pending delivery per event and enabled endpoint of its workspace that subscribed to it
    and existed when the event happened; a (endpoint, event) pair already stored is skipped.
    Returns how many rows were offered (duplicates included)."""
    workspaces = sorted({e.workspace_id for e in events})
    if not workspaces:
        return 0
    endpoints: dict[str, list[Any]] = {}
    for r in session.execute(
        select(EP.c.id, EP.c.workspace_id, EP.c.events, EP.c.created_at).where(
            EP.c.workspace_id.in_(workspaces), EP.c.enabled.is_(True)
        )
    ).all():
        endpoints.setdefault(r.workspace_id, []).append(r)
    rows = []
    for event in events:
        body: str | None = None
        for ep in endpoints.get(event.workspace_id, ()):
            if ep.created_at > event.time or not subscribed(ep.events, event.name):
                continue
            body = body or envelope(event)
            rows.append(
                _delivery_values(event=event, endpoint_id=ep.id, body=body, first_delay=first_delay, now=now)
            )
    if rows:
        session.execute(_insert_ignoring_duplicates(session), rows)
    return len(rows)


def enqueue_test(session: Session, *, endpoint: EndpointRow, now: datetime) -> DeliveryRow:
    """A `webhook.test` event for one endpoint, due now."""
    event = Event(
        id=new_id("evt"),
        name=TEST_EVENT,
        workspace_id=endpoint.workspace_id,
        time=now,
        data={"endpoint_id": endpoint.id, "message": "a test event sent from the Shoal API"},
    )
    values = _delivery_values(
        event=event, endpoint_id=endpoint.id, body=envelope(event), first_delay=0, now=now
    )
    session.execute(insert(D).values(**values))
    found = get_delivery(
        session, workspace_id=endpoint.workspace_id, endpoint_id=endpoint.id, delivery_id=values["id"]
    )
    assert found is not None
    return found[0]


# -- delivering -----------------------------------------------------------------------------------------


def claim(session: Session, *, limit: int, lease: timedelta, now: datetime) -> list[Claimed]:
    """Lease up to `limit` due deliveries of enabled endpoints, oldest due first.

    The UPDATE repeats the "pending and not leased" test, so when two processes pick the same
    rows each row goes to one of them (PostgreSQL also skips rows another claim has locked).
    """
    if limit < 1:
        return []
    token = secrets.token_hex(8)
    free = or_(D.c.leased_until.is_(None), D.c.leased_until < now)
    due = (
        select(D.c.id)
        .join(EP, EP.c.id == D.c.endpoint_id)
        .where(_pending(), D.c.next_attempt_at <= now, free, EP.c.enabled.is_(True))
        .order_by(D.c.next_attempt_at)
        .limit(limit)
    )
    if session.connection().dialect.name == "postgresql":
        due = due.with_for_update(of=D, skip_locked=True)
    leased = session.execute(
        update(D)
        .where(D.c.id.in_(due.scalar_subquery()), _pending(), free)
        .values(leased_until=now + lease, lease_token=token)
        .returning(
            D.c.id,
            D.c.workspace_id,
            D.c.endpoint_id,
            D.c.event,
            D.c.body,
            D.c.attempts,
            D.c.replays,
            D.c.round_attempts,
        )
    ).all()
    if not leased:
        return []
    targets = {
        r.id: r
        for r in session.execute(
            select(EP.c.id, EP.c.url, EP.c.secret).where(EP.c.id.in_({r.endpoint_id for r in leased}))
        ).all()
    }
    return [
        Claimed(
            id=r.id,
            workspace_id=r.workspace_id,
            endpoint_id=r.endpoint_id,
            event=r.event,
            body=r.body,
            token=token,
            attempts=r.attempts,
            replays=r.replays,
            round_attempts=r.round_attempts,
            url=targets[r.endpoint_id].url,
            secret=targets[r.endpoint_id].secret,
        )
        for r in leased
        if r.endpoint_id in targets
    ]


def next_delay(delays: Sequence[float], attempt: int) -> float | None:
    """Seconds before attempt `attempt + 1` after `attempt` failed ones (1-based), None when
    `attempt` was the last allowed. Up to 10 % later than the schedule says, so endpoints that
    failed together are not all retried in the same instant."""
    if attempt >= len(delays):
        return None
    return delays[attempt] * (1 + random.random() * 0.1)


def record(
    session: Session, *, claimed: Claimed, result: AttemptResult, delays: Sequence[float], now: datetime
) -> str | None:
    """Write one attempt and the delivery's next state; None when the lease was lost meanwhile."""
    number_in_round = claimed.round_attempts + 1
    values: dict[str, Any] = {
        "attempts": D.c.attempts + 1,
        "round_attempts": D.c.round_attempts + 1,
        "leased_until": None,
        "lease_token": "",
        "last_attempt_at": result.started_at,
        "last_status_code": result.status_code,
        "last_error": result.error[:_ERROR_MAX],
        "updated_at": now,
    }
    if result.succeeded:
        values.update(state=DELIVERY_DELIVERED, next_attempt_at=None, delivered_at=now)
    else:
        delay = next_delay(delays, number_in_round)
        if delay is None:
            values.update(state=DELIVERY_FAILED, next_attempt_at=None)
        else:
            values.update(state=DELIVERY_PENDING, next_attempt_at=now + timedelta(seconds=delay))
    written = session.execute(
        update(D).where(D.c.id == claimed.id, D.c.lease_token == claimed.token, _pending()).values(**values)
    )
    if not written.rowcount:  # type: ignore[attr-defined]
        return None
    session.execute(
        insert(A).values(
            delivery_id=claimed.id,
            workspace_id=claimed.workspace_id,
            number=claimed.attempts + 1,
            replay=claimed.replays,
            started_at=result.started_at,
            duration_ms=result.duration_ms,
            status_code=result.status_code,
            error=result.error[:_ERROR_MAX],
            succeeded=result.succeeded,
        )
    )
    return str(values["state"])


# -- reading and replaying ------------------------------------------------------------------------------


def list_deliveries(
    session: Session,
    *,
    workspace_id: str,
    endpoint_id: str,
    state: str | None,
    before: str | None,
    limit: int,
) -> list[DeliveryRow]:
    """Newest first."""
    q = select(*_DELIVERY_COLUMNS).where(D.c.workspace_id == workspace_id, D.c.endpoint_id == endpoint_id)
    if state is not None:
        q = q.where(D.c.state == state)
    if before is not None:
        q = q.where(D.c.id < before)
    return [_delivery(r) for r in session.execute(q.order_by(D.c.id.desc()).limit(limit)).all()]


def get_delivery(
    session: Session, *, workspace_id: str, endpoint_id: str, delivery_id: str
) -> tuple[DeliveryRow, list[AttemptRow]] | None:
    row = session.execute(
        select(*_DELIVERY_COLUMNS).where(
            D.c.workspace_id == workspace_id, D.c.endpoint_id == endpoint_id, D.c.id == delivery_id
        )
    ).first()
    if row is None:
        return None
    attempts = [
        AttemptRow(
            number=a.number,
            replay=a.replay,
            started_at=a.started_at,
            duration_ms=a.duration_ms,
            status_code=a.status_code,
            error=a.error,
            succeeded=bool(a.succeeded),
        )
        for a in session.execute(select(A).where(A.c.delivery_id == delivery_id).order_by(A.c.id)).all()
    ]
    return _delivery(row), attempts


def replay(
    session: Session, *, workspace_id: str, endpoint_id: str, delivery_id: str, now: datetime
) -> DeliveryRow | None:
    """A fresh round of attempts for a delivered or failed delivery, the first one due now.

    None when there is no such delivery; `WrongState` while it is still pending.
    """
    result = session.execute(
        update(D)
        .where(
            D.c.workspace_id == workspace_id,
            D.c.endpoint_id == endpoint_id,
            D.c.id == delivery_id,
            D.c.state.in_([DELIVERY_DELIVERED, DELIVERY_FAILED]),
        )
        .values(
            state=DELIVERY_PENDING,
            replays=D.c.replays + 1,
            round_attempts=0,
            next_attempt_at=now,
            leased_until=None,
            lease_token="",
            delivered_at=None,
            updated_at=now,
        )
    )
    found = get_delivery(session, workspace_id=workspace_id, endpoint_id=endpoint_id, delivery_id=delivery_id)
    if found is None:
        return None
    if not result.rowcount:  # type: ignore[attr-defined]
        raise WrongState(f"delivery {delivery_id} is still {found[0].state}; replay it once it is finished")
    return found[0]


def prune(session: Session, *, before: datetime, limit: int = 1000) -> int:
    """Forget up to `limit` finished deliveries created before `before`, with their attempts."""
    old = [
        r[0]
        for r in session.execute(
            select(D.c.id)
            .where(D.c.created_at < before, D.c.state.in_([DELIVERY_DELIVERED, DELIVERY_FAILED]))
            .limit(limit)
        ).all()
    ]
    if old:
        session.execute(delete(A).where(A.c.delivery_id.in_(old)))
        session.execute(delete(D).where(D.c.id.in_(old)))
    return len(old)
