"""Token buckets and their response fields (sidecar.core.ratelimit), with time passed in."""

from __future__ import annotations

import math
import random

import pytest

from sidecar.core.ratelimit import (
    BucketMap,
    Decision,
    TokenBucket,
    decide,
    policy_field,
    ratelimit_field,
    retry_after,
)

T = 1000.0  # any monotonic start


# -- TokenBucket ----------------------------------------------------------------------------------


def test_a_new_bucket_is_full_and_allows_exactly_burst_at_once():
    bucket = TokenBucket(rate=1.0, burst=5)
    decisions = [bucket.take(T) for _ in range(7)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False] * 2
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0, 0]
    assert all(d.limit == 5 for d in decisions)


def test_an_allowed_take_has_no_retry_after_and_reports_the_time_to_full():
    bucket = TokenBucket(rate=2.0, burst=10)
    decision = bucket.take(T)
    assert decision == Decision(allowed=True, limit=10, remaining=9, retry_after=0.0, reset=0.5)


def test_a_refusal_says_when_one_token_will_be_back():
    bucket = TokenBucket(rate=4.0, burst=2)
    bucket.take(T)
    bucket.take(T)
    refused = bucket.take(T + 0.1)  # 0.4 of a token back
    assert not refused.allowed
    assert refused.remaining == 0
    assert refused.retry_after == pytest.approx(0.15)
    assert refused.reset == pytest.approx(0.4)


def test_a_refusal_takes_nothing():
    bucket = TokenBucket(rate=1.0, burst=1)
    bucket.take(T)
    for step in range(9):
        assert not bucket.take(T + step * 0.1).allowed
    assert bucket.take(T + 1.0).allowed  # refused requests did not push the refill back


@pytest.mark.parametrize("rate", [10.0, 3.0, 0.1, 1 / 3600, 1000.0])
def test_refill_grants_one_token_after_one_interval_despite_float_noise(rate):
    bucket = TokenBucket(rate=rate, burst=1)
    now = T
    for _ in range(50):
        assert bucket.take(now).allowed
        assert not bucket.take(now).allowed
        now += 1 / rate


def test_refill_stops_at_burst():
    bucket = TokenBucket(rate=100.0, burst=3)
    bucket.take(T)
    decisions = [bucket.take(T + 3600) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]


def test_a_clock_stepping_back_refills_nothing_and_does_not_fail():
    bucket = TokenBucket(rate=1.0, burst=2)
    bucket.take(T)
    assert bucket.take(T - 50).allowed
    assert not bucket.take(T - 50).allowed
    assert bucket.take(T - 49).allowed  # counted from the last stamp, never backwards


def test_level_and_full_at():
    bucket = TokenBucket(rate=2.0, burst=4)
    assert bucket.full_at() == -math.inf
    assert bucket.level(T) == 4
    for _ in range(4):
        bucket.take(T)
    assert bucket.level(T + 1) == pytest.approx(2)
    assert bucket.full_at() == pytest.approx(T + 2)
    assert "0.000/4" in repr(bucket)


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1), (-1.0, 1), (float("nan"), 1), (1.0, 0)])
def test_nonsense_settings_are_refused(rate, burst):
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)
    with pytest.raises(ValueError):
        BucketMap(rate, burst)


@pytest.mark.parametrize("seed", range(20))
def test_never_more_than_burst_plus_refill_over_any_window(seed):
    """The defining property, against random arrival times: in any window [a, b] at most
    burst + rate * (b - a) requests pass, and a request that would pass is never refused."""
    rng = random.Random(seed)
    rate = rng.choice([0.5, 1.0, 7.0, 100.0])
    burst = rng.randint(1, 20)
    bucket = TokenBucket(rate, burst)
    now = T
    allowed: list[float] = []
    for _ in range(400):
        now += rng.expovariate(rate * rng.choice([0.5, 1.0, 3.0]))
        level_before = bucket.level(now)
        decision = bucket.take(now)
        assert decision.allowed == (level_before >= 1 - 1e-9)
        if decision.allowed:
            allowed.append(now)
    for i, start in enumerate(allowed):
        for j in range(i, len(allowed)):
            assert j - i + 1 <= burst + rate * (allowed[j] - start) + 1e-6


# -- decide ---------------------------------------------------------------------------------------


def test_decide_clamps_what_a_store_hands_back():
    assert decide(True, -0.5, 1.0, 3).remaining == 0
    assert decide(True, 99.0, 1.0, 3) == Decision(True, 3, 3, 0.0, 0.0)
    assert decide(True, 1.999999, 1.0, 3).remaining == 1
    assert decide(True, 1.9999999999, 1.0, 3).remaining == 2  # float noise, not a missing token


# -- BucketMap ------------------------------------------------------------------------------------


def test_keys_have_separate_buckets():
    buckets = BucketMap(rate=1.0, burst=1)
    assert buckets.take("a", T).allowed
    assert not buckets.take("a", T).allowed
    assert buckets.take("b", T).allowed


def test_full_buckets_are_forgotten_first_and_without_changing_a_decision():
    buckets = BucketMap(rate=1.0, burst=2, max_keys=4)
    for key in "abcd":
        buckets.take(key, T)
    buckets.take("a", T)  # a is empty; b, c, d are full again at T + 1
    assert buckets.take("e", T + 1.5).allowed  # the bound is reached: b, c, d go
    assert len(buckets) == 2 and "a" in buckets and "e" in buckets
    assert buckets.take("a", T + 1.5).allowed
    assert not buckets.take("a", T + 1.5).allowed  # a kept its state


def test_past_the_bound_the_soonest_full_buckets_go_and_the_heaviest_users_stay():
    buckets = BucketMap(rate=1.0, burst=10, max_keys=8)
    for i in range(8):  # key i takes i + 1 tokens: key 7 is the emptiest
        for _ in range(i + 1):
            buckets.take(f"k{i}", T)
    buckets.take("new", T)
    assert len(buckets) == 7  # shed to 3/4 of 8, then the new key
    assert {f"k{i}" for i in range(2, 8)} | {"new"} == set(buckets._buckets)
    for _ in range(2):
        assert buckets.take("k7", T).allowed
    assert not buckets.take("k7", T).allowed  # still remembered as nearly empty


@pytest.mark.parametrize("max_keys", [1, 2, 3, 10, 100])
def test_memory_stays_bounded_with_many_client_addresses(max_keys):
    buckets = BucketMap(rate=0.001, burst=5, max_keys=max_keys)
    for i in range(5000):
        assert buckets.take(f"10.0.{i // 256}.{i % 256}", T + i * 0.001).allowed
        assert len(buckets) <= max_keys


class CountingMap(BucketMap):
    __slots__ = ("sheds",)

    def shed(self, now: float) -> None:
        self.sheds = getattr(self, "sheds", 0) + 1
        super().shed(now)


def test_shedding_is_amortized():
    buckets = CountingMap(rate=0.001, burst=5, max_keys=1000)
    for i in range(10_000):
        buckets.take(str(i), T)
    assert buckets.sheds <= 10_000 // 250 + 1
    assert "keys=" in repr(buckets)


# -- response fields ------------------------------------------------------------------------------


@pytest.mark.parametrize(("rate", "burst", "field"), [
    (100.0, 200, "200;w=2"),
    (10.0, 5, "5;w=1"),  # half a second, rounded up
    (1000.0, 1, "1;w=1"),  # never a zero window
    (100 / 60, 100, "100;w=60"),
    (10 / 3600, 10, "10;w=3600"),
    (3.0, 10, "10;w=4"),
])
def test_policy_field(rate, burst, field):
    assert policy_field(rate, burst) == field


def test_ratelimit_field_and_retry_after():
    bucket = TokenBucket(rate=10.0, burst=3)
    assert ratelimit_field(bucket.take(T)) == "limit=3, remaining=2, reset=1"
    bucket.take(T)
    bucket.take(T)
    refused = bucket.take(T)
    assert ratelimit_field(refused) == "limit=3, remaining=0, reset=1"
    assert retry_after(refused) == 1  # 0.1 s, rounded up to a whole second


@pytest.mark.parametrize(("seconds", "header"), [
    (0.001, 1), (1.0, 1), (1.0000000002, 1), (1.2, 2), (59.5, 60), (3600.0, 3600),
])
def test_retry_after_is_whole_seconds_rounded_up(seconds, header):
    assert retry_after(Decision(False, 1, 0, seconds, seconds)) == header


def test_reset_of_a_full_bucket_is_zero():
    assert ratelimit_field(Decision(True, 5, 5, 0.0, 0.0)) == "limit=5, remaining=5, reset=0"
