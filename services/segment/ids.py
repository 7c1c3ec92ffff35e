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


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


class _Monotonic:
    """Within one millisecond, the random part counts up, so one process's ids strictly increase."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last_ms = -1
        self.last_rand = 0

    def next(self, millis: int) -> tuple[int, int]:
        with self.lock:
            if millis <= self.last_ms and self.last_rand < _RAND_MAX:
                millis, rand = self.last_ms, self.last_rand + 1
            else:
                rand = secrets.randbits(49)  # headroom to count up within the millisecond
            self.last_ms, self.last_rand = millis, rand
            return millis, rand


_RAND_MAX = (1 << 50) - 1
_monotonic = _Monotonic()


def new_id(prefix: str) -> str:
    millis, rand = _monotonic.next(time.time_ns() // 1_000_000)
    return f"{prefix}_{_encode(millis, 10)}{_encode(rand, 10)}"


def is_id(value: str, prefix: str) -> bool:
    return value.startswith(prefix + "_") and ID_RE.match(value) is not None
