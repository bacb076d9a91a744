"""Redaction without sockets: the values of secret parameters and headers, nothing else."""

from __future__ import annotations

import pytest

from sidecar.core.redact import REDACTED, Redactor


@pytest.mark.parametrize(("target", "shown"), [
    ("/a", "/a"),
    ("/a?", "/a?"),
    ("/a?x=1&y=2", "/a?x=1&y=2"),
    ("/a?token=abc&x=1", f"/a?token={REDACTED}&x=1"),
    ("/a?x=1&Access_Token=abc", f"/a?x=1&Access_Token={REDACTED}"),
    ("/a?api%5Fkey=abc", f"/a?api%5Fkey={REDACTED}"),
    ("/a?password=&x=1", "/a?password=&x=1"),            # nothing to hide
    ("/a?token", "/a?token"),
    ("/a?email=a%40b.example&tenant=acme", f"/a?email={REDACTED}&tenant=acme"),
    ("/a?tenant=acme&tenant_token=t", "/a?tenant=acme&tenant_token=t"),  # not a named one
])
def test_targets(target: str, shown: str) -> None:
    assert Redactor().target(target) == shown


def test_names_added_by_the_config_and_headers() -> None:
    redactor = Redactor(query=["tenant_token"], headers=["X-Tenant-Secret"])
    assert redactor.target("/a?tenant_token=t&token=u") == (
        f"/a?tenant_token={REDACTED}&token={REDACTED}")
    assert redactor.header("x-tenant-secret", "v") == REDACTED
    for name in ("Authorization", "cookie", "Set-Cookie", "Proxy-Authorization", "X-Api-Key"):
        assert redactor.header(name, "v") == REDACTED
    assert redactor.header("Accept", "text/html") == "text/html"
