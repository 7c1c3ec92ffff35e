"""Contact input rules, ids and receipt mapping of the segment service, without a database."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest

from services.segment import ids, receipts
from services.segment.contacts import (
    FieldVal,
    fields_from_json,
    fields_to_json,
    normalise_email,
    normalise_phone,
    parse_contact_input,
    parse_timestamp,
    parse_update_mask,
)
from shoal.errors import InvalidArgument
from shoal.v1 import common_pb2, events_pb2
from shoal.v1 import segment_pb2 as pb


def test_ids_are_prefixed_and_strictly_increasing() -> None:
    made = [ids.new_id(ids.CONTACT) for _ in range(2000)]
    assert made == sorted(made) and len(set(made)) == len(made)
    assert all(ids.is_id(i, "c") and len(i) == 22 for i in made)
    assert not ids.is_id("c_' OR 1=1 --xxxxxxxxxx", "c")
    assert not ids.is_id(made[0], "seg")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("+33 6 12 34 56 78", "+33612345678"), ("+1 (415) 555-2671", "+14155552671")],
)
def test_phone_normalised_to_e164(raw: str, expected: str) -> None:
    assert normalise_phone(raw) == expected


@pytest.mark.parametrize("raw", ["0612345678", "+1 000", "+99 123", "phone"])
def test_bad_phones(raw: str) -> None:
    with pytest.raises(ValueError, match=r"E\.164|phone number"):
        normalise_phone(raw)


def test_email_syntax_only() -> None:
    assert normalise_email("Ada@Example.COM") == "ada@example.com"
    with pytest.raises(ValueError, match="not a valid email"):
        normalise_email("ada@@example.com")


def test_timestamps_need_an_offset() -> None:
    assert parse_timestamp("2026-01-31T12:00:00+02:00") == datetime(2026, 1, 31, 10, tzinfo=UTC)
    assert parse_timestamp("2026-01-31T10:00:00Z") == datetime(2026, 1, 31, 10, tzinfo=UTC)
    for bad in ("2026-01-31", "2026-01-31T10:00:00", "soon"):
        with pytest.raises(ValueError, match=r"RFC 3339|offset"):
            parse_timestamp(bad)


def test_fields_round_trip_through_json() -> None:
    fields = {
        "s": FieldVal("string", "x"),
        "n": FieldVal("number", 1.5),
        "b": FieldVal("bool", False),
        "t": FieldVal("timestamp", datetime(2026, 1, 1, tzinfo=UTC)),
    }
    assert fields_from_json(fields_to_json(fields)) == fields


def test_all_violations_reported_at_once() -> None:
    msg = pb.ContactInput(email="nope", phone="123", status=9, tags=["ok", ""])  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument) as err:
        parse_contact_input(msg, prefix="contacts[3]")
    assert [v.field for v in err.value.violations] == [
        "contacts[3].email",
        "contacts[3].phone",
        "contacts[3].status",
        "contacts[3].tags[1]",
    ]


def test_update_mask_limits_and_clears() -> None:
    only = parse_update_mask(["email", "tags"])
    data = parse_contact_input(pb.ContactInput(first_name="ignored"), only=only)
    assert data.email is None and data.tags == [] and data.first_name is None
    with pytest.raises(InvalidArgument) as err:
        parse_update_mask(["id"])
    assert err.value.violations[0].field == "update_mask"
    with pytest.raises(InvalidArgument):
        parse_contact_input(pb.ContactInput(), only=frozenset({"status"}))  # UNSPECIFIED is no status


def test_receipts_map_to_event_types_with_stable_ids() -> None:
    r = events_pb2.MessageReceipt(
        workspace_id="ws",
        provider="sandbox",
        send_key="exe_1:n_2",
        status=events_pb2.RECEIPT_STATUS_CLICKED,
        contact_id=ids.new_id(ids.CONTACT),
        channel=common_pb2.CHANNEL_EMAIL,
    )
    event = receipts.to_event(r)
    assert event is not None and event.type == "email.clicked" and event.node_id == "n_2"
    assert ids.is_id(event.event_id, ids.EVENT)
    again = receipts.to_event(r)
    assert again is not None and again.event_id == event.event_id  # a redelivery maps to the same id
    # The id is the receipt's (provider, send key, status) hashed, as stored by earlier releases.
    digest = hashlib.sha256(f"sandbox\x1fexe_1:n_2\x1f{r.status}".encode()).digest()
    assert event.event_id == ids.id_from_bits(ids.EVENT, int.from_bytes(digest[:13], "big") >> 4)
    assert event.occurred_at.tzinfo is not None  # no time on the receipt: when it was recorded
    r.time.FromNanoseconds(1_767_225_600_123_456_789)
    timed = receipts.to_event(r)
    assert timed is not None and timed.occurred_at == r.time.ToDatetime(tzinfo=UTC)
    assert timed.occurred_at == datetime(2026, 1, 1, 0, 0, 0, 123456, tzinfo=UTC)
    r.channel = common_pb2.CHANNEL_SMS
    assert receipts.event_type(r) == "message.clicked"
    r.status = events_pb2.RECEIPT_STATUS_DELIVERED
    assert receipts.receipt_event_id(r) != event.event_id
    r.contact_id = "not-a-contact"
    assert receipts.to_event(r) is None
