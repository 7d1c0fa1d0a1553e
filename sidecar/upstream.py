"""The upstream leg: a lean, pooled HTTP/1.1 client on asyncio and httptools.

Owns: connections to one upstream (host and port), keep-alive pooling,
request framing, response parsing, the three timeouts (connect, time to first
byte, idle gap between body chunks) and translating every socket and parser
failure into the ``UpstreamError`` tree. Not here: which replica to use
(the proxy), hop-by-hop hygiene (headers.py), caching and coalescing.

Why not aiohttp's ClientSession: on this proxy's pass-through path it costs
about two thirds of a request's CPU (cookie jars, tracing signals, URL
objects, multidicts we would only copy again). A proxy needs far less: write
the head it was given, relay bytes both ways, and know exactly when a
response ends. ``Upstream.request`` is the one small interface the rest of
the sidecar uses, so the transport can change without touching callers.

Invariants:
- A connection goes back to the pool only after its response ended cleanly
  (message complete, keep-alive, nothing unread); anything else closes it.
- Every response is either read to its end or aborted; ``UpstreamResponse``
  closes its connection when dropped mid-body, so a cancelled client frees
  its upstream request at once.
- There is no total deadline: a live stream may run for hours, as long as no
  gap between chunks exceeds the idle timeout.
- A request is retried once, on a fresh connection, only when a reused idle
  connection failed before any response byte arrived and the body is
  replayable (bytes, not a stream): the keep-alive race in which the
  upstream closed an idle connection just as the request went out, or a
  replica that died while the connection sat idle (the fresh connect then
  fails, which the balancer sees and routes around). POSTs are retried too,
  against RFC 9110 section 9.2.2's advice: an inference request that reached
  an upstream which then vanished without a byte is far more often unread
  than half-done, and a repeat costs a generation, never a wrong answer.
  ``upstream.pool_idle`` (4 s) stays under common upstream keep-alive
  timeouts (llama-server's is 5 s), so the race itself is rare.

Known limitations: plain ``http://`` only (no TLS; inference servers in a pod
listen on loopback or the pod network); no HTTP/2; a response to ``HEAD`` is
read and then its connection closed rather than reused (llhttp, under
httptools, cannot be told that a HEAD response has no body); ``Expect`` and
``Upgrade`` are never sent (the proxy answers 100-continue itself and does
not tunnel WebSockets).
"""

from __future__ import annotations

import asyncio
import collections
import re
import socket
import time
from collections.abc import AsyncIterator
from typing import Final
from urllib.parse import urlsplit

import httptools

from sidecar import log
from sidecar.errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeoutError,
)

# Pause reading from the upstream when this much body is buffered and not yet
# taken by the consumer, so a slow client back-pressures the upstream.
HIGH_WATER_BYTES: Final = 256 * 1024
LOW_WATER_BYTES: Final = 64 * 1024
# A response head larger than this is refused (502): no legitimate inference
# server sends one, and it bounds memory per connection.
MAX_RESPONSE_HEAD_BYTES: Final = 64 * 1024

Headers = list[tuple[bytes, bytes]]
Body = bytes | AsyncIterator[bytes] | None


_CONTROL: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def _is_bad_header_value(value: bytes) -> bool:
    """True when a header value holds a control character (RFC 9110 section 5.5).

    HTAB is allowed; CR, LF, NUL and the other controls are not: relayed,
    they would split or corrupt the client's response head.
    """
    return _CONTROL.search(value) is not None


class _Connection(asyncio.Protocol):
    """One TCP connection to the upstream and the response being parsed on it.

    Event-loop thread only. The parser callbacks fill ``status``, ``headers``
    and the body queue; the consumer waits on ``_waiter``.
    """

    def __init__(self, pool: Upstream) -> None:
        self._pool = pool
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.last_used = time.monotonic()
        self.reused = False
        self._reset_response()
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    def _reset_response(self) -> None:
        self.status = 0
        self.reason = b""
        self.headers: Headers = []
        self.head_done = False
        self.message_done = False
        self.eof_delimited = False
        self.keep_alive = False
        self.received_any = False
        self.error: UpstreamError | None = None
        self._head_bytes = 0
        self._body: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._reading_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.bad_headers = 0

    # -- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; no isinstance.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamProtocolError("upstream switched protocols unasked"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamProtocolError(f"upstream sent invalid HTTP: {exc}"))
        if self._timer is not None and not self.message_done:
            self._arm_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._pool._forget(self)
        if self.message_done:
            return
        if self.head_done and self.eof_delimited and exc is None:
            # RFC 9112 section 6.3 rule 8: no length and not chunked means the
            # body runs until the connection closes.
            self.message_done = True
            self._wake()
            return
        if self.head_done:
            self._fail(UpstreamConnectError("upstream closed the connection mid-body"))
        else:
            self._fail(UpstreamConnectError("upstream closed the connection early"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # -- httptools callbacks -------------------------------------------------

    def on_status(self, status: bytes) -> None:
        self.reason += status
        self._head_bytes += len(status)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > MAX_RESPONSE_HEAD_BYTES:
            raise httptools.HttpParserError("response head too large")
        if _is_bad_header_value(value):
            self.bad_headers += 1
            return
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            # An interim response (103 Early Hints, a stray 100): skip it, the
            # final response follows on the same connection.
            self.reason = b""
            self.headers = []
            return
        self.status = status
        self.head_done = True
        chunked = False
        has_length = False
        for name, value in self.headers:
            lname = name.lower()
            if lname == b"content-length":
                has_length = True
            elif lname == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        self.eof_delimited = not has_length and not chunked
        # Asked here: llhttp resets its flags once the message completes.
        self.keep_alive = self._parser.should_keep_alive()
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER_BYTES and not self._reading_paused:
            assert self.transport is not None
            self.transport.pause_reading()
            self._reading_paused = True
            # The consumer is the slow side now: the idle timeout measures the
            # upstream, so it stops while reading is paused.
            self._cancel_timer()
        self._wake()

    def on_message_complete(self) -> None:
        if not self.head_done:
            return  # the end of an interim 1xx response
        self.message_done = True
        self._cancel_timer()
        self._wake()

    # -- consumer side -------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        self._cancel_timer()
        if self.transport is not None:
            self.transport.close()
        self._wake()

    def _arm_timer(self, timeout_s: float | None = None) -> None:
        self._cancel_timer()
        delay = self._pool.idle_timeout_s if timeout_s is None else timeout_s
        self._timer = self._loop.call_later(delay, self._on_timeout)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timeout(self) -> None:
        self._timer = None
        if self.head_done:
            msg = f"upstream sent nothing for {self._pool.idle_timeout_s:g}s mid-body"
        else:
            msg = (
                f"upstream sent no response within {self._pool.first_byte_timeout_s:g}s"
            )
        self._fail(UpstreamTimeoutError(msg))

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def wait_head(self) -> None:
        self._arm_timer(self._pool.first_byte_timeout_s)
        while not self.head_done and self.error is None:
            await self._wait()
        if self.error is not None:
            raise self.error
        if not self.message_done:
            self._arm_timer()

    async def read(self) -> bytes:
        """The next body chunk, or b"" once the response has ended."""
        while True:
            if self._body:
                chunk = self._body.popleft()
                self._buffered -= len(chunk)
                if self._reading_paused and self._buffered < LOW_WATER_BYTES:
                    self._reading_paused = False
                    if self.transport is not None:
                        self.transport.resume_reading()
                    if not self.message_done:
                        self._arm_timer()
                return chunk
            if self.error is not None:
                raise self.error
            if self.message_done:
                return b""
            await self._wait()

    def take_buffered(self) -> bytes:
        """Everything buffered so far, in one piece (for complete responses)."""
        data = b"".join(self._body)
        self._body.clear()
        self._buffered = 0
        return data

    async def write(self, data: bytes) -> None:
        assert self.transport is not None
        if self.error is not None:
            raise self.error
        self.transport.write(data)
        if self._write_paused:
            self._drain_waiter = self._loop.create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None

    @property
    def reusable(self) -> bool:
        return (
            self.message_done
            and self.error is None
            and not self._body
            and self.transport is not None
            and not self.transport.is_closing()
            and self.keep_alive
        )

    def close(self) -> None:
        self._cancel_timer()
        if self.transport is not None:
            self.transport.close()


class UpstreamResponse:
    """A response head plus its body, read chunk by chunk.

    ``release()`` must be called when the consumer is done (``async with``
    does it); it returns the connection to the pool if the body was read to
    its end, and closes it otherwise.
    """

    __slots__ = (
        "_conn",
        "_counted",
        "_keep",
        "_pool",
        "_released",
        "bad_headers",
        "headers",
        "reason",
        "status",
    )

    def __init__(
        self, conn: _Connection, pool: Upstream, keep: bool, counted: bool = True
    ) -> None:
        self._conn = conn
        self._pool = pool
        self.status = conn.status
        self.reason = conn.reason
        self.headers = conn.headers
        self.bad_headers = conn.bad_headers
        self._released = False
        self._keep = keep
        self._counted = counted

    @property
    def complete(self) -> bool:
        """True when the whole body has arrived (and may still be buffered)."""
        return self._conn.message_done and self._conn.error is None

    def take_buffered(self) -> bytes:
        return self._conn.take_buffered()

    async def read(self) -> bytes:
        return await self._conn.read()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        while chunk := await self._conn.read():
            yield chunk

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        if self._counted:
            self._pool._in_flight -= 1
        conn = self._conn
        if self._keep and conn.reusable:
            self._pool._put_idle(conn)
        else:
            conn.close()

    def abort(self) -> None:
        """Give up on the body: the connection is closed, never reused."""
        self._keep = False
        self.release()

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        if not self._released:
            self._conn.close()


class Upstream:
    """A pool of keep-alive connections to one upstream ``http://host:port``."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout_s: float = 2.0,
        first_byte_timeout_s: float = 300.0,
        idle_timeout_s: float = 60.0,
        pool_size: int = 64,
        pool_idle_s: float = 30.0,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"expected an http:// upstream URL, got {url!r}")
        self.url = url.rstrip("/")
        self.host = parts.hostname
        self.port = parts.port or 80
        default_port = parts.port in (None, 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.authority = host if default_port else f"{host}:{self.port}"
        self.base_path = parts.path.rstrip("/")
        self.connect_timeout_s = connect_timeout_s
        self.first_byte_timeout_s = first_byte_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.pool_size = pool_size
        self.pool_idle_s = pool_idle_s
        # Idle connections, most recently used last. Event-loop thread only.
        self._idle: collections.deque[_Connection] = collections.deque()
        self._open: set[_Connection] = set()
        self._in_flight = 0
        self.connect_failures = 0
        self.closed = False

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def _forget(self, conn: _Connection) -> None:
        self._open.discard(conn)
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    def _put_idle(self, conn: _Connection) -> None:
        if self.closed or len(self._idle) >= self.pool_size:
            conn.close()
            return
        conn.last_used = time.monotonic()
        conn._reset_response()
        self._idle.append(conn)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self), self.host, self.port
                )
        except TimeoutError:
            self.connect_failures += 1
            raise UpstreamTimeoutError(
                f"connecting to the upstream {self.authority} took over"
                f" {self.connect_timeout_s:g}s"
            ) from None
        except OSError as exc:
            self.connect_failures += 1
            raise UpstreamConnectError(
                f"cannot connect to the upstream {self.authority}: {exc.strerror or exc}"
            ) from None
        sock = conn.transport.get_extra_info("socket") if conn.transport else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._open.add(conn)
        return conn

    async def _acquire(self) -> _Connection:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if (
                conn.transport is not None
                and not conn.transport.is_closing()
                and now - conn.last_used < self.pool_idle_s
            ):
                conn.reused = True
                return conn
            conn.close()
        return await self._connect()

    def _encode_head(
        self, method: str, target: str, headers: Headers, framing: bytes
    ) -> bytes:
        lines = [f"{method} {self.base_path}{target} HTTP/1.1\r\n".encode("latin-1")]
        lines.append(b"Host: " + self.authority.encode("idna") + b"\r\n")
        for name, value in headers:
            lines.append(name + b": " + value + b"\r\n")
        lines.append(framing)
        lines.append(b"\r\n")
        return b"".join(lines)

    async def request(
        self,
        method: str,
        target: str,
        headers: Headers,
        body: Body = None,
        *,
        content_length: int | None = None,
        probe: bool = False,
    ) -> UpstreamResponse:
        """Send one request and return once the response head has arrived.

        ``target`` is the raw request target (path and query, percent-encoding
        untouched). ``headers`` must already be free of hop-by-hop fields,
        ``Host`` and framing headers: this method adds ``Host`` and the
        framing (``Content-Length`` for bytes or a known length, chunked
        otherwise). Raises an ``UpstreamError`` subclass on any failure.
        A ``probe`` (the sidecar's own health and identity reads) is left out
        of ``in_flight``, which measures client load for the balancer.
        """
        if self.closed:
            raise UpstreamConnectError("the sidecar is shutting down")
        replayable = body is None or isinstance(body, bytes)
        counted = not probe
        self._in_flight += counted
        try:
            for attempt in (1, 2):
                conn = await self._acquire()
                try:
                    await self._send(conn, method, target, headers, body, content_length)
                    await conn.wait_head()
                except UpstreamError:
                    conn.close()
                    stale = conn.reused and not conn.received_any
                    if attempt == 1 and stale and replayable:
                        log.upstream.debug(
                            "upstream.retry_stale_connection",
                            extra={"upstream": self.authority},
                        )
                        continue
                    raise
                except BaseException:
                    conn.close()
                    raise
                keep = method != "HEAD"
                if method == "HEAD":
                    # No body follows a HEAD response whatever its headers say.
                    conn.message_done = True
                    conn._cancel_timer()
                return UpstreamResponse(conn, self, keep, counted)
            raise AssertionError("unreachable")
        except BaseException:
            self._in_flight -= counted
            raise

    async def _send(
        self,
        conn: _Connection,
        method: str,
        target: str,
        headers: Headers,
        body: Body,
        content_length: int | None,
    ) -> None:
        if body is None:
            framing = b"Content-Length: 0\r\n" if method in ("POST", "PUT", "PATCH") else b""
            await conn.write(self._encode_head(method, target, headers, framing))
            return
        if isinstance(body, bytes):
            framing = b"Content-Length: %d\r\n" % len(body)
            await conn.write(self._encode_head(method, target, headers, framing) + body)
            return
        if content_length is not None:
            await conn.write(
                self._encode_head(
                    method, target, headers, b"Content-Length: %d\r\n" % content_length
                )
            )
            async for chunk in body:
                await conn.write(chunk)
            return
        await conn.write(
            self._encode_head(method, target, headers, b"Transfer-Encoding: chunked\r\n")
        )
        async for chunk in body:
            if chunk:
                await conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        await conn.write(b"0\r\n\r\n")

    async def close(self) -> None:
        """Close every connection; in-flight responses fail as cut."""
        self.closed = True
        for conn in list(self._open):
            conn.close()
        self._idle.clear()
        await asyncio.sleep(0)
