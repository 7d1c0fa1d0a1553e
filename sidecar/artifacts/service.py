"""``Artifacts``: the digest-addressed artifact subsystem as one object to wire in.

Owns construction and lifecycle: from plain values (the manifest's
``artifacts.dirs`` and ``artifacts.upstream_patterns``, the data dir, the
upstream URL, metric callbacks) it builds the store, index, verifier,
scanner, by-hash server and upstream ingest, starts the background scan
and closes everything in order. Not here: what each part does (see their
modules); building the aiohttp apps and the proxy (sidecar/app.py,
sidecar/proxy.py call the methods below).

Wiring:

- admin app: ``app.router.add_routes(artifacts.routes())``;
- data port: before the proxy pipeline, answer
  ``artifacts.is_by_hash(request.raw_path)`` with
  ``await artifacts.handle(request)``, then try
  ``await artifacts.handle_upstream(request)`` and forward as usual when it
  returns None;
- lifecycle: ``await artifacts.start()`` before serving,
  ``await artifacts.close()`` after the listeners closed;
- read model ``artifacts``: ``artifacts.model`` (``version``, ``snapshot()``).

Invariants: ``start`` returns once the persisted index is loaded (blocking
work in a thread), so files indexed by an earlier run or by
``sidecar artifacts index`` are served at once while the scan runs on.
Before ``start`` and after ``close`` by-hash requests get 503.

Known limitations: a manifest reload does not change the folders or
patterns; they are read at start-up.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp import web

from sidecar import log
from sidecar.artifacts.index import INDEX_FILE, DigestIndex
from sidecar.artifacts.ingest import UpstreamArtifacts
from sidecar.artifacts.model import ArtifactCounters, ArtifactsModel
from sidecar.artifacts.paths import Roots
from sidecar.artifacts.scan import DEFAULT_RESCAN_INTERVAL_S, Scanner
from sidecar.artifacts.serve import BY_HASH_PREFIX, ArtifactServer, json_error
from sidecar.artifacts.store import Store
from sidecar.artifacts.verify import DEFAULT_REVERIFY_AFTER_S, Verifier
from sidecar.errors import ErrorCode

STORE_DIR = "artifacts"


@dataclass(frozen=True, slots=True)
class ArtifactOptions:
    """Tuning that is not in the manifest; the defaults suit production."""

    verify_on_first_serve: bool = True
    reverify_after_s: float = DEFAULT_REVERIFY_AFTER_S
    rescan_interval_s: float = DEFAULT_RESCAN_INTERVAL_S
    background_scan: bool = True  # False: passes run only on ``scanner.scan_now()``
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    max_blob_bytes: int | None = None
    forwarded_mode: str = "none"


class _Parts:
    """The started subsystem; exists only between ``start`` and ``close``."""

    def __init__(
        self,
        index: DigestIndex,
        scanner: Scanner,
        server: ArtifactServer,
        ingest: UpstreamArtifacts | None,
    ) -> None:
        self.index = index
        self.scanner = scanner
        self.server = server
        self.ingest = ingest


class Artifacts:
    """Digest-addressed artifacts for one sidecar."""

    def __init__(
        self,
        *,
        dirs: Sequence[str],
        data_dir: str | os.PathLike[str],
        upstream_url: str | None = None,
        upstream_patterns: Sequence[str] = (),
        counters: ArtifactCounters | None = None,
        options: ArtifactOptions = ArtifactOptions(),
    ) -> None:
        self.dirs = tuple(dirs)
        self.store_dir = os.path.join(os.fspath(data_dir), STORE_DIR)
        self.upstream_url = upstream_url
        self.upstream_patterns = tuple(upstream_patterns)
        self.options = options
        self.model = ArtifactsModel(counters)
        self._parts: _Parts | None = None

    @property
    def server(self) -> ArtifactServer | None:
        return self._parts.server if self._parts is not None else None

    @property
    def scanner(self) -> Scanner | None:
        return self._parts.scanner if self._parts is not None else None

    async def start(self) -> None:
        """Load the index, then scan the folders in the background."""
        self.model.bind_loop(asyncio.get_running_loop())
        store, index, roots = await asyncio.to_thread(self._open)
        opts = self.options
        verifier = Verifier(
            index,
            store,
            self.model,
            verify_on_first_serve=opts.verify_on_first_serve,
            reverify_after_s=opts.reverify_after_s,
        )
        scanner = Scanner(verifier, roots, rescan_interval_s=opts.rescan_interval_s)
        server = ArtifactServer(index, roots, verifier, self.model)
        ingest = None
        if self.upstream_patterns and self.upstream_url:
            ingest = UpstreamArtifacts(
                patterns=self.upstream_patterns,
                upstream_url=self.upstream_url,
                store=store,
                server=server,
                model=self.model,
                forwarded_mode=opts.forwarded_mode,
                connect_timeout_s=opts.connect_timeout_s,
                read_timeout_s=opts.read_timeout_s,
                max_blob_bytes=opts.max_blob_bytes,
            )
        self._parts = _Parts(index, scanner, server, ingest)
        self.model.set_index(*index.totals())
        if opts.background_scan:
            scanner.start()
        log.artifacts.info(
            "artifacts.started",
            extra={
                "dirs": len(roots.dirs),
                "files": index.totals()[0],
                "patterns": len(self.upstream_patterns),
            },
        )

    def _open(self) -> tuple[Store, DigestIndex, Roots]:
        store = Store(self.store_dir)
        removed = store.remove_temps()
        if removed:
            log.artifacts.info("artifacts.temps_removed", extra={"count": removed})
        roots = Roots.resolve(self.dirs, store.root)
        index = DigestIndex(os.path.join(store.root, INDEX_FILE))
        index.load(roots.contains)
        return store, index, roots

    def routes(self) -> list[web.RouteDef]:
        """The by-hash routes, for the admin Application."""
        prefix = BY_HASH_PREFIX.rstrip("/")
        return [
            web.route("*", prefix, self.handle),
            web.route("*", prefix + "/{tail:.*}", self.handle),
        ]

    @staticmethod
    def is_by_hash(raw_target: str) -> bool:
        """Whether a data-port request target belongs to the by-hash endpoint."""
        path = raw_target.split("?", 1)[0]
        return path.startswith(BY_HASH_PREFIX) or path == BY_HASH_PREFIX.rstrip("/")

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """``/admin/models/by-hash/{sha256}`` on either port."""
        if self._parts is None:
            return json_error(
                ErrorCode.OVERLOADED,
                "the artifact index is not loaded",
                **{"Retry-After": "1"},
            )
        return await self._parts.server.handle(request)

    async def handle_upstream(
        self, request: web.BaseRequest
    ) -> web.StreamResponse | None:
        """A digest-addressed upstream path answered here, or None to forward."""
        if self._parts is None or self._parts.ingest is None:
            return None
        return await self._parts.ingest.handle(request)

    async def close(self) -> None:
        parts, self._parts = self._parts, None
        if parts is None:
            return
        if parts.ingest is not None:
            await parts.ingest.close()
        await parts.scanner.close()
        await parts.server.verifier.close()
        await asyncio.to_thread(parts.index.close)
