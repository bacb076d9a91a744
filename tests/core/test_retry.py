"""Retry decisions (sidecar.core.retry): outcomes, backoff with full jitter, the retry budget."""

from __future__ import annotations

import itertools
import random

import pytest

from sidecar.core.retry import IDEMPOTENT_METHODS, RetryBudget, RetryOn, backoff_delay

# -- methods -------------------------------------------------------------------------------


def test_idempotent_methods_are_those_of_rfc_9110() -> None:
    assert {"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"} == IDEMPOTENT_METHODS


@pytest.mark.parametrize("method", ["POST", "PATCH", "CONNECT", "PROPFIND", "get"])
def test_other_methods_are_not_idempotent(method: str) -> None:
    assert method not in IDEMPOTENT_METHODS


# -- RetryOn -------------------------------------------------------------------------------


def test_on_parses_statuses_and_error_kinds() -> None:
    on = RetryOn.parse(["connect", "502", "503", "504"])
    assert on.statuses == {502, 503, 504}
    assert on.errors == {"connect"}


@pytest.mark.parametrize("status", range(100, 600))
def test_only_listed_statuses_are_retried(status: int) -> None:
    on = RetryOn.parse(["connect", "502", "503", "504"])
    assert on.status(status) is (status in (502, 503, 504))


@pytest.mark.parametrize(("on", "kind", "expected"), [
    (["connect"], "connect", True),
    (["connect"], "timeout", False),
    (["timeout"], "timeout", True),
    (["connect", "timeout"], "timeout", True),
    (["503"], "connect", False),
    (["connect", "timeout"], None, False),
    ([], "connect", False),
])
def test_errors_are_retried_only_when_named(on: list[str], kind: str | None,
                                            expected: bool) -> None:
    assert RetryOn.parse(on).error(kind) is expected


def test_an_empty_on_retries_nothing() -> None:
    on = RetryOn.parse([])
    assert not any(on.status(s) for s in range(500, 600))


# -- backoff_delay -------------------------------------------------------------------------


def _top(retry: int, base: float = 0.1, cap: float = 2.0) -> float:
    """The delay with the largest jitter value: the ceiling of the interval."""
    return backoff_delay(retry, base=base, cap=cap, rand=lambda: 1.0)


def test_backoff_ceiling_doubles_per_retry() -> None:
    assert [_top(n) for n in (1, 2, 3, 4)] == pytest.approx([0.1, 0.2, 0.4, 0.8])


def test_backoff_is_capped() -> None:
    assert _top(5) == pytest.approx(1.6)
    assert _top(6) == 2.0
    assert _top(50) == 2.0


def test_backoff_does_not_overflow_for_huge_retry_numbers() -> None:
    assert _top(100_000) == 2.0


def test_full_jitter_can_be_zero() -> None:
    assert backoff_delay(3, base=0.1, cap=2.0, rand=lambda: 0.0) == 0.0


def test_jitter_scales_the_ceiling() -> None:
    assert backoff_delay(2, base=0.1, cap=2.0, rand=lambda: 0.5) == pytest.approx(0.1)


def test_backoff_stays_within_the_interval_for_random_draws() -> None:
    rng = random.Random(7)
    for retry, base, cap in itertools.product(range(1, 12), (0.0, 0.01, 0.1, 1.0),
                                              (0.0, 0.5, 2.0, 30.0)):
        for _ in range(20):
            delay = backoff_delay(retry, base=base, cap=cap, rand=rng.random)
            assert 0.0 <= delay <= min(cap, base * 2 ** (retry - 1))


def test_backoff_uses_the_jitter_source_once_per_call() -> None:
    draws: list[float] = []

    def rand() -> float:
        draws.append(0.25)
        return 0.25

    backoff_delay(1, base=0.1, cap=2.0, rand=rand)
    assert draws == [0.25]


def test_a_zero_base_means_no_wait() -> None:
    assert backoff_delay(3, base=0.0, cap=2.0, rand=lambda: 0.9) == 0.0


@pytest.mark.parametrize("retry", [0, -1])
def test_retry_numbers_start_at_one(retry: int) -> None:
    with pytest.raises(ValueError, match="start at 1"):
        backoff_delay(retry, base=0.1, cap=2.0, rand=lambda: 0.5)


# -- RetryBudget ---------------------------------------------------------------------------


def _spend_all(budget: RetryBudget, now: float) -> int:
    spent = 0
    while budget.try_spend(now):
        spent += 1
        assert spent < 100_000
    return spent


def test_budget_without_floor_is_the_ratio_of_requests() -> None:
    budget = RetryBudget(0.1, min_per_second=0)
    for _ in range(100):
        budget.record_request(0.0)
    assert _spend_all(budget, 0.0) == 10


@pytest.mark.parametrize(("ratio", "requests", "expected"), [
    (0.2, 100, 20), (0.2, 4, 0), (0.2, 5, 1), (0.5, 7, 3), (1.0, 3, 3), (0.0, 1000, 0),
    (0.3, 10, 3), (0.7, 10, 7),
])
def test_budget_rounds_down_to_whole_retries(ratio: float, requests: int, expected: int) -> None:
    budget = RetryBudget(ratio, min_per_second=0)
    for _ in range(requests):
        budget.record_request(1.0)
    assert _spend_all(budget, 1.0) == expected


def test_floor_lets_a_quiet_route_retry() -> None:
    budget = RetryBudget(0.2, min_per_second=3, window=10)
    budget.record_request(0.0)
    assert budget.try_spend(0.0)


def test_floor_is_min_per_second_times_window() -> None:
    budget = RetryBudget(0.0, min_per_second=3, window=10)
    assert _spend_all(budget, 0.0) == 30


def test_budget_is_floor_plus_ratio() -> None:
    budget = RetryBudget(0.1, min_per_second=3, window=10)
    for _ in range(100):
        budget.record_request(0.0)
    assert budget.available(0.0) == 40
    assert _spend_all(budget, 0.0) == 40


def test_requests_keep_earning_retries_under_sustained_failure() -> None:
    """Every request fails and asks for retries: the retries stay near ratio * requests."""
    budget = RetryBudget(0.2, min_per_second=1, window=10)
    retries = requests = 0
    for tick in range(10_000):  # 100 requests a second for 100 seconds
        now = tick / 100
        budget.record_request(now)
        requests += 1
        retries += sum(budget.try_spend(now) for _ in range(2))
    assert retries <= 0.2 * requests + 1 * 100  # ratio, plus the floor over 100 s
    assert retries >= 0.2 * requests * 0.95


def test_counts_leave_the_window() -> None:
    budget = RetryBudget(0.5, min_per_second=0, window=10, slots=10)
    for _ in range(10):
        budget.record_request(0.0)
    assert _spend_all(budget, 0.0) == 5
    assert not budget.try_spend(9.5)  # still within the window
    assert budget.available(10.0) == 0  # both requests and retries dropped out
    for _ in range(10):
        budget.record_request(10.0)
    assert _spend_all(budget, 10.0) == 5


def test_window_slides_slot_by_slot() -> None:
    budget = RetryBudget(1.0, min_per_second=0, window=10, slots=10)
    budget.record_request(0.5)  # slot 0
    budget.record_request(3.5)  # slot 3
    assert budget.available(9.9) == 2
    assert budget.available(10.0) == 1  # slot 0, [0, 1), dropped
    assert budget.available(12.9) == 1
    assert budget.available(13.0) == 0  # slot 3, [3, 4), dropped


def test_spent_retries_leave_the_window_too() -> None:
    budget = RetryBudget(1.0, min_per_second=0, window=10, slots=10)
    budget.record_request(0.0)
    assert budget.try_spend(0.0)
    budget.record_request(5.0)
    assert budget.try_spend(5.0)
    assert not budget.try_spend(5.0)
    budget.record_request(10.0)  # the request and the retry of slot 0 are gone
    assert budget.try_spend(10.0)
    assert not budget.try_spend(10.0)


def test_a_long_quiet_period_banks_no_credit() -> None:
    budget = RetryBudget(0.2, min_per_second=0, window=10)
    for second in range(1000):
        budget.record_request(float(second))  # healthy traffic, no retries
    later = 2000.0
    assert budget.available(later) == 0
    budget.record_request(later)
    assert not budget.try_spend(later)


def test_a_clock_stepping_back_does_not_rewrite_history() -> None:
    budget = RetryBudget(1.0, min_per_second=0, window=10, slots=10)
    budget.record_request(50.0)
    budget.record_request(45.0)  # counted in the newest slot
    assert budget.available(50.0) == 2
    assert budget.available(59.9) == 2
    assert budget.available(60.0) == 0


def test_a_gap_of_exactly_the_window_clears_everything() -> None:
    budget = RetryBudget(1.0, min_per_second=0, window=10, slots=5)
    for _ in range(3):
        budget.record_request(1.0)
    assert budget.available(11.0) == 0


def test_budget_against_a_model() -> None:
    """Random traffic, checked against a plain list of timestamps filtered per call."""
    rng = random.Random(11)
    window, slots, ratio, floor = 10.0, 10, 0.25, 0.5
    budget = RetryBudget(ratio, min_per_second=floor, window=window, slots=slots)
    width = window / slots
    requests: list[float] = []
    retries: list[float] = []
    now = 0.0
    for _ in range(5000):
        now += rng.expovariate(20)

        def live(times: list[float], now: float = now) -> int:
            oldest_slot = int(now // width) - slots + 1
            return sum(1 for t in times if int(t // width) >= oldest_slot)

        if rng.random() < 0.6:
            budget.record_request(now)
            requests.append(now)
        else:
            allowed = live(retries) + 1 <= ratio * live(requests) + floor * window + 1e-9
            assert budget.try_spend(now) is allowed
            if allowed:
                retries.append(now)


@pytest.mark.parametrize("kwargs", [
    {"ratio": -0.1}, {"ratio": 1.5}, {"ratio": 0.2, "window": 0}, {"ratio": 0.2, "slots": 0},
    {"ratio": 0.2, "min_per_second": -1},
])
def test_budget_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryBudget(**kwargs)  # type: ignore[arg-type]


def test_budget_repr_is_readable() -> None:
    budget = RetryBudget(0.2)
    budget.record_request(0.0)
    assert repr(budget) == "<RetryBudget 20% requests=1 retries=0 window=10s>"
