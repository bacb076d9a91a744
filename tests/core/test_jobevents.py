"""A job's events without sockets: ids, the resume rule, both framings."""

from __future__ import annotations

import hashlib
import json

from hypothesis import given
from hypothesis import strategies as st

from sidecar.core.jobevents import (
    GONE,
    GONE_DATA,
    STATUS,
    already_seen,
    event_id,
    socket_message,
    sse_frame,
)
from sidecar.core.jobs import view_etag

STATUS_JSON = b'{"id":"work.5.abc","status":"running","progress":40.0,"message":"\xc3\xa9tape"}'


def test_the_id_is_the_status_etag_unquoted() -> None:
    assert f'"{event_id(STATUS_JSON)}"' == view_etag(STATUS_JSON)
    assert event_id(STATUS_JSON) == hashlib.blake2b(STATUS_JSON, digest_size=12).hexdigest()


@given(st.binary(), st.binary())
def test_only_the_same_status_is_already_seen(status: bytes, other: bytes) -> None:
    assert already_seen(status, event_id(status))
    assert already_seen(status, f" {event_id(status)} ")  # as a header value may come
    assert not already_seen(status, None)
    if other != status:
        assert not already_seen(status, event_id(other))


def test_sse_frames() -> None:
    assert sse_frame(STATUS, STATUS_JSON) == (
        b"event: status\nid: " + event_id(STATUS_JSON).encode() + b"\ndata: " + STATUS_JSON
        + b"\n\n")
    assert sse_frame(GONE, GONE_DATA) == b'event: gone\ndata: {"error": "job_not_found"}\n\n'


def test_socket_messages_carry_the_same_event() -> None:
    message = json.loads(socket_message(STATUS, STATUS_JSON))
    assert message == {"event": "status", "id": event_id(STATUS_JSON),
                       "data": json.loads(STATUS_JSON)}
    assert json.loads(socket_message(GONE, GONE_DATA)) == {
        "event": "gone", "data": {"error": "job_not_found"}}
