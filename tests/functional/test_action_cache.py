"""The action cache through the real sidecar and the fake upstream.

Rules under test: a repeated deterministic request costs one upstream call
and gets byte-identical bodies; equal requests hit whatever their JSON
spelling; credentials never share entries; entries survive a restart; a
corrupt stored value, a cut or truncated stream and any refused answer are
never served from the cache; every request that is not a hit says why.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import plyvel
import pytest
from aiohttp import web

from sidecar.app import Sidecar
from tests.conftest import SidecarFactory, admin_url, data_url
from tests.helpers.fake_upstream import (
    FakeUpstream,
    chat_chunk,
    chat_completion,
    sse_event,
    sse_handler,
)

CHAT = "/v1/chat/completions"
TOKEN = "test-admin-token-0123456789"
POLICY = f"admin:\n  token: {TOKEN}\n"


def body(**extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hello"}],
        "temperature": 0,
    }
    doc.update(extra)
    return doc


async def ready(sidecar: Sidecar) -> Sidecar:
    """Wait until the upstream identity is known (the cache needs it)."""
    async with asyncio.timeout(10):
        while sidecar.environment.signature is None:
            await asyncio.sleep(0.01)
    return sidecar


def counting_chat(fake: FakeUpstream, content: str = "cached answer") -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response(chat_completion(f"{content} #{fake.calls}"))

    fake.handler = handler


async def post(session: aiohttp.ClientSession, url: str, payload: bytes | dict[str, Any],
               **headers: str) -> tuple[int, dict[str, str], bytes]:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    hdrs = {"Content-Type": "application/json", **{k.replace("_", "-"): v for k, v in headers.items()}}
    async with session.post(url, data=data, headers=hdrs) as resp:
        return resp.status, dict(resp.headers), await resp.read()


@pytest.fixture
async def cached(fake_upstream: FakeUpstream, make_sidecar: SidecarFactory) -> Sidecar:
    counting_chat(fake_upstream)
    return await ready(await make_sidecar(fake_upstream.url, POLICY))


async def test_cache_repeat_served_from_memory(cached: Sidecar, fake_upstream: FakeUpstream) -> None:
    """A repeated deterministic request makes one upstream call and gets the same bytes."""
    async with aiohttp.ClientSession() as s:
        st1, h1, b1 = await post(s, data_url(cached) + CHAT, body())
        await cached.cache_stage.drain_writes()
        st2, h2, b2 = await post(s, data_url(cached) + CHAT, body())
    assert (st1, st2) == (200, 200)
    assert b1 == b2
    assert fake_upstream.calls == 1
    assert h1["X-Sidecar-Cache"] == "miss"
    assert h2["X-Sidecar-Cache"] == "hit"
    assert int(h2["Age"]) >= 0
    assert "X-Sidecar-Cache-Reason" not in h2


async def test_cache_equal_json_spellings_hit(cached: Sidecar, fake_upstream: FakeUpstream) -> None:
    """Permuted keys, other whitespace and 0 vs 0.0 are the same request."""
    spellings = [
        b'{"model":"tiny","messages":[{"role":"user","content":"hello"}],"temperature":0}',
        b'{ "temperature" : 0.0 ,\n "messages" : [ { "content":"hello", "role":"user" } ],"model":"tiny"}',
        b'{"temperature":0e0,"model":"tiny","messages":[{"content":"hel\\u006co","role":"user"}]}',
    ]
    async with aiohttp.ClientSession() as s:
        results = []
        for raw in spellings:
            results.append(await post(s, data_url(cached) + CHAT, raw))
            await cached.cache_stage.drain_writes()
    assert fake_upstream.calls == 1
    assert [h["X-Sidecar-Cache"] for _, h, _ in results] == ["miss", "hit", "hit"]
    assert len({b for _, _, b in results}) == 1


async def test_cache_output_fields_miss(cached: Sidecar, fake_upstream: FakeUpstream) -> None:
    """Changing a field that changes the answer is a different action."""
    variants = [
        body(), body(max_tokens=5), body(seed=1), body(stop=["x"]), body(model="other"),
        body(response_format={"type": "json_object"}), body(grammar="root ::= \"a\""),
        body(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        body(messages=[{"role": "user", "content": "hello!"}]),
    ]
    async with aiohttp.ClientSession() as s:
        for v in variants:
            _, h, _ = await post(s, data_url(cached) + CHAT, v)
            assert h["X-Sidecar-Cache"] == "miss"
            await cached.cache_stage.drain_writes()
    assert fake_upstream.calls == len(variants)


async def test_cache_credentials_never_share(cached: Sidecar, fake_upstream: FakeUpstream) -> None:
    """Two credentials asking the same thing each pay for their own answer."""
    async with aiohttp.ClientSession() as s:
        _, _ha, ba = await post(s, data_url(cached) + CHAT, body(), Authorization="Bearer alice")
        await cached.cache_stage.drain_writes()
        _, hb, bb = await post(s, data_url(cached) + CHAT, body(), Authorization="Bearer bob")
        await cached.cache_stage.drain_writes()
        _, ha2, ba2 = await post(s, data_url(cached) + CHAT, body(), Authorization="Bearer alice")
    assert fake_upstream.calls == 2
    assert hb["X-Sidecar-Cache"] == "miss"
    assert ha2["X-Sidecar-Cache"] == "hit"
    assert ba2 == ba != bb


async def test_cache_public_route_shares(fake_upstream: FakeUpstream, make_sidecar: SidecarFactory) -> None:
    """A route marked public shares entries across credentials."""

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response({"object": "list", "data": [{"id": "tiny"}]})

    fake_upstream.handler = handler
    policy = """
routes:
  - name: models
    methods: [GET]
    paths: [/v1/models]
    kind: models
    cache: {when: always, ttl: 30s, public: true}
"""
    sidecar = await ready(await make_sidecar(fake_upstream.url, policy))
    async with aiohttp.ClientSession() as s:
        for who in ("alice", "bob"):
            async with s.get(data_url(sidecar) + "/v1/models", headers={"Authorization": who}) as r:
                await r.read()
            await sidecar.cache_stage.drain_writes()
    assert fake_upstream.calls == 1


async def test_cache_survives_restart(fake_upstream: FakeUpstream, tmp_path: Path) -> None:
    """An entry stored before a restart is served from disk after it."""
    from sidecar.manifest import load_manifest

    counting_chat(fake_upstream)
    flags = {"upstream": fake_upstream.url, "listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0"}
    bodies = []
    tiers = []
    for _ in range(2):
        sidecar = Sidecar(load_manifest(None, env={}, flags=flags), data_dir=tmp_path / "data")
        await sidecar.start()
        try:
            await ready(sidecar)
            async with aiohttp.ClientSession() as s:
                _, h, b = await post(s, data_url(sidecar) + CHAT, body())
            await sidecar.cache_stage.drain_writes()
            bodies.append(b)
            tiers.append(h["X-Sidecar-Cache"])
        finally:
            await sidecar.close()
    assert tiers == ["miss", "hit"]
    assert bodies[0] == bodies[1]
    assert fake_upstream.calls == 1


async def test_cache_corrupt_disk_value_never_served(fake_upstream: FakeUpstream, tmp_path: Path) -> None:
    """A stored value whose bytes were damaged is a miss, never served."""
    from sidecar.manifest import load_manifest

    counting_chat(fake_upstream)
    flags = {"upstream": fake_upstream.url, "listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0"}
    policy = tmp_path / "p.yaml"
    policy.write_text("cache:\n  compression: {enabled: false}\n")

    async def run_once() -> tuple[str, bytes]:
        sidecar = Sidecar(load_manifest(str(policy), env={}, flags=flags), data_dir=tmp_path / "data")
        await sidecar.start()
        try:
            await ready(sidecar)
            async with aiohttp.ClientSession() as s:
                _, h, b = await post(s, data_url(sidecar) + CHAT, body())
            await sidecar.cache_stage.drain_writes()
            return h["X-Sidecar-Cache"], b
        finally:
            await sidecar.close()

    first, good = await run_once()
    db = plyvel.DB(str(tmp_path / "data" / "cache"))
    flipped = 0
    for key, value in db.iterator(prefix=b"b/"):
        damaged = bytearray(value)
        damaged[-3] ^= 0xFF
        db.put(key, bytes(damaged))
        flipped += 1
    db.close()
    assert flipped == 1
    second, again = await run_once()
    assert (first, second) == ("miss", "miss")
    assert fake_upstream.calls == 2
    assert again != good  # the fake numbers its answers: this one is fresh


async def test_cache_stream_stored_and_replayed(fake_upstream: FakeUpstream, make_sidecar: SidecarFactory) -> None:
    """A complete stream is stored and replayed as the same SSE bytes."""
    events = [sse_event(chat_chunk(i, w)) for i, w in enumerate(["a", "b"])]
    events += [sse_event({**chat_chunk(2, ""), "choices": [{"index": 0, "delta": {"reasoning_content": "r"}, "finish_reason": "stop"}]}),
               sse_event("[DONE]")]
    fake_upstream.handler = sse_handler(events)
    sidecar = await ready(await make_sidecar(fake_upstream.url))
    async with aiohttp.ClientSession() as s:
        _, _h1, b1 = await post(s, data_url(sidecar) + CHAT, body(stream=True))
        await sidecar.cache_stage.drain_writes()
        _, h2, b2 = await post(s, data_url(sidecar) + CHAT, body(stream=True))
    assert b1 == b2 == b"".join(events)
    assert h2["X-Sidecar-Cache"] == "hit"
    assert h2["Content-Type"].startswith("text/event-stream")
    assert fake_upstream.calls == 1


@pytest.mark.parametrize("shape", ["cut", "no_done", "length", "error_event"])
async def test_cache_bad_stream_never_stored(fake_upstream: FakeUpstream, make_sidecar: SidecarFactory, shape: str) -> None:
    """A cut, unfinished, length-limited or errored stream is never stored."""
    events = [sse_event(chat_chunk(0, "partial"))]
    cut_after = None
    if shape == "cut":
        events += [sse_event(chat_chunk(1, "more")), sse_event("[DONE]")]
        cut_after = 1
    elif shape == "length":
        events += [sse_event(chat_chunk(1, "", "length")), sse_event("[DONE]")]
    elif shape == "error_event":
        events += [sse_event({"error": {"message": "boom"}}), sse_event("[DONE]")]
    fake_upstream.handler = sse_handler(events, cut_after=cut_after)
    sidecar = await ready(await make_sidecar(fake_upstream.url))
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            try:
                await post(s, data_url(sidecar) + CHAT, body(stream=True))
            except aiohttp.ClientPayloadError:
                assert shape == "cut"
            await sidecar.cache_stage.drain_writes()
    assert fake_upstream.calls == 2
    assert len(sidecar.cache.memory) == 0


async def test_cache_refusals_say_why(cached: Sidecar, fake_upstream: FakeUpstream) -> None:
    """Bypasses name their reason in the header and in the metric's outcome label."""
    async with aiohttp.ClientSession() as s:
        url = data_url(cached) + CHAT
        _, h, _ = await post(s, url, body(temperature=0.7))
        assert h["X-Sidecar-Cache-Reason"] == "not_deterministic"
        _, h, _ = await post(s, url, body(), Cache_Control="no-store")
        assert h["X-Sidecar-Cache-Reason"] == "no_store"
        _, h, _ = await post(s, url, b'{"temperature": 0, "x": NaN}')
        assert h["X-Sidecar-Cache-Reason"] == "not_canonical"
        _, h, _ = await post(s, url, b'{"temperature": 0, "x": 9007199254740993}')
        assert h["X-Sidecar-Cache-Reason"] == "not_canonical"
        _, h, _ = await post(s, url, b"not json at all")
        assert h["X-Sidecar-Cache-Reason"] == "invalid_json"
        async with s.get(admin_url(cached) + "/metrics") as resp:
            text = await resp.text()
    assert fake_upstream.calls == 5
    for outcome in ("not_deterministic", "no_store", "not_canonical", "invalid_json"):
        assert f'outcome="{outcome}"' in text


async def test_cache_duplicate_keys_refused(cached: Sidecar, fake_upstream: FakeUpstream) -> None:
    """A body with duplicate keys is refused with 400 and never reaches the upstream."""
    async with aiohttp.ClientSession() as s:
        status, _, raw = await post(s, data_url(cached) + CHAT, b'{"temperature": 0, "temperature": 1}')
    assert status == 400
    assert json.loads(raw)["error"]["code"] == "duplicate_keys"
    assert fake_upstream.calls == 0


async def test_cache_no_cache_refreshes(cached: Sidecar, fake_upstream: FakeUpstream) -> None:
    """Cache-Control: no-cache skips the lookup and replaces the stored answer."""
    async with aiohttp.ClientSession() as s:
        url = data_url(cached) + CHAT
        _, _, first = await post(s, url, body())
        await cached.cache_stage.drain_writes()
        _, h, fresh = await post(s, url, body(), Cache_Control="no-cache")
        await cached.cache_stage.drain_writes()
        _, h3, third = await post(s, url, body())
    assert h["X-Sidecar-Cache-Reason"] == "refresh"
    assert fresh != first
    assert third == fresh
    assert h3["X-Sidecar-Cache"] == "hit"
    assert fake_upstream.calls == 2


@pytest.mark.parametrize(
    ("status", "headers", "reason"),
    [(500, {}, "upstream_error"), (404, {}, "status_not_cacheable"),
     (200, {"Cache-Control": "no-store"}, "response_no_store"),
     (200, {"Cache-Control": "private, max-age=5"}, "response_no_store"),
     (200, {"Set-Cookie": "a=1"}, "response_sets_cookie")],
)
async def test_cache_unstorable_answers_not_stored(fake_upstream: FakeUpstream, make_sidecar: SidecarFactory,
                                                    status: int, headers: dict[str, str], reason: str) -> None:
    """Non-2xx answers and answers that forbid storing are relayed but never stored."""

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response(chat_completion("x"), status=status, headers=headers)

    fake_upstream.handler = handler
    sidecar = await ready(await make_sidecar(fake_upstream.url))
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            st, h, _ = await post(s, data_url(sidecar) + CHAT, body())
            assert st == status
            assert h["X-Sidecar-Cache-Reason"] == reason
            await sidecar.cache_stage.drain_writes()
    assert fake_upstream.calls == 2


async def test_cache_purge_needs_token_and_empties(cached: Sidecar, fake_upstream: FakeUpstream) -> None:
    """POST /admin/cache/purge needs the token; after it, the next request misses."""
    async with aiohttp.ClientSession() as s:
        await post(s, data_url(cached) + CHAT, body())
        await cached.cache_stage.drain_writes()
        async with s.post(admin_url(cached) + "/admin/cache/purge", json={}) as resp:
            assert resp.status == 401
        async with s.get(admin_url(cached) + "/admin/cache/stats") as resp:
            stats = await resp.json()
        assert stats["memory"]["entries"] == 1
        async with s.post(admin_url(cached) + "/admin/cache/purge", json={"route": "chat"},
                          headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            assert resp.status == 200
            assert (await resp.json())["removed"] >= 1
        _, h, _ = await post(s, data_url(cached) + CHAT, body())
    assert h["X-Sidecar-Cache"] == "miss"
    assert fake_upstream.calls == 2


async def test_cache_latency_and_bytes_saved(cached: Sidecar, fake_upstream: FakeUpstream) -> None:
    """A hit adds to the bytes-saved counter and the hit outcome."""
    async with aiohttp.ClientSession() as s:
        await post(s, data_url(cached) + CHAT, body())
        await cached.cache_stage.drain_writes()
        _, _, b = await post(s, data_url(cached) + CHAT, body())
        async with s.get(admin_url(cached) + "/metrics") as resp:
            text = await resp.text()
    assert f'sidecar_cache_bytes_saved_total{{route="chat"}} {len(b)}' in text
    assert 'sidecar_cache_requests_total{outcome="hit",route="chat"} 1' in text
    assert 'sidecar_cache_requests_total{outcome="miss",route="chat"} 1' in text
    assert 'sidecar_cache_latency_saved_seconds_total{route="chat"}' in text
