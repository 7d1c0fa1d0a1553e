"""Prompt reuse across replicas: prefix-affine routing vs pinned vs random.

Owns the multi-turn chat workload (many conversations, each a shared system
prompt, an opening question and follow-ups, interleaved by a bounded pool of
concurrent clients) and its measurement against real ``llama-server``
replicas on the tiny random-weights model: prompt tokens evaluated, prompt
tokens reused and wall time, for three ways of choosing a replica:

- ``pinned``: every conversation sent straight to one replica by hand
  (conversation ``c`` to replica ``c mod n``), the best a client can do;
- ``random``: every request straight to a replica drawn at random, what a
  plain round-robin or random balancer gives;
- ``sidecar``: every request through the sidecar's stages (``cache_prompt``
  rewrite, token meter, prefix-affine ``Balancer``), with 2 and 3 replicas.

Also measured: what the ``cache_prompt`` rewrite costs on a 10 KB and a
1 MB chat body (parse only, parse and splice, parse and re-serialise).
Not here: the stages themselves (sidecar/prompt.py, sidecar/balance.py).
``tests/functional/test_prompt_reuse.py`` runs the same workload, smaller,
and asserts on it.

Invariants: each arm uses its own nonce in every prompt, so no arm reuses
what an earlier arm left in a replica's cache; answers are capped at
``N_PREDICT`` tokens and the assistant turns the client sends back are
canned text, so the model's noise cannot change prompt lengths between arms.
Every server started here is stopped by PID, also on SIGTERM.

Known limitations: the sidecar runs in this process, on the client's event
loop (the stages are not yet wired into ``sidecar serve``), so its wall time
includes the client's CPU and the sidecar's both. The model is tiny, so
prompt evaluation is cheap and wall time shows routing and queueing more
than compute; token counts are the figure that carries over to real models.
Run with ``python -m bench.bench_prompt [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final

import aiohttp

from bench import rig
from sidecar.app import Sidecar
from sidecar.balance import Balancer
from sidecar.manifest import PromptCacheMode, UpstreamKind, load_manifest
from sidecar.prompt import (
    PromptRewriter,
    TokenMeter,
    header_salt,
    parse_object,
    set_field,
)

N_PREDICT: Final = 4
TURNS: Final = 4
CONVERSATIONS: Final = 12
QUICK_CONVERSATIONS: Final = 6
CLIENTS_PER_REPLICA: Final = 2
CHAT_PATH: Final = "/v1/chat/completions"
TIMEOUT: Final = aiohttp.ClientTimeout(total=60)
# Kept under half of a first prompt: llama.cpp saves a slot's prompt to its
# host cache only when the next prompt keeps less than half of it.
_SYSTEM: Final = "You are a terse assistant for team {nonce}. Answer in one line. "
_OPENING: Final = (
    "Conversation {c} of {nonce} starts with this question: " + "why? " * 30
)
_FOLLOW_UP: Final = "Follow-up {t} in conversation {c}: and then? " + "more. " * 10


# --- the workload -------------------------------------------------------------------


def first_messages(conversation: int, nonce: str) -> list[dict[str, str]]:
    """A conversation's opening: the shared system prompt and its first question."""
    return [
        {"role": "system", "content": _SYSTEM.format(nonce=nonce) * 2},
        {"role": "user", "content": _OPENING.format(c=conversation, nonce=nonce)},
    ]


def next_turn(messages: list[dict[str, str]], conversation: int, turn: int) -> None:
    """Append a canned answer and the next question, as a chat client would."""
    messages.append(
        {"role": "assistant", "content": f"Answer {turn} to {conversation}."}
    )
    messages.append(
        {"role": "user", "content": _FOLLOW_UP.format(t=turn, c=conversation)}
    )


@dataclass
class Outcome:
    """What one run of the workload cost."""

    requests: int = 0
    failed: int = 0
    evaluated: int = 0
    reused: int = 0
    wall_s: float = 0.0
    per_request: list[tuple[int, int, int, int]] = field(default_factory=list)

    def add(self, conversation: int, turn: int, answer: dict[str, Any] | None) -> None:
        self.requests += 1
        timings = answer.get("timings") if isinstance(answer, dict) else None
        if not isinstance(timings, dict):
            self.failed += 1
            return
        self.evaluated += int(timings["prompt_n"])
        self.reused += int(timings["cache_n"])
        self.per_request.append(
            (conversation, turn, int(timings["cache_n"]), int(timings["prompt_n"]))
        )


# Sends one request body for (conversation, turn); None when it failed.
Send = Callable[[aiohttp.ClientSession, int, int, dict[str, Any]], Awaitable[Any]]


async def run_workload(
    send: Send,
    *,
    conversations: int,
    turns: int,
    concurrency: int,
    nonce: str,
    on_answer: Callable[[Outcome], None] | None = None,
) -> Outcome:
    """Run every conversation's turns in order, ``concurrency`` clients at a time."""
    outcome = Outcome()
    gate = asyncio.Semaphore(concurrency)

    async def talk(session: aiohttp.ClientSession, conversation: int) -> None:
        messages = first_messages(conversation, nonce)
        for turn in range(turns):
            body = {"messages": messages, "max_tokens": N_PREDICT, "temperature": 0}
            async with gate:
                answer = await send(session, conversation, turn, body)
            outcome.add(conversation, turn, answer)
            if on_answer is not None:
                on_answer(outcome)
            next_turn(messages, conversation, turn)

    started = time.perf_counter()
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        await asyncio.gather(*(talk(session, c) for c in range(conversations)))
    outcome.wall_s = time.perf_counter() - started
    return outcome


async def post_json(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> Any:
    """POST ``body``; the parsed answer, or None on any failure."""
    try:
        async with session.post(url, json=body) as resp:
            data = await resp.read()
            return json.loads(data) if resp.status == 200 else None
    except (aiohttp.ClientError, ValueError):
        return None


def direct_sender(pick: Callable[[int, int], str]) -> Send:
    """A ``Send`` straight to the replica ``pick(conversation, turn)`` names."""

    async def send(
        session: aiohttp.ClientSession,
        conversation: int,
        turn: int,
        body: dict[str, Any],
    ) -> Any:
        url = pick(conversation, turn) + CHAT_PATH
        return await post_json(session, url, {**body, "cache_prompt": True})

    return send


def pinned(urls: Sequence[str]) -> Send:
    return direct_sender(lambda conversation, _: urls[conversation % len(urls)])


def randomly(urls: Sequence[str], seed: int = 7) -> Send:
    rng = random.Random(seed)
    return direct_sender(lambda _, __: rng.choice(list(urls)))


def through(url: str) -> Send:
    """A ``Send`` to the sidecar; the client leaves cache_prompt out."""

    async def send(
        session: aiohttp.ClientSession,
        conversation: int,
        turn: int,
        body: dict[str, Any],
    ) -> Any:
        return await post_json(session, url + CHAT_PATH, body)

    return send


# --- the sidecar under test ---------------------------------------------------------


async def start_sidecar(
    urls: Sequence[str], data_dir: Path, **balancer_args: Any
) -> tuple[Sidecar, Balancer]:
    """An in-process sidecar over ``urls`` with the prompt-reuse stages installed."""
    flags = {
        "upstream": ",".join(urls),
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
    }
    manifest = load_manifest(None, env={}, flags=flags)
    sidecar = Sidecar(manifest, data_dir=data_dir)
    await sidecar.start()
    balancer = Balancer(
        sidecar.upstreams,
        max_body_bytes=manifest.limits.max_body_bytes,
        **balancer_args,
    )
    rewriter = PromptRewriter(
        PromptCacheMode.FORCE,
        UpstreamKind.LLAMA_CPP,
        header_salt(b"bench-salt-key-0123"),
        max_body_bytes=manifest.limits.max_body_bytes,
    )
    sidecar.proxy.set_stages([rewriter, TokenMeter(sidecar.metrics), balancer])
    balancer.start()
    return sidecar, balancer


def data_url(sidecar: Sidecar) -> str:
    assert sidecar.data_address is not None
    host, port = sidecar.data_address
    return f"http://{host}:{port}"


# --- the rewrite's own cost -----------------------------------------------------------


def _parse(body: bytes) -> None:
    parse_object(body)


def _rewrite(body: bytes) -> None:
    set_field(body, parse_object(body) or {}, "cache_prompt", True)


def rewrite_costs(repeat: int) -> list[dict[str, Any]]:
    """Microseconds per call to parse, parse and splice, parse and re-serialise."""
    records = []
    for label, size in (("10 KB", 10_000), ("1 MB", 1_000_000)):
        messages = [
            {"role": "user", "content": "word " * 40} for _ in range(size // 220)
        ]
        absent = json.dumps({"messages": messages}).encode()
        present = json.dumps({"messages": messages, "cache_prompt": False}).encode()
        row: dict[str, Any] = {"body": label, "bytes": len(absent)}
        cases = (
            ("parse", _parse, absent),
            ("splice", _rewrite, absent),
            ("replace", _rewrite, present),
        )
        for name, fn, body in cases:
            started = time.perf_counter()
            for _ in range(repeat):
                fn(body)
            row[name + "_us"] = (time.perf_counter() - started) / repeat * 1e6
        records.append(row)
    return records


# --- the run --------------------------------------------------------------------------


async def _measure(
    urls: list[str], work: Path, conversations: int
) -> list[dict[str, Any]]:
    n = len(urls)
    records: list[dict[str, Any]] = []
    sidecar, _ = await start_sidecar(urls, work / f"sidecar-{n}")
    try:
        arms: list[tuple[str, Send]] = [
            ("pinned", pinned(urls)),
            ("random", randomly(urls)),
            ("sidecar", through(data_url(sidecar))),
        ]
        for arm, send in arms:
            outcome = await run_workload(
                send,
                conversations=conversations,
                turns=TURNS,
                concurrency=CLIENTS_PER_REPLICA * n,
                nonce=f"{arm}-{n}-{time.time_ns()}",
            )
            records.append(
                {
                    "replicas": n,
                    "arm": arm,
                    "requests": outcome.requests,
                    "failed": outcome.failed,
                    "evaluated": outcome.evaluated,
                    "reused": outcome.reused,
                    "wall_s": outcome.wall_s,
                }
            )
    finally:
        await sidecar.close()
    base = records[0]["evaluated"] or 1
    for record in records:
        record["vs_pinned"] = record["evaluated"] / base
    return records


def _start_servers(n: int, model: Path, log_dir: Path) -> list[Any]:
    from tests.helpers.llama import ensure_binary, launch, stop, wait_ready

    binary = ensure_binary()
    logs = [log_dir / f"llama-{n}-{i}.log" for i in range(n)]
    procs = [launch(binary, model, log) for log in logs]
    try:
        return [wait_ready(p, model, log) for p, log in zip(procs, logs, strict=True)]
    except BaseException:
        for proc in procs:
            stop(proc)
        raise


COLUMNS: Final[list[rig.Column]] = [
    ("replicas", "replicas", rig.fmt_plain),
    ("arm", "arm", rig.fmt_plain),
    ("requests", "requests", rig.fmt_plain),
    ("failed", "failed", rig.fmt_plain),
    ("evaluated", "evaluated", rig.fmt_plain),
    ("reused", "reused", rig.fmt_plain),
    ("vs pinned", "vs_pinned", lambda v: f"{v:.3f}"),
    ("wall", "wall_s", lambda v: f"{v:.2f}s"),
]
COST_COLUMNS: Final[list[rig.Column]] = [
    ("body", "body", rig.fmt_plain),
    ("bytes", "bytes", rig.fmt_plain),
    ("parse", "parse_us", rig.fmt_us),
    ("parse+splice", "splice_us", rig.fmt_us),
    ("parse+replace", "replace_us", rig.fmt_us),
]


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m bench.bench_prompt")
    parser.add_argument("--quick", action="store_true", help="fewer conversations")
    args = parser.parse_args(args_list)
    # SIGTERM (run_all's budget) unwinds the finally blocks that stop servers.
    signal.signal(signal.SIGTERM, _raise_exit)
    from tests.helpers.llama import stop
    from tests.helpers.tinymodel import write_tiny_llama

    conversations = QUICK_CONVERSATIONS if args.quick else CONVERSATIONS
    print(
        "prompt reuse: multi-turn chat on tiny-llama, "
        f"{conversations} conversations x {TURNS} turns, "
        f"{CLIENTS_PER_REPLICA} clients per replica"
    )
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-prompt-") as tmp:
        work = Path(tmp)
        model = write_tiny_llama(work / "tiny-llama.gguf", n_ctx=2048)
        for n in (2, 3):
            servers = _start_servers(n, model, work)
            try:
                records += asyncio.run(
                    _measure([s.url for s in servers], work, conversations)
                )
            finally:
                for server in servers:
                    stop(server.proc)
    print(rig.format_records(records, COLUMNS))
    costs = rewrite_costs(20 if args.quick else 100)
    print("\ncache_prompt rewrite cost per request body")
    print(rig.format_records(costs, COST_COLUMNS))
    for record in records + costs:
        print(rig.json_line({"bench": "prompt", **record}))
    print(rig.rerun_line("bench.bench_prompt", args_list))
    return 0


if __name__ == "__main__":
    sys.exit(main())
