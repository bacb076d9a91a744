"""`sidecar loadtest`: locust headless in a child process, then the SLA table and the exit code.

Locust runs in its own process because it patches the standard library with gevent on import;
this side checks the inputs, starts it, and reads the verdict the locustfile writes.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ..config import ConfigError
from . import verdict
from .child import Forwarding, spawn
from .har import HarError, Scenario, read_har, scenario_from_har
from .sla import SlaFile, load_slas

DEFAULT_SLAS = "loadtests/slas.yaml"
LOCUSTFILE = Path(__file__).with_name("locustfile.py")  # never imported here: see above


class LoadtestError(Exception):
    """The load test could not run (bad input, target down, locust missing): exit 2."""


@dataclass(frozen=True)
class Plan:
    slas: SlaFile
    sla_path: Path | None
    target: str
    users: int
    spawn_rate: float
    duration: float
    stop_timeout: float
    results: Path
    replay: Path | None


def plan(*, config: str | None, replay: str | None, users: int | None, duration: float | None,
         spawn_rate: float | None, target: str | None, results: str | None) -> Plan:
    """Everything checked before locust starts, each problem said in the user's terms."""
    sla_path = Path(config or DEFAULT_SLAS)
    if not sla_path.exists():
        if config is not None or replay is None:
            raise LoadtestError(f"SLA file not found: {sla_path} (give one with -c; "
                                "docs/loadtesting.md shows its keys)")
        slas, found = SlaFile(), None
    else:
        try:
            slas, found = load_slas(sla_path), sla_path
        except ConfigError as exc:
            raise LoadtestError("\n".join(str(p) for p in exc.problems)
                                + f"\n{sla_path}: nothing was run") from None
    scenario = _scenario(Path(replay)) if replay else None
    if scenario is None and not slas.slas:
        raise LoadtestError(f"{sla_path}: no SLAs to run (the 'slas' list is empty or missing)")
    if scenario is not None:
        print(scenario.describe(), flush=True)
    if target is not None and not re.match(r"^https?://[^/\s]+/?$", target):
        raise LoadtestError(f"--target: expected a base URL like 'http://127.0.0.1:8080', "
                            f"got {target!r}")
    base = (target or slas.target).rstrip("/")
    wanted = users or slas.users
    floor = _users_needed(slas) if scenario is None else 1
    if wanted < floor:
        print(f"--users {wanted} leaves an SLA without a user: running {floor} users instead",
              file=sys.stderr)
        wanted = floor
    stop = slas.stop_timeout if scenario is None else 5.0
    folder = Path(results) if results else Path("loadtests/results") / time.strftime(
        "%Y%m%d-%H%M%S")
    return Plan(slas, found, base, wanted, spawn_rate or slas.spawn_rate or float(wanted),
                duration or slas.duration, stop, folder, Path(replay) if replay else None)


def _scenario(path: Path) -> Scenario:
    try:
        return scenario_from_har(read_har(path.read_bytes()))
    except OSError as exc:
        raise LoadtestError(f"cannot read {path}: {exc.strerror or exc}") from None
    except HarError as exc:
        raise LoadtestError(f"{path}: {exc}") from None


def _users_needed(slas: SlaFile) -> int:
    """Fixed-count users first, then at least one for every weighted SLA."""
    return sum(s.users or 0 for s in slas.slas) + sum(1 for s in slas.slas if s.users is None)


def check_target(target: str) -> None:
    url = urlsplit(target)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "127.0.0.1", port), timeout=3):
            pass
    except OSError as exc:
        raise LoadtestError(
            f"nothing answers at {target} ({exc.strerror or exc}): start the sidecar first "
            "(`make run`), or point 'target' in the SLA file (or --target) at it") from None


def locust_command(p: Plan) -> list[str]:
    prefix = p.results / "locust"
    return [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "--host", p.target, "--users", str(p.users), "--spawn-rate", f"{p.spawn_rate:g}",
        "--run-time", f"{math.ceil(p.duration)}s",
        "--stop-timeout", f"{math.ceil(p.stop_timeout)}s",
        "--csv", str(prefix), "--html", str(p.results / "report.html"),
    ]


def run(p: Plan) -> int:
    """0 when every SLA holds, 1 when one is missed, 2 when the test could not run."""
    if importlib.util.find_spec("locust") is None:
        raise LoadtestError("locust is not installed: pip install 'sidecar[loadtest]' "
                            "(`make setup` installs it in .venv)")
    check_target(p.target)
    p.results.mkdir(parents=True, exist_ok=True)
    verdict_file = p.results / "verdict.json"
    verdict_file.unlink(missing_ok=True)
    env = dict(os.environ)
    env.pop("SIDECAR_LOADTEST_REPLAY", None)
    env["SIDECAR_LOADTEST_VERDICT"] = str(verdict_file)
    if p.sla_path is not None:
        env["SIDECAR_LOADTEST_SLAS"] = str(p.sla_path)
    else:
        env.pop("SIDECAR_LOADTEST_SLAS", None)
    if p.replay is not None:
        env["SIDECAR_LOADTEST_REPLAY"] = str(p.replay)
    what = "replay of " + str(p.replay) if p.replay else f"{len(p.slas.slas)} SLAs"
    print(f"load test: {what} against {p.target}, {p.users} users for {p.duration:g}s; "
          f"reports in {p.results}/", flush=True)
    code = _run_child(locust_command(p), env)
    if not verdict_file.exists():
        raise LoadtestError(f"locust ended (exit code {code}) without a verdict: see its output "
                            "above")
    checks = verdict.from_json(json.loads(verdict_file.read_text()))
    summary = verdict.table(checks)
    (p.results / "summary.md").write_text(
        f"# Load test {time.strftime('%Y-%m-%d %H:%M:%S')}\n\n{what} against {p.target}, "
        f"{p.users} users, {p.duration:g}s\n\n{verdict.markdown(checks)}")
    print(f"\n{summary}\n\nreports: {p.results}/report.html, {p.results}/locust_stats.csv, "
          f"{p.results}/summary.md", flush=True)
    return 0 if all(c.passed for c in checks) else 1


def _run_child(command: list[str], env: dict[str, str]) -> int:
    child = spawn(command, env)
    with Forwarding(child):
        return child.wait()
