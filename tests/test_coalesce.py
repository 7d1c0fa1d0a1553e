"""The coalescing stage and the upstream concurrency ceiling, with fake neighbours.

Both stages are driven directly: a fake ``next`` counts calls and holds them
on events, fake replies are fed chunk by chunk, and consumers read replies
the way the proxy's relay does. asyncio runs ready tasks in the order they
were scheduled, so "every request has joined" is known exactly once the
flight's call reaches the fake ``next``.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from sidecar.coalesce import Coalescer
from sidecar.errors import OverloadedError, UpstreamConnectError, UpstreamError
from sidecar.limits import UpstreamLimiter
from sidecar.manifest import Route, RouteKind
from sidecar.metrics import Metrics
from sidecar.proxy import Exchange, Reply

CHAT = Route(name="chat", paths=("/v1/chat/completions",), methods=("POST",),
             kind=RouteKind.CHAT)
MODELS = Route(name="models", paths=("/v1/models",), methods=("GET",),
               kind=RouteKind.MODELS, coalesce=True)
KEY = b"k" * 32
T = TypeVar("T")


async def within(aw: Awaitable[T], seconds: float = 5.0) -> T:
    async with asyncio.timeout(seconds):
        return await aw


class FakeReply:
    """A reply whose body the test feeds; records how it was consumed."""

    def __init__(self, status: int = 200, *, body: bytes | None = None) -> None:
        self.status = status
        self.reason = "OK"
        self.headers: CIMultiDict[str] = CIMultiDict({"Content-Type": "text/plain"})
        self.content_length: int | None = None
        self._body = body
        self._items: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
        self.closed = asyncio.Event()
        self.pulled = 0

    def feed(self, chunk: bytes) -> None:
        self._items.put_nowait(chunk)

    def end(self) -> None:
        self._items.put_nowait(None)

    def fail(self, error: BaseException) -> None:
        self._items.put_nowait(error)

    def complete_body(self) -> bytes | None:
        return self._body

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            item = await self._items.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            self.pulled += 1
            yield item

    def close(self) -> None:
        self.closed.set()


class FakeNext:
    """The rest of the chain: counts calls, holds each on ``gate``."""

    def __init__(self, make: Callable[[Exchange], Reply] | None = None) -> None:
        self.calls: list[Exchange] = []
        self.gate = asyncio.Event()
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.error: BaseException | None = None
        self.replies: list[FakeReply] = []
        self._make = make

    def open(self) -> FakeNext:
        self.gate.set()
        return self

    async def __call__(self, ex: Exchange) -> Reply:
        self.calls.append(ex)
        self.started.set()
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        if self.error is not None:
            raise self.error
        if self._make is not None:
            return self._make(ex)
        reply = FakeReply()
        self.replies.append(reply)
        return reply


def json_reply(
    body: bytes = b'{"ok":true}', status: int = 200
) -> Callable[[Exchange], Reply]:
    def make(ex: Exchange) -> Reply:
        return FakeReply(status, body=body)

    return make


def exchange(
    key: bytes | None = KEY,
    *,
    route: Route = CHAT,
    method: str = "POST",
    path: str = "/v1/chat/completions",
    headers: dict[str, str] | None = None,
) -> Exchange:
    request = make_mocked_request(method, path, headers=headers or {})
    ex = Exchange(request, route, {}, 0.0)
    ex.action_key = key
    return ex


def coalescer(metrics: Metrics | None = None, **overrides: Any) -> Coalescer:
    settings: dict[str, Any] = dict(
        enabled=True, follower_timeout_s=30.0, max_waiters=10_000, max_keys=10_000,
        hit_for_miss_s=5.0, max_buffer_bytes=1 << 20,
    )
    settings.update(overrides)
    return Coalescer(metrics or Metrics(), **settings)


async def next_chunk(chunks: AsyncIterator[bytes]) -> bytes:
    return await anext(chunks)


async def consume(reply: Reply) -> bytes:
    """Read a reply as the proxy's relay does."""
    body = reply.complete_body()
    if body is not None:
        return body
    return b"".join([chunk async for chunk in reply.chunks()])


def start(
    c: Coalescer, nxt: FakeNext, exs: list[Exchange]
) -> list[asyncio.Task[Reply]]:
    return [asyncio.create_task(c(ex, nxt)) for ex in exs]


# -- one call, many answers ------------------------------------------------------


async def test_coalescer_identical_requests_make_one_upstream_call() -> None:
    """Requests that arrive while a flight runs get its answer; next runs once."""
    c, nxt = coalescer(), FakeNext(json_reply())
    exs = [exchange() for _ in range(50)]
    tasks = start(c, nxt, exs)
    await within(nxt.started.wait())
    nxt.open()
    bodies = [await consume(r) for r in await within(asyncio.gather(*tasks))]
    assert len(nxt.calls) == 1
    assert bodies == [b'{"ok":true}'] * 50
    assert [ex.coalesced for ex in exs] == ["leader"] + ["follower"] * 49


async def test_coalescer_followers_carry_coalesced_header_leader_does_not() -> None:
    """Followers get ``X-Sidecar-Cache: coalesced``; the leader keeps its own fields."""
    c, nxt = coalescer(), FakeNext(json_reply())
    leader, follower = exchange(), exchange()
    tasks = start(c, nxt, [leader, follower])
    await within(nxt.started.wait())
    nxt.open()
    await within(asyncio.gather(*tasks))
    assert follower.extra_headers == {"X-Sidecar-Cache": "coalesced"}
    assert follower.cache == "coalesced"
    assert "X-Sidecar-Cache" not in leader.extra_headers


async def test_coalescer_views_have_their_own_header_copies() -> None:
    """A waiter adding header fields to its reply does not change another's."""
    c, nxt = coalescer(), FakeNext(json_reply())
    tasks = start(c, nxt, [exchange(), exchange()])
    await within(nxt.started.wait())
    nxt.open()
    first, second = await within(asyncio.gather(*tasks))
    first.headers["X-Mine"] = "1"
    assert "X-Mine" not in second.headers
    assert second.headers["Content-Type"] == "text/plain"


async def test_coalescer_serves_waiters_in_join_order() -> None:
    """The leader is served first, then followers first come, first served."""
    c, nxt = coalescer(), FakeNext(json_reply())
    served: list[int] = []

    async def one(i: int) -> None:
        await c(exchange(), nxt)
        served.append(i)

    tasks = [asyncio.create_task(one(i)) for i in range(6)]
    await within(nxt.started.wait())
    nxt.open()
    await within(asyncio.gather(*tasks))
    assert served == list(range(6))


async def test_coalescer_stream_follower_gets_buffered_then_live_chunks() -> None:
    """A late follower gets every byte sent so far, then each chunk as it arrives."""
    c, nxt = coalescer(), FakeNext().open()
    leader = await within(c(exchange(), nxt))
    upstream = nxt.replies[0]
    upstream.feed(b"one,")
    leader_chunks = leader.chunks()
    assert await within(anext(leader_chunks)) == b"one,"
    follower = await within(c(exchange(), nxt))
    follower_chunks = follower.chunks()
    assert await within(anext(follower_chunks)) == b"one,"
    upstream.feed(b"two,")
    assert await within(anext(follower_chunks)) == b"two,"
    assert await within(anext(leader_chunks)) == b"two,"
    upstream.end()
    assert [x async for x in follower_chunks] == []
    assert [x async for x in leader_chunks] == []
    assert len(nxt.calls) == 1


async def test_coalescer_flight_leaves_table_when_body_ends() -> None:
    """Once a flight's body has ended, the next identical request calls again."""
    c, nxt = coalescer(), FakeNext(json_reply()).open()
    await consume(await within(c(exchange(), nxt)))
    assert c.flights == 0
    await consume(await within(c(exchange(), nxt)))
    assert len(nxt.calls) == 2


# -- who owns the upstream call ---------------------------------------------------


async def test_coalescer_leader_leaving_keeps_call_for_followers() -> None:
    """The leader's client going away does not cancel the call while others wait."""
    c, nxt = coalescer(), FakeNext().open()
    leader_ex, follower_ex = exchange(), exchange()
    tasks = start(c, nxt, [leader_ex, follower_ex])
    leader, follower = await within(asyncio.gather(*tasks))
    upstream = nxt.replies[0]
    upstream.feed(b"a")
    leader.close()
    upstream.feed(b"b")
    upstream.end()
    assert await within(consume(follower)) == b"ab"
    assert not upstream.closed.is_set()


async def test_coalescer_last_waiter_leaving_cancels_call() -> None:
    """When every waiter has gone, the upstream reply is closed."""
    c, nxt = coalescer(), FakeNext().open()
    views = await within(asyncio.gather(*start(c, nxt, [exchange(), exchange()])))
    nxt.replies[0].feed(b"a")
    for view in views:
        view.close()
    await within(nxt.replies[0].closed.wait())
    assert c.flights == 0


async def test_coalescer_waiters_cancelled_before_head_cancel_call() -> None:
    """Waiters cancelled while the head is pending cancel the upstream call."""
    c, nxt = coalescer(), FakeNext()
    tasks = start(c, nxt, [exchange(), exchange()])
    await within(nxt.started.wait())
    for task in tasks:
        task.cancel()
    await within(nxt.cancelled.wait())
    assert c.flights == 0
    assert c.waiters == 0


async def test_coalescer_leader_cancelled_before_head_keeps_call() -> None:
    """The leader's handler cancelled before the head leaves the call to followers."""
    c, nxt = coalescer(), FakeNext(json_reply())
    leader, follower = start(c, nxt, [exchange(), exchange()])
    await within(nxt.started.wait())
    leader.cancel()
    nxt.open()
    assert await within(consume(await follower)) == b'{"ok":true}'
    assert not nxt.cancelled.is_set()


async def test_coalescer_closed_view_mid_stream_raises_upstream_error() -> None:
    """A view closed while streaming (a drain ending streams) ends with an error."""
    c, nxt = coalescer(), FakeNext().open()
    view = await within(c(exchange(), nxt))
    nxt.replies[0].feed(b"a")
    chunks = view.chunks()
    assert await within(anext(chunks)) == b"a"
    pending = asyncio.create_task(next_chunk(chunks))
    await asyncio.sleep(0)  # let it reach its wait for the next chunk
    view.close()
    with pytest.raises(UpstreamConnectError):
        await within(pending)


async def test_coalescer_flight_cancelled_from_outside_ends_views_with_error() -> None:
    """A flight task cancelled from outside (shutdown) ends its views with an error."""
    c, nxt = coalescer(), FakeNext().open()
    view = await within(c(exchange(), nxt))
    (task,) = c._tasks
    task.cancel()
    with pytest.raises(UpstreamConnectError):
        await within(consume(view))
    assert nxt.replies[0].closed.is_set()


# -- failure and refusal -------------------------------------------------------------


async def test_coalescer_error_before_head_reaches_every_waiter() -> None:
    """An upstream error before the head is raised in every waiter; nothing is kept."""
    c, nxt = coalescer(), FakeNext()
    nxt.error = UpstreamConnectError("refused")
    tasks = start(c, nxt, [exchange() for _ in range(5)])
    await within(nxt.started.wait())
    nxt.open()
    results = await within(asyncio.gather(*tasks, return_exceptions=True))
    assert all(isinstance(r, UpstreamConnectError) for r in results)
    assert c.flights == 0
    nxt.error = None
    nxt._make = json_reply()
    await consume(await within(c(exchange(), nxt)))
    assert len(nxt.calls) == 2


async def test_coalescer_overload_before_head_reaches_every_waiter() -> None:
    """A shed flight (503 from the ceiling below) sheds every waiter of it."""
    c, nxt = coalescer(), FakeNext()
    nxt.error = OverloadedError("full")
    tasks = start(c, nxt, [exchange() for _ in range(3)])
    await within(nxt.started.wait())
    nxt.open()
    results = await within(asyncio.gather(*tasks, return_exceptions=True))
    assert all(isinstance(r, OverloadedError) for r in results)


async def test_coalescer_error_mid_body_raises_in_every_view() -> None:
    """A body cut after the head: each view gets the bytes so far, then the error."""
    c, nxt = coalescer(), FakeNext().open()
    views = await within(asyncio.gather(*start(c, nxt, [exchange(), exchange()])))
    nxt.replies[0].feed(b"part")
    nxt.replies[0].fail(UpstreamConnectError("cut"))
    for view in views:
        got: list[bytes] = []
        with pytest.raises(UpstreamConnectError):
            async for chunk in view.chunks():
                got.append(chunk)
        assert got == [b"part"]
    assert c.flights == 0


async def test_coalescer_unstored_answer_marks_key_hit_for_miss() -> None:
    """After an answer that was not stored, identical requests run in parallel."""
    now = [100.0]

    def make(ex: Exchange) -> Reply:
        ex.stored = False
        return FakeReply(body=b"x")

    c, nxt = coalescer(hit_for_miss_s=5.0, clock=lambda: now[0]), FakeNext(make).open()
    await consume(await within(c(exchange(), nxt)))
    # Coalesced, the second of these would follow the first (2 calls in all).
    await within(asyncio.gather(*start(c, nxt, [exchange(), exchange()])))
    assert len(nxt.calls) == 3
    assert c.flights == 0


async def test_coalescer_hit_for_miss_mark_expires() -> None:
    """A hit-for-miss mark lasts ``hit_for_miss_s``; then requests coalesce again."""
    now = [100.0]

    def make(ex: Exchange) -> Reply:
        ex.stored = len(nxt.calls) > 1
        return FakeReply(body=b"x")

    c, nxt = coalescer(hit_for_miss_s=5.0, clock=lambda: now[0]), FakeNext(make)
    nxt.open()
    await consume(await within(c(exchange(), nxt)))
    now[0] += 5.0
    nxt.gate.clear()
    nxt.started.clear()
    tasks = start(c, nxt, [exchange(), exchange()])
    await within(nxt.started.wait())
    nxt.open()
    await within(asyncio.gather(*tasks))
    assert len(nxt.calls) == 2


async def test_coalescer_non_2xx_answer_marks_key_hit_for_miss() -> None:
    """A non-2xx answer marks the key even when no cache stage said anything."""
    c, nxt = coalescer(), FakeNext(json_reply(b"err", status=500)).open()
    await consume(await within(c(exchange(), nxt)))
    exs = [exchange(), exchange()]
    await within(asyncio.gather(*start(c, nxt, exs)))
    assert len(nxt.calls) == 3
    assert [ex.coalesced for ex in exs] == ["none", "none"]


async def test_coalescer_follower_timeout_goes_upstream_unstored() -> None:
    """A follower with no head in time calls upstream itself with ``no_store``."""
    calls = 0
    leader_called = asyncio.Event()

    async def nxt(ex: Exchange) -> Reply:
        nonlocal calls
        calls += 1
        if calls == 1:
            leader_called.set()
            await asyncio.Event().wait()  # the leader's call never answers
        return FakeReply(body=b"own")

    c = coalescer(follower_timeout_s=0.02)
    leader = asyncio.create_task(c(exchange(), nxt))
    await within(leader_called.wait())
    follower_ex = exchange()
    reply = await within(c(follower_ex, nxt))
    assert await consume(reply) == b"own"
    assert follower_ex.no_store is True
    assert follower_ex.coalesced == "none"
    assert "X-Sidecar-Cache" not in follower_ex.extra_headers
    assert c.waiters == 0
    assert calls == 2
    leader.cancel()


async def test_coalescer_max_waiters_sends_extra_requests_alone() -> None:
    """Past ``max_waiters`` followers on a key, a request goes upstream on its own."""
    c, nxt = coalescer(max_waiters=2), FakeNext(json_reply())
    exs = [exchange() for _ in range(4)]
    tasks = start(c, nxt, exs)
    await within(nxt.started.wait())
    nxt.open()
    await within(asyncio.gather(*tasks))
    assert len(nxt.calls) == 2
    assert [ex.coalesced for ex in exs] == ["leader", "follower", "follower", "none"]


async def test_coalescer_max_keys_sends_new_keys_alone() -> None:
    """With ``max_keys`` flights running, a request for a new key is not tracked."""
    c, nxt = coalescer(max_keys=1), FakeNext(json_reply())
    exs = [exchange(b"a" * 32), exchange(b"b" * 32), exchange(b"b" * 32)]
    tasks = start(c, nxt, exs)
    await within(nxt.started.wait())
    nxt.open()
    await within(asyncio.gather(*tasks))
    assert len(nxt.calls) == 3
    assert [ex.coalesced for ex in exs] == ["leader", "none", "none"]


async def test_coalescer_buffer_past_limit_stops_admitting() -> None:
    """A flight that buffered more than ``max_buffer_bytes`` takes no followers."""
    c, nxt = coalescer(max_buffer_bytes=4), FakeNext().open()
    leader = await within(c(exchange(), nxt))
    nxt.replies[0].feed(b"12345")
    chunks = leader.chunks()
    assert await within(anext(chunks)) == b"12345"
    late = exchange()
    await within(c(late, nxt))
    assert late.coalesced == "none"
    assert len(nxt.calls) == 2


async def test_coalescer_past_buffer_limit_paces_at_slowest_view() -> None:
    """Past the buffer limit the flight reads upstream at its slowest view's pace."""
    c, nxt = coalescer(max_buffer_bytes=4), FakeNext().open()
    fast, slow = await within(asyncio.gather(*start(c, nxt, [exchange(), exchange()])))
    upstream = nxt.replies[0]
    for _ in range(10):
        upstream.feed(b"xxx")
    fast_chunks, slow_chunks = fast.chunks(), slow.chunks()
    await within(anext(fast_chunks))
    await within(anext(fast_chunks))
    # The fast view waits: the slow one has read nothing, 6 bytes are held.
    pending = asyncio.create_task(next_chunk(fast_chunks))
    for _ in range(5):
        await asyncio.sleep(0)
    assert upstream.pulled == 2
    assert not pending.done()
    await within(anext(slow_chunks))
    await within(anext(slow_chunks))
    assert await within(pending) == b"xxx"
    assert upstream.pulled >= 3
    upstream.end()

    async def rest(chunks: AsyncIterator[bytes]) -> int:
        return len([x async for x in chunks])

    assert await within(asyncio.gather(rest(fast_chunks), rest(slow_chunks))) == [7, 8]


# -- keys ----------------------------------------------------------------------


async def test_coalescer_get_route_requests_share_a_flight() -> None:
    """GETs on a ``coalesce: true`` route with the same target and credential merge."""
    c, nxt = coalescer(), FakeNext(json_reply())
    exs = [exchange(None, route=MODELS, method="GET", path="/v1/models",
                    headers={"Authorization": "Bearer a"}) for _ in range(3)]
    tasks = start(c, nxt, exs)
    await within(nxt.started.wait())
    nxt.open()
    await within(asyncio.gather(*tasks))
    assert len(nxt.calls) == 1


def test_coalescer_get_key_depends_on_credential_and_target() -> None:
    """Two credentials or two targets never share a key; the credential is not kept."""
    c = coalescer()

    def key(path: str, **headers: str) -> bytes | None:
        return c.key_of(exchange(None, route=MODELS, method="GET", path=path,
                                 headers=headers))

    base = key("/v1/models", Authorization="Bearer a")
    assert base == key("/v1/models", Authorization="Bearer a")
    assert base != key("/v1/models", Authorization="Bearer b")
    assert base != key("/v1/models", X_Api_Key="Bearer a")
    assert base != key("/v1/models?x=1", Authorization="Bearer a")
    assert base is not None and b"Bearer a" not in base


def test_coalescer_post_without_action_key_is_not_coalesced() -> None:
    """Requests without an action key on routes without ``coalesce`` pass through."""
    c = coalescer()
    assert c.key_of(exchange(None)) is None
    post = exchange(None, route=MODELS, method="POST", path="/v1/models")
    assert c.key_of(post) is None


async def test_coalescer_disabled_passes_everything_through() -> None:
    """With ``coalescing.enabled: false`` every request calls upstream."""
    c, nxt = coalescer(enabled=False), FakeNext(json_reply())
    tasks = start(c, nxt, [exchange(), exchange()])
    await within(nxt.started.wait())
    nxt.open()
    await within(asyncio.gather(*tasks))
    assert len(nxt.calls) == 2


# -- visible outcomes ----------------------------------------------------------


async def test_coalescer_counts_followers_and_tracks_waiters() -> None:
    """Followers are counted by route; the gauge shows attached followers only."""
    metrics = Metrics()
    events: list[tuple[str, str]] = []
    c = coalescer(metrics, on_event=lambda route, role: events.append((route, role)))
    nxt = FakeNext().open()
    views = await within(asyncio.gather(*start(c, nxt, [exchange() for _ in range(4)])))
    assert c.waiters == 3
    assert metrics.coalescing_waiters.get({}) == 3
    assert metrics.coalesced.get({"route": "chat"}) == 3
    assert events == [("chat", "leader")] + [("chat", "follower")] * 3
    nxt.replies[0].end()
    for view in views:
        await consume(view)
    assert c.waiters == 0
    await asyncio.sleep(0)  # metrics are published once per loop turn
    assert metrics.coalescing_waiters.get({}) == 0


# -- the upstream concurrency ceiling -----------------------------------------------


def limiter(metrics: Metrics | None = None, **overrides: Any) -> UpstreamLimiter:
    settings: dict[str, Any] = dict(max_in_flight=2, max_queue=2, queue_timeout_s=30.0)
    settings.update(overrides)
    return UpstreamLimiter(metrics or Metrics(), **settings)


async def test_limiter_holds_slot_until_body_ends() -> None:
    """A request counts in flight until its reply's body has been read to the end."""
    lim, nxt = limiter(), FakeNext().open()
    reply = await within(lim(exchange(), nxt))
    assert lim.in_flight == 1
    nxt.replies[0].feed(b"a")
    nxt.replies[0].end()
    assert await consume(reply) == b"a"
    assert lim.in_flight == 0


@pytest.mark.parametrize("how", ["close", "complete", "error"])
async def test_limiter_releases_slot_when_reply_ends(how: str) -> None:
    """Closing the reply, a complete body, or a cut body all give the slot back."""
    lim = limiter()
    nxt = FakeNext(json_reply() if how == "complete" else None).open()
    reply = await within(lim(exchange(), nxt))
    if how == "close":
        reply.close()
        assert nxt.replies[0].closed.is_set()
    elif how == "complete":
        await consume(reply)
    else:
        nxt.replies[0].fail(UpstreamConnectError("cut"))
        with pytest.raises(UpstreamError):
            await consume(reply)
    assert lim.in_flight == 0


async def test_limiter_releases_slot_when_next_raises() -> None:
    """An upstream error before the reply gives the slot back."""
    lim, nxt = limiter(), FakeNext().open()
    nxt.error = UpstreamConnectError("refused")
    with pytest.raises(UpstreamConnectError):
        await within(lim(exchange(), nxt))
    assert lim.in_flight == 0


async def test_limiter_queues_beyond_ceiling_in_fifo_order() -> None:
    """Past the ceiling requests wait in order; a freed slot goes to the oldest."""
    lim, nxt = limiter(max_in_flight=1, max_queue=5), FakeNext().open()
    first = await within(lim(exchange(), nxt))
    order: list[int] = []

    async def queued(i: int) -> Reply:
        reply = await lim(exchange(), nxt)
        order.append(i)
        return reply

    waiting = [asyncio.create_task(queued(i)) for i in range(3)]
    await asyncio.sleep(0)
    assert (lim.in_flight, lim.queued) == (1, 3)
    first.close()
    second = await within(waiting[0])
    assert (lim.in_flight, lim.queued) == (1, 2)
    second.close()
    (await within(waiting[1])).close()
    (await within(waiting[2])).close()
    assert order == [0, 1, 2]
    assert (lim.in_flight, lim.queued) == (0, 0)


async def test_limiter_full_queue_sheds_with_retry_after() -> None:
    """Beyond the queue a request is refused at once with an OverloadedError."""
    metrics = Metrics()
    lim, nxt = limiter(metrics, max_in_flight=1, max_queue=1), FakeNext().open()
    held = await within(lim(exchange(), nxt))
    queued = asyncio.create_task(lim(exchange(), nxt))
    await asyncio.sleep(0)
    with pytest.raises(OverloadedError) as caught:
        await within(lim(exchange(), nxt))
    assert caught.value.retry_after_s >= 1
    assert metrics.shed.get({"reason": "queue_full"}) == 1
    queued.cancel()
    held.close()


async def test_limiter_queue_timeout_sheds() -> None:
    """A request queued longer than ``queue_timeout_s`` is shed and leaves the queue."""
    metrics = Metrics()
    lim = limiter(metrics, max_in_flight=1, queue_timeout_s=0.01)
    nxt = FakeNext().open()
    held = await within(lim(exchange(), nxt))
    with pytest.raises(OverloadedError):
        await within(lim(exchange(), nxt))
    assert metrics.shed.get({"reason": "queue_timeout"}) == 1
    assert lim.queued == 0
    held.close()


async def test_limiter_cancelled_waiter_leaves_queue() -> None:
    """A queued request whose client goes away frees its queue place."""
    lim, nxt = limiter(max_in_flight=1), FakeNext().open()
    first = await within(lim(exchange(), nxt))
    waiter = asyncio.create_task(lim(exchange(), nxt))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert lim.queued == 0
    first.close()
    assert lim.in_flight == 0


async def test_limiter_dropped_reply_frees_slot_when_collected() -> None:
    """A reply dropped without being read or closed still gives its slot back."""
    lim, nxt = limiter(), FakeNext().open()
    reply: Reply | None = await within(lim(exchange(), nxt))
    assert lim.in_flight == 1
    del reply
    gc.collect()
    assert lim.in_flight == 0


async def test_limiter_below_coalescer_gives_a_flight_one_slot() -> None:
    """Placed after the coalescer, a flight shared by many callers takes one slot."""
    lim, nxt = limiter(max_in_flight=1, max_queue=0), FakeNext()
    c = coalescer()

    async def below(ex: Exchange) -> Reply:
        return await lim(ex, nxt)

    tasks = [asyncio.create_task(c(exchange(), below)) for _ in range(5)]
    await within(nxt.started.wait())
    nxt.open()
    views = await within(asyncio.gather(*tasks))
    assert lim.in_flight == 1
    nxt.replies[0].end()
    for view in views:
        await consume(view)
    assert lim.in_flight == 0


async def test_limiter_raised_ceiling_admits_queued_requests_at_once() -> None:
    """A reload raising ``upstream_in_flight`` hands the new slots to waiters."""
    lim, nxt = limiter(max_in_flight=1, max_queue=5), FakeNext().open()
    held = await within(lim(exchange(), nxt))
    waiting = [asyncio.create_task(lim(exchange(), nxt)) for _ in range(2)]
    await asyncio.sleep(0)
    lim.set_limits(max_in_flight=3, max_queue=5, queue_timeout_s=30.0)
    replies = await within(asyncio.gather(*waiting))
    assert (lim.in_flight, lim.queued) == (3, 0)
    for reply in [held, *replies]:
        reply.close()
    assert lim.in_flight == 0


async def test_limiter_lowered_ceiling_applies_as_requests_end() -> None:
    """A lowered ceiling frees ended slots instead of handing them on."""
    lim, nxt = limiter(max_in_flight=2, max_queue=5), FakeNext().open()
    first = await within(lim(exchange(), nxt))
    second = await within(lim(exchange(), nxt))
    waiter = asyncio.create_task(lim(exchange(), nxt))
    await asyncio.sleep(0)
    lim.set_limits(max_in_flight=1, max_queue=5, queue_timeout_s=30.0)
    first.close()
    assert (lim.in_flight, lim.queued) == (1, 1)
    second.close()
    third = await within(waiter)
    assert lim.in_flight == 1
    third.close()
    assert lim.in_flight == 0
