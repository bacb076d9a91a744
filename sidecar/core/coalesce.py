"""Miss coalescing, the cache's lock (nginx's `proxy_cache_lock`, Varnish's waiting list): the
rules, without the waiting.

Concurrent misses for one key make one upstream call: the first request leads (fetches, and
stores what it may), the others wait for it. What is decided here:

- which requests take part at all (`takes_part`): one that could not be answered from the
  leader's entry, or whose own response would not be stored, neither waits nor leads;
- what a waiter does once the leader is done (`after_wait`): it is answered from the entry,
  goes to the upstream itself (the response could not be stored: Varnish's hit-for-pass, since
  handing everyone the leader's answer would leak a private or personalised response), or looks
  again (the entry is another variant, or the leader failed: one of the waiters leads next);
- which keys skip the lock for a while (`PassMemo`, Varnish's hit-for-miss): once a key's
  response could not be stored, making its next misses queue behind a leader only delays them.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from typing import assert_never

from .freshness import Directives, delta_seconds

# How long a key whose response could not be stored skips the lock: Varnish's default for its
# hit-for-miss objects. A stored response forgets the key at once, so a long memory costs only
# coalescing, never caching.
PASS_FOR = 120.0


class Outcome(enum.Enum):
    """How a leader's miss ended, as its waiters learn it."""

    STORED = "stored"  # an entry: waiters with the same Vary values are answered from it
    UNCACHEABLE = "uncacheable"  # a response that was not stored (private, no-store, too large)
    FAILED = "failed"  # no response: the upstream failed, or the leader was cancelled


class Step(enum.Enum):
    """What a waiter does next."""

    ANSWER = "answer"  # from the leader's entry
    FETCH = "fetch"  # call the upstream itself, without waiting any more
    RETRY = "retry"  # look again: lead, or wait for the next leader


def takes_part(method: str, request_cc: Directives, *, honor_client: bool) -> bool:
    """Whether a miss leads or waits. Only GET: a HEAD's response is not stored, so a HEAD
    leader would leave its waiters nothing. Not with `no-store`, whose response is not stored
    either. Not with `no-cache` or `max-age=0` when the client's directives are honoured: they
    ask for a response the upstream gave after the request arrived, and the leader's request
    may have left before."""
    if method != "GET" or "no-store" in request_cc:
        return False
    if not honor_client:
        return True
    return "no-cache" not in request_cc and delta_seconds(request_cc, "max-age") != 0


def outcome_of(detail: str) -> Outcome:
    """A leader's outcome from what storing its response gave (`stored`, or why not)."""
    return Outcome.STORED if detail == "stored" else Outcome.UNCACHEABLE


def remembered(detail: str, status: int) -> bool:
    """Whether a response that was not stored (`detail` says why) makes its key skip the lock
    (PassMemo). Not an upstream error (5xx), nor a status the cache does not store, which say
    nothing lasting about the resource: coalescing must not stop for a key when its upstream
    is failing, which is when it needs coalescing most."""
    return detail not in ("stored", "status") and status < 500


def after_wait(outcome: Outcome | None, *, same_variant: bool) -> Step:
    """A waiter's next step once its leader is done (`outcome`), or None: it waited as long as
    it may (`lock_timeout`). `same_variant`: the entry matches this request's Vary values."""
    if outcome is None:
        return Step.FETCH
    match outcome:
        case Outcome.STORED:
            return Step.ANSWER if same_variant else Step.RETRY
        case Outcome.UNCACHEABLE:
            return Step.FETCH
        case Outcome.FAILED:
            return Step.RETRY
        case _:
            assert_never(outcome)


class PassMemo:
    """Keys whose last response could not be stored, each for `seconds` after it came: their
    misses skip the lock. Bounded: past `capacity` keys the oldest are forgotten first."""

    __slots__ = ("_until", "capacity", "seconds")

    def __init__(self, seconds: float = PASS_FOR, capacity: int = 4096) -> None:
        self.seconds = seconds
        self.capacity = capacity
        self._until: OrderedDict[str, float] = OrderedDict()

    def remember(self, key: str, now: float) -> None:
        until = self._until
        until[key] = now + self.seconds
        until.move_to_end(key)
        while len(until) > self.capacity:
            until.popitem(last=False)

    def forget(self, key: str) -> None:
        self._until.pop(key, None)

    def passing(self, key: str, now: float) -> bool:
        until = self._until.get(key)
        if until is None:
            return False
        if now >= until:
            del self._until[key]
            return False
        return True

    def __len__(self) -> int:
        return len(self._until)

    def __repr__(self) -> str:
        return f"<PassMemo keys={len(self._until)} for={self.seconds:.1f}s>"
