"""The rules of offloaded jobs, without I/O: ids, who may see a job, what a client is told, the
`Prefer` header (RFC 7240), and the request head replayed to the upstream."""

from __future__ import annotations

import bisect
import hashlib
import re
import secrets
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

# What a client sees; the queue library's own states map onto these (public_status).
QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    "queued", "running", "succeeded", "failed", "cancelled")
SCHEDULED = "scheduled"  # queued, asked to start later (Prefer: run-at / delay): its view only
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})

# The error a job record carries when its worker stopped answering and no attempt was left.
SWEPT_ERROR = "the worker running this job stopped answering (visibility timeout)"

_LIBRARY_STATES = {
    "new": QUEUED, "queued": QUEUED, "active": RUNNING, "aborting": RUNNING,
    "complete": SUCCEEDED, "failed": FAILED,
}


def public_status(state: str, error: str | None) -> str:
    """queued | running | succeeded | failed | cancelled, from the queue library's state."""
    if state == "aborted":
        return FAILED if error == SWEPT_ERROR else CANCELLED
    return _LIBRARY_STATES.get(state, QUEUED)


# -- ids ----------------------------------------------------------------------------------------

# One spelling per job: no leading zeros in the priority (`work.05.x` is not `work.5.x`).
_ID = re.compile(r"^([A-Za-z0-9_\-]{1,64})\.(0|[1-9]\d{0,3})\.([A-Za-z0-9_\-]{24})$")


@dataclass(frozen=True, slots=True)
class JobId:
    """`<queue>.<priority>.<24 random url-safe characters>`: the random part (144 bits) makes
    it unguessable; the prefix says which Redis list holds the job without a lookup."""

    queue: str
    priority: int
    token: str

    def __str__(self) -> str:
        return f"{self.queue}.{self.priority}.{self.token}"

    @classmethod
    def new(cls, queue: str, priority: int) -> JobId:
        return cls(queue, priority, secrets.token_urlsafe(18))

    @classmethod
    def parse(cls, text: str) -> JobId | None:
        match = _ID.match(text)
        if match is None:
            return None
        return cls(match.group(1), int(match.group(2)), match.group(3))


def lane(queue: str, priority: int) -> str:
    """The queue library's queue for one priority of one configured queue."""
    return f"sidecar.{queue}.p{priority}"


# -- who may see a job --------------------------------------------------------------------------

_CREDENTIALS = frozenset({b"authorization", b"cookie"})


def owner_fingerprint(raw_headers: Iterable[tuple[bytes, bytes]]) -> str:
    """A digest of every Authorization and Cookie line as sent, length-framed so that no two
    different sets of lines give the same input. Anonymous clients all share one value (the
    unguessable id is then what protects a job)."""
    digest = hashlib.sha256(b"sidecar-job-owner\n")
    for name, value in raw_headers:
        lname = name.lower()
        if lname in _CREDENTIALS:
            digest.update(struct.pack("!BI", len(lname), len(value)) + lname + value)
    return digest.hexdigest()


# -- Prefer (RFC 7240) --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Preferences:
    respond_async: bool = False
    wait: float | None = None  # seconds
    run_at: float | None = None  # Unix seconds, from `run-at=<RFC 3339>`
    delay: float | None = None  # seconds, from `delay=<seconds>`
    invalid: str | None = None  # what was wrong with a run-at or delay given

    def start_at(self, now: float) -> float | None:
        """When the client asks the job to start (None: as soon as possible)."""
        if self.run_at is not None:
            return self.run_at
        return None if self.delay is None else now + self.delay


def parse_prefer(values: Iterable[str]) -> Preferences:
    """`respond-async` and `wait=N` from every Prefer line; the first `wait` wins (§2), unknown
    preferences and malformed values are ignored, as the RFC asks."""
    respond_async = False
    wait: float | None = None
    run_at: float | None = None
    delay: float | None = None
    invalid: str | None = None
    for value in values:
        for item in value.split(","):
            token, _, rest = item.partition(";")[0].partition("=")
            name = token.strip().lower()
            text = rest.strip().strip('"')
            if name == "respond-async":
                respond_async = True
            elif name == "wait" and wait is None:
                if text.isascii() and text.isdigit():
                    wait = float(int(text))
            # The sidecar's own preferences (a later start): a value it cannot read is an
            # error the client hears of, not a job run at once against its wish.
            elif name == "run-at" and run_at is None:
                try:
                    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
                    if moment.tzinfo is None:
                        raise ValueError
                    run_at = moment.timestamp()
                except ValueError:
                    invalid = (f"run-at={text!r}: an RFC 3339 time with its offset, e.g. "
                               "run-at=2026-12-07T02:00:00Z")
            elif name == "delay" and delay is None:
                try:
                    delay = float(text)
                    if not 0 <= delay < float("inf"):
                        raise ValueError
                except ValueError:
                    delay = None
                    invalid = f"delay={text!r}: a number of seconds, e.g. delay=300"
    return Preferences(respond_async, wait, run_at, delay, invalid)


def strip_prefer(value: bytes) -> bytes:
    """A Prefer value without the preferences the sidecar honours itself (so that the upstream
    does not also answer asynchronously); b"" when nothing is left."""
    kept = []
    for item in value.split(b","):
        name = item.partition(b";")[0].partition(b"=")[0].strip().lower()
        if name in (b"respond-async", b"wait", b"run-at", b"delay") or not name:
            continue
        kept.append(item.strip())
    return b", ".join(kept)


# -- the replayed request -----------------------------------------------------------------------

_REFRAMED = frozenset({b"content-length", b"transfer-encoding", b"x-sidecar-job-id",
                       b"x-sidecar-progress-url"})


def replay_head(head: bytes, job_id: str, progress_url: str, progress_token: str,
                body_length: int | None) -> bytes:
    """The upstream request head of a job: the client's forwarded head, framed by
    Content-Length (the body was read whole), with the job's id, its progress URL and the
    secret to send there in `X-Sidecar-Progress-Token` (a header, not in the URL: URLs end up
    in logs), without the asynchronous preferences."""
    lines = head.split(b"\r\n")
    out = [lines[0]]
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(b":")
        lname = name.strip().lower()
        if lname in _REFRAMED:
            continue
        if lname == b"prefer":
            value = strip_prefer(value)
            if not value:
                continue
            line = name + b": " + value
        out.append(line)
    if body_length is not None:
        out.append(b"Content-Length: %d" % body_length)
    out.append(b"X-Sidecar-Job-Id: " + job_id.encode("ascii"))
    out.append(b"X-Sidecar-Progress-URL: " + progress_url.encode("ascii"))
    out.append(b"X-Sidecar-Progress-Token: " + progress_token.encode("ascii"))
    return b"\r\n".join(out) + b"\r\n\r\n"


# -- progress reports ---------------------------------------------------------------------------

MAX_MESSAGE = 1000


def parse_progress(payload: object) -> tuple[float, str | None]:
    """`{"progress": 0..100, "message": "..."}` as an upstream posts it; ValueError says what
    is wrong."""
    if not isinstance(payload, Mapping):
        raise ValueError('send a JSON object like {"progress": 40, "message": "step 2 of 5"}')
    progress = payload.get("progress")
    if isinstance(progress, bool) or not isinstance(progress, int | float):
        raise ValueError('"progress" must be a number from 0 to 100')
    if not 0 <= progress <= 100:
        raise ValueError(f'"progress" must be from 0 to 100, got {progress}')
    message = payload.get("message")
    if message is not None and not isinstance(message, str):
        raise ValueError('"message" must be a string')
    if message is not None and len(message) > MAX_MESSAGE:
        raise ValueError(f'"message" may be at most {MAX_MESSAGE} characters')
    unknown = set(payload) - {"progress", "message"}
    if unknown:
        raise ValueError(f"unknown fields: {', '.join(sorted(map(str, unknown)))}")
    return float(progress), message


# -- what a client is told ----------------------------------------------------------------------


def iso_time(millis: int) -> str | None:
    """An RFC 3339 UTC time from epoch milliseconds; None for 0 (not happened yet)."""
    if not millis:
        return None
    seconds, ms = divmod(int(millis), 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ms:03d}Z"


def client_error(status: str, error: str | None) -> str | None:
    """The last line of what went wrong, not a worker's traceback."""
    if status == CANCELLED:
        return "cancelled"
    if not error:
        return None
    lines = [line for line in error.strip().splitlines() if line.strip()]
    last = lines[-1].strip() if lines else error.strip()
    if last in ("TimeoutError", "asyncio.exceptions.TimeoutError", "builtins.TimeoutError"):
        return "the attempt timed out (offload.timeout)"
    # `sidecar.jobs.JobFailure: upstream answered 503` -> `upstream answered 503`
    prefix, sep, rest = last.partition(": ")
    if sep and "." in prefix and " " not in prefix:
        return rest
    return last


def status_view(job_id: str, state: str, error: str | None, *, attempts: int, queued: int,
                started: int, completed: int, progress: float, message: str | None,
                urls: Mapping[str, str], run_at: float = 0,
                now: float | None = None) -> dict[str, Any]:
    """The JSON body of `GET <jobs path>/<id>`. A queued job asked to start later (`run_at`,
    Unix seconds) is `scheduled` until then."""
    status = public_status(state, error)
    if status == QUEUED and run_at and run_at > (time.time() if now is None else now):
        status = SCHEDULED
    if status == SUCCEEDED:
        progress = 100.0
    view: dict[str, Any] = {
        "id": job_id,
        "status": status,
        "progress": int(progress) if progress == int(progress) else round(progress, 1),
        "message": message,
        "attempts": attempts,
        "created_at": iso_time(queued),
        "started_at": iso_time(started) if status not in (QUEUED, SCHEDULED) else None,
        "finished_at": iso_time(completed) if status in TERMINAL else None,
        "error": client_error(status, error) if status in (FAILED, CANCELLED) else None,
    }
    if run_at:
        view["run_at"] = iso_time(round(run_at * 1000))
    view.update(urls)
    return view


def view_etag(body: bytes) -> str:
    return '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'


# Upper bounds (seconds) of the job-duration histogram; the queue's stats hash keeps one counter
# per slot (the last for longer ones), exported as sidecar_job_duration_seconds.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                    1800.0, 3600.0)


def duration_bucket(seconds: float) -> int:
    return bisect.bisect_left(DURATION_BUCKETS, seconds)


# -- listing and bulk operations (admin) --------------------------------------------------------

PUBLIC_STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)


@dataclass(frozen=True)
class JobFilter:
    """Which jobs an admin listing or bulk operation takes: each field None for any. Times
    in Unix ms, `since` inclusive, `until` exclusive, on the job's creation."""

    statuses: frozenset[str] | None = None
    queues: frozenset[str] | None = None
    route: str | None = None
    since: int | None = None
    until: int | None = None

    def matches(self, status: str, queue: str, route: str | None, created: int) -> bool:
        return ((self.statuses is None or status in self.statuses)
                and (self.queues is None or queue in self.queues)
                and (self.route is None or route == self.route)
                and (self.since is None or created >= self.since)
                and (self.until is None or created < self.until))

    def describe(self) -> str:
        """The filter in words for an audit line: `status=failed queue=reports`, or `all`."""
        parts = []
        if self.statuses is not None:
            parts.append("status=" + ",".join(sorted(self.statuses)))
        if self.queues is not None:
            parts.append("queue=" + ",".join(sorted(self.queues)))
        for name in ("route", "since", "until"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={value}")
        return " ".join(parts) or "all"


def parse_filter(fields: Mapping[str, Any], known_queues: Iterable[str], *,
                 default_status: str | None = None,
                 allowed: Iterable[str] = PUBLIC_STATUSES) -> JobFilter:
    """A JobFilter from query parameters or a JSON body: `status` (one, or several comma
    separated, or `any`), `queue`, `route`, `since`, `until` (RFC 3339, or Unix seconds).
    ValueError says what is wrong and what is accepted."""
    allowed = tuple(allowed)
    unknown = set(fields) - {"status", "queue", "route", "since", "until", "limit", "cursor"}
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(sorted(unknown))}; filters: status, "
                         "queue, route, since, until")
    status_text = fields.get("status", default_status)
    statuses = None
    if status_text is not None and status_text != "any":
        wanted = {s.strip() for s in str(status_text).split(",") if s.strip()}
        wrong = wanted - set(allowed)
        if not wanted or wrong:
            raise ValueError(f"status {status_text!r}: one or more of {', '.join(allowed)}"
                             + (", or any" if len(allowed) == len(PUBLIC_STATUSES) else ""))
        statuses = frozenset(wanted)
    elif status_text == "any" and len(allowed) < len(PUBLIC_STATUSES):
        statuses = frozenset(allowed)
    queues = None
    if fields.get("queue") is not None:
        known = list(known_queues)
        if fields["queue"] not in known:
            raise ValueError(f"unknown queue {fields['queue']!r}; known: {', '.join(known)}")
        queues = frozenset({str(fields["queue"])})
    route = fields.get("route")
    return JobFilter(statuses, queues, None if route is None else str(route),
                     _time_ms(fields.get("since"), "since"), _time_ms(fields.get("until"), "until"))


def _time_ms(value: Any, name: str) -> int | None:
    if value is None:
        return None
    text = str(value).strip()
    try:
        return round(float(text) * 1000)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{name} {text!r}: an RFC 3339 time (2026-12-07T02:00:00Z) or Unix "
                         "seconds") from None
    if moment.tzinfo is None:
        raise ValueError(f"{name} {text!r}: give the offset (Z for UTC)")
    return round(moment.timestamp() * 1000)


def page(items: list[tuple[int, str]], limit: int, cursor: str | None
         ) -> tuple[list[tuple[int, str]], str | None]:
    """Newest first: `items` are (created ms, job id); the page after `cursor` (what the previous
    page returned as `next`), and the cursor of the page after it (None at the end). A cursor
    names the last job shown, so jobs created meanwhile do not shift the pages."""
    ordered = sorted(items, reverse=True)
    if cursor is not None:
        created_text, _, key = cursor.partition("~")
        if not created_text.isdigit() or not key:
            raise ValueError("cursor: pass back the `next` of the previous page as it came")
        after = (int(created_text), key)
        ordered = [item for item in ordered if item < after]
    shown = ordered[:limit]
    more = len(ordered) > limit
    return shown, (f"{shown[-1][0]}~{shown[-1][1]}" if more and shown else None)
