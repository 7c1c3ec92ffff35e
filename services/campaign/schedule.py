"""Scheduled triggers: wall-clock time in an IANA zone to a UTC instant, DST-correct.

Decisions (docs/design.md): a local time that does not exist (the spring-forward gap, e.g.
02:30 in Europe/Paris on the last Sunday of March) runs shifted forward by the gap (03:30 local,
the same instant the wall clock "would have" shown); a local time that exists twice (the autumn
overlap) runs at its first occurrence. A campaign found due more than the grace period late (the
service was down) is not started: it goes back to DRAFT with the reason "missed".
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from shoal.errors import InvalidArgument

_LOCAL = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2})?$")


def due_instant(local_time: str, time_zone: str) -> datetime:
    """The UTC instant a schedule means."""
    if not time_zone:
        raise InvalidArgument.of("schedule.time_zone", "an IANA time zone is required, e.g. Europe/Paris")
    try:
        zone = ZoneInfo(time_zone)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise InvalidArgument.of("schedule.time_zone", f"{time_zone!r} is not an IANA time zone") from None
    if not _LOCAL.match(local_time or ""):
        raise InvalidArgument.of(
            "schedule.local_time", "must be YYYY-MM-DDTHH:MM[:SS] (wall-clock time in time_zone)"
        )
    try:
        naive = datetime.fromisoformat(local_time)
    except ValueError:
        raise InvalidArgument.of(
            "schedule.local_time", f"{local_time!r} is not a valid date and time"
        ) from None
    # fold=0: the first occurrence of a repeated time; for a skipped time, the offset before the
    # gap, which lands the instant after the gap by the gap's length.
    return naive.replace(tzinfo=zone, fold=0).astimezone(UTC)
