"""Coalescing through the real sidecar, the fake upstream and real aiohttp clients.

The chain under test is ``[cache double: lookup] -> Coalescer -> [cache
double: record] -> Forwarder``. The double stands in for the cache stages:
before the coalescer it sets ``ex.action_key = sha256(body)`` on POSTs and
answers from what it stored; after it, it stores a reply that ended validly
(and not ``no_store``, 2xx only) and counts stores, so "stored once" can be
asserted. The upstream holds its answer until every request has reached the
chain (an Event set by the double), which forces the overlap.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from sidecar.app import Sidecar
from sidecar.coalesce import Coalescer
from sidecar.proxy import Exchange, Next, Reply, read_body
from tests.conftest import SidecarFactory, admin_url, data_url
from tests.helpers.fake_upstream import (
    FakeUpstream,
    chat_chunk,
    chat_completion,
    sse_event,
    sse_handler,
)

T = TypeVar("T")
CHAT_BODY = json.dumps(
    {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
).encode()
EVENTS = [sse_event(chat_chunk(i, f"w{i} ")) for i in range(4)]
EVENTS += [sse_event(chat_chunk(4, "", "stop")), sse_event("[DONE]")]
STREAM = b"".join(EVENTS)


async def within(aw: Awaitable[T], seconds: float = 60.0) -> T:
    async with asyncio.timeout(seconds):
        return await aw


class _StoredReply:
    """A hit answered by the double."""

    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.reason = "OK"
        self.headers: CIMultiDict[str] = CIMultiDict(
            {"Content-Type": "application/json", "X-Sidecar-Cache": "hit"}
        )
        self.content_length: int | None = len(body)
        self._body = body

    def complete_body(self) -> bytes | None:
        return self._body

    async def chunks(self) -> AsyncIterator[bytes]:
        yield self._body

    def close(self) -> None:
        pass


class _Recorded:
    """Relays a reply and stores it once it ended validly."""

    def __init__(self, inner: Reply, ex: Exchange, double: CacheDouble) -> None:
        self._inner, self._ex, self._double = inner, ex, double
        self.status, self.reason = inner.status, inner.reason
        self.headers, self.content_length = inner.headers, inner.content_length
        self._parts: list[bytes] = []

    def _ended(self, body: bytes | None) -> None:
        ex = self._ex
        if ex.stored is not None:
            return
        ok = body is not None and not ex.no_store and 200 <= self.status < 300
        ex.stored = ok
        if ok and body is not None and ex.action_key is not None:
            self._double.stores[ex.action_key] = (self.status, body)
            self._double.store_count += 1

    def complete_body(self) -> bytes | None:
        body = self._inner.complete_body()
        if body is not None:
            self._ended(body)
        return body

    async def chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner.chunks():
            self._parts.append(chunk)
            yield chunk
        self._ended(b"".join(self._parts))

    def close(self) -> None:
        self._inner.close()
        self._ended(None)


class _Watched:
    """The leader's outermost reply: tells the test when the proxy closed it."""

    def __init__(self, inner: Reply, closed: asyncio.Event) -> None:
        self._inner, self._closed = inner, closed
        self.status, self.reason = inner.status, inner.reason
        self.headers, self.content_length = inner.headers, inner.content_length

    def complete_body(self) -> bytes | None:
        return self._inner.complete_body()

    def chunks(self) -> AsyncIterator[bytes]:
        return self._inner.chunks()

    def close(self) -> None:
        self._closed.set()
        self._inner.close()


class CacheDouble:
    """Test-only cache stages: key and hits before the coalescer, record after."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.arrived = 0
        self.all_arrived = asyncio.Event()
        self.leader_closed = asyncio.Event()
        self.stores: dict[bytes, tuple[int, bytes]] = {}
        self.store_count = 0
        self.hits = 0

    async def lookup(self, ex: Exchange, nxt: Next) -> Reply:
        if ex.request.method == "POST":
            ex.action_key = hashlib.sha256(await read_body(ex, 1 << 20)).digest()
            stored = self.stores.get(ex.action_key)
            if stored is not None:
                self.hits += 1
                return _StoredReply(*stored)
        self.arrived += 1
        if self.arrived == self.expected:
            self.all_arrived.set()
        reply = await nxt(ex)
        if ex.coalesced == "leader":
            return _Watched(reply, self.leader_closed)
        return reply

    async def record(self, ex: Exchange, nxt: Next) -> Reply:
        reply = await nxt(ex)
        return reply if ex.action_key is None else _Recorded(reply, ex, self)


def install(sidecar: Sidecar, double: CacheDouble) -> Coalescer:
    m = sidecar.manifest
    c = m.coalescing
    coalescer = Coalescer(
        sidecar.metrics,
        enabled=c.enabled,
        follower_timeout_s=c.follower_timeout,
        max_waiters=c.max_waiters,
        max_keys=c.max_keys,
        hit_for_miss_s=c.hit_for_miss,
        max_buffer_bytes=m.cache.max_entry_bytes,
        credential_headers=m.scopes.credential_headers,
    )
    sidecar.proxy.set_stages([double.lookup, coalescer, double.record])
    return coalescer


Result = tuple[int, str | None, bytes]


async def post(session: aiohttp.ClientSession, url: str) -> Result:
    async with session.post(
        url, data=CHAT_BODY, headers={"Content-Type": "application/json"}
    ) as resp:
        return resp.status, resp.headers.get("X-Sidecar-Cache"), await resp.read()


def session(**kwargs: Any) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), auto_decompress=False, **kwargs
    )


def held_json(double: CacheDouble, status: int = 200) -> Callable[
    [web.Request], Awaitable[web.StreamResponse]
]:
    """An upstream answer held until every request has reached the chain."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await double.all_arrived.wait()
        if status != 200:
            return web.json_response({"error": {"message": "boom"}}, status=status)
        return web.json_response(chat_completion("hello"))

    return handler


# -- one call, many identical answers ---------------------------------------------


async def test_coalescing_1000_identical_requests_make_one_upstream_call(
    fake_upstream: FakeUpstream, make_sidecar: SidecarFactory
) -> None:
    """1,000 concurrent identical requests: one upstream call, 1,000 equal answers."""
    n = 1000
    double = CacheDouble(n)
    fake_upstream.handler = held_json(double)
    sidecar = await make_sidecar(fake_upstream.url)
    install(sidecar, double)
    url = data_url(sidecar) + "/v1/chat/completions"
    async with session() as s:
        results = await within(asyncio.gather(*(post(s, url) for _ in range(n))))
    assert fake_upstream.calls == 1
    assert {(status, body) for status, _, body in results} == {
        (200, json.dumps(chat_completion("hello")).encode())
    }
    assert sorted(str(cache) for _, cache, _ in results).count("coalesced") == n - 1
    assert double.store_count == 1
    assert sidecar.metrics.coalesced.get({"route": "chat"}) == n - 1
    assert sidecar.metrics.coalescing_waiters.get({}) == 0


async def test_coalescing_200_streams_are_live_and_byte_identical(
    fake_upstream: FakeUpstream, make_sidecar: SidecarFactory
) -> None:
    """200 identical streams, one call; all have event 1 before event 2 is sent."""
    n = 200
    double = CacheDouble(n)
    first_seen = asyncio.Event()
    seen = 0

    async def before(k: int) -> None:
        if k == 0:
            await double.all_arrived.wait()
        elif k == 1:
            # Event 2 goes out only once every client has event 1: no follower
            # waits for more than the bytes already sent.
            await first_seen.wait()

    fake_upstream.handler = sse_handler(EVENTS, before=before)
    sidecar = await make_sidecar(fake_upstream.url)
    install(sidecar, double)
    url = data_url(sidecar) + "/v1/chat/completions"

    async def stream(s: aiohttp.ClientSession) -> bytes:
        nonlocal seen
        async with s.post(url, data=CHAT_BODY) as resp:
            first = await resp.content.readuntil(b"\n\n")
            seen += 1
            if seen == n:
                first_seen.set()
            return first + await resp.content.read()

    async with session() as s:
        bodies = await within(asyncio.gather(*(stream(s) for _ in range(n))))
    assert fake_upstream.calls == 1
    assert bodies == [STREAM] * n
    assert double.store_count == 1


async def test_coalescing_request_after_flight_is_plain_cache_hit(
    fake_upstream: FakeUpstream, make_sidecar: SidecarFactory
) -> None:
    """The flight's answer is what gets stored: the next identical request is a hit."""
    double = CacheDouble(5)
    fake_upstream.handler = held_json(double)
    sidecar = await make_sidecar(fake_upstream.url)
    install(sidecar, double)
    url = data_url(sidecar) + "/v1/chat/completions"
    async with session() as s:
        await within(asyncio.gather(*(post(s, url) for _ in range(5))))
        status, cache, _ = await within(post(s, url))
    assert (status, cache) == (200, "hit")
    assert fake_upstream.calls == 1
    assert (double.store_count, double.hits) == (1, 1)


# -- who owns the upstream call -------------------------------------------------------


async def test_coalescing_leader_disconnect_does_not_cancel_followers(
    fake_upstream: FakeUpstream, make_sidecar: SidecarFactory
) -> None:
    """The leader leaving after the first event: the call goes on; followers finish."""
    followers = 10
    double = CacheDouble(followers + 1)

    async def before(k: int) -> None:
        if k == 0:
            await double.all_arrived.wait()
        elif k == 1:
            await double.leader_closed.wait()

    fake_upstream.handler = sse_handler(EVENTS, before=before)
    sidecar = await make_sidecar(fake_upstream.url)
    install(sidecar, double)
    url = data_url(sidecar) + "/v1/chat/completions"

    async def leader(s: aiohttp.ClientSession) -> bytes:
        resp = await s.post(url, data=CHAT_BODY)
        first = await resp.content.readuntil(b"\n\n")
        resp.close()  # drops the connection: the sidecar cancels the handler
        return first

    async def follower(s: aiohttp.ClientSession) -> bytes:
        async with s.post(url, data=CHAT_BODY) as resp:
            return await resp.read()

    async with session() as s:
        leading = asyncio.create_task(leader(s))
        await within(fake_upstream.request_started.wait())
        bodies = await within(asyncio.gather(*(follower(s) for _ in range(followers))))
        assert await within(leading) == EVENTS[0]
    assert bodies == [STREAM] * followers
    assert fake_upstream.calls == 1
    assert not fake_upstream.disconnected.is_set()
    assert double.store_count == 1


async def test_coalescing_every_waiter_gone_cancels_upstream_within_a_second(
    fake_upstream: FakeUpstream, make_sidecar: SidecarFactory
) -> None:
    """When the last waiter leaves, the upstream sees its request cancelled at once."""
    n = 5
    double = CacheDouble(n)
    never = asyncio.Event()
    first_seen = 0
    all_seen = asyncio.Event()

    async def before(k: int) -> None:
        await (double.all_arrived if k == 0 else never).wait()

    fake_upstream.handler = sse_handler(EVENTS, before=before)
    sidecar = await make_sidecar(fake_upstream.url)
    coalescer = install(sidecar, double)
    url = data_url(sidecar) + "/v1/chat/completions"

    async def leave_after_first(s: aiohttp.ClientSession) -> None:
        nonlocal first_seen
        resp = await s.post(url, data=CHAT_BODY)
        await resp.content.readuntil(b"\n\n")
        first_seen += 1
        if first_seen == n:
            all_seen.set()
        await all_seen.wait()
        resp.close()

    async with session() as s:
        await within(asyncio.gather(*(leave_after_first(s) for _ in range(n))))
        await within(fake_upstream.disconnected.wait(), 1.0)
    assert fake_upstream.calls == 1
    assert double.store_count == 0
    assert coalescer.flights == 0


# -- failure and refusal ------------------------------------------------------------


async def test_coalescing_upstream_500_reaches_all_waiters_and_is_not_stored(
    fake_upstream: FakeUpstream, make_sidecar: SidecarFactory
) -> None:
    """An upstream 500 with 20 waiting: all get it, none stored; the next calls anew."""
    n = 20
    double = CacheDouble(n)
    fake_upstream.handler = held_json(double, status=500)
    sidecar = await make_sidecar(fake_upstream.url)
    install(sidecar, double)
    url = data_url(sidecar) + "/v1/chat/completions"
    async with session() as s:
        results = await within(asyncio.gather(*(post(s, url) for _ in range(n))))
        assert {(status, body) for status, _, body in results} == {
            (500, b'{"error": {"message": "boom"}}')
        }
        assert double.store_count == 0
        status, _, _ = await within(post(s, url))
    assert status == 500
    assert fake_upstream.calls == 2


async def test_coalescing_follower_timeout_goes_upstream_and_leader_is_stored_once(
    fake_upstream: FakeUpstream, make_sidecar: SidecarFactory
) -> None:
    """A follower past ``follower_timeout`` calls upstream; only the leader is kept."""
    double = CacheDouble(2)
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        if fake_upstream.calls == 1:
            await release.wait()
            return web.json_response({"answer": "leader"})
        return web.json_response({"answer": "own"})

    fake_upstream.handler = handler
    policy = "coalescing:\n  follower_timeout: 100ms\n"
    sidecar = await make_sidecar(fake_upstream.url, policy)
    install(sidecar, double)
    url = data_url(sidecar) + "/v1/chat/completions"
    async with session() as s:
        leading = asyncio.create_task(post(s, url))
        await within(fake_upstream.request_started.wait())
        status, cache, body = await within(post(s, url))
        assert (status, cache, json.loads(body)) == (200, None, {"answer": "own"})
        release.set()
        status, cache, body = await within(leading)
    assert (status, json.loads(body)) == (200, {"answer": "leader"})
    assert fake_upstream.calls == 2
    assert double.store_count == 1
    assert [json.loads(b) for _, b in double.stores.values()] == [{"answer": "leader"}]


# -- GET routes -------------------------------------------------------------------


async def test_coalescing_get_route_merges_per_credential(
    fake_upstream: FakeUpstream, make_sidecar: SidecarFactory
) -> None:
    """``GET /v1/models`` merges identical requests, never across two credentials."""
    per_tenant = 10
    double = CacheDouble(2 * per_tenant)

    async def handler(request: web.Request) -> web.StreamResponse:
        await double.all_arrived.wait()
        return web.json_response({"for": request.headers.get("Authorization")})

    fake_upstream.handler = handler
    sidecar = await make_sidecar(fake_upstream.url)
    install(sidecar, double)
    url = data_url(sidecar) + "/v1/models"

    async def get(s: aiohttp.ClientSession, token: str) -> tuple[str, Any]:
        async with s.get(url, headers={"Authorization": token}) as resp:
            return token, await resp.json()

    async with session() as s:
        tokens = ["Bearer tenant-a", "Bearer tenant-b"] * per_tenant
        results = await within(asyncio.gather(*(get(s, t) for t in tokens)))
    assert fake_upstream.calls == 2
    assert all(doc == {"for": token} for token, doc in results)


async def test_coalescing_counts_are_exported_on_metrics(
    fake_upstream: FakeUpstream, make_sidecar: SidecarFactory
) -> None:
    """``sidecar_coalesced_requests_total{route}`` counts followers on /metrics."""
    double = CacheDouble(4)
    fake_upstream.handler = held_json(double)
    sidecar = await make_sidecar(fake_upstream.url)
    install(sidecar, double)
    url = data_url(sidecar) + "/v1/chat/completions"
    async with session() as s:
        await within(asyncio.gather(*(post(s, url) for _ in range(4))))
        async with s.get(admin_url(sidecar) + "/metrics") as resp:
            text = await resp.text()
    assert 'sidecar_coalesced_requests_total{route="chat"} 3' in text
    assert "sidecar_coalescing_waiters 0" in text
