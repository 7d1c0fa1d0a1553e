"""The upstream concurrency ceiling: at most N requests in flight, then a queue.

Owns: the count of requests in flight to the upstream, the FIFO queue of
requests waiting for a slot, and shedding (503 with ``Retry-After``, counted
in ``sidecar_shed_requests_total{reason}``) when the queue is full or a
request has waited ``limits.queue_timeout``. Not here: which replica a
request goes to, the upstream connection pool (upstream.py), or refusing
requests while draining (app.py).

The stage sits last in the chain, just before the ``Forwarder``, and after
the coalescer, so a flight shared by many callers takes one slot. A request
holds its slot from before the upstream call until its reply's body has
ended or the reply was closed (the reply is wrapped to release the slot
then), so a long stream counts for as long as the GPU works on it.

Invariants:
- Never more than ``max_in_flight`` slots taken. A released slot is handed
  straight to the oldest waiter, so a newcomer cannot overtake the queue.
- Every request gets an answer: a slot, or an ``OverloadedError`` (queue
  full at once, or its wait timed out). A waiter whose client goes away
  leaves the queue, or gives back the slot it was handed at that moment.
- Event-loop thread only; no locks.

Known limitations: the ceiling is one count for all replicas, not one per
replica. ``Retry-After`` is a fixed hint (``retry_after_s``), not an
estimate from the queue's drain rate. A stage above that drops a reply
without reading or closing it keeps its slot until the reply is garbage
collected (a warning is logged then).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Callable
from typing import Final

from multidict import CIMultiDict

from sidecar import log
from sidecar.errors import OverloadedError
from sidecar.metrics import Metrics
from sidecar.proxy import Exchange, Next, Reply

DEFAULT_RETRY_AFTER_S: Final = 1.0


def _handed(waiter: asyncio.Future[None]) -> bool:
    """Whether ``_release`` gave this waiter a slot."""
    return waiter.done() and not waiter.cancelled()


class _SlotReply:
    """A ``Reply`` that gives its upstream slot back when its body ends."""

    __slots__ = (
        "_inner",
        "_release",
        "content_length",
        "headers",
        "reason",
        "status",
    )

    def __init__(self, inner: Reply, release: Callable[[], None]) -> None:
        self._inner = inner
        self._release: Callable[[], None] | None = release
        self.status = inner.status
        self.reason = inner.reason
        # The same object: the relay adds its header fields to this one.
        self.headers: CIMultiDict[str] = inner.headers
        self.content_length = inner.content_length

    def _end(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def complete_body(self) -> bytes | None:
        body = self._inner.complete_body()
        if body is not None:
            self._end()
        return body

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner.chunks():
                yield chunk
        finally:
            # Ended, cut (UpstreamError) or abandoned by a cancelled reader.
            self._end()

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._end()

    def __del__(self) -> None:
        if self._release is not None:
            log.proxy.warning("limits.slot_leaked")
            try:
                self._end()
            except RuntimeError:
                pass  # the event loop is already closed: nothing left to free


class UpstreamLimiter:
    """The stage that keeps at most ``max_in_flight`` requests upstream."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        max_in_flight: int,
        max_queue: int,
        queue_timeout_s: float,
        retry_after_s: float = DEFAULT_RETRY_AFTER_S,
    ) -> None:
        if max_in_flight < 1 or max_queue < 0 or queue_timeout_s < 0:
            raise ValueError("max_in_flight >= 1, max_queue >= 0, queue_timeout_s >= 0")
        self.metrics = metrics
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.retry_after_s = retry_after_s
        self._in_flight = 0
        # Waiters for a slot, oldest first. A waiter's future gets a result
        # when a slot is handed to it. Event-loop thread only.
        self._queue: collections.deque[asyncio.Future[None]] = collections.deque()

    def set_limits(
        self, *, max_in_flight: int, max_queue: int, queue_timeout_s: float
    ) -> None:
        """Apply new ceilings (a manifest reload) without losing slots in use.

        A higher ceiling hands the new slots to the oldest waiters at once; a
        lower one takes effect as requests in flight end. Waiters already
        queued keep the deadline they started with.
        """
        if max_in_flight < 1 or max_queue < 0 or queue_timeout_s < 0:
            raise ValueError("max_in_flight >= 1, max_queue >= 0, queue_timeout_s >= 0")
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        while self._queue and self._in_flight < self.max_in_flight:
            self._in_flight += 1
            self._release()

    @property
    def in_flight(self) -> int:
        """Slots taken: requests sent upstream whose reply has not ended."""
        return self._in_flight

    @property
    def queued(self) -> int:
        return len(self._queue)

    def __repr__(self) -> str:
        return (
            f"<UpstreamLimiter in_flight={self._in_flight}/{self.max_in_flight}"
            f" queued={len(self._queue)}/{self.max_queue}>"
        )

    async def __call__(self, ex: Exchange, nxt: Next) -> Reply:
        await self._acquire(ex)
        try:
            reply = await nxt(ex)
        except BaseException:
            self._release()
            raise
        return _SlotReply(reply, self._release)

    async def _acquire(self, ex: Exchange) -> None:
        if self._in_flight < self.max_in_flight and not self._queue:
            self._in_flight += 1
            return
        if len(self._queue) >= self.max_queue:
            raise self._shed(ex, "queue_full")
        waiter = asyncio.get_running_loop().create_future()
        self._queue.append(waiter)
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                await waiter
        except TimeoutError:
            if _handed(waiter):
                return  # the slot came in the same moment as the deadline: use it
            self._forget(waiter)
            raise self._shed(ex, "queue_timeout") from None
        except BaseException:
            # Cancelled: the client went away while queued.
            if _handed(waiter):
                self._release()
            else:
                self._forget(waiter)
            raise

    def _forget(self, waiter: asyncio.Future[None]) -> None:
        try:
            self._queue.remove(waiter)
        except ValueError:
            pass  # already skipped by _release

    def _release(self) -> None:
        """Hand the slot to the oldest waiter still waiting, or free it."""
        if self._in_flight <= self.max_in_flight:
            while self._queue:
                waiter = self._queue.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    return
        # Over a lowered ceiling the slot is freed, not handed on.
        self._in_flight -= 1

    def _shed(self, ex: Exchange, reason: str) -> OverloadedError:
        self.metrics.shed.inc({"reason": reason})
        if log.proxy.isEnabledFor(logging.DEBUG):
            log.proxy.debug(
                "limits.shed",
                extra={"route": ex.route.name, "reason": reason,
                       "in_flight": self._in_flight, "queued": len(self._queue)},
            )
        return OverloadedError(
            f"the upstream is at its concurrency ceiling ({self.max_in_flight} in"
            f" flight, {len(self._queue)} queued; limits.upstream_in_flight,"
            " limits.upstream_queue, limits.queue_timeout): retry later",
            self.retry_after_s,
        )
