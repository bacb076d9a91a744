"""When a schedule's ticks fall, and whether a tick claimed late still runs.

Every process of the cluster computes the same ticks from the config alone (cron ticks in the
schedule's time zone, `every` ticks on multiples of the period since the Unix epoch), so they
agree on which tick is due without talking; Redis only says which of them was claimed already
(stores/schedules.py). Times are Unix seconds, passed in: nothing here reads a clock.

croniter parses and steps cron expressions; it is imported here and nowhere else.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Literal, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from croniter.croniter import CroniterError

# A tick claimed later than this after it fell is late: with `missed: skip` it does not run.
# Half a period for short periods, so that `every: 2s` does not count a tick two ticks ago as on
# time; at most 30 s, what a restart or a Redis hiccup may take.
MAX_GRACE = 30.0

Missed = Literal["once", "skip"]


class Ticks(Protocol):
    def latest(self, now: float) -> float:
        """The last tick at or before `now`."""
        ...

    def following(self, tick: float) -> float:
        """The first tick after `tick`."""
        ...

    def describe(self) -> str: ...


class Every:
    """`every: 10m`: ticks at whole multiples of the period since the epoch (10:00, 10:10...)."""

    def __init__(self, period: float) -> None:
        if not period > 0:
            raise ValueError("the period must be positive")
        self.period = period

    def latest(self, now: float) -> float:
        return float(math.floor(now / self.period) * self.period)

    def following(self, tick: float) -> float:
        return float((math.floor(tick / self.period) + 1) * self.period)

    def describe(self) -> str:
        return f"every {self.period:g}s"


class Cron:
    """`cron: "0 2 * * *"` in a time zone (daylight saving time as croniter steps it: a tick
    in a skipped hour does not happen, one in a repeated hour happens once)."""

    def __init__(self, expression: str, timezone: str = "UTC") -> None:
        self.expression = expression
        self.zone = zone(timezone)
        try:
            croniter(expression, datetime.now(self.zone))
        except (CroniterError, ValueError, KeyError) as exc:
            raise ValueError(f"invalid cron expression {expression!r}: {exc}; five fields "
                             "(minute hour day-of-month month day-of-week), e.g. "
                             '"0 2 * * *" for 02:00 every day') from None

    def latest(self, now: float) -> float:
        # croniter's get_prev from an instant on a tick returns the tick before it.
        start = datetime.fromtimestamp(now + 1e-6, self.zone)
        return float(croniter(self.expression, start).get_prev(float))

    def following(self, tick: float) -> float:
        start = datetime.fromtimestamp(tick, self.zone)
        return float(croniter(self.expression, start).get_next(float))

    def describe(self) -> str:
        return f"cron {self.expression} ({self.zone.key})"


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r}: use an IANA name such as UTC, "
                         "Europe/Paris or America/New_York") from None


def grace(ticks: Ticks, tick: float) -> float:
    """How late a tick may be claimed and still count as on time."""
    return min(MAX_GRACE, max(0.5, (ticks.following(tick) - tick) / 2))


def missed_between(ticks: Ticks, previous: float, tick: float, most: int = 10_000) -> int:
    """How many ticks fell strictly between `previous` (the last claimed) and `tick` (the one
    claimed now): those nobody ran, counted up to `most`."""
    count = 0
    current = ticks.following(previous)
    while current < tick and count < most:
        count += 1
        current = ticks.following(current)
    return count


def runs(ticks: Ticks, tick: float, now: float, previous: float | None, missed: Missed) -> bool:
    """Whether a tick just claimed (the newest due, `previous` the one claimed before it, None
    for a schedule never seen) runs. On time, it always does. Late (the cluster was down, or
    the schedule new), it stands for every tick missed since `previous`: `once` runs it for
    all of them, `skip` does not. A schedule seen for the first time does not run a tick that
    fell before it existed."""
    if now - tick <= grace(ticks, tick):
        return True
    return previous is not None and missed == "once"
