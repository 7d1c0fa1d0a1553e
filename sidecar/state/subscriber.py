"""One subscriber of the state stream: a bounded queue of frames and its resync.

The hub pushes framed events into the queue without ever waiting; the
stream's writer (views.py) drains the whole queue in one write. When the
queue is full the subscriber drops it and is marked for resync: its next
batch starts with fresh snapshots (as of the hub's latest id) instead of the
patches it missed, so a slow client costs the others nothing and never holds
a gap.
Not here: what is published or when (hub.py), the socket (views.py).

Invariants: push, finish and next_batch run on the event-loop thread, and
next_batch takes the queue and builds the resync without awaiting, so no
frame is lost or duplicated between the two. After ``finish`` nothing more
is queued; the final frame is always delivered, after any pending resync.

Known limitations: the bound counts frames, not bytes; a queue of large
snapshots holds more memory than one of small patches.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Sequence

from sidecar import log


class Subscriber:
    """One stream's queue; written by the hub, drained by one writer task."""

    def __init__(
        self,
        sub_id: int,
        models: Sequence[str],
        limit: int,
        now: float,
        snapshots: Callable[[Sequence[str]], list[bytes]],
    ) -> None:
        self.sub_id = sub_id
        self.models: tuple[str, ...] = tuple(models)
        self._model_set = frozenset(models)
        # The hub's snapshot frames as of its latest id, for a resync.
        self._snapshots = snapshots
        self._limit = limit
        # Frames waiting for the writer. Hub pushes, writer drains; both on the
        # loop thread, and next_batch takes the whole queue without awaiting.
        self._queue: collections.deque[bytes] = collections.deque()
        self._wake = asyncio.Event()
        self.needs_resync = False
        self.finished = False
        self.last_push = now
        self.resyncs = 0
        self.bytes_sent = 0
        # Set by the writer: drops the connection when a shutdown stalls.
        self.abort: Callable[[], None] | None = None

    def wants(self, model: str) -> bool:
        return model in self._model_set

    @property
    def queued(self) -> int:
        """Frames waiting for the writer."""
        return len(self._queue)

    def push(self, frame: bytes, now: float) -> None:
        """Queue a frame, or switch to resync if the queue is full."""
        if self.finished:
            return
        self.last_push = now
        if self.needs_resync:
            return  # the resync snapshot will include this change
        if len(self._queue) >= self._limit:
            self.needs_resync = True
            self._queue.clear()
            log.sse.info(
                "sse.resync", extra={"subscriber": self.sub_id, "limit": self._limit}
            )
        else:
            self._queue.append(frame)
        self._wake.set()

    def finish(self, frame: bytes) -> None:
        """Queue the final frame; the writer ends the stream after it."""
        if not self.finished:
            self.finished = True
            self._queue.append(frame)
            self._wake.set()

    async def next_batch(self) -> tuple[bytes, bool]:
        """Wait for frames; return them joined and whether the stream ends."""
        while not self._queue and not self.needs_resync:
            self._wake.clear()
            await self._wake.wait()
        head = b""
        if self.needs_resync:
            # Taken now, from the published documents as of the latest id: every
            # push ignored since the overflow is already inside these snapshots.
            self.needs_resync = False
            self.resyncs += 1
            head = b"".join(self._snapshots(self.models))
        data = head + b"".join(self._queue)
        self._queue.clear()
        return data, self.finished

    def __repr__(self) -> str:
        return (
            f"<Subscriber #{self.sub_id} models={','.join(self.models)} "
            f"queued={len(self._queue)} resync={self.needs_resync}>"
        )
