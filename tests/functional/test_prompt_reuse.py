"""Prompt reuse against real llama-server processes on the tiny model.

One server (the session's ``llama_server``): ``force`` mode makes a client
that sends ``cache_prompt: false`` reuse its shared prefix, while the same
requests sent straight to the server reuse nothing; ``off`` mode forwards
the body byte for byte; malformed bodies reach the server and get its own
answer; the token counters match what the server reported.

Several servers (``llama_replicas``): the multi-turn workload of
``bench/bench_prompt.py``, smaller, routed through the sidecar costs at most
10% more evaluated prompt tokens than pinning each conversation to one
replica by hand, and clearly less than a random choice; a hot prefix is
spread by the load guard; a replica killed mid-run costs only the requests
in flight on it.

The sidecar runs in this process (``make_sidecar``) with the stages
installed by the test, so a spy stage can see exactly what is forwarded.
Default server flags suffice: ``-np 2`` slots and llama.cpp's host prompt
cache keep reuse within a server, and ``cache_prompt: false`` makes a
server ignore both (checked below against the server itself).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any, Final

import aiohttp
import pytest

from bench.bench_prompt import (
    N_PREDICT,
    Outcome,
    pinned,
    randomly,
    run_workload,
    through,
)
from sidecar.app import Sidecar
from sidecar.balance import Balancer
from sidecar.manifest import PromptCacheMode, UpstreamKind
from sidecar.prompt import PromptRewriter, TokenMeter, header_salt
from sidecar.proxy import Exchange, Next, Reply
from tests.conftest import SidecarFactory, data_url
from tests.helpers.llama import LlamaReplicas, LlamaServer, llama_timeout

pytestmark = [pytest.mark.llama, llama_timeout()]

TIMEOUT: Final = aiohttp.ClientTimeout(total=30)
SALT_KEY: Final = b"functional-salt-key-0123"
CONVERSATIONS: Final = 8
TURNS: Final = 4


class _Spy:
    """A stage recording each exchange just before the Forwarder sends it."""

    def __init__(self, balancer: Balancer | None = None) -> None:
        self.bodies: list[bytes | None] = []
        self.placements: list[tuple[int, list[int]]] = []
        self.balancer = balancer

    async def __call__(self, ex: Exchange, nxt: Next) -> Reply:
        self.bodies.append(ex.body)
        if self.balancer is not None:
            replicas = self.balancer.replicas
            chosen = next(
                i for i, r in enumerate(replicas) if r.upstream is ex.upstream
            )
            self.placements.append((chosen, [r.load for r in replicas]))
        return await nxt(ex)


async def _with_stages(
    make_sidecar: SidecarFactory,
    urls: list[str],
    mode: str = "force",
    spy: bool = False,
) -> tuple[Sidecar, Balancer, _Spy]:
    sidecar = await make_sidecar(",".join(urls))
    limit = sidecar.manifest.limits.max_body_bytes
    rewriter = PromptRewriter(
        PromptCacheMode(mode),
        UpstreamKind.LLAMA_CPP,
        header_salt(SALT_KEY),
        max_body_bytes=limit,
    )
    balancer = Balancer(sidecar.upstreams, max_body_bytes=limit)
    recorder = _Spy(balancer if len(urls) > 1 else None)
    stages: list[Any] = [rewriter, TokenMeter(sidecar.metrics), balancer]
    sidecar.proxy.set_stages([*stages, recorder] if spy else stages)
    return sidecar, balancer, recorder


async def _completion(url: str, body: bytes) -> tuple[int, Any]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        async with session.post(
            url + "/completion", data=body, headers={"Content-Type": "application/json"}
        ) as resp:
            data = await resp.read()
            try:
                return resp.status, json.loads(data)
            except ValueError:
                return resp.status, data


def _pair(prefix: str) -> list[bytes]:
    """Two /completion bodies sharing ``prefix``, both with cache_prompt false."""
    return [
        json.dumps(
            {"prompt": prefix + ending, "n_predict": N_PREDICT, "cache_prompt": False}
        ).encode()
        for ending in (" first ending", " other ending")
    ]


def _prefix() -> str:
    return f"shared prefix {uuid.uuid4().hex}. " + "0123456789abcdef" * 16


# --- one server -----------------------------------------------------------------------


async def test_force_client_false_prefix_reused_through_sidecar(
    make_sidecar: SidecarFactory, llama_server: LlamaServer
) -> None:
    """force mode: a client's cache_prompt false still gets its shared prefix reused."""
    sidecar, _, _ = await _with_stages(make_sidecar, [llama_server.url])
    prefix = _prefix()

    answers = [await _completion(data_url(sidecar), body) for body in _pair(prefix)]

    assert [status for status, _ in answers] == [200, 200]
    cache_n = answers[1][1]["timings"]["cache_n"]
    prefix_tokens = len(prefix) + 2  # BOS, the prefix and the shared space
    assert prefix_tokens - 2 <= cache_n <= prefix_tokens


async def test_direct_client_false_reuses_nothing(llama_server: LlamaServer) -> None:
    """The same two requests sent straight to the server reuse nothing."""
    answers = [await _completion(llama_server.url, body) for body in _pair(_prefix())]

    assert [status for status, _ in answers] == [200, 200]
    assert answers[1][1]["timings"]["cache_n"] == 0


async def test_off_mode_body_forwarded_byte_for_byte(
    make_sidecar: SidecarFactory, llama_server: LlamaServer
) -> None:
    """off mode: the server gets the client's bytes, and so reuses nothing."""
    sidecar, _, spy = await _with_stages(
        make_sidecar, [llama_server.url], "off", spy=True
    )
    bodies = _pair(_prefix())

    answers = [await _completion(data_url(sidecar), body) for body in bodies]

    assert spy.bodies == bodies
    assert answers[1][1]["timings"]["cache_n"] == 0


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'[{"prompt": "x"}]',
        b'{"prompt": "\\ud800 lone", "n_predict": 2}',
        # Past the 64 KiB read-whole threshold; llama.cpp tokenizes this
        # byte-level vocabulary in quadratic time, so no bigger.
        json.dumps({"prompt": "x" * 80_000, "n_predict": 2}).encode(),
        json.dumps(
            {"prompt": [1, 40, 41, 42], "n_predict": 2, "cache_prompt": False}
        ).encode(),
    ],
    ids=["text", "array", "surrogate", "huge", "token_ids"],
)
async def test_malformed_body_gets_the_servers_answer(
    make_sidecar: SidecarFactory, llama_server: LlamaServer, body: bytes
) -> None:
    """Odd bodies are passed or rewritten, and answered as the server answers them."""
    sidecar, _, _ = await _with_stages(make_sidecar, [llama_server.url])

    via, _ = await _completion(data_url(sidecar), body)
    direct, _ = await _completion(llama_server.url, body)

    assert via == direct
    assert via < 500


async def test_token_counters_match_server_timings(
    make_sidecar: SidecarFactory, llama_server: LlamaServer
) -> None:
    """The reused and evaluated counters add up what the server's answers report."""
    sidecar, _, _ = await _with_stages(make_sidecar, [llama_server.url])
    reported = [0, 0]
    prefix = _prefix()
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        for stream in (False, True, True):
            body = {
                "messages": [{"role": "user", "content": prefix + str(stream)}],
                "max_tokens": N_PREDICT,
                "stream": stream,
            }
            async with session.post(
                data_url(sidecar) + "/v1/chat/completions", json=body
            ) as resp:
                text = (await resp.read()).decode()
            final = (
                text
                if not stream
                else [
                    line[6:]
                    for line in text.splitlines()
                    if line.startswith("data: {") and '"timings"' in line
                ][-1]
            )
            timings = json.loads(final)["timings"]
            reported[0] += timings["cache_n"]
            reported[1] += timings["prompt_n"]

    labels = {"route": "chat", "replica": sidecar.upstream.authority}
    metrics = sidecar.metrics
    assert reported[0] > 0
    assert [
        metrics.prompt_tokens_reused.get(labels),
        metrics.prompt_tokens_evaluated.get(labels),
    ] == reported


# --- several servers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def three(llama_replicas: LlamaReplicas) -> Iterator[list[LlamaServer]]:
    """Three replicas for this module, stopped when it ends."""
    servers = llama_replicas(3)
    try:
        yield servers
    finally:
        for server in servers:
            llama_replicas.stop(server)


async def _compare(make_sidecar: SidecarFactory, urls: list[str]) -> dict[str, Outcome]:
    sidecar, _, _ = await _with_stages(make_sidecar, urls)
    shape = {
        "conversations": CONVERSATIONS,
        "turns": TURNS,
        "concurrency": 2 * len(urls),
    }
    arms = {
        "pinned": pinned(urls),
        "random": randomly(urls),
        "sidecar": through(data_url(sidecar)),
    }
    results = {}
    for arm, send in arms.items():
        results[arm] = await run_workload(
            send, nonce=f"{arm}-{uuid.uuid4().hex}", **shape
        )
    return results


@pytest.mark.parametrize("n", [2, 3])
async def test_affinity_evaluates_close_to_pinned_fewer_than_random(
    make_sidecar: SidecarFactory, three: list[LlamaServer], n: int
) -> None:
    """Through the sidecar: at most 10% over pinned by hand, clearly under random."""
    results = await _compare(make_sidecar, [s.url for s in three[:n]])

    pinned_n, random_n = results["pinned"].evaluated, results["random"].evaluated
    sidecar_n = results["sidecar"].evaluated
    assert [r.failed for r in results.values()] == [0, 0, 0]
    assert sidecar_n <= 1.10 * pinned_n, results
    assert sidecar_n <= 0.85 * random_n, results


async def test_hot_prefix_spread_by_load_guard(
    make_sidecar: SidecarFactory, three: list[LlamaServer]
) -> None:
    """One hot prefix: no replica is given a request past 2*least+4 in flight."""
    sidecar, balancer, spy = await _with_stages(
        make_sidecar, [s.url for s in three[:2]], spy=True
    )
    hot = f"hot prefix {uuid.uuid4().hex} " + "everyone asks this. " * 25

    async def client(k: int, session: aiohttp.ClientSession) -> list[int]:
        statuses = []
        for i in range(3):
            body = {"prompt": hot + f"question {k}.{i}", "n_predict": N_PREDICT}
            async with session.post(
                data_url(sidecar) + "/completion", json=body
            ) as resp:
                await resp.read()
                statuses.append(resp.status)
        return statuses

    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        statuses = await asyncio.gather(*(client(k, session) for k in range(10)))

    assert [s for per_client in statuses for s in per_client] == [200] * 30
    for chosen, loads in spy.placements:
        before = loads[chosen] - 1
        least = min(before, *(load for i, load in enumerate(loads) if i != chosen))
        assert before <= balancer.guard_ratio * least + balancer.guard_slack, (
            spy.placements
        )
    # Without the guard every request would follow the one hot prefix.
    assert sum(r.counts["guarded"] for r in balancer.replicas) >= 1, balancer.snapshot()
    assert all(r.counts["routed"] >= 4 for r in balancer.replicas), balancer.snapshot()


async def test_killed_replica_routed_around(
    make_sidecar: SidecarFactory, llama_replicas: LlamaReplicas
) -> None:
    """A replica killed mid-run fails only the requests that were in flight on it."""
    servers = llama_replicas(2)
    try:
        sidecar, balancer, _ = await _with_stages(
            make_sidecar, [s.url for s in servers]
        )
        victim = servers[0]
        in_flight_at_kill: list[int] = []

        def kill_once(outcome: Outcome) -> None:
            if outcome.requests == 10 and not in_flight_at_kill:
                # No await between reading the count and the kill.
                in_flight_at_kill.append(balancer.replicas[0].routed)
                victim.proc.kill()

        outcome = await run_workload(
            through(data_url(sidecar)),
            conversations=CONVERSATIONS,
            turns=TURNS,
            concurrency=4,
            nonce=uuid.uuid4().hex,
            on_answer=kill_once,
        )
        await asyncio.to_thread(victim.proc.wait, 10)
    finally:
        for server in servers:
            llama_replicas.stop(server)

    assert in_flight_at_kill, "the workload ended before the kill"
    assert outcome.failed <= in_flight_at_kill[0]
    assert outcome.requests == CONVERSATIONS * TURNS
    assert balancer.replicas[0].healthy is False
    assert balancer.replicas[1].counts["routed"] >= CONVERSATIONS * TURNS - 10
