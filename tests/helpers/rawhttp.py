"""A strict HTTP/1.1 client on a raw socket, for byte-exact assertions.

Requests are written exactly as given (so a test can send framing aiohttp's
client would never produce); responses are parsed with h11, which refuses
anything that is not valid HTTP/1.1, so a proxy cannot hide a framing error
behind a lenient parser.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import h11


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    closed: bool  # the server closed the connection after this response

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name.lower():
                return v
        return None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name.lower()]


async def exchange(port: int, raw: bytes, *, timeout_s: float = 10.0) -> RawResponse:
    """Send ``raw`` bytes and parse exactly one response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        async with asyncio.timeout(timeout_s):
            writer.write(raw)
            await writer.drain()
            conn = h11.Connection(h11.CLIENT)
            # Tell h11 what request it is answering (for HEAD and framing).
            method = raw.split(b" ", 1)[0]
            conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
            status = 0
            headers: list[tuple[str, str]] = []
            body = bytearray()
            closed = False
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    conn.receive_data(data)
                    if not data:
                        closed = True
                    continue
                if isinstance(event, h11.InformationalResponse):
                    continue
                if isinstance(event, h11.Response):
                    status = event.status_code
                    headers = [(k.decode().lower(), v.decode()) for k, v in event.headers]
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    closed = True
                    break
            if not closed:
                try:
                    async with asyncio.timeout(0.5):
                        closed = (await reader.read(1)) == b""
                except TimeoutError:
                    closed = False
            return RawResponse(status, headers, bytes(body), closed)
    finally:
        writer.close()
