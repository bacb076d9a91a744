"""A job's events, without I/O: what the events endpoint sends, as Server-Sent Events or as
WebSocket messages, and where a resumed stream starts (docs/jobs.md, "Events").

Each `status` event carries the job's whole status, the JSON `GET <jobs.path>/<id>` answers, so
a client that missed some events has lost nothing once it has the next one. An event's id is
that JSON's ETag value (without its quotes): the same status has the same id on every instance
and every connection, and no log of events has to be kept in Redis. A client that resumes with
`Last-Event-ID` (a browser's EventSource sends it by itself when it reconnects) is sent the
current status only when it is not the one that id names, then each change after it; the
statuses it missed in between are summed up by the current one.
"""

from __future__ import annotations

from .jobs import view_etag

STATUS = "status"  # the job's status changed: the data is the whole new status
GONE = "gone"  # the job's record expired while the stream was open
GONE_DATA = b'{"error": "job_not_found"}'
KEEPALIVE_COMMENT = b": keep-alive\n\n"  # an SSE comment: no event, keeps proxies from closing


def event_id(status: bytes) -> str:
    """The id of the `status` event whose data is `status`: its ETag, unquoted."""
    return view_etag(status)[1:-1]


def already_seen(status: bytes, last_event_id: str | None) -> bool:
    """Whether a client that resumes with `last_event_id` has this status already."""
    return last_event_id is not None and last_event_id.strip() == event_id(status)


def sse_frame(event: str, data: bytes) -> bytes:
    """One Server-Sent Event; a `status` event carries its id (`event_id`)."""
    if event == STATUS:
        return b"event: status\nid: %s\ndata: %s\n\n" % (event_id(data).encode(), data)
    return b"event: %s\ndata: %s\n\n" % (event.encode(), data)


def socket_message(event: str, data: bytes) -> str:
    """The same event as one WebSocket text message: a JSON object with `event`, `id` (for a
    `status` event) and `data`, the object the SSE event's `data` line carries."""
    if event == STATUS:
        return f'{{"event":"status","id":"{event_id(data)}","data":{data.decode()}}}'
    return f'{{"event":"{event}","data":{data.decode()}}}'
