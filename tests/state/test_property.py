"""Property: snapshot plus every patch received, applied with jsonpatch, is the state.

Random histories of model changes, windows, connects, slow readers and
reconnects (with the client's own id, or a malformed, future or stale one)
are played against the hub, first in process (many examples), then over real
HTTP on 127.0.0.1 with the connection dropped at random points (fewer).
Documents are compared as canonical JSON text, so ``1`` and ``true`` differ.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings

from sidecar.state import StateHub, Subscriber
from tests.state.conftest import FIRST_ID, make_hub, make_producers, serve
from tests.state.sse_client import Mirror, StreamReader, parse

# Keys that need RFC 6901 escapes or look like array indexes.
KEYS = st.sampled_from(["a", "b", "c", "a/b", "m~n", "~1", "~0/", "", "0", "1", "-"])
LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.floats(allow_nan=False, allow_infinity=False, width=32)
    | st.sampled_from(["x", "y", "é"])
)
VALUES = st.recursive(
    LEAVES,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(KEYS, children, max_size=4)
    ),
    max_leaves=16,
)
DOCS = st.dictionaries(KEYS, VALUES, max_size=5)


class DocModel:
    """A read model whose whole document is set by the test."""

    def __init__(self) -> None:
        self.version = 0
        self.doc: dict[str, Any] = {}

    def set(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.version += 1

    def snapshot(self) -> dict[str, Any]:
        copy: dict[str, Any] = json.loads(json.dumps(self.doc))
        return copy


def canonical(doc: Any) -> str:
    return json.dumps(doc, sort_keys=True)


MODEL_NAMES = ["cache", "routes", "coalescing", "doc_a", "doc_b"]

# Windows and departures are listed more than once: histories where a client
# is away for about a replay buffer's worth of windows are the ones that probe
# the eviction boundary.
TICK = st.tuples(st.just("tick"))
LEAVE = st.tuples(st.just("leave"), st.integers(0, 2))
STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("doc"), st.sampled_from(["doc_a", "doc_b"]), DOCS),
        st.tuples(st.just("traffic"), st.integers(1, 40), st.integers(0, 2**16)),
        TICK,
        TICK,
        TICK,
        st.tuples(st.just("read"), st.integers(0, 2)),
        LEAVE,
        LEAVE,
        st.tuples(
            st.just("reconnect"),
            st.integers(0, 2),
            st.sampled_from(
                ["own", "own", "own", "malformed", "future", "old", "none"]
            ),
        ),
    ),
    max_size=40,
)


class World:
    """The hub, its producers, and up to three clients with their mirrors."""

    def __init__(self, replay: int, queue: int) -> None:
        self.producers = make_producers()
        self.docs = {"doc_a": DocModel(), "doc_b": DocModel()}
        self.hub = make_hub(self.producers, replay=replay, subscriber_queue=queue)
        for name, model in self.docs.items():
            self.hub.register(name, model)
        self.models = [MODEL_NAMES[:3], MODEL_NAMES[2:], MODEL_NAMES]
        self.mirrors = [Mirror() for _ in self.models]
        self.subs: list[Subscriber | None] = [self._open(i, None) for i in range(3)]

    def _open(self, i: int, last_id: str | None) -> Subscriber:
        start = self.hub.subscribe(self.models[i], last_id)
        self.mirrors[i].apply_all(parse(start.frames))
        return start.subscriber

    def traffic(self, count: int, seed: int) -> None:
        p = self.producers
        for n in range(count):
            route = ("chat", "complete", "embed")[(seed + n) % 3]
            outcome = ("hit", "miss", "bypass", "stale")[((seed >> 2) + n) % 4]
            p.cache.record("memory" if n % 2 else None, route, outcome, 0.001 * n, n)
            p.routes.observe(route, (200, 200, 503)[n % 3], ((seed + n) % 97) / 1000)
            p.coalescing.record(route, "follower" if n % 3 else "leader")

    async def read(self, i: int) -> None:
        sub = self.subs[i]
        if sub is not None and (sub.queued or sub.needs_resync):
            self.mirrors[i].apply_all(parse((await sub.next_batch())[0]))

    def leave(self, i: int) -> None:
        """The client goes away (whatever it had not read is lost) and stays away."""
        sub = self.subs[i]
        if sub is not None:
            self.hub.unsubscribe(sub)
            self.subs[i] = None

    def reconnect(self, i: int, kind: str) -> None:
        self.leave(i)
        mirror = self.mirrors[i]
        last_id = {
            "own": mirror.last_id,
            "malformed": "not-an-id",
            "future": str(self.hub.last_event_id + 7),
            "old": str(FIRST_ID - 3),
            "none": None,
        }[kind]
        self.subs[i] = self._open(i, last_id)

    async def settle_and_check(self) -> None:
        for i, sub in enumerate(self.subs):
            if sub is None:
                self.reconnect(i, "own")
        self.hub.tick()
        for i in range(3):
            await self.read(i)
            for name in self.models[i]:
                live = self.hub.model(name).snapshot()
                assert canonical(self.mirrors[i].models[name]) == canonical(live), name


async def play(world: World, steps: list[tuple[Any, ...]]) -> None:
    for step in steps:
        match step:
            case ("doc", name, doc):
                world.docs[name].set(doc)
            case ("traffic", count, seed):
                world.traffic(count, seed)
            case ("tick",):
                world.hub.tick()
            case ("read", i):
                await world.read(i)
            case ("leave", i):
                world.leave(i)
            case ("reconnect", i, kind):
                world.reconnect(i, kind)
    await world.settle_and_check()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=STEPS, replay=st.integers(1, 4), queue=st.integers(1, 4))
def test_property_hub_mirror_equals_state(
    steps: list[tuple[Any, ...]], replay: int, queue: int
) -> None:
    """Any history, any reconnect point: every client's mirror equals the models."""
    asyncio.run(play(World(replay, queue), steps))


HTTP_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("doc"), DOCS),
        st.tuples(st.just("traffic"), st.integers(1, 20)),
        st.tuples(st.just("tick")),
        st.tuples(
            st.just("drop"),
            st.sampled_from(["own", "own", "malformed", "future", "old"]),
        ),
    ),
    max_size=14,
)


async def sync(reader: StreamReader, mirror: Mirror, hub: StateHub) -> None:
    """Read until the client has heard the hub's latest id (bounded)."""
    for _ in range(100):
        caught_up = mirror.last_id == str(hub.last_event_id)
        if caught_up and set(mirror.models) == set(hub.names()):
            return
        mirror.apply(await reader.next(timeout_s=5.0))
    raise AssertionError("client never caught up")


async def play_http(steps: list[tuple[Any, ...]], replay: int) -> None:
    producers = make_producers()
    doc_model = DocModel()
    hub = make_hub(producers, replay=replay)
    hub.register("doc_a", doc_model)
    mirror = Mirror()
    async with serve(hub) as client:
        response = await client.get("/state/stream")
        reader = StreamReader(response)
        await sync(reader, mirror, hub)
        for step in steps:
            match step:
                case ("doc", doc):
                    doc_model.set(doc)
                case ("traffic", count):
                    for n in range(count):
                        producers.cache.record(None, "chat", ("hit", "miss")[n % 2])
                        producers.routes.observe("chat", 200, n / 100)
                case ("tick",):
                    hub.tick()
                    await sync(reader, mirror, hub)
                case ("drop", kind):
                    response.close()
                    last_id = {
                        "own": mirror.last_id or "",
                        "malformed": "x",
                        "future": str(hub.last_event_id + 1),
                        "old": "1",
                    }[kind]
                    response = await client.get(
                        "/state/stream", headers={"Last-Event-ID": last_id}
                    )
                    assert response.status == 200
                    reader = StreamReader(response)
                    if kind != "own":
                        mirror.models.clear()  # a snapshot must rebuild all of it
                    await sync(reader, mirror, hub)
        hub.tick()
        await sync(reader, mirror, hub)
        response.close()
    for name in hub.names():
        assert canonical(mirror.models[name]) == canonical(hub.model(name).snapshot())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=HTTP_STEPS, replay=st.integers(1, 6))
def test_property_http_mirror_equals_state_across_drops(
    steps: list[tuple[Any, ...]], replay: int
) -> None:
    """Over real HTTP, with drops and bad resume ids, the mirror equals the state."""
    asyncio.run(play_http(steps, replay))
