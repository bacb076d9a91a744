"""The callback rules without sockets: the signature, what an answer means, when to retry."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.core.callbacks import (
    Answer,
    Step,
    judge,
    next_step,
    recheck_delay,
    retry_delay,
    signature,
    signed_material,
)

BODY = b'{"id":"work.5.abc","status":"succeeded"}'


def test_the_signature_is_the_documented_one() -> None:
    # The same value as docs/jobs.md's shell check:
    #   { printf '%s.' 1700000000; cat body.json; } | openssl dgst -sha256 -hmac "$SECRET"
    assert signature("0123456789abcdef-secret", 1700000000, BODY) == (
        "sha256=4aac1c42096bb0400997979031d64322ea6e36546c3762049abb4ac92af8227c")
    assert signed_material(1700000000, BODY) == b"1700000000." + BODY


@given(st.text(min_size=16), st.integers(0, 2**40), st.binary())
def test_the_signature_covers_the_timestamp_and_every_byte(secret: str, timestamp: int,
                                                           body: bytes) -> None:
    signed = signature(secret, timestamp, body)
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    assert signed == "sha256=" + expected.hexdigest()
    assert signature(secret, timestamp + 1, body) != signed
    assert signature(secret, timestamp, body + b" ") != signed


@pytest.mark.parametrize(("status", "answer"), [
    (200, Answer.ACCEPTED), (202, Answer.ACCEPTED), (204, Answer.ACCEPTED),
    (None, Answer.TRANSIENT), (429, Answer.TRANSIENT), (500, Answer.TRANSIENT),
    (502, Answer.TRANSIENT), (503, Answer.TRANSIENT), (599, Answer.TRANSIENT),
    (301, Answer.REFUSED), (302, Answer.REFUSED),  # redirects are not followed
    (400, Answer.REFUSED), (401, Answer.REFUSED), (404, Answer.REFUSED), (410, Answer.REFUSED),
    (100, Answer.REFUSED),
])
def test_what_an_answer_means(status: int | None, answer: Answer) -> None:
    assert judge(status) is answer


@pytest.mark.parametrize(("answer", "attempt", "attempts", "step"), [
    (Answer.ACCEPTED, 1, 5, Step.DELIVERED),
    (Answer.ACCEPTED, 5, 5, Step.DELIVERED),
    (Answer.TRANSIENT, 1, 5, Step.RETRY),
    (Answer.TRANSIENT, 4, 5, Step.RETRY),
    (Answer.TRANSIENT, 5, 5, Step.FAILED),
    (Answer.TRANSIENT, 1, 1, Step.FAILED),
    (Answer.REFUSED, 1, 5, Step.FAILED),
])
def test_the_step_after_an_attempt(answer: Answer, attempt: int, attempts: int,
                                   step: Step) -> None:
    assert next_step(answer, attempt, attempts) is step


def test_the_steps_are_the_metric_outcomes() -> None:
    assert {step.value for step in Step} == {"delivered", "retried", "failed"}


def test_retry_delays_double_up_to_the_cap_with_full_jitter() -> None:
    top = [retry_delay(n, base=2.0, cap=20.0, rand=lambda: 0.999999) for n in range(1, 7)]
    assert [round(d) for d in top] == [2, 4, 8, 16, 20, 20]
    assert retry_delay(3, base=2.0, cap=20.0, rand=lambda: 0.0) == 0.0


@pytest.mark.parametrize(("age", "visibility", "expected"), [
    (0.0, 30.0, 30.0),  # a young job: once per visibility timeout
    (60.0, 30.0, 30.0),
    (400.0, 30.0, 100.0),  # older: a quarter of its age
    (86400.0, 30.0, 300.0),  # at most five minutes
    (0.0, 0.0, 0.1),
])
def test_recheck_delay(age: float, visibility: float, expected: float) -> None:
    assert recheck_delay(age, visibility) == expected
