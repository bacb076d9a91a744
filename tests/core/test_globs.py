"""Path and host globs (sidecar.core.globs): `*` one segment, `**` any number, hosts by label."""

from __future__ import annotations

import pytest

from sidecar.core.globs import compile_host_glob, compile_path_glob


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        # literal patterns match exactly
        ("/health", "/health", True),
        ("/health", "/health/", False),
        ("/health", "/healthz", False),
        ("/health", "/HEALTH", False),
        # `*` stays within one segment
        ("/api/*", "/api/x", True),
        ("/api/*", "/api/x/y", False),
        ("/api/*", "/api", False),
        ("/api/*/items", "/api/7/items", True),
        ("/api/*/items", "/api/7/8/items", False),
        ("/files/*.json", "/files/a.json", True),
        ("/files/*.json", "/files/a.jsonx", False),
        ("/files/*.json", "/files/d/a.json", False),
        ("/v*/x", "/v2/x", True),
        ("/v*/x", "/w2/x", False),
        # `**` as the last segment: the prefix itself, with a slash, and anything below it
        ("/api/**", "/api", True),
        ("/api/**", "/api/", True),
        ("/api/**", "/api/a/b/c", True),
        ("/api/**", "/apix", False),
        ("/api/**", "/ap", False),
        ("/api/**", "/other/api/x", False),
        ("/**", "/", True),
        ("/**", "/anything/at/all", True),
        # `**` in the middle: zero or more whole segments
        ("/a/**/b", "/a/b", True),
        ("/a/**/b", "/a/x/b", True),
        ("/a/**/b", "/a/x/y/z/b", True),
        ("/a/**/b", "/a/xb", False),
        ("/a/**/b", "/a/b/c", False),
        ("/a/**/b", "/x/a/b", False),
        # `*` and `**` together (the regex path, not the prefix fast path)
        ("/*/v1/**", "/tenant/v1", True),
        ("/*/v1/**", "/tenant/v1/a/b", True),
        ("/*/v1/**", "/tenant/v1x", False),
        ("/*/v1/**", "/a/b/v1/c", False),
        # regex metacharacters in a pattern are literal
        ("/a.b/*", "/a.b/c", True),
        ("/a.b/*", "/axb/c", False),
        ("/p+q/(x)/*", "/p+q/(x)/1", True),
        ("/p+q/(x)/*", "/ppq/x/1", False),
    ],
)
def test_path_glob(pattern: str, path: str, expected: bool) -> None:
    assert bool(compile_path_glob(pattern)(path)) is expected


@pytest.mark.parametrize(
    ("pattern", "path"),
    [
        ("/files/*.json", "/files/a.json\n"),
        ("/*/v1/**", "/t/v1/a\nb"),
        ("/a/**/b", "/a/b\n"),
    ],
)
def test_path_glob_newlines_do_not_slip_through(pattern: str, path: str) -> None:
    # aiohttp percent-decodes the path, so `%0A` reaches the matcher as a real newline: `$`
    # alone would match before it, and `.` alone would not match it.
    expected = pattern == "/*/v1/**"
    assert bool(compile_path_glob(pattern)(path)) is expected


@pytest.mark.parametrize("pattern", ["api/**", "", "*", "/a**", "/a/**b", "/**x/y"])
def test_invalid_path_patterns_are_refused(pattern: str) -> None:
    with pytest.raises(ValueError):
        compile_path_glob(pattern)


@pytest.mark.parametrize(
    ("pattern", "host", "expected"),
    [
        ("example.com", "example.com", True),
        ("example.com", "EXAMPLE.com", True),
        ("example.com", "example.com:8080", True),
        ("example.com", "www.example.com", False),
        ("example.com", "example.com.evil.net", False),
        ("example.com", "examplexcom", False),
        ("*.example.com", "api.example.com", True),
        ("*.example.com", "API.Example.COM:443", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "a.b.example.com", False),
        ("*.example.com", "api.example.org", False),
        ("Api.*.Example.com", "api.eu.example.com", True),
        ("[::1]", "[::1]:8080", True),
        ("[::1]", "[::2]:8080", False),
        ("localhost", "", False),
    ],
)
def test_host_glob(pattern: str, host: str, expected: bool) -> None:
    assert compile_host_glob(pattern)(host) is expected
