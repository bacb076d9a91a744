"""The dashboard's per-route time series: one sample a second of what the metrics count, kept in
a ring buffer. Pure: the sampler (dashboard/series.py) hands in cumulative totals and the time;
this module turns them into per-second deltas and reads rates, ratios and quantiles from them.

The totals are the cumulative counters /metrics shows (every worker's, added up), so a sample is
their difference from the previous one: nothing new is counted on the request path. A counter
that went down (a reload that changed the histogram buckets) yields an empty sample, not a
negative one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# The figures of a route, in this order, followed by its latency histogram's bucket counts.
FIELDS = ("requests", "errors", "hits", "lookups", "coalesced", "limited")
_N = len(FIELDS)


@dataclass(frozen=True)
class Totals:
    """One route's cumulative figures at one moment."""

    counts: tuple[int, ...]  # FIELDS, in order
    bounds: tuple[float, ...]  # the latency histogram's upper bounds (seconds)
    buckets: tuple[int, ...]  # one count per bound, then +Inf (not cumulative)


@dataclass(frozen=True)
class Sample:
    """What happened in one second, per route: FIELDS then bucket counts."""

    at: int  # Unix second the sample closes
    routes: Mapping[str, tuple[int, ...]]
    bounds: Mapping[str, tuple[float, ...]]


class Ring:
    """The last `size` samples; `add` turns cumulative totals into one sample."""

    def __init__(self, size: int = 300) -> None:
        self.samples: deque[Sample] = deque(maxlen=size)
        self._last: dict[str, Totals] = {}

    def __repr__(self) -> str:
        return f"<Ring samples={len(self.samples)}/{self.samples.maxlen}>"

    def add(self, at: int, totals: Mapping[str, Totals]) -> Sample | None:
        """Record the figures at second `at`. The first call only sets the baseline (there is
        nothing to subtract from yet) and returns None."""
        first = not self._last and not self.samples
        routes: dict[str, tuple[int, ...]] = {}
        bounds: dict[str, tuple[float, ...]] = {}
        for name, now in totals.items():
            before = self._last.get(name)
            if first:
                before = now
            elif before is None:  # a route new since the last second: all of it is new
                before = Totals((0,) * _N, now.bounds, (0,) * len(now.buckets))
            elif before.bounds != now.bounds:  # new buckets (a reload): they start at zero
                before = Totals(before.counts, now.bounds, (0,) * len(now.buckets))
            routes[name] = _delta(now, before)
            bounds[name] = now.bounds
        self._last = dict(totals)
        if first:
            return None
        sample = Sample(at, routes, bounds)
        self.samples.append(sample)
        return sample

    def last(self, seconds: int) -> list[Sample]:
        return list(self.samples)[-seconds:] if seconds > 0 else []


def _delta(now: Totals, before: Totals) -> tuple[int, ...]:
    pairs = [*zip(now.counts, before.counts, strict=True),
             *zip(now.buckets, before.buckets, strict=True)]
    if any(a < b for a, b in pairs):
        return (0,) * len(pairs)  # a counter went back: a reset, not negative traffic
    return tuple(a - b for a, b in pairs)


def quantile(q: float, bounds: Sequence[float], buckets: Sequence[int]) -> float | None:
    """The q-quantile of a histogram (non-cumulative bucket counts, +Inf last), interpolated
    within its bucket as Prometheus' histogram_quantile does; None without observations. One in
    the +Inf bucket is reported as the highest bound."""
    total = sum(buckets)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(buckets):
        if count and seen + count >= rank:
            if i >= len(bounds):
                return bounds[-1] if bounds else None
            lower = bounds[i - 1] if i > 0 else 0.0
            return lower + (bounds[i] - lower) * (rank - seen) / count
        seen += count
    return bounds[-1] if bounds else None


def route_view(samples: Sequence[Sample], name: str, *, smooth: int = 5) -> dict[str, object]:
    """One route's series for the page: per second requests/s, error and hit ratios, and the
    latency quantiles over the trailing `smooth` seconds (one second holds few requests); with
    the same figures over the whole span as `window`."""
    rows = [s.routes.get(name) for s in samples]
    bounds = next((s.bounds[name] for s in reversed(samples) if name in s.bounds), ())
    width = len(bounds) + 1
    empty = (0,) * (_N + width)
    rows_full = [r if r is not None and len(r) == _N + width else empty for r in rows]
    out: dict[str, list[float | None]] = {key: [] for key in
                                          ("rps", "errors", "hit_ratio", "p50", "p95", "p99",
                                           "coalesced", "limited")}
    for i, row in enumerate(rows_full):
        requests, errors, hits, lookups, coalesced, limited = row[:_N]
        out["rps"].append(requests)
        out["errors"].append(errors / requests if requests else None)
        out["hit_ratio"].append(hits / lookups if lookups else None)
        out["coalesced"].append(coalesced)
        out["limited"].append(limited)
        recent = [sum(col) for col in zip(*(r[_N:] for r in rows_full[max(0, i - smooth + 1):
                                                                      i + 1]), strict=True)]
        for key, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
            out[key].append(quantile(q, bounds, recent))
    totals = [sum(col) for col in zip(*rows_full, strict=True)] if rows_full else list(empty)
    requests, errors, hits, lookups, coalesced, limited = totals[:_N]
    span = len(rows_full) or 1
    window = {
        "seconds": len(rows_full), "requests": requests, "rps": requests / span,
        "error_ratio": errors / requests if requests else None,
        "hit_ratio": hits / lookups if lookups else None,
        "coalesced": coalesced, "limited": limited,
        **{key: quantile(q, bounds, totals[_N:]) for key, q in
           (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))},
    }
    return {"series": out, "window": window}
