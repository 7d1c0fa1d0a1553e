"""``/admin/models/by-hash/{sha256}``: serving indexed files by digest.

Owns the HTTP side of digest-addressed artifacts on both ports: turning the
request target into a digest (or a 400), picking an indexed file that still
holds those bytes (or a 404), the validators on every answer, and sending
the body with ``sendfile.send_span``. ``ArtifactServer.serve`` is also how
the upstream ingest answers from the store. Not here: the decision rules
(validators.py), when a file is re-hashed first (verify.py).

Every answer for a known digest carries ``ETag: "<sha256>"``, the file's
``Last-Modified``, ``Cache-Control: public, max-age=31536000, immutable``
(RFC 8246: the bytes under a digest never change) and ``Accept-Ranges:
bytes``; 200, 206 and HEAD add ``Content-Length``; 206 and 416 add
``Content-Range``. Errors are OpenAI-shaped JSON with ``Cache-Control:
no-store`` (a digest unknown now may be indexed a minute later).

Invariants:
- The target is parsed from ``request.raw_path``, percent-decoded once;
  only a segment that is then exactly 64 lower-case hex characters is
  looked up. Nothing from the request ever becomes a filesystem path: the
  files opened are the index's, through ``Roots.open``.
- Body bytes go out only under a record ``Verifier.check`` accepted for
  the open descriptor they are read from (the guarantee in verify.py).
- A 304 is decided from the index record alone, opening no file: it only
  confirms bytes the client holds, and a digest's bytes never change.
- Once headers are out, a failure closes the connection (the client sees
  a body shorter than Content-Length), never a second response.
- Descriptors opened in a worker thread are closed even when the client
  goes away (handler cancellation) while the thread still runs.

Known limitations: methods other than GET and HEAD get 400 with ``Allow``
(the error codes have no 405 yet). If-Match and If-Unmodified-Since are
ignored (validators.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import Final
from urllib.parse import unquote

from aiohttp import web

from sidecar import log
from sidecar.artifacts.digest import Digest, Fingerprint, fingerprint_fd
from sidecar.artifacts.index import DigestIndex, Record
from sidecar.artifacts.model import ArtifactsModel
from sidecar.artifacts.paths import OutsideRootsError, Roots
from sidecar.artifacts.sendfile import BodyCutError, cut_connection, send_span
from sidecar.artifacts.threads import in_thread
from sidecar.artifacts.validators import (
    Decision,
    Outcome,
    Representation,
    decide,
    format_http_date,
)
from sidecar.artifacts.verify import Verifier
from sidecar.errors import ErrorCode, error_body

BY_HASH_PREFIX: Final = "/admin/models/by-hash/"
IMMUTABLE: Final = "public, max-age=31536000, immutable"
_METHODS: Final = ("GET", "HEAD")
_STATUS: Final = {
    Outcome.FULL: 200, Outcome.PARTIAL: 206,
    Outcome.NOT_MODIFIED: 304, Outcome.UNSATISFIABLE: 416,
}  # fmt: skip


def digest_from_target(raw_target: str) -> Digest | None:
    """The digest a by-hash request target names, or None when malformed."""
    path = raw_target.split("?", 1)[0]
    if not path.startswith(BY_HASH_PREFIX):
        return None
    return Digest.parse(unquote(path[len(BY_HASH_PREFIX) :]))


def json_error(code: ErrorCode, message: str, **headers: str) -> web.Response:
    """An aiohttp error answer in the OpenAI shape that no cache keeps.

    Also the admin port's (``app.admin_error``); the data port's lean server
    has its own (``proxy.json_error``).
    """
    return web.Response(
        status=code.status,
        body=error_body(code, message),
        content_type="application/json",
        headers={"Cache-Control": "no-store", **headers},
    )


def validator_headers(digest: Digest, last_modified: int | None) -> dict[str, str]:
    """The headers every answer for a digest carries."""
    headers = {
        "ETag": digest.etag,
        "Cache-Control": IMMUTABLE,
        "Accept-Ranges": "bytes",
    }
    if last_modified is not None:
        headers["Last-Modified"] = format_http_date(last_modified)
    return headers


class ArtifactServer:
    """Answers by-hash requests from the digest index."""

    def __init__(
        self,
        index: DigestIndex,
        roots: Roots,
        verifier: Verifier,
        model: ArtifactsModel,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.index = index
        self.roots = roots
        self.verifier = verifier
        self.model = model
        self._clock = clock

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """The whole by-hash endpoint; never raises for a client's input."""
        if request.method not in _METHODS:
            self.model.served("malformed")
            return json_error(
                ErrorCode.BAD_REQUEST,
                f"{log.clip(request.method)} is not allowed here; use GET or HEAD",
                Allow="GET, HEAD",
            )
        digest = digest_from_target(request.raw_path)
        if digest is None:
            self.model.served("malformed")
            return json_error(
                ErrorCode.BAD_REQUEST,
                "expected /admin/models/by-hash/ and 64 lower-case hex digits",
            )
        response = await self.serve(request, digest)
        if response is None:
            self.model.served("not_found")
            return json_error(ErrorCode.NOT_FOUND, f"no artifact with sha256 {digest}")
        return response

    async def serve(
        self,
        request: web.BaseRequest,
        digest: Digest,
        extra_headers: Mapping[str, str] = {},
        *,
        age: bool = False,
    ) -> web.StreamResponse | None:
        """Answer from a file holding ``digest``; None when no file does.

        ``age`` adds ``Age`` (seconds since the file was written), for
        answers the sidecar gives as a cache hit (store blobs fetched from
        the upstream).
        """
        records = self.index.lookup(digest)
        if not records:
            return None
        # A 304 vouches only for bytes the client already holds, and bytes
        # under a digest never change: no file needs opening or checking.
        rep = self._representation(records[0].digest, records[0].fingerprint)
        if decide(request.method, request.headers, rep).outcome is Outcome.NOT_MODIFIED:
            self.model.served(Outcome.NOT_MODIFIED.value)
            return web.Response(
                status=304, headers=self._headers(rep, extra_headers, age)
            )
        for record in records:
            opened = await self._open(record)
            if opened is None:
                continue
            fd, fp = opened
            try:
                response = await self._answer(
                    request, record, fd, fp, extra_headers, age
                )
            finally:
                os.close(fd)
            if response is not None:
                return response
        return None

    async def _open(self, record: Record) -> tuple[int, Fingerprint] | None:
        """The record's file, open, with its fingerprint; None (and the
        record dropped) when it is gone or escapes the roots."""
        return await in_thread(self._open_sync, record, cleanup=_close_opened)

    def _open_sync(self, record: Record) -> tuple[int, Fingerprint] | None:
        try:
            fd = self.roots.open(record.path)
        except OutsideRootsError:
            log.artifacts.warning("artifacts.path_escaped", extra={"path": record.path})
        except OSError as exc:
            log.artifacts.info(
                "artifacts.file_gone",
                extra={
                    "path": record.path,
                    "digest": record.digest.short,
                    "error": str(exc),
                },
            )
        else:
            try:
                fp = fingerprint_fd(fd)
            except OSError:
                fp = None
            if fp is not None:
                return fd, fp
            os.close(fd)
        self.verifier.forget(record.path)
        return None

    async def _answer(
        self,
        request: web.BaseRequest,
        record: Record,
        fd: int,
        fp: Fingerprint,
        extra_headers: Mapping[str, str],
        age: bool,
    ) -> web.StreamResponse | None:
        rep = self._representation(record.digest, fp)
        decision = decide(request.method, request.headers, rep)
        body = request.method == "GET" and decision.outcome in (
            Outcome.FULL,
            Outcome.PARTIAL,
        )
        checked = await self.verifier.check(record, fd, fp, body=body and rep.size > 0)
        if checked is None:
            return None
        headers = self._headers(rep, extra_headers, age)
        if decision.outcome is Outcome.UNSATISFIABLE:
            self.model.served(decision.outcome.value)
            return json_error(
                ErrorCode.RANGE_NOT_SATISFIABLE,
                f"range not satisfiable for a {rep.size}-byte artifact",
                **{"Content-Range": f"bytes */{rep.size}", "Accept-Ranges": "bytes"},
            )
        return await self._send(request, decision, rep, fd, headers)

    async def _send(
        self,
        request: web.BaseRequest,
        decision: Decision,
        rep: Representation,
        fd: int,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=_STATUS[decision.outcome], headers=headers)
        outcome = decision.outcome.value
        if decision.outcome in (Outcome.FULL, Outcome.PARTIAL):
            response.content_type = "application/octet-stream"
            response.headers["X-Content-Type-Options"] = "nosniff"
            response.content_length = decision.count
            if decision.outcome is Outcome.PARTIAL:
                end = decision.start + decision.count - 1
                response.headers["Content-Range"] = (
                    f"bytes {decision.start}-{end}/{rep.size}"
                )
            if request.method == "HEAD":
                outcome = "head"
        sent = 0
        try:
            await response.prepare(request)
            if request.method == "GET" and decision.count:
                how = await send_span(
                    request, response, fd, decision.start, decision.count
                )
                sent = decision.count
                log.artifacts.debug(
                    "artifacts.served",
                    extra={
                        "digest": rep.digest.short,
                        "status": response.status,
                        "bytes": sent,
                        "via": how,
                    },
                )
        except (BodyCutError, ConnectionError) as exc:
            log.artifacts.debug(
                "artifacts.send_cut",
                extra={"digest": rep.digest.short, "error": str(exc)},
            )
            cut_connection(request, response)
        self.model.served(outcome, sent)
        return response

    def _representation(self, digest: Digest, fp: Fingerprint) -> Representation:
        # RFC 9110 8.8.2.1: never a Last-Modified later than the response's Date.
        last_modified = int(min(fp.mtime_ns // 1_000_000_000, self._clock()))
        return Representation(digest, fp.size, last_modified)

    def _headers(
        self, rep: Representation, extra: Mapping[str, str], age: bool
    ) -> dict[str, str]:
        headers = {**validator_headers(rep.digest, rep.last_modified), **extra}
        if age:
            headers["Age"] = str(max(0, int(self._clock()) - rep.last_modified))
        return headers


def _close_opened(opened: tuple[int, Fingerprint] | None) -> None:
    if opened is not None:
        os.close(opened[0])
