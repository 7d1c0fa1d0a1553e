"""HTTP for the read models: snapshots, the delta stream and the dashboard.

Owns the admin-port handlers ``GET /state``, ``GET /state/{model}``,
``GET /state/stream`` and ``GET /dashboard`` (with its two scripts), and
``attach()``, which adds them and the hub's lifecycle to an admin app.
Not here: the admin application, its token check and other routes
(sidecar/app.py), what a stream carries (hub.py).

Invariants:
- ``/state/stream`` is registered before ``/state/{model}``, and ``stream``
  can never be a model name, so the stream is never read as a model.
- A snapshot's ETag is a digest of its exact body, so it is strong
  (RFC 9110 section 8.8.3) and stays correct across restarts.
- ``Last-Event-ID`` comes from the header (what EventSource sends on its own
  reconnects) or, when the header is absent, from the ``last_event_id`` query
  parameter (what a page passes when it has to open a new EventSource). The
  stream says how it started: ``X-Sidecar-Resume: replayed`` (only the missed
  patches follow) or ``snapshot``, and ``X-Sidecar-Resume-Reason`` (``new``,
  ``in_buffer``, ``malformed``, ``evicted``, ``future`` or ``unknown``).
- Errors are JSON in the OpenAI shape from ``sidecar.errors``; never a
  traceback.

Known limitations: the dashboard needs no token, like every read-only admin
path; if the admin app demands a token for reads, EventSource cannot send a
header, so the page would need the token in its URL.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import math
from typing import Final

from aiohttp import web

from sidecar import log
from sidecar.errors import JSON_CONTENT_TYPE, ErrorCode, error_body
from sidecar.state.hub import HubClosedError, HubFullError, StateHub, UnknownModelError
from sidecar.state.sse import encode_retry
from sidecar.state.subscriber import Subscriber

RESUME_HEADER: Final = "X-Sidecar-Resume"
RESUME_REASON_HEADER: Final = "X-Sidecar-Resume-Reason"
LAST_EVENT_ID_PARAM: Final = "last_event_id"
_MAX_MODELS_PARAM: Final = 1024
_STATIC_FILES: Final = {
    "dashboard.html": "text/html",
    "dashboard.js": "text/javascript",
    "rfc6902.js": "text/javascript",
}
_DASHBOARD_CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; frame-ancestors 'none'"
)
# Peer disconnects a stream writer expects; anything else is a bug and logged.
_GONE: Final = (ConnectionResetError, BrokenPipeError)


def _json_error(code: ErrorCode, message: str, **headers: str) -> web.Response:
    return web.Response(
        status=code.status,
        body=error_body(code, message),
        content_type=JSON_CONTENT_TYPE,
        headers=headers,
    )


def strong_etag(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def etag_matches(if_none_match: str, etag: str) -> bool:
    """RFC 9110 section 13.1.2: weak comparison, ``*`` matches anything."""
    candidates = [part.strip() for part in if_none_match.split(",")]
    bare = etag.removeprefix("W/")
    return any(c == "*" or c.removeprefix("W/") == bare for c in candidates)


class StateViews:
    """The handlers, bound to one hub."""

    def __init__(self, hub: StateHub) -> None:
        self.hub = hub
        self._static = {name: _load_static(name) for name in _STATIC_FILES}

    async def handle_list(self, request: web.Request) -> web.Response:
        """The models, their versions and where to read them."""
        models = {
            name: {"version": self.hub.model(name).version, "href": f"/state/{name}"}
            for name in self.hub.names()
        }
        doc = {
            "models": models,
            "stream": "/state/stream",
            "last_event_id": self.hub.last_event_id,
            "subscribers": self.hub.subscriber_count,
        }
        return web.json_response(doc, headers={"Cache-Control": "no-cache"})

    async def handle_model(self, request: web.Request) -> web.StreamResponse:
        """One model's live snapshot, with a strong ETag and 304 on a match."""
        name = request.match_info["model"]
        try:
            model = self.hub.model(name)
        except UnknownModelError:
            return _json_error(
                ErrorCode.NOT_FOUND, f"no read model named {log.clip(name)!r}"
            )
        body = json.dumps(
            model.snapshot(), separators=(",", ":"), sort_keys=True
        ).encode()
        etag = strong_etag(body)
        headers = {"ETag": etag, "Cache-Control": "no-cache"}
        if etag_matches(request.headers.get("If-None-Match", ""), etag):
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, content_type=JSON_CONTENT_TYPE, headers=headers)

    async def handle_stream(self, request: web.Request) -> web.StreamResponse:
        """SSE: snapshots or the missed patches, then patches as they happen."""
        try:
            models = self._parse_models(request)
        except ValueError as exc:
            return _json_error(ErrorCode.BAD_REQUEST, str(exc))
        last_id = request.headers.get("Last-Event-ID")
        if last_id is None:
            last_id = request.query.get(LAST_EVENT_ID_PARAM)
        try:
            start = self.hub.subscribe(models, last_id)
        except UnknownModelError as exc:
            names = ", ".join(log.clip(n, 64) for n in exc.names[:8])
            known = ", ".join(exc.known)
            return _json_error(
                ErrorCode.BAD_REQUEST, f"unknown read model(s) {names}; known: {known}"
            )
        except HubFullError as exc:
            retry = str(max(1, math.ceil(exc.retry_after_s)))
            return _json_error(ErrorCode.OVERLOADED, str(exc), **{"Retry-After": retry})
        except HubClosedError as exc:
            retry = str(max(1, math.ceil(self.hub.retry_s)))
            return _json_error(ErrorCode.DRAINING, str(exc), **{"Retry-After": retry})
        headers = {
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            RESUME_HEADER: start.resume,
            RESUME_REASON_HEADER: start.reason,
        }
        response = web.StreamResponse(headers=headers)
        try:
            await self._run_stream(request, response, start.subscriber, start.frames)
        finally:
            self.hub.unsubscribe(start.subscriber)
        return response

    async def _run_stream(
        self,
        request: web.Request,
        response: web.StreamResponse,
        sub: Subscriber,
        first: bytes,
    ) -> None:
        transport = request.transport
        if transport is not None:
            sub.abort = transport.abort
        try:
            await response.prepare(request)
            await self._send(response, sub, encode_retry(self.hub.retry_s) + first)
            finished = False
            while not finished:
                data, finished = await sub.next_batch()
                await self._send(response, sub, data)
            await response.write_eof()
        except _GONE:
            pass  # the client went away; unsubscribing is all there is to do

    @staticmethod
    async def _send(response: web.StreamResponse, sub: Subscriber, data: bytes) -> None:
        if data:
            await response.write(data)
            sub.bytes_sent += len(data)

    def _parse_models(self, request: web.Request) -> list[str] | None:
        raw = request.query.get("models")
        if raw is None:
            return None
        if len(raw) > _MAX_MODELS_PARAM:
            raise ValueError("models= is too long")
        names = [part.strip() for part in raw.split(",") if part.strip()]
        if not names:
            raise ValueError("models= names no read model; omit it to get all of them")
        return names

    async def handle_dashboard(self, request: web.Request) -> web.Response:
        return self._static_response(request, "dashboard.html")

    async def handle_dashboard_js(self, request: web.Request) -> web.Response:
        return self._static_response(request, "dashboard.js")

    async def handle_rfc6902_js(self, request: web.Request) -> web.Response:
        return self._static_response(request, "rfc6902.js")

    def _static_response(self, request: web.Request, name: str) -> web.Response:
        body, etag = self._static[name]
        headers = {
            "ETag": etag,
            "Cache-Control": "no-cache",
            "Content-Security-Policy": _DASHBOARD_CSP,
            "X-Content-Type-Options": "nosniff",
        }
        if etag_matches(request.headers.get("If-None-Match", ""), etag):
            return web.Response(status=304, headers=headers)
        return web.Response(
            body=body,
            content_type=_STATIC_FILES[name],
            charset="utf-8",
            headers=headers,
        )


def _load_static(name: str) -> tuple[bytes, str]:
    body = importlib.resources.files("sidecar").joinpath("static", name).read_bytes()
    return body, strong_etag(body)


def routes(hub: StateHub) -> list[web.RouteDef]:
    """The admin-port routes for ``hub``, stream before ``{model}``."""
    views = StateViews(hub)
    return [
        web.get("/state", views.handle_list),
        web.get("/state/stream", views.handle_stream, allow_head=False),
        # The lookahead keeps HEAD /state/stream from reaching handle_model.
        web.get("/state/{model:(?!stream$)[^/]+}", views.handle_model),
        web.get("/dashboard", views.handle_dashboard),
        web.get("/dashboard/dashboard.js", views.handle_dashboard_js),
        web.get("/dashboard/rfc6902.js", views.handle_rfc6902_js),
    ]


def attach(app: web.Application, hub: StateHub) -> None:
    """Add the routes to ``app`` and tie the hub's start and close to it.

    ``close`` runs in ``on_shutdown``, before aiohttp waits for handlers, so
    every stream receives ``shutdown`` and ends instead of being cut.
    """

    async def _start(_app: web.Application) -> None:
        await hub.start()

    async def _close(_app: web.Application) -> None:
        await hub.close()

    app.add_routes(routes(hub))
    app.on_startup.append(_start)
    app.on_shutdown.append(_close)
