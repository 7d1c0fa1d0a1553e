"""The data port's forwarding pipeline: request in, upstream reply relayed out.

Owns: the per-request ``Exchange``, the checks every request passes before
it may reach the upstream (framing, header and body ceilings), the chain of
stages that may answer a request or shape it, the final forward to the
upstream and the relay of the reply to the client, and the accounting done
when a request ends (metrics, access line, read models).

A stage is an async callable ``(exchange, next) -> Reply``: it may answer by
itself (a cache hit), change the exchange and call ``next`` (a rewrite), or
wrap the reply ``next`` returns (recording a stream for the cache). The
chain ends in ``Forwarder``, which calls the upstream. Guardrails are added
as stages without touching the relay or each other.

Invariants:
- The client never sees a traceback. Errors the sidecar produces before a
  response has started are JSON in the OpenAI shape (errors.py); once a
  response has started, a failure can only cut the connection, and does,
  so the client can tell a truncated body from a complete one.
- Response bodies are relayed chunk by chunk as the upstream sends them;
  nothing is held back to fill a buffer (an SSE stream stays live).
- Request bodies are streamed to the upstream, except bodies up to
  ``_SMALL_BODY_BYTES`` with a declared length (read in one go: one write
  instead of several, and no unbounded buffering) and bodies a stage asks to
  read (``Exchange.body``).
- A client that goes away cancels its handler (the data port's server,
  sidecar/http/, cancels it), which aborts the upstream response and closes
  that connection.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from multidict import CIMultiDict

from sidecar import headers as hdrs
from sidecar import http as web
from sidecar import log
from sidecar.errors import (
    ClientRequestError,
    ErrorCode,
    OverloadedError,
    UpstreamError,
    error_body,
)
from sidecar.http import HttpVersion11
from sidecar.upstream import Upstream, UpstreamResponse

# Bodies up to this size with a declared Content-Length are read whole and
# sent in one write; larger or chunked bodies are streamed.
_SMALL_BODY_BYTES: Final = 64 * 1024
# Complete upstream bodies up to this size are answered with one write.
_ONE_WRITE_BYTES: Final = 1024 * 1024
_NO_BODY_STATUSES: Final = frozenset({204, 304})


class Reply(Protocol):
    """What a stage returns: a status, headers, and a body to relay."""

    status: int
    reason: str
    headers: CIMultiDict[str]
    content_length: int | None

    def complete_body(self) -> bytes | None:
        """The whole body if it is already at hand, else None."""

    def chunks(self) -> AsyncIterator[bytes]:
        """The body, chunk by chunk; raises ``UpstreamError`` if it is cut."""

    def close(self) -> None:
        """Release what the reply holds; aborts an unfinished body."""


@dataclass(slots=True)
class Exchange:
    """One request on its way through the pipeline, and what happened to it.

    Written by the stages in chain order; read by ``Sidecar._observe`` when the
    request ends. Event-loop thread only.
    """

    request: web.Request
    route: Any  # manifest.Route
    params: dict[str, str]
    started: float
    # The body as it will be sent upstream, when a stage has read it (or it
    # was small enough to read whole); None means "stream the client's body".
    body: bytes | None = None
    # The body exactly as the client sent it, once read (rewrites change
    # ``body``, never this).
    client_body: bytes | None = None
    # The parsed JSON body, when a stage parsed it (cache, prompt rewrite),
    # and the exact body bytes it is the parse of: a later stage may reuse
    # ``json`` only while ``json_of is body``.
    json: Any = None
    json_of: bytes | None = None
    # The caller's scope (an HMAC of its credential), set by the cache stage.
    scope: str | None = None
    # The action key (sha256), set when the request is cacheable, and the
    # environment signature it was computed under.
    action_key: bytes | None = None
    signature: bytes | None = None
    # What the cache did (X-Sidecar-Cache) and, when not a hit, why.
    cache: str = "none"
    cache_reason: str | None = None
    # The tier a hit came from, and the upstream time it saved.
    tier: str | None = None
    saved_s: float = 0.0
    # Whether the answer was stored in the cache (None: not decided yet).
    stored: bool | None = None
    # Set by a stage that knows this answer must not be stored (a follower
    # that gave up on its leader and went upstream itself, for example).
    no_store: bool = False
    # Singleflight role: "leader", "follower" or "none".
    coalesced: str = "none"
    # The upstream to send to (a replica chosen by a stage); None = default.
    upstream: Upstream | None = None
    upstream_s: float | None = None
    status: int = 0
    bytes_out: int = 0
    replica: str | None = None
    cut: bool = False
    # Why the sidecar refused or failed the request, as an error code word
    # (errors.ErrorCode.code, or "cut" for a body cut mid-way), for metrics.
    error: str | None = None
    # Response header fields the stages add (X-Sidecar-Cache, Age, ...).
    extra_headers: dict[str, str] = field(default_factory=dict)


Next = Callable[[Exchange], Awaitable[Reply]]
Stage = Callable[[Exchange, Next], Awaitable[Reply]]


class UpstreamReply:
    """A ``Reply`` backed by a live upstream response."""

    __slots__ = (
        "_ended",
        "_on_end",
        "_resp",
        "content_length",
        "headers",
        "reason",
        "status",
    )

    def __init__(
        self, resp: UpstreamResponse, on_end: Callable[[], None] | None = None
    ) -> None:
        self._resp = resp
        self.status = resp.status
        self.reason = resp.reason.decode("latin-1", "replace")
        self.headers, dropped = hdrs.response_headers(resp.headers)
        if dropped or resp.bad_headers:
            log.upstream.warning(
                "upstream.bad_header_dropped",
                extra={"count": dropped + resp.bad_headers},
            )
        self.content_length = hdrs.content_length(resp.headers)
        self._on_end = on_end
        self._ended = False

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            if self._on_end is not None:
                self._on_end()

    def complete_body(self) -> bytes | None:
        if self._resp.complete:
            data = self._resp.take_buffered()
            self._resp.release()
            self._end()
            return data
        return None

    async def chunks(self) -> AsyncIterator[bytes]:
        resp = self._resp
        while chunk := await resp.read():
            yield chunk
        resp.release()
        self._end()

    def close(self) -> None:
        self._resp.abort()
        self._end()


class Forwarder:
    """The last stage: sends the exchange to the upstream."""

    def __init__(self, upstream: Upstream, forwarded_mode: str, max_body_bytes: int) -> None:
        self.upstream = upstream
        self.forwarded_mode = forwarded_mode
        self.max_body_bytes = max_body_bytes

    async def __call__(self, ex: Exchange) -> Reply:
        request = ex.request
        body: bytes | AsyncIterator[bytes] | None
        length: int | None = None
        if ex.body is not None:
            body = ex.body
        elif request.body_exists:
            length = request.content_length
            body = _stream_body(request, self.max_body_bytes)
        else:
            body = None
        fields = hdrs.request_headers(
            request.raw_headers,
            peer=request.remote,
            host=request.host,
            mode=self.forwarded_mode,
        )
        upstream = ex.upstream or self.upstream
        started = time.perf_counter()
        resp = await upstream.request(
            request.method, request.raw_path, fields, body, content_length=length
        )

        def finished() -> None:
            ex.upstream_s = time.perf_counter() - started

        ex.replica = upstream.authority
        return UpstreamReply(resp, finished)


async def read_body(ex: Exchange, max_bytes: int) -> bytes:
    """The whole request body, read once and kept on the exchange.

    For stages that must see the body (cache keys, prompt rewrites). Refuses
    bodies over ``max_bytes`` with 413; a server's own ``read()`` cap is not
    used because its error is not the sidecar's.
    """
    if ex.body is not None:
        return ex.body
    request = ex.request
    if not request.body_exists:
        ex.body = ex.client_body = b""
        return ex.body
    parts = []
    async for chunk in _stream_body(request, max_bytes):
        parts.append(chunk)
    ex.body = ex.client_body = b"".join(parts)
    return ex.body


async def _stream_body(request: web.Request, max_bytes: int) -> AsyncIterator[bytes]:
    """The request body as it arrives, refused once it passes ``max_bytes``."""
    seen = 0
    async for chunk in request.content.iter_any():
        seen += len(chunk)
        if seen > max_bytes:
            raise ClientRequestError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"request body exceeds the {max_bytes}-byte limit (limits.max_body_bytes)",
            )
        yield chunk


# The lean server adds nothing of its own (no Server, no default
# Content-Type), so the relay sends its responses as they are.
RelayResponse = web.StreamResponse
RelayBodyResponse = web.Response


def json_error(code: ErrorCode, message: str, **extra_headers: str) -> web.Response:
    """An error the sidecar itself produces, in the OpenAI error shape."""
    resp = web.Response(
        status=code.status,
        body=error_body(code, message),
        content_type="application/json",
    )
    for name, value in extra_headers.items():
        resp.headers[name.replace("_", "-")] = value
    return resp


class Proxy:
    """The data port's request handler."""

    def __init__(
        self,
        *,
        router: Any,
        forwarder: Forwarder,
        stages: list[Stage],
        max_body_bytes: int,
        max_header_bytes: int,
        observe: Callable[[Exchange, float], None],
    ) -> None:
        self.router = router
        self.forwarder = forwarder
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes
        self._observe = observe
        self._chain = self._build_chain(stages)
        self._passthrough_chain = self._chain
        self.draining = False
        self.ending_streams = False
        self.in_flight = 0
        # Replies being streamed right now, so a drain can end them cleanly
        # when its grace period runs out. Event-loop thread only.
        self.streaming: set[Reply] = set()

    def _build_chain(self, stages: list[Stage]) -> Next:
        async def last(ex: Exchange) -> Reply:
            return await self.forwarder(ex)

        chain: Next = last
        for stage in reversed(stages):
            chain = _bind(stage, chain)
        return chain

    def set_stages(self, stages: list[Stage], passthrough: list[Stage] | None = None) -> None:
        """Install the pipeline; ``passthrough`` is the shorter one for routes
        no guardrail reads (kind passthrough, not coalesced), so plain
        forwarding does not pay for stages that would only call ``next``."""
        self._chain = self._build_chain(stages)
        self._passthrough_chain = (
            self._chain if passthrough is None else self._build_chain(passthrough)
        )

    def end_streams(self) -> None:
        """End every running stream cleanly (the drain's grace has run out)."""
        self.ending_streams = True
        for reply in list(self.streaming):
            reply.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        self.in_flight += 1
        route, params = self.router.match(request.method, request.raw_path.split("?", 1)[0])
        ex = Exchange(request, route, params, started)
        try:
            resp = await self._handle(ex)
        except BaseException:
            # The client went away (handler cancelled) or something unexpected
            # happened; either way the access line and metrics still count it.
            ex.status = ex.status or 499
            self._observe(ex, time.perf_counter() - started)
            raise
        finally:
            self.in_flight -= 1
        ex.status = resp.status
        self._observe(ex, time.perf_counter() - started)
        return resp

    async def _handle(self, ex: Exchange) -> web.StreamResponse:
        request = ex.request
        try:
            self._check_request(request)
            if request.body_exists:
                await self._send_continue(request)
                length = request.content_length
                if length is not None and length <= _SMALL_BODY_BYTES:
                    ex.body = ex.client_body = await request.read()
            route = ex.route
            if route.kind == "passthrough" and not route.coalesce:
                reply = await self._passthrough_chain(ex)
            else:
                reply = await self._chain(ex)
        except ClientRequestError as exc:
            ex.error = exc.code.code
            return self._refuse(request, exc.code, exc.message)
        except OverloadedError as exc:
            ex.error = exc.code.code
            return json_error(
                exc.code, exc.message, Retry_After=str(max(1, round(exc.retry_after_s)))
            )
        except UpstreamError as exc:
            ex.error = exc.code.code
            log.proxy.warning(
                "proxy.upstream_failed",
                extra={"route": ex.route.name, "error": exc.message, "code": exc.code.code},
            )
            return json_error(exc.code, exc.message)
        return await self._relay(ex, reply)

    def _check_request(self, request: web.Request) -> None:
        # RFC 9112 section 6.1: Transfer-Encoding in an HTTP/1.0 message means
        # the framing cannot be trusted; refuse and close the connection.
        if request.version < HttpVersion11 and "Transfer-Encoding" in request.headers:
            raise ClientRequestError(
                ErrorCode.AMBIGUOUS_FRAMING,
                "HTTP/1.0 requests must not use Transfer-Encoding",
            )
        size = sum(len(n) + len(v) + 4 for n, v in request.raw_headers)
        if size > self.max_header_bytes:
            raise ClientRequestError(
                ErrorCode.HEADERS_TOO_LARGE,
                f"request header fields total {size} bytes, over the"
                f" {self.max_header_bytes}-byte limit (limits.max_header_bytes)",
            )
        length = request.content_length
        if length is not None and length > self.max_body_bytes:
            raise ClientRequestError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"request body of {length} bytes exceeds the {self.max_body_bytes}-byte"
                " limit (limits.max_body_bytes)",
            )

    async def _send_continue(self, request: web.Request) -> None:
        expect = request.headers.get("Expect")
        if expect is not None and expect.lower() == "100-continue":
            await request.send_continue()

    def _refuse(
        self, request: web.Request, code: ErrorCode, message: str
    ) -> web.Response:
        resp = json_error(code, message)
        if code in (ErrorCode.AMBIGUOUS_FRAMING, ErrorCode.PAYLOAD_TOO_LARGE):
            # The rest of the connection's bytes cannot be trusted (framing)
            # or would have to be read and thrown away (an oversized body).
            resp.force_close()
        return resp

    async def _relay(self, ex: Exchange, reply: Reply) -> web.StreamResponse:
        request = ex.request
        if ex.extra_headers:
            reply.headers.update(ex.extra_headers)
        try:
            body = reply.complete_body()
            if body is not None and len(body) <= _ONE_WRITE_BYTES and (
                request.method != "HEAD" and reply.status not in _NO_BODY_STATUSES
            ):
                resp: web.StreamResponse = RelayBodyResponse(
                    status=reply.status, reason=reply.reason, headers=reply.headers,
                    body=body,
                )
                ex.bytes_out = len(body)
                if self.draining:
                    resp.force_close()
                return resp
            resp = RelayResponse(status=reply.status, reason=reply.reason, headers=reply.headers)
            if reply.content_length is not None:
                resp.content_length = reply.content_length
            if self.draining:
                resp.force_close()
            await resp.prepare(request)
            if body is not None:
                if body:
                    await resp.write(body)
                ex.bytes_out = len(body)
            else:
                self.streaming.add(reply)
                try:
                    async for chunk in reply.chunks():
                        ex.bytes_out += len(chunk)
                        await resp.write(chunk)
                finally:
                    self.streaming.discard(reply)
            await resp.write_eof()
            return resp
        except UpstreamError as exc:
            if self.ending_streams:
                # The drain ended this stream on purpose: finish the message
                # properly so the client sees a clean end, then reconnects.
                await resp.write_eof()
                return resp
            # Headers are out: the only honest signal left is to cut the
            # connection, so the client sees a truncated body, not a short one.
            log.proxy.warning(
                "proxy.upstream_cut",
                extra={"route": ex.route.name, "error": exc.message},
            )
            reply.close()
            if request.transport is not None:
                request.transport.abort()
            ex.cut = True
            ex.error = "cut"
            ex.cache_reason = ex.cache_reason or "upstream_error"
            return resp
        except BaseException:
            reply.close()
            raise


def _bind(stage: Stage, nxt: Next) -> Next:
    async def call(ex: Exchange) -> Reply:
        return await stage(ex, nxt)

    return call

