"""The data port's quick handler (sidecar/http): answers, order, corking, ``whole``.

Driven over raw loopback sockets against the real ``HTTPServer`` with a
``quick`` function, answers parsed by h11 (``RawClient`` from
test_httpserver.py). Rules covered: a quick answer goes out byte for byte
and the handler never runs for it; None, a raise or an unfinished body
leave the request to the handler; pipelined answers keep request order
whichever path answers them, also before a refusal and past ``CORK_BYTES``
of held answers; a connection lost while answers are held raises and logs
nothing; and ``Body.whole`` reads nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import pytest

from sidecar.http import HTTPServer, Request, Response, StreamResponse
from sidecar.http.connection import CORK_BYTES, Connection
from sidecar.http.reader import QUICK_BODY_BYTES
from sidecar.http.request import EMPTY_BODY, Body
from sidecar.http.server import QuickHandler
from tests.test_httpserver import TIMEOUT_S, RawClient, error_of, raw_answers

Handler = Callable[[Request], Awaitable[StreamResponse]]
Serve = Callable[[Handler, QuickHandler], Awaitable[tuple[HTTPServer, int]]]


def framed(body: bytes) -> bytes:
    """A complete keep-alive answer, as a quick handler returns it."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Quick: 1\r\n\r\n" % len(body)
    return head + body


def get(path: str) -> bytes:
    return b"GET %b HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode()


def quick_for_q(request: Request, body: bytes) -> bytes | None:
    """Answers targets under /q with their own path; passes the rest on."""
    path = request.raw_path
    return framed(path.encode()) if path.startswith("/q") else None


def counting(calls: list[str]) -> Handler:
    """A handler that records each target and answers it with its path."""

    async def handler(request: Request) -> StreamResponse:
        calls.append(request.raw_path)
        return Response(body=request.raw_path.encode())

    return handler


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start servers with a quick handler; all are closed, with no loop error."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    servers: list[HTTPServer] = []

    async def start(handler: Handler, quick: QuickHandler) -> tuple[HTTPServer, int]:
        server = HTTPServer(handler, max_header_bytes=8192, quick=quick)
        _, port = await server.start("127.0.0.1", 0)
        servers.append(server)
        return server, port

    yield start
    for server in servers:
        await server.close()
    assert errors == []


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


# -- one request --------------------------------------------------------------


async def test_quick_answer_is_sent_as_is_without_the_handler(serve: Serve) -> None:
    """A quick answer reaches the client byte for byte; the handler is not called."""
    calls: list[str] = []
    _, port = await serve(counting(calls), quick_for_q)
    client = await RawClient.open(port)
    await client.send(get("/q1"))
    expected = framed(b"/q1")
    async with asyncio.timeout(TIMEOUT_S):
        data = await client.reader.readexactly(len(expected))
    client.close()
    assert data == expected
    assert calls == []


async def test_quick_none_passes_the_request_to_the_handler(serve: Serve) -> None:
    """A request the quick handler returns None for is answered by the handler."""
    calls: list[str] = []
    consulted: list[str] = []

    def quick(request: Request, body: bytes) -> bytes | None:
        consulted.append(request.raw_path)
        return None

    _, port = await serve(counting(calls), quick)
    answers, _ = await raw_answers(port, get("/p"), ["GET"])
    assert answers[0].body == b"/p" and answers[0].header("x-quick") is None
    assert calls == ["/p"]
    assert consulted and set(consulted) == {"/p"}


async def test_quick_raising_goes_to_the_handler_and_keeps_the_connection(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    """A raising quick handler is logged; the handler answers; the connection lives."""
    calls: list[str] = []

    def quick(request: Request, body: bytes) -> bytes | None:
        if request.raw_path == "/boom":
            raise RuntimeError("quick handler fault")
        return quick_for_q(request, body)

    _, port = await serve(counting(calls), quick)
    client = await RawClient.open(port)
    await client.send(get("/boom"))
    first = await client.answer()
    await client.send(get("/q2"))
    second = await client.answer()
    client.close()
    assert (first.status, first.body) == (200, b"/boom")
    assert (second.body, second.header("x-quick")) == (b"/q2", "1")
    assert calls == ["/boom"]
    failed = [
        r for r in caplog.records if r.getMessage() == "server.quick_handler_failed"
    ]
    assert failed and all(r.levelno == logging.ERROR and r.exc_info for r in failed)


# -- several requests ---------------------------------------------------------


async def test_quick_pipelined_answers_keep_request_order(serve: Serve) -> None:
    """Quick, slow, quick, handled in one write: answered in that order."""
    calls: list[str] = []
    started = asyncio.Event()
    release = asyncio.Event()

    async def handler(request: Request) -> StreamResponse:
        calls.append(request.raw_path)
        if request.raw_path == "/slow":
            started.set()
            await release.wait()
        return Response(body=request.raw_path.encode())

    _, port = await serve(handler, quick_for_q)
    client = await RawClient.open(port)
    await client.send(get("/q1") + get("/slow") + get("/q3") + get("/p4"))
    async with asyncio.timeout(TIMEOUT_S):
        await started.wait()
    first = await client.answer()
    # /q3 must wait behind /slow, and the held /q3 must precede /p4's write.
    release.set()
    rest = [await client.answer() for _ in range(3)]
    client.close()
    assert [a.body for a in [first, *rest]] == [b"/q1", b"/slow", b"/q3", b"/p4"]
    assert [a.header("x-quick") for a in [first, *rest]] == ["1", None, "1", None]
    assert calls == ["/slow", "/p4"]


@pytest.mark.parametrize(
    "lead", [pytest.param(b"", id="first"), pytest.param(get("/p"), id="after-handler")]
)
async def test_quick_answer_then_malformed_request_precedes_the_400(
    serve: Serve, lead: bytes
) -> None:
    """A quick answer pipelined before a bad request line leaves before the 400."""
    calls: list[str] = []
    _, port = await serve(counting(calls), quick_for_q)
    methods = ["GET"] * (3 if lead else 2)
    answers, closed = await raw_answers(
        port, lead + get("/q") + b"FOO / HTTP/1.1\r\n\r\n", methods
    )
    assert [a.status for a in answers[-2:]] == [200, 400]
    assert answers[-2].body == b"/q"
    assert error_of(answers[-1])["code"] == "bad_request"
    assert answers[-1].header("connection") == "close"
    assert closed
    assert calls == (["/p"] if lead else [])


async def test_quick_keepalive_many_sequential_requests_are_all_answered(
    serve: Serve,
) -> None:
    """One connection carries 50 quick answers in a row, none through the handler."""
    calls: list[str] = []
    _, port = await serve(counting(calls), quick_for_q)
    client = await RawClient.open(port)
    bodies = []
    for i in range(50):
        await client.send(get(f"/q{i}"))
        bodies.append((await client.answer()).body)
    client.close()
    assert bodies == [f"/q{i}".encode() for i in range(50)]
    assert calls == []


async def test_quick_answers_over_cork_bytes_all_arrive_in_order(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over CORK_BYTES of quick answers in one write: all arrive, whole, in order."""
    size, count = 100 * 1024, 5
    assert size * count > CORK_BYTES

    def body_for(path: str) -> bytes:
        return path.encode()[-1:] * size

    def quick(request: Request, body: bytes) -> bytes | None:
        return framed(body_for(request.raw_path))

    async def handler(request: Request) -> StreamResponse:
        # Reached only if the quick path declines (a slow reader); same bytes.
        return Response(body=body_for(request.raw_path))

    held: list[int] = []
    real_cork = Connection.cork

    def watch_cork(self: Connection, data: bytes) -> None:
        real_cork(self, data)
        held.append(self._corked_bytes)

    monkeypatch.setattr(Connection, "cork", watch_cork)
    _, port = await serve(handler, quick)
    client = await RawClient.open(port)
    paths = [f"/big{i}" for i in range(count)]
    await client.send(b"".join(get(p) for p in paths))
    async with asyncio.timeout(TIMEOUT_S):
        bodies = [(await client.answer()).body for _ in paths]
    client.close()
    assert [len(b) for b in bodies] == [size] * count
    assert bodies == [body_for(p) for p in paths]
    # Holding stops once CORK_BYTES are held: at most one answer past it.
    assert held and max(held) < CORK_BYTES + size


# -- bodies -------------------------------------------------------------------


async def test_quick_body_in_two_writes_is_answered_whole(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body sent in two writes is answered with all of it; ``whole`` joins it."""
    first_part, complete = asyncio.Event(), asyncio.Event()
    seen: list[bytes | None] = []
    tried_complete: list[bool] = []
    real_feed, real_eof = Body.feed, Body.feed_eof

    def watch_feed(self: Body, data: bytes) -> None:
        real_feed(self, data)
        first_part.set()

    def watch_eof(self: Body) -> None:
        real_eof(self)
        complete.set()

    monkeypatch.setattr(Body, "feed", watch_feed)
    monkeypatch.setattr(Body, "feed_eof", watch_eof)

    def quick(request: Request, body: bytes) -> bytes | None:
        tried_complete.append(request.content.complete)
        seen.append(body)
        return framed(b"quick:" + body)

    async def handler(request: Request) -> StreamResponse:
        await complete.wait()  # whole() once all of it is there, unread
        seen.append(request.content.whole())
        return Response(body=b"handler:" + await request.read())

    _, port = await serve(handler, quick)
    client = await RawClient.open(port)
    await client.send(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n\r\nabcd")
    async with asyncio.timeout(TIMEOUT_S):
        await first_part.wait()  # the server has the first half as a chunk
    await client.send(b"efgh")
    answer = await client.answer("POST")
    client.close()
    assert answer.body in (b"quick:abcdefgh", b"handler:abcdefgh")
    assert seen == [b"abcdefgh"]
    assert all(tried_complete)  # never tried while the body was arriving


class _FakeConn:
    """What a Body needs of its connection: the loop and the buffered count."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.buffered = 0

    def body_buffered(self, delta: int) -> None:
        self.buffered += delta


def _body(*chunks: bytes, complete: bool = True) -> tuple[Body, _FakeConn]:
    conn = _FakeConn()
    body = Body(cast("Connection", conn))
    for chunk in chunks:
        body.feed(chunk)
    if complete:
        body.feed_eof()
    return body, conn


@pytest.mark.parametrize("size", [10, 200 * 1024], ids=["held", "queued"])
async def test_quick_gets_the_whole_body_small_or_large(serve: Serve, size: int) -> None:
    """Held (small) or queued (over QUICK_BODY_BYTES): every byte, whoever answers.

    A large body still arriving when the worker takes the request goes to
    the handler; one that has arrived goes to the quick handler whole.
    """
    sent = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    seen: list[bytes] = []

    def quick(request: Request, body: bytes) -> bytes | None:
        seen.append(body)
        return framed(b"%d" % len(body))

    async def handler(request: Request) -> StreamResponse:
        return Response(body=b"%d" % len(await request.read()))

    _, port = await serve(handler, quick)
    client = await RawClient.open(port)
    await client.send(
        b"POST /q HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b" % (size, sent)
    )
    answer = await client.answer("POST")
    client.close()
    assert answer.body == b"%d" % size
    assert seen in ([sent], [])
    if size <= QUICK_BODY_BYTES:
        assert seen == [sent]  # held: offered before it was ever queued


async def test_quick_declined_small_request_reaches_the_handler_with_its_body(
    serve: Serve,
) -> None:
    """A held request the quick handler passes on is queued with all of its body."""
    def quick(request: Request, body: bytes) -> bytes | None:
        return None

    async def echo(request: Request) -> StreamResponse:
        return Response(body=b"handler:" + await request.read())

    _, port = await serve(echo, quick)
    client = await RawClient.open(port)
    await client.send(
        b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello" + get("/p2")
    )
    first = await client.answer("POST")
    second = await client.answer()
    client.close()
    assert (first.body, second.body) == (b"handler:hello", b"handler:")


async def test_quick_after_hook_runs_once_the_answers_are_written(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """after_quick runs after a read's quick answers were handed to the transport."""
    events: list[str] = []

    def quick(request: Request, body: bytes) -> bytes | None:
        events.append("answer " + request.raw_path)
        return framed(request.raw_path.encode())

    server, port = await serve(counting([]), quick)
    written = 0
    real_uncork = Connection.uncork

    def uncork(conn: Connection) -> None:
        nonlocal written
        real_uncork(conn)
        written += 1
        events.append("written")

    server.after_quick = lambda: events.append(f"after ({written} written)")
    monkeypatch.setattr(Connection, "uncork", uncork)
    client = await RawClient.open(port)
    await client.send(get("/q1") + get("/q2"))
    bodies = [(await client.answer()).body for _ in range(2)]
    client.close()
    assert bodies == [b"/q1", b"/q2"]
    assert events == ["answer /q1", "answer /q2", "written", "after (1 written)"]


async def test_body_whole_incomplete_is_none() -> None:
    """``whole`` is None until the body has ended, and for a failed body."""
    body, _ = _body(b"ab", complete=False)
    assert body.whole() is None
    body.feed(b"cd")
    body.feed_eof()
    assert body.whole() == b"abcd"
    failed, _ = _body(b"ab", complete=False)
    failed.fail(ConnectionResetError("gone"))
    assert failed.whole() is None


async def test_body_whole_single_chunk_reads_nothing() -> None:
    """One chunk: ``whole`` returns it, leaves it buffered and readable."""
    body, conn = _body(b"hello")
    assert body.whole() == b"hello"
    assert body.whole() == b"hello"
    assert conn.buffered == 5
    assert await body.read() == b"hello"
    assert conn.buffered == 0


async def test_body_whole_chunks_are_joined_into_one_kept_chunk() -> None:
    """Several chunks: ``whole`` joins them, and the reader then gets one chunk."""
    body, conn = _body(b"ab", b"cd", b"ef")
    assert body.whole() == b"abcdef"
    assert conn.buffered == 6
    assert await body.readany() == b"abcdef"
    assert await body.readany() == b""


async def test_body_whole_empty_complete_body_is_empty_bytes() -> None:
    """A complete body with no bytes (and EMPTY_BODY) gives b""."""
    body, _ = _body()
    assert body.whole() == b""
    assert EMPTY_BODY.whole() == b""


async def test_body_whole_after_a_read_is_none() -> None:
    """Once a reader took part of the body, ``whole`` is None."""
    body, _ = _body(b"ab", b"cd")
    assert await body.readany() == b"ab"
    assert body.whole() is None
    assert await body.readany() == b"cd"
    assert body.whole() is None


# -- losing the connection ----------------------------------------------------


def _watch_lost(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    lost = asyncio.Event()
    real = Connection.connection_lost

    def watch(self: Connection, exc: Exception | None) -> None:
        real(self, exc)
        lost.set()

    monkeypatch.setattr(Connection, "connection_lost", watch)
    return lost


async def test_quick_client_closing_after_sending_logs_no_error(
    serve: Serve, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that sends and closes at once costs no error and no exception."""
    caplog.set_level(logging.DEBUG, logger="sidecar.server")
    lost = _watch_lost(monkeypatch)
    asked: list[str] = []

    def quick(request: Request, body: bytes) -> bytes | None:
        asked.append(request.raw_path)
        return framed(b"x" * 1000)

    server, port = await serve(counting([]), quick)
    client = await RawClient.open(port)
    client.writer.write(get("/q"))
    client.close()
    async with asyncio.timeout(TIMEOUT_S):
        await lost.wait()
    assert asked == ["/q"]
    assert server.connections == set()
    assert errors_logged(caplog) == []


async def test_quick_connection_lost_before_uncork_drops_held_answers(
    serve: Serve, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Lost with answers held: the uncork finds nothing to write and nothing fails."""
    caplog.set_level(logging.DEBUG, logger="sidecar.server")
    lost = _watch_lost(monkeypatch)
    uncorked = asyncio.Event()
    states: list[tuple[bool, bool]] = []
    real_corked = HTTPServer.corked
    real_uncork_all = HTTPServer._uncork_all

    def lose_then_cork(self: HTTPServer, conn: Connection) -> None:
        # The loss is reported (call_soon) before the uncork is scheduled.
        assert conn.transport is not None
        conn.transport.abort()
        real_corked(self, conn)

    def watch_uncork(self: HTTPServer) -> None:
        states.extend((c.lost, c._corked is None) for c in self._corked)
        real_uncork_all(self)
        uncorked.set()

    monkeypatch.setattr(HTTPServer, "corked", lose_then_cork)
    monkeypatch.setattr(HTTPServer, "_uncork_all", watch_uncork)
    server, port = await serve(counting([]), quick_for_q)
    client = await RawClient.open(port)
    await client.send(get("/q1") + get("/q2"))
    async with asyncio.timeout(TIMEOUT_S):
        await lost.wait()
        await uncorked.wait()
    client.close()
    assert states == [(True, True)]
    assert server.connections == set()
    assert errors_logged(caplog) == []
