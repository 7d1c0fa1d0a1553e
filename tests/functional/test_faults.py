"""Every upstream and client fault gives a clear answer and leaks nothing.

Faults: upstream refused, reset before and during the body, stalled before
the first byte and between chunks, a slow first byte inside the timeout, a
bad header from the upstream, and the client going away. After each one,
the test asserts what the client saw and that no request, upstream
connection or task of the sidecar is left behind.
"""

from __future__ import annotations

import asyncio
import json
import socket

import aiohttp
import pytest
from aiohttp import web

from sidecar.app import Sidecar
from tests.conftest import SidecarFactory, data_url
from tests.helpers.fake_upstream import FakeUpstream, RawUpstream, read_request_head, reset
from tests.helpers.rawhttp import exchange

FAST_TIMEOUTS = """
upstream:
  connect_timeout: 500ms
  first_byte_timeout: 400ms
  idle_timeout: 400ms
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _assert_nothing_left(sidecar: Sidecar) -> None:
    """No request in flight, no upstream request open, no stray task."""
    # Closing a connection completes on a later loop turn; give it a few.
    for _ in range(100):
        if (
            sidecar.proxy.in_flight == 0
            and sidecar.upstream.in_flight == 0
            and sidecar.upstream.open_connections == len(sidecar.upstream._idle)
        ):
            break
        await asyncio.sleep(0.01)
    assert sidecar.proxy.in_flight == 0
    assert sidecar.upstream.in_flight == 0
    # Only idle pooled connections may stay open.
    assert sidecar.upstream.open_connections == len(sidecar.upstream._idle)
    stray = [
        t for t in asyncio.all_tasks()
        if t is not asyncio.current_task() and not t.get_name().startswith("sidecar.")
        and "RequestHandler" in repr(t.get_coro())
        and "start" not in repr(t.get_coro())
    ]
    assert stray == []


def _error(body: bytes) -> dict[str, str]:
    doc = json.loads(body)
    assert set(doc) == {"error"}
    assert set(doc["error"]) == {"message", "type", "code"}
    return doc["error"]


async def test_fault_upstream_refused_gives_502(make_sidecar: SidecarFactory) -> None:
    """A refused connection is a 502 JSON error, not a dropped connection."""
    sidecar = await make_sidecar(f"http://127.0.0.1:{_free_port()}", FAST_TIMEOUTS)
    async with aiohttp.ClientSession() as s, s.get(data_url(sidecar) + "/v1/models") as resp:
        assert resp.status == 502
        err = _error(await resp.read())
    assert err["code"] == "upstream_failed"
    assert "cannot connect to the upstream" in err["message"]
    text = sidecar.metrics.render(["text/plain"])[0].decode()
    assert 'sidecar_upstream_errors_total{kind="upstream_failed",route="models"} 1' in text
    await _assert_nothing_left(sidecar)


async def test_fault_upstream_reset_before_reply_gives_502(make_sidecar: SidecarFactory) -> None:
    """A reset after the request arrives, before any reply, is a 502."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        reset(writer)

    raw = await RawUpstream(script).start()
    try:
        sidecar = await make_sidecar(raw.url, FAST_TIMEOUTS)
        async with aiohttp.ClientSession() as s, s.get(data_url(sidecar) + "/x") as resp:
            assert resp.status == 502
            assert _error(await resp.read())["code"] == "upstream_failed"
        await _assert_nothing_left(sidecar)
    finally:
        await raw.close()


async def test_fault_upstream_reset_mid_body_cuts_client(make_sidecar: SidecarFactory) -> None:
    """A reset mid-body cuts the client's connection: a short body never looks complete."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100)
        await writer.drain()
        await asyncio.sleep(0.05)
        reset(writer)

    raw = await RawUpstream(script).start()
    try:
        sidecar = await make_sidecar(raw.url, FAST_TIMEOUTS)
        async with aiohttp.ClientSession() as s, s.get(data_url(sidecar) + "/x") as resp:
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
        await _assert_nothing_left(sidecar)
    finally:
        await raw.close()


async def test_fault_chunked_stream_cut_is_not_terminated(make_sidecar: SidecarFactory) -> None:
    """A chunked stream the upstream cuts reaches the client without its last chunk."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n" b"d\r\ndata: 1\n\n\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()

    raw = await RawUpstream(script).start()
    try:
        sidecar = await make_sidecar(raw.url, FAST_TIMEOUTS)
        async with aiohttp.ClientSession() as s, s.get(data_url(sidecar) + "/x") as resp:
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
        await _assert_nothing_left(sidecar)
    finally:
        await raw.close()


async def test_fault_stalled_first_byte_gives_504(make_sidecar: SidecarFactory) -> None:
    """An upstream that never answers gives 504 after first_byte_timeout."""
    release = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        await release.wait()

    raw = await RawUpstream(script).start()
    try:
        sidecar = await make_sidecar(raw.url, FAST_TIMEOUTS)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        async with aiohttp.ClientSession() as s, s.get(data_url(sidecar) + "/x") as resp:
            assert resp.status == 504
            assert _error(await resp.read())["code"] == "upstream_timeout"
        assert 0.35 < loop.time() - t0 < 3.0
        await _assert_nothing_left(sidecar)
    finally:
        release.set()
        await raw.close()


async def test_fault_idle_gap_mid_body_cuts(make_sidecar: SidecarFactory) -> None:
    """A stream that goes silent longer than idle_timeout is cut, not held forever."""
    release = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await release.wait()

    raw = await RawUpstream(script).start()
    try:
        sidecar = await make_sidecar(raw.url, FAST_TIMEOUTS)
        async with aiohttp.ClientSession() as s, s.get(data_url(sidecar) + "/x") as resp:
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
        await _assert_nothing_left(sidecar)
    finally:
        release.set()
        await raw.close()


async def test_fault_long_stream_with_short_gaps_survives(fake_upstream: FakeUpstream, make_sidecar: SidecarFactory) -> None:
    """No total deadline: a stream longer than every timeout lives while chunks keep coming."""

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for k in range(12):
            await resp.write(f"data: {k}\n\n".encode())
            await asyncio.sleep(0.1)
        await resp.write_eof()
        return resp

    fake_upstream.handler = handler
    sidecar = await make_sidecar(fake_upstream.url, FAST_TIMEOUTS)
    async with aiohttp.ClientSession() as s, s.get(data_url(sidecar) + "/x") as resp:
        body = await resp.read()
    assert body.count(b"data: ") == 12


async def test_fault_slow_first_byte_inside_timeout_succeeds(fake_upstream: FakeUpstream, make_sidecar: SidecarFactory) -> None:
    """A first byte that arrives inside first_byte_timeout is served normally."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.2)
        return web.Response(text="late but fine")

    fake_upstream.handler = handler
    sidecar = await make_sidecar(fake_upstream.url, FAST_TIMEOUTS)
    async with aiohttp.ClientSession() as s, s.get(data_url(sidecar) + "/x") as resp:
        assert resp.status == 200
        assert await resp.text() == "late but fine"


@pytest.mark.parametrize(
    "bad",
    [b"X-Bad: a\x01b\r\n", b"X-Bad: a\x7fb\r\n", b"X-Bad: a\x00b\r\n"],
    ids=["soh", "del", "nul"],
)
async def test_fault_control_char_header_dropped(make_sidecar: SidecarFactory, bad: bytes) -> None:
    """An upstream header holding a control character is dropped, the reply still served."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n" + bad + b"X-Good: yes\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    raw = await RawUpstream(script).start()
    try:
        sidecar = await make_sidecar(raw.url, FAST_TIMEOUTS)
        resp = await exchange(sidecar.data_address[1], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # type: ignore[index]
        assert resp.status in (200, 502)
        if resp.status == 200:
            assert resp.header("x-bad") is None
            assert resp.header("x-good") == "yes"
            assert resp.body == b"ok"
        else:
            assert _error(resp.body)["code"] == "upstream_failed"
        await _assert_nothing_left(sidecar)
    finally:
        await raw.close()


async def test_fault_bare_cr_header_gives_502(make_sidecar: SidecarFactory) -> None:
    """A header split by a bare CR is invalid HTTP: 502, never a dropped connection."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Bad: a\rInjected: 1\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    raw = await RawUpstream(script).start()
    try:
        sidecar = await make_sidecar(raw.url, FAST_TIMEOUTS)
        resp = await exchange(sidecar.data_address[1], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # type: ignore[index]
        assert resp.header("injected") is None
        assert resp.status in (200, 502)
        if resp.status == 502:
            assert _error(resp.body)["code"] == "upstream_failed"
        await _assert_nothing_left(sidecar)
    finally:
        await raw.close()


async def test_fault_garbage_reply_gives_502(make_sidecar: SidecarFactory) -> None:
    """Bytes that are not HTTP at all give 502."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()

    raw = await RawUpstream(script).start()
    try:
        sidecar = await make_sidecar(raw.url, FAST_TIMEOUTS)
        async with aiohttp.ClientSession() as s, s.get(data_url(sidecar) + "/x") as resp:
            assert resp.status == 502
            assert "invalid HTTP" in _error(await resp.read())["message"]
        await _assert_nothing_left(sidecar)
    finally:
        await raw.close()


async def test_fault_client_gone_cancels_upstream(fake_upstream: FakeUpstream, make_sidecar: SidecarFactory) -> None:
    """A client that disconnects mid-stream cancels the upstream request within a second."""
    sent_first = asyncio.Event()
    never = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: 1\n\n")
        sent_first.set()
        await never.wait()
        return resp

    fake_upstream.handler = handler
    sidecar = await make_sidecar(fake_upstream.url)
    reader, writer = await asyncio.open_connection(*sidecar.data_address)  # type: ignore[misc]
    writer.write(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await sent_first.wait()
    await reader.readuntil(b"data: 1\n\n")
    writer.transport.abort()
    async with asyncio.timeout(1.0):
        await fake_upstream.disconnected.wait()
    await _assert_nothing_left(sidecar)


async def test_fault_http10_with_transfer_encoding_refused(fake_upstream: FakeUpstream, make_sidecar: SidecarFactory) -> None:
    """HTTP/1.0 with Transfer-Encoding is ambiguous framing: 400 and the connection closed."""
    sidecar = await make_sidecar(fake_upstream.url)
    port = sidecar.data_address[1]  # type: ignore[index]
    raw = b"POST /v1/x HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    resp = await exchange(port, raw)
    assert resp.status == 400
    assert _error(resp.body)["code"] == "ambiguous_framing"
    assert resp.closed
    # With a request pipelined behind it, the smuggled one never runs either.
    resp = await exchange(port, raw + b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
    assert resp.status == 400
    assert _error(resp.body)["code"] in ("ambiguous_framing", "bad_request")
    assert resp.closed
    assert fake_upstream.calls == 0


async def test_fault_body_over_limit_gives_413(fake_upstream: FakeUpstream, make_sidecar: SidecarFactory) -> None:
    """A declared body over limits.max_body_bytes is refused with 413 before reaching the upstream."""
    sidecar = await make_sidecar(fake_upstream.url, "limits:\n  max_body_bytes: 1KiB\n")
    raw = b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 2048\r\n\r\n" + b"a" * 2048
    resp = await exchange(sidecar.data_address[1], raw)  # type: ignore[index]
    assert resp.status == 413
    assert _error(resp.body)["code"] == "payload_too_large"
    assert fake_upstream.calls == 0
    text = sidecar.metrics.render(["text/plain"])[0].decode()
    assert 'sidecar_client_errors_total{reason="payload_too_large"} 1' in text


async def test_fault_chunked_body_over_limit_gives_413(fake_upstream: FakeUpstream, make_sidecar: SidecarFactory) -> None:
    """A chunked body that grows past the limit is refused with 413 and nothing is answered by the upstream."""
    sidecar = await make_sidecar(fake_upstream.url, "limits:\n  max_body_bytes: 100KiB\n")
    chunk = b"a" * 8192
    body = b"".join(b"%x\r\n%b\r\n" % (len(chunk), chunk) for _ in range(20)) + b"0\r\n\r\n"
    raw = b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    resp = await exchange(sidecar.data_address[1], raw)  # type: ignore[index]
    assert resp.status == 413
    assert _error(resp.body)["code"] == "payload_too_large"
    await _assert_nothing_left(sidecar)


async def test_fault_headers_over_limit_give_431(fake_upstream: FakeUpstream, make_sidecar: SidecarFactory) -> None:
    """Header fields over limits.max_header_bytes give 431 in the OpenAI error shape."""
    sidecar = await make_sidecar(fake_upstream.url, "limits:\n  max_header_bytes: 4KiB\n")
    many = "".join(f"X-H{i}: {'v' * 100}\r\n" for i in range(60))
    resp = await exchange(sidecar.data_address[1], f"GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n".encode())  # type: ignore[index]
    assert resp.status == 431
    assert _error(resp.body)["code"] == "headers_too_large"
    huge = f"GET / HTTP/1.1\r\nHost: x\r\nX-Big: {'v' * 20000}\r\n\r\n".encode()
    resp = await exchange(sidecar.data_address[1], huge)  # type: ignore[index]
    assert resp.status == 431
    assert fake_upstream.calls == 0


async def test_fault_malformed_request_gets_json_400(fake_upstream: FakeUpstream, make_sidecar: SidecarFactory) -> None:
    """A request aiohttp's parser refuses still gets a JSON error, never plain text."""
    sidecar = await make_sidecar(fake_upstream.url)
    resp = await exchange(sidecar.data_address[1], b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab")  # type: ignore[index]
    assert resp.status == 400
    assert _error(resp.body)["code"] == "bad_request"
    assert fake_upstream.calls == 0


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_fault_stale_keepalive_retried_once(make_sidecar: SidecarFactory, method: str) -> None:
    """A reused connection that drops before any reply byte is retried once on a fresh one."""
    seen: list[bytes] = []
    dropped = False

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal dropped
        served = 0
        while True:
            head = await read_request_head(reader)
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            if head.split(b" ")[1] == b"/x":
                seen.append(head.split(b" ", 1)[0])
                if served and not dropped:
                    # The first /x on a connection that served before: the
                    # request arrived, then the connection drops unanswered.
                    dropped = True
                    writer.transport.abort()
                    return
            served += 1
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    raw = await RawUpstream(script).start()
    try:
        sidecar = await make_sidecar(raw.url, FAST_TIMEOUTS)
        statuses = []
        async with aiohttp.ClientSession() as s:
            for _ in range(3):
                body = b"b" if method == "POST" else None
                async with s.request(method, data_url(sidecar) + "/x", data=body) as resp:
                    await resp.read()
                    statuses.append(resp.status)
        assert dropped
        assert statuses == [200, 200, 200]
        assert len(seen) == 4
    finally:
        await raw.close()
