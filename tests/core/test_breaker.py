"""The breaker state machine (sidecar.core.breaker), with time passed in."""

from __future__ import annotations

import itertools

import pytest

from sidecar.core.breaker import Breaker, State


def breaker(failures: int = 3, reset: float = 10.0, trials: int = 1) -> Breaker:
    return Breaker("app", failures=failures, reset=reset, half_open_trials=trials)


def test_opens_after_consecutive_failures_only() -> None:
    b = breaker(failures=3)
    for now in (1, 2):
        assert b.allow(now)
        b.failure(now)
    b.success(3)  # breaks the run
    for now in (4, 5):
        b.failure(now)
    assert b.state is State.CLOSED
    b.failure(6)
    assert b.state is State.OPEN and b.opened_at == 6


def test_open_refuses_until_reset_then_lets_one_trial_through() -> None:
    b = breaker(failures=1, reset=10)
    b.failure(100)
    assert not b.allow(100) and not b.allow(109.999)
    assert b.retry_after(104) == pytest.approx(6)
    assert b.allow(110)
    assert b.state is State.HALF_OPEN
    assert not b.allow(110.1)  # one trial at a time
    assert b.retry_after(110.1) == 0


@pytest.mark.parametrize("trials", [1, 2, 5])
def test_half_open_limits_trials_in_flight(trials: int) -> None:
    b = breaker(failures=1, reset=1, trials=trials)
    b.failure(0)
    allowed = sum(b.allow(2) for _ in range(10))
    assert allowed == trials
    b.ignored(2)  # a trial ended without a verdict: its slot is free again
    assert b.allow(2)
    assert not b.allow(2)


def test_trial_success_closes_and_failure_reopens() -> None:
    b = breaker(failures=2, reset=5)
    b.failure(0)
    b.failure(0)
    assert b.allow(5)
    b.failure(5)
    assert b.state is State.OPEN and b.opened_at == 5
    assert not b.allow(9)
    assert b.allow(10)
    b.success(10)
    assert b.state is State.CLOSED and b.consecutive_failures == 0
    b.failure(11)
    assert b.state is State.CLOSED  # the count started again


def test_late_answers_while_open_change_nothing() -> None:
    b = breaker(failures=1, reset=5)
    b.failure(0)
    b.success(1)
    b.failure(2)
    assert b.state is State.OPEN and b.opened_at == 0


def test_transitions_are_reported_once_each() -> None:
    seen: list[tuple[str, str, float]] = []
    b = breaker(failures=1, reset=1)
    b.on_transition.append(lambda _b, old, new, now: seen.append((old.value, new.value, now)))
    b.failure(0)
    b.failure(0.5)
    b.allow(1)
    b.success(1)
    b.force_open(2, 3)
    b.force_open(1, 3)  # an older opening from elsewhere changes nothing
    b.force_close(4)
    assert seen == [("closed", "open", 0), ("open", "half_open", 1), ("half_open", "closed", 1),
                    ("closed", "open", 3), ("open", "closed", 4)]
    assert b.transitions == 5


def test_forced_open_counts_reset_from_the_remote_opening() -> None:
    b = breaker(failures=5, reset=10)
    b.force_open(opened_at=100, now=104)
    assert not b.allow(105)
    assert b.allow(110)


@pytest.mark.parametrize("events", list(itertools.product("sfi", repeat=4)))
def test_any_sequence_keeps_the_invariants(events: tuple[str, ...]) -> None:
    b = breaker(failures=2, reset=1, trials=2)
    now = 0.0
    for event in events:
        now += 0.6
        if b.allow(now):
            {"s": b.success, "f": b.failure, "i": b.ignored}[event](now)
        assert 0 <= b.trials <= b.half_open_trials
        assert b.consecutive_failures < b.failures or b.state is not State.CLOSED
        if b.state is State.CLOSED:
            assert b.trials == 0


def test_answers_to_requests_from_before_a_transition_change_nothing() -> None:
    b = breaker(failures=1, reset=10, trials=1)
    assert b.allow(0)
    early = b.transitions  # a slow request sent while closed
    assert b.allow(0)
    b.failure(0, b.transitions)  # another one fails: open
    assert b.allow(10)  # half-open: one trial
    trial = b.transitions
    b.ignored(11, early)  # the slow one gives up: the trial's slot stays taken
    assert not b.allow(11)
    b.success(11, early)  # or it succeeds: that does not close the breaker
    assert b.state is State.HALF_OPEN
    b.success(12, trial)
    assert b.state is State.CLOSED
