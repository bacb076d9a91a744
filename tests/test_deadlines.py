"""sidecar/deadlines.py: many deadlines on one timer, with a real event loop."""

from __future__ import annotations

import asyncio

from sidecar.deadlines import Deadlines


async def test_a_deadline_fires_once_and_a_cleared_one_never() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop, tick=0.01)
    fired: list[str] = []
    later = asyncio.Event()
    deadlines.set("cleared", 0.02, lambda: fired.append("cleared"))
    deadlines.set("kept", 0.02, lambda: fired.append("kept"))
    deadlines.set("later", 0.05, later.set)
    deadlines.clear("cleared")
    await asyncio.wait_for(later.wait(), 5)
    assert fired == ["kept"]  # both were due before "later"; only the kept one fired
    assert len(deadlines) == 0


async def test_setting_a_key_again_moves_its_deadline() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop, tick=0.01)
    fired: list[float] = []
    done = asyncio.Event()
    deadlines.set("k", 0.02, lambda: fired.append(loop.time()))
    started = loop.time()
    deadlines.set("k", 0.1, lambda: (fired.append(loop.time()), done.set()))
    await asyncio.wait_for(done.wait(), 5)
    assert len(fired) == 1 and fired[0] - started >= 0.1


async def test_the_timer_stops_when_nothing_is_due_and_starts_again() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop, tick=0.01)
    first, second = asyncio.Event(), asyncio.Event()
    deadlines.set("a", 0.0, first.set)
    await asyncio.wait_for(first.wait(), 5)
    assert not deadlines.armed  # no timer left running for an empty set
    deadlines.set("b", 0.0, second.set)
    await asyncio.wait_for(second.wait(), 5)
    deadlines.close()
