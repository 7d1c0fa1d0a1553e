"""The data port is transparent: through the sidecar, the upstream receives
and the client gets what a direct connection would give, less the
hop-by-hop header fields (RFC 9110 section 7.6.1) and the forwarding fields
the sidecar sets itself.

Each shape is sent twice with the same raw bytes: once straight to the fake
upstream and once through the real sidecar, and the two are compared.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from sidecar.app import Sidecar
from tests.conftest import SidecarFactory, data_url
from tests.helpers.fake_upstream import FakeUpstream, Received, sse_handler
from tests.helpers.rawhttp import RawResponse, exchange

# Fields a proxy legitimately changes: framing and connection management
# (hop-by-hop), the Host it connects to, and forwarding information.
_REQUEST_IGNORED = {
    "host", "connection", "keep-alive", "transfer-encoding", "te", "upgrade",
    "proxy-connection", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
    "forwarded", "content-length",
}
_RESPONSE_IGNORED = {"date", "connection", "keep-alive", "transfer-encoding"}


def _request_view(r: Received) -> tuple[str, str, list[tuple[str, str]], str]:
    fields = [(k.lower(), v) for k, v in r.headers if k.lower() not in _REQUEST_IGNORED]
    return r.method, r.target, fields, hashlib.sha256(r.body).hexdigest()


def _response_view(r: RawResponse) -> tuple[int, list[tuple[str, str]], bytes]:
    # Order between different field names carries no meaning (RFC 9110
    # section 5.3); order among fields of one name does, and a stable sort
    # by name keeps it.
    fields = sorted(((k, v) for k, v in r.headers if k not in _RESPONSE_IGNORED),
                    key=lambda kv: kv[0])
    return r.status, fields, r.body


async def _summary(request: web.Request) -> web.StreamResponse:
    """Answer with what arrived, less the header fields a proxy may change."""
    body = await request.read()
    return web.json_response({
        "method": request.method,
        "target": request.raw_path,
        "body_sha256": hashlib.sha256(body).hexdigest(),
    })


Compare = Callable[[bytes], Awaitable[tuple[RawResponse, RawResponse]]]


@pytest.fixture
async def compare(fake_upstream: FakeUpstream, make_sidecar: SidecarFactory) -> Compare:
    sidecar = await make_sidecar(fake_upstream.url, "limits:\n  max_body_bytes: 64MiB\n")
    fake_upstream.handler = _summary
    assert sidecar.data_address is not None
    port = sidecar.data_address[1]

    async def run(raw: bytes) -> tuple[RawResponse, RawResponse]:
        direct = await exchange(fake_upstream.port, raw)
        seen_direct = fake_upstream.received[-1]
        proxied = await exchange(port, raw)
        seen_proxied = fake_upstream.received[-1]
        assert fake_upstream.calls >= 2
        assert _request_view(seen_proxied) == _request_view(seen_direct)
        assert _response_view(proxied) == _response_view(direct)
        return direct, proxied

    return run


def _req(method: str, target: str, *headers: str, body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: example.test", *headers]
    if body and not any(h.lower().startswith(("content-length", "transfer-encoding")) for h in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_proxy_methods_match_direct(compare: Compare, method: str) -> None:
    """Every method reaches the upstream unchanged and its answer comes back."""
    body = b'{"x": 1}' if method in ("POST", "PUT", "PATCH") else b""
    _direct, proxied = await compare(_req(method, "/v1/anything", "X-Custom: 1", body=body))
    assert proxied.status == 200


async def test_proxy_encoded_path_and_repeated_query_preserved(compare: Compare) -> None:
    """Percent-encoding and repeated query keys reach the upstream byte for byte."""
    target = "/a%2Fb/%7Euser/x%20y;p=1?q=1&q=2&r=%26&empty=&%E2%9C%93=v"
    await compare(_req("GET", target))


async def test_proxy_repeated_request_headers_preserved(compare: Compare) -> None:
    """Repeated request header fields arrive in order, none merged or dropped."""
    await compare(_req("GET", "/h", "X-Multi: a", "X-Multi: b", "Accept: */*", "X-Multi: c"))


async def test_proxy_large_body_streamed_intact(compare: Compare, fake_upstream: FakeUpstream) -> None:
    """A 50 MiB body arrives whole and unchanged."""
    body = os.urandom(1024) * (50 * 1024)
    await compare(_req("POST", "/upload", "Content-Type: application/octet-stream", body=body))
    assert len(fake_upstream.received[-1].body) == 50 * 1024 * 1024


async def test_proxy_chunked_body_relayed(compare: Compare, fake_upstream: FakeUpstream) -> None:
    """A chunked request body arrives complete (streamed, not buffered first)."""
    chunks = [os.urandom(n) for n in (1, 4096, 70000, 3)]
    encoded = b"".join(b"%x\r\n%b\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    raw = _req("POST", "/chunked", "Transfer-Encoding: chunked") + encoded
    await compare(raw)
    assert fake_upstream.received[-1].body == b"".join(chunks)


async def test_proxy_head_keeps_length_without_body(compare: Compare, fake_upstream: FakeUpstream) -> None:
    """HEAD gets the upstream's Content-Length and no body."""

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"x" * 1234, content_type="application/octet-stream")

    fake_upstream.handler = handler
    _direct, proxied = await compare(_req("HEAD", "/blob"))
    assert proxied.header("content-length") == "1234"
    assert proxied.body == b""


@pytest.mark.parametrize("status", [204, 304])
async def test_proxy_bodyless_statuses_pass(compare: Compare, fake_upstream: FakeUpstream, status: int) -> None:
    """204 and 304 pass through with no body and no invented framing."""

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, headers={"ETag": '"abc"'})

    fake_upstream.handler = handler
    _direct, proxied = await compare(_req("GET", "/cond", 'If-None-Match: "abc"'))
    assert proxied.status == status
    assert proxied.header("content-length") is None
    assert proxied.header("transfer-encoding") is None


async def test_proxy_redirect_not_followed(compare: Compare, fake_upstream: FakeUpstream) -> None:
    """A redirect is relayed to the client, never followed by the proxy."""

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": "/elsewhere"})

    fake_upstream.handler = handler
    _, proxied = await compare(_req("GET", "/moved"))
    assert proxied.status == 302
    assert proxied.header("location") == "/elsewhere"
    assert fake_upstream.calls == 2


async def test_proxy_set_cookie_and_content_encoding_untouched(compare: Compare, fake_upstream: FakeUpstream) -> None:
    """Several Set-Cookie fields and a gzip body pass through as sent."""
    payload = gzip.compress(b'{"hello": "world"}' * 100)

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.Response(body=payload, content_type="application/json")
        resp.headers["Content-Encoding"] = "gzip"
        resp.headers.add("Set-Cookie", "a=1; Path=/")
        resp.headers.add("Set-Cookie", "b=2; HttpOnly")
        return resp

    fake_upstream.handler = handler
    _, proxied = await compare(_req("GET", "/gz", "Accept-Encoding: gzip"))
    assert proxied.body == payload
    assert proxied.all("set-cookie") == ["a=1; Path=/", "b=2; HttpOnly"]


async def test_proxy_status_codes_pass(compare: Compare, fake_upstream: FakeUpstream) -> None:
    """Error statuses from the upstream reach the client unchanged."""

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": "nope"}, status=int(request.path.strip("/")))

    fake_upstream.handler = handler
    for status in (400, 401, 404, 418, 429, 500, 503):
        _, proxied = await compare(_req("GET", f"/{status}"))
        assert proxied.status == status


async def test_proxy_hop_by_hop_removed_both_ways(fake_upstream: FakeUpstream, make_sidecar: SidecarFactory) -> None:
    """Hop-by-hop fields, and those named in Connection, never cross the proxy."""

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(
            text="ok",
            headers={"Connection": "X-Resp-Hop", "X-Resp-Hop": "1", "Keep-Alive": "timeout=5",
                     "X-End-To-End": "kept"},
        )

    fake_upstream.handler = handler
    sidecar = await make_sidecar(fake_upstream.url)
    raw = _req(
        "GET", "/hop",
        "Connection: keep-alive, X-Secret-Hop", "X-Secret-Hop: 1", "Keep-Alive: 300",
        "TE: trailers", "Upgrade: websocket", "Proxy-Authorization: Basic eA==",
        "X-End-To-End: kept",
    )
    resp = await exchange(sidecar.data_address[1], raw)  # type: ignore[index]
    names = fake_upstream.received[-1].header_names()
    for hop in ("x-secret-hop", "keep-alive", "te", "upgrade", "proxy-authorization"):
        assert hop not in names
    assert "x-end-to-end" in names
    assert resp.header("x-resp-hop") is None
    assert resp.header("keep-alive") is None
    assert resp.header("x-end-to-end") == "kept"


async def test_proxy_forwarded_for_from_real_peer(fake_upstream: FakeUpstream, make_sidecar: SidecarFactory) -> None:
    """X-Forwarded-* come from the real peer; a client's own values are dropped."""
    sidecar = await make_sidecar(fake_upstream.url)
    raw = _req("GET", "/who", "X-Forwarded-For: 6.6.6.6", "Forwarded: for=6.6.6.6",
               "X-Forwarded-Host: evil.test")
    await exchange(sidecar.data_address[1], raw)  # type: ignore[index]
    got = fake_upstream.received[-1]
    assert got.header("x-forwarded-for") == "127.0.0.1"
    assert got.header("x-forwarded-proto") == "http"
    assert got.header("x-forwarded-host") == "example.test"
    assert got.header("forwarded") is None


async def test_proxy_forwarded_mode_rfc7239(fake_upstream: FakeUpstream, make_sidecar: SidecarFactory) -> None:
    """listen.forwarded: forwarded sets one RFC 7239 Forwarded field instead."""
    sidecar = await make_sidecar(fake_upstream.url, "listen:\n  forwarded: forwarded\n")
    await exchange(sidecar.data_address[1], _req("GET", "/who", "X-Forwarded-For: 6.6.6.6"))  # type: ignore[index]
    got = fake_upstream.received[-1]
    assert got.header("forwarded") == 'for=127.0.0.1;proto=http;host="example.test"'
    assert got.header("x-forwarded-for") is None


async def test_proxy_sse_relayed_event_by_event(fake_upstream: FakeUpstream, make_sidecar: SidecarFactory) -> None:
    """The client receives event k before the upstream sends event k+1, for 100 events."""
    n = 100
    received = [asyncio.Event() for _ in range(n)]

    async def before(k: int) -> None:
        if k > 0:
            await received[k - 1].wait()

    events = [f"data: {k}\n\n".encode() for k in range(n)]
    fake_upstream.handler = sse_handler(events, before=before)
    sidecar = await make_sidecar(fake_upstream.url)
    async with aiohttp.ClientSession() as session:
        async with asyncio.timeout(30):
            async with session.get(data_url(sidecar) + "/v1/stream") as resp:
                assert resp.headers["Content-Type"] == "text/event-stream"
                k = 0
                buf = b""
                async for chunk in resp.content.iter_any():
                    buf += chunk
                    while b"\n\n" in buf:
                        event, buf = buf.split(b"\n\n", 1)
                        assert event == f"data: {k}".encode()
                        received[k].set()
                        k += 1
    assert k == n


async def test_proxy_upstream_pool_reuses_connections(fake_upstream: FakeUpstream, make_sidecar: SidecarFactory) -> None:
    """Sequential requests reuse one keep-alive connection to the upstream."""
    sidecar: Sidecar = await make_sidecar(fake_upstream.url)
    ports = set()

    async def handler(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        ports.add(request.transport.get_extra_info("peername")[1])
        return web.Response(text="ok")

    fake_upstream.handler = handler
    async with aiohttp.ClientSession() as session:
        for _ in range(20):
            async with session.get(data_url(sidecar) + "/x") as resp:
                assert await resp.text() == "ok"
    # The health checker may hold a second connection of its own.
    assert len(ports) <= 2
