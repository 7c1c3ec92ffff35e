"""Prefixed ids that sort by creation time: `c_` + 10 chars of milliseconds + 10 random chars.

Crockford base32 keeps the ids URL-safe and case-insensitive, and since the time part comes first,
keyset pagination by id walks contacts in creation order: a contact created while a
campaign streams its audience lands after the cursor instead of shifting pages already read.
"""

from __future__ import annotations

import re
import secrets
import threading
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
ID_RE = re.compile(r"^[a-z]{1,5}_[0-9A-HJKMNP-TV-Z]{20}$")

CONTACT = "c"
EVENT = "evt"
SEGMENT = "seg"


# Two characters per lookup: the 10-character parts of an id are five lookups, not ten steps.
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]


def _encode10(value: int) -> str:
    """0 <= value < 2**50 as 10 Crockford base32 characters, most significant first."""
    pairs = _PAIRS
    return (
        pairs[(value >> 40) & 1023]
        + pairs[(value >> 30) & 1023]
        + pairs[(value >> 20) & 1023]
        + pairs[(value >> 10) & 1023]
        + pairs[value & 1023]
    )


class _Monotonic:
    """Within one millisecond, the random part counts up, so one process's ids strictly increase."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last_ms = -1
        self.last_rand = 0

    def next(self, millis: int, count: int = 1) -> tuple[int, int]:
        """(millisecond, first random part) of `count` consecutive ids."""
        with self.lock:
            if millis <= self.last_ms and self.last_rand + count <= _RAND_MAX:
                millis, rand = self.last_ms, self.last_rand + 1
            else:
                rand = secrets.randbits(49)  # headroom to count up within the millisecond
            self.last_ms, self.last_rand = millis, rand + count - 1
            return millis, rand


_RAND_MAX = (1 << 50) - 1
_monotonic = _Monotonic()


def new_id(prefix: str) -> str:
    millis, rand = _monotonic.next(time.time_ns() // 1_000_000)
    return f"{prefix}_{_encode10(millis)}{_encode10(rand)}"


def new_ids(prefix: str, count: int) -> list[str]:
    """`count` ids, strictly increasing, as `new_id` would make them one after the other."""
    if count <= 0:
        return []
    millis, rand = _monotonic.next(time.time_ns() // 1_000_000, count)
    head = f"{prefix}_{_encode10(millis)}"
    return [head + _encode10(r) for r in range(rand, rand + count)]


def id_from_bits(prefix: str, value: int) -> str:
    """A deterministic id of the same form from a 100-bit value (most significant bits first)."""
    return f"{prefix}_{_encode10(value >> 50)}{_encode10(value & _RAND_MAX)}"


def is_id(value: str, prefix: str) -> bool:
    return value.startswith(prefix + "_") and ID_RE.match(value) is not None
