"""Prompt reuse: the ``cache_prompt``/``cache_salt`` rewrite, prompt-token counts.

Owns two pipeline stages. ``PromptRewriter`` runs first on generation routes
(``route.kind`` chat, completion or infill) and makes prompt reuse the
default: for llama.cpp and OpenAI-style upstreams it sets ``cache_prompt``
as ``prompt_cache.mode`` says (``force``: always true, even over a client's
false; ``default``: true only where the client did not say; ``off``: the
body is not touched). For ``upstream.kind: vllm`` it sets ``cache_salt`` to
a per-scope HMAC instead, replacing whatever the client sent, so one
tenant's cached prefixes never speed up (and so reveal) another tenant's
requests. ``TokenMeter`` sits next to the upstream and reads, from every
answer (plain JSON or the tail of an SSE stream), how many prompt tokens the
upstream reused and how many it evaluated, into
``sidecar_prompt_tokens_reused_total`` and
``sidecar_prompt_tokens_evaluated_total`` (labels ``route``, ``replica``) and
an optional callback for the read models.
Not here: which replica gets a request (balance.py), the scope secret
(scope.py), the action cache (cache/stage.py).

Invariants:
- Refuse nothing. A body is rewritten only when it is UTF-8 text parsing as
  one JSON object with no repeated key, no ``NaN``/``Infinity`` literal and
  nothing Python's parser cannot hold; anything else is forwarded byte for
  byte and the upstream answers it.
- A body is changed only when the rewrite changes a value. When the field
  is absent it is spliced in right after the opening brace, so every other
  byte is the client's; when it must be replaced, the object is serialised
  again compactly (the only path that costs a full ``json.dumps``).
- The Forwarder sends ``ex.body`` with a Content-Length of its own, so the
  length always follows the rewritten body.
- Accounting reads at most ``_TAIL_BYTES`` of a stream and at most
  ``max_json_bytes`` of a plain answer; it never holds a whole stream.

Cost (``bench/bench_prompt.py``, one core of a shared machine): a 10 KB
chat body takes about 70 us to parse and the same to parse and splice, 170
us when the field must be replaced; a 1 MB body 6 to 10 ms to parse or
splice and about 20 ms to replace. The replace path (a client that sent
``cache_prompt: false`` under ``force``) is the only one that serialises.
On vLLM the salt is set in every mode: it is isolation, not reuse.

Known limitations: ``cache_prompt`` is sent to ``kind: openai`` upstreams
too (most OpenAI-compatible servers built on llama.cpp need it, and the
others ignore unknown fields); a server that refuses unknown fields needs
``prompt_cache.mode: off``. A body that cannot be rewritten faithfully (a
repeated key, a number Python reads as infinite, lone UTF-16 surrogates
when it must be re-serialised) passes through unchanged, so that request
gets no forced reuse and, on vLLM, no salt; such a request still never
shares another tenant's salted prefixes. llama.cpp's ``tokens_cached`` is
the slot's whole cache after the answer (prompt and generated tokens), not
a reuse count, so it is not read; ``timings`` is. An OpenAI-style answer
without ``prompt_tokens_details`` counts every prompt token as evaluated.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from sidecar import log
from sidecar.manifest import PromptCacheMode, RouteKind, UpstreamKind
from sidecar.metrics import Metrics
from sidecar.proxy import Exchange, Next, Reply, read_body

if TYPE_CHECKING:
    from sidecar.scope import Scopes

PROMPT_KINDS: Final = frozenset(
    {RouteKind.CHAT, RouteKind.COMPLETION, RouteKind.INFILL}
)
CACHE_PROMPT: Final = "cache_prompt"
CACHE_SALT: Final = "cache_salt"
SALT_PURPOSE: Final = "cache_salt"
# The end of a stream kept for accounting: llama.cpp's final event carries
# ``timings`` last, an OpenAI-style one ``usage``, both well inside this.
_TAIL_BYTES: Final = 64 * 1024
# How many ``"usage":`` keys to look back through (OpenAI streams with
# ``include_usage`` put ``"usage":null`` in every chunk before the last).
_MAX_KEY_LOOKBACK: Final = 8
_JSON_SPACE: Final = b" \t\n\r"
_SPACE: Final = re.compile(r"[ \t\n\r]*")

SaltFor = Callable[[Exchange], str]
OnTokens = Callable[[str, str, int, int], None]


class _Unfaithful(ValueError):
    """The body parses, but rewriting it could change what it means."""


# --- parsing and rewriting (pure) ---------------------------------------------


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _Unfaithful("repeated key")
    return obj


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _Unfaithful("number out of range")
    return value


def _no_constant(text: str) -> Any:
    raise _Unfaithful(f"non-standard literal {text}")


def parse_object(body: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, or None when it must pass through as is."""
    if not body:
        return None
    try:
        doc = json.loads(
            body.decode("utf-8"),
            object_pairs_hook=_no_repeats,
            parse_float=_finite,
            parse_constant=_no_constant,
        )
    except (ValueError, RecursionError):
        # UnicodeDecodeError and JSONDecodeError are ValueErrors; a body
        # nested deeper than the interpreter's stack is not ours to fix.
        return None
    return doc if isinstance(doc, dict) else None


def set_field(body: bytes, obj: dict[str, Any], name: str, value: Any) -> bytes | None:
    """``body`` with ``obj[name] = value``, or None when it already says so.

    ``obj`` is ``body`` parsed by ``parse_object`` and is updated in place.
    """
    if name in obj:
        current = obj[name]
        if type(current) is type(value) and current == value:
            return None
        obj[name] = value
        new = _dumps(obj)
        if new is None:
            obj[name] = current  # the body stays as sent, so must its parse
        return new
    obj[name] = value
    start = len(body) - len(body.lstrip(_JSON_SPACE))
    member = json.dumps(name).encode() + b":" + json.dumps(value).encode()
    rest = body[start + 1 :]
    # Empty object: no member follows, so no comma.
    sep = b"," if len(obj) > 1 else b""
    return body[:start] + b"{" + member + sep + rest


def _dumps(obj: dict[str, Any]) -> bytes | None:
    try:
        text = json.dumps(
            obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except ValueError:
        return None
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates (the client wrote "\ud800"): keep them escaped,
        # as the client sent them, rather than emit invalid UTF-8.
        return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def wanted_field(
    mode: PromptCacheMode,
    kind: UpstreamKind,
    obj: Mapping[str, Any],
    salt: Callable[[], str],
) -> tuple[str, Any] | None:
    """The field and value the rewrite sets on ``obj``, or None for none."""
    if kind == UpstreamKind.VLLM:
        return CACHE_SALT, salt()
    if mode == PromptCacheMode.FORCE:
        return CACHE_PROMPT, True
    if mode == PromptCacheMode.DEFAULT and CACHE_PROMPT not in obj:
        return CACHE_PROMPT, True
    return None


# --- salts ---------------------------------------------------------------------


def header_salt(secret: bytes, header: str = "Authorization") -> SaltFor:
    """A ``salt_for``: hex HMAC-SHA256 of one request header under ``secret``."""

    def salt_for(ex: Exchange) -> str:
        credential = ex.request.headers.get(header, "")
        msg = (
            SALT_PURPOSE.encode()
            + b"\0"
            + credential.encode("utf-8", "surrogateescape")
        )
        return hmac.new(secret, msg, hashlib.sha256).hexdigest()

    return salt_for


def scopes_salt(scopes: Scopes) -> SaltFor:
    """A ``salt_for`` from the cache's ``scope.Scopes``: one salt per credential."""

    def salt_for(ex: Exchange) -> str:
        headers = ex.request.headers
        return scopes.hmac(scopes.credential(headers), SALT_PURPOSE)

    return salt_for


# --- the rewrite stage ---------------------------------------------------------


class PromptRewriter:
    """Stage: sets ``cache_prompt`` (or ``cache_salt`` on vLLM) on generation routes."""

    def __init__(
        self,
        mode: PromptCacheMode,
        kind: UpstreamKind,
        salt_for: SaltFor,
        *,
        max_body_bytes: int,
    ) -> None:
        self.mode = PromptCacheMode(mode)
        self.kind = UpstreamKind(kind)
        self.salt_for = salt_for
        self.max_body_bytes = max_body_bytes

    @property
    def output_fields(self) -> dict[str, str]:
        """What this stage adds to the action cache's environment signature.

        For ``Environment.set_output_fields``: the mode decides what the
        upstream is asked to do, so answers under another mode never match.
        """
        return {"prompt_cache.mode": self.mode.value}

    @property
    def active(self) -> bool:
        """False when no request can be changed (``off`` on a non-vLLM upstream)."""
        return self.kind == UpstreamKind.VLLM or self.mode != PromptCacheMode.OFF

    async def __call__(self, ex: Exchange, nxt: Next) -> Reply:
        if ex.route.kind in PROMPT_KINDS and self.active:
            await self._rewrite(ex)
        return await nxt(ex)

    async def _rewrite(self, ex: Exchange) -> None:
        body = await read_body(ex, self.max_body_bytes)
        obj = parse_object(body)
        if obj is None:
            log.proxy.debug(
                "prompt.passthrough", extra={"route": ex.route.name, "bytes": len(body)}
            )
            return
        ex.json = obj
        ex.json_of = body
        wanted = wanted_field(self.mode, self.kind, obj, lambda: self.salt_for(ex))
        if wanted is None:
            return
        new = set_field(body, obj, *wanted)
        if new is not None:
            ex.body = new
            ex.json_of = new
            log.proxy.debug(
                "prompt.rewritten",
                extra={"route": ex.route.name, "field": wanted[0], "bytes": len(new)},
            )


# --- token accounting ------------------------------------------------------------


def _count(value: Any) -> int | None:
    return value if type(value) is int and value >= 0 else None


def tokens_from_doc(doc: Any) -> tuple[int, int] | None:
    """(reused, evaluated) prompt tokens an answer or final chunk reports."""
    if not isinstance(doc, dict):
        return None
    found = _from_timings(doc.get("timings"))
    return found if found is not None else _from_usage(doc.get("usage"))


def _from_timings(timings: Any) -> tuple[int, int] | None:
    # llama.cpp: cache_n prompt tokens taken from the slot, prompt_n evaluated.
    if not isinstance(timings, dict):
        return None
    reused, evaluated = _count(timings.get("cache_n")), _count(timings.get("prompt_n"))
    if reused is None or evaluated is None:
        return None
    return reused, evaluated


def _from_usage(usage: Any) -> tuple[int, int] | None:
    # OpenAI: prompt_tokens counts all of them, cached_tokens the reused part.
    if not isinstance(usage, dict):
        return None
    prompt = _count(usage.get("prompt_tokens"))
    if prompt is None:
        return None
    details = usage.get("prompt_tokens_details")
    cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else None
    reused = min(cached or 0, prompt)
    return reused, prompt - reused


def tokens_from_tail(tail: bytes) -> tuple[int, int] | None:
    """(reused, evaluated) from the end of a stream or of a large answer.

    The last event may be larger than the tail (llama.cpp's native stream
    repeats the prompt in it), so the tail is searched for the last
    ``"timings":`` and ``"usage":`` members instead of being parsed whole.
    A key counts only after ``{`` or ``,``: inside a JSON string its quote
    would be escaped, so generated text cannot forge one.
    """
    text = tail.decode("utf-8", "replace")
    timings = _last_member(text, "timings", _from_timings)
    return timings if timings is not None else _last_member(text, "usage", _from_usage)


def _last_member(
    text: str, key: str, read: Callable[[Any], tuple[int, int] | None]
) -> tuple[int, int] | None:
    needle = f'"{key}":'
    decoder = json.JSONDecoder()
    end = len(text)
    for _ in range(_MAX_KEY_LOOKBACK):
        at = text.rfind(needle, 0, end)
        if at < 0:
            return None
        end = at
        if _previous_char(text, at) not in ("{", ","):
            continue
        start = _SPACE.match(text, at + len(needle)).end()  # type: ignore[union-attr]
        try:
            value, _ = decoder.raw_decode(text, start)
        except ValueError:
            continue
        found = read(value)
        if found is not None:
            return found
    return None


def _previous_char(text: str, at: int) -> str:
    """The last non-space character before ``at``, or "" at the start."""
    at -= 1
    while at >= 0 and text[at] in " \t\n\r":
        at -= 1
    return text[at] if at >= 0 else ""


class TokenMeter:
    """Stage: counts the prompt tokens each generation answer reports."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        on_tokens: OnTokens | None = None,
        max_json_bytes: int = 8 * 2**20,
    ) -> None:
        self.metrics = metrics
        self.on_tokens = on_tokens
        self.max_json_bytes = max_json_bytes

    async def __call__(self, ex: Exchange, nxt: Next) -> Reply:
        reply = await nxt(ex)
        if ex.route.kind not in PROMPT_KINDS or not 200 <= reply.status < 300:
            return reply
        stream = reply.headers.get("Content-Type", "").startswith("text/event-stream")
        return _MeteredReply(
            reply, stream, self.max_json_bytes, lambda b: self._end(ex, b)
        )

    def _end(self, ex: Exchange, found: tuple[int, int] | None) -> None:
        if found is None:
            return
        reused, evaluated = found
        route, replica = ex.route.name, ex.replica or "default"
        labels = {"route": route, "replica": replica}
        self.metrics.prompt_tokens_reused.add(labels, reused)
        self.metrics.prompt_tokens_evaluated.add(labels, evaluated)
        if self.on_tokens is not None:
            self.on_tokens(route, replica, reused, evaluated)


class _MeteredReply:
    """Relays a reply unchanged, keeping only what accounting needs of it."""

    __slots__ = (
        "_ended",
        "_inner",
        "_limit",
        "_on_end",
        "_parts",
        "_size",
        "_stream",
        "_tail",
        "content_length",
        "headers",
        "reason",
        "status",
    )

    def __init__(
        self,
        inner: Reply,
        stream: bool,
        limit: int,
        on_end: Callable[[tuple[int, int] | None], None],
    ) -> None:
        self._inner = inner
        self.status = inner.status
        self.reason = inner.reason
        self.headers = inner.headers
        self.content_length = inner.content_length
        self._stream = stream
        self._limit = limit
        self._parts: list[bytes] | None = None if stream else []
        self._size = 0
        self._tail = b""
        self._on_end = on_end
        self._ended = False

    def complete_body(self) -> bytes | None:
        body = self._inner.complete_body()
        if body is not None:
            self._finish(body, body[-_TAIL_BYTES:])
        return body

    async def chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner.chunks():
            self._keep(chunk)
            yield chunk
        whole = b"".join(self._parts) if self._parts is not None else None
        self._finish(whole, self._tail)

    def _keep(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._parts is not None:
            if self._size <= self._limit:
                self._parts.append(chunk)
            else:
                self._parts = None
        tail = self._tail + chunk
        self._tail = tail[-_TAIL_BYTES:] if len(tail) > _TAIL_BYTES else tail

    def _finish(self, whole: bytes | None, tail: bytes) -> None:
        if self._ended:
            return
        self._ended = True
        found = None
        if not self._stream and whole is not None and len(whole) <= self._limit:
            try:
                found = tokens_from_doc(json.loads(whole))
            except (ValueError, RecursionError):
                found = None
        else:
            found = tokens_from_tail(tail)
        self._on_end(found)

    def close(self) -> None:
        # An answer that did not end (client gone, stream cut) reports nothing.
        self._ended = True
        self._inner.close()
