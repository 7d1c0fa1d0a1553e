"""A small SSE client for the state-stream tests: parse frames, mirror models.

``parse`` follows the WHATWG event-stream rules the hub relies on (fields
``event``, ``id``, ``data``, ``retry``; comments; blank line dispatches).
``Mirror`` is what a dashboard does: it keeps each model from its snapshot
plus every patch, applied with ``jsonpatch``, and remembers the last id.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

import aiohttp
import jsonpatch


@dataclasses.dataclass
class Event:
    event: str
    id: str | None
    data: str
    retry: int | None = None

    def json(self) -> Any:
        return json.loads(self.data)


class Parser:
    """Incremental parser: feed text, collect complete events."""

    def __init__(self) -> None:
        self._buffer = ""
        self._event = "message"
        self._id: str | None = None
        self._data: list[str] = []
        self.retry: int | None = None

    def feed(self, text: str) -> list[Event]:
        self._buffer += text
        events: list[Event] = []
        while "\n" in self._buffer:
            line, self._buffer = self._buffer.split("\n", 1)
            event = self._line(line.rstrip("\r"))
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> Event | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            self._id = value
        elif name == "retry" and value.isdigit():
            self.retry = int(value)
        return None

    def _dispatch(self) -> Event | None:
        if not self._data:
            self._event = "message"
            return None
        event = Event(self._event, self._id, "\n".join(self._data), self.retry)
        self._event = "message"
        self._data = []
        return event


def parse(data: bytes) -> list[Event]:
    return Parser().feed(data.decode())


class StreamReader:
    """Reads events from an aiohttp response, each wait bounded in time."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self._parser = Parser()
        self._pending: list[Event] = []

    @property
    def retry(self) -> int | None:
        return self._parser.retry

    async def next(self, timeout_s: float = 5.0) -> Event:
        async with asyncio.timeout(timeout_s):
            while not self._pending:
                chunk = await self.response.content.readany()
                if not chunk:
                    raise EOFError("stream ended")
                self._pending.extend(self._parser.feed(chunk.decode()))
        return self._pending.pop(0)

    async def take(self, n: int, timeout_s: float = 5.0) -> list[Event]:
        return [await self.next(timeout_s) for _ in range(n)]

    async def until(
        self, kind: str, timeout_s: float = 5.0, limit: int = 200
    ) -> list[Event]:
        """Events up to and including the first of ``kind`` (bounded count)."""
        seen: list[Event] = []
        for _ in range(limit):
            event = await self.next(timeout_s)
            seen.append(event)
            if event.event == kind:
                return seen
        raise AssertionError(f"no {kind!r} event within {limit} events")


class Mirror:
    """A client's copy of the models, rebuilt from snapshot and patch events."""

    def __init__(self) -> None:
        self.models: dict[str, Any] = {}
        self.last_id: str | None = None
        self.snapshots = 0
        self.patches = 0

    def apply(self, event: Event) -> None:
        if event.id is not None:
            self.last_id = event.id
        if event.event == "snapshot":
            doc = event.json()
            self.models[doc["model"]] = doc["state"]
            self.snapshots += 1
        elif event.event == "patch":
            doc = event.json()
            base = self.models[doc["model"]]  # KeyError: a patch without a base
            self.models[doc["model"]] = jsonpatch.apply_patch(base, doc["patch"])
            self.patches += 1

    def apply_all(self, events: list[Event]) -> None:
        for event in events:
            self.apply(event)
