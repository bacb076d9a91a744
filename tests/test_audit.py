"""Named admin tokens with scopes, and the audit log: a real `sidecar run` process, its admin
listener driven over HTTP, its audit lines read from `log.audit_file` (or its stderr)."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support import Origin, make_config, until, write_config

from sidecar.config import ConfigError, load_config
from sidecar.core.access import Caller, bearer, identify, scope_needed

READ = "read-token-0123456789"
OPS = "ops-token-0123456789ab"
OLD = "single-admin-token-xyz"


def audit_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def reaches(path: Path, count: int) -> Any:
    async def check() -> bool:
        return len(audit_lines(path)) == count
    return check


def config(origin: Origin, redis_url: str, tmp_path: Path, **admin: Any) -> dict[str, Any]:
    return make_config(
        origin.url, redis_url,
        admin=admin or {"token": OLD, "tokens": {"grafana": {"token": READ, "scope": "read"},
                                                 "ops": {"token": OPS, "scope": "admin"}}},
        log={"access": False, "audit_file": "audit.log"},
        queues={"default": {"concurrency": 2}},
        routes=[{"name": "flaky", "match": {"path": "/flaky"}, "upstream": "app",
                 "breaker": {"failures": 2, "reset": "60s"}},
                {"name": "default", "match": {"path": "/**"}, "upstream": "app",
                 "cache": {"ttl": "60s"}}])


async def admin(client: aiohttp.ClientSession, base: str, method: str, path: str,
                token: str | None, body: Any = None) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with client.request(method, base + path, headers=headers, json=body) as response:
        assert response.headers["Server"] == "sidecar"  # not aiohttp's versions
        return response.status, await response.json() if response.content_length else {}


def test_scopes_and_tokens_without_a_socket() -> None:
    tokens = {"grafana": (READ, "read"), "ops": (OPS, "admin")}
    assert identify([f"Bearer {READ}"], tokens) == Caller("grafana", "read")  # type: ignore[arg-type]
    assert identify([f"bearer   {OPS}"], tokens) == Caller("ops", "admin")  # type: ignore[arg-type]
    for lines in ([], [f"Bearer {READ}", f"Bearer {READ}"], [f"Basic {READ}"], ["Bearer "],
                  [f"Bearer {READ}x"]):
        assert identify(lines, tokens) is None, lines  # type: ignore[arg-type]
    assert bearer(["Bearer a b"]) == "a b"
    assert Caller("grafana", "read").may("GET") and not Caller("grafana", "read").may("POST")
    assert scope_needed("DELETE") == "admin" and scope_needed("HEAD") == "read"


def test_token_config_errors_are_located(tmp_path: Path) -> None:
    for admin, expected in (
            ({"tokens": {"a": {"token": "short"}}}, "admin.tokens.a.token"),
            ({"tokens": {"a": {"token": READ, "scope": "write"}}}, "admin.tokens.a.scope"),
            ({"token": OLD, "tokens": {"admin": {"token": OPS}}}, "token named 'admin'"),
            ({"tokens": {"a": {"token": READ}, "b": {"token": READ, "scope": "read"}}},
             "the same secret")):
        path = write_config(tmp_path / "c.yaml", make_config("http://127.0.0.1:1",
                                                             "redis://127.0.0.1:1/0",
                                                             admin=admin))
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        assert expected in str(caught.value), (admin, str(caught.value))


async def test_a_read_token_reads_and_cannot_act(sidecar_process: Any, origin: Origin,
                                                 redis_url: str, tmp_path: Path,
                                                 client: aiohttp.ClientSession) -> None:
    proc = sidecar_process(config(origin, redis_url, tmp_path))
    base = proc.admin_url
    for path in ("/admin/stats", "/admin/config", "/metrics", "/admin/breakers",
                 "/admin/queues", "/admin/jobs", "/admin/schedules"):
        for token in (READ, OPS, OLD):
            async with client.get(base + path,
                                  headers={"Authorization": f"Bearer {token}"}) as response:
                assert response.status == 200, (path, token)
    status, body = await admin(client, base, "POST", "/admin/cache/purge", READ,
                               {"prefix": "/"})
    assert status == 403 and body["error"] == "forbidden" and "grafana" in body["detail"]
    status, body = await admin(client, base, "GET", "/admin/stats", "nope")
    assert status == 401 and body["error"] == "unauthorized"
    status, _ = await admin(client, base, "POST", "/admin/cache/purge", OPS, {"prefix": "/"})
    assert status == 200
    status, _ = await admin(client, base, "POST", "/admin/cache/purge", OLD, {"prefix": "/"})
    assert status == 200
    lines = audit_lines(tmp_path / "audit.log")
    assert [(line["action"], line["outcome"], line["token"], line["status"])
            for line in lines] == [("cache.purge", "refused", "grafana", 403),
                                   ("cache.purge", "ok", "ops", 200),
                                   ("cache.purge", "ok", "admin", 200)]
    for line in lines:
        assert line["client"] == "127.0.0.1" and line["target"] in (None, "prefix=/")
        assert READ not in json.dumps(line) and OPS not in json.dumps(line)


async def test_every_admin_action_leaves_exactly_one_audit_line(
        sidecar_process: Any, origin: Origin, redis_url: str, tmp_path: Path,
        client: aiohttp.ClientSession) -> None:
    origin.reply("/flaky", status=503, body="down")
    raw = config(origin, redis_url, tmp_path)
    proc = sidecar_process(raw)
    base, log = proc.admin_url, tmp_path / "audit.log"
    for _ in range(3):
        async with client.get(proc.url + "/flaky") as response:
            assert response.status == 503
    actions: list[tuple[str, str, Any, tuple[str, str | None, str]]] = [
        ("POST", "/admin/cache/purge", {"tag": "product-1"},
         ("cache.purge", "tag=product-1", "ok")),
        ("POST", "/admin/cache/purge", {"key": "no-slash"},
         ("cache.purge", "key=no-slash", "failed")),
        ("POST", "/admin/breakers/route:flaky/reset", None,
         ("breaker.reset", "route:flaky", "ok")),
        ("POST", "/admin/breakers/nope/reset", None, ("breaker.reset", "nope", "failed")),
        ("POST", "/admin/queues/default/pause", None, ("queue.pause", "default", "ok")),
        ("POST", "/admin/queues/default/resume", None, ("queue.resume", "default", "ok")),
        ("POST", "/admin/queues/default/drain", None, ("queue.drain", "default", "ok")),
        ("POST", "/admin/jobs/retry", {"status": "failed"},
         ("jobs.retry", "status=failed", "ok")),
        ("POST", "/admin/jobs/cancel", {"queue": "default"},
         ("jobs.cancel", "status=queued queue=default", "ok")),
        ("POST", "/admin/jobs/default.5.AAAAAAAAAAAAAAAAAAAAAAAA/retry", None,
         ("job.retry", "default.5.AAAAAAAAAAAAAAAAAAAAAAAA", "failed")),
        ("POST", "/admin/reload", None, ("config.reload", str(proc.config_path), "ok")),
    ]
    for number, (method, path, body, expected) in enumerate(actions, start=1):
        await admin(client, base, method, path, OPS, body)
        lines = audit_lines(log)
        assert len(lines) == number, (path, lines)
        line = lines[-1]
        assert (line["action"], line["target"], line["outcome"]) == expected, line
        assert line["token"] == "ops" and line["client"] == "127.0.0.1"
    assert lines[0]["result"]["redis_removed"] == 0  # what the action reported
    assert lines[8]["matched"] == 0

    # Reads leave no line; a reload by signal and by a file change leave one each.
    await admin(client, base, "GET", "/admin/stats", READ)
    assert len(audit_lines(log)) == len(actions)
    proc.signal(signal.SIGHUP)
    await until(reaches(log, len(actions) + 1))
    raw["routes"][1]["cache"]["ttl"] = "30s"
    write_config(proc.config_path, raw)
    await until(reaches(log, len(actions) + 2))
    by_signal, by_file = audit_lines(log)[-2:]
    assert (by_signal["action"], by_signal["reason"], by_signal["outcome"]) == (
        "config.reload", "SIGHUP", "ok")
    assert (by_file["reason"], by_file["outcome"], by_file["token"]) == (
        "file changed", "ok", None)

    # A reload the config refuses is audited as failed, with the problem.
    proc.config_path.write_text(proc.config_path.read_text().replace("ttl: 30s", "ttl: soon"))
    await until(reaches(log, len(actions) + 3))
    status, body = await admin(client, base, "POST", "/admin/reload", OPS)
    assert status == 422 and body["error"] == "config_rejected"
    failed = audit_lines(log)[-2:]
    assert [line["outcome"] for line in failed] == ["failed", "failed"]
    assert "ttl" in failed[-1]["error"]


async def test_without_audit_file_lines_go_to_stderr_whatever_the_level(
        sidecar_process: Any, origin: Origin, redis_url: str, tmp_path: Path,
        client: aiohttp.ClientSession) -> None:
    raw = config(origin, redis_url, tmp_path, token=OLD)
    raw["log"] = {"access": False, "level": "error"}
    proc = sidecar_process(raw)
    await admin(client, proc.admin_url, "POST", "/admin/cache/purge", OLD, {"prefix": "/x"})
    await admin(client, proc.admin_url, "POST", "/admin/cache/purge", None, {"prefix": "/x"})

    def audited() -> list[dict[str, Any]]:
        return [line for line in (json.loads(text) for text in proc.logs().splitlines()
                                  if text.startswith("{"))
                if line.get("logger") == "sidecar.audit"]
    async def both() -> bool:
        return len(audited()) == 2
    await until(both)
    assert [(line["outcome"], line["token"]) for line in audited()] == [
        ("ok", "admin"), ("refused", None)]
