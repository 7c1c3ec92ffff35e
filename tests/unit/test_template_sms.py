"""SMS encoding detection and segment counting (GSM 03.38 / UCS-2)."""

from __future__ import annotations

import pytest

from services.template.sms import GSM7_BASIC, GSM7_EXTENSION, is_gsm7, measure


@pytest.mark.parametrize(
    ("text", "encoding", "units", "segments"),
    [
        ("", "GSM-7", 0, 1),
        ("Hello", "GSM-7", 5, 1),
        ("a" * 160, "GSM-7", 160, 1),
        ("a" * 161, "GSM-7", 161, 2),
        ("a" * 306, "GSM-7", 306, 2),
        ("a" * 307, "GSM-7", 307, 3),
        ("a" * 1530, "GSM-7", 1530, 10),
        # Extension characters take two septets.
        ("€" * 80, "GSM-7", 160, 1),
        ("€" * 81, "GSM-7", 162, 2),
        ("a" * 159 + "[", "GSM-7", 161, 2),
        ("{}[]~|^\\\f€", "GSM-7", 20, 1),
        # Accents in the basic table stay GSM-7; others force UCS-2.
        ("Grüße à Zoé, ñ, É", "GSM-7", 17, 1),
        ("Zoë", "UCS-2", 3, 1),
        ("ç", "UCS-2", 1, 1),
        ("Привет", "UCS-2", 6, 1),
        ("ж" * 70, "UCS-2", 70, 1),
        ("ж" * 71, "UCS-2", 71, 2),
        ("ж" * 134, "UCS-2", 134, 2),
        ("ж" * 135, "UCS-2", 135, 3),
        # One emoji is a surrogate pair: two UTF-16 units.
        ("😀" * 35, "UCS-2", 70, 1),
        ("😀" * 36, "UCS-2", 72, 2),
        ("a" + "`", "UCS-2", 2, 1),  # the backtick is not in GSM 03.38
    ],
)
def test_measure(text: str, encoding: str, units: int, segments: int) -> None:
    size = measure(text)
    assert (size.encoding, size.units, size.segments) == (encoding, units, segments)


def test_extension_char_never_straddles_two_parts() -> None:
    # 152 septets then '€' (2): 154 > 153, so '€' starts part two; the total is still 2 parts.
    assert measure("a" * 152 + "€" + "a" * 10).segments == 2
    # 153 * 2 = 306 septets exactly fits two parts without an escape at the boundary...
    assert measure("a" * 306).segments == 2
    # ...but 152 + '€' + 152 + '€' packs as 152|2+151|1+2 and needs a third part.
    assert measure("a" * 152 + "€" + "a" * 152 + "€").segments == 3


def test_surrogate_pair_never_straddles_two_parts() -> None:
    # 66 units then an emoji (2): 68 > 67, so the emoji starts part two.
    assert measure("ж" * 66 + "😀" + "ж" * 60).segments == 2
    assert measure("ж" * 66 + "😀" + "ж" * 66 + "😀").segments == 3


def test_tables() -> None:
    assert len(GSM7_BASIC) == 127  # 128 codes minus ESC
    assert len(GSM7_EXTENSION) == 10
    assert is_gsm7("@£$¥\n\r")
    assert not is_gsm7("\x1b")
    assert not is_gsm7("\t")
