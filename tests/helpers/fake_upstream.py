"""A scripted upstream for exact counting and fault injection.

``FakeUpstream`` is a small aiohttp server on 127.0.0.1 that records every
request it receives (method, raw target, header fields in order, body) and
answers with whatever handler the test installs; the default echoes the
request back as JSON. Helpers build the usual shapes: OpenAI and llama.cpp
JSON answers and SSE streams that can be held on events, cut, slowed or
corrupted. ``RawUpstream`` is a bare TCP server for faults aiohttp refuses to
produce (bad header bytes, resets with SO_LINGER 0, silence).

Both run on the test's own event loop, so a test drives them step by step
with asyncio Events instead of sleeps.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Received:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    version: str

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def header_names(self) -> list[str]:
        return [k.lower() for k, _ in self.headers]


class FakeUpstream:
    def __init__(self) -> None:
        self.received: list[Received] = []
        self.handler: Handler = self._echo
        self.request_started = asyncio.Event()
        self.disconnected = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def calls(self) -> int:
        return len(self.received)

    async def _echo(self, request: web.Request) -> web.StreamResponse:
        body = self.received[-1].body
        return web.json_response(
            {
                "method": request.method,
                "target": request.raw_path,
                "headers": self.received[-1].headers,
                "body_sha256": hashlib.sha256(body).hexdigest(),
                "body_len": len(body),
            }
        )

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("User-Agent", "").startswith(("sidecar-health/", "sidecar-poller/")):
            # The sidecar's own probes and state polling: answered, never
            # recorded, so tests count only the requests they made.
            return web.json_response({"status": "ok"})
        body = await request.content.read()
        self.received.append(
            Received(
                request.method,
                request.raw_path,
                [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers],
                body,
                f"{request.version.major}.{request.version.minor}",
            )
        )
        self.request_started.set()
        try:
            return await self.handler(request)
        except asyncio.CancelledError:
            self.disconnected.set()
            raise

    async def start(self) -> FakeUpstream:
        server = web.Server(self._dispatch, handler_cancellation=True)
        self._runner = web.ServerRunner(server, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        assert site._server is not None
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def chat_completion(content: str = "hello", *, model: str = "tiny", finish: str = "stop") -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content},
             "finish_reason": finish}
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }


def sse_event(data: str | dict[str, Any]) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def chat_chunk(i: int, content: str, finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "tiny",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}],
    }


def sse_handler(
    events: Sequence[bytes],
    *,
    before: Callable[[int], Awaitable[None]] | None = None,
    cut_after: int | None = None,
    headers: dict[str, str] | None = None,
) -> Handler:
    """A handler streaming ``events``; awaits ``before(k)`` ahead of event k.

    ``cut_after=n`` closes the connection abruptly after n events, with no
    terminating chunk.
    """

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                     **(headers or {})}
        )
        await resp.prepare(request)
        for k, event in enumerate(events):
            if cut_after is not None and k == cut_after:
                assert request.transport is not None
                request.transport.abort()
                return resp
            if before is not None:
                await before(k)
            await resp.write(event)
        await resp.write_eof()
        return resp

    return handler


class RawUpstream:
    """A TCP server whose connection handling the test writes byte by byte."""

    def __init__(self, script: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]) -> None:
        self.script = script
        self.connections = 0
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def start(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def read_request_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0: the peer sees a TCP reset, not a clean close."""
    sock: socket.socket = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
