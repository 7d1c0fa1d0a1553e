"""Reading requests off one connection: llhttp's events to ``Request`` objects.

Owns: the httptools parser of a connection, the limits on a request head
(bytes of target and fields, number of fields), the framing checks llhttp
leaves to us, and turning every refusal into either a final ``Refusal``
queued behind the requests before it or a failed body. Not here: running
handlers, the queue and closing (connection.py), request fields
(request.py).

What is refused, and by whom:
- llhttp: bad request lines and methods, header syntax (bare CR, obs-fold,
  invalid tokens or characters), both Content-Length and Transfer-Encoding,
  repeated or malformed Content-Length, a Transfer-Encoding not ending in
  chunked, and bad chunk framing;
- here: HTTP versions other than 1.0 and 1.1 (llhttp also takes 0.9 and
  2.0), Transfer-Encoding on HTTP/1.0 (RFC 9112 section 6.1, answered as
  ``ambiguous_framing``), transfer codings other than ``chunked``, and the
  head limits (431).
An error in a head ends the requests of the connection: the refusal is
answered in its turn and nothing behind it is parsed, so a smuggled request
never runs. An error in a body (bad chunk, oversized trailers) fails that
body with ``ClientRequestError``; its handler owns the answer.

The quick handler's share (server.py): on an idle connection, a keep-alive
request with a body of at most ``QUICK_BODY_BYTES`` is held out of the
queue from its head to its end; if it ends within the same read, the quick
handler is offered it with its body and, when it answers, the request is
never queued. Otherwise (it passes, the read ends mid-body, a parse error
follows) the held request is queued with its body so far, before anything
parsed after it, so order and flow control are as for any request.

Known limitations: trailer fields are counted against the head budget,
then dropped; ``GET / RTSP/1.0`` passes as HTTP/1.0 (llhttp does not say
which protocol it parsed); a header field still arriving is counted only
from the first read that brings nothing else, so one read (256 KiB) of it
may pass the limit before the 431.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, NamedTuple, NoReturn

import httptools

from sidecar import log
from sidecar.errors import ClientRequestError, ErrorCode
from sidecar.http.request import EMPTY_BODY, HttpVersion10, HttpVersion11, Request

if TYPE_CHECKING:
    from sidecar.http.connection import Connection
    from sidecar.http.server import HTTPServer

# Method, version and line ends on top of the target and field limits.
_HEAD_SLACK_BYTES: Final = 1024
_VERSIONS: Final = {"1.1": HttpVersion11, "1.0": HttpVersion10}
# llhttp reads keep-alive from both (Proxy-Connection is a legacy alias).
_CONNECTION_FIELDS: Final = frozenset({b"connection", b"proxy-connection"})
# Bodies up to this size may be held back from the queue while they arrive,
# for the quick handler (see ``on_headers_complete``).
QUICK_BODY_BYTES: Final = 64 * 1024
# Lengths of the names _note looks at: a cheap test that skips most fields.
_NOTED_NAME_SIZES: Final = frozenset(
    len(n)
    for n in (b"content-length", b"transfer-encoding", b"upgrade", *_CONNECTION_FIELDS)
)
_METHODS: Final = {
    m.encode(): m
    for m in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "CONNECT")
}


class Refusal(NamedTuple):
    """A request head answered with this error; the connection then closes."""

    code: ErrorCode
    message: str


class _StopParsing(Exception):
    """Raised in a parser callback to abandon the rest of the input."""


class RequestReader:
    """Parses one connection's bytes; event-loop thread only.

    The parser callbacks (``on_*``) write the head being parsed; a complete
    head becomes a ``Request`` handed to ``Connection.queue``.
    """

    def __init__(self, conn: Connection, server: HTTPServer) -> None:
        self._conn = conn
        self._parser = httptools.HttpRequestParser(self)
        self._max_target_bytes = server.max_target_bytes
        self._max_header_bytes = server.max_header_bytes
        self._max_headers = server.max_headers
        self._max_head_bytes = (
            server.max_target_bytes + server.max_header_bytes + _HEAD_SLACK_BYTES
        )
        # The head being parsed.
        self.in_head = False
        # Bytes of the head fed while no head callback fired (a field still
        # accumulating inside httptools), and whether one fired in a feed.
        self._quiet_bytes = 0
        self._progress = False
        self._url = b""
        self._fields: list[tuple[bytes, bytes]] = []
        self._field_bytes = 0
        # Framing fields of that head, noted as they arrive.
        self._length: int | None = None
        self._coding: bytes | None = None
        self._upgrade = False
        self._connection_field = False
        # The last head's keep-alive; whether a message that asked to close
        # has ended; the refusal a callback raised.
        self._keep_alive = True
        self._closed_by_client = False
        self._refusal: Refusal | None = None
        # The request whose body is arriving (head parsed, message not ended).
        self.parsing: Request | None = None
        # A request held for the quick handler while its body arrives in
        # this read, and that body's chunks (see on_headers_complete).
        self._held: Request | None = None
        self._held_body: list[bytes] = []

    @property
    def mid_message(self) -> bool:
        """True while a request has begun to arrive and not ended."""
        return self.in_head or self.parsing is not None

    def feed(self, data: bytes) -> None:
        """Parse ``data``; requests and refusals go to the connection."""
        self._progress = False
        try:
            try:
                self._parser.feed_data(data)
            finally:
                # A held request whose body did not end in this read joins
                # the queue now, ahead of anything parsed after it.
                if self._held is not None:
                    self._release_held()
        except httptools.HttpParserUpgrade:
            # The request is queued; what follows its head is not HTTP/1.1.
            self._conn.end_requests(dropped=True)
        except httptools.HttpParserCallbackError:
            refusal = self._refusal or Refusal(
                ErrorCode.BAD_REQUEST, "malformed HTTP request"
            )
            self._refusal = None
            self._refuse(refusal)
        except httptools.HttpParserError as exc:
            if self._closed_by_client:
                # Bytes after a request that asked to close (llhttp refuses
                # them): RFC 9112 section 9.6 says to ignore them.
                self._conn.end_requests(dropped=True)
            else:
                text = f"malformed HTTP request: {log.clip(str(exc))}"
                self._refuse(Refusal(ErrorCode.BAD_REQUEST, text))
        else:
            if self.in_head and not self._progress:
                self._check_head_size(len(data))

    def fail_body(self, error: BaseException) -> None:
        """End the body being received with ``error`` (the client left)."""
        if self.parsing is not None:
            self.parsing.content.fail(error)
            self.parsing = None

    # -- httptools callbacks -------------------------------------------------

    # No on_message_begin: httptools calls only the callbacks a protocol
    # has, and a request's first callback is always on_url, so the head
    # starts there (one Python call fewer per request).

    def _begin(self) -> None:
        self.in_head = True
        self._quiet_bytes = 0
        self._url = b""
        self._fields = []
        self._field_bytes = 0
        self._length = None
        self._coding = None
        self._upgrade = False
        self._connection_field = False

    def on_url(self, url: bytes) -> None:
        if not self.in_head:
            self._begin()
        self._progress = True
        # Usually one call per request; b"" + url is url itself, no copy.
        self._url += url
        if len(self._url) > self._max_target_bytes:
            self._stop(
                ErrorCode.HEADERS_TOO_LARGE,
                f"the request target is over the {self._max_target_bytes}-byte limit",
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        self._progress = True
        self._quiet_bytes = 0  # now counted in _field_bytes
        # Counted as on the wire (name, ": ", value, CRLF), like the proxy's
        # own check; trailer fields count against the same budget.
        size = len(name)
        total = self._field_bytes + size + len(value) + 4
        self._field_bytes = total
        if total > self._max_header_bytes:
            self._stop(
                ErrorCode.HEADERS_TOO_LARGE,
                f"request header fields exceed the {self._max_header_bytes}-byte"
                " limit (limits.max_header_bytes)",
            )
        if not self.in_head:
            return  # a trailer field: counted, not kept
        fields = self._fields
        fields.append((name, value))
        if len(fields) > self._max_headers:
            self._stop(
                ErrorCode.HEADERS_TOO_LARGE,
                f"more than {self._max_headers} request header fields",
            )
        if size in _NOTED_NAME_SIZES:
            self._note(name, value)

    def _note(self, name: bytes, value: bytes) -> None:
        """Note a field the framing depends on (most fields are not).

        llhttp has already refused repeated or malformed Content-Length,
        repeated Transfer-Encoding, and the two together.
        """
        lower = name.lower()
        if lower == b"content-length":
            self._length = int(value)
        elif lower == b"transfer-encoding":
            self._coding = value
        elif lower == b"upgrade":
            self._upgrade = True
        elif lower in _CONNECTION_FIELDS:
            self._connection_field = True

    def on_headers_complete(self) -> None:
        self.in_head = False
        request = self._make_request()
        self._keep_alive = request.keep_alive
        if (
            request.keep_alive
            and not request.chunked
            and (request.content_length or 0) <= QUICK_BODY_BYTES
            and self._conn.quick_ready()
        ):
            # Hold it out of the queue while its body arrives: if the whole
            # message is in this read, the quick handler may answer it
            # without it ever being queued (see on_message_complete).
            self._held = request
            self._held_body = []
            return
        if request.content is not EMPTY_BODY:
            self.parsing = request
        self._conn.queue(request)

    def on_body(self, body: bytes) -> None:
        if self._held is not None:
            self._held_body.append(body)
        elif self.parsing is not None:
            self.parsing.content.feed(body)

    def on_message_complete(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            chunks = self._held_body
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            if not self._conn.answer_held(held, body):
                if body:
                    held.content.feed(body)
                if held.content is not EMPTY_BODY:
                    held.content.feed_eof()
                self._conn.queue(held)
            return  # held requests keep the connection alive
        request = self.parsing
        if request is not None:
            self.parsing = None
            request.content.feed_eof()
        if not self._keep_alive:
            self._closed_by_client = True
            self._conn.end_requests()

    # -- helpers -------------------------------------------------------------

    def _release_held(self) -> None:
        """Queue the held request with the body so far; the rest streams in."""
        held = self._held
        assert held is not None
        self._held = None
        for chunk in self._held_body:
            held.content.feed(chunk)
        self._held_body = []
        if held.content is not EMPTY_BODY:
            self.parsing = held
        self._conn.queue(held)

    def _stop(self, code: ErrorCode, message: str) -> NoReturn:
        self._refusal = Refusal(code, message)
        raise _StopParsing(message)

    def _make_request(self) -> Request:
        """The parsed head as a Request, or a refusal of its framing."""
        parser = self._parser
        keep_alive = parser.should_keep_alive()
        if keep_alive and not self._connection_field:
            # Of the versions llhttp accepts (0.9, 1.0, 1.1, 2.0) only 1.1
            # keeps a connection alive unasked; this skips get_http_version,
            # which formats a string and is the costliest call here.
            version = HttpVersion11
        else:
            version_text = parser.get_http_version()
            found = _VERSIONS.get(version_text)
            if found is None:
                self._stop(
                    ErrorCode.BAD_REQUEST,
                    f"HTTP/{log.clip(version_text, 8)} is not supported",
                )
            version = found
        coding = self._coding
        if coding is not None:
            # RFC 9112 section 6.1: in HTTP/1.0 the framing cannot be trusted.
            if version < HttpVersion11:
                self._stop(
                    ErrorCode.AMBIGUOUS_FRAMING,
                    "HTTP/1.0 requests must not use Transfer-Encoding",
                )
            if coding.strip().lower() != b"chunked":
                self._stop(
                    ErrorCode.BAD_REQUEST,
                    "chunked is the only transfer coding accepted in requests",
                )
        raw_method = parser.get_method()
        method = _METHODS.get(raw_method) or raw_method.decode("ascii")
        if self._upgrade or method == "CONNECT":
            keep_alive = False  # what follows the head is not HTTP/1.1
        request = Request(
            self._conn,
            method,
            self._url.decode("latin-1"),
            version,
            tuple(self._fields),
            self._length,
            coding is not None,
            keep_alive,
        )
        request.field_bytes = self._field_bytes
        return request

    def _check_head_size(self, size: int) -> None:
        """Refuse a head that keeps growing without reporting its fields.

        httptools reports a header field only once it is complete, so one
        endless field would otherwise grow in its buffer unchecked. A read
        during which no head callback fired, inside a head, was all head;
        one during which a callback fired is not counted, so at most one
        read (256 KiB) escapes the count.
        """
        self._quiet_bytes += size
        total = len(self._url) + self._field_bytes + self._quiet_bytes
        if total > self._max_head_bytes:
            self._refuse(
                Refusal(
                    ErrorCode.HEADERS_TOO_LARGE,
                    f"the request head exceeds the {self._max_head_bytes}-byte limit"
                    " (limits.max_header_bytes)",
                )
            )

    def _refuse(self, refusal: Refusal) -> None:
        """Parse nothing more; answer ``refusal`` in its turn, or fail the body."""
        log.server.debug(
            "server.request_refused",
            extra={
                "status": refusal.code.status,
                "code": refusal.code.code,
                "why": refusal.message,
            },
        )
        request = self.parsing
        if request is not None:
            # The head was fine and its handler owns the answer; the body is
            # broken, so the connection closes after it.
            self.parsing = None
            request.content.fail(ClientRequestError(refusal.code, refusal.message))
        else:
            self._conn.queue(refusal)
        self._conn.end_requests(refused=True)
