"""The action cache in the request pipeline: lookup before the upstream, record after.

Owns: the two pipeline stages of the action cache and the replay of hits.
``lookup`` decides cacheability (keys.py), computes the scope and the action
key, and answers hits; ``record`` sits closer to the upstream (after the
coalescer, so a flight is recorded once) and stores a reply only once it
has ended validly. Every key that hits or is stored is also handed to the
quick path (hits.py), which answers the next identical request from memory
without these stages. Not here: the tiers (tiers.py), key rules (keys.py),
the quick path itself.

What is stored, and only that: a complete 2xx answer to exactly this request
for exactly this caller, whose response does not say ``no-store`` or
``private`` and sets no cookie, no larger than ``cache.max_entry_bytes``,
and, for generation routes, whose finish reason is in the route's
``cache.finish_reasons``. A stream is stored only when it ended validly: the
upstream finished the message (no cut, reset or idle timeout), no event
carries an error, and it closed with ``data: [DONE]`` or a final chunk with
an allowed finish reason. A hit replays exactly the bytes the upstream sent,
so a replayed stream is the same valid SSE, every field included.

Reasons: a request not served from or stored in the cache carries
``X-Sidecar-Cache-Reason`` when the reason is known before the response
head is sent. A stream found invalid at its end can only say so in the
``outcome`` label of ``sidecar_cache_requests_total`` and the access log,
since its header fields were already sent.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

from multidict import CIMultiDict

from sidecar import canonical, keys, log
from sidecar.cache.hits import QuickHits
from sidecar.cache.store import Entry
from sidecar.cache.tiers import TieredCache
from sidecar.environment import Environment
from sidecar.errors import ClientRequestError, ErrorCode, UpstreamError
from sidecar.metrics import Metrics
from sidecar.proxy import Exchange, Next, Reply, read_body
from sidecar.scope import Scopes

# llama.cpp's native /completion streams report how they stopped as
# stop_type, not finish_reason.
_STOP_TYPES: Final = {"eos": "stop", "word": "stop", "limit": "length"}
_SSE: Final = "text/event-stream"


class CachedReply:
    """A ``Reply`` answered from a stored entry."""

    __slots__ = ("_body", "content_length", "headers", "reason", "status")

    def __init__(self, entry: Entry, extra: dict[str, str]) -> None:
        self.status = entry.status
        self.reason = ""
        self.headers: CIMultiDict[str] = CIMultiDict(entry.headers)
        self.headers.update(extra)
        self.content_length: int | None = entry.size
        self._body = entry.body

    def complete_body(self) -> bytes | None:
        return self._body

    async def chunks(self) -> AsyncIterator[bytes]:
        yield self._body

    def close(self) -> None:
        pass


def _finish_reasons(doc: Any) -> list[str]:
    """Finish reasons a JSON answer or stream chunk reports, in order."""
    found: list[str] = []
    if not isinstance(doc, dict):
        return found
    choices = doc.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if isinstance(choice, dict) and isinstance(choice.get("finish_reason"), str):
                found.append(choice["finish_reason"])
    stop_type = doc.get("stop_type")
    if doc.get("stop") is True and isinstance(stop_type, str):
        found.append(_STOP_TYPES.get(stop_type, stop_type))
    return found


def validate_json_answer(body: bytes, allowed: tuple[str, ...], generation: bool) -> str | None:
    """None if a plain JSON answer may be stored, else the reason it may not."""
    try:
        doc = json.loads(body)
    except ValueError:
        return "invalid_answer"
    if isinstance(doc, dict) and "error" in doc:
        return "upstream_error"
    if generation:
        reasons = _finish_reasons(doc)
        if not reasons or any(r not in allowed for r in reasons):
            return "finish_reason"
    return None


def validate_stream(body: bytes, allowed: tuple[str, ...]) -> str | None:
    """None if a recorded SSE stream ended validly, else the reason it did not."""
    text = body.decode("utf-8", "replace").replace("\r\n", "\n")
    datas: list[str] = []
    for event in text.split("\n\n"):
        lines = [ln[5:].lstrip(" ") for ln in event.split("\n") if ln.startswith("data:")]
        if lines:
            datas.append("\n".join(lines))
    if not datas:
        return "incomplete_stream"
    done = datas[-1].strip() == "[DONE]"
    reasons: list[str] = []
    for data in datas:
        if data.strip() == "[DONE]":
            continue
        try:
            doc = json.loads(data)
        except ValueError:
            return "incomplete_stream"
        if isinstance(doc, dict) and "error" in doc:
            return "upstream_error"
        reasons.extend(_finish_reasons(doc))
    if not reasons:
        return None if done else "incomplete_stream"
    if reasons[-1] not in allowed:
        return "finish_reason"
    return None


class _RecordingReply:
    """Relays the upstream reply unchanged while keeping a copy to store."""

    __slots__ = (
        "_ended",
        "_inner",
        "_limit",
        "_on_end",
        "_parts",
        "_size",
        "content_length",
        "headers",
        "reason",
        "status",
    )

    def __init__(self, inner: Reply, limit: int,
                 on_end: Callable[[bytes | None, str | None], None]) -> None:
        self._inner = inner
        self.status = inner.status
        self.reason = inner.reason
        self.headers = inner.headers
        self.content_length = inner.content_length
        self._parts: list[bytes] | None = []
        self._size = 0
        self._limit = limit
        self._on_end = on_end
        self._ended = False

    def _end(self, body: bytes | None, reason: str | None) -> None:
        if not self._ended:
            self._ended = True
            self._on_end(body, reason)

    def complete_body(self) -> bytes | None:
        body = self._inner.complete_body()
        if body is not None:
            if len(body) > self._limit:
                self._end(None, "payload_too_large")
            else:
                self._end(body, None)
        return body

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner.chunks():
                if self._parts is not None:
                    self._size += len(chunk)
                    if self._size > self._limit:
                        self._parts = None
                    else:
                        self._parts.append(chunk)
                yield chunk
        except UpstreamError:
            self._end(None, "upstream_error")
            raise
        if self._parts is None:
            self._end(None, "payload_too_large")
        else:
            self._end(b"".join(self._parts), None)

    def close(self) -> None:
        self._inner.close()
        self._end(None, "incomplete_stream")


class CacheStage:
    """The action cache's ``lookup`` and ``record`` stages, sharing one state."""

    def __init__(
        self,
        tiers: TieredCache,
        *,
        scopes: Scopes,
        environment: Environment,
        metrics: Metrics,
        max_entry_bytes: int,
        max_body_bytes: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.tiers = tiers
        self.scopes = scopes
        self.environment = environment
        self.metrics = metrics
        self.max_entry_bytes = max_entry_bytes
        self.max_body_bytes = max_body_bytes
        self._clock = clock
        # Store writes in progress: strong references, or the loop may drop them.
        self._writes: set[asyncio.Task[bool]] = set()
        # The data port's quick path, told of every key that hit or was stored.
        self.hits: QuickHits | None = None

    # -- lookup -------------------------------------------------------------

    def _bypass(self, ex: Exchange, reason: str) -> None:
        ex.cache = "bypass"
        ex.cache_reason = reason
        ex.extra_headers["X-Sidecar-Cache"] = "bypass"
        ex.extra_headers["X-Sidecar-Cache-Reason"] = reason

    async def lookup(self, ex: Exchange, nxt: Next) -> Reply:
        route = ex.route
        policy = route.cache
        request = ex.request
        if route.name == "other":
            return await nxt(ex)
        decision = keys.request_decision(
            policy.when, route.kind, request.method, request.headers.getall("Cache-Control", [])
        )
        if not decision.cacheable:
            self._bypass(ex, decision.reason or "not_cacheable")
            return await nxt(ex)
        canonical_body = await self._canonical_body(ex)
        if canonical_body is None:
            return await nxt(ex)
        signature = self.environment.signature
        if signature is None:
            self._bypass(ex, "environment_unknown")
            return await nxt(ex)
        ex.scope = self.scopes.scope(request.headers, public=policy.public)
        significant = [
            (name, ",".join(request.headers.getall(name, [])))
            for name in policy.significant_headers
        ]
        ex.action_key = keys.action_key(
            route=route.name, version=route.version, method=request.method,
            target=request.raw_path, canonical_body=canonical_body,
            environment=signature, significant=significant, scope=ex.scope,
        )
        ex.signature = signature
        if decision.refresh:
            ex.cache = "miss"
            ex.cache_reason = "refresh"
            ex.extra_headers["X-Sidecar-Cache"] = "miss"
            ex.extra_headers["X-Sidecar-Cache-Reason"] = "refresh"
            return await nxt(ex)
        found = await self.tiers.get(ex.action_key)
        if found is not None:
            self._remember(ex)
            return self._hit(ex, *found)
        ex.cache = "miss"
        ex.extra_headers["X-Sidecar-Cache"] = "miss"
        return await nxt(ex)

    async def _canonical_body(self, ex: Exchange) -> bytes | None:
        """The body's RFC 8785 form, or None (and a bypass) when it has none."""
        if ex.route.kind in keys.READ_KINDS:
            return b""
        raw = await read_body(ex, self.max_body_bytes)
        if len(raw) > self.max_entry_bytes:
            self._bypass(ex, "payload_too_large")
            return None
        try:
            if ex.json is None or ex.json_of is not raw:
                # The rewrite stage's parse refuses duplicate keys and
                # non-finite numbers, so its result can stand in for this one.
                ex.json = canonical.parse_body(raw)
                ex.json_of = raw
        except canonical.DuplicateKeyError as exc:
            raise ClientRequestError(
                ErrorCode.DUPLICATE_KEYS,
                f"the JSON body repeats a key ({log.clip(str(exc), 80)}); the"
                " upstream might read either value, so the request is refused",
            ) from None
        except canonical.NotCanonicalError:
            self._bypass(ex, "not_canonical")
            return None
        except ValueError:
            self._bypass(ex, "invalid_json")
            return None
        decision = keys.body_decision(ex.route.cache.when, ex.route.kind, ex.json)
        if not decision.cacheable:
            self._bypass(ex, decision.reason or "not_cacheable")
            return None
        try:
            return canonical.canonicalize(ex.json)
        except canonical.NotCanonicalError:
            self._bypass(ex, "not_canonical")
            return None

    def _hit(self, ex: Exchange, entry: Entry, tier: str) -> Reply:
        now = self._clock()
        age = max(0, int(now - entry.created))
        ex.cache = "hit"
        ex.cache_reason = None
        ex.stored = True
        ex.tier = tier
        served_s = time.perf_counter() - ex.started
        route = ex.route.name
        ex.saved_s = max(0.0, entry.upstream_duration_s - served_s)
        self.metrics.hot.saved(route, ex.saved_s, entry.size)
        log.cache.debug("cache.hit", extra={"route": route, "tier": tier, "size_bytes": entry.size})
        return CachedReply(entry, {"X-Sidecar-Cache": "hit", "Age": str(age)})

    def _remember(self, ex: Exchange) -> None:
        """Tell the quick path this request's key (it hit, or is being stored)."""
        hits = self.hits
        if hits is None or ex.action_key is None or ex.signature is None:
            return
        body = ex.client_body
        if body is None:
            if ex.request.body_exists:
                return  # a GET's body the key does not read; never remembered
            body = b""
        hits.remember(ex.request, body, ex.route.name, ex.action_key, ex.signature)

    # -- record -------------------------------------------------------------

    async def record(self, ex: Exchange, nxt: Next) -> Reply:
        if ex.action_key is None:
            return await nxt(ex)
        reply = await nxt(ex)
        reason = self._head_refusal(ex, reply)
        if reason is not None:
            self._not_stored(ex, reason)
            if ex.coalesced != "follower":
                ex.extra_headers["X-Sidecar-Cache-Reason"] = reason
            return reply
        # Snapshot the head now: the relay adds the sidecar's own fields later.
        headers = tuple((k, v) for k, v in reply.headers.items())
        status = reply.status
        key = ex.action_key
        started = time.perf_counter()

        def on_end(body: bytes | None, why: str | None) -> None:
            if body is not None:
                why = self._body_refusal(ex, reply, body)
            if why is not None or body is None:
                self._not_stored(ex, why or "incomplete_stream")
                return
            upstream_s = ex.upstream_s if ex.upstream_s is not None else time.perf_counter() - started
            entry = Entry.create(
                body, status=status, headers=headers, created=self._clock(),
                ttl_s=ex.route.cache.ttl, upstream_duration_s=upstream_s,
                content_type=reply.headers.get("Content-Type", ""),
                stream=_is_stream(reply), route=ex.route.name,
            )
            ex.stored = True
            task = asyncio.get_running_loop().create_task(self.tiers.put(key, entry))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)
            self._remember(ex)

        return _RecordingReply(reply, self.max_entry_bytes, on_end)

    def _not_stored(self, ex: Exchange, reason: str) -> None:
        ex.stored = False
        if ex.cache_reason is None or ex.cache_reason == "refresh":
            ex.cache_reason = reason
        log.cache.debug("cache.store_skipped", extra={"route": ex.route.name, "reason": reason})

    def _head_refusal(self, ex: Exchange, reply: Reply) -> str | None:
        if ex.no_store:
            return ex.cache_reason or "no_store"
        if reply.status >= 500:
            return "upstream_error"
        if not 200 <= reply.status < 300:
            return "status_not_cacheable"
        directives = keys.response_directives(reply.headers.items())
        if "no-store" in directives or "private" in directives:
            return "response_no_store"
        if "Set-Cookie" in reply.headers:
            return "response_sets_cookie"
        if reply.content_length is not None and reply.content_length > self.max_entry_bytes:
            return "payload_too_large"
        return None

    def _body_refusal(self, ex: Exchange, reply: Reply, body: bytes) -> str | None:
        allowed = ex.route.cache.finish_reasons
        if _is_stream(reply):
            return validate_stream(body, allowed)
        if "json" in reply.headers.get("Content-Type", ""):
            return validate_json_answer(body, allowed, ex.route.kind in keys.GENERATION_KINDS)
        return None

    async def drain_writes(self) -> None:
        """Wait for store writes in progress (tests, shutdown)."""
        while self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)


def _is_stream(reply: Reply) -> bool:
    return reply.headers.get("Content-Type", "").startswith(_SSE)
