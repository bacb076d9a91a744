"""The soak test (loadtests/soak.py), one minute of it, as CI runs it: a real sidecar with two
workers, a real redis-server and origin, faults injected; its own checks must all hold, and its
report must show that it did what it says (traffic, every fault kind, jobs, samples)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOAK = ROOT / "loadtests" / "soak.py"


@pytest.mark.slow
def test_a_one_minute_soak_holds_every_invariant(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: run the tests with `make test`, which "
                    "installs it")
    report_path = tmp_path / "soak.json"
    run = subprocess.run([sys.executable, str(SOAK), "--duration", "60s",
                          "--json", str(report_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=420)
    output = f"--- stdout:\n{run.stdout[-6000:]}\n--- stderr:\n{run.stderr[-4000:]}"
    assert run.returncode == 0, output
    report = json.loads(report_path.read_text())

    assert report["passed"] is True
    assert [c for c in report["checks"] if not c["ok"]] == [], output
    assert report["requests"]["total"] > 1000
    steps = report["requests"]["per_step"]
    for step in ("hit", "miss", "coalesced", "flaky", "echo", "offload_submit",
                 "offload_poll", "offload_result"):
        assert steps.get(step, 0) > 0, step
    assert report["classes"].get("unexpected", 0) == 0
    assert report["classes"]["ok"] > 1000

    kinds = {fault["kind"] for fault in report["faults"]}
    assert kinds == {"redis_stop", "worker_kill", "redis_kill", "reload", "origin_pause"}
    assert all(fault["ok"] for fault in report["faults"]), report["faults"]

    jobs = report["jobs"]
    assert jobs["submitted"] > 0
    assert jobs["completed"] == jobs["submitted"]
    assert (jobs["lost"], jobs["conflicting_results"]) == (0, 0)

    for figures in (report["rss_kib"], report["fds"], report["other_fds"], report["pooled"]):
        assert figures["samples"] >= 20
        assert figures["tree"]["after_warmup"] > 0 and figures["tree"]["end"] > 0
    assert len(report["rss_kib"]["long_lived_pids"]) >= 2  # the supervisor and a worker
