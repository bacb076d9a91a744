"""The access log of a real `sidecar run` process, read from its stdout: one line per request,
secret values redacted, the bytes actually sent for every kind of answer."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
from support import Origin, make_config, until

SECRET = "tok-9f8e7d6c5b4a"


async def test_access_lines_redact_secrets_and_count_bytes(
        sidecar_process: Any, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession) -> None:
    origin.reply("/page", body="x" * 300)
    config = make_config(origin.url, redis_url, log={"access": True,
                                                     "redact": {"query": ["tenant_key"]}},
                         routes=[{"name": "site", "match": {"path": "/**"}, "upstream": "app"}])
    proc = sidecar_process(config)
    targets = [f"/page?token={SECRET}&lang=en", f"/page?tenant_key={SECRET}",
               f"/page?Email=someone%40example.org&API_KEY={SECRET}"]
    for target in targets:
        async with client.get(proc.url + target,
                              headers={"Authorization": f"Bearer {SECRET}"}) as response:
            assert response.status == 200
    async with client.get(proc.url + "/_sidecar/jobs/nope.1.x") as response:
        job_answer = await response.read()
        assert response.status == 404
        assert "Server" not in response.headers  # the sidecar's own answers name no versions

    def lines() -> list[dict[str, Any]]:
        return [line for line in (json.loads(text) for text in proc.logs().splitlines()
                                  if text.startswith("{")) if "duration_ms" in line]

    async def all_written() -> bool:
        return len(lines()) == 4
    await until(all_written)
    logged = lines()
    assert [line["path"] for line in logged[:3]] == [
        "/page?token=<redacted>&lang=en", "/page?tenant_key=<redacted>",
        "/page?Email=<redacted>&API_KEY=<redacted>"]
    assert SECRET not in proc.logs() and "someone" not in proc.logs()
    assert [line["bytes"] for line in logged[:3]] == [300, 300, 300]
    assert logged[3]["route"] == "_jobs" and logged[3]["bytes"] == len(job_answer) > 0
