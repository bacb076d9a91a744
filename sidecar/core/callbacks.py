"""The rules of job callbacks, without I/O: how a delivery is signed, what an answer means, and
when to try again (docs/jobs.md, "Callbacks").

The signature covers the timestamp and the exact body bytes, `<timestamp>.<body>`, so a
receiver that checks both the MAC and the timestamp's age refuses a recorded delivery replayed
later, as well as one whose body was altered.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Callable
from typing import assert_never

from .retry import backoff_delay

SIGNATURE_HEADER = "X-Sidecar-Signature"
TIMESTAMP_HEADER = "X-Sidecar-Timestamp"
JOB_ID_HEADER = "X-Sidecar-Job-Id"
SCHEME = "sha256="


def signed_material(timestamp: int, body: bytes) -> bytes:
    """What the MAC is computed over: the decimal Unix time, a dot, the body as sent."""
    return b"%d." % timestamp + body


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The `X-Sidecar-Signature` value: `sha256=` and the hex HMAC-SHA256 of the material."""
    mac = hmac.new(secret.encode(), signed_material(timestamp, body), hashlib.sha256)
    return SCHEME + mac.hexdigest()


class Answer(enum.Enum):
    """What one delivery attempt came to."""

    ACCEPTED = "accepted"  # 2xx
    TRANSIENT = "transient"  # no answer (connection, timeout), 429 or 5xx: worth another try
    REFUSED = "refused"  # any other status: the receiver will say the same again


def judge(status: int | None) -> Answer:
    """`status` is None when no response head came back."""
    if status is None or status == 429 or status >= 500:
        return Answer.TRANSIENT
    if 200 <= status < 300:
        return Answer.ACCEPTED
    return Answer.REFUSED


class Step(enum.Enum):
    """What happens to a callback after an attempt; the values are the metric's outcomes."""

    DELIVERED = "delivered"
    RETRY = "retried"
    FAILED = "failed"


OUTCOMES = tuple(step.value for step in Step)  # sidecar_job_callbacks_total{outcome}


def next_step(answer: Answer, attempt: int, attempts: int) -> Step:
    """`attempt` counts from 1; `attempts` is callback.attempts."""
    match answer:
        case Answer.ACCEPTED:
            return Step.DELIVERED
        case Answer.REFUSED:
            return Step.FAILED
        case Answer.TRANSIENT:
            return Step.RETRY if attempt < attempts else Step.FAILED
        case _:
            assert_never(answer)


def retry_delay(attempt: int, *, base: float, cap: float, rand: Callable[[], float]) -> float:
    """Seconds before the attempt after `attempt` (counted from 1): `base` doubled at each
    attempt, capped, with full jitter, as for the job's own retries."""
    return backoff_delay(attempt, base=base, cap=cap, rand=rand)


def recheck_delay(age: float, visibility_timeout: float, cap: float = 300.0) -> float:
    """When to look again at a job that owes a callback but is not over yet. The worker that
    finishes a job sends its callback at once; this look only finds the jobs whose worker died
    between the two (or finished them without telling). Once per visibility timeout for a
    young job, a quarter of its age for an old one (at most `cap`), so a long queue of waiting
    jobs costs Redis little."""
    return max(visibility_timeout, min(age / 4, cap), 0.1)
