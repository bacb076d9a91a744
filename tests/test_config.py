"""`sidecar check`: every class of config error is located and exits 1; bundles merge in order."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sidecar import cli
from sidecar.config import ConfigError, load_config

# Line numbers matter: the expectations below point into this text.
BASE = """\
server:
  listen: 127.0.0.1:18080
  admin_listen: 127.0.0.1:19901
include: policies/*.yaml
log: {level: info}
upstreams:
  app:
    url: http://127.0.0.1:8000
    timeout: 5s
routes:
  - name: products
    match:
      path: /api/**
      methods: [GET]
    upstream: app
    timeout: 2s
  - name: rest
    upstream: app
    use: [fast]
"""
POLICY_A = """\
fast:
  timeout: 1s
slow:
  timeout: 60s
"""
POLICY_B = """\
medium:
  timeout: 10s
"""


def edit(text: str, **lines: str) -> str:
    """`text` with whole lines replaced: edit(BASE, l16="    timeout: soon")."""
    out = text.splitlines()
    for key, value in lines.items():
        out[int(key[1:]) - 1] = value
    return "\n".join(out) + "\n"


@dataclass(frozen=True)
class Expect:
    """One problem line: `{file}:{line}: {where}: ...{message}...`; `where` is a regex."""

    line: int | None
    where: str
    message: str
    file: str = "config.yaml"


@dataclass(frozen=True)
class Case:
    config: str
    expect: tuple[Expect, ...]
    policies: dict[str, str] = field(
        default_factory=lambda: {"a.yaml": POLICY_A, "b.yaml": POLICY_B})
    env: dict[str, str] = field(default_factory=dict)
    absent: tuple[str, ...] = ()  # text no problem line may contain


ROUTE0 = r"routes\[0\] \(products\)"
ROUTE1 = r"routes\[1\] \(rest\)"

BAD: dict[str, Case] = {
    "yaml_syntax": Case(edit(BASE, l15="    upstream: app: x"), (
        Expect(15, "", "invalid YAML: mapping values are not allowed here"),)),
    "yaml_unclosed_flow": Case(edit(BASE, l14="      methods: [GET"), (
        Expect(15, "", "invalid YAML"),)),
    "duplicate_key": Case(edit(BASE, l16="    upstream: app"), (
        # NOTE: duplicate-key problems do not spell out the route name (yet): accept both.
        Expect(16, ROUTE0.replace(r" \(products\)", r"(?: \(products\))?") + r"\.upstream",
               "duplicate key: the first value would be silently ignored"),)),
    "duplicate_top_level_key": Case(BASE + "log: {level: debug}\n", (
        Expect(20, "log", "duplicate key"),)),
    "unknown_route_key": Case(edit(BASE, l16="    timout: 2s"), (
        Expect(16, ROUTE0 + r"\.timout", "unknown key 'timout' (did you mean 'timeout'?)"),)),
    "unknown_server_key": Case(edit(BASE, l2="  listn: 127.0.0.1:18080"), (
        Expect(2, r"server\.listn", "unknown key 'listn' (did you mean 'listen'?)"),)),
    "bad_duration": Case(edit(BASE, l16="    timeout: soon"), (
        Expect(16, ROUTE0 + r"\.timeout",
               "expected a duration like '30s', '100ms' or '10m', got 'soon'"),)),
    "bad_rate": Case(edit(BASE, l16="    rate_limit: {rate: lots, burst: 10}"), (
        Expect(16, ROUTE0 + r"\.rate_limit\.rate",
               "expected a rate like '100/s', '6000/m' or '10/h', got 'lots'"),)),
    "bad_rate_limit_key": Case(edit(BASE, l16="    rate_limit: {rate: 10/s, burst: 10, key: ip}"), (
        Expect(16, ROUTE0 + r"\.rate_limit\.key",
               "expected client_ip, route or header:<Name>, got 'ip'"),)),
    "bad_retry_budget": Case(edit(BASE, l16="    retry: {budget: 120%}"), (
        Expect(16, ROUTE0 + r"\.retry\.budget", "between 0% and 100%"),)),
    "bad_cache_heuristic": Case(edit(BASE, l16="    cache: {heuristic: 150%}"), (
        Expect(16, ROUTE0 + r"\.cache\.heuristic", "between 0% and 100%, got '150%'"),)),
    "bare_number_cache_heuristic": Case(edit(BASE, l16="    cache: {heuristic: 10}"), (
        Expect(16, ROUTE0 + r"\.cache\.heuristic", "expected a percentage like '20%', got 10"),)),
    "zero_cache_heuristic_max": Case(
        edit(BASE, l16="    cache: {heuristic: 10%, heuristic_max: 0s}"), (
            Expect(16, ROUTE0 + r"\.cache\.heuristic_max",
                   "a heuristic capped at 0s gives no freshness: give a duration like '1d', "
                   "or set heuristic: 0% to use ttl alone"),)),
    "zero_cache_memory_max_ttl": Case(edit(BASE, l16="    cache: {memory: {max_ttl: 0s}}"), (
        Expect(16, ROUTE0 + r"\.cache\.memory\.max_ttl",
               "an L1 that keeps entries for 0s keeps none: give a duration like '5s', "
               "or leave memory out of layers"),)),
    "bad_cache_memory_max_ttl": Case(edit(BASE, l16="    cache: {memory: {max_ttl: short}}"), (
        Expect(16, ROUTE0 + r"\.cache\.memory\.max_ttl", "expected a duration like '30s'"),)),
    "zero_cache_lock_timeout": Case(edit(BASE, l16="    cache: {lock_timeout: 0s}"), (
        Expect(16, ROUTE0 + r"\.cache\.lock_timeout",
               "a miss that waits 0s for the one fetching its key never waits: give a duration "
               "like '5s', or set coalesce: false"),)),
    "bad_cache_lock_timeout": Case(edit(BASE, l16="    cache: {lock_timeout: a while}"), (
        Expect(16, ROUTE0 + r"\.cache\.lock_timeout", "expected a duration like '30s'"),)),
    "bad_retry_on": Case(edit(BASE, l16="    retry: {on: [connect, 404]}"), (
        Expect(16, ROUTE0 + r"\.retry\.on", "5xx statuses like '503', got '404'"),)),
    "bad_breaker_scope": Case(edit(BASE, l9="    breaker: {scope: global}"), (
        Expect(9, r"upstreams\.app\.breaker\.scope", "'local' or 'cluster'"),)),
    "bare_number_duration": Case(edit(BASE, l9="    timeout: 30"), (
        Expect(9, r"upstreams\.app\.timeout", "expected a duration like '30s'"),)),
    "bad_size": Case(edit(BASE, l2="  limits: {max_header_size: lots}"), (
        Expect(2, r"server\.limits\.max_header_size",
               "expected a size like '64MiB', '512KiB' or a number of bytes, got 'lots'"),)),
    "bad_address": Case(edit(BASE, l2="  listen: localhost"), (
        Expect(2, r"server\.listen", "expected an address like '0.0.0.0:8080'"),)),
    "bad_port": Case(edit(BASE, l3="  admin_listen: 127.0.0.1:70000"), (
        Expect(3, r"server\.admin_listen", "got '127.0.0.1:70000'"),)),
    "upstream_url_with_path": Case(edit(BASE, l8="    url: http://127.0.0.1:8000/api"), (
        Expect(8, r"upstreams\.app\.url", "expected an upstream URL like http://127.0.0.1:8000"),)),
    "upstream_url_bad_scheme": Case(edit(BASE, l8="    url: ftp://files.example"), (
        Expect(8, r"upstreams\.app\.url", "got 'ftp://files.example'"),)),
    "unknown_upstream": Case(edit(BASE, l15="    upstream: ap"), (
        Expect(15, ROUTE0 + r"\.upstream",
               "unknown upstream 'ap' (did you mean 'app'?); defined upstreams: app"),)),
    "unknown_bundle": Case(edit(BASE, l19="    use: [fast, fsat]"), (
        Expect(19, ROUTE1 + r"\.use\[1\]", "unknown policy bundle 'fsat' (did you mean 'fast'?)"
               "; defined bundles: fast, medium, slow"),)),
    "duplicate_route_name": Case(edit(BASE, l17="  - name: products"), (
        Expect(17, r"routes\[1\] \(products\)\.name",
               "route name 'products' is already used by routes[0]"),)),
    "duplicate_bundle_across_files": Case(
        BASE, (Expect(3, "fast", "bundle name already defined in", file="policies/b.yaml"),),
        policies={"a.yaml": POLICY_A, "b.yaml": POLICY_B + "fast:\n  timeout: 2s\n"}),
    "unknown_key_in_bundle": Case(
        BASE, (Expect(2, r"fast\.timeoutt", "unknown key 'timeoutt' (did you mean 'timeout'?)",
                      file="policies/a.yaml"),),
        policies={"a.yaml": edit(POLICY_A, l2="  timeoutt: 1s"), "b.yaml": POLICY_B}),
    "bad_duration_in_bundle": Case(
        BASE, (Expect(4, r"slow\.timeout", "got 'forever'", file="policies/a.yaml"),),
        policies={"a.yaml": edit(POLICY_A, l4="  timeout: forever"), "b.yaml": POLICY_B}),
    "route_uses_invalid_bundle": Case(
        edit(BASE, l19="    use: [slow]"),
        (Expect(4, r"slow\.timeout", "got 'forever'", file="policies/a.yaml"),),
        policies={"a.yaml": edit(POLICY_A, l4="  timeout: forever"), "b.yaml": POLICY_B},
        # the bundle exists, it is only invalid: one problem, not a second, false one
        absent=("unknown policy bundle",)),
    "policy_file_not_a_mapping": Case(
        BASE, (Expect(1, "", "a policy file maps bundle names to policy keys",
                      file="policies/b.yaml"),),
        policies={"a.yaml": POLICY_A, "b.yaml": "- just\n- a list\n"}),
    "missing_required_route_key": Case(edit(BASE, l18="    match: {path: /x}"), (
        Expect(17, ROUTE1 + r"\.upstream", "missing required key 'upstream'"),)),
    "missing_required_section": Case("\n".join(BASE.splitlines()[:9]) + "\n", (
        Expect(1, "routes", "missing required key 'routes'"),)),
    "empty_methods": Case(edit(BASE, l14="      methods: []"), (
        Expect(14, ROUTE0 + r"\.match\.methods", "an empty method list matches nothing"),)),
    "bad_method": Case(edit(BASE, l14='      methods: [GET, "NOT A METHOD"]'), (
        Expect(14, ROUTE0 + r"\.match\.methods", "not an HTTP method: 'NOT A METHOD'"),)),
    "relative_path_pattern": Case(edit(BASE, l13="      path: api/**"), (
        Expect(13, ROUTE0 + r"\.match\.path", "a path pattern starts with '/'"),)),
    "include_matches_nothing": Case(edit(BASE, l4="include: [policies/*.yaml, extra/*.yml]"), (
        Expect(4, r"include\[1\]", "no file matches 'extra/*.yml'"),)),
    "missing_env_var": Case(edit(BASE, l8="    url: http://127.0.0.1:${SIDECAR_TEST_PORT}"), (
        Expect(8, r"upstreams\.app\.url", "environment variable SIDECAR_TEST_PORT is not set"),)),
    "admin_not_loopback_without_token": Case(edit(BASE, l3="  admin_listen: 0.0.0.0:19901"), (
        Expect(3, r"server\.admin_listen",
               "the admin listener 0.0.0.0:19901 is not on loopback: set admin.token"),)),
    "admin_shares_public_address": Case(edit(BASE, l3="  admin_listen: 127.0.0.1:18080"), (
        Expect(3, r"server\.admin_listen", "must not share the public address"),)),
    "bad_redis_url": Case(BASE + "redis: {url: 'localhost:6379'}\n", (
        Expect(20, r"redis\.url", "expected 'embedded' or a URL like redis://"),)),
    "cache_quota_too_small": Case(BASE + "cache: {redis: {max_bytes: 512KiB}}\n", (
        Expect(20, r"cache\.redis\.max_bytes", "an L2 smaller than 1MiB holds too few"),)),
    "bad_cache_quota": Case(BASE + "cache: {redis: {max_bytes: plenty}}\n", (
        Expect(20, r"cache\.redis\.max_bytes", "expected a size like '64MiB'"),)),
    "cache_quota_on_a_route": Case(edit(BASE, l16="    cache: {redis: {max_bytes: 1GiB}}"), (
        Expect(16, ROUTE0 + r"\.cache\.redis",
               "max_bytes is the L2 quota of the whole cluster, which every route shares: set "
               "it once at the top level"),)),
    "route_entry_over_the_quota": Case(
        edit(BASE, l16="    cache: {ttl: 30s}") + "cache: {redis: {max_bytes: 4MiB}}\n", (
            Expect(16, ROUTE0 + r"\.cache\.redis\.max_entry",
                   "8MiB is more than all of L2 holds (cache.redis.max_bytes: 4MiB)"),)),
    "redis_headroom_too_small": Case(BASE + "redis: {headroom: 1MiB}\n", (
        Expect(20, r"redis\.headroom", "give at least 8MiB"),)),
    "bad_targeted_field": Case(
        edit(BASE, l16='    cache: {targeted: [Sidecar-Cache-Control, "CDN Cache"]}'), (
            Expect(16, ROUTE0 + r"\.cache\.targeted\[1\]",
                   "expected a header field name like 'CDN-Cache-Control', got 'CDN Cache'"),)),
    "targeted_cache_control": Case(edit(BASE, l16="    cache: {targeted: [Cache-Control]}"), (
        Expect(16, ROUTE0 + r"\.cache\.targeted\[0\]",
               "Cache-Control is the field a targeted one overrides"),)),
    "targeted_listed_twice": Case(
        edit(BASE, l16="    cache: {targeted: [CDN-Cache-Control, cdn-cache-control]}"), (
            Expect(16, ROUTE0 + r"\.cache\.targeted",
                   "'cdn-cache-control' is listed twice (field names are case-insensitive)"),)),
    "bad_callback_url": Case(edit(
        BASE, l16="    offload: {callback: {url: 'ftp://hooks.example/jobs', secret: "
                  "0123456789abcdef}}"), (
        Expect(16, ROUTE0 + r"\.offload\.callback\.url",
               "expected an http:// or https:// URL like https://app.example/hooks/jobs, "
               "got 'ftp://hooks.example/jobs'"),)),
    "callback_secret_unset": Case(edit(
        BASE, l16="    offload: {callback: {url: 'https://hooks.example/jobs', "
                  "secret: '${SIDECAR_TEST_SECRET}'}}"), (
        Expect(16, ROUTE0 + r"\.offload\.callback\.secret",
               "environment variable SIDECAR_TEST_SECRET is not set"),)),
    "wrong_type": Case(edit(BASE, l5="log: {level: loud}"), (
        Expect(5, r"log\.level", "got 'loud'"),)),
    "not_a_mapping": Case("- a\n- list\n", (Expect(1, "", "the file must be a mapping"),)),
    "several_problems_at_once": Case(
        edit(BASE, l15="    upstream: nope", l16="    timeout: soon", l19="    use: [gone]"), (
            Expect(15, ROUTE0 + r"\.upstream", "unknown upstream 'nope'"),
            Expect(16, ROUTE0 + r"\.timeout", "got 'soon'"),
            Expect(19, ROUTE1 + r"\.use\[0\]", "unknown policy bundle 'gone'"),
        )),
}

GOOD: dict[str, Case] = {
    "base": Case(BASE, ()),
    "admin_elsewhere_with_token": Case(
        edit(BASE, l3="  admin_listen: 0.0.0.0:19901") + "admin: {token: s3cret}\n", ()),
    "env_default": Case(edit(BASE, l8="    url: http://127.0.0.1:${SIDECAR_TEST_PORT:-8000}"), ()),
    "env_set": Case(edit(BASE, l8="    url: http://127.0.0.1:${SIDECAR_TEST_PORT}"), (),
                    env={"SIDECAR_TEST_PORT": "9000"}),
    "no_bundles": Case(
        edit(BASE, l4="include: []", l19="    use: []"), (), policies={}),
    "targeted_off": Case(edit(BASE, l16="    cache: {targeted: []}"), ()),
    "callback_secret_from_env": Case(edit(
        BASE, l16="    offload: {callback: {url: 'https://hooks.example/jobs', "
                  "secret: '${SIDECAR_TEST_SECRET}', attempts: 3, backoff: 1s, timeout: 5s}}"),
        (), env={"SIDECAR_TEST_SECRET": "a-secret-of-32-characters-000000"}),
    "cache_quota": Case(edit(BASE, l16="    cache: {redis: {max_entry: 1MiB}}")
                        + "cache: {redis: {max_bytes: 2MiB}}\nredis: {headroom: 64MiB}\n", ()),
    "cache_entry_over_the_quota_without_l2": Case(
        edit(BASE, l16="    cache: {layers: [memory]}") + "cache: {redis: {max_bytes: 1MiB}}\n",
        ()),
}


@dataclass(frozen=True)
class Ran:
    path: Path
    returncode: int
    stdout: str
    stderr: str


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_TEST_")}


def _run_check(path: Path, env: dict[str, str], base_env: dict[str, str] | None = None) -> Ran:
    full_env = {**(_base_env() if base_env is None else base_env), **env}
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "check", "-c", str(path)],
        capture_output=True, text=True, env=full_env, timeout=60, check=False)
    return Ran(path, result.returncode, result.stdout, result.stderr)


def _write(root: Path, case: Case) -> Path:
    (root / "policies").mkdir(parents=True)
    for name, text in case.policies.items():
        (root / "policies" / name).write_text(text)
    path = root / "config.yaml"
    path.write_text(case.config)
    return path


# The classes of error the CLI contract names run as real `python -m sidecar check` processes;
# these further variants call the same cli.main() in-process, to keep the module fast.
IN_PROCESS = frozenset({
    "yaml_unclosed_flow", "duplicate_top_level_key", "unknown_server_key", "bare_number_duration",
    "bad_port", "upstream_url_bad_scheme", "unknown_key_in_bundle", "bad_duration_in_bundle",
    "policy_file_not_a_mapping", "missing_required_section", "bad_method", "relative_path_pattern",
    "admin_shares_public_address", "bad_redis_url", "wrong_type", "not_a_mapping",
    "several_problems_at_once", "route_uses_invalid_bundle", "admin_elsewhere_with_token",
    "env_default", "env_set", "no_bundles", "bad_cache_heuristic", "bare_number_cache_heuristic",
    "zero_cache_heuristic_max", "zero_cache_memory_max_ttl", "bad_cache_memory_max_ttl",
    "zero_cache_lock_timeout", "bad_cache_lock_timeout",
    "bad_targeted_field", "targeted_cache_control",
    "targeted_listed_twice", "targeted_off", "cache_quota_too_small", "bad_cache_quota",
    "cache_quota_on_a_route", "route_entry_over_the_quota", "redis_headroom_too_small",
    "cache_quota", "cache_entry_over_the_quota_without_l2", "bad_callback_url",
    "callback_secret_unset", "callback_secret_from_env",
})


def _run_check_in_process(path: Path, env: dict[str, str]) -> Ran:
    out, err = io.StringIO(), io.StringIO()
    saved = {k: v for k, v in os.environ.items() if k.startswith("SIDECAR_TEST_")}
    for key in saved:
        del os.environ[key]
    os.environ.update(env)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(["check", "-c", str(path)])
    finally:
        for key in env:
            del os.environ[key]
        os.environ.update(saved)
    return Ran(path, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Ran]:
    """Every case through the CLI; the processes run side by side to keep the module fast."""
    cases = {**BAD, **GOOD}
    assert set(cases) >= IN_PROCESS
    paths = {name: _write(tmp_path_factory.mktemp(name), case) for name, case in cases.items()}
    base_env = _base_env()  # read here: the in-process runs below change os.environ
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = {name: pool.submit(_run_check, path, cases[name].env, base_env)
                   for name, path in paths.items() if name not in IN_PROCESS}
        results = {name: _run_check_in_process(paths[name], cases[name].env)
                   for name in IN_PROCESS}
        results.update({name: future.result() for name, future in futures.items()})
    return results


@pytest.mark.parametrize("name", sorted(BAD))
def test_problem_is_located_and_check_exits_1(checked: dict[str, Ran], name: str) -> None:
    ran, case = checked[name], BAD[name]
    assert ran.returncode == 1, ran
    assert ran.stdout == ""
    lines = ran.stderr.splitlines()
    root = ran.path.parent
    for expect in case.expect:
        file = str(root / expect.file)
        location = re.escape(f"{file}:{expect.line}" if expect.line else file) + ": "
        pattern = location + (expect.where + ": " if expect.where else "") + ".*" + re.escape(
            expect.message)
        assert any(re.match(pattern, line) for line in lines), (
            f"no line matches {pattern!r} in:\n{ran.stderr}")
    for text in case.absent:
        assert text not in ran.stderr, ran.stderr
    assert re.fullmatch(
        re.escape(str(ran.path)) + r": \d+ problems?; nothing was started", lines[-1]), lines[-1]
    count = int(lines[-1].rsplit(": ", 1)[1].split()[0])
    assert count == len(lines) - 1 >= len(case.expect)


@pytest.mark.parametrize("name", sorted(GOOD))
def test_valid_config_passes(checked: dict[str, Ran], name: str) -> None:
    ran = checked[name]
    assert ran.returncode == 0, ran.stderr
    assert ran.stderr == ""
    assert ran.stdout.startswith(f"{ran.path}: OK (2 routes, 1 upstreams")


def test_check_summary_counts(checked: dict[str, Ran]) -> None:
    assert checked["base"].stdout.strip() == (
        f"{checked['base'].path}: OK (2 routes, 1 upstreams, 3 policy bundles from 2 files)")


def test_config_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    ran = _run_check(missing, {})
    assert ran.returncode == 1
    assert f"config file not found: {missing}" in ran.stderr


# --- bundle merging (in-process: the values, not just the verdict) ------------------------------

MERGE = """\
include: policies.yaml
upstreams:
  app: {url: "http://127.0.0.1:8000"}
routes:
  - {name: fast-then-slow, upstream: app, use: [fast, slow]}
  - {name: slow-then-fast, upstream: app, use: [slow, fast]}
  - {name: own-key-wins, upstream: app, use: [fast, slow], timeout: 3s}
  - {name: empty-bundle-keeps, upstream: app, use: [fast, empty]}
  - {name: no-bundles, upstream: app}
"""
MERGE_POLICIES = """\
fast: {timeout: 1s}
slow: {timeout: 60s}
empty:
"""


def test_bundles_merge_in_order_and_route_keys_win(tmp_path: Path) -> None:
    (tmp_path / "policies.yaml").write_text(MERGE_POLICIES)
    path = tmp_path / "config.yaml"
    path.write_text(MERGE)
    loaded = load_config(path)
    timeouts = {route.name: route.timeout for route in loaded.config.routes}
    assert timeouts == {
        "fast-then-slow": 60.0, "slow-then-fast": 1.0, "own-key-wins": 3.0,
        "empty-bundle-keeps": 1.0, "no-bundles": None,
    }
    assert sorted(loaded.bundles) == ["empty", "fast", "slow"]
    assert loaded.files == (path, tmp_path / "policies.yaml")
    ran = _run_check(path, {})
    assert ran.returncode == 0, ran.stderr
    assert "5 routes, 1 upstreams, 3 policy bundles from 1 files" in ran.stdout


def test_load_config_collects_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(edit(BASE, l4="include: []", l15="    upstream: nope", l16="    timeout: x",
                         l19="    use: [gone]"))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    wheres = [(p.line, p.where) for p in caught.value.problems]
    assert (15, "routes[0] (products).upstream") in wheres
    assert (16, "routes[0] (products).timeout") in wheres
    assert (19, "routes[1] (rest).use[0]") in wheres


def test_resilience_keys_parse_as_the_issue_writes_them(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "a.yaml").write_text(POLICY_A)
    path = tmp_path / "config.yaml"
    path.write_text(edit(
        BASE, l9="    retry: {attempts: 2, backoff: 100ms, on: [connect, 502, 503, 504], "
                 "budget: 20%}",
        l16="    rate_limit: {rate: 6000/m, burst: 200, key: 'header:X-Api-Key', scope: cluster}"))
    config = load_config(path).config
    retry = config.upstreams["app"].retry
    assert retry is not None and retry.on == ["connect", "502", "503", "504"]
    assert retry.budget == pytest.approx(0.2) and retry.backoff == pytest.approx(0.1)
    limit = config.routes[0].rate_limit
    assert limit is not None and limit.rate == pytest.approx(100.0) and limit.burst == 200


def test_cache_keys_parse_as_documented(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "a.yaml").write_text(POLICY_A)
    path = tmp_path / "config.yaml"
    path.write_text(edit(BASE, l16="    cache: {heuristic: 10%, heuristic_max: 12h, "
                                   "memory: {max_ttl: 5s}}"))
    config = load_config(path).config
    cache = config.routes[0].cache
    assert cache is not None
    assert cache.heuristic == pytest.approx(0.1) and cache.heuristic_max == 12 * 3600
    assert cache.memory.max_ttl == 5.0
    path.write_text(edit(BASE, l16="    cache: {ttl: 30s}"))
    cache = load_config(path).config.routes[0].cache
    assert cache is not None and cache.heuristic == 0 and cache.heuristic_max == 86400
    assert cache.memory.max_ttl is None
    assert cache.coalesce is True and cache.lock_timeout == 5.0
    path.write_text(edit(BASE, l16="    cache: {coalesce: false, lock_timeout: 1500ms}"))
    cache = load_config(path).config.routes[0].cache
    assert cache is not None and cache.coalesce is False and cache.lock_timeout == 1.5


def test_the_l2_quota_is_a_top_level_total(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "a.yaml").write_text(POLICY_A)
    path = tmp_path / "config.yaml"
    path.write_text(BASE)
    config = load_config(path).config
    assert config.cache.redis.max_bytes == 256 * 1024**2
    assert config.redis.headroom == 256 * 1024**2
    path.write_text(BASE + "cache: {redis: {max_bytes: 2GiB}}\nredis: {headroom: 1GiB}\n")
    config = load_config(path).config
    assert config.cache.redis.max_bytes == 2 * 1024**3
    assert config.redis.headroom == 1024**3
