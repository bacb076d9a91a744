"""The client side of raw-socket tests: the responses a connection carried, parsed as they came,
interim (1xx) responses included, since httptools reads each of them as a message of its own."""

from __future__ import annotations

import asyncio

import httptools


class Responses:
    """Responses parsed from a raw connection, in the order they came."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.statuses: list[int] = []
        self.headers: list[dict[str, str]] = []  # lower-cased names, the last value of each
        self.fields: list[list[tuple[bytes, bytes]]] = []  # as sent
        self.bodies: list[bytes] = []
        self.done = 0

    def feed(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.headers.append({})
        self.fields.append([])
        self.bodies.append(b"")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[-1][name.decode().lower()] = value.decode()
        self.fields[-1].append((name, value))

    def on_headers_complete(self) -> None:
        self.statuses.append(self.parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        self.bodies[-1] += body

    def on_message_complete(self) -> None:
        self.done += 1


async def read_responses(reader: asyncio.StreamReader, count: int,
                         timeout: float = 10.0) -> Responses:
    """Read until `count` messages are whole (a 1xx counts as one)."""
    parsed = Responses()
    async with asyncio.timeout(timeout):
        while parsed.done < count:
            chunk = await reader.read(65536)
            assert chunk, f"connection closed after {parsed.done} responses"
            parsed.feed(chunk)
    return parsed


async def read_until_closed(reader: asyncio.StreamReader, timeout: float = 10.0) -> Responses:
    """Read until the server closes the connection: for a body that ends with it."""
    parsed = Responses()
    async with asyncio.timeout(timeout):
        while chunk := await reader.read(65536):
            parsed.feed(chunk)
    return parsed
