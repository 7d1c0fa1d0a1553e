"""Fixtures shared by the whole suite: a fake upstream and an in-process sidecar.

The in-process sidecar is the real ``Sidecar`` (both ports on real loopback
sockets, ephemeral ports) built from a manifest the test may adjust with
YAML text; it runs on the test's event loop, so a test can hold the fake
upstream on an Event and watch what the client receives.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.app import Sidecar
from sidecar.manifest import load_manifest
from tests.helpers.fake_upstream import FakeUpstream

ROOT = Path(__file__).resolve().parents[1]

# The real llama-server fixtures (llama_server, llama_replicas, ...).
pytest_plugins = ["tests.helpers.llama"]


@pytest.fixture
async def fake_upstream() -> AsyncIterator[FakeUpstream]:
    fake = await FakeUpstream().start()
    try:
        yield fake
    finally:
        await fake.close()


SidecarFactory = Callable[..., Awaitable[Sidecar]]


@pytest.fixture
async def make_sidecar(tmp_path: Path) -> AsyncIterator[SidecarFactory]:
    """Start sidecars in front of a given upstream URL; all are closed at the end."""
    started: list[Sidecar] = []

    async def make(upstream: str, policy_yaml: str = "", **flags: Any) -> Sidecar:
        policy = tmp_path / f"policy-{len(started)}.yaml"
        policy.write_text(policy_yaml)
        all_flags = {"upstream": upstream, "listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0"}
        all_flags.update(flags)
        manifest = load_manifest(str(policy), env={}, flags=all_flags)

        def reload() -> Any:
            return load_manifest(str(policy), env={}, flags=all_flags)

        sidecar = Sidecar(manifest, data_dir=tmp_path / f"data-{len(started)}", reload_manifest=reload)
        await sidecar.start()
        started.append(sidecar)
        return sidecar

    try:
        yield make
    finally:
        for sidecar in started:
            await sidecar.close()


def data_url(sidecar: Sidecar) -> str:
    assert sidecar.data_address is not None
    return "http://{}:{}".format(*sidecar.data_address)


def admin_url(sidecar: Sidecar) -> str:
    assert sidecar.admin_address is not None
    return "http://{}:{}".format(*sidecar.admin_address)


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session
