"""Every capability is reachable on the running sidecar's own ports.

The capabilities have deep tests of their own; these check the wiring: the
read models and the dashboard on the admin port, artifacts by digest on both
ports, and the state that requests move.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.conftest import SidecarFactory, admin_url, data_url
from tests.helpers.fake_upstream import FakeUpstream, chat_completion


async def test_wiring_state_models_listed_and_moving(fake_upstream: FakeUpstream, make_sidecar: SidecarFactory) -> None:
    """/state lists every read model, and a request moves the routes model."""

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response(chat_completion("x"))

    fake_upstream.handler = handler
    sidecar = await make_sidecar(fake_upstream.url)
    async with aiohttp.ClientSession() as s:
        async with s.get(admin_url(sidecar) + "/state") as resp:
            assert resp.status == 200
            listing = await resp.text()
        for name in ("cache", "routes", "coalescing", "upstream", "policy", "artifacts"):
            assert name in listing
        async with s.post(data_url(sidecar) + "/v1/chat/completions",
                          json={"messages": [], "temperature": 0.5}) as resp:
            assert resp.status == 200
        async with asyncio.timeout(5):
            while True:
                async with s.get(admin_url(sidecar) + "/state/routes") as resp:
                    doc = await resp.json()
                    etag = resp.headers["ETag"]
                if "chat" in str(doc):
                    break
                await asyncio.sleep(0.05)
        async with s.get(admin_url(sidecar) + "/state/routes", headers={"If-None-Match": etag}) as resp:
            assert resp.status in (200, 304)
        async with s.get(admin_url(sidecar) + "/dashboard") as resp:
            assert resp.status == 200
            assert resp.content_type == "text/html"
        async with s.get(admin_url(sidecar) + "/state/stream?models=policy") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            head = await resp.content.readuntil(b"\n\n")
            assert head.startswith(b"retry: ")
            first = await resp.content.readuntil(b"\n\n")
            assert b"event: snapshot" in first
            assert b'"model":"policy"' in first.replace(b" ", b"")


async def test_wiring_artifacts_by_hash_on_both_ports(fake_upstream: FakeUpstream, make_sidecar: SidecarFactory, tmp_path: Path) -> None:
    """A file in artifacts.dirs is served by its sha256 on the data and admin ports."""
    models = tmp_path / "models"
    models.mkdir()
    blob = b"weights" * 1000
    (models / "tiny.gguf").write_bytes(blob)
    digest = hashlib.sha256(blob).hexdigest()
    sidecar = await make_sidecar(fake_upstream.url, f"artifacts:\n  dirs: [{models}]\n")
    async with aiohttp.ClientSession() as s:
        for base in (data_url(sidecar), admin_url(sidecar)):
            url = f"{base}/admin/models/by-hash/{digest}"
            async with asyncio.timeout(10):
                while True:
                    async with s.get(url) as resp:
                        if resp.status == 200:
                            body = await resp.read()
                            break
                    await asyncio.sleep(0.05)
            assert body == blob
            assert resp.headers["ETag"] == f'"{digest}"'
            assert "immutable" in resp.headers["Cache-Control"]
            async with s.get(url, headers={"If-None-Match": f'"{digest}"'}) as resp:
                assert resp.status == 304
            async with s.get(f"{base}/admin/models/by-hash/{digest.upper()}") as resp:
                assert resp.status == 400
    assert fake_upstream.calls == 0


async def test_wiring_prompt_tokens_reach_read_models(fake_upstream: FakeUpstream, make_sidecar: SidecarFactory) -> None:
    """Tokens an answer reports land in the routes and upstream read models."""

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response({"content": "x", "stop": True, "stop_type": "limit",
                                  "timings": {"cache_n": 7, "prompt_n": 3}})

    fake_upstream.handler = handler
    sidecar = await make_sidecar(fake_upstream.url)
    async with aiohttp.ClientSession() as s:
        async with s.post(data_url(sidecar) + "/completion", json={"prompt": "p", "temperature": 1}) as resp:
            assert resp.status == 200
            await resp.read()
    upstream = sidecar.upstream_model.snapshot()["prompt_tokens"]
    assert upstream == {sidecar.upstream.authority: {"reused": 7, "evaluated": 3}}
    assert "7" in str(sidecar.routes_model.snapshot())
