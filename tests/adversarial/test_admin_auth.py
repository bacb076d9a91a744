"""The admin listener's bearer token against clients who do not have it (docs/configuration.md,
`admin.token`): every way of almost presenting it is a 401 with the JSON error, the right one a
200, health probes stay open, and the job progress endpoint under /internal/ answers only to the
secret of its job's URL.

Requests are written by hand on a socket, so that header bytes and targets go out as they are.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import inspect
import json
import textwrap
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yarl
from aiohttp import web
from support import InProcessSidecar, Origin, make_config, until

from sidecar import admin
from sidecar.cli import main as sidecar_main
from sidecar.core import access

Factory = Callable[..., Awaitable[InProcessSidecar]]
TOKEN = "s3cret-Token_42"


@dataclass
class Raw:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def send(base: str, target: str | bytes, headers: Sequence[tuple[str, str | bytes]] = (),
               method: str = "GET", body: bytes | None = None) -> Raw:
    """One request, its target and header values written as the bytes given."""
    url = yarl.URL(base)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    raw_target = target if isinstance(target, bytes) else target.encode("latin-1")
    out = [method.encode() + b" " + raw_target + b" HTTP/1.1", b"Host: 127.0.0.1",
           b"Connection: close"]
    for name, value in headers:
        out.append(name.encode() + b": "
                   + (value if isinstance(value, bytes) else value.encode("latin-1")))
    if body is not None:
        out += [b"Content-Type: application/json", b"Content-Length: %d" % len(body)]
    try:
        writer.write(b"\r\n".join(out) + b"\r\n\r\n" + (body or b""))
        async with asyncio.timeout(10):
            data = await reader.read()
    finally:
        writer.close()
    head, _, payload = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    return Raw(int(status_line.split(" ")[1]), parsed, payload)


def assert_unauthorized(answer: Raw) -> None:
    assert answer.status == 401, answer.body
    body = answer.json()
    assert set(body) == {"error", "detail", "request_id"}, body
    assert body["error"] == "unauthorized" and body["request_id"]
    assert answer.headers["x-request-id"] == body["request_id"]
    assert answer.headers["www-authenticate"].startswith("Bearer")
    assert TOKEN not in answer.body.decode()


@pytest.fixture
async def guarded(sidecar_factory: Factory, origin: Origin, redis_url: str) -> InProcessSidecar:
    return await sidecar_factory(make_config(origin.url, redis_url, admin={"token": TOKEN}))


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


WRONG: list[tuple[str, list[tuple[str, str | bytes]]]] = [
    ("none", []),
    ("empty", [("Authorization", "")]),
    ("scheme only", [("Authorization", "Bearer")]),
    ("scheme and space", [("Authorization", "Bearer ")]),
    ("token alone", [("Authorization", TOKEN)]),
    ("wrong token", [("Authorization", "Bearer wrong")]),
    ("suffix", [("Authorization", f"Bearer {TOKEN}x")]),
    ("prefix", [("Authorization", f"Bearer x{TOKEN}")]),
    ("prefix of the token", [("Authorization", f"Bearer {TOKEN[:-1]}")]),
    ("first character", [("Authorization", f"Bearer {TOKEN[0]}")]),
    ("other case", [("Authorization", f"Bearer {TOKEN.swapcase()}")]),
    ("basic password", [("Authorization", basic("admin", TOKEN))]),
    ("basic user", [("Authorization", basic(TOKEN, ""))]),
    ("basic raw", [("Authorization", f"Basic {TOKEN}")]),
    ("other scheme", [("Authorization", f"Token {TOKEN}")]),
    ("no space", [("Authorization", f"Bearer{TOKEN}")]),
    ("quoted", [("Authorization", f'Bearer "{TOKEN}"')]),
    ("two tokens", [("Authorization", f"Bearer {TOKEN} {TOKEN}")]),
    ("comma list", [("Authorization", f"Bearer wrong, Bearer {TOKEN}")]),
    ("second line", [("Authorization", "Bearer wrong"), ("Authorization", f"Bearer {TOKEN}")]),
    ("two lines", [("Authorization", f"Bearer {TOKEN}"), ("Authorization", "Bearer wrong")]),
    ("proxy-authorization", [("Proxy-Authorization", f"Bearer {TOKEN}")]),
    ("x-admin-token", [("X-Admin-Token", TOKEN)]),
    ("cookie", [("Cookie", f"token={TOKEN}")]),
    ("non-utf-8 bytes", [("Authorization", b"Bearer \xff\xfe")]),
]


@pytest.mark.parametrize("headers", [h for _, h in WRONG], ids=[n for n, _ in WRONG])
async def test_anything_but_the_bearer_token_is_401(guarded, headers):
    for path in ("/admin/stats", "/metrics", "/admin/config", "/admin/jobs"):
        assert_unauthorized(await send(guarded.admin_url, path, headers))
    purge = await send(guarded.admin_url, "/admin/cache/purge", headers, method="POST",
                       body=b'{"prefix": "/"}')
    assert_unauthorized(purge)


async def test_the_token_in_the_query_string_is_refused(guarded):
    """A URL ends up in logs and histories: the token is taken from the header only."""
    for target in (f"/admin/stats?token={TOKEN}", f"/admin/stats?access_token={TOKEN}",
                   f"/admin/stats?Authorization=Bearer%20{TOKEN}"):
        assert_unauthorized(await send(guarded.admin_url, target))


RIGHT = [
    ("canonical", f"Bearer {TOKEN}"),
    ("lowercase scheme", f"bearer {TOKEN}"),  # auth-scheme is case-insensitive (RFC 9110 §11.1)
    ("uppercase scheme", f"BEARER {TOKEN}"),
    ("two spaces", f"Bearer  {TOKEN}"),  # 1*SP (RFC 6750 §2.1)
    ("trailing whitespace", f"Bearer {TOKEN} \t"),  # optional whitespace around a field value
]


@pytest.mark.parametrize("value", [v for _, v in RIGHT], ids=[n for n, _ in RIGHT])
async def test_the_bearer_token_opens_every_endpoint(guarded, value):
    headers = [("Authorization", value)]
    for path in ("/admin/stats", "/metrics", "/admin/config", "/admin/breakers",
                 "/admin/jobs"):
        answer = await send(guarded.admin_url, path, headers)
        assert answer.status == 200, (path, answer.body[:200])
    config = (await send(guarded.admin_url, "/admin/config", headers)).json()
    assert config["config"]["admin"]["token"] == "<redacted>"
    purge = await send(guarded.admin_url, "/admin/cache/purge", headers, method="POST",
                       body=b'{"prefix": "/"}')
    assert purge.status == 200


async def test_health_probes_stay_open(guarded):
    for path in ("/healthz", "/readyz"):
        answer = await send(guarded.admin_url, path)
        assert answer.status == 200, path
        answer = await send(guarded.admin_url, path, [("Authorization", "Bearer wrong")])
        assert answer.status == 200, path


@pytest.mark.parametrize("target", [
    "/internal/../admin/stats", "/internal/%2e%2e/admin/stats", "/internal/..%2fadmin/stats",
    "/internal/..%2F..%2Fadmin%2Fstats", "/healthz/../admin/stats", "/readyz/..%2fmetrics",
    "//admin/stats", "/admin/./stats", "/admin%2fstats", "/admin/stats/", "/ADMIN/stats",
    "/internal/jobs/x/../../../admin/stats", "http://127.0.0.1/admin/stats",
    "/admin/stats%00", "/healthz%2f..%2fadmin%2fstats",
])
async def test_no_spelling_of_a_path_slips_past_the_guard(guarded, target):
    """The guard and the router read the same path: whatever opens a guarded endpoint was
    checked; the open prefixes (/healthz, /readyz, /internal/) lead nowhere else."""
    answer = await send(guarded.admin_url, target)
    assert answer.status in (401, 404), (target, answer.status, answer.body[:200])
    assert b'"cache"' not in answer.body and b"sidecar_" not in answer.body


async def test_progress_endpoint_answers_only_its_jobs_secret(sidecar_factory, origin,
                                                              redis_url):
    """/internal/ is not behind admin.token: a progress report carries its job's own secret
    in X-Sidecar-Progress-Token, compared in constant time; anything else looks like a job
    that does not exist, and a secret in the URL is not taken."""
    release = asyncio.Event()
    seen: dict[str, str] = {}

    async def work(request, n):
        seen["token"] = request.headers["X-Sidecar-Progress-Token"]
        seen["url"] = request.headers["X-Sidecar-Progress-URL"]
        await release.wait()
        return web.Response(text="done")

    origin.script("/api/job", work)
    config = make_config(origin.url, redis_url, admin={"token": TOKEN}, routes=[
        {"name": "jobs", "match": {"path": "/api/**"}, "upstream": "app",
         "offload": {"queue": "default"}}])
    sidecar = await sidecar_factory(config)
    accepted = await send(sidecar.url, "/api/job", method="POST", body=b"{}")
    assert accepted.status == 202

    async def running() -> bool:
        return "url" in seen

    await until(running, 20)
    url = yarl.URL(seen["url"])
    assert not url.query  # no secret in a URL
    secret = seen["token"]
    path = url.path
    header = "X-Sidecar-Progress-Token"
    report = b'{"progress": 40, "message": "step 2"}'
    wrong: list[tuple[str, list[tuple[str, str | bytes]]]] = [
        (path, []), (path, [(header, "")]), (path, [(header, secret + "x")]),
        (path, [(header, secret[:-1])]), (path, [(header, secret.swapcase())]),
        (path, [(header, b"\xff\xfe")]), (path, [(header, TOKEN)]),
        (path, [(header, secret), (header, secret)]),
        (f"{path}?token={secret}", []),
        (path.replace("/progress", "") + "/progress", [(header, secret + "x")])]
    for target, headers in wrong:
        for extra in ([], [("Authorization", f"Bearer {TOKEN}")]):
            answer = await send(sidecar.admin_url, target, [*headers, *extra], method="POST",
                                body=report)
            assert answer.status == 404, (target, headers, answer.body)
            assert answer.json()["error"] == "job_not_found"
    hostile_bodies = [b"[" * 100_000, b'{"progress": ' * 50_000, b"\xff\xfe", b"null",
                      b'{"progress": 1e999}', b'{"progress": 40, "message": "' + b"x" * 5000
                      + b'"}']
    for body in hostile_bodies:
        answer = await send(sidecar.admin_url, path, [(header, secret)], method="POST",
                            body=body)
        assert answer.status == 400, (body[:30], answer.status, answer.body[:200])
        assert answer.json()["error"] == "bad_request"
    good = await send(sidecar.admin_url, path, [(header, secret)], method="POST", body=report)
    assert good.status == 204
    release.set()


def _compares(function: Callable[..., Any]) -> tuple[list[str], list[str]]:
    """The hmac.compare_digest calls in a function, and its == / != comparisons."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    digests = [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Call)
               and ast.unparse(node.func) == "hmac.compare_digest"]
    equalities = [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Compare)
                  and any(isinstance(op, ast.Eq | ast.NotEq) for op in node.ops)]
    return digests, equalities


def test_secrets_are_compared_in_constant_time():
    """Both secrets of the admin listener go through hmac.compare_digest, never `==`."""
    guard = [admin.require_token, access.identify, access.bearer]
    digests = [call for function in guard for call in _compares(function)[0]]
    assert any("offered" in call and "token" in call for call in digests), digests
    for function in guard:
        assert not [e for e in _compares(function)[1] if "token" in e or "given" in e]
    digests, equalities = _compares(admin.job_progress)
    assert any("token" in call for call in digests)
    assert not [e for e in equalities if "token" in e]


# -- without a token ---------------------------------------------------------------------------


@pytest.mark.parametrize("listen", ["0.0.0.0:19901", "[::]:19901", "10.1.2.3:19901",
                                    "myhost.example:19901"])
def test_admin_off_loopback_without_a_token_is_refused(tmp_path: Path, redis_url, capsys,
                                                       listen):
    """The admin listener defaults to loopback; moved off it without admin.token, `sidecar
    check` (and so `sidecar run`) refuses the config, saying why."""
    config = make_config("http://127.0.0.1:8000", redis_url)
    config["server"]["admin_listen"] = listen
    for token in (None, ""):
        if token is not None:
            config["admin"] = {"token": token}
        path = tmp_path / "config.yaml"
        path.write_text(json.dumps(config))
        assert sidecar_main(["check", "-c", str(path)]) == 1
        err = capsys.readouterr().err
        assert "not on loopback: set admin.token" in err and "Traceback" not in err


@pytest.mark.parametrize("listen", ["127.0.0.1:19901", "localhost:19901", "[::1]:19901",
                                    "127.0.0.2:19901"])
def test_admin_on_loopback_needs_no_token(tmp_path: Path, redis_url, capsys, listen):
    config = make_config("http://127.0.0.1:8000", redis_url)
    config["server"]["admin_listen"] = listen
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))
    assert sidecar_main(["check", "-c", str(path)]) == 0
    assert "OK" in capsys.readouterr().out


async def test_admin_errors_have_the_sidecars_error_shape(guarded):
    """Every admin error, not only the 401, carries request_id and X-Request-ID (as the public
    listener's do), so an operator can match it with the logs."""
    headers = [("Authorization", f"Bearer {TOKEN}")]
    answers = [
        await send(guarded.admin_url, "/admin/cache/purge", headers, method="POST",
                   body=b'{"key": "no-slash"}'),
        await send(guarded.admin_url, "/admin/cache/purge", headers, method="POST",
                   body=b"[]"),
        await send(guarded.admin_url, "/admin/breakers/nope/reset", headers, method="POST"),
    ]
    for answer in answers:
        assert answer.status in (400, 404), answer.body
        error = answer.json()
        assert set(error) == {"error", "detail", "request_id"}, error
        assert answer.headers["x-request-id"] == error["request_id"]
