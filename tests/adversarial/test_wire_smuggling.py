"""Request smuggling: hostile framing written as raw bytes on a socket, against both of aiohttp's
request parsers (llhttp, the default, and the pure-Python one used under AIOHTTP_NO_EXTENSIONS).

The upstream records every byte it receives and parses it with llhttp (httptools, strict). For
each payload: the client gets a clear refusal (or a closed connection), or the request is
forwarded with one framing that says what the sidecar parsed; the upstream never sees a request
that was hidden in another (`/smuggled`), never an unparseable byte, never a request framed by
both Content-Length and Transfer-Encoding; and a normal client is served all along.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httptools
import pytest
from support import InProcessSidecar, SidecarProcess, free_port, make_config, until

Factory = Callable[..., Awaitable[InProcessSidecar]]

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"


# --- the recording upstream ----------------------------------------------------------------------


@dataclass
class Received:
    method: str = ""
    target: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    complete: bool = False

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


class _Recorder:
    """One upstream connection: every byte goes through a strict parser; each complete request
    is answered `200 ok`."""

    def __init__(self, origin: WireOrigin) -> None:
        self.origin = origin
        self.parser = httptools.HttpRequestParser(self)
        self.transport: Any = None
        self.current: Received | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.origin.raw += data
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self.origin.errors.append(f"{type(exc).__name__}: {exc}")
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.current is not None and not self.current.complete:
            self.origin.aborted += 1

    def eof_received(self) -> None:
        return None

    def on_message_begin(self) -> None:
        self.current = Received()
        self.origin.requests.append(self.current)

    def on_url(self, url: bytes) -> None:
        assert self.current is not None
        self.current.target += url.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.current is not None
        self.current.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        assert self.current is not None
        self.current.method = self.parser.get_method().decode()

    def on_body(self, body: bytes) -> None:
        assert self.current is not None
        self.current.body += body

    def on_message_complete(self) -> None:
        assert self.current is not None
        self.current.complete = True
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


class WireOrigin:
    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.raw = b""
        self.errors: list[str] = []
        self.aborted = 0
        self.url = ""

    @property
    def complete(self) -> list[Received]:
        return [r for r in self.requests if r.complete]

    def hostile(self) -> list[Received]:
        """What the normal client's requests (`/ok`) do not explain."""
        return [r for r in self.requests if r.target != "/ok"]


@pytest.fixture
async def wire_origin() -> Any:
    origin = WireOrigin()
    port = free_port()
    server = await asyncio.get_running_loop().create_server(
        lambda: _Recorder(origin), "127.0.0.1", port)
    origin.url = f"http://127.0.0.1:{port}"
    yield origin
    server.close()
    await server.wait_closed()


# --- the sidecar, with either parser ------------------------------------------------------------


@pytest.fixture(params=["llhttp"])
def parser(request: pytest.FixtureRequest) -> str:
    """The edge parses with httptools (llhttp) only."""
    return str(request.param)



LIMITS = {"header_timeout": "3s", "body_timeout": "1s"}


@pytest.fixture
async def edge(parser: str, sidecar_factory: Factory, wire_origin: WireOrigin,
               redis_url: str) -> InProcessSidecar:
    return await sidecar_factory(make_config(wire_origin.url, redis_url,
                                             server={"limits": LIMITS}))


# --- a raw client --------------------------------------------------------------------------------


@dataclass
class Outcome:
    statuses: list[int]
    bodies: list[bytes]
    closed: bool


class _Responses:
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.statuses: list[int] = []
        self.bodies: list[bytes] = []
        self.done = 0

    def on_headers_complete(self) -> None:
        self.statuses.append(self.parser.get_status_code())
        self.bodies.append(b"")

    def on_body(self, body: bytes) -> None:
        self.bodies[-1] += body

    def on_message_complete(self) -> None:
        if self.statuses[-1] >= 200:
            self.done += 1


async def send(port: int, data: bytes, *, responses: int = 1, timeout: float = 8.0,
               meanwhile: Callable[[], Awaitable[None]] | None = None) -> Outcome:
    """Write `data`, then read until the sidecar closes the connection, or `responses` final
    responses have arrived (and the last is not an error, after which the connection must
    close), or `timeout`. `meanwhile` runs while this connection is open."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    parsed = _Responses()
    closed = False
    try:
        writer.write(data)
        if meanwhile is not None:
            await meanwhile()
        async with asyncio.timeout(timeout):
            while parsed.done < responses or parsed.statuses[-1] >= 400:
                try:
                    chunk = await reader.read(65536)
                except ConnectionError:
                    chunk = b""
                if not chunk:
                    closed = True
                    break
                parsed.parser.feed_data(chunk)
    except TimeoutError:
        pass
    finally:
        writer.close()
    return Outcome([s for s in parsed.statuses if s >= 200], parsed.bodies, closed)


async def served_normally(url: str) -> None:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/ok") as response:
        assert response.status == 200
        assert await response.read() == b"ok"


# --- the corpus ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Refused:
    """The client gets one of `statuses` (and the connection closes), or only a closed
    connection; the upstream gets no whole request."""

    statuses: frozenset[int]


@dataclass(frozen=True)
class Forwarded:
    """Valid HTTP: forwarded as one request whose body is `body`."""

    body: bytes


@dataclass(frozen=True)
class Either:
    """Parsers differ on it: Refused(statuses) or Forwarded(body), both safe."""

    statuses: frozenset[int]
    body: bytes


BAD = Refused(frozenset({400}))
BAD_CODING = Refused(frozenset({400, 501}))


def post(headers: bytes, body: bytes, target: bytes = b"/a") -> bytes:
    return b"POST " + target + b" HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n" + body


def cl(body: bytes) -> bytes:
    return b"Content-Length: %d\r\n" % len(body)


CHUNKED = b"Transfer-Encoding: chunked\r\n"
ABC_CHUNKED = b"3\r\nabc\r\n0\r\n\r\n"
# A body that is itself a request: CL.TE reads it as a body, TE.CL as the next request.
HIDDEN_AFTER_LAST_CHUNK = b"0\r\n\r\n" + SMUGGLED
HIDDEN_IN_CHUNK = b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)

CASES: dict[str, tuple[bytes, Refused | Forwarded | Either]] = {
    # Content-Length and Transfer-Encoding together (CL.TE, TE.CL)
    "cl_te_hidden_after_last_chunk": (
        post(cl(HIDDEN_AFTER_LAST_CHUNK) + CHUNKED, HIDDEN_AFTER_LAST_CHUNK), BAD),
    "te_cl_hidden_in_chunk": (post(CHUNKED + b"Content-Length: 4\r\n", HIDDEN_IN_CHUNK), BAD),
    "cl_te_short_cl": (post(b"Content-Length: 6\r\n" + CHUNKED, b"0\r\n\r\nG"), BAD),
    "te_then_cl_zero": (post(CHUNKED + b"Content-Length: 0\r\n", HIDDEN_IN_CHUNK), BAD),
    # (llhttp refuses a trailer it must not act on; Python's parser ignores trailers)
    "cl_in_trailer": (post(CHUNKED, b"3\r\nabc\r\n0\r\nContent-Length: 40\r\n\r\n"),
                      Either(frozenset({400}), b"abc")),
    # Content-Length: duplicate, differing, list, signs
    "cl_twice_differing": (post(b"Content-Length: 3\r\nContent-Length: 38\r\n",
                                b"abc" + SMUGGLED), BAD),
    "cl_twice_same": (post(b"Content-Length: 3\r\nContent-Length: 3\r\n", b"abc"), BAD),
    "cl_list": (post(b"Content-Length: 3, 3\r\n", b"abc"), BAD),
    "cl_plus_sign": (post(b"Content-Length: +3\r\n", b"abc"), BAD),
    "cl_negative": (post(b"Content-Length: -1\r\n", SMUGGLED), BAD),
    "cl_hex": (post(b"Content-Length: 0x3\r\n", b"abc"), BAD),
    "cl_space_inside": (post(b"Content-Length: 3 8\r\n", b"abc" + SMUGGLED), BAD),
    "cl_overflow": (post(b"Content-Length: 99999999999999999999999\r\n", b"abc"),
                    Refused(frozenset({400, 413}))),
    "cl_space_before_colon": (post(b"Content-Length : 3\r\n", b"abc" + SMUGGLED), BAD),
    "cl_leading_zeros": (post(b"Content-Length: 0003\r\n", b"abc"), Forwarded(b"abc")),
    # Transfer-Encoding other than a plain `chunked`
    "te_xchunked": (post(b"Transfer-Encoding: xchunked\r\n", HIDDEN_IN_CHUNK), BAD_CODING),
    "te_chunked_identity": (post(b"Transfer-Encoding: chunked, identity\r\n",
                                 HIDDEN_IN_CHUNK), BAD_CODING),
    "te_identity": (post(b"Transfer-Encoding: identity\r\n", SMUGGLED), BAD_CODING),
    "te_gzip_chunked": (post(b"Transfer-Encoding: gzip, chunked\r\n", ABC_CHUNKED),
                        Refused(frozenset({501}))),
    "te_chunked_chunked": (post(b"Transfer-Encoding: chunked, chunked\r\n", ABC_CHUNKED),
                           BAD_CODING),
    "te_twice": (post(CHUNKED + b"Transfer-Encoding: identity\r\n", HIDDEN_IN_CHUNK),
                 BAD_CODING),
    "te_twice_chunked": (post(CHUNKED + CHUNKED, ABC_CHUNKED), BAD_CODING),
    "te_space_before_colon": (post(b"Transfer-Encoding : chunked\r\n", HIDDEN_IN_CHUNK), BAD),
    "te_vertical_tab": (post(b"Transfer-Encoding:\x0bchunked\r\n", HIDDEN_IN_CHUNK),
                        BAD_CODING),
    "te_in_http10": (post(CHUNKED, ABC_CHUNKED).replace(b"HTTP/1.1", b"HTTP/1.0"), BAD),
    # ... and what is still `chunked` by the RFC: forwarded, re-framed by the sidecar
    "te_leading_space": (post(b"Transfer-Encoding:   chunked\r\n", ABC_CHUNKED),
                         Forwarded(b"abc")),
    "te_tab": (post(b"Transfer-Encoding:\tchunked\r\n", ABC_CHUNKED), Forwarded(b"abc")),
    "te_uppercase": (post(b"Transfer-Encoding: CHUNKED\r\n", ABC_CHUNKED), Forwarded(b"abc")),
    "te_chunk_extension": (post(CHUNKED, b"3;name=value\r\nabc\r\n0\r\n\r\n"),
                           Forwarded(b"abc")),
    # A lookalike header an upstream might fold into the real one (CGI turns `_` into `-`)
    "te_underscore_with_cl": (post(b"Transfer_Encoding: chunked\r\n" + cl(b"abc"), b"abc"),
                              Forwarded(b"abc")),
    # Obsolete line folding
    "folded_header": (post(b"X-A: 1\r\n chunked\r\n" + cl(b"abc"), b"abc"), BAD),
    "folded_te": (post(b"Transfer-Encoding:\r\n chunked\r\n", HIDDEN_IN_CHUNK), BAD),
    "folded_first_line": (post(b" Transfer-Encoding: chunked\r\n", HIDDEN_IN_CHUNK), BAD),
    # Bare LF and bare CR line ends
    "bare_lf_everywhere": (b"POST /a HTTP/1.1\nHost: x\nContent-Length: 3\n\nabc", BAD),
    "bare_lf_one_header": (b"POST /a HTTP/1.1\r\nHost: x\nContent-Length: 3\r\n\r\nabc", BAD),
    "bare_lf_chunk_size": (post(CHUNKED, b"3\nabc\r\n0\r\n\r\n"), BAD),
    "bare_lf_after_chunk": (post(CHUNKED, b"3\r\nabc\n0\r\n\r\n"), BAD),
    "bare_cr_hides_te": (post(b"X-A: a\rTransfer-Encoding: chunked\r\n" + cl(b"abc"), b"abc"),
                         BAD),
    # Invalid chunk sizes
    "chunk_negative": (post(CHUNKED, b"-3\r\nabc\r\n0\r\n\r\n"), BAD),
    "chunk_0x": (post(CHUNKED, b"0x3\r\nabc\r\n0\r\n\r\n"), BAD),
    "chunk_trailing_junk": (post(CHUNKED, b"3zz\r\nabc\r\n0\r\n\r\n"), BAD),
    "chunk_trailing_space": (post(CHUNKED, b"3 \r\nabc\r\n0\r\n\r\n"), BAD),
    "chunk_data_too_long": (post(CHUNKED, b"3\r\nabcX\r\n0\r\n\r\n"), BAD),
    "chunk_lf_in_extension": (post(CHUNKED, b"3;a\nb\r\nabc\r\n0\r\n\r\n"), BAD),
    # 2**64 + 3: llhttp refuses it; the Python parser reads a huge chunk, so the sidecar
    # streams `abc...` and waits for more, until server.limits.body_timeout (408).
    "chunk_size_overflow": (post(CHUNKED, b"10000000000000003\r\nabc\r\n0\r\n\r\n" + SMUGGLED),
                            Refused(frozenset({400, 408}))),
    # A request inside a body is only a body
    "request_in_cl_body": (post(cl(SMUGGLED), SMUGGLED), Forwarded(SMUGGLED)),
    "request_in_get_body": (post(cl(SMUGGLED), SMUGGLED).replace(b"POST", b"GET"),
                            Forwarded(SMUGGLED)),
    "request_in_chunk": (post(CHUNKED, HIDDEN_IN_CHUNK), Forwarded(SMUGGLED)),
    # Connection naming the framing headers as hop-by-hop: dropping Content-Length would
    # turn the body into the upstream's next request.
    "connection_names_content_length": (post(b"Connection: Content-Length\r\n" + cl(SMUGGLED),
                                             SMUGGLED), Forwarded(SMUGGLED)),
    "connection_names_te": (post(b"Connection: Transfer-Encoding\r\n" + CHUNKED,
                                 HIDDEN_IN_CHUNK), Forwarded(SMUGGLED)),
    "pipelined_after_connection_close": (
        b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" + SMUGGLED, BAD),
    # A tunnel: what follows CONNECT would be the tunnel's bytes
    "connect": (b"CONNECT upstream:443 HTTP/1.1\r\nHost: upstream:443\r\n\r\n" + SMUGGLED,
                Refused(frozenset({400, 405}))),
    # Control characters and stray whitespace in the head
    "nul_in_value": (b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", BAD),
    "cr_in_value": (b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n", BAD),
    "ctl_in_value": (b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n", BAD),
    "space_before_colon": (b"GET /a HTTP/1.1\r\nHost: x\r\nX-A : b\r\n\r\n", BAD),
    "bad_header_name": (b"GET /a HTTP/1.1\r\nHost: x\r\nX(A): b\r\n\r\n", BAD),
    "nul_in_method": (b"G\x00T /a HTTP/1.1\r\nHost: x\r\n\r\n", BAD),
    "space_in_target": (b"GET /a " + SMUGGLED, BAD),
    "no_host": (b"GET /a HTTP/1.1\r\n\r\n", BAD),
    "two_hosts": (b"GET /a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", BAD),
    "http_2_request_line": (b"GET /a HTTP/2.0\r\nHost: x\r\n\r\n", Refused(frozenset({400, 505}))),
    "http_0_9": (b"GET /a\r\n\r\n", Refused(frozenset({400, 505}))),
}


@pytest.mark.parametrize("name", list(CASES))
async def test_hostile_framing_is_refused_or_forwarded_as_parsed(
        name: str, parser: str, edge: InProcessSidecar, wire_origin: WireOrigin) -> None:
    data, expect = CASES[name]
    outcome = await send(edge.runtime.public_port or 0, data,
                         meanwhile=lambda: served_normally(edge.url))
    hostile = wire_origin.hostile()
    assert_only_sidecar_requests(wire_origin)
    if isinstance(expect, Either):
        expect = Forwarded(expect.body) if outcome.statuses == [200] else Refused(
            expect.statuses)
    if isinstance(expect, Refused):
        assert outcome.statuses[:1] in ([], *([s] for s in expect.statuses)), outcome
        assert len(outcome.statuses) <= 1 and outcome.closed, outcome
        assert not [r for r in hostile if r.complete], wire_origin.raw
    else:
        assert outcome.statuses == [200], outcome
        assert [(r.target, r.body, r.complete) for r in hostile] == [("/a", expect.body, True)]
        forwarded = hostile[0]
        assert forwarded.all("Content-Length") or forwarded.all("Transfer-Encoding") == [
            "chunked"]
        assert not forwarded.all("Transfer_Encoding")
    # ... and the sidecar still serves.
    await served_normally(edge.url)


def assert_only_sidecar_requests(origin: WireOrigin) -> None:
    """Every byte the upstream got parses, as requests the sidecar wrote (its Via and request
    id on each), never a hidden one, never with two framings."""
    assert not origin.errors, origin.raw
    for received in origin.requests:
        assert received.target != "/smuggled", origin.raw
        assert received.all("Via")[-1:] == ["1.1 sidecar"], origin.raw
        assert len(received.all("X-Request-ID")) == 1, origin.raw
        assert not (received.all("Content-Length") and received.all("Transfer-Encoding"))


async def test_refusals_use_the_json_error_shape_and_log_one_line(
        parser: str, edge: InProcessSidecar, caplog: pytest.LogCaptureFixture) -> None:
    outcome = await send(edge.runtime.public_port or 0, CASES["cl_te_short_cl"][0])
    assert outcome.statuses == [400] and outcome.closed
    error = json.loads(outcome.bodies[0])
    assert error["error"] == "malformed_request"
    assert "Content-Length" in error["detail"] and "\\r" not in error["detail"]
    assert set(error) == {"error", "detail", "request_id"}
    records = [r for r in caplog.records if r.name == "sidecar.connection"]
    assert [r.getMessage() for r in records] == ["malformed request refused; connection closed"]
    assert records[0].request_id == error["request_id"]  # type: ignore[attr-defined]
    assert not records[0].exc_info
    assert not [r for r in caplog.records if r.name.startswith("aiohttp")]


async def test_absolute_form_target_is_forwarded_with_the_host_it_was_routed_by(
        parser: str, edge: InProcessSidecar, wire_origin: WireOrigin) -> None:
    outcome = await send(edge.runtime.public_port or 0,
                         b"GET http://internal.example/admin?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert outcome.statuses == [200]
    [received] = wire_origin.hostile()
    assert (received.target, received.all("Host")) == ("/admin?x=1", ["x"])


async def test_h2c_upgrade_is_not_passed_on(
        parser: str, edge: InProcessSidecar, wire_origin: WireOrigin) -> None:
    """`Upgrade: h2c` forwarded would let an upstream that speaks h2c take the connection
    over, past the proxy's view (h2c smuggling)."""
    outcome = await send(edge.runtime.public_port or 0, (
        b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"))
    assert outcome.statuses == [200]
    [received] = wire_origin.hostile()
    names = {k.lower() for k, _ in received.headers}
    assert not names & {"upgrade", "http2-settings", "connection"}


BODIES = {
    "none": (b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n", b""),
    "small_cl": (post(cl(b"abc"), b"abc"), b"abc"),
    "large_cl": (post(cl(b"x" * 200_000), b"x" * 200_000), b"x" * 200_000),
    "small_chunked": (post(CHUNKED, ABC_CHUNKED), b"abc"),
    "large_chunked": (post(CHUNKED, b"%x\r\n%s\r\n0\r\n\r\n" % (200_000, b"y" * 200_000)),
                      b"y" * 200_000),
    "empty_chunked": (post(CHUNKED, b"0\r\n\r\n"), b""),
    "cl_named_in_connection": (post(b"Connection: keep-alive, Content-Length\r\n" + cl(b"abc"),
                                    b"abc"), b"abc"),
}


@pytest.mark.parametrize("name", list(BODIES))
async def test_what_goes_upstream_has_exactly_one_framing(
        name: str, parser: str, edge: InProcessSidecar, wire_origin: WireOrigin) -> None:
    data, body = BODIES[name]
    outcome = await send(edge.runtime.public_port or 0, data)
    assert outcome.statuses == [200]
    [received] = wire_origin.hostile()
    assert received.body == body and received.complete
    lengths, codings = received.all("Content-Length"), received.all("Transfer-Encoding")
    assert (lengths, codings) in (([str(len(body))], []), ([], ["chunked"])) or (
        not body and (lengths, codings) == ([], []))


async def test_one_connection_cannot_desync_the_upstream_pool(
        parser: str, edge: InProcessSidecar, wire_origin: WireOrigin) -> None:
    """Hostile requests and normal ones interleaved over pooled upstream connections: every
    request the upstream saw was one the sidecar meant to send."""
    port = edge.runtime.public_port or 0
    hostile = [data for data, _ in CASES.values()] * 2

    async def normal_clients() -> None:
        for _ in range(20):
            await served_normally(edge.url)

    results = await asyncio.gather(
        normal_clients(), *(send(port, data, timeout=8) for data in hostile))
    assert all(isinstance(r, Outcome) for r in results[1:])
    assert_only_sidecar_requests(wire_origin)
    assert len([r for r in wire_origin.requests if r.target == "/ok"]) == 20


@pytest.mark.slow
async def test_a_real_process_survives_the_corpus_and_logs_each_refusal(
        sidecar_process: Callable[..., SidecarProcess], wire_origin: WireOrigin,
        redis_url: str) -> None:
    """The corpus against `python -m sidecar run` (llhttp), all at once: still up and serving
    after, one log line per refusal and no traceback."""
    proc = sidecar_process(make_config(wire_origin.url, redis_url, server={"limits": LIMITS}))
    results = await asyncio.gather(*(send(proc.port, data) for data, _ in CASES.values()))
    errors = [json.loads(outcome.bodies[0]) for outcome in results
              if outcome.statuses and outcome.statuses[0] != 200]
    assert len(errors) >= len(CASES) // 2
    await served_normally(proc.url)
    assert proc.process.poll() is None
    assert_only_sidecar_requests(wire_origin)

    # (a bad method on a connection's first request is logged at debug: TLS or a scanner)
    logged = [e["request_id"] for e in errors if e["detail"] != "invalid method"]

    async def all_logged() -> bool:
        logs = proc.logs()
        return all(request_id in logs for request_id in logged)

    await until(all_logged)
    assert "Traceback" not in proc.logs()
    assert proc.stop() == 0
