"""Singleflight of identical in-flight requests, with live fan-out of streams.

Owns: the table of flights (one upstream call shared by every identical
request that arrives while it runs), the leader and follower roles, the
shared body buffer each waiter reads with its own cursor, hit-for-miss marks,
the per-key and table ceilings, and the ``sidecar_coalesced_requests_total``
counter and ``sidecar_coalescing_waiters`` gauge. Not here: whether a request
is cacheable and its action key (the cache lookup stage, keys.py), storing
the answer (the cache record stage, which sits after this one, so the
flight's single consumption of the reply is what gets stored, once), and the
upstream concurrency ceiling (limits.py).

How a flight runs: the first request for a key leads. Its upstream call runs
in a task owned by the flight, not by the leader's handler: the task calls
the rest of the chain, records the reply's head, then reads the body into a
shared buffer, waking every waiter as chunks arrive. Each waiter, the leader
included, gets its own ``Reply`` view: every byte buffered so far, then each
new chunk live, so a follower of a stream gets its first token when the
leader does.

Invariants:
- Event-loop thread only, no locks: nothing awaits between looking a key up
  in the table and inserting into it, so two requests can never both lead.
- A flight leaves the table when its upstream call ends (body complete,
  error, or cancelled), so the next request starts a new call or is a plain
  cache hit; waiters still reading keep the flight object, not the entry.
- The upstream call is cancelled when, and only when, the last waiter leaves
  (its client went away, or a follower gave up); the leader leaving alone
  does not cancel it.
- An error reaches every waiter: before the head, each waiter raises it;
  after the head, each waiter's ``chunks()`` raises it once the bytes before
  it are delivered, so a cut body never looks complete.
- Keys of GET routes hash the caller's credential header values (never
  kept; ``scopes.credential_headers``), so two callers with different
  credentials never share a flight.
- Waiters are served in the order they joined: the leader first, then
  followers first come, first served.

Known limitations:
- Once a flight has buffered more than ``max_buffer_bytes`` it admits no new
  followers, drops the bytes every waiter has read, and from then on reads
  the upstream at the pace of its slowest waiter: a client that stops
  reading a large coalesced download stalls the other waiters of that
  flight (without coalescing it would stall only its own upstream call).
- Followers get the leader's answer to the leader's request as sent: header
  fields outside the key (``User-Agent``, request ids) are the leader's.
- A GET request carrying a body, and methods other than GET and HEAD on
  ``coalesce: true`` routes, are never coalesced (the body is not in the key).
- Only requests that overlap in time on one sidecar are merged; there is no
  coalescing across pods.
- The counter and the gauge are updated once per event-loop turn, not once
  per follower (a burst of a thousand would otherwise spend most of the
  stage's CPU in collector updates), so a scrape may be one turn behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from types import TracebackType
from typing import Any, Final

from multidict import CIMultiDict

from sidecar import log
from sidecar.errors import UpstreamConnectError
from sidecar.metrics import Metrics
from sidecar.proxy import Exchange, Next, Reply

_KEY_DOMAIN: Final = b"sidecar-coalesce/1"
_SAFE_METHODS: Final = frozenset({"GET", "HEAD"})
# Hit-for-miss marks are bounded so a stream of distinct uncacheable keys
# cannot grow the table without limit; the oldest marks go first.
MAX_HIT_FOR_MISS_MARKS: Final = 100_000
DEFAULT_CREDENTIAL_HEADERS: Final = ("authorization", "x-api-key")

OnEvent = Callable[[str, str], None]


def _feed(digest: Any, part: bytes) -> None:
    """One length-prefixed part, so no two part lists hash alike."""
    digest.update(len(part).to_bytes(8, "big"))
    digest.update(part)


def _text(value: str) -> bytes:
    # aiohttp decodes header bytes with surrogateescape; this gets them back.
    return value.encode("utf-8", "surrogateescape")


class _Flight:
    """One upstream call and the body it has produced so far.

    Fields are grouped by writer. The flight task writes the head, the body
    buffer, ``done`` and ``error``; the coalescer writes ``views``,
    ``followers`` and ``task``. Readers are the views, on the same thread.
    """

    __slots__ = (
        "_joined",
        "_low",
        "_room",
        "base",
        "chunks",
        "content_length",
        "done",
        "end",
        "error",
        "error_tb",
        "followers",
        "head_ready",
        "headers",
        "kept_bytes",
        "key",
        "reason",
        "route",
        "status",
        "task",
        "total_bytes",
        "views",
    )

    def __init__(self, key: bytes, route: str) -> None:
        self.key = key
        self.route = route
        self.task: asyncio.Task[None] | None = None
        # An ordered set: views are woken in the order they joined, so the
        # leader writes first and followers are served first come, first served.
        self.views: dict[_View, None] = {}
        self.followers = 0
        self.head_ready = False
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.content_length: int | None = None
        # The body: chunks[i] is chunk number base + i; end is the number of
        # chunks received. Chunks before base were read by every view.
        self.chunks: list[bytes] = []
        self.base = 0
        self.end = 0
        self.total_bytes = 0
        self.kept_bytes = 0
        self.done = False
        self.error: BaseException | None = None
        self.error_tb: TracebackType | None = None
        self._joined: bytes | None = None
        # Set while the task waits for the slowest view (see make_room).
        self._room: asyncio.Future[None] | None = None
        self._low = 0

    def admitting(self, max_buffer_bytes: int) -> bool:
        """Whether a new follower may still join (it needs every byte so far)."""
        return (
            not self.done
            and self.error is None
            and self.total_bytes <= max_buffer_bytes
        )

    # -- written by the flight task --------------------------------------------

    def set_head(self, reply: Reply) -> None:
        self.status = reply.status
        self.reason = reply.reason
        self.headers = CIMultiDict(reply.headers)
        self.content_length = reply.content_length
        self.head_ready = True
        self._wake_views()

    def append(self, chunk: bytes) -> None:
        if not chunk:
            return
        self.chunks.append(chunk)
        self.end += 1
        self.total_bytes += len(chunk)
        self.kept_bytes += len(chunk)
        self._wake_views()

    def finish(self) -> None:
        self.done = True
        self._wake_views()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.error_tb = error.__traceback__
        self._wake_views()

    def _wake_views(self) -> None:
        for view in self.views:
            view.wake()

    async def make_room(self, max_bytes: int) -> None:
        """Drop bytes every view has read; wait while the slowest lags too far.

        Called only once the flight stopped admitting, so no view can arrive
        that would need the dropped bytes. Resumes at half the ceiling, so
        the task does not wake for every chunk the slowest view reads.
        """
        self.trim()
        while self.kept_bytes > max_bytes // 2 and self.views:
            self._room = asyncio.get_running_loop().create_future()
            try:
                await self._room
            finally:
                self._room = None
            self.trim()

    def trim(self) -> None:
        low = min((view.cursor for view in self.views), default=self.end)
        drop = low - self.base
        if drop > 0:
            self.kept_bytes -= sum(len(chunk) for chunk in self.chunks[:drop])
            del self.chunks[:drop]
            self.base = low
        self._low = low

    # -- called by the views ---------------------------------------------------

    def advanced(self, old_cursor: int) -> None:
        """A view read chunk ``old_cursor``; wake the task if it was the slowest."""
        room = self._room
        if room is not None and old_cursor <= self._low and not room.done():
            room.set_result(None)

    def left(self) -> None:
        room = self._room
        if room is not None and not room.done():
            room.set_result(None)

    def whole_body(self) -> bytes:
        """The complete body in one piece, joined once for every view."""
        if self._joined is None:
            self._joined = b"".join(self.chunks)
        return self._joined

    def raise_error(self) -> None:
        error = self.error
        assert error is not None
        # One exception object reaches every waiter; restore its traceback
        # each time, as asyncio does for a shared future, so it does not grow.
        raise error.with_traceback(self.error_tb)


class _View:
    """One waiter's ``Reply``: the flight's head and body, with its own cursor."""

    __slots__ = (
        "_closed",
        "_expired",
        "_flight",
        "_owner",
        "_waiter",
        "content_length",
        "cursor",
        "gone",
        "headers",
        "reason",
        "role",
        "status",
    )

    def __init__(self, flight: _Flight, owner: Coalescer, role: str) -> None:
        self._flight = flight
        self._owner = owner
        self.role = role
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.content_length: int | None = None
        self.cursor = 0
        self.gone = False
        self._closed = False
        self._expired = False
        self._waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _expire(self) -> None:
        self._expired = True
        self.wake()

    async def wait_head(self, timeout_s: float | None = None) -> bool:
        """Wait for the flight's head: True once it is here, False on timeout.

        Raises the flight's error if it failed before its head. A plain
        timer, not ``asyncio.timeout``: it is cheaper per follower, and an
        error of the flight can never be mistaken for this deadline.
        """
        flight = self._flight
        if not flight.head_ready and flight.error is None:
            timer = None
            if timeout_s is not None:
                timer = asyncio.get_running_loop().call_later(timeout_s, self._expire)
            try:
                while not flight.head_ready and flight.error is None:
                    if self._expired:
                        return False
                    await self._wait()
            finally:
                if timer is not None:
                    timer.cancel()
        if not flight.head_ready:
            flight.raise_error()
        self.status = flight.status
        self.reason = flight.reason
        # A copy per view: the relay adds this waiter's own header fields.
        self.headers = CIMultiDict(flight.headers)
        self.content_length = flight.content_length
        return True

    def complete_body(self) -> bytes | None:
        flight = self._flight
        whole = flight.done and flight.error is None and flight.base == 0
        if whole and self.cursor == 0:
            self.cursor = flight.end
            self._leave()
            return flight.whole_body()
        return None

    async def chunks(self) -> AsyncIterator[bytes]:
        flight = self._flight
        try:
            while True:
                if self._closed:
                    raise UpstreamConnectError("the coalesced response was closed")
                index = self.cursor - flight.base
                if index < len(flight.chunks):
                    chunk = flight.chunks[index]
                    self.cursor += 1
                    flight.advanced(self.cursor - 1)
                    yield chunk
                elif flight.error is not None:
                    flight.raise_error()
                elif flight.done:
                    return
                else:
                    await self._wait()
        finally:
            self._leave()

    def close(self) -> None:
        self._closed = True
        self.wake()
        self._leave()

    def _leave(self) -> None:
        if not self.gone:
            self.gone = True
            self._owner._leave(self._flight, self)


class Coalescer:
    """The coalescing stage: one upstream call per key among overlapping requests."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        enabled: bool,
        follower_timeout_s: float,
        max_waiters: int,
        max_keys: int,
        hit_for_miss_s: float,
        max_buffer_bytes: int,
        on_event: OnEvent | None = None,
        credential_headers: Sequence[str] = DEFAULT_CREDENTIAL_HEADERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.metrics = metrics
        self.enabled = enabled
        self.follower_timeout_s = follower_timeout_s
        self.max_waiters = max_waiters
        self.max_keys = max_keys
        self.hit_for_miss_s = hit_for_miss_s
        self.max_buffer_bytes = max_buffer_bytes
        self.on_event = on_event
        self.credential_headers = tuple(credential_headers)
        self._clock = clock
        # key -> the flight running for it. Event-loop thread only; no lock,
        # so never `await` between the lookup and the insert.
        self._flights: dict[bytes, _Flight] = {}
        # key -> monotonic deadline of its hit-for-miss mark, oldest first
        # (every mark lasts the same time, so insertion order is expiry order).
        self._marks: OrderedDict[bytes, float] = OrderedDict()
        # Flight tasks, strongly held: the loop keeps only weak references,
        # and a flight whose waiters are all reading must not be collected.
        self._tasks: set[asyncio.Task[None]] = set()
        self._followers = 0
        # Follower counts not yet added to the metrics (see _publish_soon).
        self._uncounted: dict[str, int] = {}
        self._publish_pending = False

    @property
    def waiters(self) -> int:
        """Followers attached to a flight right now (leaders not counted)."""
        return self._followers

    @property
    def flights(self) -> int:
        """Keys with an upstream call in flight."""
        return len(self._flights)

    def __repr__(self) -> str:
        return (
            f"<Coalescer flights={len(self._flights)} waiters={self._followers}"
            f" marks={len(self._marks)}>"
        )

    async def __call__(self, ex: Exchange, nxt: Next) -> Reply:
        key = self.key_of(ex) if self.enabled else None
        if key is None:
            return await nxt(ex)
        if self._marked(key):
            self._bypass(ex, "hit_for_miss")
            return await nxt(ex)
        # Lookup and insert below run with no await in between (see _flights).
        flight = self._flights.get(key)
        if flight is None:
            if len(self._flights) >= self.max_keys:
                self._bypass(ex, "max_keys")
                return await nxt(ex)
            return await self._lead(self._start(key, ex, nxt), ex)
        if not flight.admitting(self.max_buffer_bytes):
            self._bypass(ex, "flight_not_admitting")
            return await nxt(ex)
        if flight.followers >= self.max_waiters:
            self._bypass(ex, "max_waiters")
            return await nxt(ex)
        return await self._follow(flight, ex, nxt)

    def key_of(self, ex: Exchange) -> bytes | None:
        """The flight key: the action key, or a GET route's request and credential."""
        if ex.action_key is not None:
            return ex.action_key
        request = ex.request
        if (
            not ex.route.coalesce
            or request.method not in _SAFE_METHODS
            or request.body_exists
        ):
            return None
        digest = hashlib.sha256()
        _feed(digest, _KEY_DOMAIN)
        for part in (ex.route.name, request.method, request.raw_path):
            _feed(digest, _text(part))
        for name in self.credential_headers:
            values = request.headers.getall(name, [])
            _feed(digest, len(values).to_bytes(4, "big"))
            for value in values:
                _feed(digest, _text(value))
        return digest.digest()

    # -- roles -------------------------------------------------------------------

    def _start(self, key: bytes, ex: Exchange, nxt: Next) -> _Flight:
        flight = _Flight(key, ex.route.name)
        self._flights[key] = flight
        task = asyncio.get_running_loop().create_task(
            self._run(flight, ex, nxt), name="sidecar.coalesce.flight"
        )
        flight.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return flight

    async def _lead(self, flight: _Flight, ex: Exchange) -> Reply:
        ex.coalesced = "leader"
        view = self._join(flight, "leader")
        self._event(flight.route, "leader")
        try:
            await view.wait_head()
        except BaseException:
            view._leave()
            raise
        return view

    async def _follow(self, flight: _Flight, ex: Exchange, nxt: Next) -> Reply:
        ex.coalesced = "follower"
        view = self._join(flight, "follower")
        try:
            arrived = await view.wait_head(self.follower_timeout_s)
        except BaseException:
            view._leave()
            raise
        if not arrived:
            view._leave()
            return await self._go_alone(ex, nxt)
        ex.cache = "coalesced"
        ex.extra_headers["X-Sidecar-Cache"] = "coalesced"
        self._count_follower(flight.route)
        self._event(flight.route, "follower")
        return view

    async def _go_alone(self, ex: Exchange, nxt: Next) -> Reply:
        """A follower with no head in time calls upstream itself, unstored."""
        ex.coalesced = "none"
        ex.no_store = True
        ex.cache_reason = ex.cache_reason or "coalesce_timeout"
        if log.coalesce.isEnabledFor(logging.DEBUG):
            log.coalesce.debug(
                "coalesce.follower_timeout",
                extra={"route": ex.route.name, "timeout_s": self.follower_timeout_s,
                       "manifest_key": "coalescing.follower_timeout"},
            )
        return await nxt(ex)

    def _join(self, flight: _Flight, role: str) -> _View:
        view = _View(flight, self, role)
        flight.views[view] = None
        if role == "follower":
            flight.followers += 1
            self._followers += 1
            self._publish_soon()
        return view

    def _leave(self, flight: _Flight, view: _View) -> None:
        """A waiter is done or gone; the last one out cancels the upstream call."""
        flight.views.pop(view, None)
        if view.role == "follower":
            flight.followers -= 1
            self._followers -= 1
            self._publish_soon()
        flight.left()
        task = flight.task
        if not flight.views and task is not None and not task.done():
            # Nobody wants the answer any more. Leave the table now, so a new
            # request starts a new call instead of joining a cancelled one.
            self._drop(flight)
            task.cancel()

    # -- the flight task ---------------------------------------------------------

    async def _run(self, flight: _Flight, ex: Exchange, nxt: Next) -> None:
        try:
            try:
                reply = await nxt(ex)
            except Exception as exc:
                # Not raised here, so the task ends without an unretrieved
                # exception; each waiter raises it in its own handler.
                flight.fail(exc)
                return
            flight.set_head(reply)
            try:
                await self._pump(flight, reply)
            except asyncio.CancelledError:
                reply.close()
                raise
            except Exception as exc:
                reply.close()
                flight.fail(exc)
                return
            flight.finish()
            self._mark_if_unstorable(flight, ex)
        finally:
            if not flight.done and flight.error is None:
                # Cancelled from outside (the loop shutting down) with views
                # left: end them with an error rather than leave them waiting.
                flight.fail(UpstreamConnectError("the upstream call was cancelled"))
            self._drop(flight)

    async def _pump(self, flight: _Flight, reply: Reply) -> None:
        body = reply.complete_body()
        if body is not None:
            flight.append(body)
            return
        async for chunk in reply.chunks():
            flight.append(chunk)
            if flight.total_bytes > self.max_buffer_bytes:
                await flight.make_room(self.max_buffer_bytes)

    def _drop(self, flight: _Flight) -> None:
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]

    # -- hit-for-miss --------------------------------------------------------------

    def _mark_if_unstorable(self, flight: _Flight, ex: Exchange) -> None:
        """Keys whose answer was not stored are not queued behind a leader for a while.

        Later identical requests would otherwise wait for each other only to
        get an answer that is not stored anyway; marked, they run in parallel.
        """
        if self.hit_for_miss_s <= 0:
            return
        if ex.stored is not False and 200 <= flight.status < 300:
            return
        now = self._clock()
        marks = self._marks
        while marks:
            oldest, deadline = next(iter(marks.items()))
            if deadline > now and len(marks) < MAX_HIT_FOR_MISS_MARKS:
                break
            del marks[oldest]
        marks[flight.key] = now + self.hit_for_miss_s
        marks.move_to_end(flight.key)

    def _marked(self, key: bytes) -> bool:
        deadline = self._marks.get(key)
        if deadline is None:
            return False
        if self._clock() < deadline:
            return True
        del self._marks[key]
        return False

    # -- reporting -----------------------------------------------------------------

    def _count_follower(self, route: str) -> None:
        self._uncounted[route] = self._uncounted.get(route, 0) + 1
        self._publish_soon()

    def _publish_soon(self) -> None:
        """Update the metrics once per loop turn, not once per follower.

        A burst of a thousand followers would otherwise cost thousands of
        collector updates (most of the stage's own CPU); a scrape sees the
        figures at most one loop turn late.
        """
        if not self._publish_pending:
            self._publish_pending = True
            asyncio.get_running_loop().call_soon(self._publish)

    def _publish(self) -> None:
        self._publish_pending = False
        for route, count in self._uncounted.items():
            self.metrics.coalesced.add({"route": route}, count)
        self._uncounted.clear()
        self.metrics.coalescing_waiters.set({}, self._followers)

    def _event(self, route: str, role: str) -> None:
        if self.on_event is not None:
            self.on_event(route, role)

    def _bypass(self, ex: Exchange, reason: str) -> None:
        if log.coalesce.isEnabledFor(logging.DEBUG):
            log.coalesce.debug(
                "coalesce.bypass", extra={"route": ex.route.name, "reason": reason}
            )
