"""Prometheus metrics: plain counting on the request path, the exposition format at scrape time.

The request path only adds to dicts and lists (`Recorder`): prometheus_client's own Counter and
Histogram take a lock per update (and, in its multiprocess mode, write to an mmap file), which
would cost more than the 10% of a cache hit's budget this is allowed. Everything else is read
when Prometheus scrapes: the policies' own counters (cache, dedup, rate limit, breakers), the
job queues' counters in Redis, the process's resources. prometheus_client writes the text format
(`SidecarCollector` is one of its custom collectors).

With `server.workers > 1` every worker writes its figures to a file in a directory the
supervisor owns (`SIDECAR_METRICS_DIR`) every second, and the worker that answers a scrape adds
them to its own: counters of a worker that died stay counted, its gauges do not. Figures from
the other workers are at most `FLUSH_INTERVAL` old.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector

from . import __version__
from .core.callbacks import OUTCOMES as CALLBACK_OUTCOMES
from .core.jobs import DURATION_BUCKETS as JOB_BUCKETS
from .stores.boundary import StoreUnavailable

if TYPE_CHECKING:
    from .config import Config
    from .jobs.queue import JobService
    from .stores.breakers import BreakerService
    from .stores.dedup import DedupService
    from .stores.tiered import CacheService

METRICS_DIR_ENV = "SIDECAR_METRICS_DIR"
FLUSH_INTERVAL = 1.0
NO_ROUTE = "_none"  # requests no route matched
JOBS_ROUTE = "_jobs"  # the job status API (jobs.path)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE",
                      "CONNECT"})
_CLASSES = ("0xx", "1xx", "2xx", "3xx", "4xx", "5xx")
# A request's count key is its method's code plus its status (statuses have three digits).
_METHOD_STEP = 1000
_METHOD_NAMES = ("other", *sorted(_METHODS))
_METHOD_CODES = {name: i * _METHOD_STEP for i, name in enumerate(_METHOD_NAMES) if i}
_BREAKER_STATE = {"closed": 0, "half_open": 1, "open": 2}
_DEDUP_ROLE = {"leader": "leader", "idempotency_leader": "leader", "follower": "follower",
               "replay": "replay", "conflict": "conflict", "mismatch": "conflict"}
_CACHE_RESULTS = frozenset({"hit", "miss", "stale", "bypass", "revalidated", "collapsed"})
_RATELIMIT_EVENT = "rate_limited"

# name -> (type, label names, help). The names and labels are the contract (docs/metrics.md).
SPEC: dict[str, tuple[str, tuple[str, ...], str]] = {
    "sidecar_requests_total": (
        "counter", ("route", "method", "status"), "Requests answered, by route name"),
    "sidecar_request_duration_seconds": (
        "histogram", ("route",),
        "Time from the request's arrival until its response is handed to the connection "
        "(streamed bodies: until their last byte)"),
    "sidecar_inflight_requests": ("gauge", (), "Requests being answered now"),
    "sidecar_upstream_requests_total": (
        "counter", ("upstream", "status"),
        "Requests sent to upstreams (each retry counts); status 'error' when none came back"),
    "sidecar_upstream_duration_seconds": (
        "histogram", ("upstream",), "Time from sending a request upstream to its response head"),
    "sidecar_cache_requests_total": (
        "counter", ("route", "layer", "result"),
        "Cache lookups by the layer that answered (none: the upstream did)"),
    "sidecar_cache_bytes": ("gauge", ("layer",), "Bytes held by a cache layer"),
    "sidecar_cache_entries": ("gauge", ("layer",), "Entries held by a cache layer"),
    "sidecar_cache_events_total": (
        "counter", ("route", "event"), "Cache stores and invalidations"),
    "sidecar_cache_l2_bytes": (
        "gauge", (), "Bytes L2 holds as counted against its quota, whole cluster"),
    "sidecar_cache_l2_quota_bytes": (
        "gauge", (), "L2's quota for the whole cluster (cache.redis.max_bytes)"),
    "sidecar_cache_l2_evictions_total": (
        "counter", (), "L2 entries evicted to keep within the quota, whole cluster"),
    "sidecar_dedup_total": (
        "counter", ("route", "role"), "Deduplicated requests by role"),
    "sidecar_dedup_events_total": (
        "counter", ("route", "event"), "Other deduplication and retry events"),
    "sidecar_breaker_state": (
        "gauge", ("upstream", "breaker"), "Circuit breaker state: 0 closed, 1 half-open, 2 open"),
    "sidecar_breaker_transitions_total": (
        "counter", ("upstream", "breaker", "state"), "Breaker transitions, by state entered"),
    "sidecar_ratelimit_rejected_total": (
        "counter", ("route",), "Requests refused with 429 by a rate limit"),
    "sidecar_jobs_total": (
        "counter", ("queue", "outcome"), "Job outcomes, whole cluster (aggregate with max)"),
    "sidecar_job_callbacks_total": (
        "counter", ("route", "outcome"),
        "Job callback deliveries, whole cluster: delivered, retried, failed"),
    "sidecar_job_duration_seconds": (
        "histogram", ("queue",), "Duration of finished job attempts, whole cluster"),
    "sidecar_queue_depth": ("gauge", ("queue",), "Jobs waiting in a queue, whole cluster"),
    "sidecar_jobs_running": ("gauge", ("queue",), "Jobs running, whole cluster"),
    "sidecar_config_reloads_total": ("counter", ("result",), "Config reloads, ok or error"),
    "sidecar_compress_total": (
        "counter", ("route", "encoding", "result"),
        "Responses by what the compress policy did: compressed (the work done, once per stored "
        "entry), sent (as encoded, to a client taking it), decompressed (for one that does not)"),
    "sidecar_schedule_runs_total": (
        "counter", ("schedule", "outcome"),
        "Schedule runs by this worker: succeeded, failed, or skipped (a missed tick)"),
    "sidecar_redis_up": ("gauge", (), "1 when Redis answers"),
    "sidecar_upstream_server_healthy": (
        "gauge", ("upstream", "server"),
        "1 while a server of a several-server upstream takes requests (0 on any worker that "
        "has it out)"),
    "sidecar_upstream_server_ejections_total": (
        "counter", ("upstream", "server"),
        "Times a server was taken out, by failures in a row or by health checks"),
    "sidecar_sla_latency_seconds": (
        "gauge", ("route",), "The route's p95 latency target (metrics.sla)"),
    "sidecar_sla_error_ratio": (
        "gauge", ("route",), "The route's 5xx share target (metrics.sla)"),
    "sidecar_build_info": ("gauge", ("version",), "Always 1; the version as a label"),
    "sidecar_workers": ("gauge", (), "Worker processes reporting"),
}
# Per-process gauges are summed over live workers, except states, where the worst one counts:
# the most open breaker, Redis down when any worker cannot reach it.
_MAX_GAUGES = frozenset({"sidecar_breaker_state"})
_MIN_GAUGES = frozenset({"sidecar_redis_up", "sidecar_upstream_server_healthy"})
_PROCESS = ("process_resident_memory_bytes", "process_virtual_memory_bytes",
            "process_cpu_seconds_total", "process_open_fds")


class Histogram:
    """Bucket counts (not cumulative: one slot per bound, the last for +Inf) and a sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class Recorder:
    """This process's request and upstream figures, updated on the request path."""

    def __init__(self, config: Config) -> None:
        self.inflight = 0
        self._by_route: dict[str, dict[int, int]] = {}  # route -> method code + status -> n
        self.durations: dict[str, Histogram] = {}
        self._by_upstream: dict[str, dict[int, int]] = {}  # upstream -> status (0: none) -> n
        self.upstream_durations: dict[str, Histogram] = {}
        # route -> (its counts by method, its histogram): one lookup per request for both
        self._cells: dict[str, tuple[dict[int, int], Histogram]] = {}
        self._upstream_cells: dict[str, tuple[dict[int, int], Histogram]] = {}
        self.configure(config)

    def configure(self, config: Config) -> None:
        metrics = config.metrics
        self.enabled = metrics.enabled
        self.server_timing = metrics.server_timing
        # Counted by exact code either way; the label (code or class) is made when read.
        self.by_code = metrics.status_label == "code"
        bounds = tuple(metrics.buckets)
        if self.durations and next(iter(self.durations.values())).bounds != bounds:
            self.durations.clear()  # new buckets: their series start again
            self.upstream_durations.clear()
            self._cells.clear()
            self._upstream_cells.clear()
        self.bounds = bounds

    def status_label(self, status: int) -> str:
        if self.by_code:
            return str(status)
        index = status // 100
        return _CLASSES[index] if 0 <= index < 6 else "other"

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        # One int key per (method, status) in a dict per route: no tuple per request (tuples
        # are garbage the cyclic collector visits), one dict probe per count.
        cell = self._cells.get(route)
        if cell is None:
            cell = self._cell(route)
        counts, histogram = cell
        key = _METHOD_CODES.get(method, 0) + status
        counts[key] = counts.get(key, 0) + 1
        histogram.counts[bisect_left(histogram.bounds, seconds)] += 1
        histogram.sum += seconds

    def _cell(self, route: str) -> tuple[dict[int, int], Histogram]:
        return self._new_cell(route, self._by_route, self.durations, self._cells)

    def _new_cell(self, name: str, counts_by: dict[str, dict[int, int]],
                  histograms: dict[str, Histogram],
                  cells: dict[str, tuple[dict[int, int], Histogram]]
                  ) -> tuple[dict[int, int], Histogram]:
        """A route's (or an upstream's) counts and histogram, made on its first request."""
        counts = counts_by.get(name)
        if counts is None:
            counts = counts_by[name] = {}
        histogram = histograms.get(name)
        if histogram is None:
            histogram = histograms[name] = Histogram(self.bounds)
        cell = cells[name] = (counts, histogram)
        return cell

    @property
    def requests(self) -> dict[tuple[str, str, str], int]:
        """(route, method, status label) -> count."""
        out: dict[tuple[str, str, str], int] = {}
        for route, counts in self._by_route.items():
            for key, n in counts.items():
                method, status = divmod(key, _METHOD_STEP)
                labels = (route, _METHOD_NAMES[method], self.status_label(status))
                out[labels] = out.get(labels, 0) + n
        return out

    def upstream_call(self, upstream: str, status: int | None, seconds: float) -> None:
        cell = self._upstream_cells.get(upstream)
        if cell is None:
            cell = self._upstream_cell(upstream)
        counts, histogram = cell
        key = 0 if status is None else status  # 0: no response came back
        counts[key] = counts.get(key, 0) + 1
        histogram.counts[bisect_left(histogram.bounds, seconds)] += 1
        histogram.sum += seconds

    def _upstream_cell(self, upstream: str) -> tuple[dict[int, int], Histogram]:
        return self._new_cell(upstream, self._by_upstream, self.upstream_durations,
                              self._upstream_cells)

    @property
    def upstream(self) -> dict[tuple[str, str], int]:
        """(upstream, status label or 'error') -> count."""
        out: dict[tuple[str, str], int] = {}
        for upstream, counts in self._by_upstream.items():
            for status, n in counts.items():
                labels = (upstream, self.status_label(status) if status else "error")
                out[labels] = out.get(labels, 0) + n
        return out


class MetricsHost(Protocol):
    """What the figures are read from: the worker (app.Runtime)."""

    @property
    def config(self) -> Config: ...

    @property
    def metrics(self) -> Recorder: ...

    @property
    def metrics_share(self) -> Share | None: ...

    @property
    def cache(self) -> CacheService: ...

    @property
    def dedup(self) -> DedupService: ...

    @property
    def breakers(self) -> BreakerService: ...

    @property
    def jobs(self) -> JobService: ...

    @property
    def redis_up(self) -> bool: ...

    @property
    def reloads(self) -> dict[str, int]: ...

    @property
    def schedule_runs(self) -> Mapping[tuple[str, str], int]: ...

    @property
    def pools(self) -> Mapping[str, Any]: ...  # name -> balancer.Upstream

    @property
    def compression(self) -> Mapping[tuple[str, str, str], int]: ...


# -- one process's figures, as plain data --------------------------------------------------------

Snapshot = dict[str, Any]  # {"pid", "counters": {name: [[*labels, value]]}, "gauges", "histograms"}


def snapshot(runtime: MetricsHost) -> Snapshot:
    """Every per-process figure, in a form that can be written to a file and added up."""
    recorder = runtime.metrics
    counters: dict[str, list[list[Any]]] = {
        "sidecar_requests_total": [[*k, v] for k, v in recorder.requests.items()],
        "sidecar_upstream_requests_total": [[*k, v] for k, v in recorder.upstream.items()],
        "sidecar_config_reloads_total": [[k, v] for k, v in runtime.reloads.items()],
        "sidecar_schedule_runs_total": [[*k, v] for k, v in runtime.schedule_runs.items()],
        "sidecar_compress_total": [[*k, v] for k, v in runtime.compression.items()],
    }
    cache, cache_events = [], []
    for (route, layer, result), n in runtime.cache.counts.items():
        if result in _CACHE_RESULTS or result == "revalidate":
            cache.append([route, "none" if layer == "-" else layer,
                          "revalidated" if result == "revalidate" else result, n])
        else:
            cache_events.append([route, result, n])
    counters["sidecar_cache_requests_total"] = cache
    counters["sidecar_cache_events_total"] = cache_events
    roles: Counter[tuple[str, str]] = Counter()
    dedup_events, limited = [], []
    for (route, event), n in runtime.dedup.counts.items():
        role = _DEDUP_ROLE.get(event)
        if role is not None:
            roles[(route, role)] += n
        elif event == _RATELIMIT_EVENT:
            limited.append([route, n])
        else:
            dedup_events.append([route, event, n])
            if event == "cluster_follower":
                # This instance's leader took another instance's result: its request was a
                # follower's, not a leader's (a role per request, as the contract says).
                roles[(route, "leader")] -= n
                roles[(route, "follower")] += n
    dedup = [[route, role, n] for (route, role), n in roles.items()]
    counters["sidecar_dedup_total"] = dedup
    counters["sidecar_dedup_events_total"] = dedup_events
    # A route with a rate limit shows 0 before its first refusal (rate() needs the series).
    limited += [[route.name, 0] for route in runtime.config.routes if route.rate_limit]
    counters["sidecar_ratelimit_rejected_total"] = limited
    breaker_states, transitions = [], []
    upstream_of = _breaker_upstreams(runtime.config)
    for (name, state), n in runtime.breakers.counts.items():
        if state in _BREAKER_STATE:
            transitions.append([upstream_of.get(name, ""), name, state, n])
    for name, breaker in runtime.breakers.breakers.items():
        breaker_states.append([upstream_of.get(name, ""), name,
                               _BREAKER_STATE.get(breaker.state.value, 0)])
    counters["sidecar_breaker_transitions_total"] = transitions
    server_health, ejections = [], []
    for upstream, pool in runtime.pools.items():
        for server in pool.stats().get("servers", ()):
            server_health.append([upstream, server["url"], 1 if server["healthy"] else 0])
            ejections.append([upstream, server["url"], server["ejections"]])
    counters["sidecar_upstream_server_ejections_total"] = ejections
    memory_bytes = sum(s.bytes for s in runtime.cache.memory.values())
    memory_entries = sum(s.entries for s in runtime.cache.memory.values())
    gauges: dict[str, list[list[Any]]] = {
        "sidecar_inflight_requests": [[recorder.inflight]],
        "sidecar_cache_bytes": [["memory", memory_bytes]],
        "sidecar_cache_entries": [["memory", memory_entries]],
        "sidecar_breaker_state": breaker_states,
        "sidecar_redis_up": [[1 if runtime.redis_up else 0]],
        "sidecar_upstream_server_healthy": server_health,
        "sidecar_workers": [[1]],
    }
    for family in _PROCESS_COLLECTOR.collect():
        for sample in family.samples:
            if sample.name in _PROCESS:
                gauges[sample.name] = [[sample.value]]
    histograms = {
        "sidecar_request_duration_seconds": [
            [route, list(h.bounds), h.counts, h.sum] for route, h in recorder.durations.items()],
        "sidecar_upstream_duration_seconds": [
            [name, list(h.bounds), h.counts, h.sum]
            for name, h in recorder.upstream_durations.items()],
    }
    return {"pid": os.getpid(), "counters": counters, "gauges": gauges,
            "histograms": histograms}


_PROCESS_COLLECTOR = ProcessCollector(registry=None)


def _breaker_upstreams(config: Config) -> dict[str, str]:
    """Breaker name (`upstream:<name>` or `route:<name>`) -> the upstream it guards."""
    names = {f"upstream:{name}": name for name in config.upstreams}
    names.update({f"route:{route.name}": route.upstream for route in config.routes})
    return names


def merge(snapshots: Iterable[Snapshot], live: set[int]) -> Snapshot:
    """Add up the workers' figures: counters from every worker that ever reported, gauges from
    the live ones (summed, or the highest for states)."""
    counters: dict[str, Counter[tuple[Any, ...]]] = {}
    gauges: dict[str, dict[tuple[Any, ...], float]] = {}
    histograms: dict[str, dict[tuple[Any, ...], list[Any]]] = {}
    for snap in snapshots:
        for name, rows in snap["counters"].items():
            total = counters.setdefault(name, Counter())
            for *labels, value in rows:
                total[tuple(labels)] += value
        if snap["pid"] in live:
            for name, rows in snap["gauges"].items():
                values = gauges.setdefault(name, {})
                for *labels, value in rows:
                    key = tuple(labels)
                    if name in _MAX_GAUGES:
                        values[key] = max(values.get(key, value), value)
                    elif name in _MIN_GAUGES:
                        values[key] = min(values.get(key, value), value)
                    else:
                        values[key] = values.get(key, 0) + value
        for name, rows in snap["histograms"].items():
            merged = histograms.setdefault(name, {})
            for label, bounds, counts, seconds in rows:
                key = (label, tuple(bounds))
                if key not in merged:
                    merged[key] = [list(counts), seconds]
                else:
                    merged[key][0] = [a + b for a, b in zip(merged[key][0], counts, strict=True)]
                    merged[key][1] += seconds
    return {"counters": counters, "gauges": gauges, "histograms": histograms}


# -- sharing between worker processes ------------------------------------------------------------


class Share:
    """Each worker's snapshot in `<dir>/<pid>.json`, rewritten every FLUSH_INTERVAL."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)
        self.path = self.directory / f"{os.getpid()}.json"

    def write(self, snap: Snapshot) -> None:
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(snap))
        os.replace(temporary, self.path)  # readers never see half a file

    def others(self) -> list[Snapshot]:
        found = []
        for path in self.directory.glob("*.json"):
            if path == self.path:
                continue
            with contextlib.suppress(OSError, ValueError):
                found.append(json.loads(path.read_text()))
        return found

    async def run(self, runtime: MetricsHost) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            with contextlib.suppress(OSError):  # the directory went away: the supervisor stops
                self.write(snapshot(runtime))

    def close(self, runtime: MetricsHost) -> None:
        with contextlib.suppress(OSError):
            self.write(snapshot(runtime))  # the last figures of a worker that stops


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def share_from_env() -> Share | None:
    directory = os.environ.get(METRICS_DIR_ENV)
    return Share(directory) if directory else None


# -- the scrape ---------------------------------------------------------------------------------


async def render(runtime: MetricsHost) -> bytes:
    """The /metrics page: this process's figures, the other workers', the cluster's."""
    own = snapshot(runtime)
    snaps = [own]
    live = {own["pid"]}
    share = runtime.metrics_share
    if share is not None:
        others = share.others()
        snaps += others
        live |= {s["pid"] for s in others if _alive(s["pid"])}
    merged = merge(snaps, live)
    cluster = await _cluster_figures(runtime)
    l2 = cluster["l2"]
    if l2 is not None:
        merged["gauges"].setdefault("sidecar_cache_bytes", {})[("redis",)] = l2["used_memory"]
        merged["gauges"].setdefault("sidecar_cache_entries", {})[("redis",)] = l2["entries"]
        merged["gauges"]["sidecar_cache_l2_bytes"] = {(): l2["bytes"]}
        merged["counters"]["sidecar_cache_l2_evictions_total"] = Counter({(): l2["evictions"]})
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SidecarCollector(runtime.config, merged, cluster))
    return generate_latest(registry)


async def _cluster_figures(runtime: MetricsHost) -> dict[str, Any]:
    """What lives in Redis: the L2 cache's size and the job queues."""
    figures: dict[str, Any] = {"queues": {}, "l2": None, "callbacks": None}
    if not runtime.redis_up:
        return figures
    with contextlib.suppress(StoreUnavailable, TimeoutError):
        async with asyncio.timeout(2.0):
            l2 = (await runtime.cache.stats())["redis"]
            if l2.get("status") == "up":
                figures["l2"] = l2
            for name in runtime.config.queues:
                figures["queues"][name] = await runtime.jobs.queue_stats(name)
            figures["callbacks"] = await runtime.jobs.callback_counts()
    return figures


class SidecarCollector:
    """Metric families from merged snapshots and cluster figures (prometheus_client formats)."""

    def __init__(self, config: Config, merged: Snapshot, cluster: dict[str, Any]) -> None:
        self.config = config
        self.merged = merged
        self.cluster = cluster

    def collect(self) -> Iterator[Metric]:
        counters = self.merged["counters"]
        gauges = self.merged["gauges"]
        for name, (kind, labels, help_text) in SPEC.items():
            if kind == "counter" and name in counters:
                counter = CounterMetricFamily(name, help_text, labels=labels)
                for key, value in sorted(counters[name].items()):
                    counter.add_metric([str(v) for v in key], value)
                yield counter
            elif kind == "gauge" and name in gauges:
                gauge = GaugeMetricFamily(name, help_text, labels=labels)
                for key, value in sorted(gauges[name].items()):
                    gauge.add_metric([str(v) for v in key], value)
                yield gauge
            elif kind == "histogram" and name in self.merged["histograms"]:
                histogram = HistogramMetricFamily(name, help_text, labels=labels)
                for (label, bounds), (counts, total) in sorted(
                        self.merged["histograms"][name].items()):
                    histogram.add_metric([label], _cumulative(bounds, counts), total)
                yield histogram
        yield from self._config_families()
        yield from self._cluster_families()
        for sample_name in _PROCESS:
            if sample_name in gauges:
                value = sum(gauges[sample_name].values())
                help_text = f"{sample_name}, summed over the worker processes"
                if sample_name.endswith("_total"):
                    yield CounterMetricFamily(sample_name[:-6], help_text, value=value)
                else:
                    yield GaugeMetricFamily(sample_name, help_text, value=value)

    def _config_families(self) -> Iterator[Metric]:
        sla = self.config.metrics.sla
        latency = GaugeMetricFamily("sidecar_sla_latency_seconds",
                                    SPEC["sidecar_sla_latency_seconds"][2], labels=("route",))
        errors = GaugeMetricFamily("sidecar_sla_error_ratio", SPEC["sidecar_sla_error_ratio"][2],
                                   labels=("route",))
        for route in self.config.routes:
            p95, ratio = sla.for_route(route.name)
            latency.add_metric([route.name], p95)
            errors.add_metric([route.name], ratio)
        yield latency
        yield errors
        yield GaugeMetricFamily("sidecar_cache_l2_quota_bytes",
                                SPEC["sidecar_cache_l2_quota_bytes"][2],
                                value=self.config.cache.redis.max_bytes)
        info = GaugeMetricFamily("sidecar_build_info", SPEC["sidecar_build_info"][2],
                                 labels=("version",))
        info.add_metric([__version__], 1)
        yield info

    def _cluster_families(self) -> Iterator[Metric]:
        yield from self._callback_families()
        queues = self.cluster["queues"]
        if not queues:
            return
        outcomes = CounterMetricFamily("sidecar_jobs_total", SPEC["sidecar_jobs_total"][2],
                                       labels=("queue", "outcome"))
        depth = GaugeMetricFamily("sidecar_queue_depth", SPEC["sidecar_queue_depth"][2],
                                  labels=("queue",))
        running = GaugeMetricFamily("sidecar_jobs_running", SPEC["sidecar_jobs_running"][2],
                                    labels=("queue",))
        durations = HistogramMetricFamily("sidecar_job_duration_seconds",
                                          SPEC["sidecar_job_duration_seconds"][2],
                                          labels=("queue",))
        for name, stats in sorted(queues.items()):
            for outcome, n in stats["outcomes"].items():
                outcomes.add_metric([name, outcome], n)
            depth.add_metric([name], stats["queued"])
            running.add_metric([name], stats["running"])
            buckets = stats["duration_ms"].get("buckets")
            if buckets is not None:
                durations.add_metric([name], _cumulative(JOB_BUCKETS, buckets),
                                     stats["duration_ms"]["sum"] / 1000)
        yield outcomes
        yield depth
        yield running
        yield durations


    def _callback_families(self) -> Iterator[Metric]:
        """Every route with a callback from the start at 0, and any other route still counted
        in Redis (one whose callback a reload removed)."""
        counts: dict[tuple[str, str], int] | None = self.cluster.get("callbacks")
        if counts is None:
            return
        family = CounterMetricFamily("sidecar_job_callbacks_total",
                                     SPEC["sidecar_job_callbacks_total"][2],
                                     labels=("route", "outcome"))
        found = dict(counts)
        for route in self.config.routes:
            if route.offload is not None and route.offload.callback is not None:
                for outcome in CALLBACK_OUTCOMES:
                    found.setdefault((route.name, outcome), 0)
        for (route_name, outcome), n in sorted(found.items()):
            family.add_metric([route_name, outcome], n)
        yield family


def _cumulative(bounds: Iterable[float], counts: list[int]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip([*bounds, float("inf")], counts, strict=True):
        running += count
        out.append(("+Inf" if bound == float("inf") else _float(bound), running))
    return out


def _float(value: float) -> str:
    return repr(float(value))

