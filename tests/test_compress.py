"""The `compress` policy end to end: a real upstream, real clients that decode what they get
with the real codecs, the cache in front storing one compressed entry."""

from __future__ import annotations

import asyncio
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import brotli
import pytest
import zstandard
from aiohttp import web
from support import Origin, make_config, until, write_config
from test_metrics import scrape, total

from sidecar.compression import compress, decompress
from sidecar.config import ConfigError, load_config

TEXT = ("The sidecar compresses what its upstream sends, once. " * 200).encode()


def decode(encoding: str | None, data: bytes) -> bytes:
    if encoding == "gzip":
        return zlib.decompress(data, wbits=31)
    if encoding == "br":
        return bytes(brotli.decompress(data))
    if encoding == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    assert encoding is None
    return data


def config(origin: Origin, redis_url: str, *, cache: bool = False,
           **compress: Any) -> dict[str, Any]:
    route: dict[str, Any] = {"name": "site", "match": {"path": "/**"}, "upstream": "app",
                             "compress": compress}
    if cache:
        route["cache"] = {"ttl": "60s"}
    return make_config(origin.url, redis_url, routes=[route])


async def get(client: aiohttp.ClientSession, url: str, accept: str | None
              ) -> tuple[aiohttp.ClientResponse, bytes]:
    """`accept` None sends no Accept-Encoding at all (aiohttp adds its own otherwise)."""
    headers = {"Accept-Encoding": accept} if accept is not None else {}
    skip = () if accept is not None else ("Accept-Encoding",)
    async with client.get(url, headers=headers, skip_auto_headers=skip) as response:
        return response, await response.read()


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
async def test_each_coding_decodes_to_the_upstreams_bytes(
        sidecar_factory: Any, origin: Origin, redis_url: str, client: aiohttp.ClientSession,
        encoding: str) -> None:
    origin.reply("/page", body=TEXT.decode(), headers={"Content-Type": "text/html",
                                                       "ETag": '"v1"'})
    sidecar = await sidecar_factory(config(origin, redis_url))
    response, body = await get(client, sidecar.url + "/page", encoding)
    assert response.headers["Content-Encoding"] == encoding
    assert decode(encoding, body) == TEXT and len(body) < len(TEXT) // 10
    assert response.headers["Vary"] == "Accept-Encoding"
    assert response.headers["ETag"] == 'W/"v1"'       # not the upstream's bytes any more
    assert int(response.headers["Content-Length"]) == len(body)


@pytest.mark.parametrize(("accept", "chosen"), [
    ("gzip, deflate, br, zstd", "br"),           # the policy's order breaks ties
    ("gzip;q=1, br;q=0.5", "gzip"),              # the client's weights first
    ("br;q=0, *", "zstd"),                       # refused by name, the rest by *
    ("x-gzip", "gzip"),
    ("identity", None),
    ("gzip;q=0, br;q=0, zstd;q=0", None),
    (None, None),                                # a client that says nothing decodes nothing
])
async def test_the_coding_follows_accept_encoding(
        sidecar_factory: Any, origin: Origin, redis_url: str, client: aiohttp.ClientSession,
        accept: str | None, chosen: str | None) -> None:
    origin.reply("/page", body=TEXT.decode(), headers={"Content-Type": "application/json"})
    sidecar = await sidecar_factory(config(origin, redis_url))
    response, body = await get(client, sidecar.url + "/page", accept)
    assert response.headers.get("Content-Encoding") == chosen
    assert decode(chosen, body) == TEXT


async def test_what_is_not_compressed(
        sidecar_factory: Any, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession) -> None:
    origin.reply("/small", body="tiny", headers={"Content-Type": "text/plain"})
    origin.reply("/image", body=TEXT.decode(), headers={"Content-Type": "image/png"})
    origin.reply("/keep", body=TEXT.decode(), headers={"Content-Type": "text/plain",
                                                       "Cache-Control": "no-transform"})
    gzipped = zlib.compress(TEXT, 9, wbits=31)

    async def already(request: web.Request, n: int) -> web.Response:
        return web.Response(body=gzipped, headers={"Content-Type": "text/plain",
                                                   "Content-Encoding": "gzip"})
    origin.script("/already", already)
    sidecar = await sidecar_factory(config(origin, redis_url, min_size="1KiB"))
    for path in ("/small", "/image", "/keep"):
        response, _ = await get(client, sidecar.url + path, "br, gzip")
        assert "Content-Encoding" not in response.headers, path
    response, body = await get(client, sidecar.url + "/already", "gzip, br")
    assert response.headers["Content-Encoding"] == "gzip" and body == gzipped  # not twice
    response, body = await get(client, sidecar.url + "/already", "identity")
    assert "Content-Encoding" not in response.headers and body == TEXT  # decoded for it


async def test_a_cached_entry_is_compressed_once_and_served_to_every_client(
        sidecar_factory: Any, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession) -> None:
    origin.reply("/p", body=TEXT.decode(), headers={"Content-Type": "text/html",
                                                    "Cache-Control": "max-age=60"})
    sidecar = await sidecar_factory(config(origin, redis_url, cache=True))
    first, body = await get(client, sidecar.url + "/p", "gzip, br")
    assert first.headers["Content-Encoding"] == "br" and decode("br", body) == TEXT
    for _ in range(10):
        response, body = await get(client, sidecar.url + "/p", "br")
        assert "hit" in response.headers["Cache-Status"]
        assert response.headers["Content-Encoding"] == "br" and decode("br", body) == TEXT
    for accept in ("identity", None, "gzip"):   # they take no br: decoded for them
        response, body = await get(client, sidecar.url + "/p", accept)
        assert "hit" in response.headers["Cache-Status"]
        assert "Content-Encoding" not in response.headers and body == TEXT
        assert response.headers["Vary"] == "Accept-Encoding"
    assert origin.calls["/p"] == 1
    samples = await scrape(sidecar.admin_url)
    assert total(samples, "sidecar_compress_total", route="site", result="compressed") == 1
    assert total(samples, "sidecar_compress_total", route="site", result="sent") == 11
    assert total(samples, "sidecar_compress_total", route="site", result="decompressed") == 3


async def test_an_identity_client_first_still_leaves_a_compressed_entry(
        sidecar_factory: Any, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession) -> None:
    origin.reply("/p", body=TEXT.decode(), headers={"Content-Type": "text/html",
                                                    "Cache-Control": "max-age=60"})
    sidecar = await sidecar_factory(config(origin, redis_url, cache=True,
                                           encodings=["zstd", "gzip"]))
    response, body = await get(client, sidecar.url + "/p", None)
    assert "Content-Encoding" not in response.headers and body == TEXT
    response, body = await get(client, sidecar.url + "/p", "zstd")
    assert response.headers["Content-Encoding"] == "zstd" and decode("zstd", body) == TEXT
    assert origin.calls["/p"] == 1


async def test_a_streamed_response_is_compressed_as_it_streams(
        sidecar_factory: Any, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession) -> None:
    gate = asyncio.Event()

    async def stream(request: web.Request, n: int) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: one\n\n" * 200)
        await gate.wait()              # the client decodes the first part before this exists
        await response.write(b"data: two\n\n")
        await response.write_eof()
        return response
    origin.script("/events", stream)
    sidecar = await sidecar_factory(config(origin, redis_url))
    decoder = zlib.decompressobj(wbits=31)
    decoded = b""
    async with client.get(sidecar.url + "/events",
                          headers={"Accept-Encoding": "gzip"}) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        assert response.headers.get("Transfer-Encoding") == "chunked"

        async def first_part() -> bool:
            nonlocal decoded
            decoded += decoder.decompress(await response.content.readany())
            return decoded == b"data: one\n\n" * 200
        await until(first_part)
        gate.set()
        decoded += decoder.decompress(await response.read()) + decoder.flush()
    assert decoded == b"data: one\n\n" * 200 + b"data: two\n\n"


def test_bad_compress_settings_are_located(tmp_path: Path) -> None:
    raw = make_config("http://127.0.0.1:1", "redis://127.0.0.1:1/0", routes=[
        {"name": "site", "match": {"path": "/**"}, "upstream": "app",
         "compress": {"encodings": ["gzip", "deflate"], "levels": {"br": 12}}}])
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(tmp_path / "config.yaml", raw))
    text = str(caught.value)
    assert "compress.encodings" in text and "deflate" in text
    assert "compress.levels" in text and "br level 12: from 0 to 11" in text


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
def test_decoding_stops_at_its_limit(encoding: str) -> None:
    bomb = compress(encoding, b"\0" * (32 * 1024**2), 1)   # 32 MiB in a few KiB
    assert len(bomb) < 256 * 1024
    assert decompress(encoding, bomb, 1024**2) is None
    assert decompress(encoding, bomb, 32 * 1024**2) == b"\0" * (32 * 1024**2)
    assert decompress(encoding, b"not " + encoding.encode(), 1024) is None
