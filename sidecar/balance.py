"""Replica choice across several upstreams: prefix affinity, a load guard, health.

Owns the ``Balancer`` stage, which sets ``ex.upstream`` to one of the
manifest's ``upstream.replicas``; the prefix index that remembers which
replica was last sent which prompt prefixes; the count of requests routed
to each replica and not yet ended; and each replica's health, from its
answers and from a periodic probe. With a single upstream the stage does
nothing. Not here: the ``cache_prompt`` rewrite and token counts
(prompt.py), connections and timeouts (upstream.py), the concurrency
ceiling in front of the upstreams.

How a request is placed:
1. Only healthy replicas are candidates (all of them, if none is healthy).
2. A request carrying the sticky header (``X-Conversation-Id``) goes where
   that key went last, if that replica is still a candidate.
3. Otherwise, on generation routes, the prompt (the text, or the messages
   rendered with their roles) is cut into blocks of ``block_chars``
   characters with chained hashes, so block ``k``'s hash names the whole
   prefix up to it. Each replica keeps an LRU set of the block hashes it was
   sent; the replica holding the longest chain wins, ties going to the
   least loaded, provided the match is worth it: more than half the
   prompt's blocks, or ``min_match_blocks`` (64, about a thousand tokens) whatever
   the prompt's length. Anything less (a new conversation that shares only
   a short system prompt) is a new prefix, placed on the least loaded
   replica; placing it by match instead would pile every new conversation
   onto whichever replica saw the system prompt first.
4. The load guard: if the preferred replica has more than ``guard_ratio *
   least + guard_slack`` requests in flight (``least`` being the least
   loaded candidate's count; 2 and 4 by default), the request goes to the
   least loaded candidate instead, which learns the prefix. One hot prefix
   so spreads over replicas instead of queueing on one: no replica is given
   a request while it carries more than ``2 * least + 4``. The slack is
   generous on purpose: moving a conversation costs its whole history in
   prompt evaluation, while a short queue on a server with free slots soon
   drains (at 2 clients per replica, a slack of 2 moved one turn in ten).
5. Equal candidates are taken in turn, so sequential traffic spreads too.

Health: a replica is down after a refused connect, or after
``FAILURES_TO_DOWN`` failures in a row (errors before a reply, streams cut
mid-body, failed probes). A down replica gets no traffic and its prefix
index is dropped (a restarted server has lost its cache); it is up again
when a probe (``/health``, or ``/v1/models`` for ``kind: openai``) or a
request succeeds. A request whose connect failed is retried once on another
replica when its body is held in memory (always true on generation routes,
whose body the stage reads), so a replica that dies costs only the
requests that were in flight on it.

Invariants: the routed count of a replica goes up once per request sent
there and down exactly once when its reply ends, is closed, fails or is
dropped. The index is prefix-closed: blocks are inserted last block first,
so a prefix's earlier blocks are always more recent than its later ones and
LRU eviction removes chains from the tail; ``match`` can therefore binary
search. All state is event-loop thread only, and no ``await`` falls between
a choice and the count it bumps, so concurrent requests see each other.

Known limitations: the index records what was sent, not what the upstream
kept; a replica that evicted a prefix still attracts it until the index
ages it out, costing one re-evaluation. Prefixes past ``max_blocks`` blocks
are not told apart (only their first ``block_chars * max_blocks``
characters count). Blocks are cut on characters, not tokens, so a match is
approximate to one block. A turn that adds more new text than its
history holds (a pasted document) while that history is under 64 blocks
counts as a new prefix and may move to a less loaded replica, which then
evaluates the short history again. A connect failure is recognised from the
replica's connect-failure counter; if another request's connect to the same
replica failed at the same moment, a request that had been sent may be
retried elsewhere (a repeated generation, never a corrupted one: only
bodies held in memory are retried). The tuning knobs have no manifest keys
yet; the constructor's defaults apply.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Final

from sidecar import log
from sidecar.errors import UpstreamError
from sidecar.manifest import RouteKind, UpstreamKind
from sidecar.prompt import PROMPT_KINDS, parse_object
from sidecar.proxy import Exchange, Next, Reply, read_body
from sidecar.upstream import Upstream

BLOCK_CHARS: Final = 64
MAX_BLOCKS: Final = 2048
INDEX_ENTRIES: Final = 65_536
STICKY_KEYS: Final = 65_536
STICKY_HEADER: Final = "X-Conversation-Id"
GUARD_RATIO: Final = 2
GUARD_SLACK: Final = 4
# Affinity needs this much in common: over half the prompt, or 64 blocks (4
# KiB of text, about a thousand tokens on a real model) whatever the prompt.
MIN_MATCH_FRACTION: Final = 0.5
MIN_MATCH_BLOCKS: Final = 64
FAILURES_TO_DOWN: Final = 3
_PROBE_HEADERS: Final = ((b"User-Agent", b"sidecar-health/0.1"),)
_MAX_STICKY_KEY: Final = 256
# Separators that cannot appear in a role name, so "a" + "bc" and "ab" + "c"
# never render alike.
_FIELD: Final = "\x1f"
_RECORD: Final = "\x1e"


# --- prompts as chains of block hashes (pure) ---------------------------------


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def _content(value: Any) -> str:
    # OpenAI content parts: the text of text parts, anything else as JSON.
    if isinstance(value, list):
        return "".join(
            p["text"]
            if isinstance(p, dict) and isinstance(p.get("text"), str)
            else _text(p)
            for p in value
        )
    return _text(value)


def prompt_text(kind: RouteKind, doc: Mapping[str, Any]) -> str:
    """The prompt of a generation request as one string, in prompt order."""
    parts = [kind.value, _FIELD, _text(doc.get("model")), _RECORD]
    if kind == RouteKind.CHAT:
        if doc.get("tools"):
            # Chat templates render tool definitions ahead of the messages.
            parts += [_text(doc["tools"]), _RECORD]
        messages = doc.get("messages")
        for message in messages if isinstance(messages, list) else ():
            if isinstance(message, Mapping):
                parts += [
                    _text(message.get("role")),
                    _FIELD,
                    _content(message.get("content")),
                    _RECORD,
                ]
                if "tool_calls" in message:
                    parts += [_text(message["tool_calls"]), _RECORD]
    elif kind == RouteKind.INFILL:
        for name in ("input_extra", "input_prefix", "input_suffix", "prompt"):
            parts += [_text(doc.get(name)), _RECORD]
    else:
        prompt = doc.get("prompt")
        if isinstance(prompt, list) and all(type(t) is int for t in prompt):
            parts.append("".join(f"{t}," for t in prompt))  # token ids
        else:
            parts.append(_text(prompt))
    return "".join(parts)


def block_chain(
    text: str, block_chars: int = BLOCK_CHARS, max_blocks: int = MAX_BLOCKS
) -> list[int]:
    """Chained hashes of ``text``'s whole blocks: entry k names blocks 0..k.

    Python's ``hash`` is keyed per process, which is all an in-memory index
    needs, and costs about 0.4 us a block.
    """
    chain: list[int] = []
    h = 0
    for start in range(
        0, min(len(text) // block_chars, max_blocks) * block_chars, block_chars
    ):
        h = hash((h, text[start : start + block_chars]))
        chain.append(h)
    return chain


class PrefixIndex:
    """A bounded LRU set of block hashes: the prefixes one replica was sent."""

    def __init__(self, max_entries: int = INDEX_ENTRIES) -> None:
        self.max_entries = max_entries
        # Oldest first. Event-loop thread only.
        self._blocks: collections.OrderedDict[int, None] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, chain: Sequence[int]) -> int:
        """How many leading blocks of ``chain`` this replica holds."""
        blocks = self._blocks
        lo, hi = 0, len(chain)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if chain[mid - 1] in blocks:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def add(self, chain: Sequence[int]) -> None:
        """Record ``chain`` as the most recent prefix (last block first)."""
        blocks = self._blocks
        for h in reversed(chain):
            if h in blocks:
                blocks.move_to_end(h)
            else:
                blocks[h] = None
        while len(blocks) > self.max_entries:
            blocks.popitem(last=False)

    def clear(self) -> None:
        self._blocks.clear()


# --- replicas ----------------------------------------------------------------------


class Replica:
    """One upstream as the balancer sees it: load, health, index, counters."""

    def __init__(self, upstream: Upstream, index_entries: int) -> None:
        self.upstream = upstream
        self.index = PrefixIndex(index_entries)
        # Requests sent here whose reply has not ended. Balancer only.
        self.routed = 0
        self.failures = 0
        self.healthy = True
        self.counts: collections.Counter[str] = collections.Counter()

    @property
    def name(self) -> str:
        return self.upstream.authority

    @property
    def load(self) -> int:
        # Both: ``routed`` counts requests still queued before the upstream,
        # ``in_flight`` traffic that did not come through this stage.
        return max(self.routed, self.upstream.in_flight)

    def snapshot(self) -> dict[str, Any]:
        return {
            "url": self.upstream.url,
            "healthy": self.healthy,
            "in_flight": self.load,
            "failures": self.failures,
            "index_blocks": len(self.index),
            **{
                k: self.counts[k]
                for k in (
                    "routed",
                    "affinity",
                    "sticky",
                    "placed",
                    "guarded",
                    "retried",
                )
            },
        }


class _TrackedReply:
    """Relays a reply and tells the balancer once when it has ended."""

    __slots__ = ("_inner", "_on_end", "content_length", "headers", "reason", "status")

    def __init__(self, inner: Reply, on_end: Callable[[bool], None]) -> None:
        self._inner = inner
        self.status = inner.status
        self.reason = inner.reason
        self.headers = inner.headers
        self.content_length = inner.content_length
        self._on_end: Callable[[bool], None] | None = on_end

    def _end(self, failed: bool) -> None:
        on_end, self._on_end = self._on_end, None
        if on_end is not None:
            on_end(failed)

    def complete_body(self) -> bytes | None:
        body = self._inner.complete_body()
        if body is not None:
            self._end(False)
        return body

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner.chunks():
                yield chunk
        except UpstreamError:
            self._end(True)
            raise
        finally:
            self._end(False)

    def close(self) -> None:
        self._inner.close()
        self._end(False)

    def __del__(self) -> None:
        # A reply dropped unread must not leave its replica looking busy.
        self._end(False)


# --- the stage -----------------------------------------------------------------------


class Balancer:
    """Stage: sends each request to the replica most likely to hold its prefix."""

    def __init__(
        self,
        upstreams: Sequence[Upstream],
        *,
        kind: UpstreamKind = UpstreamKind.LLAMA_CPP,
        max_body_bytes: int = 64 * 2**20,
        block_chars: int = BLOCK_CHARS,
        max_blocks: int = MAX_BLOCKS,
        index_entries: int = INDEX_ENTRIES,
        guard_ratio: int = GUARD_RATIO,
        guard_slack: int = GUARD_SLACK,
        min_match_fraction: float = MIN_MATCH_FRACTION,
        min_match_blocks: int = MIN_MATCH_BLOCKS,
        sticky_header: str | None = STICKY_HEADER,
        probe_interval_s: float = 5.0,
        down_probe_interval_s: float = 1.0,
        probe_timeout_s: float = 2.0,
    ) -> None:
        if not upstreams:
            raise ValueError("a balancer needs at least one upstream")
        self.replicas = [Replica(u, index_entries) for u in upstreams]
        self.probe_path = "/v1/models" if kind == UpstreamKind.OPENAI else "/health"
        self.max_body_bytes = max_body_bytes
        self.block_chars = block_chars
        self.max_blocks = max_blocks
        self.guard_ratio = guard_ratio
        self.guard_slack = guard_slack
        self.min_match_fraction = min_match_fraction
        self.min_match_blocks = min_match_blocks
        self.sticky_header = sticky_header
        self.probe_interval_s = probe_interval_s
        self.down_probe_interval_s = down_probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        # Sticky key -> replica it went to last, oldest first; bounded.
        self._sticky: collections.OrderedDict[str, Replica] = collections.OrderedDict()
        self._turn = 0
        # Strong reference: the loop keeps only a weak one to running tasks.
        self._probe_task: asyncio.Task[None] | None = None

    # -- choosing ----------------------------------------------------------------

    def choose(
        self,
        chain: Sequence[int],
        sticky: str | None = None,
        exclude: Sequence[Replica] = (),
    ) -> tuple[Replica, str]:
        """The replica for a request, and why: sticky, affinity, placed or guarded."""
        pool = [r for r in self.replicas if r not in exclude] or self.replicas
        candidates = [r for r in pool if r.healthy] or pool
        least = min(r.load for r in candidates)
        matches = {id(r): r.index.match(chain) for r in candidates} if chain else {}
        found = self._preferred(candidates, matches, sticky, len(chain))
        limit = self.guard_ratio * least + self.guard_slack
        guarded = found is not None and found[0].load > limit
        if found is not None and not guarded:
            return found
        lightest = [r for r in candidates if r.load == least]
        if guarded:
            # The hot prefix may already live on one of the light ones.
            longest = max(matches.get(id(r), 0) for r in lightest)
            lightest = [r for r in lightest if matches.get(id(r), 0) == longest]
        return self._in_turn(lightest), "guarded" if guarded else "placed"

    def _preferred(
        self,
        candidates: list[Replica],
        matches: dict[int, int],
        sticky: str | None,
        blocks: int,
    ) -> tuple[Replica, str] | None:
        """The sticky or prefix-affine replica and its reason, if there is one."""
        if sticky is not None:
            replica = self._sticky.get(sticky)
            if replica is not None and replica in candidates:
                return replica, "sticky"
        best = max(matches.values(), default=0)
        worth = best >= self.min_match_blocks or best > self.min_match_fraction * blocks
        if best == 0 or not worth:
            # Too little in common to be worth a busier replica: a new
            # conversation that shares only a short system prompt is new.
            return None
        tied = [r for r in candidates if matches[id(r)] == best]
        least = min(r.load for r in tied)
        return self._in_turn([r for r in tied if r.load == least]), "affinity"

    def _in_turn(self, replicas: list[Replica]) -> Replica:
        self._turn += 1
        return replicas[self._turn % len(replicas)]

    def _record(
        self, replica: Replica, reason: str, chain: Sequence[int], sticky: str | None
    ) -> None:
        replica.routed += 1
        replica.counts["routed"] += 1
        replica.counts[reason] += 1
        if chain:
            replica.index.add(chain)
        if sticky is not None:
            self._sticky[sticky] = replica
            self._sticky.move_to_end(sticky)
            if len(self._sticky) > STICKY_KEYS:
                self._sticky.popitem(last=False)

    # -- the stage -----------------------------------------------------------------

    async def __call__(self, ex: Exchange, nxt: Next) -> Reply:
        if len(self.replicas) == 1:
            return await nxt(ex)
        chain = await self._chain(ex)
        sticky = self._sticky_key(ex)
        replica, reason = self.choose(chain, sticky)
        tried: list[Replica] = []
        while True:
            self._record(replica, reason, chain, sticky)
            self._log_choice(ex, replica, reason, chain)
            try:
                return await self._send(ex, nxt, replica)
            except _ConnectFailed as failed:
                tried.append(replica)
                if (
                    len(tried) > 1
                    or len(tried) == len(self.replicas)
                    or not _replayable(ex)
                ):
                    raise failed.error from None
                replica, _ = self.choose(chain, sticky, exclude=tried)
                reason = "retried"
                log.upstream.warning(
                    "upstream.retry_other_replica",
                    extra={"failed": tried[-1].name, "replica": replica.name},
                )

    async def _send(self, ex: Exchange, nxt: Next, replica: Replica) -> Reply:
        ex.upstream = replica.upstream
        before = replica.upstream.connect_failures
        try:
            reply = await nxt(ex)
        except UpstreamError as exc:
            replica.routed -= 1
            connect = replica.upstream.connect_failures > before
            self._failed(replica, "connect" if connect else "error")
            if connect:
                raise _ConnectFailed(exc) from None
            raise
        except BaseException:
            replica.routed -= 1
            raise
        self._succeeded(replica)
        return _TrackedReply(reply, lambda failed: self._ended(replica, failed))

    def _ended(self, replica: Replica, failed: bool) -> None:
        replica.routed -= 1
        if failed:
            self._failed(replica, "cut")

    async def _chain(self, ex: Exchange) -> list[int]:
        if ex.route.kind not in PROMPT_KINDS:
            return []
        doc = ex.json
        if not isinstance(doc, dict):
            doc = parse_object(await read_body(ex, self.max_body_bytes))
            if doc is None:
                return []
        return block_chain(
            prompt_text(ex.route.kind, doc), self.block_chars, self.max_blocks
        )

    def _sticky_key(self, ex: Exchange) -> str | None:
        if self.sticky_header is None:
            return None
        value = ex.request.headers.get(self.sticky_header)
        return value[:_MAX_STICKY_KEY] if value else None

    def _log_choice(
        self, ex: Exchange, replica: Replica, reason: str, chain: Sequence[int]
    ) -> None:
        if log.upstream.isEnabledFor(logging.DEBUG):
            log.upstream.debug(
                "upstream.replica_chosen",
                extra={
                    "route": ex.route.name,
                    "replica": replica.name,
                    "reason": reason,
                    "blocks": len(chain),
                    "load": replica.load,
                },
            )

    # -- health ------------------------------------------------------------------

    def _failed(self, replica: Replica, why: str) -> None:
        replica.failures += 1
        if replica.healthy and (
            why == "connect" or replica.failures >= FAILURES_TO_DOWN
        ):
            replica.healthy = False
            replica.index.clear()
            log.upstream.warning(
                "upstream.replica_down",
                extra={
                    "replica": replica.name,
                    "why": why,
                    "failures": replica.failures,
                },
            )

    def _succeeded(self, replica: Replica) -> None:
        replica.failures = 0
        if not replica.healthy:
            replica.healthy = True
            log.upstream.info("upstream.replica_up", extra={"replica": replica.name})

    async def probe_once(self) -> None:
        """Probe every replica once and update its health."""
        await asyncio.gather(*(self._probe(r) for r in self.replicas))

    async def _probe(self, replica: Replica) -> None:
        upstream = replica.upstream
        before = upstream.connect_failures
        try:
            async with asyncio.timeout(self.probe_timeout_s):
                resp = await upstream.request(
                    "GET", self.probe_path, list(_PROBE_HEADERS), probe=True
                )
                async with resp:
                    async for _ in resp.iter_chunks():
                        pass
            # llama.cpp answers 503 while it loads the model: not ready.
            ok = resp.status < 500
        except (UpstreamError, TimeoutError):
            ok = False
        if ok:
            self._succeeded(replica)
        else:
            self._failed(
                replica, "connect" if upstream.connect_failures > before else "probe"
            )

    async def _probe_loop(self) -> None:
        while True:
            await self.probe_once()
            down = any(not r.healthy for r in self.replicas)
            await asyncio.sleep(
                self.down_probe_interval_s if down else self.probe_interval_s
            )

    def start(self) -> None:
        """Start probing the replicas (only when there are several)."""
        if len(self.replicas) > 1 and self._probe_task is None:
            self._probe_task = asyncio.create_task(
                self._probe_loop(), name="sidecar.balance-probe"
            )

    async def close(self) -> None:
        task, self._probe_task = self._probe_task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    def snapshot(self) -> dict[str, Any]:
        """Per-replica state for the ``upstream`` read model."""
        return {"replicas": [r.snapshot() for r in self.replicas]}


class _ConnectFailed(Exception):
    """Internal: the chosen replica refused the connection; may go elsewhere."""

    def __init__(self, error: UpstreamError) -> None:
        super().__init__(error.message)
        self.error = error


def _replayable(ex: Exchange) -> bool:
    """Whether the body can be sent again (held in memory, or there is none)."""
    return ex.body is not None or not ex.request.body_exists
