"""Memory hits answered by the quick path, through the real sidecar.

Rules under test: a repeated request the pipeline has hit or stored is then
answered by the quick path (cache/hits.py) with the same bytes, the same
counts and read-model updates as a pipeline hit; anything the pipeline must
decide afresh (a refresh, another credential, a new environment signature,
a reloaded manifest, a drain, an oversized head) goes through it; answers
on one connection keep the order of its requests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecar.app import Sidecar
from tests.conftest import SidecarFactory, admin_url, data_url
from tests.functional.test_action_cache import (
    CHAT,
    POLICY,
    TOKEN,
    body,
    counting_chat,
    post,
    ready,
)
from tests.helpers import rawhttp
from tests.helpers.fake_upstream import FakeUpstream, chat_chunk, sse_event, sse_handler

RAW_BODY = json.dumps(body()).encode()


def raw_post(payload: bytes = RAW_BODY, *extra: str) -> bytes:
    fields = "".join(f"{line}\r\n" for line in extra)
    return (
        f"POST {CHAT} HTTP/1.1\r\nHost: sidecar\r\nContent-Type: application/json\r\n"
        f"{fields}Content-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload


def data_port(sidecar: Sidecar) -> int:
    assert sidecar.data_address is not None
    return sidecar.data_address[1]


@pytest.fixture
async def cached(fake_upstream: FakeUpstream, make_sidecar: SidecarFactory) -> Sidecar:
    counting_chat(fake_upstream)
    return await ready(await make_sidecar(fake_upstream.url, POLICY))


async def stored(sidecar: Sidecar, session: aiohttp.ClientSession, **headers: str) -> bytes:
    """Send the chat request once (a miss, stored) and return its body."""
    status, h, answer = await post(session, data_url(sidecar) + CHAT, body(), **headers)
    assert status == 200 and h["X-Sidecar-Cache"] == "miss"
    await sidecar.cache_stage.drain_writes()
    return answer


async def test_quick_hit_serves_repeats_after_one_miss(
    cached: Sidecar, fake_upstream: FakeUpstream
) -> None:
    """After the miss that stored it, repeats are quick hits with the same body."""
    async with aiohttp.ClientSession() as s:
        first = await stored(cached, s)
        for _ in range(3):
            status, h, again = await post(s, data_url(cached) + CHAT, body())
            assert (status, h["X-Sidecar-Cache"], again) == (200, "hit", first)
    assert cached.quick_hits.answered == 3
    assert fake_upstream.calls == 1


def _shape(resp: rawhttp.RawResponse) -> list[tuple[str, str]]:
    """The response fields with the values that change per answer blanked."""
    return [(k, "-" if k in ("age", "date") else v) for k, v in resp.headers]


async def test_quick_hit_bytes_equal_pipeline_hit(cached: Sidecar) -> None:
    """A quick hit has the pipeline hit's status, fields in order and body."""
    async with aiohttp.ClientSession() as s:
        await stored(cached, s)
    cached.quick_hits.enabled = False
    slow = await rawhttp.exchange(data_port(cached), raw_post())
    assert cached.quick_hits.answered == 0
    cached.quick_hits.enabled = True
    quick = await rawhttp.exchange(data_port(cached), raw_post())
    assert cached.quick_hits.answered == 1
    assert (quick.status, _shape(quick), quick.body) == (slow.status, _shape(slow), slow.body)
    assert quick.header("x-sidecar-cache") == "hit"
    assert quick.header("age") is not None and int(quick.header("age") or "-1") >= 0


def _counters(text: str) -> dict[str, float]:
    """The counter samples a hit moves, by series, from a /metrics body."""
    wanted = (
        'sidecar_requests_total{route="chat",code="200"}',
        'sidecar_cache_requests_total{route="chat",outcome="hit"}',
        'sidecar_cache_tier_requests_total{tier="memory",outcome="hit"}',
        'sidecar_cache_bytes_saved_total{route="chat"}',
        'sidecar_request_duration_seconds_count{route="chat",cache="hit"}',
    )
    found: dict[str, float] = {}
    for line in text.splitlines():
        for series in wanted:
            name, _, labels = series.partition("{")
            match = re.fullmatch(rf"{re.escape(name)}\{{(.*)\}} (\S+)", line)
            if match and sorted(match.group(1).split(",")) == sorted(labels[:-1].split(",")):
                found[series] = float(match.group(2))
    return found


async def _snapshot(session: aiohttp.ClientSession, sidecar: Sidecar) -> dict[str, Any]:
    async with session.get(admin_url(sidecar) + "/metrics") as resp:
        counters = _counters(await resp.text())
    async with session.get(admin_url(sidecar) + "/state/cache") as resp:
        cache_state = (await resp.json())["routes"]["chat"]
    async with session.get(admin_url(sidecar) + "/state/routes") as resp:
        route_state = (await resp.json())["routes"]["chat"]
    return {
        **counters,
        "state.hits": cache_state["hits"],
        "state.bytes_saved": cache_state["bytes_saved"],
        "state.requests": route_state["requests"],
        "state.2xx": route_state["codes"].get("2xx", 0),
    }


async def test_quick_hit_counts_like_pipeline_hit(cached: Sidecar) -> None:
    """Metrics and read models move by the same amounts for both kinds of hit."""
    rounds = 3
    async with aiohttp.ClientSession() as s:
        await stored(cached, s)
        before = await _snapshot(s, cached)
        cached.quick_hits.enabled = False
        for _ in range(rounds):
            await post(s, data_url(cached) + CHAT, body())
        middle = await _snapshot(s, cached)
        cached.quick_hits.enabled = True
        for _ in range(rounds):
            await post(s, data_url(cached) + CHAT, body())
        after = await _snapshot(s, cached)
    assert cached.quick_hits.answered == rounds
    assert len(after) == 9  # every series was found
    pipeline = {k: middle[k] - before.get(k, 0) for k in after}
    quick = {k: after[k] - middle[k] for k in after}
    assert pipeline == quick
    assert pipeline['sidecar_cache_requests_total{route="chat",outcome="hit"}'] == rounds


async def test_quick_hit_not_for_refresh(cached: Sidecar, fake_upstream: FakeUpstream) -> None:
    """Cache-Control: no-cache reaches the upstream even when a quick hit is ready."""
    async with aiohttp.ClientSession() as s:
        await stored(cached, s)
        _, h, _ = await post(s, data_url(cached) + CHAT, body(), Cache_Control="no-cache")
    assert h["X-Sidecar-Cache"] == "miss" and h["X-Sidecar-Cache-Reason"] == "refresh"
    assert cached.quick_hits.answered == 0
    assert fake_upstream.calls == 2


async def test_quick_hit_not_across_credentials(
    cached: Sidecar, fake_upstream: FakeUpstream
) -> None:
    """Another credential is a miss for the pipeline, never a quick hit."""
    async with aiohttp.ClientSession() as s:
        await stored(cached, s, Authorization="Bearer alice")
        _, h, _ = await post(s, data_url(cached) + CHAT, body(), Authorization="Bearer bob")
        assert h["X-Sidecar-Cache"] == "miss"
        _, h, _ = await post(s, data_url(cached) + CHAT, body(), Authorization="Bearer alice")
        assert h["X-Sidecar-Cache"] == "hit"
    assert cached.quick_hits.answered == 1
    assert fake_upstream.calls == 2


async def test_quick_hit_stops_when_environment_changes(
    cached: Sidecar, fake_upstream: FakeUpstream
) -> None:
    """A new environment signature sends the next request to the pipeline (a miss)."""
    async with aiohttp.ClientSession() as s:
        await stored(cached, s)
        signature = cached.environment.signature
        assert signature is not None
        cached.environment.signature = bytes(32)
        _, h, _ = await post(s, data_url(cached) + CHAT, body())
    assert h["X-Sidecar-Cache"] == "miss"
    assert cached.quick_hits.answered == 0
    assert fake_upstream.calls == 2


async def test_quick_hit_forgotten_on_reload(cached: Sidecar) -> None:
    """A reload forgets every fingerprint; the next hit is the pipeline's, then quick."""
    async with aiohttp.ClientSession() as s:
        await stored(cached, s)
        assert len(cached.quick_hits) == 1
        async with s.post(
            admin_url(cached) + "/admin/policy/reload",
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as resp:
            assert resp.status == 200
        assert len(cached.quick_hits) == 0
        for _ in range(2):
            _, h, _ = await post(s, data_url(cached) + CHAT, body())
            assert h["X-Sidecar-Cache"] == "hit"
    assert cached.quick_hits.answered == 1


async def test_quick_hit_head_limit_follows_reload(cached: Sidecar) -> None:
    """A head over a reloaded, smaller header limit gets the pipeline's 431."""
    async with aiohttp.ClientSession() as s:
        await stored(cached, s)
    policy = cached.manifest.source
    assert policy is not None
    with open(policy, "a") as f:
        f.write("limits:\n  max_header_bytes: 2KiB\n")
    assert cached.reload()
    big = raw_post(RAW_BODY, "X-Padding: " + "p" * 3000)
    answer = await rawhttp.exchange(data_port(cached), big)
    assert answer.status == 431
    assert cached.quick_hits.answered == 0


async def test_quick_hit_pipelined_answers_keep_order(
    cached: Sidecar, fake_upstream: FakeUpstream
) -> None:
    """Quick, forwarded, quick in one write: three answers, in request order."""
    async with aiohttp.ClientSession() as s:
        await stored(cached, s)
    gate = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        await gate.wait()
        return web.json_response({"slow": True})

    fake_upstream.handler = slow
    forwarded = b"GET /slots HTTP/1.1\r\nHost: sidecar\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", data_port(cached))
    try:
        writer.write(raw_post() + forwarded + raw_post())
        await writer.drain()
        async with asyncio.timeout(10):
            await fake_upstream.request_started.wait()
            gate.set()
            bodies = [await _read_one(reader) for _ in range(3)]
    finally:
        writer.close()
    assert [b"slow" in b for b in bodies] == [False, True, False]
    assert cached.quick_hits.answered == 2


async def _read_one(reader: asyncio.StreamReader) -> bytes:
    """One Content-Length framed response body."""
    head = await reader.readuntil(b"\r\n\r\n")
    match = re.search(rb"(?i)content-length: (\d+)", head)
    assert match is not None, head
    return await reader.readexactly(int(match.group(1)))


async def test_quick_hit_replays_stored_stream(
    fake_upstream: FakeUpstream, make_sidecar: SidecarFactory
) -> None:
    """A stored SSE stream comes back from the quick path byte for byte."""
    events = [chat_chunk(0, "Hel"), chat_chunk(1, "lo", finish="stop")]
    fake_upstream.handler = sse_handler([*map(sse_event, events), b"data: [DONE]\n\n"])
    sidecar = await ready(await make_sidecar(fake_upstream.url, POLICY))
    async with aiohttp.ClientSession() as s:
        _, h1, streamed = await post(s, data_url(sidecar) + CHAT, body(stream=True))
        await sidecar.cache_stage.drain_writes()
        _, h2, replayed = await post(s, data_url(sidecar) + CHAT, body(stream=True))
    assert (h1["X-Sidecar-Cache"], h2["X-Sidecar-Cache"]) == ("miss", "hit")
    assert h2["Content-Type"].startswith("text/event-stream")
    assert replayed == streamed
    assert sidecar.quick_hits.answered == 1
    assert fake_upstream.calls == 1


async def test_quick_hit_off_while_draining(
    fake_upstream: FakeUpstream, make_sidecar: SidecarFactory
) -> None:
    """During a drain hits go through the pipeline, which closes the connection."""
    counting_chat(fake_upstream)
    sidecar = await ready(
        await make_sidecar(fake_upstream.url, POLICY + "listen:\n  drain_delay: 5s\n")
    )
    async with aiohttp.ClientSession() as s:
        await stored(sidecar, s)
    drain = asyncio.get_running_loop().create_task(sidecar.drain())
    try:
        async with asyncio.timeout(5):
            while sidecar.quick_hits.enabled:
                await asyncio.sleep(0)
        answer = await rawhttp.exchange(data_port(sidecar), raw_post())
    finally:
        drain.cancel()
    assert answer.header("x-sidecar-cache") == "hit"
    assert answer.header("connection") == "close"
    assert sidecar.quick_hits.answered == 0


async def test_quick_hit_stats_on_admin_port(cached: Sidecar) -> None:
    """/admin/cache/stats says how many requests the quick path answered."""
    async with aiohttp.ClientSession() as s:
        await stored(cached, s)
        await post(s, data_url(cached) + CHAT, body())
        async with s.get(admin_url(cached) + "/admin/cache/stats") as resp:
            quick = (await resp.json())["quick"]
    assert quick["answered"] == 1 and quick["fingerprints"] == 1 and quick["enabled"]


async def test_quick_hit_access_line_like_pipeline_hit(
    cached: Sidecar, caplog: pytest.LogCaptureFixture
) -> None:
    """A quick hit's access line has the pipeline hit's fields, in order."""
    caplog.set_level(logging.INFO, logger="sidecar.access")
    async with aiohttp.ClientSession() as s:
        await stored(cached, s)
        caplog.clear()
        cached.quick_hits.enabled = False
        await post(s, data_url(cached) + CHAT, body())
        cached.quick_hits.enabled = True
        await post(s, data_url(cached) + CHAT, body())
        async with asyncio.timeout(5):
            while len([r for r in caplog.records if r.name == "sidecar.access"]) < 2:
                await asyncio.sleep(0)
    assert cached.quick_hits.answered == 1
    slow, quick = (
        {k: v for k, v in vars(r).items() if k in ACCESS_FIELDS}
        for r in caplog.records
        if r.name == "sidecar.access"
    )
    assert list(slow) == list(quick) == list(ACCESS_FIELDS)
    slow.pop("duration_ms"), quick.pop("duration_ms")
    assert slow == quick == {
        "method": "POST", "route": "chat", "status": 200,
        "bytes": slow["bytes"], "cache": "hit",
    }


ACCESS_FIELDS = ("method", "route", "status", "duration_ms", "bytes", "cache")
