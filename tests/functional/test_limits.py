"""The upstream concurrency ceiling through the real sidecar and the fake upstream.

The upstream holds every request until the test releases it and records the
most requests it ever had in hand at once; real aiohttp clients send a burst
of distinct requests, so nothing is coalesced and every one needs a slot.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from typing import TypeVar

import aiohttp
from aiohttp import web

from sidecar.app import Sidecar
from sidecar.limits import UpstreamLimiter
from tests.conftest import SidecarFactory, data_url
from tests.helpers.fake_upstream import FakeUpstream

T = TypeVar("T")


async def within(aw: Awaitable[T], seconds: float = 60.0) -> T:
    async with asyncio.timeout(seconds):
        return await aw


class HeldUpstream:
    """Holds requests on ``release``; tracks how many it holds at most."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.current = 0
        self.most = 0

    async def handler(self, request: web.Request) -> web.StreamResponse:
        self.current += 1
        self.most = max(self.most, self.current)
        try:
            await self.release.wait()
            return web.json_response({"target": request.raw_path})
        finally:
            self.current -= 1


def install(sidecar: Sidecar) -> UpstreamLimiter:
    limits = sidecar.manifest.limits
    limiter = UpstreamLimiter(
        sidecar.metrics,
        max_in_flight=limits.upstream_in_flight,
        max_queue=limits.upstream_queue,
        queue_timeout_s=limits.queue_timeout,
    )
    sidecar.proxy.set_stages([limiter])
    return limiter


Result = tuple[int, str | None, bytes]


async def test_limits_burst_of_500_never_exceeds_ceiling_and_sheds_the_rest(
    fake_upstream: FakeUpstream, make_sidecar: SidecarFactory
) -> None:
    """500 distinct requests: at most N upstream, N + queue answered, the rest 503."""
    n, queue, burst = 8, 32, 500
    shed_expected = burst - n - queue
    held = HeldUpstream()
    fake_upstream.handler = held.handler
    policy = f"limits:\n  upstream_in_flight: {n}\n  upstream_queue: {queue}\n"
    sidecar = await make_sidecar(fake_upstream.url, policy + "  queue_timeout: 1m\n")
    limiter = install(sidecar)
    url = data_url(sidecar)
    shed = 0

    async def one(s: aiohttp.ClientSession, i: int) -> Result:
        nonlocal shed
        async with s.get(f"{url}/work/{i}") as resp:
            result = resp.status, resp.headers.get("Retry-After"), await resp.read()
        if resp.status == 503:
            shed += 1
            if shed == shed_expected:
                # Every request beyond the ceiling and its queue has been
                # refused while the first N are still held: let them finish.
                held.release.set()
        return result

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as s:
        results = await within(asyncio.gather(*(one(s, i) for i in range(burst))))
    statuses = [status for status, _, _ in results]
    assert len(results) == burst
    assert statuses.count(200) == n + queue
    assert statuses.count(503) == shed_expected
    assert held.most == n
    refused = [(after, json.loads(body)["error"]["code"])
               for status, after, body in results if status == 503]
    assert set(refused) == {("1", "overloaded")}
    assert sidecar.metrics.shed.get({"reason": "queue_full"}) == shed_expected
    assert (limiter.in_flight, limiter.queued) == (0, 0)


async def test_limits_queue_timeout_sheds_with_retry_after(
    fake_upstream: FakeUpstream, make_sidecar: SidecarFactory
) -> None:
    """A request queued past ``limits.queue_timeout`` gets 503 with Retry-After."""
    held = HeldUpstream()
    fake_upstream.handler = held.handler
    policy = (
        "limits:\n  upstream_in_flight: 1\n  upstream_queue: 4\n"
        "  queue_timeout: 50ms\n"
    )
    sidecar = await make_sidecar(fake_upstream.url, policy)
    limiter = install(sidecar)
    url = data_url(sidecar)
    async def status_of(s: aiohttp.ClientSession, path: str) -> int:
        async with s.get(url + path) as resp:
            await resp.read()
            return resp.status

    async with aiohttp.ClientSession() as s:
        first = asyncio.create_task(status_of(s, "/first"))
        await within(fake_upstream.request_started.wait())
        async with s.get(url + "/second") as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "1"
        held.release.set()
        assert await within(first) == 200
    assert sidecar.metrics.shed.get({"reason": "queue_timeout"}) == 1
    assert fake_upstream.calls == 1
    assert limiter.queued == 0


async def test_limits_stream_holds_its_slot_until_the_body_ends(
    fake_upstream: FakeUpstream, make_sidecar: SidecarFactory
) -> None:
    """A slot is held while the response body streams, and freed when it ends."""
    more = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"first ")
        await more.wait()
        await resp.write(b"last")
        await resp.write_eof()
        return resp

    fake_upstream.handler = handler
    policy = "limits:\n  upstream_in_flight: 1\n"
    sidecar = await make_sidecar(fake_upstream.url, policy)
    limiter = install(sidecar)
    async with aiohttp.ClientSession() as s:
        async with s.get(data_url(sidecar) + "/stream") as resp:
            assert await within(resp.content.readexactly(6)) == b"first "
            assert limiter.in_flight == 1
            more.set()
            assert await within(resp.read()) == b"last"
    assert limiter.in_flight == 0
