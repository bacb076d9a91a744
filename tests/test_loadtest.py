"""`sidecar loadtest` and `sidecar record` as users run them: real locust, real mitmproxy, a real
sidecar in front of the example backend."""

from __future__ import annotations

import asyncio
import csv
import json
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
import yaml
from support import Backend, InProcessSidecar, Origin, free_port, make_config
from test_offload import FAST_JOBS

from sidecar.cli import main
from sidecar.loadtest.record import MitmproxyUnavailable, default_venv, ensure_mitmdump

Factory = Callable[..., Awaitable[InProcessSidecar]]
pytestmark = pytest.mark.slow


async def run_cli(*args: str, cwd: Path, timeout: float = 120) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", *args, cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def write_slas(path: Path, target: str, slas: list[dict[str, object]]) -> Path:
    path.write_text(yaml.safe_dump({"target": target, "slas": slas}, sort_keys=False))
    return path


def row(table: str, sla: str, check: str) -> list[str]:
    for line in table.splitlines():
        cells = [c for c in line.split("  ") if c.strip()]
        if len(cells) == 5 and cells[0].strip() == sla and cells[1].strip() == check:
            return [c.strip() for c in cells]
    raise AssertionError(f"no row {sla!r} / {check!r} in:\n{table}")


async def test_loadtest_passes_one_sla_fails_another_and_times_real_jobs(
        sidecar_factory: Factory, backend: Backend, redis_url: str, tmp_path: Path) -> None:
    routes = [
        {"name": "reports", "match": {"path": "/api/reports/**", "methods": ["POST"]},
         "upstream": "app", "offload": {"queue": "reports", "backoff": "50ms"}},
        {"name": "default", "match": {"path": "/**"}, "upstream": "app"},
    ]
    sidecar = await sidecar_factory(make_config(
        backend.url, redis_url, routes=routes, queues={"reports": {"concurrency": 5}},
        jobs=dict(FAST_JOBS)))
    slas = write_slas(tmp_path / "slas.yaml", sidecar.url, [
        {"name": "product page", "request": {"path": "/api/products/1"}, "p95": "2s",
         "error_rate": "1%"},
        {"name": "set to fail", "request": {"path": "/api/products/2"}, "min_rps": 1000000},
        {"name": "report", "request": {"method": "POST", "path": "/api/reports?seconds=0.4",
                                       "json": {"month": "2026-10"}},
         "job_completes_within": "20s", "users": 2, "poll": "50ms"},
    ])
    results = tmp_path / "results"
    code, out, err = await run_cli("loadtest", "-c", str(slas), "--users", "4",
                                   "--duration", "4s", "--results", str(results), cwd=tmp_path)
    assert code == 1, (out, err)
    assert row(out, "product page", "p95")[4] == "PASS"
    assert row(out, "product page", "error rate")[4] == "PASS"
    failed = row(out, "set to fail", "requests/s")
    assert failed[3] == ">= 1,000,000" and failed[4] == "FAIL"
    assert row(out, "report", "job completes within")[4] == "PASS"
    assert "1 of 6 checks FAILED" in out
    # Progress was shown while it ran: locust's periodic console stats.
    assert err.count("Aggregated") >= 2 or out.count("Aggregated") >= 2
    for name in ("report.html", "locust_stats.csv", "locust_failures.csv", "summary.md"):
        assert (results / name).stat().st_size > 0, name
    verdict = json.loads((results / "verdict.json").read_text())
    assert verdict["passed"] is False
    # The job rows time whole jobs: the backend takes 0.4 s per report, so none is faster.
    stats = (results / "locust_stats.csv").read_text().splitlines()
    jobs = next(r for r in csv.DictReader(stats) if r["Type"] == "JOB")
    assert int(jobs["Request Count"]) >= 2
    assert float(jobs["Min Response Time"]) >= 400
    assert backend.calls("POST /api/reports") >= int(jobs["Request Count"])


async def test_loadtest_says_when_the_target_is_down(tmp_path: Path) -> None:
    slas = write_slas(tmp_path / "slas.yaml", f"http://127.0.0.1:{free_port()}",
                      [{"name": "page", "request": {"path": "/"}}])
    code, _, err = await run_cli("loadtest", "-c", str(slas), "--duration", "1s",
                                   cwd=tmp_path, timeout=30)
    assert code == 2
    assert "nothing answers at http://127.0.0.1:" in err and "start the sidecar" in err


def test_a_bad_sla_file_runs_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    slas = tmp_path / "slas.yaml"
    slas.write_text("slas:\n  - name: page\n    request: {path: /}\n    p95: soon\n")
    assert main(["loadtest", "-c", str(slas)]) == 2
    err = capsys.readouterr().err
    assert f"{slas}:4: slas[0] (page).p95: expected a duration" in err
    assert "nothing was run" in err
    assert main(["loadtest", "-c", str(tmp_path / "none.yaml")]) == 2
    assert "SLA file not found" in capsys.readouterr().err


async def test_record_then_replay(origin: Origin, tmp_path: Path) -> None:
    try:
        await asyncio.to_thread(ensure_mitmdump, default_venv())
    except MitmproxyUnavailable as exc:
        pytest.skip(f"mitmproxy cannot be installed here, so `sidecar record` cannot run: {exc}")
    for path in ("/api/products/1", "/api/products/2", "/api/products/3", "/api/login"):
        origin.reply(path, headers={"Set-Cookie": "sid=server-secret"})
    port = free_port()
    har = tmp_path / "capture.har"
    recorder = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "record", "--upstream", origin.url,
        "--listen", f"127.0.0.1:{port}", "-o", str(har), cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    secret = {"Authorization": "Bearer s3cret", "Cookie": "sid=cl1ent"}
    async with aiohttp.ClientSession() as client:
        for _ in range(100):
            try:
                async with client.get(f"http://127.0.0.1:{port}/api/products/1?token=t0k&x=1",
                                      headers=secret) as response:
                    assert response.status == 200
                break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.1)
        for n in (2, 3):
            async with client.get(f"http://127.0.0.1:{port}/api/products/{n}",
                                  headers=secret) as response:
                assert response.status == 200
        async with client.post(f"http://127.0.0.1:{port}/api/login",
                               json={"user": "ann", "password": "hunter2"}) as response:
            assert response.status == 200
    recorder.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(recorder.communicate(), 30)
    assert recorder.returncode == 0, err.decode()
    assert "4 requests captured" in err.decode()
    text = har.read_text()
    for leaked in ("s3cret", "cl1ent", "t0k", "hunter2", "server-secret"):
        assert leaked not in text, leaked

    origin.calls.clear()
    origin.seen.clear()
    code, out_text, err_text = await run_cli(
        "loadtest", "--replay", str(har), "--target", origin.url, "--users", "2",
        "--duration", "2s", "--results", str(tmp_path / "results"), cwd=tmp_path)
    assert code == 0, (out_text, err_text)
    assert "GET /api/products/{id}" in out_text and "POST /api/login" in out_text
    assert row(out_text, "replayed traffic", "error rate")[4] == "PASS"
    assert {"/api/products/1", "/api/products/2", "/api/products/3", "/api/login"} <= set(
        origin.calls)
    assert origin.calls["/api/products/1"] + origin.calls["/api/products/2"] > origin.calls[
        "/api/login"]  # weighted as captured: 3 to 1
    for headers in origin.seen.values():
        # A cookie the app sets during the replay comes back, as from a browser; captured
        # credentials never do.
        assert "Authorization" not in headers
        assert not any(s in v for v in headers.values() for s in ("s3cret", "cl1ent", "t0k"))
