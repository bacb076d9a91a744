"""The codecs of the `compress` policy, one boundary for zlib, brotli and zstandard: whole
bodies one way or the other, and a compressor for bodies that stream.

brotli is Google's binding and zstandard python-zstandard; both release the GIL while they
work. A streamed body is flushed after every chunk, so that what the upstream has sent reaches
the client at once (a server-sent events stream stays live), at some cost in ratio.
"""

from __future__ import annotations

import zlib
from typing import Protocol

import brotli
import zstandard

ENCODINGS = ("br", "zstd", "gzip")
DEFAULT_LEVELS = {"br": 4, "zstd": 3, "gzip": 6}


class StreamCompressor(Protocol):
    def compress(self, chunk: bytes) -> bytes:
        """The compressed bytes for `chunk`, flushed: all of it can be decoded now."""
        ...

    def finish(self) -> bytes: ...


def compress(encoding: str, data: bytes, level: int) -> bytes:
    if encoding == "gzip":
        return zlib.compress(data, level, wbits=31)
    if encoding == "br":
        return bytes(brotli.compress(data, quality=level))
    if encoding == "zstd":
        return zstandard.ZstdCompressor(level=level).compress(data)
    raise ValueError(f"unknown content coding {encoding!r}")


def decompress(encoding: str, data: bytes, limit: int) -> bytes | None:
    """The decoded body, or None when it cannot be decoded or is over `limit` bytes. Every
    decoder stops one byte past the limit, so that a small body that decodes to gigabytes
    costs no more than `limit` of memory."""
    try:
        if encoding in ("gzip", "x-gzip"):
            out = zlib.decompressobj(wbits=47).decompress(data, limit + 1)  # gzip or zlib
        elif encoding == "br":
            out = bytes(brotli.Decompressor().process(data, output_buffer_limit=limit + 1))
        elif encoding == "zstd":
            out = _zstd_bounded(data, limit + 1)
        else:
            return None
    except (zlib.error, brotli.error, zstandard.ZstdError):
        return None
    return out if len(out) <= limit else None


def _zstd_bounded(data: bytes, most: int) -> bytes:
    """All of `data`'s frames decoded, stopping once `most` bytes are out."""
    parts: list[bytes] = []
    size = 0
    with zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True) as reader:
        while size < most:
            part = reader.read(most - size)
            if not part:
                break
            parts.append(part)
            size += len(part)
    return b"".join(parts)


class _Gzip:
    def __init__(self, level: int) -> None:
        self._z = zlib.compressobj(level, wbits=31)

    def compress(self, chunk: bytes) -> bytes:
        return self._z.compress(chunk) + self._z.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        return self._z.flush(zlib.Z_FINISH)


class _Brotli:
    def __init__(self, level: int) -> None:
        self._b = brotli.Compressor(quality=level)

    def compress(self, chunk: bytes) -> bytes:
        return bytes(self._b.process(chunk)) + bytes(self._b.flush())

    def finish(self) -> bytes:
        return bytes(self._b.finish())


class _Zstd:
    def __init__(self, level: int) -> None:
        self._z = zstandard.ZstdCompressor(level=level).compressobj()

    def compress(self, chunk: bytes) -> bytes:
        return (self._z.compress(chunk)
                + self._z.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))

    def finish(self) -> bytes:
        return self._z.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)


def stream_compressor(encoding: str, level: int) -> StreamCompressor:
    if encoding == "gzip":
        return _Gzip(level)
    if encoding == "br":
        return _Brotli(level)
    if encoding == "zstd":
        return _Zstd(level)
    raise ValueError(f"unknown content coding {encoding!r}")
