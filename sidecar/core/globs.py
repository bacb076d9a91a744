"""Path and host globs compiled once into the cheapest matcher that does the job.

`*` matches within one path segment, `**` matches any number of segments (including none),
so `/api/**` matches `/api`, `/api/` and `/api/a/b`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

Matcher = Callable[[str], bool]


def _segment_regex(segment: str) -> str:
    return "".join("[^/]*" if ch == "*" else re.escape(ch) for ch in segment)


def glob_to_regex(pattern: str) -> str:
    if not pattern.startswith("/"):
        raise ValueError(f"a path pattern starts with '/', got {pattern!r}")
    segments = pattern.split("/")[1:]
    out = ""
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == "**":
            out += "(?:/.*)?" if last else "(?:/[^/]*)*"
        elif "**" in segment:
            raise ValueError(f"'**' must be a whole path segment, got {pattern!r}")
        else:
            out += "/" + _segment_regex(segment)
    return "^" + out + "$"


def compile_path_glob(pattern: str) -> Matcher:
    if not pattern.startswith("/"):
        raise ValueError(f"a path pattern starts with '/', got {pattern!r}")
    if "*" not in pattern:
        return pattern.__eq__
    if pattern == "/**":
        return lambda path: True
    if pattern.endswith("/**") and "*" not in pattern[:-3]:
        prefix = pattern[:-3]
        prefix_slash = prefix + "/"
        return lambda path: path == prefix or path.startswith(prefix_slash)
    # fullmatch + DOTALL: a percent-decoded newline in the path must neither end the match early
    # (`$` matches before a final newline) nor fail to match `**`.
    return re.compile(glob_to_regex(pattern), re.DOTALL).fullmatch  # type: ignore[return-value]


def compile_host_glob(pattern: str) -> Matcher:
    """`example.com`, `*.example.com` (one label); case-insensitive, port ignored."""
    regex = re.compile(
        "^" + "".join("[^.]+" if ch == "*" else re.escape(ch) for ch in pattern.lower()) + "$"
    )

    def match(host: str) -> bool:
        host = host.lower()
        host = host[:host.find("]") + 1] if host.startswith("[") else host.partition(":")[0]
        return regex.match(host) is not None

    return match
