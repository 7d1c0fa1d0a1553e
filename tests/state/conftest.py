"""Fixtures for the state tests: a hub with fake producers, served on loopback."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from sidecar.state import (
    ArtifactsModel,
    CacheModel,
    CoalescingModel,
    PolicyModel,
    RoutesModel,
    StateHub,
    UpstreamModel,
    routes,
)

FIRST_ID = 1000


@dataclasses.dataclass
class Producers:
    cache: CacheModel
    routes: RoutesModel
    coalescing: CoalescingModel
    upstream: UpstreamModel
    policy: PolicyModel
    artifacts: ArtifactsModel


def make_producers() -> Producers:
    return Producers(
        cache=CacheModel(),
        routes=RoutesModel(),
        coalescing=CoalescingModel(),
        upstream=UpstreamModel("llama.cpp", "http://127.0.0.1:9"),
        policy=PolicyModel({"state": {"coalesce": 0.25}}, "0" * 64),
        artifacts=ArtifactsModel(),
    )


def make_hub(producers: Producers, **options: object) -> StateHub:
    settings: dict[str, object] = {"first_event_id": FIRST_ID}
    settings.update(options)
    hub = StateHub(**settings)  # type: ignore[arg-type]
    for field in dataclasses.fields(producers):
        hub.register(field.name, getattr(producers, field.name))
    return hub


@pytest.fixture
def producers() -> Producers:
    return make_producers()


@contextlib.asynccontextmanager
async def serve(
    hub: StateHub, start: bool = False
) -> AsyncIterator[TestClient[web.Request, None]]:
    """The state routes on 127.0.0.1; the hub closes with the app."""
    app = web.Application()
    app.add_routes(routes(hub))

    async def _close(_app: web.Application) -> None:
        await hub.close(timeout_s=2.0)

    app.on_shutdown.append(_close)
    if start:
        await hub.start()
    async with TestServer(app, host="127.0.0.1") as server:
        client: TestClient[web.Request, None] = TestClient(server)
        async with client:
            yield client
