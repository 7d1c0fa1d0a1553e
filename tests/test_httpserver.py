"""The data port's HTTP/1.1 server (sidecar/http): framing, limits, lifecycle.

Driven two ways: raw sockets with byte-exact requests whose answers are
parsed by h11 (strict: a framing error cannot hide behind a lenient
client), and aiohttp's client for keep-alive and streamed uploads. Rules
covered: request fields as aiohttp names them, response framing (length,
chunked, close-delimited, HEAD/204/304), keep-alive and pipelining order,
100-continue, flow control of large bodies, refusals of malformed or
ambiguous requests and of oversized heads, handler failures, client
disconnects, and the server's drain steps.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import h11
import pytest
import uvloop
from aiohttp.http import HttpVersion11 as AiohttpVersion11
from multidict import CIMultiDictProxy

from sidecar.errors import ClientRequestError, ErrorCode
from sidecar.http import (
    HTTPServer,
    HttpVersion10,
    HttpVersion11,
    Request,
    Response,
    StreamResponse,
)
from sidecar.http.connection import HIGH_WATER_BYTES, Connection
from sidecar.http.reader import RequestReader

Handler = Callable[[Request], Awaitable[StreamResponse]]
Serve = Callable[..., Awaitable[tuple[HTTPServer, int]]]
TIMEOUT_S = 5.0


# -- helpers ------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    informational: list[int] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name.lower()]

    def names(self) -> set[str]:
        return {k for k, _ in self.headers}


class RawClient:
    """One raw connection; each answer is parsed by a fresh h11 client."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.reader = reader
        self.writer = writer
        self._leftover = b""
        self.eof = False

    @classmethod
    async def open(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def _more(self) -> bytes:
        async with asyncio.timeout(TIMEOUT_S):
            data = await self.reader.read(65536)
        if not data:
            self.eof = True
        return data

    async def answer(self, method: str = "GET") -> Answer:
        """The next response, as the answer to a ``method`` request."""
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        if self._leftover:  # (h11 takes b"" to mean the connection closed)
            conn.receive_data(self._leftover)
        answer = Answer(0, [], b"")
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(b"" if self.eof else await self._more())
            elif isinstance(event, h11.InformationalResponse):
                answer.informational.append(event.status_code)
            elif isinstance(event, h11.Response):
                answer.status = event.status_code
                answer.headers = [(k.decode(), v.decode()) for k, v in event.headers]
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"unexpected {event!r}")
        self._leftover = conn.trailing_data[0]
        answer.body = bytes(body)
        return answer

    async def closed(self) -> bool:
        """True when the server closes the connection (nothing else may come)."""
        if self._leftover:
            return False
        while not self.eof:
            if await self._more():
                return False
        return True

    async def read_all(self) -> bytes:
        data = self._leftover
        while not self.eof:
            data += await self._more()
        return data

    def close(self) -> None:
        self.writer.close()


async def raw_answers(
    port: int, raw: bytes, methods: list[str]
) -> tuple[list[Answer], bool]:
    """Send ``raw`` on one connection; the answers and whether it then closed.

    Closed means the last answer said ``Connection: close`` and the server
    then closed; without that header the server keeps the connection, and
    this does not wait to find out.
    """
    client = await RawClient.open(port)
    try:
        await client.send(raw)
        answers = [await client.answer(m) for m in methods]
        if answers[-1].header("connection") != "close":
            return answers, False
        return answers, await client.closed()
    finally:
        client.close()


def error_of(answer: Answer) -> dict[str, str]:
    assert answer.header("content-type") == "application/json"
    doc = json.loads(answer.body)
    assert set(doc) == {"error"}
    return dict(doc["error"])


async def ok(request: Request) -> StreamResponse:
    return Response(body=b"ok")


@pytest.fixture(autouse=True)
def loop_errors() -> list[dict[str, Any]]:
    """Everything the loop's exception handler saw; must stay empty."""
    return []


@pytest.fixture
async def serve(loop_errors: list[dict[str, Any]]) -> AsyncIterator[Serve]:
    """Start servers on 127.0.0.1:0; all are closed at the end."""
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: loop_errors.append(context))
    servers: list[HTTPServer] = []

    async def start(handler: Handler, **options: Any) -> tuple[HTTPServer, int]:
        options.setdefault("max_header_bytes", 8192)
        server = HTTPServer(handler, **options)
        _, port = await server.start("127.0.0.1", 0)
        servers.append(server)
        return server, port

    yield start
    for server in servers:
        await server.close()
    assert loop_errors == []


# -- the request --------------------------------------------------------------


async def test_request_fields_follow_aiohttp_names(serve: Serve) -> None:
    """Method, raw target, decoded path, version, headers and peer are as sent."""
    seen: list[Request] = []

    async def handler(request: Request) -> StreamResponse:
        seen.append(request)
        return Response(body=b"")

    _, port = await serve(handler)
    raw = (
        b"GET /a%20b/c?q=1%202 HTTP/1.1\r\n"
        b"Host: example\r\nX-Two: 1\r\nx-two: 2\r\n\r\n"
    )
    await raw_answers(port, raw, ["GET"])
    request = seen[0]
    assert request.method == "GET"
    assert request.raw_path == "/a%20b/c?q=1%202"
    assert request.path == "/a b/c"
    assert request.version == HttpVersion11
    assert request.version == AiohttpVersion11  # type: ignore[comparison-overlap]
    assert isinstance(request.headers, CIMultiDictProxy)
    assert request.headers.getall("X-TWO") == ["1", "2"]
    assert request.raw_headers == (
        (b"Host", b"example"),
        (b"X-Two", b"1"),
        (b"x-two", b"2"),
    )
    assert request.host == "example"
    assert request.remote == "127.0.0.1"
    assert (request.content_length, request.body_exists, request.can_read_body) == (
        None,
        False,
        False,
    )


async def test_request_http10_version_compares_below_aiohttp_http11(
    serve: Serve,
) -> None:
    """An HTTP/1.0 request's version is below aiohttp's HttpVersion11."""
    versions: list[Any] = []

    async def handler(request: Request) -> StreamResponse:
        versions.append(request.version)
        return Response(body=b"")

    _, port = await serve(handler)
    await raw_answers(port, b"GET / HTTP/1.0\r\n\r\n", ["GET"])
    assert versions == [HttpVersion10]
    assert versions[0] < AiohttpVersion11


async def test_request_without_host_has_host_none(serve: Serve) -> None:
    """No Host field gives ``host`` None, not the machine's own name."""
    hosts: list[str | None] = []

    async def handler(request: Request) -> StreamResponse:
        hosts.append(request.host)
        return Response(body=b"")

    _, port = await serve(handler)
    await raw_answers(port, b"GET / HTTP/1.0\r\n\r\n", ["GET"])
    assert hosts == [None]


async def test_request_header_bytes_round_trip_through_surrogateescape(
    serve: Serve,
) -> None:
    """Header values that are not UTF-8 decode so their bytes come back exactly."""
    values: list[bytes] = []

    async def handler(request: Request) -> StreamResponse:
        values.append(request.headers["X-Raw"].encode("utf-8", "surrogateescape"))
        return Response(body=b"")

    _, port = await serve(handler)
    await raw_answers(
        port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Raw: caf\xe9\r\n\r\n", ["GET"]
    )
    assert values == [b"caf\xe9"]


async def test_request_body_with_length_is_read_whole(serve: Serve) -> None:
    """A body with Content-Length is read whole, and ``read()`` keeps it."""

    async def handler(request: Request) -> StreamResponse:
        first = await request.read()
        assert await request.read() == first
        assert request.body_exists and request.content_length == 5
        assert not request.can_read_body
        return Response(body=first[::-1])

    _, port = await serve(handler)
    raw = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    answers, _ = await raw_answers(port, raw, ["POST"])
    assert answers[0].body == b"olleh"


async def test_request_chunked_body_chunks_arrive_as_sent(serve: Serve) -> None:
    """``iter_any`` yields a chunk before the next one has been sent."""
    first_read = asyncio.Event()

    async def handler(request: Request) -> StreamResponse:
        parts = []
        async for chunk in request.content.iter_any():
            parts.append(chunk)
            first_read.set()
        return Response(body=b"|".join(parts))

    _, port = await serve(handler)
    client = await RawClient.open(port)
    await client.send(
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
    )
    async with asyncio.timeout(TIMEOUT_S):
        await first_read.wait()
    await client.send(b"2\r\nde\r\n0\r\n\r\n")
    answer = await client.answer("POST")
    client.close()
    assert answer.body == b"abc|de"


async def test_request_large_body_pauses_reading_until_read(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the high-water mark the socket is not read until the handler catches up."""
    paused = asyncio.Event()
    release = asyncio.Event()
    buffered_at_pause: list[int] = []
    real = Connection._update_reading

    def watch(self: Connection) -> None:
        real(self)
        if self._reading_paused and not paused.is_set():
            buffered_at_pause.append(self._buffered)
            paused.set()

    monkeypatch.setattr(Connection, "_update_reading", watch)
    # More than the loopback socket buffers hold, so the client must wait.
    body = bytes(range(256)) * (64 * 1024)  # 16 MiB
    connections: list[Connection] = []

    async def handler(request: Request) -> StreamResponse:
        connections.append(request._conn)
        await release.wait()
        digest = hashlib.sha256()
        async for chunk in request.content.iter_any():
            digest.update(chunk)
        return Response(body=digest.hexdigest().encode())

    _, port = await serve(handler)
    client = await RawClient.open(port)
    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    sending = asyncio.create_task(client.send(head + body))
    async with asyncio.timeout(TIMEOUT_S):
        await paused.wait()
    # At most one socket read (256 KiB) past the mark, and the socket unread.
    assert buffered_at_pause[0] <= HIGH_WATER_BYTES + 256 * 1024
    transport = connections[0].transport
    assert transport is not None and not transport.is_reading()
    assert not sending.done()
    release.set()
    await sending
    answer = await client.answer("POST")
    client.close()
    assert answer.body == hashlib.sha256(body).hexdigest().encode()


async def test_request_streamed_upload_from_aiohttp_client_is_read_in_full(
    serve: Serve,
) -> None:
    """A chunked upload from aiohttp's client arrives whole, in order."""

    async def handler(request: Request) -> StreamResponse:
        digest = hashlib.sha256()
        async for chunk in request.content.iter_any():
            digest.update(chunk)
        return Response(body=digest.hexdigest().encode())

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(64):
            yield bytes([i]) * 16384

    expected = hashlib.sha256(
        b"".join(bytes([i]) * 16384 for i in range(64))
    ).hexdigest()
    _, port = await serve(handler)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{port}/", data=pieces()) as resp:
            assert await resp.text() == expected


# -- keep-alive and pipelining ------------------------------------------------


async def test_keepalive_second_request_reuses_the_connection(serve: Serve) -> None:
    """aiohttp's client sends two requests over one kept-alive connection."""

    async def handler(request: Request) -> StreamResponse:
        assert request.transport is not None
        return Response(
            body=str(request.transport.get_extra_info("peername")[1]).encode()
        )

    _, port = await serve(handler)
    async with aiohttp.ClientSession() as session:
        ports = []
        for _ in range(2):
            async with session.get(f"http://127.0.0.1:{port}/") as resp:
                ports.append(await resp.text())
    assert ports[0] == ports[1]


async def test_pipelined_requests_run_one_at_a_time_in_order(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pipelined requests are answered in order, the next only after the last."""
    started: list[str] = []
    first_started = asyncio.Event()
    all_parsed = asyncio.Event()
    release = asyncio.Event()
    real = RequestReader.on_headers_complete
    parsed: list[int] = []

    def count(self: RequestReader) -> None:
        real(self)
        parsed.append(1)
        if len(parsed) == 3:
            all_parsed.set()

    monkeypatch.setattr(RequestReader, "on_headers_complete", count)

    async def handler(request: Request) -> StreamResponse:
        started.append(request.raw_path)
        if request.raw_path == "/1":
            first_started.set()
            await release.wait()
        return Response(body=request.raw_path.encode())

    _, port = await serve(handler)
    client = await RawClient.open(port)
    await client.send(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(TIMEOUT_S):
        await first_started.wait()
    for i in (2, 3):
        await client.send(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
    async with asyncio.timeout(TIMEOUT_S):
        await all_parsed.wait()
    await asyncio.sleep(0)  # one loop turn: a handler started now would have run
    assert started == ["/1"]
    release.set()
    bodies = [(await client.answer()).body for _ in range(3)]
    client.close()
    assert bodies == [b"/1", b"/2", b"/3"]
    assert started == ["/1", "/2", "/3"]


async def test_keepalive_http10_without_keepalive_closes(serve: Serve) -> None:
    """HTTP/1.0 without keep-alive: ``Connection: close``, then the close."""
    _, port = await serve(ok)
    answers, closed = await raw_answers(port, b"GET / HTTP/1.0\r\n\r\n", ["GET"])
    assert answers[0].header("connection") == "close"
    assert closed


async def test_keepalive_http10_with_keepalive_stays_open(serve: Serve) -> None:
    """HTTP/1.0 asking keep-alive gets ``Connection: keep-alive``, then more."""
    _, port = await serve(ok)
    one = b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    answers, _ = await raw_answers(
        port, one + b"GET / HTTP/1.0\r\n\r\n", ["GET", "GET"]
    )
    assert answers[0].header("connection") == "keep-alive"
    assert answers[1].body == b"ok"


async def test_keepalive_request_asking_close_is_closed(serve: Serve) -> None:
    """``Connection: close`` from the client is echoed and the connection closes."""
    _, port = await serve(ok)
    raw = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answers, closed = await raw_answers(port, raw, ["GET"])
    assert answers[0].header("connection") == "close"
    assert closed


async def test_keepalive_bytes_after_close_request_are_ignored(serve: Serve) -> None:
    """A request pipelined behind ``Connection: close`` is neither run nor refused."""
    paths: list[str] = []

    async def handler(request: Request) -> StreamResponse:
        paths.append(request.raw_path)
        return Response(body=b"")

    _, port = await serve(handler)
    raw = (
        b"GET /1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        b"GET /2 HTTP/1.1\r\n\r\n"
    )
    answers, closed = await raw_answers(port, raw, ["GET"])
    assert answers[0].status == 200
    assert closed
    assert paths == ["/1"]


async def test_keepalive_force_close_sends_connection_close(serve: Serve) -> None:
    """``force_close()`` adds ``Connection: close`` and closes after the answer."""

    async def handler(request: Request) -> StreamResponse:
        resp = Response(body=b"bye")
        resp.force_close()
        return resp

    _, port = await serve(handler)
    answers, closed = await raw_answers(
        port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", ["GET"]
    )
    assert answers[0].header("connection") == "close"
    assert closed


async def test_keepalive_idle_connection_closes_after_timeout(serve: Serve) -> None:
    """A connection idle past ``keepalive_timeout_s`` is closed by the server."""
    _, port = await serve(ok, keepalive_timeout_s=0.2)
    client = await RawClient.open(port)
    await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await client.answer()).status == 200
    assert await client.closed()
    client.close()


# -- response framing ---------------------------------------------------------


async def _stream(
    request: Request,
    *,
    length: int | None = None,
    status: int = 200,
    parts: tuple[bytes, ...] = (b"hello ", b"world"),
) -> StreamResponse:
    resp = StreamResponse(status=status)
    if length is not None:
        resp.content_length = length
    await resp.prepare(request)
    for part in parts:
        await resp.write(part)
    await resp.write_eof()
    return resp


async def test_framing_stream_without_length_is_chunked_on_http11(serve: Serve) -> None:
    """No Content-Length on HTTP/1.1: chunked, and the connection stays usable."""
    _, port = await serve(lambda r: _stream(r))
    raw = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 2
    answers, _ = await raw_answers(port, raw, ["GET", "GET"])
    assert answers[0].header("transfer-encoding") == "chunked"
    assert answers[0].header("content-length") is None
    assert [a.body for a in answers] == [b"hello world"] * 2


async def test_framing_stream_with_length_uses_content_length(serve: Serve) -> None:
    """A Content-Length set before ``prepare`` frames the body, not chunking."""
    _, port = await serve(lambda r: _stream(r, length=11))
    answers, _ = await raw_answers(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", ["GET"])
    assert answers[0].header("content-length") == "11"
    assert answers[0].header("transfer-encoding") is None
    assert answers[0].body == b"hello world"


async def test_framing_stream_on_http10_is_close_delimited(serve: Serve) -> None:
    """No length on HTTP/1.0: the body ends with the connection."""
    _, port = await serve(lambda r: _stream(r))
    client = await RawClient.open(port)
    await client.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    data = await client.read_all()
    client.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head and b"Content-Length" not in head
    assert b"Connection: close" in head
    assert body == b"hello world"


async def test_framing_response_is_one_write(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Response`` sends its head and body in a single transport write."""
    writes: list[bytes] = []
    real = Connection.write

    def spy(self: Connection, data: bytes) -> None:
        writes.append(data)
        real(self, data)

    monkeypatch.setattr(Connection, "write", spy)
    _, port = await serve(lambda r: asyncio.sleep(0, Response(body=b'{"a":1}')))
    await raw_answers(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", ["GET"])
    assert len(writes) == 1
    assert writes[0].endswith(b'\r\n\r\n{"a":1}')


async def test_framing_adds_only_date_and_length(serve: Serve) -> None:
    """Date and Content-Length are added; no Server, no default Content-Type."""

    async def handler(request: Request) -> StreamResponse:
        return Response(body=b"x", headers={"X-Mine": "1"})

    _, port = await serve(handler)
    answers, _ = await raw_answers(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", ["GET"])
    assert answers[0].names() == {"x-mine", "content-length", "date"}


async def test_framing_given_date_is_kept_not_doubled(serve: Serve) -> None:
    """A Date from the handler (the upstream's) is sent as is, once."""
    date = "Mon, 01 Jan 2024 00:00:00 GMT"
    _, port = await serve(
        lambda r: asyncio.sleep(0, Response(body=b"", headers={"Date": date}))
    )
    answers, _ = await raw_answers(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", ["GET"])
    assert answers[0].all("date") == [date]


async def test_framing_handler_connection_field_is_replaced(serve: Serve) -> None:
    """A Connection field from the handler never reaches the client as given."""
    headers = {"Connection": "keep-alive, X-Secret", "X-Secret": "1"}
    _, port = await serve(
        lambda r: asyncio.sleep(0, Response(body=b"", headers=headers))
    )
    answers, _ = await raw_answers(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", ["GET"])
    assert answers[0].header("connection") is None


async def test_framing_head_keeps_content_length_without_body(serve: Serve) -> None:
    """HEAD keeps Content-Length, sends no body; the next answer is intact."""

    async def handler(request: Request) -> StreamResponse:
        if request.raw_path == "/stream":
            return await _stream(request, length=11)
        return Response(body=b"hello")

    _, port = await serve(handler)
    raw = (
        b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n"
        b"HEAD /stream HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    answers, _ = await raw_answers(port, raw, ["HEAD", "HEAD", "GET"])
    assert [a.header("content-length") for a in answers] == ["5", "11", "5"]
    assert [a.body for a in answers] == [b"", b"", b"hello"]


async def test_framing_204_has_neither_length_nor_body(serve: Serve) -> None:
    """204 drops Content-Length and Transfer-Encoding and any body written."""

    async def handler(request: Request) -> StreamResponse:
        if request.raw_path == "/stream":
            return await _stream(request, status=204)
        return Response(status=204, body=b"ignored", headers={"Content-Length": "7"})

    _, port = await serve(handler)
    raw = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /stream HTTP/1.1\r\nHost: x\r\n\r\n"
    answers, _ = await raw_answers(
        port, raw + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", ["GET"] * 3
    )
    for answer in answers:
        assert answer.status == 204
        assert "content-length" not in answer.names()
        assert "transfer-encoding" not in answer.names()
        assert answer.body == b""


async def test_framing_304_keeps_given_length_without_body(serve: Serve) -> None:
    """304 keeps a given Content-Length (RFC 9110 section 8.6) and sends no body."""

    async def handler(request: Request) -> StreamResponse:
        if request.raw_path == "/stream":
            return await _stream(request, status=304, length=42)
        return Response(status=304, headers={"Content-Length": "42", "ETag": '"a"'})

    _, port = await serve(handler)
    raw = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /stream HTTP/1.1\r\nHost: x\r\n\r\n"
    answers, _ = await raw_answers(
        port, raw + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", ["GET"] * 3
    )
    for answer in answers:
        assert answer.status == 304
        assert answer.header("content-length") == "42"
        assert answer.body == b""


async def test_framing_short_body_closes_the_connection(serve: Serve) -> None:
    """Fewer bytes than Content-Length: the connection closes, the body is cut."""
    _, port = await serve(lambda r: _stream(r, length=20))
    client = await RawClient.open(port)
    await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(h11.RemoteProtocolError):
        await client.answer()
    client.close()


async def test_framing_extra_body_bytes_are_cut_at_content_length(serve: Serve) -> None:
    """Bytes past Content-Length are not sent, so the next answer is intact."""
    _, port = await serve(lambda r: _stream(r, length=5))
    raw = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 2
    answers, _ = await raw_answers(port, raw, ["GET", "GET"])
    assert [a.body for a in answers] == [b"hello"] * 2


async def test_framing_write_waits_while_the_client_reads_slowly(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``write`` waits for the transport to drain, so its buffer stays bounded."""
    paused = asyncio.Event()
    real = Connection.pause_writing

    def watch(self: Connection) -> None:
        real(self)
        paused.set()

    monkeypatch.setattr(Connection, "pause_writing", watch)
    chunk = b"x" * 65536
    buffered: list[int] = []

    async def handler(request: Request) -> StreamResponse:
        assert request.transport is not None
        resp = StreamResponse()
        resp.content_length = 256 * len(chunk)
        await resp.prepare(request)
        for _ in range(256):  # 16 MiB, more than the socket buffers hold
            await resp.write(chunk)
            buffered.append(request.transport.get_write_buffer_size())
        return resp

    _, port = await serve(handler)
    client = await RawClient.open(port)
    await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(TIMEOUT_S):
        await paused.wait()  # the client has not read a byte yet
    answer = await client.answer()
    client.close()
    assert len(answer.body) == 256 * len(chunk)
    high = 64 * 1024  # asyncio's default high-water mark
    assert max(buffered) <= high + len(chunk)


async def test_framing_newline_in_header_value_is_refused_with_500(
    serve: Serve,
) -> None:
    """A header value with CR or LF is never written; the client gets a JSON 500."""
    headers = {"X-Bad": "a\r\nSet-Cookie: x=1"}
    _, port = await serve(
        lambda r: asyncio.sleep(0, Response(body=b"", headers=headers))
    )
    answers, closed = await raw_answers(
        port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", ["GET"]
    )
    assert answers[0].status == 500
    assert "set-cookie" not in answers[0].names()
    assert error_of(answers[0])["message"] == "internal error in the sidecar"
    assert closed


# -- refusals -----------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"FOO / HTTP/1.1\r\nHost: x\r\n\r\n", id="invalid-method"),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            id="length-and-chunked",
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            id="two-lengths",
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\n\r\nabc",
            id="length-list",
        ),
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\rX: y\r\n\r\n", id="bare-cr"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n", id="obs-fold"),
        pytest.param(b"GET / HTTP/1.1\r\nHo st: x\r\n\r\n", id="bad-token"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\x01\r\n\r\n", id="control-in-value"),
        pytest.param(b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", id="http2-text"),
        pytest.param(b"GET / HTTP/0.9\r\n\r\n", id="http09"),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n",
            id="coding-besides-chunked",
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc",
            id="chunked-not-last",
        ),
    ],
)
async def test_refusal_malformed_head_answers_json_400_and_closes(
    serve: Serve, raw: bytes
) -> None:
    """A head llhttp or the server refuses gets a JSON 400, no handler, a close."""
    calls: list[str] = []

    async def handler(request: Request) -> StreamResponse:
        calls.append(request.raw_path)
        return Response(body=b"")

    _, port = await serve(handler)
    answers, closed = await raw_answers(port, raw, ["GET"])
    assert answers[0].status == 400
    assert error_of(answers[0])["code"] == "bad_request"
    assert answers[0].header("connection") == "close"
    assert closed
    assert calls == []


async def test_refusal_http10_with_transfer_encoding_is_ambiguous_framing(
    serve: Serve,
) -> None:
    """HTTP/1.0 with Transfer-Encoding: 400 ambiguous_framing; nothing after runs."""
    calls: list[str] = []

    async def handler(request: Request) -> StreamResponse:
        calls.append(request.raw_path)
        return Response(body=b"")

    _, port = await serve(handler)
    raw = (
        b"POST /x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    answers, closed = await raw_answers(port, raw, ["POST"])
    assert answers[0].status == 400
    assert error_of(answers[0])["code"] == "ambiguous_framing"
    assert closed
    assert calls == []


async def test_refusal_comes_after_the_valid_requests_before_it(serve: Serve) -> None:
    """Requests before a malformed one are answered first, in order."""
    _, port = await serve(ok)
    raw = (
        b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"FOO / HTTP/1.1\r\n\r\n"
        b"GET /3 HTTP/1.1\r\n\r\n"
    )
    answers, closed = await raw_answers(port, raw, ["GET", "GET"])
    assert [a.status for a in answers] == [200, 400]
    assert closed


async def test_refusal_bad_chunk_fails_the_body_read_with_400(serve: Serve) -> None:
    """An invalid chunk size reaches the handler as ClientRequestError, then 400."""
    errors: list[BaseException] = []

    async def handler(request: Request) -> StreamResponse:
        try:
            await request.read()
        except ClientRequestError as exc:
            errors.append(exc)
            raise
        return Response(body=b"")

    _, port = await serve(handler)
    raw = (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n"
    )
    answers, closed = await raw_answers(port, raw, ["POST"])
    assert answers[0].status == 400
    assert error_of(answers[0])["code"] == "bad_request"
    assert closed
    assert len(errors) == 1


async def test_refusal_header_bytes_over_limit_answer_431(serve: Serve) -> None:
    """Header fields over ``max_header_bytes`` in total answer 431 and close."""
    _, port = await serve(ok, max_header_bytes=4096)
    many = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(60))
    answers, closed = await raw_answers(
        port, b"GET / HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n", ["GET"]
    )
    assert answers[0].status == 431
    assert error_of(answers[0])["code"] == "headers_too_large"
    assert closed


async def test_refusal_header_count_over_limit_answers_431(serve: Serve) -> None:
    """More than ``max_headers`` fields answer 431 even when they are small."""
    _, port = await serve(ok, max_headers=10)
    many = b"".join(b"X-%d: 1\r\n" % i for i in range(11))
    answers, _ = await raw_answers(
        port, b"GET / HTTP/1.1\r\n" + many + b"\r\n", ["GET"]
    )
    assert answers[0].status == 431


async def test_refusal_one_endless_header_field_answers_431(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A field that grows past the limit before it ends is refused, not buffered on."""
    fed = asyncio.Queue[int]()
    real = Connection.data_received

    def watch(self: Connection, data: bytes) -> None:
        real(self, data)
        fed.put_nowait(len(data))

    monkeypatch.setattr(Connection, "data_received", watch)
    _, port = await serve(ok, max_header_bytes=4096, max_target_bytes=1024)
    client = await RawClient.open(port)
    await client.send(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ")
    for _ in range(16):
        async with asyncio.timeout(TIMEOUT_S):
            await fed.get()  # one read each, so no two pieces coalesce
        await client.send(b"v" * 1024)
    answer = await client.answer()
    assert answer.status == 431
    assert await client.closed()
    client.close()


async def test_refusal_pipelined_bodies_are_not_counted_as_head(serve: Serve) -> None:
    """Large pipelined bodies around small heads never trip the head limit."""

    async def handler(request: Request) -> StreamResponse:
        return Response(body=b"%d" % len(await request.read()))

    _, port = await serve(handler, max_header_bytes=1024, max_target_bytes=1024)
    body = b"b" * 100_000
    one = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    answers, _ = await raw_answers(port, (one + body) * 6, ["POST"] * 6)
    assert [a.body for a in answers] == [b"100000"] * 6


async def test_refusal_request_target_over_limit_answers_431(serve: Serve) -> None:
    """A request target longer than ``max_target_bytes`` answers 431."""
    _, port = await serve(ok, max_target_bytes=1024)
    raw = b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    answers, closed = await raw_answers(port, raw, ["GET"])
    assert answers[0].status == 431
    assert closed


async def test_refusal_trailer_bytes_count_against_the_limit(serve: Serve) -> None:
    """Oversized trailer fields fail the body read with 431."""

    async def handler(request: Request) -> StreamResponse:
        await request.read()
        return Response(body=b"")

    _, port = await serve(handler, max_header_bytes=1024)
    trailer = b"X-T: " + b"v" * 2000 + b"\r\n"
    raw = (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n" + trailer + b"\r\n"
    )
    answers, _ = await raw_answers(port, raw, ["POST"])
    assert answers[0].status == 431


# -- handler failures ---------------------------------------------------------


async def test_failure_handler_exception_answers_500_json(serve: Serve) -> None:
    """An exception before any byte is sent answers a JSON 500 without a traceback."""

    async def handler(request: Request) -> StreamResponse:
        raise ValueError("secret detail")

    _, port = await serve(handler)
    answers, closed = await raw_answers(
        port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", ["GET"]
    )
    assert answers[0].status == 500
    assert b"secret" not in answers[0].body and b"Traceback" not in answers[0].body
    assert error_of(answers[0])["message"] == "internal error in the sidecar"
    assert closed


async def test_failure_head_request_error_has_no_body(serve: Serve) -> None:
    """The 500 for a HEAD request carries no body (a GET's length, as HEAD must)."""

    async def handler(request: Request) -> StreamResponse:
        raise ValueError("boom")

    _, port = await serve(handler)
    client = await RawClient.open(port)
    await client.send(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
    data = await client.read_all()
    client.close()
    assert data.startswith(b"HTTP/1.1 500 ")
    assert data.endswith(b"\r\n\r\n")


async def test_failure_after_response_started_cuts_the_connection(serve: Serve) -> None:
    """An exception after the head went out closes the connection mid-body."""

    async def handler(request: Request) -> StreamResponse:
        resp = StreamResponse()
        await resp.prepare(request)
        await resp.write(b"partial")
        raise ValueError("boom")

    _, port = await serve(handler)
    client = await RawClient.open(port)
    await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(h11.RemoteProtocolError):
        await client.answer()
    client.close()


async def test_failure_client_request_error_answers_its_own_code(serve: Serve) -> None:
    """A ClientRequestError escaping the handler answers its status and code."""

    async def handler(request: Request) -> StreamResponse:
        raise ClientRequestError(ErrorCode.PAYLOAD_TOO_LARGE, "too big")

    _, port = await serve(handler)
    answers, _ = await raw_answers(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", ["GET"])
    assert answers[0].status == 413
    assert error_of(answers[0]) == {
        "message": "too big",
        "type": "invalid_request_error",
        "code": "payload_too_large",
    }


async def test_failure_refusal_before_body_is_read_still_reaches_the_client(
    serve: Serve,
) -> None:
    """A 413 sent while the client still uploads arrives intact, then the close."""

    async def handler(request: Request) -> StreamResponse:
        resp = Response(status=413, body=b"no")
        resp.force_close()
        return resp

    _, port = await serve(handler)
    client = await RawClient.open(port)
    await client.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n")
    client.writer.write(b"a" * 1_000_000)  # more than the socket buffers take
    answer = await client.answer("POST")
    assert answer.status == 413
    assert answer.header("connection") == "close"
    client.writer.transport.abort()


# -- client disconnects -------------------------------------------------------


async def test_disconnect_cancels_the_running_handler(serve: Serve) -> None:
    """A client that goes away mid-request cancels its handler."""
    started = asyncio.Event()
    ended = asyncio.Event()
    cancelled: list[bool] = []

    async def handler(request: Request) -> StreamResponse:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        finally:
            ended.set()
        raise AssertionError("unreachable")

    server, port = await serve(handler)
    client = await RawClient.open(port)
    await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(TIMEOUT_S):
        await started.wait()
    assert server.in_flight == 1
    client.writer.transport.abort()
    async with asyncio.timeout(TIMEOUT_S):
        await ended.wait()
    assert cancelled == [True]


async def test_disconnect_after_response_ended_lets_the_handler_finish(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once its response ended, a handler is not cancelled by the client leaving."""
    lost = asyncio.Event()
    release = asyncio.Event()
    finished = asyncio.Event()
    real = Connection.connection_lost

    def watch(self: Connection, exc: Exception | None) -> None:
        real(self, exc)
        lost.set()

    monkeypatch.setattr(Connection, "connection_lost", watch)

    async def handler(request: Request) -> StreamResponse:
        resp = Response(body=b"done")
        await resp.prepare(request)
        await release.wait()
        finished.set()
        return resp

    server, port = await serve(handler)
    client = await RawClient.open(port)
    await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await client.answer()).body == b"done"
    client.writer.transport.abort()
    async with asyncio.timeout(TIMEOUT_S):
        await lost.wait()
    release.set()
    async with asyncio.timeout(TIMEOUT_S):
        await finished.wait()
    assert server.in_flight == 0


async def test_disconnect_write_raises_inside_the_handler_only(serve: Serve) -> None:
    """A write after the client left raises ConnectionResetError in the handler only."""
    streaming = asyncio.Event()
    outcome: list[type[BaseException]] = []
    done = asyncio.Event()

    async def handler(request: Request) -> StreamResponse:
        if request.raw_path == "/ok":
            return Response(body=b"ok")
        resp = StreamResponse()
        await resp.prepare(request)
        await resp.write(b"data: 1\n\n")
        streaming.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            try:
                await resp.write(b"data: 2\n\n")
            except ConnectionResetError as exc:
                outcome.append(type(exc))
            raise
        finally:
            done.set()
        return resp

    _, port = await serve(handler)
    client = await RawClient.open(port)
    await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(TIMEOUT_S):
        await streaming.wait()
    client.writer.transport.abort()
    async with asyncio.timeout(TIMEOUT_S):
        await done.wait()
    assert outcome == [ConnectionResetError]
    # The server still answers others (and the loop saw no stray error).
    answers, _ = await raw_answers(
        port, b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n", ["GET"]
    )
    assert answers[0].status == 200


# -- 100-continue -------------------------------------------------------------


async def _echo_after_continue(request: Request) -> StreamResponse:
    await request.send_continue()
    return Response(body=await request.read())


async def test_continue_is_sent_before_the_client_sends_its_body(serve: Serve) -> None:
    """``send_continue`` answers ``Expect: 100-continue`` before the body is read."""
    _, port = await serve(_echo_after_continue)
    client = await RawClient.open(port)
    await client.send(
        b"POST / HTTP/1.1\r\nHost: x\r\n"
        b"Expect: 100-continue\r\nContent-Length: 4\r\n\r\n"
    )
    async with asyncio.timeout(TIMEOUT_S):
        interim = await client.reader.readuntil(b"\r\n\r\n")
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    await client.send(b"body")
    answer = await client.answer("POST")
    client.close()
    assert answer.body == b"body"


async def test_continue_through_writer_like_aiohttp(serve: Serve) -> None:
    """``request.writer.write`` sends raw interim bytes, as with aiohttp."""

    async def handler(request: Request) -> StreamResponse:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return Response(body=await request.read())

    _, port = await serve(handler)
    raw = (
        b"POST / HTTP/1.1\r\nHost: x\r\n"
        b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\nhi"
    )
    answers, _ = await raw_answers(port, raw, ["POST"])
    assert answers[0].informational == [100]
    assert answers[0].body == b"hi"


async def test_continue_never_goes_to_an_http10_client(serve: Serve) -> None:
    """No 1xx to an HTTP/1.0 client (RFC 9110 section 15.2)."""
    _, port = await serve(_echo_after_continue)
    client = await RawClient.open(port)
    await client.send(
        b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi"
    )
    data = await client.read_all()
    client.close()
    assert data.startswith(b"HTTP/1.1 200 ")
    assert b"100 Continue" not in data


async def test_continue_with_aiohttp_client_expect100(serve: Serve) -> None:
    """aiohttp's client with ``expect100=True`` gets its body through."""
    _, port = await serve(_echo_after_continue)
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"http://127.0.0.1:{port}/", data=b"x" * 70000, expect100=True
        ) as resp:
            assert len(await resp.read()) == 70000


async def test_continue_refused_without_reading_closes(serve: Serve) -> None:
    """Answering before the body arrived closes the connection after the answer."""
    _, port = await serve(lambda r: asyncio.sleep(0, Response(status=417, body=b"")))
    client = await RawClient.open(port)
    await client.send(
        b"POST / HTTP/1.1\r\nHost: x\r\n"
        b"Expect: 100-continue\r\nContent-Length: 9\r\n\r\n"
    )
    answer = await client.answer("POST")
    assert answer.status == 417
    assert answer.header("connection") == "close"
    assert await client.closed()
    client.close()


# -- the server ---------------------------------------------------------------


async def test_server_start_on_port_zero_returns_the_bound_port(serve: Serve) -> None:
    """``start`` with port 0 returns the address actually bound."""
    server = HTTPServer(ok, max_header_bytes=8192)
    host, port = await server.start("127.0.0.1", 0)
    try:
        assert host == "127.0.0.1" and port > 0
        answers, _ = await raw_answers(
            port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", ["GET"]
        )
        assert answers[0].body == b"ok"
    finally:
        await server.close()


async def test_server_sets_tcp_nodelay_on_accepted_sockets(serve: Serve) -> None:
    """Accepted sockets have TCP_NODELAY, so small answers are not delayed."""

    async def handler(request: Request) -> StreamResponse:
        assert request.transport is not None
        sock = request.transport.get_extra_info("socket")
        return Response(
            body=b"%d" % sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        )

    _, port = await serve(handler)
    answers, _ = await raw_answers(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", ["GET"])
    assert answers[0].body != b"0"


async def test_server_stop_accepting_keeps_open_connections_serving(
    serve: Serve,
) -> None:
    """After ``stop_accepting`` new connections are refused; open ones still work."""
    server, port = await serve(ok)
    client = await RawClient.open(port)
    await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await client.answer()
    server.stop_accepting()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await client.answer()).body == b"ok"
    client.close()


async def test_server_close_idle_closes_idle_and_ends_busy_after_answer(
    serve: Serve,
) -> None:
    """``close_idle`` closes idle connections; busy ones close after their answer."""
    started = asyncio.Event()
    release = asyncio.Event()

    async def handler(request: Request) -> StreamResponse:
        if request.raw_path == "/slow":
            started.set()
            await release.wait()
        return Response(body=b"ok")

    server, port = await serve(handler)
    idle = await RawClient.open(port)
    await idle.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await idle.answer()
    busy = await RawClient.open(port)
    await busy.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(TIMEOUT_S):
        await started.wait()
    server.close_idle()
    assert await idle.closed()
    release.set()
    answer = await busy.answer()
    assert answer.header("connection") == "close"
    assert await busy.closed()
    idle.close()
    busy.close()


async def test_server_close_cancels_running_handlers(serve: Serve) -> None:
    """``close`` cancels unfinished handlers and leaves no connection open."""
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def handler(request: Request) -> StreamResponse:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("unreachable")

    server, port = await serve(handler)
    client = await RawClient.open(port)
    await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(TIMEOUT_S):
        await started.wait()
    await server.close()
    assert cancelled.is_set()
    assert server.connections == set() and server.in_flight == 0
    client.close()


def test_server_on_uvloop_pipelines_streams_and_uploads() -> None:
    """Under uvloop: pipelined answers in order, a chunked answer, a 1 MiB upload."""

    async def handler(request: Request) -> StreamResponse:
        if request.raw_path == "/stream":
            return await _stream(request)
        return Response(body=b"%d" % len(await request.read()))

    async def scenario() -> None:
        server = HTTPServer(handler, max_header_bytes=8192)
        _, port = await server.start("127.0.0.1", 0)
        try:
            upload = b"x" * (1 << 20)
            raw = (
                b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
                b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n"
                b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                % len(upload)
            ) + upload
            answers, _ = await raw_answers(port, raw, ["GET", "GET", "POST"])
            assert [a.body for a in answers] == [
                b"0",
                b"hello world",
                b"%d" % len(upload),
            ]
            assert answers[1].header("transfer-encoding") == "chunked"
        finally:
            await server.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())
