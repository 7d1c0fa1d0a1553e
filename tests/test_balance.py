"""Replica choice: prefix index, affinity, load guard, health (sidecar/balance.py).

Pure parts first (prompt rendering, block chains, the index, ``choose`` on
idle pools), then the stage in the real sidecar in front of two fake
upstreams, holding them on Events where concurrency matters.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecar.app import Sidecar
from sidecar.balance import Balancer, PrefixIndex, block_chain, prompt_text
from sidecar.manifest import RouteKind
from sidecar.upstream import Upstream
from tests.conftest import SidecarFactory, data_url
from tests.helpers.fake_upstream import FakeUpstream, sse_event, sse_handler

JSON = {"Content-Type": "application/json"}
SYSTEM = "You are a careful assistant who answers in one line. " * 3


def _chat(conversation: int, turns: int, *, system: bool = False) -> dict[str, Any]:
    """A conversation's prompt after ``turns`` turns; unique from its first block."""
    messages = [{"role": "system", "content": SYSTEM}] if system else []
    messages.append(
        {"role": "user", "content": f"conversation {conversation} opens here " * 4}
    )
    for turn in range(turns):
        messages += [
            {"role": "assistant", "content": f"reply {turn}"},
            {"role": "user", "content": f"follow-up {turn} of {conversation} " * 3},
        ]
    return {"model": "m", "messages": messages, "max_tokens": 4}


def _chain(doc: dict[str, Any], kind: RouteKind = RouteKind.CHAT) -> list[int]:
    return block_chain(prompt_text(kind, doc), 64, 2048)


# --- prompts and chains ------------------------------------------------------------


def test_prompt_text_next_turn_extends_previous() -> None:
    """A conversation's next turn renders as its previous turn plus more text."""
    first, second = (
        prompt_text(RouteKind.CHAT, _chat(1, 0)),
        prompt_text(RouteKind.CHAT, _chat(1, 1)),
    )

    assert second.startswith(first) and len(second) > len(first)


def test_prompt_text_roles_told_apart() -> None:
    """The same words under different roles render differently."""
    user = {"messages": [{"role": "user", "content": "x" * 100}]}
    system = {"messages": [{"role": "system", "content": "x" * 100}]}

    assert prompt_text(RouteKind.CHAT, user) != prompt_text(RouteKind.CHAT, system)


def test_prompt_text_token_ids_render_as_text() -> None:
    """A token-id prompt renders, so such prompts route by prefix too."""
    text = prompt_text(RouteKind.COMPLETION, {"prompt": [1, 22, 333]})

    assert text.endswith("1,22,333,")


def test_block_chain_shared_prefix_shares_leading_hashes() -> None:
    """Two texts agree on exactly the blocks before they diverge."""
    a = block_chain("a" * 200 + "tail one", 64)
    b = block_chain("a" * 130 + "b" * 78, 64)

    assert len(a) == 3 and len(b) == 3
    assert a[:2] == b[:2] and a[2] != b[2]


def test_block_chain_bounded_by_max_blocks() -> None:
    """Only the first max_blocks whole blocks are hashed."""
    assert len(block_chain("x" * 10_000, 64, max_blocks=5)) == 5
    assert block_chain("x" * 63, 64) == []


def test_prefix_index_match_longest_held_prefix() -> None:
    """match counts the leading blocks of a chain the index holds."""
    index = PrefixIndex()
    index.add(block_chain("a" * 640, 64))

    assert index.match(block_chain("a" * 400 + "b" * 400, 64)) == 6
    assert index.match(block_chain("a" * 1000, 64)) == 10
    assert index.match(block_chain("b" * 1000, 64)) == 0


def test_prefix_index_bounded_evicts_tails_first() -> None:
    """Past max_entries the oldest chain loses its last blocks, not its first."""
    index = PrefixIndex(max_entries=20)
    old = block_chain("o" * 64 * 10, 64)
    index.add(old)
    index.add(block_chain("n" * 64 * 15, 64))

    assert len(index) == 20
    assert index.match(old) == 5


# --- choose, without traffic ---------------------------------------------------------


def _balancer(n: int = 2, **kwargs: Any) -> Balancer:
    return Balancer(
        [Upstream(f"http://127.0.0.1:{9000 + i}") for i in range(n)], **kwargs
    )


def test_choose_new_prefixes_spread_in_turn() -> None:
    """Unknown prefixes on idle replicas go to each replica in turn."""
    balancer = _balancer(2)

    chosen = []
    for conversation in range(4):
        replica, reason = balancer.choose(_chain(_chat(conversation, 0)))
        balancer._record(replica, reason, _chain(_chat(conversation, 0)), None)
        replica.routed = 0
        chosen.append(replica)

    assert reason == "placed"
    assert (
        chosen[0] is chosen[2] and chosen[1] is chosen[3] and chosen[0] is not chosen[1]
    )


def test_choose_known_prefix_follows_affinity() -> None:
    """A prompt extending one a replica was sent goes to that replica."""
    balancer = _balancer(3)
    home = balancer.replicas[2]
    balancer._record(home, "placed", _chain(_chat(7, 1)), None)
    home.routed = 1

    replica, reason = balancer.choose(_chain(_chat(7, 2)))

    assert (replica, reason) == (home, "affinity")


def test_choose_new_prefix_least_loaded() -> None:
    """A prompt no replica knows goes to the least loaded one."""
    balancer = _balancer(3)
    balancer.replicas[0].routed, balancer.replicas[1].routed = 3, 1
    balancer.replicas[2].routed = 2

    replica, _ = balancer.choose(_chain(_chat(1, 0)))

    assert replica is balancer.replicas[1]


def test_choose_busy_home_guarded_to_least_loaded() -> None:
    """Affinity yields once the home replica has more than 2*least+4 in flight."""
    balancer = _balancer(2)
    home, other = balancer.replicas
    balancer._record(home, "placed", _chain(_chat(1, 1)), None)
    other.routed = 1

    home.routed = 6
    assert balancer.choose(_chain(_chat(1, 2))) == (home, "affinity")
    home.routed = 7
    assert balancer.choose(_chain(_chat(1, 2))) == (other, "guarded")


def test_choose_unhealthy_replica_skipped() -> None:
    """A replica marked down gets nothing, even for its own prefixes."""
    balancer = _balancer(2)
    home, other = balancer.replicas
    balancer._record(home, "placed", _chain(_chat(1, 1)), None)
    home.routed = 0
    home.healthy = False

    assert balancer.choose(_chain(_chat(1, 2)))[0] is other


def test_choose_all_unhealthy_still_answers() -> None:
    """With every replica down the request is still sent somewhere (and may fail)."""
    balancer = _balancer(2)
    for replica in balancer.replicas:
        replica.healthy = False

    assert balancer.choose([])[0] in balancer.replicas


def test_choose_short_shared_prefix_placed_by_load() -> None:
    """Half the prompt or less in common (a system prompt) is placed by load."""
    balancer = _balancer(2)
    home, other = balancer.replicas
    balancer._record(home, "placed", block_chain("s" * 64 * 4 + "a" * 64 * 6, 64), None)
    home.routed = 1

    assert balancer.choose(block_chain("s" * 64 * 4 + "b" * 64 * 6, 64)) == (
        other,
        "placed",
    )


def test_choose_long_shared_prefix_attracts() -> None:
    """64 blocks in common win affinity even when that is under half the prompt."""
    balancer = _balancer(2)
    home = balancer.replicas[0]
    balancer._record(
        home, "placed", block_chain("s" * 64 * 64 + "a" * 64 * 80, 64), None
    )
    home.routed = 1

    assert balancer.choose(block_chain("s" * 64 * 64 + "b" * 64 * 80, 64)) == (
        home,
        "affinity",
    )


def test_choose_sticky_key_wins_over_prefix() -> None:
    """A known conversation id goes where it went last."""
    balancer = _balancer(2)
    first, second = balancer.replicas
    balancer._record(first, "placed", _chain(_chat(1, 1)), None)
    balancer._record(second, "placed", [], "conv-1")
    first.routed = second.routed = 0

    assert balancer.choose(_chain(_chat(1, 2)), "conv-1") == (second, "sticky")


# --- the stage in the sidecar --------------------------------------------------------


@pytest.fixture
async def fakes() -> AsyncIterator[list[FakeUpstream]]:
    started = [await FakeUpstream().start() for _ in range(2)]
    try:
        yield started
    finally:
        for fake in started:
            await fake.close()


async def _sidecar(
    make_sidecar: SidecarFactory, urls: list[str], **kwargs: Any
) -> tuple[Sidecar, Balancer]:
    # A comma-separated --upstream lists the replicas.
    sidecar = await make_sidecar(",".join(urls))
    balancer = Balancer(sidecar.upstreams, **kwargs)
    sidecar.proxy.set_stages([balancer])
    return sidecar, balancer


async def _post(
    client: aiohttp.ClientSession,
    sidecar: Sidecar,
    doc: Any,
    path: str = "/v1/chat/completions",
    headers: dict[str, str] | None = None,
) -> int:
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    async with client.post(
        data_url(sidecar) + path, data=body, headers={**JSON, **(headers or {})}
    ) as resp:
        await resp.read()
        return resp.status


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _holder(fake: FakeUpstream, release: asyncio.Event) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.json_response({"ok": True})

    fake.handler = handler


async def test_balancer_conversation_stays_on_its_replica(
    make_sidecar: SidecarFactory,
    fakes: list[FakeUpstream],
    client: aiohttp.ClientSession,
) -> None:
    """Every turn of a conversation reaches the replica its first turn went to."""
    sidecar, _ = await _sidecar(make_sidecar, [f.url for f in fakes])

    for turn in range(4):
        for conversation in range(4):
            assert await _post(client, sidecar, _chat(conversation, turn)) == 200

    for fake in fakes:
        conversations = {
            json.loads(r.body)["messages"][0]["content"] for r in fake.received
        }
        assert len(fake.received) == 4 * len(conversations)
    assert fakes[0].calls == fakes[1].calls == 8


async def test_balancer_single_upstream_noop(
    make_sidecar: SidecarFactory,
    fake_upstream: FakeUpstream,
    client: aiohttp.ClientSession,
) -> None:
    """With one upstream the stage leaves the exchange alone."""
    sidecar = await make_sidecar(fake_upstream.url)
    balancer = Balancer(sidecar.upstreams)
    sidecar.proxy.set_stages([balancer])

    assert await _post(client, sidecar, _chat(1, 0)) == 200
    assert balancer.replicas[0].counts["routed"] == 0


async def test_balancer_replies_ended_load_back_to_zero(
    make_sidecar: SidecarFactory,
    fakes: list[FakeUpstream],
    client: aiohttp.ClientSession,
) -> None:
    """Plain answers and streams both give their replica's count back when they end."""
    fakes[1].handler = sse_handler([sse_event({"a": 1}), b"data: [DONE]\n\n"])
    sidecar, balancer = await _sidecar(make_sidecar, [f.url for f in fakes])

    for conversation in range(4):
        await _post(client, sidecar, _chat(conversation, 0))

    assert [r.counts["routed"] for r in balancer.replicas] == [2, 2]
    assert [r.routed for r in balancer.replicas] == [0, 0]


async def test_balancer_hot_prefix_spread_bounded(
    make_sidecar: SidecarFactory,
    fakes: list[FakeUpstream],
    client: aiohttp.ClientSession,
) -> None:
    """Concurrent requests for one hot prefix spill over: at most 2*least+5 each."""
    release = asyncio.Event()
    for fake in fakes:
        _holder(fake, release)
    sidecar, balancer = await _sidecar(make_sidecar, [f.url for f in fakes])
    n = 12

    tasks = [asyncio.create_task(_post(client, sidecar, _chat(1, 3))) for _ in range(n)]
    async with asyncio.timeout(10):
        while sum(f.calls for f in fakes) < n:
            await asyncio.sleep(0.01)
    loads = sorted(r.routed for r in balancer.replicas)
    release.set()
    statuses = await asyncio.gather(*tasks)

    assert statuses == [200] * n
    assert sum(loads) == n
    assert loads[1] <= 2 * loads[0] + 5
    assert (
        balancer.replicas[0].counts["guarded"] + balancer.replicas[1].counts["guarded"]
        > 0
    )


async def test_balancer_refused_replica_retried_elsewhere(
    make_sidecar: SidecarFactory,
    fake_upstream: FakeUpstream,
    client: aiohttp.ClientSession,
) -> None:
    """A replica refusing connections costs no request: the request goes to another."""
    dead = f"http://127.0.0.1:{_free_port()}"
    sidecar, balancer = await _sidecar(make_sidecar, [dead, fake_upstream.url])

    statuses = [await _post(client, sidecar, _chat(c, 0)) for c in range(4)]

    assert statuses == [200] * 4
    assert fake_upstream.calls == 4
    assert balancer.replicas[0].healthy is False
    assert balancer.replicas[0].counts["routed"] == 1


async def test_balancer_down_replica_back_after_probe(
    make_sidecar: SidecarFactory,
    fake_upstream: FakeUpstream,
    client: aiohttp.ClientSession,
) -> None:
    """A down replica takes traffic again once a health probe succeeds."""
    port = _free_port()
    sidecar, balancer = await _sidecar(
        make_sidecar, [f"http://127.0.0.1:{port}", fake_upstream.url]
    )
    # Two new conversations on idle replicas: one is placed on the dead one.
    assert [await _post(client, sidecar, _chat(c, 0)) for c in (0, 1)] == [200, 200]
    assert balancer.replicas[0].healthy is False

    revived = FakeUpstream()
    runner = web.ServerRunner(web.Server(revived._dispatch))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        await balancer.probe_once()
        for conversation in range(2, 6):
            await _post(client, sidecar, _chat(conversation, 0))
    finally:
        await runner.cleanup()

    assert balancer.replicas[0].healthy is True
    assert revived.calls == 2


async def test_balancer_probe_failure_counts_toward_down(
    make_sidecar: SidecarFactory, fakes: list[FakeUpstream]
) -> None:
    """A replica whose probe cannot connect is marked down at once."""
    port = _free_port()
    _, balancer = await _sidecar(
        make_sidecar, [fakes[0].url, f"http://127.0.0.1:{port}"]
    )

    await balancer.probe_once()

    assert [r.healthy for r in balancer.replicas] == [True, False]


async def test_balancer_streamed_body_not_retried(
    make_sidecar: SidecarFactory,
    fake_upstream: FakeUpstream,
    client: aiohttp.ClientSession,
) -> None:
    """A body streamed upstream cannot be sent twice: its connect failure is a 502."""
    dead = f"http://127.0.0.1:{_free_port()}"
    sidecar, balancer = await _sidecar(make_sidecar, [dead, fake_upstream.url])
    balancer.replicas[1].routed = 5  # so the first choice is the dead replica

    async def body() -> AsyncIterator[bytes]:
        yield b"x" * 100_000

    async with client.post(data_url(sidecar) + "/upload", data=body()) as resp:
        status = resp.status

    assert status == 502
    assert fake_upstream.calls == 0


async def test_balancer_sticky_header_keeps_conversation(
    make_sidecar: SidecarFactory,
    fakes: list[FakeUpstream],
    client: aiohttp.ClientSession,
) -> None:
    """Requests with one X-Conversation-Id go to one replica whatever their prompt."""
    sidecar, _ = await _sidecar(make_sidecar, [f.url for f in fakes])

    for n in range(6):
        await _post(
            client,
            sidecar,
            {"prompt": f"unrelated prompt {n}" * 10},
            "/completion",
            headers={"X-Conversation-Id": "conv-9"},
        )

    assert sorted(f.calls for f in fakes) == [0, 6]


async def test_balancer_start_close_probe_task(
    make_sidecar: SidecarFactory, fakes: list[FakeUpstream]
) -> None:
    """start() runs the probe loop and close() ends it."""
    _, balancer = await _sidecar(
        make_sidecar, [f.url for f in fakes], probe_interval_s=0.01
    )

    balancer.start()
    task = balancer._probe_task
    await balancer.close()

    assert task is not None and task.done()
