"""The load test's pure parts: the SLA file, the verdict, captured traffic to a scenario."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sidecar.config import ConfigError
from sidecar.loadtest.har import (
    HarError,
    is_secret,
    normalise_path,
    sanitize_har,
    scenario_from_har,
)
from sidecar.loadtest.sla import Limits, load_slas
from sidecar.loadtest.verdict import Measured, evaluate, from_json, table, to_json

EXAMPLE = Path(__file__).parent.parent / "loadtests" / "slas.yaml"


def test_the_shipped_sla_file_is_valid() -> None:
    slas = load_slas(EXAMPLE)
    names = [s.name for s in slas.slas]
    assert names == ["cached product page", "report generation (offloaded)"]
    page, report = slas.slas
    assert (page.p95, page.p99, page.error_rate, page.min_rps) == (0.1, 0.25, 0.001, 500)
    assert report.offloaded and report.job_completes_within == 30.0
    assert report.request.json_body == {"month": "2026-10"}


@pytest.mark.parametrize(("text", "expected"), [
    ("slas:\n  - name: a\n    request: {path: /x}\n    p95: fast\n",
     "slas[0] (a).p95: expected a duration like '30s'"),
    ("slas:\n  - name: a\n    request: {path: x}\n",
     "slas[0] (a).request.path: expected a path starting with '/'"),
    ("slas:\n  - name: a\n    request: {path: /x}\n    error_rate: 200%\n",
     "slas[0] (a).error_rate: expected a percentage between 0% and 100%"),
    ("slas:\n  - name: a\n    request: {path: /x}\n    p59: 1s\n",
     "slas[0] (a).p59: unknown key 'p59' (did you mean"),
    ("slas:\n  - {name: a, request: {path: /x}}\n  - {name: a, request: {path: /y}}\n",
     "two SLAs are named 'a'"),
    ("target: localhost:8080\n", "target: expected a base URL"),
    ("slas:\n  - name: a\n    request: {path: /x, json: {}, body: x}\n",
     "give either 'json' or 'body', not both"),
])
def test_sla_file_problems_are_located(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "slas.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_slas(path)
    messages = [str(p) for p in caught.value.problems]
    assert any(expected in m for m in messages), messages
    assert all(m.startswith(f"{path}:") for m in messages)


def measured(requests: int = 100, failures: int = 0, rps: float = 50.0,
             **quantiles: float) -> Measured:
    q = {"p50": 10.0, "p90": 20.0, "p95": 30.0, "p99": 40.0, "max": 50.0} | quantiles
    return Measured(requests, failures, rps, q)


def test_each_limit_set_is_one_row_and_passes_at_the_limit() -> None:
    limits = Limits.model_validate({"p95": "30ms", "p99": "39ms", "min_rps": 50})
    rows = {c.what: c for c in evaluate("page", limits, measured())}
    assert list(rows) == ["p95", "p99", "error rate", "requests/s"]
    assert rows["p95"].passed  # 30 ms against 30 ms
    assert not rows["p99"].passed and rows["p99"].measured == "40 ms"
    assert rows["error rate"].passed and rows["error rate"].limit == "1.00%"
    assert rows["requests/s"].passed


def test_error_rate_and_rate_fail_when_missed() -> None:
    limits = Limits.model_validate({"error_rate": "0.1%", "min_rps": 500})
    rows = {c.what: c for c in evaluate("page", limits, measured(requests=1000, failures=2))}
    assert not rows["error rate"].passed
    assert rows["error rate"].measured == "0.20% (2/1000)"
    assert not rows["requests/s"].passed


def test_nothing_measured_fails_every_limit() -> None:
    limits = Limits.model_validate({"p95": "1s"})
    rows = evaluate("page", limits, measured(requests=0))
    assert [(c.what, c.passed, c.measured) for c in rows] == [
        ("p95", False, "no requests done"), ("error rate", False, "no requests done")]


def test_a_job_late_or_lost_fails_its_completion_limit() -> None:
    on_time = evaluate("report", Limits(), measured(requests=10, max=900.0),
                       job_completes_within=1.0)
    assert on_time[-1].what == "job completes within" and on_time[-1].passed
    late = evaluate("report", Limits(), measured(requests=10, max=1200.0),
                    job_completes_within=1.0)
    assert not late[-1].passed and late[-1].measured == "slowest 1.2 s"
    lost = evaluate("report", Limits(error_rate=0.5), measured(requests=10, failures=1),
                    job_completes_within=1.0)
    assert lost[-2].passed  # the error rate allows it...
    assert not lost[-1].passed and "1 of 10 not done" in lost[-1].measured  # ...the limit not


def test_table_and_json_round_trip() -> None:
    rows = evaluate("page", Limits.model_validate({"p95": "20ms"}), measured())
    assert from_json(json.loads(json.dumps(to_json(rows)))) == rows
    text = table(rows)
    assert "page  p95" in text and "FAIL" in text and text.endswith("1 of 2 checks FAILED")


@pytest.mark.parametrize(("path", "expected"), [
    ("/api/products/42", "/api/products/{id}"),
    ("/api/products/42/reviews/7", "/api/products/{id}/reviews/{id}"),
    ("/u/3f2a1c9e-0b1d-4c5e-9f00-1234567890ab", "/u/{id}"),
    ("/blob/9fceb02d0ae598e95dc970b74767f19372d61af8", "/blob/{id}"),
    ("/_sidecar/jobs/reports.5.Xk3v0yq6cR1o7dQm2pWj8sLb", "/_sidecar/jobs/{id}"),
    ("/api/v2/search", "/api/v2/search"),
    ("/static/app-bundle.js", "/static/app-bundle.js"),
    ("/", "/"),
])
def test_ids_in_paths_are_normalised(path: str, expected: str) -> None:
    assert normalise_path(path) == expected


@pytest.mark.parametrize("name", ["Authorization", "Cookie", "X-Api-Key", "access_token",
                                  "password", "X-CSRF-Token", "session_id", "key", "sig"])
def test_credentials_are_recognised(name: str) -> None:
    assert is_secret(name)


@pytest.mark.parametrize("name", ["Accept", "User-Agent", "page", "keyword", "lang", "id"])
def test_ordinary_names_are_kept(name: str) -> None:
    assert not is_secret(name)


def har(*entries: dict[str, object]) -> dict[str, object]:
    return {"log": {"version": "1.2", "entries": list(entries)}}


def entry(method: str, url: str, *, status: int = 200, headers: dict[str, str] | None = None,
          body: str | None = None, mime: str = "application/json") -> dict[str, object]:
    request: dict[str, object] = {
        "method": method, "url": url, "httpVersion": "HTTP/1.1",
        "headers": [{"name": k, "value": v} for k, v in (headers or {}).items()],
        "cookies": [{"name": "sid", "value": "abc"}] if headers and "Cookie" in headers else [],
        "queryString": [{"name": k, "value": v} for k, v in
                        (pair.split("=") for pair in url.partition("?")[2].split("&") if pair)],
    }
    if body is not None:
        request["postData"] = {"mimeType": mime, "text": body}
    return {"request": request, "response": {"status": status, "headers": [
        {"name": "Set-Cookie", "value": "sid=abc"}], "cookies": [], "content": {}}}


CAPTURE = har(
    entry("GET", "http://app:8000/api/products/1?lang=en&token=t0p",
          headers={"Authorization": "Bearer s3cret", "Cookie": "sid=abc", "Accept": "*/*",
                   "Host": "app:8000", "Content-Length": "0"}),
    entry("GET", "http://app:8000/api/products/2"),
    entry("GET", "http://app:8000/api/products/3"),
    entry("POST", "http://app:8000/api/login",
          body='{"user": "ann", "password": "hunter2", "remember": true}'),
    entry("GET", "http://app:8000/missing", status=404),
    entry("GET", "https://cdn.example/lib.js"),
)


def test_a_capture_becomes_a_weighted_scenario_without_credentials() -> None:
    scenario = scenario_from_har(json.loads(json.dumps(CAPTURE)))
    assert scenario.host == "app:8000"
    assert [(e.method, e.name, e.weight) for e in scenario.endpoints] == [
        ("GET", "/api/products/{id}", 3), ("POST", "/api/login", 1), ("GET", "/missing", 1)]
    assert sum(scenario.skipped.values()) == 1  # the CDN request
    first = scenario.endpoints[0].requests[0]
    assert first.target == "/api/products/1?lang=en"
    assert first.headers == (("Accept", "*/*"),)
    login = scenario.endpoints[1].requests[0]
    assert json.loads(login.body or b"") == {"user": "ann", "remember": True}
    missing = scenario.endpoints[2].requests[0]
    assert missing.succeeded(404) and not missing.succeeded(500)
    assert not first.succeeded(404) and first.succeeded(304)
    assert "3  GET /api/products/{id}" in scenario.describe()


def test_sanitize_takes_every_credential_out_of_the_file() -> None:
    data = json.loads(json.dumps(CAPTURE))
    removed = sanitize_har(data)
    text = json.dumps(data)
    for secret in ("s3cret", "t0p", "hunter2", "sid=abc", '"abc"'):
        assert secret not in text
    assert removed >= 7
    assert "lang=en" in text
    login = data["log"]["entries"][3]["request"]["postData"]["text"]
    assert json.loads(login) == {"user": "ann", "remember": True}


def test_a_file_that_is_not_a_har_is_refused() -> None:
    with pytest.raises(HarError, match=r"log\.entries"):
        scenario_from_har({"entries": []})
    with pytest.raises(HarError, match="nothing to replay"):
        scenario_from_har(har(entry("CONNECT", "app:443")))
