"""W3C Trace Context without sockets: which incoming traceparents count, what goes upstream."""

from __future__ import annotations

import pytest

from sidecar.core.tracecontext import Parent, parse_traceparent, traceparent, with_trace_headers

TRACE, SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


@pytest.mark.parametrize(("value", "parent"), [
    (f"00-{TRACE}-{SPAN}-01", Parent(TRACE, SPAN, True)),
    (f"00-{TRACE}-{SPAN}-00", Parent(TRACE, SPAN, False)),
    (f" 00-{TRACE.upper()}-{SPAN}-03 ", Parent(TRACE, SPAN, True)),
    (f"01-{TRACE}-{SPAN}-01-future", Parent(TRACE, SPAN, True)),  # a later version's extra
    (f"00-{TRACE}-{SPAN}-01-extra", None),
    (f"ff-{TRACE}-{SPAN}-01", None),
    (f"00-{'0' * 32}-{SPAN}-01", None),
    (f"00-{TRACE}-{'0' * 16}-01", None),
    (f"00-{TRACE[:-1]}-{SPAN}-01", None),
    ("garbage", None),
    (None, None),
])
def test_parse(value: str | None, parent: Parent | None) -> None:
    assert parse_traceparent(value) == parent


def test_the_upstream_gets_the_sidecars_span_as_parent() -> None:
    head = (b"GET /a HTTP/1.1\r\nHost: app\r\ntraceparent: 00-" + TRACE.encode() + b"-"
            + SPAN.encode() + b"-01\r\nTraceState: k=v\r\nAccept: */*\r\n\r\n")
    ours = traceparent(int(TRACE, 16), 0x1234, True)
    assert ours == f"00-{TRACE}-0000000000001234-01"
    out = with_trace_headers(head, ours, "k=v")
    assert out == (b"GET /a HTTP/1.1\r\nHost: app\r\nAccept: */*\r\ntraceparent: "
                   + ours.encode() + b"\r\ntracestate: k=v\r\n\r\n")
    assert with_trace_headers(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", ours, None).count(
        b"traceparent") == 1
