"""Content-coding decisions without sockets: what a client accepts, what the sidecar picks."""

from __future__ import annotations

import pytest

from sidecar.core.encoding import DEFAULT_TYPES, accepted, choose, compressible, takes, weak

OFFERED = ("br", "zstd", "gzip")


def test_weights_are_read_with_their_q_values() -> None:
    assert accepted(["gzip;q=0.5, BR", "zstd ; q=0"]) == {"gzip": 0.5, "br": 1.0, "zstd": 0.0}
    assert accepted(["gzip;q=high"]) == {"gzip": 0.0}      # unreadable: accepts nothing
    assert accepted(["gzip;q=7"]) == {"gzip": 1.0}         # clamped to 0..1
    assert accepted([" , ,"]) == {}


@pytest.mark.parametrize(("lines", "chosen"), [
    ([], None),                                   # nothing said: identity
    (["identity"], None),
    (["*"], "br"),
    (["gzip", "br;q=0.9"], "gzip"),               # several lines count together
    (["br;q=0.5, zstd;q=0.5"], "br"),             # a tie goes to the sidecar's order
    (["*;q=0.1, gzip;q=0"], "br"),
    (["x-gzip"], "gzip"),
    (["deflate, compress"], None),                # none the sidecar speaks
])
def test_the_choice(lines: list[str], chosen: str | None) -> None:
    assert choose(lines, OFFERED) == chosen


def test_takes_says_whether_a_stored_coding_may_be_sent_as_it_is() -> None:
    assert takes(["gzip, br"], "br")
    assert not takes(["gzip"], "br")
    assert not takes([], "gzip")                  # no header: decode for this client
    assert not takes(["br;q=0, *"], "br")


def test_a_coded_etag_is_weak() -> None:
    assert weak('"v1"') == 'W/"v1"'
    assert weak('W/"v1"') == 'W/"v1"'


@pytest.mark.parametrize(("media", "expected"), [
    ("text/html; charset=utf-8", True), ("application/json", True),
    ("application/problem+json", True), ("application/atom+xml", True),
    ("image/png", False), ("application/octet-stream", False), (None, False), ("", False),
    ("TEXT/CSS", True),
])
def test_compressible_types(media: str | None, expected: bool) -> None:
    assert compressible(media, DEFAULT_TYPES) is expected
