"""Sending a span of an open file as a response body, zero-copy where possible.

Owns ``send_span``: after a response's headers are out, it moves ``count``
bytes of a file to the client with ``os.sendfile`` (kernel to socket, no
copy through Python), or, where that is impossible, by reading chunks in a
worker thread and writing them through aiohttp. Not here: which span to
send and the headers (serve.py).

Why not ``loop.sendfile`` (what aiohttp's FileResponse uses): uvloop, the
sidecar's loop, does not implement it and aiohttp then copies every byte
through Python. Here the socket is written directly: the transport's own
buffer is drained first (``set_write_buffer_limits(high=0)`` and a drain),
then ``os.sendfile`` runs on the non-blocking socket and, when the socket
is full, the loop is asked to wake us on a duplicate of its descriptor
(asyncio and uvloop both refuse a watcher on a descriptor a transport owns).

Zero-copy needs: ``os.sendfile``, a plain TCP or Unix socket (not TLS: the
bytes must be encrypted in user space), a fixed Content-Length (not chunked)
and no response compression. Otherwise the copy path is used.

Invariants: the response is prepared before this is called, nothing else
writes to the transport meanwhile (aiohttp runs one handler per connection
at a time), and either every byte is sent or ``BodyCutError`` is raised, so
the caller closes the connection and the client sees a short body, never a
silently shorter one followed by the next response.

Known limitations: ``os.sendfile`` runs on the event loop thread; a span
that is not in the page cache makes each call wait for the disk (asyncio's
own sendfile has the same cost). A client that stops reading for
``_IDLE_TIMEOUT_S`` is cut.
"""

from __future__ import annotations

import asyncio
import os
from typing import Final

from aiohttp import web

from sidecar.artifacts.threads import in_thread

_COPY_CHUNK_BYTES: Final = 1024 * 1024
# One sendfile call moves at most what the socket buffer takes; this caps
# the request so a call never asks for more than a 32-bit count.
_MAX_SEND_BYTES: Final = 1 << 30
_IDLE_TIMEOUT_S: Final = 300.0


class BodyCutError(ConnectionError):
    """The body could not be sent in full; the connection must be closed."""


def zero_copy_possible(request: web.BaseRequest, response: web.StreamResponse) -> bool:
    transport = request.transport
    if not hasattr(os, "sendfile") or transport is None or transport.is_closing():
        return False
    if transport.get_extra_info("sslcontext") or transport.get_extra_info("ssl_object"):
        return False
    # Without a fixed length aiohttp frames the body in chunks, which raw
    # socket writes would bypass.
    if response.content_length is None or response.chunked or response.compression:
        return False
    return transport.get_extra_info("socket") is not None


def cut_connection(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """Close a connection mid-body, so the client cannot take it as complete."""
    response.force_close()
    if request.transport is not None:
        request.transport.abort()


async def send_span(
    request: web.BaseRequest,
    response: web.StreamResponse,
    fd: int,
    offset: int,
    count: int,
) -> str:
    """Send bytes ``[offset, offset + count)`` of ``fd``; returns the path taken."""
    if count <= 0:
        return "empty"
    if zero_copy_possible(request, response):
        await _sendfile(request, response, fd, offset, count)
        return "sendfile"
    await _copy(response, fd, offset, count)
    return "copy"


async def _sendfile(
    request: web.BaseRequest,
    response: web.StreamResponse,
    fd: int,
    offset: int,
    count: int,
) -> None:
    transport = request.transport
    assert transport is not None
    await _drain_transport(request, transport)
    out = transport.get_extra_info("socket").fileno()
    waiter = _Writable(asyncio.get_running_loop(), os.dup(out))
    try:
        while count > 0:
            if transport.is_closing():
                raise BodyCutError("client connection closed")
            try:
                sent = os.sendfile(out, fd, offset, min(count, _MAX_SEND_BYTES))
            except BlockingIOError:
                await waiter.wait()
                continue
            except OSError as exc:
                raise BodyCutError(str(exc)) from exc
            if sent == 0:
                raise BodyCutError("file ended before the declared length")
            offset += sent
            count -= sent
    finally:
        waiter.close()


async def _drain_transport(
    request: web.BaseRequest, transport: asyncio.Transport
) -> None:
    """Wait until the transport's buffer (the headers) reached the socket."""
    if transport.get_write_buffer_size() == 0:
        return
    low, high = transport.get_write_buffer_limits()
    transport.set_write_buffer_limits(high=0)
    try:
        async with asyncio.timeout(_IDLE_TIMEOUT_S):
            await request.writer.drain()
    except TimeoutError as exc:
        raise BodyCutError("client stopped reading") from exc
    finally:
        transport.set_write_buffer_limits(high=high, low=low)


class _Writable:
    """Waits for a socket to take more bytes, watching a duplicate descriptor.

    The watch stays registered for the whole body (one registration, not
    one per wait); the callback only completes the current wait.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self._loop = loop
        self._fd = fd
        self._watching = False
        self._ready: asyncio.Future[None] | None = None

    def _wake(self) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)

    async def wait(self) -> None:
        if not self._watching:
            self._loop.add_writer(self._fd, self._wake)
            self._watching = True
        self._ready = self._loop.create_future()
        try:
            async with asyncio.timeout(_IDLE_TIMEOUT_S):
                await self._ready
        except TimeoutError as exc:
            raise BodyCutError("client stopped reading") from exc

    def close(self) -> None:
        if self._watching:
            self._loop.remove_writer(self._fd)
        os.close(self._fd)


async def _copy(response: web.StreamResponse, fd: int, offset: int, count: int) -> None:
    while count > 0:
        size = min(count, _COPY_CHUNK_BYTES)
        chunk = await in_thread(os.pread, fd, size, offset)
        if not chunk:
            raise BodyCutError("file ended before the declared length")
        try:
            await response.write(chunk)
        except OSError as exc:
            raise BodyCutError(str(exc)) from exc
        offset += len(chunk)
        count -= len(chunk)
