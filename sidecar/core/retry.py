"""Retry decisions, as pure functions and one small state machine that is handed `now`.

Questions answered without I/O so they can be tested exhaustively: is this outcome worth
another attempt (`RetryOn`), how long to wait first (`backoff_delay`), and may this route afford
one more retry right now (`RetryBudget`). Which methods may be sent twice at all is
`IDEMPOTENT_METHODS`; the policy adds the Idempotency-Key exception.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

# RFC 9110 §9.2.2: sending these twice has the effect of sending them once. Any other method
# may have changed something before it failed, so it is only sent again when the client vouches
# for it with an idempotency key.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
ERROR_KINDS = frozenset({"connect", "timeout"})
# 2 ** 62 times any sane base is already far past any cap; stops the power from overflowing.
_MAX_EXPONENT = 62


@dataclass(frozen=True, slots=True)
class RetryOn:
    """The outcomes of one attempt that are worth another, parsed once from `retry.on`."""

    statuses: frozenset[int]
    errors: frozenset[str]  # "connect", "timeout"

    @classmethod
    def parse(cls, on: Iterable[str]) -> RetryOn:
        """`["connect", "503"]` -> statuses {503}, errors {"connect"} (config.py validated it)."""
        items = list(on)
        return cls(frozenset(int(o) for o in items if o.isdigit()),
                   frozenset(o for o in items if o in ERROR_KINDS))

    def status(self, status: int) -> bool:
        return status in self.statuses

    def error(self, kind: str | None) -> bool:
        """`kind` is None for failures no `on` entry names (a protocol error, a busy pool)."""
        return kind is not None and kind in self.errors


def backoff_delay(retry: int, *, base: float, cap: float, rand: Callable[[], float]) -> float:
    """Seconds to wait before retry number `retry` (1 for the first): "full jitter", uniform in
    [0, min(cap, base * 2 ** (retry - 1))). Spreading retries over the whole interval keeps
    clients that failed together from retrying together (AWS architecture blog, 2015).

    `rand` returns a float in [0, 1), like random.random; tests pass a fixed one.
    """
    if retry < 1:
        raise ValueError(f"retry numbers start at 1, got {retry}")
    ceiling = min(cap, base * 2.0 ** min(retry - 1, _MAX_EXPONENT))
    return max(0.0, ceiling) * rand()


class RetryBudget:
    """Retries may add at most `ratio` of the traffic, measured over a sliding `window`.

    Every request counts in the window; a retry is allowed while

        retries_in_window + 1 <= ratio * requests_in_window + min_per_second * window

    The second term is a floor: on a quiet route (one request a minute) a ratio alone would
    never allow a retry, so `min_per_second * window` retries are always available. Counts older
    than the window fall out, so a long healthy period cannot bank credit for a later storm
    (the weakness of a plain token bucket without a cap). The window is a ring of `slots`
    buckets; a bucket is dropped as a whole, so "the window" is between `window - window/slots`
    and `window` long. The same scheme as Finagle's RetryBudget (ttl, minRetriesPerSec,
    percentCanRetry).
    """

    __slots__ = ("_epoch", "_requests", "_retries", "_slot_width", "_total_requests",
                 "_total_retries", "min_per_second", "ratio", "window")

    def __init__(self, ratio: float, *, min_per_second: float = 3.0, window: float = 10.0,
                 slots: int = 10) -> None:
        if not 0 <= ratio <= 1:
            raise ValueError(f"ratio must be between 0 and 1, got {ratio}")
        if window <= 0 or slots < 1 or min_per_second < 0:
            raise ValueError("window and slots must be positive, min_per_second not negative")
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.window = window
        self._slot_width = window / slots
        self._requests = [0] * slots
        self._retries = [0] * slots
        self._total_requests = 0
        self._total_retries = 0
        self._epoch: int | None = None  # number of the newest slot, counted from time 0

    def record_request(self, now: float) -> None:
        """A request arrived (a first attempt, retried or not): it earns `ratio` retries."""
        slot = self._advance(now)
        self._requests[slot] += 1
        self._total_requests += 1

    def try_spend(self, now: float) -> bool:
        """Take one retry from the budget if there is one; False means do not retry."""
        slot = self._advance(now)
        if self._total_retries + 1 > self._allowance():
            return False
        self._retries[slot] += 1
        self._total_retries += 1
        return True

    def available(self, now: float) -> int:
        """Whole retries still allowed in the current window (for stats and tests)."""
        self._advance(now)
        return max(0, math.floor(self._allowance() - self._total_retries))

    def _allowance(self) -> float:
        # The small epsilon keeps 10% of 100 requests at 10 retries despite float rounding.
        return self.ratio * self._total_requests + self.min_per_second * self.window + 1e-9

    def _advance(self, now: float) -> int:
        """Drop the slots that fell out of the window; return the index of the current one."""
        size = len(self._requests)
        epoch = int(now // self._slot_width)
        last = self._epoch
        if last is None or epoch - last >= size:
            self._requests = [0] * size
            self._retries = [0] * size
            self._total_requests = self._total_retries = 0
        elif epoch > last:
            for number in range(last + 1, epoch + 1):
                index = number % size
                self._total_requests -= self._requests[index]
                self._total_retries -= self._retries[index]
                self._requests[index] = self._retries[index] = 0
        # A clock that steps back (it should not: callers pass a monotonic one) stays in the
        # newest slot rather than rewriting history.
        current = epoch if last is None or epoch > last else last
        self._epoch = current
        return current % size

    def __repr__(self) -> str:
        return (f"<RetryBudget {self.ratio:.0%} requests={self._total_requests} "
                f"retries={self._total_retries} window={self.window:g}s>")
