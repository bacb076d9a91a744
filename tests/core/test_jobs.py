"""The job rules without sockets: ids, owners, Prefer, the replayed head, progress, views."""

from __future__ import annotations

import pytest

from sidecar.core.jobs import (
    SWEPT_ERROR,
    JobId,
    client_error,
    iso_time,
    lane,
    owner_fingerprint,
    parse_prefer,
    parse_progress,
    public_status,
    replay_head,
    status_view,
    strip_prefer,
    view_etag,
)


@pytest.mark.parametrize(("state", "error", "expected"), [
    ("new", None, "queued"),
    ("queued", None, "queued"),
    ("queued", "upstream answered 503", "queued"),  # waiting out a retry's backoff
    ("active", None, "running"),
    ("aborting", None, "running"),
    ("complete", None, "succeeded"),
    ("failed", "boom", "failed"),
    ("aborted", "cancelled by the client", "cancelled"),
    ("aborted", None, "cancelled"),
    ("aborted", SWEPT_ERROR, "failed"),
])
def test_public_status(state: str, error: str | None, expected: str) -> None:
    assert public_status(state, error) == expected


def test_job_ids_round_trip_and_are_unguessable() -> None:
    ids = {str(JobId.new("reports", 5)) for _ in range(1000)}
    assert len(ids) == 1000
    one = next(iter(ids))
    parsed = JobId.parse(one)
    assert parsed is not None
    assert (parsed.queue, parsed.priority) == ("reports", 5)
    assert len(parsed.token) == 24
    assert str(parsed) == one
    assert lane(parsed.queue, parsed.priority) == "sidecar.reports.p5"


@pytest.mark.parametrize("text", [
    "", "reports", "reports.5", "reports.x.aaaaaaaaaaaaaaaaaaaaaaaa",
    "reports.5.short", "reports.5.aaaaaaaaaaaaaaaaaaaaaaaa/x",
    "re:ports.5.aaaaaaaaaaaaaaaaaaaaaaaa",
    "reports.5.aaaaaaaaaaaaaaaaaaaaaaaa.", "../etc.5.aaaaaaaaaaaaaaaaaaaaaaaa",
    "reports.12345.aaaaaaaaaaaaaaaaaaaaaaaa",
])
def test_malformed_ids_are_refused(text: str) -> None:
    assert JobId.parse(text) is None


def test_owner_depends_on_every_credential_line_only() -> None:
    base = [(b"Host", b"a"), (b"Accept", b"*/*")]
    anonymous = owner_fingerprint(base)
    assert owner_fingerprint([(b"Host", b"b")]) == anonymous
    alice = owner_fingerprint([*base, (b"Authorization", b"Bearer alice")])
    assert alice != anonymous
    assert owner_fingerprint([(b"authorization", b"Bearer alice")]) == alice
    assert owner_fingerprint([(b"Authorization", b"Bearer bob")]) != alice
    cookie = owner_fingerprint([(b"Cookie", b"s=1")])
    assert cookie not in (alice, anonymous)
    # Two lines are not one joined line, and the second line counts.
    assert owner_fingerprint([(b"Cookie", b"a=1"), (b"Cookie", b"b=2")]) != owner_fingerprint(
        [(b"Cookie", b"a=1; b=2")])
    assert owner_fingerprint([(b"Cookie", b"a=1"), (b"Cookie", b"b=2")]) != owner_fingerprint(
        [(b"Cookie", b"a=1")])


@pytest.mark.parametrize(("values", "respond_async", "wait"), [
    ([], False, None),
    (["respond-async"], True, None),
    (["Respond-Async, wait=10"], True, 10.0),
    (["wait=5", "wait=50"], False, 5.0),  # the first one wins
    (['wait="7"'], False, 7.0),
    (["wait=-1"], False, None),
    (["wait=1.5"], False, None),
    (["wait=abc, respond-async;foo=bar"], True, None),
    (["return=minimal"], False, None),
    (["wait=٣"], False, None),  # not ASCII digits
])
def test_parse_prefer(values: list[str], respond_async: bool, wait: float | None) -> None:
    preferences = parse_prefer(values)
    assert preferences.respond_async is respond_async
    assert preferences.wait == wait


def test_strip_prefer_keeps_other_preferences() -> None:
    assert strip_prefer(b"respond-async, wait=10") == b""
    assert strip_prefer(b"respond-async, return=minimal; x=1") == b"return=minimal; x=1"
    assert strip_prefer(b"handling=lenient") == b"handling=lenient"


def test_replay_head_reframes_and_adds_the_job_headers() -> None:
    head = (b"POST /api/reports?x=1 HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n"
            b"Prefer: respond-async, return=minimal\r\nX-Sidecar-Job-Id: forged\r\n"
            b"Authorization: Bearer t\r\n\r\n")
    out = replay_head(head, "reports.5." + "a" * 24, "http://127.0.0.1:9901/p", "s3cret", 11)
    lines = out.split(b"\r\n")
    assert lines[0] == b"POST /api/reports?x=1 HTTP/1.1"
    assert out.endswith(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in out
    assert b"Content-Length: 11" in lines
    assert b"Prefer: return=minimal" in lines
    assert b"X-Sidecar-Job-Id: forged" not in lines
    assert lines.count(b"X-Sidecar-Job-Id: reports.5." + b"a" * 24) == 1
    assert b"X-Sidecar-Progress-URL: http://127.0.0.1:9901/p" in lines
    assert b"X-Sidecar-Progress-Token: s3cret" in lines
    assert b"Authorization: Bearer t" in lines


def test_replay_head_without_a_body_has_no_length_and_drops_an_empty_prefer() -> None:
    head = b"GET /r HTTP/1.1\r\nHost: app\r\nPrefer: respond-async\r\nContent-Length: 0\r\n\r\n"
    out = replay_head(head, "q.1." + "b" * 24, "http://x/p", "t", None)
    assert b"Content-Length" not in out
    assert b"Prefer" not in out


@pytest.mark.parametrize(("payload", "expected"), [
    ({"progress": 40}, (40.0, None)),
    ({"progress": 0, "message": "starting"}, (0.0, "starting")),
    ({"progress": 99.5, "message": None}, (99.5, None)),
])
def test_parse_progress(payload: object, expected: tuple[float, str | None]) -> None:
    assert parse_progress(payload) == expected


@pytest.mark.parametrize("payload", [
    None, [], "40", {}, {"progress": "40"}, {"progress": True}, {"progress": -1},
    {"progress": 101}, {"progress": 10, "message": 5}, {"progress": 10, "message": "x" * 1001},
    {"progress": 10, "extra": 1},
])
def test_parse_progress_refuses(payload: object) -> None:
    with pytest.raises(ValueError):
        parse_progress(payload)


def test_client_error_is_the_last_line_without_the_exception_class() -> None:
    trace = ("Traceback (most recent call last):\n  File \"x\", line 1\n"
             "sidecar.jobs.runner.JobFailure: upstream answered 503 Service Unavailable\n")
    assert client_error("failed", trace) == "upstream answered 503 Service Unavailable"
    assert client_error("failed", "Traceback...\nTimeoutError\n") == (
        "the attempt timed out (offload.timeout)")
    assert client_error("failed", SWEPT_ERROR) == SWEPT_ERROR
    assert client_error("cancelled", "whatever") == "cancelled"
    assert client_error("failed", None) is None


def test_status_view() -> None:
    urls = {"status_url": "/j/x"}
    queued = status_view("x", "queued", "earlier failure", attempts=1, queued=1_700_000_000_123,
                         started=0, completed=0, progress=0.0, message=None, urls=urls)
    assert queued["status"] == "queued"
    assert queued["error"] is None  # only a failed or cancelled job has one
    assert queued["created_at"] == "2023-11-14T22:13:20.123Z"
    assert queued["started_at"] is None and queued["finished_at"] is None
    assert queued["status_url"] == "/j/x"
    running = status_view("x", "active", None, attempts=1, queued=1, started=2_000, completed=0,
                          progress=42.25, message="m", urls=urls)
    assert (running["progress"], running["message"]) == (42.2, "m")
    assert running["started_at"] == "1970-01-01T00:00:02.000Z"
    done = status_view("x", "complete", None, attempts=2, queued=1, started=2, completed=3,
                       progress=60.0, message=None, urls=urls)
    assert done["progress"] == 100
    assert done["finished_at"] is not None
    failed = status_view("x", "failed", "a\nsidecar.jobs.runner.JobFailure: upstream answered 502",
                         attempts=3, queued=1, started=2, completed=3, progress=10.0,
                         message=None, urls=urls)
    assert failed["error"] == "upstream answered 502"


def test_iso_time_and_etag() -> None:
    assert iso_time(0) is None
    assert view_etag(b"a") == view_etag(b"a") != view_etag(b"b")
    assert view_etag(b"a").startswith('"') and view_etag(b"a").endswith('"')
