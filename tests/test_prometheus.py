"""docs/grafana against a real Prometheus: the sidecar (two workers, as a process) in front of
the example backend and a real Redis takes traffic that exercises every metric family (cache
hits and misses, dedup, 5xx, an upstream that refuses connections, a breaker that opens and
closes, rate-limit rejections, an offloaded job, config reloads good and bad); Debian's
`prometheus` scrapes it every second with the alert rules loaded; then every PromQL expression
of the Grafana dashboard and of docs/grafana/alerts.yml is run through Prometheus's HTTP API and
must parse and return data.

"Returns data" is checked on the operands of comparisons and set operators (`A > on (route)
group_left B` checks A and B): the whole expression of an alert is empty while nothing is wrong,
which says nothing about whether its metrics exist.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from support import ROOT, Backend, SidecarProcess, free_port, make_config, write_config

GRAFANA = ROOT / "docs" / "grafana"
DASHBOARD = GRAFANA / "sidecar-dashboard.json"
ALERTS = GRAFANA / "alerts.yml"
TOKEN = "prometheus-test-token"

# What Grafana puts in place of its variables: `.*` for the multi-value ones (the dashboard must
# use them with `=~`, or they match nothing and the check below fails).
GRAFANA_VARIABLES = {
    "__rate_interval": "1m", "__interval": "15s", "__range": "5m", "__range_s": "300",
    "instance": ".*", "route": ".*",
}


# -- prometheus, installed when missing ---------------------------------------------------------


@functools.cache
def _find_or_install() -> tuple[str | None, str | None, str]:
    found = shutil.which("prometheus"), shutil.which("promtool")
    if all(found):
        return *found, ""
    # A new session: sudo cannot prompt on our terminal, it fails instead of hanging.
    result = subprocess.run([str(ROOT / "scripts" / "ensure-debian-packages"), "prometheus"],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=900, start_new_session=True, check=False)
    why = f"exited {result.returncode}: {result.stderr.strip()}"
    return shutil.which("prometheus"), shutil.which("promtool"), why


def prometheus_binaries() -> tuple[str, str]:
    """`prometheus` and `promtool`, installed from Debian when missing (`make test` does it in
    its set-up; this covers a bare `pytest`); skip only when they cannot be installed."""
    prometheus, tool, why = _find_or_install()
    if prometheus is None or tool is None:
        pytest.skip("Debian's `prometheus` package (prometheus, promtool) is not installed "
                    f"and could not be installed (`scripts/ensure-debian-packages prometheus` "
                    f"{why}); install it with `apt-get install prometheus` to run this test")
    return prometheus, tool


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    _, tool = prometheus_binaries()
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=60,
                          check=False)


class Prometheus:
    """A real Prometheus on a free port, scraping one sidecar every second, `rule_files` set."""

    def __init__(self, workdir: Path, admin_port: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "prometheus.log"
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{
                "job_name": "sidecar",  # as in docs/grafana/prometheus.yml; alerts.yml names it
                "metrics_path": "/metrics",
                "authorization": {"type": "Bearer", "credentials": TOKEN},
                "static_configs": [{"targets": [f"127.0.0.1:{admin_port}"]}],
            }],
        }))
        self.storage = workdir / "tsdb"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary, _ = prometheus_binaries()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [binary, f"--config.file={self.config_path}",
                 f"--storage.tsdb.path={self.storage}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.log_path.parent)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    async def get(self, session: aiohttp.ClientSession, path: str,
                  **params: str) -> tuple[int, dict[str, Any]]:
        async with session.get(self.url + path, params=params) as response:
            return response.status, await response.json(content_type=None)

    async def query(self, session: aiohttp.ClientSession, expr: str) -> tuple[int, dict[str, Any]]:
        return await self.get(session, "/api/v1/query", query=expr)

    async def ready(self, session: aiohttp.ClientSession, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"prometheus exited:\n{self.logs()}")
            try:
                async with session.get(self.url + "/-/ready") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        raise AssertionError(f"prometheus not ready after {timeout}s:\n{self.logs()}")

    async def scrapes(self, session: aiohttp.ClientSession) -> int:
        """Successful scrapes of the sidecar so far."""
        status, body = await self.query(session, 'sum_over_time(up{job="sidecar"}[1h])')
        assert status == 200, body
        result = body["data"]["result"]
        return int(float(result[0]["value"][1])) if result else 0

    async def until_scraped(self, session: aiohttp.ClientSession, count: int,
                            timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while await self.scrapes(session) < count:
            if time.monotonic() > deadline:
                _, targets = await self.get(session, "/api/v1/targets")
                errors = [(t["scrapeUrl"], t["health"], t["lastError"])
                          for t in targets["data"]["activeTargets"]]
                raise AssertionError(f"fewer than {count} successful scrapes of the sidecar in "
                                     f"{timeout}s; targets: {errors}")
            await asyncio.sleep(0.2)


# -- PromQL: the expressions, their variables, their operands -----------------------------------

_COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")
_SET_OPERATOR = re.compile(r"(and|or|unless)(?![A-Za-z0-9_:])")
_MODIFIERS = re.compile(r"^\s*(?:bool\b\s*)?(?:(?:on|ignoring)\s*\([^)]*\)\s*)?"
                        r"(?:(?:group_left|group_right)\b\s*(?:\([^)]*\))?\s*)?")
_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")


def split_top_level(expr: str) -> list[str]:
    """The operands of the comparisons and set operators outside any brackets, with their
    `bool`, `on (...)`/`ignoring (...)` and `group_left/right (...)` modifiers dropped."""
    parts: list[str] = []
    depth, start, i, quote = 0, 0, 0, ""
    while i < len(expr):
        ch = expr[i]
        if quote:
            if ch == "\\":
                i += 2
                continue
            if ch == quote:
                quote = ""
        elif ch in "\"'`":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0:
            op = next((o for o in _COMPARISONS if expr.startswith(o, i)), "")
            if not op and (i == 0 or not (expr[i - 1].isalnum() or expr[i - 1] in "_:")):
                match = _SET_OPERATOR.match(expr, i)
                op = match.group(1) if match else ""
            if op:
                parts.append(expr[start:i])
                i += len(op)
                start = i
                continue
        i += 1
    parts.append(expr[start:])
    return [_MODIFIERS.sub("", part, count=1).strip() for part in parts]


def _wrapped(expr: str) -> bool:
    """`(...)` around the whole expression."""
    if not (expr.startswith("(") and expr.endswith(")")):
        return False
    depth = 0
    for i, ch in enumerate(expr):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0 and i < len(expr) - 1:
            return False
    return True


def operands(expr: str) -> list[str]:
    """The vector operands whose emptiness would make `expr` silently empty."""
    expr = expr.strip()
    parts = split_top_level(expr)
    if len(parts) == 1:
        if _wrapped(expr):
            return operands(expr[1:-1])
        return [] if _NUMBER.fullmatch(expr) else [expr]
    return [o for part in parts for o in operands(part)]


def test_operands() -> None:
    assert operands('max by (upstream) (sidecar_breaker_state{a!="1"}) >= 1') == [
        'max by (upstream) (sidecar_breaker_state{a!="1"})']
    assert operands("(a / b) > on (route) group_left max by (route) (c)") == [
        "a / b", "max by (route) (c)"]
    assert operands("a > bool 0 and deriv(b[10m]) > 0 or sort(c)") == [
        "a", "deriv(b[10m])", "sort(c)"]
    assert operands('sum(x >= bool 1)') == ["sum(x >= bool 1)"]
    assert operands('x{a=~"and|or"} unless ignoring (le) y') == ['x{a=~"and|or"}', "y"]
    assert operands("histogram_quantile(0.5, rate(x_bucket[5m]))") == [
        "histogram_quantile(0.5, rate(x_bucket[5m]))"]


def substitute(expr: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in GRAFANA_VARIABLES:
            raise AssertionError(f"unknown Grafana variable ${name} in {expr!r}")
        return GRAFANA_VARIABLES[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", value, expr)


def dashboard_expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) for every query of every panel (rows' nested panels too) and every
    query variable (`label_values(SELECTOR, label)` gives SELECTOR)."""
    found: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                if target.get("expr"):
                    found.append((f"panel {panel['title']!r} target {target['refId']}",
                                  target["expr"]))

    walk(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        query = query["query"] if isinstance(query, dict) else query
        match = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\)\s*", query)
        assert match, f"variable {variable['name']}: expected label_values(SELECTOR, label)"
        found.append((f"variable ${variable['name']}", match.group(1)))
    return found


def rule_expressions(rules: dict[str, Any]) -> list[tuple[str, str]]:
    return [(f"rule {rule.get('alert') or rule.get('record')}", rule["expr"])
            for group in rules["groups"] for rule in group["rules"]]


# -- static checks: no Prometheus needed beyond promtool ----------------------------------------


def test_dashboard_structure() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("instance", "route"):
        assert variables[name]["type"] == "query"
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
    ids: list[int] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            ids.append(panel["id"])
            assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
            walk(panel.get("panels", []))
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, (
                panel["title"])
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}", panel["title"]
                # Multi-value variables only work with regex matchers.
                assert not re.search(r'[^=!]=\s*"\$\{?(instance|route)', target["expr"]), (
                    panel["title"], target["expr"])

    walk(dashboard["panels"])
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    exprs = " ".join(expr for _, expr in dashboard_expressions(dashboard))
    for metric in ("sidecar_requests_total", "sidecar_request_duration_seconds_bucket",
                   "sidecar_cache_requests_total", "sidecar_upstream_requests_total",
                   "sidecar_upstream_duration_seconds_bucket", "sidecar_breaker_state",
                   "sidecar_ratelimit_rejected_total", "sidecar_queue_depth",
                   "sidecar_jobs_total", "sidecar_redis_up", "sidecar_sla_latency_seconds",
                   "sidecar_sla_error_ratio"):
        assert metric in exprs, f"the dashboard shows no {metric}"


def test_alert_rules_are_valid_and_documented() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    # The compose file's Prometheus config too (its paths exist only inside the container).
    result = promtool("check", "config", "--syntax-only", str(GRAFANA / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    rules = yaml.safe_load(ALERTS.read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    assert {"SidecarLatencySLABreach", "SidecarErrorRatioSLABreach", "SidecarBreakerOpen",
            "SidecarQueueBacklogGrowing", "SidecarRedisDown"} <= {a["alert"] for a in alerts}
    for alert in alerts:
        assert alert.get("for"), alert["alert"]
        assert alert.get("labels", {}).get("severity") in ("critical", "warning", "info"), (
            alert["alert"])
        assert {"summary", "description"} <= set(alert.get("annotations", {})), alert["alert"]
    # SLA thresholds come from the sidecar's config, not from the rules.
    sla = {a["alert"]: a["expr"] for a in alerts if "SLA" in a["alert"]}
    assert "group_left" in sla["SidecarLatencySLABreach"]
    assert "sidecar_sla_latency_seconds" in sla["SidecarLatencySLABreach"]
    assert "sidecar_sla_error_ratio" in sla["SidecarErrorRatioSLABreach"]


# -- the real thing -----------------------------------------------------------------------------


def sidecar_config(backend: Backend, redis_url: str) -> dict[str, Any]:
    routes = [
        {"name": "reports", "match": {"path": "/api/reports/**", "methods": ["POST"]},
         "upstream": "app", "offload": {"queue": "reports", "backoff": "50ms"}},
        {"name": "slow", "match": {"path": "/api/slow"}, "upstream": "app",
         "dedup": {"scope": "cluster"}},
        {"name": "flaky", "match": {"path": "/api/flaky"}, "upstream": "flaky",
         "breaker": {"failures": 2, "reset": "1s"}},
        {"name": "limited", "match": {"path": "/echo"}, "upstream": "app",
         "rate_limit": {"rate": "1/s", "burst": 2, "key": "route", "scope": "cluster"}},
        {"name": "products", "match": {"path": "/api/products/**"}, "upstream": "app",
         "cache": {"ttl": "30s"}},
        {"name": "down", "match": {"path": "/down/**"}, "upstream": "down"},
        {"name": "default", "match": {"path": "/**"}, "upstream": "app"},
    ]
    config = make_config(
        backend.url, redis_url, routes=routes,
        server={"workers": 2},
        admin={"token": TOKEN},
        queues={"reports": {"concurrency": 2}},
        jobs={"visibility_timeout": "2s", "sweep_interval": "1s"},
        metrics={"sla": {"latency_p95": "500ms", "error_ratio": 0.01,
                         "routes": {"products": {"latency_p95": "200ms",
                                                 "error_ratio": 0.001}}}},
    )
    config["upstreams"]["flaky"] = {"url": backend.url, "timeout": "5s"}
    # Nothing listens there: connect errors, 502.
    config["upstreams"]["down"] = {"url": f"http://127.0.0.1:{free_port()}",
                                   "connect_timeout": "200ms"}
    return config


async def fetch(method: str, url: str, **kwargs: Any) -> tuple[int, dict[str, str], bytes]:
    """On a fresh connection, so the kernel spreads requests over both workers."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session, session.request(
            method, url, **kwargs) as response:
        return response.status, dict(response.headers), await response.read()


async def traffic(sidecar: SidecarProcess, config: dict[str, Any]) -> None:
    """Requests that make every metric family of the contract move."""
    base = sidecar.url
    # cache: a miss, then hits (in memory, or in Redis on the other worker)
    statuses = [(await fetch("GET", base + "/api/products/7"))[0] for _ in range(12)]
    assert statuses == [200] * 12, statuses
    await fetch("GET", base + "/api/products/7", headers={"Cache-Control": "no-cache"})
    # dedup: one leader, followers
    answers = await asyncio.gather(*(fetch("GET", base + "/api/slow?delay=0.5")
                                     for _ in range(6)))
    assert [a[0] for a in answers] == [200] * 6
    assert any(a[1].get("X-Sidecar-Dedup") == "follower" for a in answers), (
        "no dedup follower: the traffic does not exercise sidecar_dedup_total")
    # 5xx from the upstream until the breakers (one per worker) open, then 503 breaker_open
    statuses = [(await fetch("GET", base + "/api/flaky?fail=1"))[0] for _ in range(12)]
    assert set(statuses) == {503}, statuses
    # an upstream that refuses connections: 502, upstream status "error"
    statuses = [(await fetch("GET", base + "/down/x"))[0] for _ in range(3)]
    assert set(statuses) == {502}, statuses
    # rate limit: burst 2 for the whole route
    statuses = [(await fetch("POST", base + "/echo", data=b"x"))[0] for _ in range(8)]
    assert 429 in statuses and 200 in statuses, statuses
    # an offloaded job, run to success
    status, headers, body = await fetch("POST", base + "/api/reports?seconds=0.3", data=b"{}")
    assert status == 202, body
    deadline = time.monotonic() + 20
    while True:
        _, _, body = await fetch("GET", base + headers["Location"])
        if json.loads(body)["status"] == "succeeded":
            break
        assert time.monotonic() < deadline, f"the job did not succeed: {body!r}"
        await asyncio.sleep(0.1)
    # the breakers half-open after 1s and close on successes
    await asyncio.sleep(1.2)
    for _ in range(8):
        await fetch("GET", base + "/api/flaky?fail=0")
    # config reloads: one good, one rejected, then the good file back
    good = json.loads(json.dumps(config))
    good["log"]["level"] = "warning"
    write_config(sidecar.config_path, good)
    await until_ready(sidecar, lambda r: r["reloads"]["ok"] >= 1)
    write_config(sidecar.config_path, {**good, "not_a_key": 1})
    await until_ready(sidecar, lambda r: r["reloads"]["error"] >= 1)
    write_config(sidecar.config_path, config)


async def until_ready(sidecar: SidecarProcess, check: Callable[[dict[str, Any]], bool],
                      timeout: float = 10.0) -> None:
    """Poll /readyz (either worker answers) until `check(body)`."""
    deadline = time.monotonic() + timeout
    while True:
        _, _, body = await fetch("GET", sidecar.admin_url + "/readyz")
        if check(json.loads(body)):
            return
        assert time.monotonic() < deadline, f"/readyz never satisfied the check: {body!r}"
        await asyncio.sleep(0.1)


async def check_expression(prometheus: Prometheus, session: aiohttp.ClientSession, where: str,
                           expr: str) -> list[str]:
    """Problems with one expression: it must run, and each operand must return data."""
    problems: list[str] = []
    query = " ".join(substitute(expr).split())  # one line in the messages
    status, body = await prometheus.query(session, query)
    if status != 200 or body.get("status") != "success":
        return [f"{where}: {query}\n    -> HTTP {status}: {body.get('error', body)}"]
    for operand in operands(query):
        status, body = await prometheus.query(session, operand)
        if status != 200 or body.get("status") != "success":
            problems.append(f"{where}: operand {operand}\n    -> HTTP {status}: "
                            f"{body.get('error', body)}")
        elif body["data"]["resultType"] in ("vector", "matrix") and not body["data"]["result"]:
            problems.append(f"{where}: operand returns no data: {operand}"
                            + (f"\n    (of {query})" if operand != query else ""))
    return problems


@pytest.mark.slow
async def test_every_dashboard_and_alert_expression_returns_data(
        backend: Backend, redis_url: str, sidecar_process: Any, tmp_path: Path) -> None:
    prometheus_binaries()
    config = sidecar_config(backend, redis_url)
    sidecar: SidecarProcess = sidecar_process(config)
    prometheus = Prometheus(tmp_path, sidecar.admin_port)
    prometheus.start()
    try:
        async with aiohttp.ClientSession() as session:
            await prometheus.ready(session)
            await prometheus.until_scraped(session, 2)
            await traffic(sidecar, config)
            # Enough samples after the last request for rate() and the rules to see it.
            await prometheus.until_scraped(session, await prometheus.scrapes(session) + 3)
            await asyncio.sleep(1.5)  # and a rule evaluation after that

            expressions = [*dashboard_expressions(json.loads(DASHBOARD.read_text())),
                           *rule_expressions(yaml.safe_load(ALERTS.read_text()))]
            problems: list[str] = []
            for where, expr in expressions:
                problems += await check_expression(prometheus, session, where, expr)

            # The SLA targets the alerts compare against come from metrics.sla.
            _, body = await prometheus.query(
                session, 'max by (route) (sidecar_sla_latency_seconds{route=~"products|slow"})')
            targets = {r["metric"]["route"]: float(r["value"][1])
                       for r in body["data"]["result"]}
            if targets != {"products": 0.2, "slow": 0.5}:
                problems.append(f"sidecar_sla_latency_seconds: expected products 0.2 (its own "
                                f"target) and slow 0.5 (the default), got {targets}")

            # Prometheus itself evaluated every rule without error.
            _, body = await prometheus.get(session, "/api/v1/rules")
            for group in body["data"]["groups"]:
                for rule in group["rules"]:
                    if rule["health"] != "ok":
                        problems.append(f"rule {rule['name']}: health {rule['health']}: "
                                        f"{rule.get('lastError')}")
    finally:
        prometheus.stop()
    print(f"{len(expressions)} expressions checked")
    assert not problems, (f"{len(problems)} of the checks failed:\n" + "\n".join(problems)
                          + f"\n\nsidecar log tail:\n{sidecar.logs()[-2000:]}")
