"""The embedded Redis's memory budget (sidecar.core.maxmemory): the arithmetic docs/caching.md
shows, with no Redis."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sidecar.core.maxmemory import JOB_FIELDS, Budget, QueueNeed, budget, job_head

MiB = 1024**2


def test_the_defaults_reserve_the_quota_an_entry_and_the_headroom() -> None:
    found = budget(cache_quota=256 * MiB, largest_entry=8 * MiB, queues=[
        QueueNeed("default", None, 10, None)], head=job_head(8190, 8190, 100),
        headroom=256 * MiB)
    assert found == Budget(cache=264 * MiB, jobs=0, headroom=256 * MiB, unbounded=())
    assert found.total == 520 * MiB


def test_a_bounded_queue_gets_room_for_its_waiting_and_running_jobs() -> None:
    head = job_head(1000, 1000, 10)
    assert head == 2 * (1000 + 10 * 1002) + JOB_FIELDS
    found = budget(cache_quota=MiB, largest_entry=0, queues=[
        QueueNeed("reports", 100, 5, 64 * 1024)], head=head, headroom=8 * MiB)
    waiting = 100 * (64 * 1024 + head)
    running = 5 * (2 * 64 * 1024 + head)  # the body and the result it is writing
    assert found.jobs == waiting + running
    assert found.total == MiB + waiting + running + 8 * MiB


def test_queues_no_route_uses_need_nothing_and_unbounded_ones_are_named() -> None:
    found = budget(cache_quota=MiB, largest_entry=0, queues=[
        QueueNeed("idle", 1000, 10, None), QueueNeed("open", None, 10, MiB),
        QueueNeed("also-open", None, 1, 0)], head=JOB_FIELDS, headroom=8 * MiB)
    assert found.jobs == 0
    assert found.unbounded == ("also-open", "open")


@given(st.lists(st.tuples(st.integers(1, 10_000), st.integers(1, 100),
                          st.integers(0, 64 * MiB)), max_size=5),
       st.integers(MiB, 1024 * MiB), st.integers(0, 64 * MiB))
def test_every_bounded_queue_adds_what_it_may_hold(
        queues: list[tuple[int, int, int]], quota: int, entry: int) -> None:
    needs = [QueueNeed(f"q{i}", waiting, concurrency, body)
             for i, (waiting, concurrency, body) in enumerate(queues)]
    head = job_head(8190, 8190, 100)
    found = budget(cache_quota=quota, largest_entry=entry, queues=needs, head=head,
                   headroom=8 * MiB)
    for need in needs:
        alone = budget(cache_quota=quota, largest_entry=entry, queues=[need], head=head,
                       headroom=8 * MiB)
        assert alone.jobs >= (need.max_queued or 0) * (need.max_body or 0)
    assert found.jobs == sum(budget(cache_quota=quota, largest_entry=entry, queues=[need],
                                    head=head, headroom=8 * MiB).jobs for need in needs)
    assert found.total == quota + entry + found.jobs + 8 * MiB
