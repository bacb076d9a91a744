"""A circuit breaker as a state machine: time is passed in, nothing is awaited.

Written here rather than taken from pybreaker, whose asyncio story does not fit a proxy: its
async support targets Tornado, `call(async_fn)` counts a coroutine that later fails as a
success, `calling()` turns a cancelled or timed-out trial into CircuitBreakerError, its Redis
storage blocks the event loop, and half-open lets any number of trials through.

closed --(failures in a row)--> open --(reset elapsed)--> half_open
half_open --(a trial succeeds)--> closed;  half_open --(a trial fails)--> open
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


Listener = Callable[["Breaker", State, State, float], None]  # breaker, old, new, now


@dataclass
class Breaker:
    name: str
    failures: int  # consecutive failures that open it
    reset: float  # seconds open before trials are let through
    half_open_trials: int = 1  # trials in flight at once while half-open
    state: State = State.CLOSED
    consecutive_failures: int = 0
    opened_at: float = 0.0
    trials: int = 0  # trials let through and not yet reported
    transitions: int = 0  # also the generation: reports from before a transition are stale
    on_transition: list[Listener] = field(default_factory=list)

    def allow(self, now: float) -> bool:
        """May a request go to the upstream now? A True in half-open is a trial: report its
        outcome (success, failure or ignored) exactly once."""
        if self.state is State.OPEN:
            if now - self.opened_at < self.reset:
                return False
            self._move(State.HALF_OPEN, now)
        if self.state is State.HALF_OPEN:
            if self.trials >= self.half_open_trials:
                return False
            self.trials += 1
        return True

    def success(self, now: float, generation: int | None = None) -> None:
        """A good answer. `generation` is `transitions` as it was when the request was let
        through: the answer to a request from before the last transition changes nothing (a
        request sent while closed must not close, or free a trial slot of, a later half-open)."""
        if generation is not None and generation != self.transitions:
            return
        if self.state is State.HALF_OPEN:
            self._move(State.CLOSED, now)
        elif self.state is State.CLOSED:
            self.consecutive_failures = 0
        # open: an answer to a request let through before it opened changes nothing

    def failure(self, now: float, generation: int | None = None) -> None:
        if generation is not None and generation != self.transitions:
            return
        if self.state is State.HALF_OPEN:
            self.opened_at = now
            self._move(State.OPEN, now)
        elif self.state is State.CLOSED:
            self.consecutive_failures += 1
            if self.consecutive_failures >= self.failures:
                self.opened_at = now
                self._move(State.OPEN, now)

    def ignored(self, now: float, generation: int | None = None) -> None:
        """The request ended without a verdict (cancelled, or an outcome that does not count):
        a half-open trial slot is free again."""
        if generation is not None and generation != self.transitions:
            return
        if self.state is State.HALF_OPEN and self.trials > 0:
            self.trials -= 1

    def retry_after(self, now: float) -> float:
        """Seconds until the breaker lets a trial through (0 when it does now)."""
        if self.state is not State.OPEN:
            return 0.0
        return max(0.0, self.opened_at + self.reset - now)

    def force_open(self, opened_at: float, now: float) -> None:
        """Open as another instance did at `opened_at` (cluster scope)."""
        if self.state is State.OPEN and self.opened_at >= opened_at:
            return
        self.opened_at = opened_at
        self._move(State.OPEN, now)

    def force_close(self, now: float) -> None:
        """Close at once: another instance closed it, or an operator reset it."""
        self._move(State.CLOSED, now)

    def _move(self, new: State, now: float) -> None:
        old = self.state
        self.state = new
        self.trials = 0
        if new is State.CLOSED:
            self.consecutive_failures = 0
        if old is not new:
            self.transitions += 1
            for listener in self.on_transition:
                listener(self, old, new, now)
