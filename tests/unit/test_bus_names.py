"""Subjects, stream names and namespaces of the bus, and the retry backoff."""

from __future__ import annotations

import pytest
from nats.aio.client import Client

from shoal.bus import STREAM_EVENTS, STREAM_EXEC, Bus, event_subject, retry_delay, step_subject


def test_subjects() -> None:
    assert step_subject("camp_1") == "shoal.exec.step.camp_1"
    assert event_subject("contact", "opened") == "shoal.events.contact.opened"


@pytest.mark.parametrize("bad", ["", "a.b", "a*", "a>", "a b"])
def test_subject_tokens_are_validated(bad: str) -> None:
    with pytest.raises(ValueError, match="subject token"):
        step_subject(bad)
    with pytest.raises(ValueError, match="subject token"):
        event_subject("contact", bad)


def test_namespace_prefixes_streams_and_subjects_once() -> None:
    bus = Bus(Client(), namespace="t1")  # never connected: naming needs no server
    assert bus.stream_name(STREAM_EXEC) == "t1_EXEC"
    assert bus.stream_name(bus.stream_name(STREAM_EVENTS)) == "t1_EVENTS"
    assert bus.step_subject("c9") == "t1.shoal.exec.step.c9"
    assert bus.event_subject("billing", "balance_exhausted") == "t1.shoal.events.billing.balance_exhausted"
    assert bus.subject(bus.step_subject("c9")) == "t1.shoal.exec.step.c9"
    assert bus.subject("shoal.events.>") == "t1.shoal.events.>"


def test_no_namespace_leaves_names_alone() -> None:
    bus = Bus(Client())
    assert bus.stream_name(STREAM_EXEC) == "EXEC"
    assert bus.step_subject("c9") == "shoal.exec.step.c9"


@pytest.mark.parametrize("bad", ["a.b", "a b", "shoal", "x>"])
def test_bad_namespace_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="namespace"):
        Bus(Client(), namespace=bad)


def test_retry_delay_grows_and_is_capped() -> None:
    assert [retry_delay(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert retry_delay(50) == 30.0
    assert retry_delay(0) == 0.5
    assert retry_delay(3, base=0.1, cap=0.3) == 0.3
