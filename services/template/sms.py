"""SMS encoding and segment count: GSM 03.38 (7-bit) when every character fits, else UCS-2.

A carrier bills per segment, so the count must match what the carrier does: a single GSM-7 SMS
carries 160 septets, a concatenated one 153 per part (the rest is the UDH); UCS-2 carries 70 or
67 UTF-16 code units. Extension-table characters (`€`, `[`, ...) take two septets (ESC + code)
and, like surrogate pairs in UCS-2, are never split across two parts.
"""

from __future__ import annotations

import re
from typing import Literal, NamedTuple

# GSM 03.38 default alphabet (ESC, 0x1B, is not a character a text may contain).
GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
# Extension table: each is sent as ESC + code, two septets.
GSM7_EXTENSION = frozenset("\f^{}\\[~]|€")
GSM7_ALL = GSM7_BASIC | GSM7_EXTENSION
# Regexes because they scan a string in C, several times faster than set operations per character.
_GSM7_TEXT = re.compile("[" + re.escape("".join(sorted(GSM7_ALL))) + "]*")
_GSM7_EXTENDED = re.compile("[" + re.escape("".join(sorted(GSM7_EXTENSION))) + "]")

GSM7_SINGLE, GSM7_PART = 160, 153
UCS2_SINGLE, UCS2_PART = 70, 67

Encoding = Literal["GSM-7", "UCS-2"]


class SmsSize(NamedTuple):
    encoding: Encoding
    # Septets (GSM-7) or UTF-16 code units (UCS-2) the text needs.
    units: int
    segments: int


def is_gsm7(text: str) -> bool:
    return _GSM7_TEXT.fullmatch(text) is not None


def _parts(widths: list[int], per_part: int) -> int:
    """Greedy packing where a character of width 2 cannot straddle two parts."""
    parts, used = 1, 0
    for width in widths:
        if used + width > per_part:
            parts += 1
            used = 0
        used += width
    return parts


def measure(text: str) -> SmsSize:
    """Encoding, size and segment count of `text` as a carrier would send it."""
    if not text:
        return SmsSize("GSM-7", 0, 1)
    if is_gsm7(text):
        extended = len(_GSM7_EXTENDED.findall(text))
        units = len(text) + extended
        if units <= GSM7_SINGLE:
            return SmsSize("GSM-7", units, 1)
        if not extended:
            return SmsSize("GSM-7", units, -(-units // GSM7_PART))
        widths = [2 if ch in GSM7_EXTENSION else 1 for ch in text]
        return SmsSize("GSM-7", units, _parts(widths, GSM7_PART))
    # UTF-16 code units: characters outside the BMP (emoji) take a surrogate pair.
    units = len(text.encode("utf-16-le")) // 2
    astral = units - len(text)
    if units <= UCS2_SINGLE:
        return SmsSize("UCS-2", units, 1)
    if not astral:
        return SmsSize("UCS-2", units, -(-units // UCS2_PART))
    widths = [2 if ord(ch) > 0xFFFF else 1 for ch in text]
    return SmsSize("UCS-2", units, _parts(widths, UCS2_PART))
