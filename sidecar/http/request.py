"""One HTTP/1.1 request as a data-port handler sees it, and its body.

Owns: ``Request`` (the head's fields, decoded lazily) and ``Body`` (the
request body, chunk by chunk as it arrives, with flow control). Not here:
parsing and the connection (connection.py), responses (response.py).

The names and meanings follow the part of aiohttp's ``BaseRequest`` the
proxy uses, so a handler written for one runs on the other: ``method``,
``raw_path``, ``path``, ``version``, ``headers``, ``raw_headers``,
``content_length``, ``body_exists``, ``can_read_body``, ``content``
(``iter_any()``), ``read()``, ``remote``, ``host``, ``transport``,
``keep_alive`` and ``writer`` (``write``/``drain``, for ``100 Continue``).
``send_continue()`` is the safer way to send that interim response.

Invariants:
- ``raw_path`` is the request target exactly as received (llhttp admits only
  ASCII there), percent-encoding and query untouched.
- Header values are decoded from UTF-8 with ``surrogateescape``, as aiohttp
  does, so ``value.encode("utf-8", "surrogateescape")`` gives the bytes back.
- Body bytes buffered on a connection are counted there; past the high-water
  mark the connection stops reading the socket until the handler catches up.

Known limitations: ``host`` is None when the request has no Host field
(aiohttp would look up the machine's own name, a blocking DNS call, and
report that); there is no ``query``, ``match_info``, ``json()`` or cookie
parsing (the data port forwards targets and bodies untouched).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Final, NamedTuple
from urllib.parse import unquote, urlsplit

from multidict import CIMultiDict, CIMultiDictProxy

if TYPE_CHECKING:
    from sidecar.http.connection import Connection


class HttpVersion(NamedTuple):
    """An HTTP version; compares like aiohttp's ``HttpVersion`` (a tuple)."""

    major: int
    minor: int


HttpVersion10: Final = HttpVersion(1, 0)
HttpVersion11: Final = HttpVersion(1, 1)

_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


class Body:
    """A request body as it arrives; one reader, on the event-loop thread.

    The connection feeds it (``feed``, ``feed_eof``, ``fail``); the handler
    reads it (``iter_any``, ``readany``, ``read``). A chunk leaves the
    connection's buffered count when the handler takes it.
    """

    __slots__ = ("_chunks", "_conn", "_error", "_waiter", "complete", "received")

    def __init__(self, conn: Connection | None) -> None:
        # None only for EMPTY_BODY, which is never fed.
        self._conn: Connection = conn  # type: ignore[assignment]
        self._chunks: collections.deque[bytes] = collections.deque()
        # True once the whole body has arrived (it may still be buffered).
        self.complete = conn is None
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        # Bytes of body that arrived so far (read or not).
        self.received = 0

    # -- the connection's side -----------------------------------------------

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self.received += len(data)
        self._conn.body_buffered(len(data))
        self._wake()

    def feed_eof(self) -> None:
        self.complete = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        """End the body with ``error``: the next read raises it."""
        if not self.complete and self._error is None:
            self._error = error
            self._wake()

    def discard(self) -> None:
        """Drop what is buffered (the handler ended without reading it)."""
        if self._chunks:
            size = sum(len(c) for c in self._chunks)
            self._chunks.clear()
            self._conn.body_buffered(-size)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def whole(self) -> bytes | None:
        """The body in one piece once all of it has arrived, else None.

        Reads nothing: the chunks stay buffered (joined into one) for the
        handler. None too once a reader has taken part of the body.
        """
        if not self.complete or self._error is not None:
            return None
        chunks = self._chunks
        if len(chunks) != 1:
            if not chunks:
                return b"" if self.received == 0 else None
            joined = b"".join(chunks)
            chunks.clear()
            chunks.append(joined)
        body = chunks[0]
        return body if len(body) == self.received else None

    # -- the handler's side --------------------------------------------------

    def at_eof(self) -> bool:
        """True when the body has ended and every chunk has been read."""
        return self.complete and not self._chunks

    async def readany(self) -> bytes:
        """The next chunk as it arrived, or b"" at the end of the body."""
        while not self._chunks:
            if self.complete:
                return b""
            if self._error is not None:
                raise self._error
            self._waiter = self._conn.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunk = self._chunks.popleft()
        self._conn.body_buffered(-len(chunk))
        return chunk

    async def iter_any(self) -> AsyncIterator[bytes]:
        """Every chunk as it arrives, until the body ends."""
        while chunk := await self.readany():
            yield chunk

    async def read(self) -> bytes:
        """The rest of the body, in one piece."""
        parts = []
        while chunk := await self.readany():
            parts.append(chunk)
        return b"".join(parts)


# The body of every request without one: already ended, never fed, so one
# instance serves them all.
EMPTY_BODY: Final = Body(None)


class _RawWriter:
    """``request.writer``: raw bytes to the client, as aiohttp's writer takes.

    Only for what precedes or bypasses the response (``100 Continue``, a
    drain before ``os.sendfile``); response bytes go through the response.
    """

    __slots__ = ("_conn",)

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    async def write(self, data: bytes) -> None:
        self._conn.write(data)
        await self._conn.drain()

    async def drain(self) -> None:
        await self._conn.drain()


class Request:
    """The head of one request, its body, and the connection it came on."""

    # Defaults as class attributes (no __slots__): building a request then
    # sets only the fields of its head.
    _headers: CIMultiDictProxy[str] | None = None
    _read_bytes: bytes | None = None
    _continue_sent = False
    # Bytes of the header fields as counted against the head limit (name,
    # ": ", value, CRLF each); set by the reader.
    field_bytes = 0

    def __init__(
        self,
        conn: Connection,
        method: str,
        raw_path: str,
        version: HttpVersion,
        raw_headers: tuple[tuple[bytes, bytes], ...],
        content_length: int | None,
        chunked: bool,
        keep_alive: bool,
    ) -> None:
        self._conn = conn
        self.method = method
        self.raw_path = raw_path
        self.version = version
        self.raw_headers = raw_headers
        self.content_length = content_length
        self.chunked = chunked
        # Whether the client lets the connection stay open after this one.
        self.keep_alive = keep_alive
        self.content = Body(conn) if chunked or content_length else EMPTY_BODY

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.raw_path[:80]!r}>"

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        if self._headers is None:
            self._headers = CIMultiDictProxy(
                CIMultiDict(
                    [
                        (
                            name.decode("utf-8", "surrogateescape"),
                            value.decode("utf-8", "surrogateescape"),
                        )
                        for name, value in self.raw_headers
                    ]
                )
            )
        return self._headers

    @property
    def path(self) -> str:
        """The target's path, percent-decoded, without the query."""
        target = self.raw_path
        if not target.startswith("/"):
            # Absolute form (``http://host/p``) or ``*`` (OPTIONS).
            target = urlsplit(target).path if "://" in target else target
        return unquote(target.split("?", 1)[0].split("#", 1)[0])

    @property
    def host(self) -> str | None:
        """The Host field as sent, or None when there is none."""
        for name, value in self.raw_headers:
            if len(name) == 4 and name.lower() == b"host":
                return value.decode("utf-8", "surrogateescape")
        return None

    @property
    def remote(self) -> str | None:
        """The peer's IP address."""
        return self._conn.peer

    @property
    def transport(self) -> asyncio.Transport | None:
        """The connection's transport, or None once it is closed."""
        return self._conn.open_transport

    @property
    def writer(self) -> _RawWriter:
        return _RawWriter(self._conn)

    @property
    def body_exists(self) -> bool:
        """True when the request has a body (chunked, or a length over 0)."""
        return self.chunked or bool(self.content_length)

    @property
    def can_read_body(self) -> bool:
        """True while some of the body is still to be read."""
        return self.body_exists and not self.content.at_eof()

    async def read(self) -> bytes:
        """The whole body (what is left of it), kept for later calls."""
        if self._read_bytes is None:
            self._read_bytes = await self.content.read()
        return self._read_bytes

    async def send_continue(self) -> None:
        """Send ``100 Continue`` if the client waits for it; at most once.

        Nothing is sent to an HTTP/1.0 client (RFC 9110 section 15.2), once
        the body has fully arrived, or once the response has started.
        """
        if self._continue_sent or self.version < HttpVersion11:
            return
        self._continue_sent = True
        expect = self.headers.get("Expect")
        if expect is None or expect.lower() != "100-continue":
            return
        if self.content.complete or self._conn.response is not None:
            return
        self._conn.write(_CONTINUE)
        await self._conn.drain()
