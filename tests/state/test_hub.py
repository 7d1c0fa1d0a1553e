"""The hub as a transcript: model changes in, framed events out (no HTTP)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sidecar.state import (
    CacheModel,
    HubClosedError,
    HubFullError,
    StateHub,
    UnknownModelError,
)
from tests.state.conftest import FIRST_ID, Producers, make_hub
from tests.state.sse_client import Mirror, parse


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_hub_tick_without_changes_publishes_nothing(producers: Producers) -> None:
    """No version moved: no event and no id consumed."""
    hub = make_hub(producers)
    assert hub.tick() == 0
    assert hub.last_event_id == FIRST_ID


async def test_hub_thirty_changes_in_one_window_make_one_patch(
    producers: Producers,
) -> None:
    """Changes between two windows are coalesced into a single patch event."""
    hub = make_hub(producers)
    start = hub.subscribe(["cache"])
    for _ in range(30):
        producers.cache.record("memory", "chat", "hit")
    assert hub.tick() == 1
    events = parse((await start.subscriber.next_batch())[0])
    assert [e.event for e in events] == ["patch"]
    mirror = Mirror()
    mirror.apply_all(parse(start.frames) + events)
    assert mirror.models["cache"]["routes"]["chat"]["hits"] == 30


def test_hub_version_bump_without_change_consumes_no_id(producers: Producers) -> None:
    """A snapshot equal to the published one is not an event."""
    hub = make_hub(producers)
    producers.coalescing.version += 1
    assert hub.tick() == 0
    assert hub.last_event_id == FIRST_ID


def test_hub_patch_ids_increase_by_one(producers: Producers) -> None:
    """Each patch event takes the next id; the snapshot carries the latest."""
    hub = make_hub(producers)
    producers.cache.record(None, "a", "hit")
    producers.routes.observe("a", 200, 0.1)
    assert hub.tick() == 2
    assert hub.last_event_id == FIRST_ID + 2
    events = parse(hub.subscribe(["cache"]).frames)
    assert [(e.event, e.id) for e in events] == [("snapshot", str(FIRST_ID + 2))]


def test_hub_snapshot_is_published_state_not_live(producers: Producers) -> None:
    """A change not yet published is not in a new subscriber's snapshot."""
    hub = make_hub(producers)
    producers.cache.record(None, "chat", "hit")
    events = parse(hub.subscribe(["cache"]).frames)
    assert events[0].json()["state"]["routes"] == {}


async def test_hub_resume_in_buffer_replays_exactly_missed(
    producers: Producers,
) -> None:
    """Reconnecting with an id in the buffer gets the later patches of its models."""
    hub = make_hub(producers)
    first = hub.subscribe(["cache", "routes"])
    mirror = Mirror()
    mirror.apply_all(parse(first.frames))
    producers.cache.record(None, "chat", "hit")
    hub.tick()
    mirror.apply_all(parse((await first.subscriber.next_batch())[0]))
    hub.unsubscribe(first.subscriber)
    resume_from = mirror.last_id
    producers.cache.record(None, "chat", "miss")
    producers.coalescing.record("chat", "leader")
    producers.routes.observe("chat", 200, 0.1)
    hub.tick()
    start = hub.subscribe(["cache", "routes"], resume_from)
    replayed = parse(start.frames)
    assert (start.resume, start.reason) == ("replayed", "in_buffer")
    assert [(e.event, e.json()["model"]) for e in replayed] == [
        ("patch", "cache"),
        ("patch", "routes"),
    ]
    mirror.apply_all(replayed)
    assert mirror.models["cache"] == hub.published("cache")
    assert mirror.models["routes"] == hub.published("routes")


def test_hub_resume_at_latest_id_sends_nothing(producers: Producers) -> None:
    """A client that missed nothing gets no frames and no snapshot."""
    hub = make_hub(producers)
    producers.cache.record(None, "chat", "hit")
    hub.tick()
    start = hub.subscribe(None, str(hub.last_event_id))
    assert (start.frames, start.resume) == (b"", "replayed")


def test_hub_resume_at_first_id_replays_everything(producers: Producers) -> None:
    """The id of a snapshot taken before any patch is a valid resume point."""
    hub = make_hub(producers)
    producers.cache.record(None, "chat", "hit")
    hub.tick()
    start = hub.subscribe(["cache"], str(FIRST_ID))
    assert [e.event for e in parse(start.frames)] == ["patch"]


def test_hub_resume_evicted_id_gets_snapshot(producers: Producers) -> None:
    """An id older than the replay buffer reads as evicted."""
    hub = make_hub(producers, replay=2)
    for _ in range(4):
        producers.cache.record(None, "chat", "hit")
        hub.tick()
    start = hub.subscribe(["cache"], str(FIRST_ID + 1))
    assert (start.resume, start.reason) == ("snapshot", "evicted")
    assert [e.event for e in parse(start.frames)] == ["snapshot"]


def test_hub_resume_oldest_kept_base_is_replayed(producers: Producers) -> None:
    """The id just before the oldest buffered patch can still be resumed."""
    hub = make_hub(producers, replay=2)
    for _ in range(4):
        producers.cache.record(None, "chat", "hit")
        hub.tick()
    start = hub.subscribe(["cache"], str(FIRST_ID + 2))
    assert start.reason == "in_buffer"
    assert len(parse(start.frames)) == 2


def test_hub_resume_future_id_gets_snapshot(producers: Producers) -> None:
    """An id beyond the latest reads as future, never as a resume point."""
    start = make_hub(producers).subscribe(None, str(FIRST_ID + 5))
    assert (start.resume, start.reason) == ("snapshot", "future")


def test_hub_resume_id_from_before_process_is_unknown(producers: Producers) -> None:
    """Ids below this process's first id came from an earlier process."""
    start = make_hub(producers).subscribe(None, str(FIRST_ID - 1))
    assert (start.resume, start.reason) == ("snapshot", "unknown")


@pytest.mark.parametrize(
    "bad", ["abc", "-1", "1.5", " 1000", "1000 ", "9" * 30, "١٠٠٠"]
)
def test_hub_resume_malformed_id_gets_snapshot(producers: Producers, bad: str) -> None:
    """Anything but plain ASCII digits of int64 size is malformed."""
    start = make_hub(producers).subscribe(["cache"], bad)
    assert (start.resume, start.reason) == ("snapshot", "malformed")
    assert [e.event for e in parse(start.frames)] == ["snapshot"]


async def test_hub_full_queue_resyncs_with_snapshot(producers: Producers) -> None:
    """A subscriber that falls behind gets fresh snapshots, not a gap."""
    hub = make_hub(producers, subscriber_queue=2)
    slow = hub.subscribe(["cache"])
    fast = hub.subscribe(["cache"])
    fast_events = parse(fast.frames)
    for _ in range(5):
        producers.cache.record(None, "chat", "hit")
        hub.tick()
        fast_events += parse((await fast.subscriber.next_batch())[0])
    slow_events = parse((await slow.subscriber.next_batch())[0])
    assert [e.event for e in slow_events] == ["snapshot"]
    assert slow_events[0].json()["state"] == hub.published("cache")
    assert slow.subscriber.resyncs == 1
    assert [e.event for e in fast_events].count("patch") == 5


async def test_hub_resync_then_patches_continue(producers: Producers) -> None:
    """After a resync snapshot, later patches apply to it."""
    hub = make_hub(producers, subscriber_queue=1)
    start = hub.subscribe(["cache"])
    mirror = Mirror()
    mirror.apply_all(parse(start.frames))
    for _ in range(3):
        producers.cache.record(None, "chat", "hit")
        hub.tick()
    mirror.apply_all(parse((await start.subscriber.next_batch())[0]))
    producers.cache.record(None, "chat", "miss")
    hub.tick()
    mirror.apply_all(parse((await start.subscriber.next_batch())[0]))
    assert mirror.models["cache"] == hub.published("cache")


async def test_hub_idle_subscriber_gets_keepalive_with_latest_id(
    producers: Producers,
) -> None:
    """After idle_publish with nothing for it, a subscriber hears the latest id."""
    clock = Clock()
    hub = make_hub(producers, idle_publish_s=2.0, clock=clock)
    start = hub.subscribe(["policy"])
    producers.cache.record(None, "chat", "hit")
    clock.now = 1.0
    hub.tick()
    assert start.subscriber.queued == 0
    clock.now = 2.5
    hub.tick()
    events = parse((await start.subscriber.next_batch())[0])
    assert [(e.event, e.id) for e in events] == [("keepalive", str(FIRST_ID + 1))]


def test_hub_subscriber_ceiling_raises_full(producers: Producers) -> None:
    """Past limits.sse_subscribers, subscribing is refused with a retry hint."""
    hub = make_hub(producers, max_subscribers=1, retry_s=3.0)
    hub.subscribe()
    with pytest.raises(HubFullError) as info:
        hub.subscribe()
    assert info.value.retry_after_s == 3.0


def test_hub_unsubscribe_frees_a_place(producers: Producers) -> None:
    """A closed stream no longer counts toward the ceiling."""
    hub = make_hub(producers, max_subscribers=1)
    hub.unsubscribe(hub.subscribe().subscriber)
    hub.subscribe()
    assert hub.subscriber_count == 1


def test_hub_reports_subscriber_count(producers: Producers) -> None:
    """The gauge callback sees every change of the subscriber count."""
    counts: list[int] = []
    hub = make_hub(producers, on_subscribers=counts.append)
    first = hub.subscribe()
    hub.subscribe()
    hub.unsubscribe(first.subscriber)
    assert counts == [1, 2, 1]


def test_hub_unknown_model_raises(producers: Producers) -> None:
    """Subscribing to a model that is not registered names it."""
    with pytest.raises(UnknownModelError) as info:
        make_hub(producers).subscribe(["cache", "nope"])
    assert info.value.names == ["nope"]


@pytest.mark.parametrize("name", ["stream", "", "Cache", "a/b", "x" * 65])
def test_hub_register_rejects_bad_names(name: str) -> None:
    """Model names are path segments: lower-case words, never 'stream'."""
    with pytest.raises(ValueError):
        StateHub().register(name, CacheModel())


def test_hub_register_twice_raises() -> None:
    """A model name is registered once."""
    hub = StateHub()
    hub.register("cache", CacheModel())
    with pytest.raises(ValueError):
        hub.register("cache", CacheModel())


def test_hub_failing_model_does_not_block_others(producers: Producers) -> None:
    """A snapshot that raises is logged; other models still publish."""

    class Broken:
        version = 0

        def snapshot(self) -> dict[str, Any]:
            if self.version:
                raise RuntimeError("broken")
            return {}

    hub = make_hub(producers)
    broken = Broken()
    hub.register("broken", broken)
    broken.version = 1
    producers.cache.record(None, "chat", "hit")
    assert hub.tick() == 1
    assert hub.publish_failures == 1


def test_hub_snapshot_frame_encoded_once_per_id(producers: Producers) -> None:
    """Two subscribers in the same window share one encoded snapshot."""
    hub = make_hub(producers)
    assert hub.snapshot_frames(["cache"])[0] is hub.snapshot_frames(["cache"])[0]


async def test_hub_close_sends_shutdown_and_ends(producers: Producers) -> None:
    """Closing pushes a final shutdown event carrying the latest id."""
    hub = make_hub(producers)
    start = hub.subscribe(["cache"])
    closing = asyncio.create_task(hub.close(timeout_s=5.0))
    data, finished = await start.subscriber.next_batch()
    assert finished
    assert [(e.event, e.id) for e in parse(data)] == [("shutdown", str(FIRST_ID))]
    hub.unsubscribe(start.subscriber)
    await closing


async def test_hub_close_aborts_streams_that_do_not_end(producers: Producers) -> None:
    """A stream whose writer never finishes is aborted after the timeout."""
    hub = make_hub(producers)
    aborted = asyncio.Event()
    hub.subscribe().subscriber.abort = aborted.set
    await hub.close(timeout_s=0.01)
    assert aborted.is_set()


async def test_hub_closed_refuses_subscribers(producers: Producers) -> None:
    """A hub that is shutting down takes no new streams."""
    hub = make_hub(producers)
    await hub.close()
    with pytest.raises(HubClosedError):
        hub.subscribe()


async def test_hub_close_publishes_pending_changes(producers: Producers) -> None:
    """Changes made since the last window go out before the shutdown event."""
    hub = make_hub(producers)
    start = hub.subscribe(["cache"])
    producers.cache.record(None, "chat", "hit")
    closing = asyncio.create_task(hub.close())
    data, _ = await start.subscriber.next_batch()
    assert [e.event for e in parse(data)] == ["patch", "shutdown"]
    hub.unsubscribe(start.subscriber)
    await closing


async def test_hub_start_publishes_on_its_own(producers: Producers) -> None:
    """Once started, the hub publishes within a window without tick() calls."""
    hub = make_hub(producers, coalesce_s=0.01)
    start = hub.subscribe(["cache"])
    await hub.start()
    producers.cache.record(None, "chat", "hit")
    async with asyncio.timeout(5):
        data, _ = await start.subscriber.next_batch()
    assert [e.event for e in parse(data)] == ["patch"]
    hub.unsubscribe(start.subscriber)
    await hub.close()
