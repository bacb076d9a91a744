"""The locust scenario: one user class per SLA, or one for replayed traffic; the SLA verdict.

Locust imports this file (`sidecar loadtest` points it here; `loadtests/locustfile.py` re-exports
it for the locust UI). What to run comes from the environment, since locust loads the file before
it parses its own options:

- `SIDECAR_LOADTEST_SLAS`: the SLA file (`loadtests/slas.yaml`);
- `SIDECAR_LOADTEST_REPLAY`: a HAR to replay instead of the SLAs' requests;
- `SIDECAR_LOADTEST_VERDICT`: where to write the verdict as JSON (`sidecar loadtest` reads it and
  prints the table); without it the table is printed when locust exits.

Either way locust exits 1 when an SLA is missed. Imports are absolute: locust loads this file
by path, outside its package.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent
from locust import FastHttpUser, User, constant, events
from locust.env import Environment
from locust.runners import WorkerRunner
from locust.stats import StatsEntry

from sidecar.config import ConfigError
from sidecar.loadtest import verdict
from sidecar.loadtest.har import HarError, Recorded, Scenario, read_har, scenario_from_har
from sidecar.loadtest.sla import LATENCY_LIMITS, Sla, SlaFile, load_slas

SLAS_ENV = "SIDECAR_LOADTEST_SLAS"
REPLAY_ENV = "SIDECAR_LOADTEST_REPLAY"
VERDICT_ENV = "SIDECAR_LOADTEST_VERDICT"
REPLAY_NAME = "replayed traffic"
JOB = "JOB"  # the "method" locust's stats show for whole offloaded jobs
_TERMINAL = ("succeeded", "failed", "cancelled")


class JobFailed(Exception):
    """An offloaded job that did not give a result; the message is the failure's row in
    locust's report, so it carries no id (identical causes add up)."""


def _send_kwargs(method: str, headers: dict[str, str], json_body: Any,
                 body: bytes | str | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"headers": headers}
    if json_body is not None:
        kwargs["json"] = json_body
    elif body is not None:
        kwargs["data"] = body
    return kwargs


def _judge(response: Any, succeeded: Callable[[int], bool]) -> None:
    status = response.status_code or 0
    if status == 0:
        response.failure(f"no response: {getattr(response, 'error', None) or 'connection failed'}")
    elif succeeded(status):
        response.success()
    else:
        response.failure(f"HTTP {status}")


def _request_task(sla: Sla) -> Callable[[FastHttpUser], None]:
    spec = sla.request
    kwargs = _send_kwargs(spec.method, spec.headers, spec.json_body, spec.body)

    def request(user: FastHttpUser) -> None:
        with user.client.request(spec.method, spec.path, name=sla.name, catch_response=True,
                                 **kwargs) as response:
            _judge(response, spec.succeeded)

    return request


def _offload_task(sla: Sla) -> Callable[[FastHttpUser], None]:
    """Post, poll the job's status until it is over, fetch its result: one JOB sample timed from
    the post to the result, plus the single requests under their own names."""
    spec = sla.request
    kwargs = _send_kwargs(spec.method, spec.headers, spec.json_body, spec.body)
    limit = sla.job_completes_within or 0.0

    def submit(user: FastHttpUser) -> tuple[str, str]:
        status_url = result_url = ""
        with user.client.request(spec.method, spec.path, name=f"{sla.name} (submit)",
                                 catch_response=True, **kwargs) as response:
            status = response.status_code or 0
            if status != 202:
                response.failure(f"HTTP {status}")
                detail = ("no response" if status == 0 else
                          f"answered {status}, not 202 Accepted: is the route offloaded?")
                raise_after = JobFailed(f"submit: {detail}")
            else:
                response.success()
                raise_after = None
                try:
                    document = json.loads(response.content or b"{}")
                except ValueError:
                    document = {}
                status_url = document.get("status_url") or response.headers.get("Location")
                result_url = document.get("result_url") or f"{status_url}/result"
        if raise_after is not None:
            raise raise_after
        if not status_url:
            raise JobFailed("submit: the 202 names no job (no status_url, no Location)")
        return str(status_url), str(result_url)

    def wait(user: FastHttpUser, status_url: str, start: float) -> None:
        while True:
            gevent.sleep(sla.poll)
            with user.client.get(status_url, name=f"{sla.name} (status)",
                                 catch_response=True) as response:
                code = response.status_code or 0
                state, document = None, {}
                if code == 200:
                    response.success()
                    try:
                        document = json.loads(response.content or b"{}")
                    except ValueError:
                        document = {}
                    state = document.get("status")
                else:
                    response.failure(f"HTTP {code}")
            if code == 404:
                raise JobFailed("the job disappeared while polling (404)")
            if state == "succeeded":
                return
            if state in _TERMINAL:
                raise JobFailed(f"job {state}: {document.get('error') or 'no detail'}")
            if time.perf_counter() - start > limit:
                user.client.request("DELETE", status_url, name=f"{sla.name} (cancel)")
                raise JobFailed(f"not done within {verdict.format_ms(limit * 1000)}: cancelled")

    def fetch(user: FastHttpUser, result_url: str) -> int:
        with user.client.get(result_url, name=f"{sla.name} (result)",
                             catch_response=True) as response:
            _judge(response, spec.succeeded)
            code, size = response.status_code or 0, len(response.content or b"")
        if not spec.succeeded(code):
            raise JobFailed(f"result: HTTP {code}")
        return size

    def job(user: FastHttpUser) -> None:
        start = time.perf_counter()
        size, error = 0, None
        try:
            status_url, result_url = submit(user)
            wait(user, status_url, start)
            size = fetch(user, result_url)
        except JobFailed as exc:
            error = exc
        user.environment.events.request.fire(
            request_type=JOB, name=sla.name, response_time=(time.perf_counter() - start) * 1000,
            response_length=size, exception=error, context={}, response=None)

    return job


def _class_name(text: str, taken: set[str]) -> str:
    name = "".join(part.capitalize() for part in re.findall(r"[A-Za-z0-9]+", text)) or "Sla"
    name = name if name[0].isalpha() else f"Sla{name}"
    base, n = name, 2
    while name in taken:
        name, n = f"{base}{n}", n + 1
    taken.add(name)
    return name


def sla_users(slas: SlaFile) -> dict[str, type[User]]:
    classes: dict[str, type[User]] = {}
    for sla in slas.slas:
        task = _offload_task(sla) if sla.offloaded else _request_task(sla)
        attrs: dict[str, Any] = {
            "host": slas.target, "tasks": [task], "wait_time": constant(sla.wait),
            "weight": sla.weight, "__module__": __name__, "__doc__": f"SLA {sla.name!r}",
        }
        if sla.users is not None:
            attrs["fixed_count"] = sla.users
        name = _class_name(sla.name, set(classes))
        classes[name] = type(name, (FastHttpUser,), attrs)
    return classes


def _replay_task(recorded: tuple[Recorded, ...], name: str) -> Callable[[FastHttpUser], None]:
    def replay(user: FastHttpUser) -> None:
        one = random.choice(recorded)
        kwargs = _send_kwargs(one.method, dict(one.headers), None, one.body)
        with user.client.request(one.method, one.target, name=name, catch_response=True,
                                 allow_redirects=False, **kwargs) as response:
            _judge(response, one.succeeded)

    return replay


def replay_user(scenario: Scenario, host: str) -> dict[str, type[User]]:
    tasks = {_replay_task(e.requests, e.name): e.weight for e in scenario.endpoints}
    attrs = {"host": host, "tasks": tasks, "wait_time": constant(0), "__module__": __name__,
             "__doc__": "captured traffic, replayed with its weights"}
    return {"Replay": type("Replay", (FastHttpUser,), attrs)}


# --- the verdict --------------------------------------------------------------------------------


def _measured(entry: StatsEntry) -> verdict.Measured:
    quantiles = {key: float(entry.max_response_time if q == 1.0
                            else entry.get_response_time_percentile(q))
                 for key, q in LATENCY_LIMITS.items()}
    return verdict.Measured(entry.num_requests, entry.num_failures, entry.total_rps, quantiles)


def judge(environment: Environment, slas: SlaFile, replay: bool) -> list[verdict.Check]:
    stats = environment.stats
    if replay:
        return verdict.evaluate(REPLAY_NAME, slas.replay, _measured(stats.total))
    checks: list[verdict.Check] = []
    for sla in slas.slas:
        method = JOB if sla.offloaded else sla.request.method
        entry = stats.entries.get((sla.name, method)) or StatsEntry(stats, sla.name, method)
        checks += verdict.evaluate(sla.name, sla, _measured(entry),
                                   job_completes_within=sla.job_completes_within)
    return checks


def _load() -> tuple[SlaFile, Scenario | None]:
    default = Path("loadtests/slas.yaml")
    sla_path = os.environ.get(SLAS_ENV) or (str(default) if default.exists() else "")
    replay_path = os.environ.get(REPLAY_ENV)
    try:
        slas = load_slas(sla_path) if sla_path else SlaFile()
        scenario = None
        if replay_path:
            scenario = scenario_from_har(read_har(Path(replay_path).read_bytes()))
    except ConfigError as exc:
        sys.exit("\n".join(str(p) for p in exc.problems))
    except (HarError, OSError) as exc:
        sys.exit(f"{replay_path}: {exc}")
    if scenario is None and not slas.slas:
        sys.exit(f"{sla_path or default}: no SLAs to run (the 'slas' list is empty or missing)")
    return slas, scenario


_SLAS, _SCENARIO = _load()
USERS = (replay_user(_SCENARIO, _SLAS.target) if _SCENARIO is not None else sla_users(_SLAS))
globals().update(USERS)
__all__ = list(USERS)
_CHECKS: list[verdict.Check] = []


def _decide(environment: Environment, **_: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return  # the master holds the aggregated figures
    _CHECKS[:] = judge(environment, _SLAS, _SCENARIO is not None)
    if not all(check.passed for check in _CHECKS):
        environment.process_exit_code = 1
    target = os.environ.get(VERDICT_ENV)
    if target:
        Path(target).write_text(json.dumps(verdict.to_json(_CHECKS), indent=2) + "\n")


def _print(**_: Any) -> None:
    if _CHECKS and not os.environ.get(VERDICT_ENV):
        print("\n" + verdict.table(_CHECKS), flush=True)


def _grace(environment: Environment, **_: Any) -> None:
    if not environment.stop_timeout and _SCENARIO is None:  # unless --stop-timeout was given
        environment.stop_timeout = _SLAS.stop_timeout


events.init.add_listener(_grace)  # type: ignore[no-untyped-call]
events.quitting.add_listener(_decide)  # type: ignore[no-untyped-call]
events.quit.add_listener(_print)  # type: ignore[no-untyped-call]
