"""Upstream blobs named by digest: fetched once, verified, then kept locally.

Owns the data-port side of ``artifacts.upstream_patterns``: recognising a
request for a digest-addressed upstream path (a pattern with one
``{sha256}`` segment, such as ``/v2/blobs/sha256:{sha256}``), answering it
from the store when the blob is there, and otherwise one upstream fetch per
digest (``_Ingest``) that every concurrent request shares. Not here: the
store's layout (store.py), answering from a local file (serve.py), the
proxy's own forwarding (sidecar/proxy.py forwards what ``handle`` declines).

A fetch: GET upstream with the first request's headers (minus hop-by-hop,
Range, conditionals; ``Accept-Encoding: identity`` so the bytes are the
blob itself), written to ``.tmp-<digest>-*`` in the store while hashed, in
a worker thread. Every request for the digest, the first one included,
reads the temporary file as it grows and relays it (zero-copy when the
length is known); followers stream along, they do not wait. When the body
ends and the digest matches, the file is renamed to ``<sha256>`` and
indexed; later requests get it with the by-hash validators and
``X-Sidecar-Cache: hit``. A request with Range or If-Range waits for the
fetch to finish and is then answered from the store, so its 206 is cut from
verified bytes.

Invariants:
- No request ever receives the complete body of an unverified blob: while
  the fetch runs, the last byte (Content-Length known) or the final chunk
  (chunked) is held back; on a mismatch or a failure every request still
  streaming is cut, and one that has not started gets a 502/504 JSON error.
  The temporary file is deleted; nothing is kept.
- Upstream statuses other than 200 are relayed (status, headers and up to
  ``_RELAY_MAX_BYTES`` of body) to every request that joined, and nothing
  is stored.
- ``_inflight`` (digest -> fetch) is touched on the event loop only, with
  no await between its lookup and insert, so concurrent first requests
  make exactly one upstream call. It holds the strong reference to each
  fetch's task; a fetch outlives the requests that started it (a client
  that goes away does not abort it, so a resumed download finds the blob
  stored).

Known limitations: the first request's credentials fetch the blob for
every request that joins it and for every later one: a digest is treated
as a capability, as content-addressed stores do; do not list patterns for
blobs some clients must not read. HEAD for a blob not stored yet is left
to the proxy (no fetch is started). Redirects are followed upstream (up to
aiohttp's limit of 10). A Range request for a blob not stored yet waits for
the whole fetch before its first byte.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Final

import aiohttp
from aiohttp import web
from aiohttp.http import HttpVersion11
from yarl import URL

from sidecar import headers as hdrs
from sidecar import log
from sidecar.artifacts.digest import Digest, fingerprint_fd
from sidecar.artifacts.index import Record
from sidecar.artifacts.model import ArtifactsModel
from sidecar.artifacts.sendfile import BodyCutError, cut_connection, send_span
from sidecar.artifacts.serve import ArtifactServer, json_error, validator_headers
from sidecar.artifacts.store import Store, TempBlob
from sidecar.artifacts.threads import in_thread
from sidecar.artifacts.validators import none_match
from sidecar.errors import ErrorCode

_DIGEST_SLOT: Final = "{sha256}"
_RELAY_MAX_BYTES: Final = 1024 * 1024
_FLUSH_BYTES: Final = 4 * 1024 * 1024
# Never sent upstream: the fetch wants the whole, unencoded, unconditional blob.
_REQUEST_DROP: Final = frozenset({
    "range", "if-range", "if-match", "if-none-match", "if-modified-since",
    "if-unmodified-since", "accept-encoding",
})  # fmt: skip
_NOT_STORED: Final = {"X-Sidecar-Cache-Reason": "not_stored"}


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """A path pattern with one ``{sha256}`` segment as an anchored regex."""
    if pattern.count(_DIGEST_SLOT) != 1 or not pattern.startswith("/"):
        raise ValueError(f"expected a path with one {_DIGEST_SLOT}, got {pattern!r}")
    before, after = pattern.split(_DIGEST_SLOT)
    return re.compile(re.escape(before) + "(?P<sha256>[0-9a-f]{64})" + re.escape(after))


class _Ingest:
    """One upstream fetch of one digest and the state its readers follow.

    Mutated by its own task only; readers poll the fields after each
    ``changed`` event (replaced, never reset, so no wake-up is lost).
    """

    def __init__(self, digest: Digest) -> None:
        self.digest = digest
        self.status: int | None = None  # upstream status, once headers arrived
        self.length: int | None = None  # upstream Content-Length, if declared
        self.written = 0  # bytes in the temporary file, hashed
        self.blob: TempBlob | None = None  # readers dup its read_fd while it runs
        self.outcome: str | None = None  # one of model.INGEST_OUTCOMES, at the end
        self.error: tuple[ErrorCode, str] | None = None
        self.relay: web.Response | None = None
        self.changed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def notify(self) -> None:
        old, self.changed = self.changed, asyncio.Event()
        old.set()

    async def wait_until(self, ready: Callable[[], bool]) -> None:
        while not ready():
            await self.changed.wait()

    def sendable(self) -> int:
        """How many bytes a reader may send now (the tail waits for the verdict)."""
        if self.outcome == "stored" or self.length is None:
            return self.written
        return min(self.written, self.length - 1)


class UpstreamArtifacts:
    """Digest-addressed upstream paths, served through the store."""

    def __init__(
        self,
        *,
        patterns: Sequence[str],
        upstream_url: str,
        store: Store,
        server: ArtifactServer,
        model: ArtifactsModel,
        forwarded_mode: str = "none",
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 60.0,
        max_blob_bytes: int | None = None,
    ) -> None:
        self.patterns = [compile_pattern(p) for p in patterns]
        self.upstream_url = upstream_url.rstrip("/")
        self.store = store
        self.server = server
        self.model = model
        self.forwarded_mode = forwarded_mode
        self.max_blob_bytes = max_blob_bytes
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout_s, sock_read=read_timeout_s
        )
        self._session: aiohttp.ClientSession | None = None
        # digest -> fetch in flight; event loop only, see the module docstring.
        self._inflight: dict[Digest, _Ingest] = {}

    def match(self, raw_target: str) -> Digest | None:
        """The digest a request target names under a pattern, or None."""
        path = raw_target.split("?", 1)[0]
        for pattern in self.patterns:
            found = pattern.fullmatch(path)
            if found is not None:
                return Digest(found.group("sha256"))
        return None

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse | None:
        """Answer a digest-addressed request, or None to let the proxy forward it."""
        digest = (
            self.match(request.raw_path) if request.method in ("GET", "HEAD") else None
        )
        if digest is None:
            return None
        local = await self.server.serve(
            request, digest, {"X-Sidecar-Cache": "hit"}, age=True
        )
        if local is not None or request.method == "HEAD":
            return local
        if none_match(request.headers, digest):
            headers = {**validator_headers(digest, None), "X-Sidecar-Cache": "hit"}
            return web.Response(status=304, headers=headers)
        ingest = self._inflight.get(digest)
        role = "coalesced" if ingest is not None else "miss"
        if ingest is None:
            ingest = self._start(request, digest)
        else:
            self.model.ingest_joined()
        if "Range" in request.headers or "If-Range" in request.headers:
            return await self._after(request, ingest, role)
        return await self._stream(request, ingest, role)

    def _start(self, request: web.BaseRequest, digest: Digest) -> _Ingest:
        ingest = _Ingest(digest)
        fields = [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in hdrs.request_headers(
                request.raw_headers,
                peer=request.remote,
                host=request.host,
                mode=self.forwarded_mode,
            )
            if name.decode("latin-1").lower() not in _REQUEST_DROP
        ]
        fields.append(("Accept-Encoding", "identity"))
        url = URL(self.upstream_url + request.raw_path, encoded=True)
        ingest.task = asyncio.get_running_loop().create_task(
            self._fetch(ingest, url, fields)
        )
        self._inflight[digest] = ingest
        self.model.ingest_started()
        return ingest

    # -- the fetch --------------------------------------------------------------

    async def _fetch(
        self, ingest: _Ingest, url: URL, fields: list[tuple[str, str]]
    ) -> None:
        outcome = "failed"
        try:
            async with self._client().get(url, headers=fields) as upstream:
                if upstream.status != 200:
                    ingest.relay = await _relay(upstream)
                    ingest.status = upstream.status
                    outcome = "upstream_status"
                    return
                ingest.blob = await in_thread(
                    self.store.create_temp, ingest.digest, cleanup=_discard
                )
                ingest.length = upstream.content_length
                ingest.status = 200
                ingest.notify()
                actual = await self._receive(ingest, upstream)
            if actual != ingest.digest:
                outcome = "mismatch"
                ingest.error = (
                    ErrorCode.UPSTREAM_FAILED,
                    f"upstream bytes do not match sha256 {ingest.digest}",
                )
                log.artifacts.warning(
                    "artifacts.ingest_mismatch",
                    extra={
                        "digest": ingest.digest.short,
                        "actual": actual.short,
                        "bytes": ingest.written,
                    },
                )
                return
            await in_thread(self._publish, ingest.blob)
            outcome = "stored"
            log.artifacts.info(
                "artifacts.ingest_stored",
                extra={"digest": ingest.digest.short, "bytes": ingest.written},
            )
        except (aiohttp.ClientError, OSError, TimeoutError, _TooLargeError) as exc:
            ingest.error = _fetch_error(exc)
            log.artifacts.warning(
                "artifacts.ingest_failed",
                extra={"digest": ingest.digest.short, "error": ingest.error[1]},
            )
        finally:
            if ingest.blob is not None:
                await in_thread(ingest.blob.discard)  # a no-op once published
            self._finish(ingest, outcome)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                auto_decompress=False,
                trust_env=False,
                read_bufsize=_FLUSH_BYTES,
            )
        return self._session

    async def _receive(
        self, ingest: _Ingest, upstream: aiohttp.ClientResponse
    ) -> Digest:
        """Write the body to the temporary file while hashing it; its digest."""
        assert ingest.blob is not None
        hasher = hashlib.sha256()
        while chunk := await upstream.content.readany():
            parts = [chunk]
            size = len(chunk)
            # Take what else already arrived, so each thread hop moves a lot.
            while size < _FLUSH_BYTES and (
                more := upstream.content.read_nowait(_FLUSH_BYTES - size)
            ):
                parts.append(more)
                size += len(more)
            if (
                self.max_blob_bytes is not None
                and ingest.written + size > self.max_blob_bytes
            ):
                raise _TooLargeError
            await in_thread(_write_and_hash, ingest.blob, hasher, b"".join(parts))
            ingest.written += size
            ingest.notify()
        return Digest(hasher.hexdigest())

    def _publish(self, blob: TempBlob) -> None:
        path = blob.publish()
        assert blob.read_fd is not None
        fp = fingerprint_fd(blob.read_fd)  # after the rename, which moves ctime
        assert fp is not None
        self.server.verifier.note_published(Record(path, blob.digest, fp, time.time()))

    def _finish(self, ingest: _Ingest, outcome: str) -> None:
        # Same loop tick: from here on new requests find the store or start anew.
        ingest.outcome = outcome
        self._inflight.pop(ingest.digest, None)
        if ingest.blob is not None:
            ingest.blob.close_read()
        ingest.notify()
        self.model.ingest_finished(outcome)

    # -- the readers -------------------------------------------------------------

    async def _stream(
        self, request: web.BaseRequest, ingest: _Ingest, role: str
    ) -> web.StreamResponse:
        await ingest.wait_until(
            lambda: ingest.status is not None or ingest.outcome is not None
        )
        short_http10 = ingest.length is None and request.version < HttpVersion11
        read_fd = ingest.blob.read_fd if ingest.blob is not None else None
        if ingest.status != 200 or read_fd is None or short_http10:
            # HTTP/1.0 without a length cannot tell a cut from the end: wait.
            return await self._after(request, ingest, role)
        fd = os.dup(read_fd)
        try:
            await ingest.wait_until(
                lambda: ingest.sendable() > 0 or ingest.outcome is not None
            )
            if ingest.outcome is not None and ingest.outcome != "stored":
                return self._error(ingest)
            return await self._relay_growing(request, ingest, fd, role)
        finally:
            os.close(fd)

    async def _relay_growing(
        self, request: web.BaseRequest, ingest: _Ingest, fd: int, role: str
    ) -> web.StreamResponse:
        headers = {
            **validator_headers(ingest.digest, None),
            "X-Sidecar-Cache": role,
            **_NOT_STORED,
            "Content-Type": "application/octet-stream",
        }
        response = web.StreamResponse(status=200, headers=headers)
        if ingest.length is not None:
            response.content_length = ingest.length
        else:
            response.enable_chunked_encoding()
        sent = 0
        try:
            await response.prepare(request)
            while True:
                limit = ingest.sendable()
                if ingest.outcome not in (None, "stored"):
                    raise BodyCutError(f"fetch ended: {ingest.outcome}")
                if limit > sent:
                    await send_span(request, response, fd, sent, limit - sent)
                    sent = limit
                elif ingest.outcome == "stored":
                    await response.write_eof()
                    break
                else:
                    await ingest.wait_until(_past(ingest, sent))
        except (BodyCutError, ConnectionError) as exc:
            log.artifacts.debug(
                "artifacts.ingest_reader_cut",
                extra={"digest": ingest.digest.short, "sent": sent, "error": str(exc)},
            )
            cut_connection(request, response)
        self.model.served("full", sent)
        return response

    async def _after(
        self, request: web.BaseRequest, ingest: _Ingest, role: str
    ) -> web.StreamResponse:
        """Wait for the fetch to end, then answer from the store or with its error."""
        await ingest.wait_until(lambda: ingest.outcome is not None)
        if ingest.outcome == "stored":
            extra = {"X-Sidecar-Cache": role, **_NOT_STORED}
            served = await self.server.serve(request, ingest.digest, extra)
            if served is not None:
                return served
        return self._error(ingest)

    def _error(self, ingest: _Ingest) -> web.StreamResponse:
        if ingest.relay is not None:
            return _copy_relay(ingest.relay)
        code, message = ingest.error or (
            ErrorCode.UPSTREAM_FAILED,
            "the upstream fetch failed",
        )
        return json_error(
            code,
            message,
            **{"X-Sidecar-Cache": "bypass", "X-Sidecar-Cache-Reason": "upstream_error"},
        )

    async def close(self) -> None:
        """Abort fetches in flight (their temporary files are removed)."""
        tasks = [i.task for i in self._inflight.values() if i.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()


def _past(ingest: _Ingest, sent: int) -> Callable[[], bool]:
    """A wait condition: more is sendable than ``sent``, or the fetch ended."""
    return lambda: ingest.sendable() > sent or ingest.outcome is not None


class _TooLargeError(Exception):
    """The blob passed ``max_blob_bytes``."""


def _fetch_error(exc: BaseException) -> tuple[ErrorCode, str]:
    if isinstance(exc, TimeoutError):
        return ErrorCode.UPSTREAM_TIMEOUT, "the upstream timed out sending the blob"
    if isinstance(exc, _TooLargeError):
        return ErrorCode.UPSTREAM_FAILED, "the upstream blob exceeds the size limit"
    if isinstance(exc, OSError) and not isinstance(exc, aiohttp.ClientError):
        return ErrorCode.UPSTREAM_FAILED, "the blob could not be written to the store"
    return ErrorCode.UPSTREAM_FAILED, f"the upstream fetch failed: {type(exc).__name__}"


def _write_and_hash(blob: TempBlob, hasher: hashlib._Hash, data: bytes) -> None:
    blob.write(data)
    hasher.update(data)


def _discard(blob: TempBlob) -> None:
    """Undo a temporary file created for a fetch cancelled meanwhile."""
    blob.discard()
    blob.close_read()


async def _relay(upstream: aiohttp.ClientResponse) -> web.Response:
    """The upstream's non-200 answer as a response any number of readers can copy."""
    body = b""
    while len(body) < _RELAY_MAX_BYTES:
        chunk = await upstream.content.read(_RELAY_MAX_BYTES - len(body))
        if not chunk:
            break
        body += chunk
    headers, _ = hdrs.response_headers(list(upstream.raw_headers))
    headers["X-Sidecar-Cache"] = "bypass"
    headers["X-Sidecar-Cache-Reason"] = "upstream_error"
    return web.Response(
        status=upstream.status, reason=upstream.reason, body=body, headers=headers
    )


def _copy_relay(relay: web.Response) -> web.Response:
    body = relay.body
    assert isinstance(body, bytes)
    return web.Response(
        status=relay.status,
        reason=relay.reason,
        body=body,
        headers=relay.headers.copy(),
    )
