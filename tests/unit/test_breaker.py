"""The provider circuit breaker: opening rules, cool-down, half-open probes."""

from __future__ import annotations

from services.execution.breaker import CLOSED, HALF_OPEN, OPEN, Breaker, BreakerPolicy


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(**policy: float) -> tuple[Breaker, Clock]:
    clock = Clock()
    return Breaker("p", BreakerPolicy(**policy), clock=clock), clock  # type: ignore[arg-type]


def test_opens_on_consecutive_failures() -> None:
    b, _ = make(consecutive_failures=3, min_calls=100)
    assert [b.record(False) for _ in range(2)] == [None, None]
    assert b.record(False) == OPEN
    assert not b.allow()
    assert "3 consecutive" in b.reason


def test_success_resets_the_consecutive_count() -> None:
    b, _ = make(consecutive_failures=3, min_calls=100)
    for _ in range(10):
        assert b.record(False) is None
        assert b.record(False) is None
        assert b.record(True) is None
    assert b.state == CLOSED


def test_opens_on_failure_rate_only_with_enough_calls() -> None:
    b, _ = make(consecutive_failures=100, min_calls=10, failure_rate=0.5)
    for ok in [True, False] * 4:
        assert b.record(ok) is None  # 8 calls: below the minimum
    assert b.record(True) is None  # 9 calls, 4 failures
    assert b.record(False) == OPEN  # 10 calls, 5 failures: 50%


def test_old_calls_leave_the_window() -> None:
    b, clock = make(consecutive_failures=100, min_calls=4, failure_rate=0.5, window_seconds=10)
    b.record(False)
    b.record(False)
    clock.now += 11
    for _ in range(3):
        assert b.record(True) is None
    assert b.record(False) is None  # 1 failure of 4 inside the window
    assert b.state == CLOSED


def test_half_open_lets_one_probe_through() -> None:
    b, clock = make(consecutive_failures=1, open_seconds=5)
    assert b.record(False) == OPEN
    clock.now += 4.9
    assert not b.allow()
    clock.now += 0.2
    assert b.allow()
    assert b.state == HALF_OPEN
    assert not b.allow(), "only one probe at a time"
    assert b.record(True) == CLOSED
    assert b.allow() and b.allow()


def test_failed_probe_opens_again_for_a_full_cool_down() -> None:
    b, clock = make(consecutive_failures=1, open_seconds=5)
    b.record(False)
    clock.now += 6
    assert b.allow()
    assert b.record(False) == OPEN
    clock.now += 4
    assert not b.allow()
    clock.now += 2
    assert b.allow()
