"""Zero-copy bodies (sendfile.py) on asyncio and uvloop, and the copy fallback."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
import uvloop
from aiohttp import web

from sidecar.artifacts import Artifacts
from sidecar.artifacts.sendfile import BodyCutError, cut_connection, send_span
from tests.artifacts.conftest import (
    listening,
    pattern_bytes,
    quick_options,
    serving,
    write_file,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def _app(handler: Handler) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get("/", handler)
    async with listening(web.AppRunner(app)) as base:
        yield base + "/"


class _SendfileSpy:
    """Counts what os.sendfile moved and how often the socket was full."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.moved = 0
        self.full = 0
        self._real = os.sendfile
        monkeypatch.setattr(os, "sendfile", self)

    def __call__(self, out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        try:
            sent = self._real(out_fd, in_fd, offset, count)
        except BlockingIOError:
            self.full += 1
            raise
        self.moved += sent
        return sent


def test_sendfile_on_uvloop_whole_file_zero_copy(
    models_dir: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under uvloop (no loop.sendfile) the body still goes through os.sendfile."""
    data = pattern_bytes(16 * 1024 * 1024)
    digest = write_file(models_dir, "m.bin", data)
    spy = _SendfileSpy(monkeypatch)

    async def scenario() -> bytes:
        artifacts = Artifacts(
            dirs=[str(models_dir)], data_dir=data_dir, options=quick_options()
        )
        async with (
            serving(artifacts) as served,
            aiohttp.ClientSession() as client,
            client.get(served.by_hash(digest)) as resp,
        ):
            return await resp.read()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(scenario()) == data
    assert spy.moved == len(data)
    assert spy.full >= 1  # the socket filled up and the wait-for-writable path ran


async def test_send_span_full_socket_every_byte_arrives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body larger than the socket buffers arrives whole, waiting for writability."""
    data = pattern_bytes(32 * 1024 * 1024)
    (tmp_path / "big").write_bytes(data)
    spy = _SendfileSpy(monkeypatch)

    async def handler(request: web.Request) -> web.StreamResponse:
        fd = os.open(tmp_path / "big", os.O_RDONLY)
        try:
            resp = web.StreamResponse()
            resp.content_length = len(data)
            await resp.prepare(request)
            assert await send_span(request, resp, fd, 0, len(data)) == "sendfile"
            return resp
        finally:
            os.close(fd)

    got = bytearray()
    async with (
        _app(handler) as url,
        aiohttp.ClientSession() as client,
        client.get(url) as resp,
    ):
        async for chunk in resp.content.iter_chunked(64 * 1024):
            got += chunk
    assert bytes(got) == data
    assert spy.full >= 1


async def test_send_span_chunked_response_uses_copy(tmp_path: Path) -> None:
    """Without a fixed length (chunked framing) the span is copied, framed correctly."""
    (tmp_path / "f").write_bytes(b"0123456789" * 1000)
    paths: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        fd = os.open(tmp_path / "f", os.O_RDONLY)
        try:
            resp = web.StreamResponse()
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            paths.append(await send_span(request, resp, fd, 5, 9990))
            await resp.write_eof()
            return resp
        finally:
            os.close(fd)

    async with (
        _app(handler) as url,
        aiohttp.ClientSession() as client,
        client.get(url) as resp,
    ):
        assert await resp.read() == (b"0123456789" * 1000)[5:9995]
    assert paths == ["copy"]


async def test_send_span_file_shorter_than_length_cuts(tmp_path: Path) -> None:
    """A file that ends early raises BodyCutError; the client sees a cut body."""
    (tmp_path / "short").write_bytes(b"x" * 50)
    raised: list[BaseException] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        fd = os.open(tmp_path / "short", os.O_RDONLY)
        resp = web.StreamResponse()
        resp.content_length = 100
        try:
            await resp.prepare(request)
            await send_span(request, resp, fd, 0, 100)
        except BodyCutError as exc:
            raised.append(exc)
            cut_connection(request, resp)
        finally:
            os.close(fd)
        return resp

    async with (
        _app(handler) as url,
        aiohttp.ClientSession() as client,
        client.get(url) as resp,
    ):
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert len(raised) == 1
