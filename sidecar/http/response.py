"""Responses on the data port: the head, the framing and the body writes.

Owns: ``StreamResponse`` (head first, then the body in pieces),
``Response`` (head and whole body in one write), the framing rules, the
cached ``Date`` value and the bytes of the server's own error answers. Not
here: when a connection closes or takes the next request (connection.py).

The names follow the part of aiohttp's API the proxy uses (``status``,
``reason``, ``headers``, ``content_length``, ``content_type``,
``prepare()``, ``write()``, ``write_eof()``, ``force_close()``,
``prepared``, ``keep_alive``, ``enable_chunked_encoding()``), so a handler
written for aiohttp's responses runs unchanged.

Framing (RFC 9112 section 6, RFC 9110 sections 6.4.1 and 8.6), chosen once
in ``prepare``:
- no body, whatever was written, for HEAD, 1xx, 204 and 304; Content-Length
  is removed for 1xx and 204 and kept as given for HEAD and 304 (both may
  announce the length a GET would have had); Transfer-Encoding is removed;
- otherwise ``Content-Length`` when the length is known (``Response``
  always knows it), chunked on HTTP/1.1, and on HTTP/1.0 a body delimited
  by closing the connection;
- ``Date`` is added when absent; nothing else is (no ``Server``, no default
  ``Content-Type``), so the proxy stays transparent. What the server adds
  (framing, Date, Connection) goes into the head, not into ``headers``;
- ``Connection: close`` is sent whenever the connection will close after
  this response, ``Connection: keep-alive`` to an HTTP/1.0 client that keeps
  it open. A ``Connection`` field from the handler is replaced (``close`` in
  it is honoured).

Invariants: a response never sends more body than its Content-Length
(extra bytes are cut, as aiohttp does), and one that sent fewer closes the
connection, so the client sees a short body, never a desynchronised one.
Header fields with CR or LF are refused (``ValueError``) before any byte is
written. The status line always says ``HTTP/1.1`` (RFC 9110 section 6.2).

Known limitations: no compression, cookies or ``text=`` bodies (the proxy
relays bytes); a ``Content-Length`` given to ``Response`` is replaced by
the body's real length, except for HEAD and 304 with an empty body.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, Final

from multidict import CIMultiDict

from sidecar.errors import ErrorCode, error_body
from sidecar.http.request import HttpVersion11, Request

if TYPE_CHECKING:
    from sidecar.http.connection import Connection

HeadersArg = Mapping[str, str] | Iterable[tuple[str, str]] | CIMultiDict[str] | None

REASONS: Final = {s.value: s.phrase for s in HTTPStatus}
_NO_LENGTH_STATUSES: Final = frozenset({204, *range(100, 200)})
_NO_BODY_STATUSES: Final = frozenset({204, 304, *range(100, 200)})


# How a body is delimited (plain ints: compared once per write).
_UNSET: Final = 0
_LENGTH: Final = 1
_CHUNKED: Final = 2
_CLOSE: Final = 3  # HTTP/1.0 without a length: the body ends with the connection
_EMPTY: Final = 4  # HEAD, 1xx, 204, 304: no body whatever is written


_date_second = -1
_date_value = ""


def http_date() -> str:
    """The current time as an HTTP date, formatted at most once a second."""
    global _date_second, _date_value
    now = int(time.time())
    if now != _date_second:
        _date_value = formatdate(now, usegmt=True)
        _date_second = now
    return _date_value


def _reason_for(status: int, reason: str | None) -> str:
    """The reason phrase to send; ``ValueError`` if a given one has CR or LF."""
    if reason is None:
        return REASONS.get(status, "")
    if "\r" in reason or "\n" in reason:
        raise ValueError("CR or LF in the response reason")
    return reason


def encode_head(
    status: int, reason: str, headers: CIMultiDict[str], framing: str = ""
) -> bytes:
    """The status line, ``headers``, then ``framing`` (lines the server adds).

    Raises ``ValueError`` on CR or LF inside a header field (the reason is
    checked when the response is made).
    """
    if not headers:
        return f"HTTP/1.1 {status} {reason}\r\n{framing}\r\n".encode()
    fields = "\r\n".join(map(": ".join, headers.items()))
    # The joins bring exactly one CR and one LF between fields; any more came
    # from a name or a value, and would split the response.
    breaks = len(headers) - 1
    if fields.count("\n") != breaks or fields.count("\r") != breaks:
        raise ValueError("CR or LF in a response header field")
    text = f"HTTP/1.1 {status} {reason}\r\n{fields}\r\n{framing}\r\n"
    return text.encode("utf-8", "surrogateescape")


def error_message(
    code: ErrorCode, message: str, *, status: int | None = None, head_only: bool = False
) -> bytes:
    """A complete JSON error answer that closes the connection."""
    body = error_body(code, message)
    status = code.status if status is None else status
    framing = (
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"Date: {http_date()}\r\nConnection: close\r\n"
    )
    head = encode_head(status, REASONS.get(status, ""), CIMultiDict(), framing)
    return head if head_only else head + body


class StreamResponse:
    """A response whose body is written in pieces after ``prepare``."""

    # Defaults as class attributes (no __slots__): a response then sets only
    # what differs, which is most of what building one costs.
    _keep_alive: bool | None = None
    _chunked = False
    _framing = _UNSET
    _remaining = 0
    _conn: Connection | None = None
    _eof_sent = False
    # Decided in prepare: whether the connection may carry another request.
    keep_after = False

    def __init__(
        self,
        *,
        status: int = 200,
        reason: str | None = None,
        headers: HeadersArg = None,
    ) -> None:
        self._status = status
        self._reason = _reason_for(status, reason)
        self._headers: CIMultiDict[str] = (
            CIMultiDict(headers) if headers is not None else CIMultiDict()
        )

    def __repr__(self) -> str:
        state = "eof" if self._eof_sent else "prepared" if self.prepared else "new"
        return f"<{type(self).__name__} {self._status} {state}>"

    # -- the head ------------------------------------------------------------

    @property
    def status(self) -> int:
        return self._status

    @property
    def reason(self) -> str:
        return self._reason

    @property
    def headers(self) -> CIMultiDict[str]:
        return self._headers

    @property
    def content_length(self) -> int | None:
        value = self._headers.get("Content-Length")
        return None if value is None else int(value)

    @content_length.setter
    def content_length(self, value: int | None) -> None:
        if value is None:
            self._headers.popall("Content-Length", None)
            return
        if self._chunked:
            raise RuntimeError("a chunked response cannot have a Content-Length")
        self._headers["Content-Length"] = str(int(value))

    @property
    def content_type(self) -> str | None:
        return self._headers.get("Content-Type")

    @content_type.setter
    def content_type(self, value: str) -> None:
        self._headers["Content-Type"] = value

    @property
    def keep_alive(self) -> bool | None:
        return self._keep_alive

    def force_close(self) -> None:
        """Close the connection after this response."""
        self._keep_alive = False

    def enable_chunked_encoding(self) -> None:
        if "Content-Length" in self._headers:
            raise RuntimeError("a response with a Content-Length cannot be chunked")
        self._chunked = True

    @property
    def chunked(self) -> bool:
        return self._chunked or self._framing == _CHUNKED

    @property
    def compression(self) -> bool:
        return False

    @property
    def prepared(self) -> bool:
        return self._framing != _UNSET

    def _head(self, request: Request, conn: Connection, length: int | None) -> bytes:
        """Fix the framing (see the module docstring) and encode the head.

        ``length`` is the body's length when the caller knows it (Response);
        otherwise the Content-Length field, if any, gives it. The fields the
        server adds (framing, Date, Connection) go straight into the head.
        """
        headers = self._headers
        status = self._status
        keep = (
            self._keep_alive is not False
            and request.keep_alive
            and not conn.closing
            and request.content.complete
        )
        if "Connection" in headers:
            if any("close" in v.lower() for v in headers.popall("Connection")):
                keep = False
        if "Transfer-Encoding" in headers:
            headers.popall("Transfer-Encoding")
        if length is not None and "Content-Length" in headers:
            headers.popall("Content-Length")
        if request.method == "HEAD" or status in _NO_BODY_STATUSES:
            self._framing = _EMPTY
            if status in _NO_LENGTH_STATUSES:
                headers.popall("Content-Length", None)
                length = None
            framing = "" if length is None else f"Content-Length: {length}\r\n"
        elif length is not None:
            self._framing = _LENGTH
            self._remaining = length
            framing = f"Content-Length: {length}\r\n"
        elif "Content-Length" in headers and not self._chunked:
            self._framing = _LENGTH
            self._remaining = int(headers["Content-Length"])
            framing = ""
        elif request.version >= HttpVersion11:
            headers.popall("Content-Length", None)
            self._framing = _CHUNKED
            framing = "Transfer-Encoding: chunked\r\n"
        elif self._chunked:
            raise RuntimeError("chunked encoding is not allowed for HTTP/1.0")
        else:
            self._framing = _CLOSE
            framing = ""
            keep = False
        if "Date" not in headers:
            framing += f"Date: {http_date()}\r\n"
        if not keep:
            framing += "Connection: close\r\n"
        elif request.version < HttpVersion11:
            framing += "Connection: keep-alive\r\n"
        self.keep_after = keep
        self._conn = conn
        return encode_head(status, self._reason, headers, framing)

    async def prepare(self, request: Request) -> None:
        """Send the head; the framing is fixed from here on."""
        if self._framing != _UNSET:
            return
        conn = request._conn
        conn.check_open()
        head = self._head(request, conn, None)
        conn.response = self
        conn.write(head)
        if conn.write_paused:
            await conn.drain()

    # -- the body ------------------------------------------------------------

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send one piece of the body; waits while the client is slow to read."""
        conn = self._conn
        if self._eof_sent:
            raise RuntimeError("write() after write_eof()")
        if conn is None:
            raise RuntimeError("write() before prepare()")
        if not data:
            return
        if type(data) is not bytes:
            data = bytes(data)
        framing = self._framing
        if framing == _CHUNKED:
            conn.write(b"%x\r\n%b\r\n" % (len(data), data))
        elif framing == _LENGTH:
            if len(data) > self._remaining:
                data = data[: self._remaining]
            self._remaining -= len(data)
            if data:
                conn.write(data)
        elif framing == _CLOSE:
            conn.write(data)
        if conn.write_paused:
            await conn.drain()

    async def write_eof(self, data: bytes = b"") -> None:
        """End the body (after ``data``, if given)."""
        if self._eof_sent:
            return
        if data:
            await self.write(data)
        conn = self._conn
        if conn is None:
            raise RuntimeError("write_eof() before prepare()")
        if self._framing == _CHUNKED:
            conn.write(b"0\r\n\r\n")
        elif self._framing == _LENGTH and self._remaining:
            # Fewer bytes than announced: only a close tells the client.
            self.keep_after = False
        self._eof_sent = True
        conn.response_done = True
        if conn.write_paused:
            await conn.drain()


class Response(StreamResponse):
    """A response whose whole body is known; head and body go in one write."""

    def __init__(
        self,
        *,
        status: int = 200,
        reason: str | None = None,
        headers: HeadersArg = None,
        body: bytes | bytearray | memoryview | None = None,
        content_type: str | None = None,
    ) -> None:
        # StreamResponse.__init__, inlined: one call less per cache hit.
        self._status = status
        self._reason = (
            REASONS.get(status, "") if reason is None else _reason_for(status, reason)
        )
        self._headers = CIMultiDict(headers) if headers is not None else CIMultiDict()
        self._body = (
            body if type(body) is bytes else b"" if body is None else bytes(body)
        )
        if content_type is not None:
            self._headers["Content-Type"] = content_type

    @property
    def body(self) -> bytes:
        return self._body

    @body.setter
    def body(self, value: bytes) -> None:
        if self.prepared:
            raise RuntimeError("the body cannot change once the response is prepared")
        self._body = bytes(value)

    @property
    def content_length(self) -> int | None:
        return len(self._body)

    @content_length.setter
    def content_length(self, value: int | None) -> None:
        raise RuntimeError("a Response's Content-Length follows its body")

    async def prepare(self, request: Request) -> None:
        if self._framing != _UNSET:
            return
        self.send(request)
        conn = request._conn
        if conn.write_paused:
            await conn.drain()

    def send(self, request: Request) -> None:
        """Write head and body at once, without waiting for the client to read.

        ``prepare`` is this plus that wait; the connection calls it directly
        for a Response its handler returned, which saves a coroutine.
        """
        conn = request._conn
        body = self._body
        # RFC 9110 section 8.6: HEAD and 304 may keep the length a GET would
        # have had; an empty body then says nothing about it.
        length: int | None = len(body)
        if not body and (self._status == 304 or request.method == "HEAD"):
            length = None
        message = self._head(request, conn, length)
        if self._framing != _EMPTY:
            message += body
        conn.response = self
        conn.write(message)
        self._eof_sent = True
        conn.response_done = True

    def enable_chunked_encoding(self) -> None:
        raise RuntimeError("a Response is sent whole, with a Content-Length")

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        raise RuntimeError("a Response is written whole; use StreamResponse to stream")

    async def write_eof(self, data: bytes = b"") -> None:
        if not self.prepared:
            raise RuntimeError("write_eof() before prepare()")
