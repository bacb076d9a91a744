"""When ticks fall and whether a late one runs: no clock, no Redis."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from sidecar.core.schedule import MAX_GRACE, Cron, Every, grace, missed_between, runs


def at(text: str, zone: str = "UTC") -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone)).timestamp()


def test_every_ticks_on_multiples_of_its_period_since_the_epoch() -> None:
    ticks = Every(600)
    assert ticks.latest(at("2026-12-07 10:14:59")) == at("2026-12-07 10:10:00")
    assert ticks.latest(at("2026-12-07 10:10:00")) == at("2026-12-07 10:10:00")
    assert ticks.following(at("2026-12-07 10:10:00")) == at("2026-12-07 10:20:00")


def test_cron_ticks_in_its_time_zone() -> None:
    ticks = Cron("0 2 * * *", "Europe/Paris")
    # 02:00 in Paris is 01:00 UTC in winter.
    assert ticks.latest(at("2026-12-07 12:00")) == at("2026-12-07 01:00")
    assert ticks.latest(at("2026-12-07 01:00")) == at("2026-12-07 01:00")  # on the tick
    assert ticks.latest(at("2026-12-07 00:59:59")) == at("2026-12-06 01:00")
    assert ticks.following(at("2026-12-07 01:00")) == at("2026-12-08 01:00")


def test_cron_follows_daylight_saving_time() -> None:
    ticks = Cron("30 12 * * *", "Europe/Paris")
    before = ticks.latest(at("2026-03-28 23:00"))  # CET: 11:30 UTC
    after = ticks.following(before)                # CEST from the 29th: 10:30 UTC
    assert before == at("2026-03-28 11:30") and after == at("2026-03-29 10:30")


@pytest.mark.parametrize("expression", ["61 * * * *", "* * *", "0 2 * * mon-", "nonsense"])
def test_an_invalid_cron_expression_says_what_a_valid_one_looks_like(expression: str) -> None:
    with pytest.raises(ValueError, match="five fields"):
        Cron(expression)


def test_an_unknown_time_zone_is_refused() -> None:
    with pytest.raises(ValueError, match="IANA"):
        Cron("0 2 * * *", "Mars/Olympus")


def test_grace_is_half_a_period_within_bounds() -> None:
    assert grace(Every(2), 0) == 1.0
    assert grace(Every(1), 0) == 0.5
    assert grace(Every(86400), 0) == MAX_GRACE


def test_a_tick_on_time_always_runs() -> None:
    ticks = Every(10)
    for missed in ("once", "skip"):
        assert runs(ticks, 100.0, 100.2, 90.0, missed)
        assert runs(ticks, 100.0, 100.2, None, missed)  # a new schedule's first tick too


def test_a_late_tick_runs_once_for_all_missed_with_once_and_not_with_skip() -> None:
    ticks = Every(10)
    # Down since 60: ticks 70, 80, 90 and 100 missed; back at 107 (the grace is 5 s).
    assert runs(ticks, 100.0, 107.0, 60.0, "once")
    assert not runs(ticks, 100.0, 107.0, 60.0, "skip")


def test_a_new_schedule_does_not_run_a_tick_that_fell_before_it_existed() -> None:
    assert not runs(Cron("0 2 * * *"), at("2026-12-07 02:00"), at("2026-12-07 14:00"), None,
                    "once")


def test_the_ticks_missed_between_two_claims_are_counted() -> None:
    every = Every(2.0)
    assert missed_between(every, 100.0, 102.0) == 0
    assert missed_between(every, 100.0, 108.0) == 3   # 102, 104, 106
    assert missed_between(every, 100.0, 1e9, most=50) == 50
