"""The rules of miss coalescing (sidecar.core.coalesce), with time passed in."""

from __future__ import annotations

import pytest

from sidecar.core.coalesce import (
    PASS_FOR,
    Outcome,
    PassMemo,
    Step,
    after_wait,
    outcome_of,
    remembered,
    takes_part,
)
from sidecar.core.freshness import parse_cache_control


@pytest.mark.parametrize(("method", "cache_control", "honor", "expected"), [
    ("GET", None, True, True),
    ("GET", "max-age=60", True, True),
    ("GET", "max-stale=30, min-fresh=5", True, True),
    ("HEAD", None, True, False),  # a HEAD leader stores nothing for its waiters
    ("POST", None, True, False),
    ("GET", "no-store", True, False),
    ("GET", "no-store", False, False),  # its response is not stored whatever the config says
    ("GET", "no-cache", True, False),
    ("GET", "max-age=0", True, False),
    ("GET", "max-age=00", True, False),
    ("GET", "no-cache", False, True),  # honor_client_no_cache: false ignores them
    ("GET", "max-age=0", False, True),
    ("GET", "max-age=soon", True, True),  # malformed: ignored
])
def test_who_takes_part(method: str, cache_control: str | None, honor: bool,
                        expected: bool) -> None:
    directives = parse_cache_control(cache_control)
    assert takes_part(method, directives, honor_client=honor) is expected


@pytest.mark.parametrize("detail", [
    "private", "no-store", "set-cookie", "cookie", "authorization", "vary-star", "too-large",
    "no-freshness", "status",
])
def test_anything_not_stored_sends_the_waiters_to_the_upstream(detail: str) -> None:
    assert outcome_of(detail) is Outcome.UNCACHEABLE
    assert after_wait(outcome_of(detail), same_variant=True) is Step.FETCH


def test_a_stored_entry_answers_the_waiters_of_its_variant_only() -> None:
    assert outcome_of("stored") is Outcome.STORED
    assert after_wait(Outcome.STORED, same_variant=True) is Step.ANSWER
    assert after_wait(Outcome.STORED, same_variant=False) is Step.RETRY


def test_a_failed_leader_lets_a_waiter_lead_and_a_timeout_fetches() -> None:
    assert after_wait(Outcome.FAILED, same_variant=True) is Step.RETRY
    assert after_wait(None, same_variant=True) is Step.FETCH
    assert after_wait(None, same_variant=False) is Step.FETCH


def test_every_outcome_has_a_step() -> None:
    for outcome in (*Outcome, None):
        for same in (True, False):
            assert isinstance(after_wait(outcome, same_variant=same), Step)


@pytest.mark.parametrize(("detail", "status", "expected"), [
    ("stored", 200, False),
    ("status", 429, False),  # not a status the cache stores: nothing lasting
    ("no-freshness", 503, False),  # an upstream error: coalescing goes on for the key
    ("no-store", 500, False),
    ("no-freshness", 200, True), ("private", 200, True), ("set-cookie", 200, True),
    ("too-large", 200, True), ("no-store", 200, True), ("cookie", 200, True),
    ("no-freshness", 302, True),
])
def test_which_responses_make_a_key_skip_the_lock(detail: str, status: int,
                                                  expected: bool) -> None:
    assert remembered(detail, status) is expected


def test_the_memo_forgets_a_key_after_its_time() -> None:
    memo = PassMemo(seconds=10)
    memo.remember("k", now=100)
    assert memo.passing("k", now=100) and memo.passing("k", now=109.9)
    assert not memo.passing("k", now=110)
    assert len(memo) == 0  # dropped when found expired
    assert not memo.passing("other", now=100)


def test_remembering_again_extends_and_forget_drops() -> None:
    memo = PassMemo(seconds=10)
    memo.remember("k", now=100)
    memo.remember("k", now=105)
    assert memo.passing("k", now=114)
    memo.forget("k")
    memo.forget("never")
    assert not memo.passing("k", now=114)


def test_the_memo_is_bounded_oldest_first() -> None:
    memo = PassMemo(seconds=10, capacity=3)
    for i, key in enumerate("abcd"):
        memo.remember(key, now=i)
    assert len(memo) == 3 and not memo.passing("a", now=4)
    memo.remember("b", now=5)  # refreshed: now the newest
    memo.remember("e", now=6)
    assert [k for k in "bcde" if memo.passing(k, now=7)] == ["b", "d", "e"]


def test_defaults_and_repr() -> None:
    memo = PassMemo()
    assert memo.seconds == PASS_FOR
    memo.remember("k", now=0)
    assert repr(memo) == "<PassMemo keys=1 for=120.0s>"
