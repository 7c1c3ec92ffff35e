"""Scheduled triggers: wall-clock time in an IANA zone to the UTC instant, across DST."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.campaign.schedule import due_instant
from shoal.errors import InvalidArgument


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("local", "zone", "expected"),
    [
        # Ordinary days: CET (+1) in winter, CEST (+2) in summer.
        ("2026-01-15T09:00", "Europe/Paris", utc(2026, 1, 15, 8, 0)),
        ("2026-07-15T09:00:30", "Europe/Paris", utc(2026, 7, 15, 7, 0, 30)),
        # Spring forward (2026-03-29 02:00 -> 03:00): 02:30 does not exist; it runs shifted
        # forward by the gap, at 03:30 CEST = 01:30 UTC.
        ("2026-03-29T02:30", "Europe/Paris", utc(2026, 3, 29, 1, 30)),
        ("2026-03-29T01:59", "Europe/Paris", utc(2026, 3, 29, 0, 59)),
        ("2026-03-29T03:00", "Europe/Paris", utc(2026, 3, 29, 1, 0)),
        # Fall back (2026-10-25 03:00 -> 02:00): 02:30 happens twice; the first one (CEST) counts.
        ("2026-10-25T02:30", "Europe/Paris", utc(2026, 10, 25, 0, 30)),
        ("2026-10-25T03:30", "Europe/Paris", utc(2026, 10, 25, 2, 30)),
        # America/New_York: spring forward 2026-03-08 02:00 -> 03:00 (02:30 -> 03:30 EDT).
        ("2026-03-08T02:30", "America/New_York", utc(2026, 3, 8, 7, 30)),
        ("2026-03-08T03:30", "America/New_York", utc(2026, 3, 8, 7, 30)),
        # Fall back 2026-11-01 02:00 -> 01:00: 01:30 happens twice; the first (EDT, -4) counts.
        ("2026-11-01T01:30", "America/New_York", utc(2026, 11, 1, 5, 30)),
        ("2026-11-01T02:30", "America/New_York", utc(2026, 11, 1, 7, 30)),
        ("2026-06-01T12:00", "UTC", utc(2026, 6, 1, 12, 0)),
    ],
)
def test_due_instant(local: str, zone: str, expected: datetime) -> None:
    got = due_instant(local, zone)
    assert got == expected
    assert got.tzinfo == UTC


@pytest.mark.parametrize(
    ("local", "zone", "field"),
    [
        ("2026-03-29T02:30", "", "schedule.time_zone"),
        ("2026-03-29T02:30", "Mars/Olympus", "schedule.time_zone"),
        ("2026-03-29T02:30", "Europe", "schedule.time_zone"),
        ("2026-03-29T02:30", "../../etc/passwd", "schedule.time_zone"),
        ("2026-03-29T02:30", "+02:00", "schedule.time_zone"),
        ("", "Europe/Paris", "schedule.local_time"),
        ("29/03/2026 02:30", "Europe/Paris", "schedule.local_time"),
        ("2026-03-29T02:30+02:00", "Europe/Paris", "schedule.local_time"),
        ("2026-02-30T10:00", "Europe/Paris", "schedule.local_time"),
        ("2026-03-29T25:00", "Europe/Paris", "schedule.local_time"),
    ],
)
def test_invalid_schedules_name_the_field(local: str, zone: str, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        due_instant(local, zone)
    assert [v.field for v in info.value.violations] == [field]
    assert info.value.message.startswith(field)
