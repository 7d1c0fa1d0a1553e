"""The state hub: turns read models into one stream of deltas for all subscribers.

Once per coalescing window (``state.coalesce``) the hub looks at each
registered read model; for each whose ``version`` moved it takes a snapshot,
computes the delta against the last published snapshot (an RFC 6902 patch
from ``jsonpatch.make_patch``, compacted by delta.py), frames it once as an
SSE ``patch`` event with the next id, and appends it to the replay buffer and
to the queue of every subscriber of that model. A subscriber that heard
nothing for ``state.idle_publish`` gets a keep-alive carrying the latest id.
New subscribers get a ``snapshot`` per model, or, when their ``Last-Event-ID``
is still in the replay buffer, exactly the patches they missed.
Not here: HTTP (views.py), framing bytes (sse.py), the patch itself
(delta.py), a subscriber's queue (subscriber.py), the models (models.py, traffic.py, policy.py, poller.py).

Invariants:
- Ids are integers, strictly increasing over patch events; snapshot,
  keep-alive and shutdown events carry the id of the last patch published
  (the state they reflect). Patch ids are contiguous in the replay buffer.
- The first id is the process start time in microseconds, so an id from an
  earlier process is below this process's range and reads as ``unknown``
  (fresh snapshot), never as a resume point against the wrong base.
- A snapshot sent to a subscriber is the *published* document as of its id,
  never the live model, so the next patch applies to exactly what it holds.
- Publishing never awaits: a slow subscriber only fills its own bounded
  queue; on overflow its queue is dropped and, when its writer next runs, it
  gets fresh snapshots instead of the patches it missed.
- Event-loop thread only; every method is synchronous except start/close.

Known limitations: a client that reconnects with ``Last-Event-ID`` but a
different ``models=`` list is trusted to hold the models it names; a client
that adds a model that way gets patches for it without a base (EventSource
reuses its URL, so browsers never do this). Ids restart from the clock after
a restart: a clock set back by more than the old process's lifetime could
make an old id look current.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

from sidecar import log
from sidecar.errors import SidecarError
from sidecar.state import sse
from sidecar.state.delta import make_delta
from sidecar.state.models import ReadModel
from sidecar.state.subscriber import Subscriber

_NAME_RE: Final = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
# Path segments under /state/ that are routes, never model names.
RESERVED_NAMES: Final = frozenset({"stream"})
# 19 digits hold any int64; longer ids are malformed, not merely unknown.
_MAX_ID_DIGITS: Final = 19


class HubError(SidecarError):
    """Base of the hub's refusals."""


class UnknownModelError(HubError):
    """A subscription or lookup named models the hub does not have."""

    def __init__(self, names: Sequence[str], known: Sequence[str]) -> None:
        super().__init__(f"unknown read models: {', '.join(names)}")
        self.names = list(names)
        self.known = list(known)


class HubFullError(HubError):
    """The subscriber ceiling (``limits.sse_subscribers``) is reached."""

    def __init__(self, limit: int, retry_after_s: float) -> None:
        super().__init__(f"subscriber limit of {limit} reached")
        self.limit = limit
        self.retry_after_s = retry_after_s


class HubClosedError(HubError):
    """The hub is shutting down and takes no new subscribers."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Event:
    event_id: int
    model: str
    frame: bytes


class _Entry:
    """One registered model: the published base and its cached snapshot frame."""

    __slots__ = ("doc", "frame", "frame_id", "model", "version")

    def __init__(self, model: ReadModel) -> None:
        self.model = model
        self.version = model.version
        self.doc: dict[str, Any] = model.snapshot()
        self.frame: bytes | None = None
        self.frame_id = -1


@dataclasses.dataclass(frozen=True, slots=True)
class StreamStart:
    """A new subscription: what to write first and how the resume went.

    ``resume`` is ``replayed`` (the missed patches follow) or ``snapshot``;
    ``reason`` says why: ``in_buffer``, ``new`` (no id given), ``malformed``,
    ``evicted`` (older than the replay buffer), ``future`` (beyond the latest
    id) or ``unknown`` (from before this process).
    """

    subscriber: Subscriber
    frames: bytes
    resume: str
    reason: str


class StateHub:
    """Registry of read models, the publishing loop, the replay buffer."""

    def __init__(
        self,
        *,
        coalesce_s: float = 0.25,
        idle_publish_s: float = 2.0,
        replay: int = 1024,
        subscriber_queue: int = 256,
        retry_s: float = 2.0,
        max_subscribers: int = 1000,
        on_subscribers: Callable[[int], object] | None = None,
        first_event_id: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if coalesce_s <= 0 or replay < 1 or subscriber_queue < 1:
            raise ValueError("coalesce_s must be > 0; replay and subscriber_queue >= 1")
        self.coalesce_s = coalesce_s
        self.idle_publish_s = idle_publish_s
        self.retry_s = retry_s
        self.max_subscribers = max_subscribers
        self._queue_limit = subscriber_queue
        self._on_subscribers = on_subscribers
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._buffer: collections.deque[_Event] = collections.deque(maxlen=replay)
        self._first_id = (
            time.time_ns() // 1000 if first_event_id is None else first_event_id
        )
        self._last_id = self._first_id
        # Insertion-ordered set of live subscribers; loop thread only.
        self._subscribers: dict[Subscriber, None] = {}
        self._sub_ids = itertools.count(1)
        # Strong reference to the publishing task, so it is not collected.
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._drained = asyncio.Event()
        self.events_published = 0
        self.publish_failures = 0

    # -- models ---------------------------------------------------------------

    def register(self, name: str, model: ReadModel) -> None:
        """Publish ``model`` as ``name``; its current snapshot is the first base."""
        if not _NAME_RE.match(name) or name in RESERVED_NAMES:
            raise ValueError(f"read model name {name!r} is reserved or not [a-z0-9_-]")
        if name in self._entries:
            raise ValueError(f"read model {name!r} is already registered")
        self._entries[name] = _Entry(model)

    def names(self) -> list[str]:
        return list(self._entries)

    def model(self, name: str) -> ReadModel:
        """The live model (raises UnknownModelError)."""
        entry = self._entries.get(name)
        if entry is None:
            raise UnknownModelError([name], self.names())
        return entry.model

    @property
    def first_event_id(self) -> int:
        return self._first_id

    @property
    def last_event_id(self) -> int:
        return self._last_id

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def subscribers(self) -> list[Subscriber]:
        return list(self._subscribers)

    def published(self, name: str) -> dict[str, Any]:
        """The document as of ``last_event_id`` (what a snapshot would carry)."""
        return self._entries[name].doc

    # -- publishing -----------------------------------------------------------

    def tick(self) -> int:
        """Publish one window now; return how many patch events it produced."""
        now = self._clock()
        published = 0
        for name, entry in self._entries.items():
            version = entry.model.version
            if version == entry.version:
                continue
            # Set first: a model whose snapshot fails is retried on its next
            # change, not logged on every window.
            entry.version = version
            try:
                published += self._publish(name, entry, now)
            except Exception:
                self.publish_failures += 1
                log.state.exception("state.publish_failed", extra={"model": name})
        self._keep_alive(now)
        return published

    def _publish(self, name: str, entry: _Entry, now: float) -> int:
        doc = entry.model.snapshot()
        frame = self._encode_change(name, self._last_id + 1, entry.doc, doc)
        entry.doc = doc
        if frame is None:
            return 0
        self._last_id += 1
        self._buffer.append(_Event(self._last_id, name, frame))
        self.events_published += 1
        for sub in self._subscribers:
            if sub.wants(name):
                sub.push(frame, now)
        return 1

    def _encode_change(
        self, name: str, event_id: int, before: dict[str, Any], after: dict[str, Any]
    ) -> bytes | None:
        """The frame for one model's change, or None when nothing changed."""
        delta = make_delta(before, after)
        if not delta:
            return None
        return sse.encode_delta(name, delta.json(), event_id)

    def _keep_alive(self, now: float) -> None:
        frame: bytes | None = None
        for sub in self._subscribers:
            if now - sub.last_push >= self.idle_publish_s:
                if frame is None:
                    frame = sse.encode_keepalive(self._last_id)
                sub.push(frame, now)

    def snapshot_frames(self, names: Iterable[str]) -> list[bytes]:
        """One snapshot event per model, as of ``last_event_id``."""
        return [self._snapshot_frame(name) for name in names]

    def _snapshot_frame(self, name: str) -> bytes:
        # Serialised once per (model, id): a reconnect storm costs one encode.
        entry = self._entries[name]
        if entry.frame is None or entry.frame_id != self._last_id:
            entry.frame = sse.encode_snapshot(name, entry.doc, self._last_id)
            entry.frame_id = self._last_id
        return entry.frame

    # -- subscriptions ----------------------------------------------------------

    def subscribe(
        self, models: Sequence[str] | None = None, last_event_id: str | None = None
    ) -> StreamStart:
        """Open a subscription (all models when ``models`` is None)."""
        if self._closed:
            raise HubClosedError("the state hub is shutting down")
        names = self._resolve(models)
        if len(self._subscribers) >= self.max_subscribers:
            raise HubFullError(self.max_subscribers, self.retry_s)
        reason, after = self.resume_point(last_event_id)
        if after is None:
            frames = b"".join(self.snapshot_frames(names))
        else:
            frames = b"".join(self._missed(after, frozenset(names)))
        sub = Subscriber(
            next(self._sub_ids),
            names,
            self._queue_limit,
            self._clock(),
            self.snapshot_frames,
        )
        self._subscribers[sub] = None
        self._notify_count()
        log.sse.debug(
            "sse.subscribed",
            extra={
                "subscriber": sub.sub_id,
                "models": ",".join(names),
                "resume": reason,
            },
        )
        resume = "replayed" if after is not None else "snapshot"
        return StreamStart(sub, frames, resume, reason)

    def unsubscribe(self, sub: Subscriber) -> None:
        if self._subscribers.pop(sub, False) is not False:
            self._notify_count()
            log.sse.debug("sse.unsubscribed", extra={"subscriber": sub.sub_id})
        if self._closed and not self._subscribers:
            self._drained.set()

    def resume_point(self, last_event_id: str | None) -> tuple[str, int | None]:
        """Why and from where a stream starts: (reason, id to replay after)."""
        if not last_event_id:
            return "new", None
        if not (last_event_id.isascii() and last_event_id.isdigit()):
            return "malformed", None
        if len(last_event_id) > _MAX_ID_DIGITS:
            return "malformed", None
        event_id = int(last_event_id)
        if event_id > self._last_id:
            return "future", None
        if event_id < self._first_id:
            return "unknown", None
        oldest = self._buffer[0].event_id if self._buffer else self._last_id + 1
        if event_id < oldest - 1:
            return "evicted", None
        return "in_buffer", event_id

    def _missed(self, after: int, names: frozenset[str]) -> list[bytes]:
        if not self._buffer:
            return []
        start = after - self._buffer[0].event_id + 1
        tail = itertools.islice(self._buffer, start, None)
        return [event.frame for event in tail if event.model in names]

    def _resolve(self, models: Sequence[str] | None) -> list[str]:
        if models is None:
            return self.names()
        unknown = [name for name in models if name not in self._entries]
        if unknown:
            raise UnknownModelError(unknown, self.names())
        return list(dict.fromkeys(models))

    def _notify_count(self) -> None:
        if self._on_subscribers is not None:
            self._on_subscribers(len(self._subscribers))

    # -- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        """Start publishing once per window (idempotent)."""
        if self._task is None and not self._closed:
            self._task = asyncio.create_task(self._run(), name="sidecar-state-hub")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.coalesce_s)
            self.tick()

    async def close(self, timeout_s: float = 5.0) -> None:
        """Publish the last changes, send ``shutdown`` to all, wait for them to end.

        Streams still open after ``timeout_s`` (a client that stopped reading)
        are aborted.
        """
        if not self._closed:
            self._closed = True
            if self._task is not None:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            self.tick()
            frame = sse.encode_shutdown(self._last_id)
            for sub in self._subscribers:
                sub.finish(frame)
            log.sse.info("sse.shutdown", extra={"subscribers": len(self._subscribers)})
        if not self._subscribers:
            return
        try:
            async with asyncio.timeout(timeout_s):
                await self._drained.wait()
        except TimeoutError:
            for sub in list(self._subscribers):
                if sub.abort is not None:
                    sub.abort()

    def __repr__(self) -> str:
        return (
            f"<StateHub models={len(self._entries)} subscribers={len(self._subscribers)} "
            f"last_id={self._last_id} buffered={len(self._buffer)}>"
        )
