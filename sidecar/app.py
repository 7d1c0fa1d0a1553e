"""The running sidecar: both ports, their handlers, lifecycle and signals.

Owns: building every part from a manifest and wiring them together (the
pipeline's stages in order, the read models and their producers, the
artifact service), binding the data port (the lean server in sidecar/http/)
and the admin port (aiohttp), readiness, reloading the manifest (SIGHUP and
``POST /admin/policy/reload``), and the drain on SIGTERM. Not here: what
happens to a request (proxy.py and the stages), what the manifest means
(manifest.py).

Lifecycle on SIGTERM (or ``Sidecar.drain()``):
1. ``/readyz`` turns false at once, so the orchestrator stops routing here;
2. new connections are still accepted for ``listen.drain_delay`` (endpoints
   take a moment to update; refusing them earlier drops requests);
3. the listeners close; keep-alive connections close once idle; in-flight
   requests get ``listen.grace`` to finish;
4. streams still running then are ended cleanly (a complete chunked
   message, not a reset), and the process exits 0.
The defaults (1 s + 20 s) stay well inside Kubernetes' 30 s grace period.

Admin safety: bound beyond loopback, the admin port refuses to start
without a token; mutating admin calls always need ``Authorization: Bearer
<token>``, compared in constant time, and are refused outright while no
token is configured.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from sidecar import log, state
from sidecar.artifacts import ArtifactCounters, ArtifactOptions, Artifacts
from sidecar.artifacts.ingest import compile_pattern
from sidecar.artifacts.serve import json_error
from sidecar.balance import Balancer
from sidecar.cache.compress import Compressor
from sidecar.cache.hits import QuickHits
from sidecar.cache.stage import CacheStage
from sidecar.cache.store import AsyncDiskStore, StoreError
from sidecar.cache.tiers import TieredCache
from sidecar.coalesce import Coalescer
from sidecar.environment import Environment
from sidecar.errors import ErrorCode, ManifestError, SidecarError
from sidecar.http import HTTPServer
from sidecar.limits import UpstreamLimiter
from sidecar.manifest import Manifest, Router, is_loopback, load_manifest, split_host_port
from sidecar.metrics import Metrics
from sidecar.prompt import PromptRewriter, TokenMeter, scopes_salt
from sidecar.proxy import Exchange, Forwarder, Next, Proxy, Reply, Stage
from sidecar.scope import Scopes, load_secret
from sidecar.upstream import Upstream

# The readiness probe says who it is, so upstream logs (and test fakes) can
# tell it from client traffic.
_PROBE_HEADERS = [(b"User-Agent", b"sidecar-health/0.1")]


class StartupError(SidecarError):
    """The sidecar cannot start with this configuration; the message says why."""


class Sidecar:
    """One sidecar process: a manifest, two listeners, and their state."""

    def __init__(
        self,
        manifest: Manifest,
        *,
        data_dir: str | os.PathLike[str],
        reload_manifest: Callable[[], Manifest] | None = None,
    ) -> None:
        self.manifest = manifest
        self.data_dir = Path(data_dir)
        self._reload_manifest = reload_manifest
        self.metrics = Metrics()
        # One pool per replica; the first is the default for every request a
        # stage does not send elsewhere.
        self.upstreams = self._make_upstreams(manifest)
        self.upstream = self.upstreams[0]
        self.proxy = Proxy(
            router=Router(manifest.routes),
            forwarder=Forwarder(
                self.upstream, manifest.listen.forwarded, manifest.limits.max_body_bytes
            ),
            stages=[],
            max_body_bytes=manifest.limits.max_body_bytes,
            max_header_bytes=manifest.limits.max_header_bytes,
            observe=self._observe,
        )
        self.scopes = Scopes(
            load_secret(manifest.scopes.secret, self.data_dir),
            manifest.scopes.credential_headers,
        )
        self.environment = Environment(manifest.upstream.kind, _output_fields(manifest))
        self.cache = TieredCache(
            self.metrics,
            max_entries=manifest.cache.memory.max_entries,
            max_bytes=manifest.cache.memory.max_bytes,
            disk=None,
            open_disk=self._open_disk if manifest.cache.disk.enabled else None,
            reopen_interval_s=manifest.fallbacks.reopen_interval,
        )
        self.quick_hits = QuickHits(
            self.cache.memory,
            environment=self.environment,
            credential_headers=manifest.scopes.credential_headers,
            on_hits=self._observe_quick_hits,
            max_entries=manifest.cache.memory.max_entries,
            max_header_bytes=manifest.limits.max_header_bytes,
            fold_by_itself=False,  # the data port folds after its writes
        )
        self.quick_hits.reset(_significant_headers(manifest))
        self.cache_stage = CacheStage(
            self.cache,
            scopes=self.scopes,
            environment=self.environment,
            metrics=self.metrics,
            max_entry_bytes=manifest.cache.max_entry_bytes,
            max_body_bytes=manifest.limits.max_body_bytes,
        )
        self.cache_stage.hits = self.quick_hits
        c = manifest.coalescing
        self.coalescer = Coalescer(
            self.metrics,
            enabled=c.enabled,
            follower_timeout_s=c.follower_timeout,
            max_waiters=c.max_waiters,
            max_keys=c.max_keys,
            hit_for_miss_s=c.hit_for_miss,
            max_buffer_bytes=manifest.cache.max_entry_bytes,
            credential_headers=manifest.scopes.credential_headers,
        )
        self.rewriter = PromptRewriter(
            manifest.prompt_cache.mode,
            manifest.upstream.kind,
            scopes_salt(self.scopes),
            max_body_bytes=manifest.limits.max_body_bytes,
        )
        self.token_meter = TokenMeter(
            self.metrics, on_tokens=self._on_tokens,
            max_json_bytes=manifest.cache.max_entry_bytes,
        )
        self.balancer = self._make_balancer(manifest)
        lim = manifest.limits
        self.limiter = UpstreamLimiter(
            self.metrics,
            max_in_flight=lim.upstream_in_flight,
            max_queue=lim.upstream_queue,
            queue_timeout_s=lim.queue_timeout,
        )
        self._build_state(manifest)
        self.artifacts = Artifacts(
            dirs=manifest.artifacts.dirs,
            data_dir=self.data_dir,
            upstream_url=manifest.upstream_urls[0],
            upstream_patterns=manifest.artifacts.upstream_patterns,
            counters=self._artifact_counters(),
            options=ArtifactOptions(forwarded_mode=str(manifest.listen.forwarded)),
        )
        self._artifact_patterns = [
            compile_pattern(p) for p in manifest.artifacts.upstream_patterns
        ]
        self.proxy.set_stages(self._stages(), self._passthrough_stages())
        self.started_at = time.time()
        self.draining = False
        self.upstream_ok = False
        self.data_address: tuple[str, int] | None = None
        self.admin_address: tuple[str, int] | None = None
        self._runners: list[web.BaseRunner] = []
        self._data_server: HTTPServer | None = None
        # The admin port, for by-hash requests the data port passes on.
        self._admin_hop: Upstream | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopped = asyncio.Event()
        self._drained = asyncio.Event()

    # -- construction ---------------------------------------------------------

    @staticmethod
    def _make_upstreams(manifest: Manifest) -> list[Upstream]:
        u = manifest.upstream
        return [
            Upstream(
                url,
                connect_timeout_s=u.connect_timeout,
                first_byte_timeout_s=u.first_byte_timeout,
                idle_timeout_s=u.idle_timeout,
                pool_size=u.pool_size,
                pool_idle_s=u.pool_idle,
            )
            for url in manifest.upstream_urls
        ]

    def _stages(self) -> list[Stage]:
        """The pipeline, in order (see proxy.py for what a stage may do).

        The rewrite comes first so the action key covers the body as sent;
        the record stage sits after the coalescer so a flight is stored once;
        token accounting reads every upstream answer; the balancer picks the
        replica and the limiter guards the upstream last, just before the
        forwarder.
        """
        stages: list[Stage] = [
            self._artifact_stage,
            self.rewriter,
            self.cache_stage.lookup,
            self.coalescer,
            self.cache_stage.record,
            self.token_meter,
        ]
        if self.balancer is not None:
            stages.append(self.balancer)
        stages.append(self.limiter)
        return stages

    def _passthrough_stages(self) -> list[Stage]:
        """The pipeline for routes no guardrail reads: artifacts, replica, limit."""
        stages: list[Stage] = [self._artifact_stage]
        if self.balancer is not None:
            stages.append(self.balancer)
        stages.append(self.limiter)
        return stages

    def _make_balancer(self, manifest: Manifest) -> Balancer | None:
        if len(self.upstreams) < 2:
            return None
        return Balancer(
            self.upstreams, kind=manifest.upstream.kind,
            max_body_bytes=manifest.limits.max_body_bytes,
        )

    def _build_state(self, manifest: Manifest) -> None:
        """The read models, their producers' hooks, and the hub publishing them."""
        s = manifest.state
        self.hub = state.StateHub(
            coalesce_s=s.coalesce, idle_publish_s=s.idle_publish, replay=s.replay,
            subscriber_queue=s.subscriber_queue, retry_s=s.retry,
            max_subscribers=manifest.limits.sse_subscribers,
            on_subscribers=lambda n: self.metrics.sse_subscribers.set({}, n),
        )
        self.cache_model = state.CacheModel()
        self.routes_model = state.RoutesModel()
        self.coalescing_model = state.CoalescingModel()
        self.policy_model = state.PolicyModel(manifest, manifest.digest, manifest.source)
        url = manifest.upstream_urls[0]
        self.upstream_model = state.UpstreamModel(manifest.upstream.kind, url)
        self.poller = state.UpstreamPoller(
            self.upstream_model, url, manifest.upstream.kind,
            interval_s=manifest.upstream.poll_interval,
        )
        self.coalescer.on_event = self.coalescing_model.record  # type: ignore[assignment]
        for name, model in (
            ("cache", self.cache_model), ("routes", self.routes_model),
            ("coalescing", self.coalescing_model), ("upstream", self.upstream_model),
            ("policy", self.policy_model),
        ):
            self.hub.register(name, model)

    def _artifact_counters(self) -> ArtifactCounters:
        m = self.metrics
        return ArtifactCounters(
            requests=lambda outcome: m.artifact_requests.inc({"outcome": outcome}),
            bytes_served=lambda n: m.artifact_bytes_served.add({}, n),
            quarantined=lambda reason: m.artifact_quarantined.inc({"reason": reason}),
            hashed_bytes=lambda n: m.artifact_hashed_bytes.add({}, n),
            ingests=lambda outcome: m.artifact_ingests.inc({"outcome": outcome}),
        )

    async def _artifact_stage(self, ex: Exchange, nxt: Next) -> Reply:
        """Pass digest-addressed requests to the admin port, which serves them.

        The artifact handlers stream files with sendfile on aiohttp's
        transports; the data port runs the lean server, so it forwards these
        requests over loopback to the admin port's same paths and relays the
        answer. Zero-copy holds on the admin port; on the data port the bytes
        cross Python once more.
        """
        path = ex.request.raw_path
        if self._admin_hop is not None and (
            self.artifacts.is_by_hash(path) or self._upstream_artifact(path)
        ):
            ex.upstream = self._admin_hop
            return await self.proxy.forwarder(ex)
        return await nxt(ex)

    def _upstream_artifact(self, raw_target: str) -> bool:
        path = raw_target.split("?", 1)[0]
        return any(p.fullmatch(path) for p in self._artifact_patterns)

    async def _admin_upstream_artifact(self, request: web.Request) -> web.StreamResponse:
        answered = await self.artifacts.handle_upstream(request)
        if answered is None:
            return admin_error(ErrorCode.NOT_FOUND, "not a digest-addressed upstream path")
        return answered

    def _on_tokens(self, route: str, replica: str, reused: int, evaluated: int) -> None:
        self.routes_model.add_prompt_tokens(route, reused, evaluated)
        self.upstream_model.add_prompt_tokens(replica, reused, evaluated)

    async def _state_upkeep(self) -> None:
        """Gauges that no request event moves: tier sizes, waiters."""
        while True:
            await asyncio.sleep(max(self.manifest.state.coalesce, 1.0))
            stats = await self.cache.refresh_gauges()
            memory = stats["memory"]
            self.cache_model.set_tier(
                "memory", entries=memory.get("entries"), bytes=memory.get("weight"),
                evictions=memory.get("evictions"),
            )
            disk = stats["disk"]
            if disk and "entries" in disk:
                self.cache_model.set_tier(
                    "disk", entries=disk["entries"], bytes=disk["bytes"],
                    evictions=disk.get("evictions"),
                )
            self.coalescing_model.set_waiters(self.coalescer.waiters)
            if self.balancer is not None:
                self.upstream_model.update(replicas=self.balancer.snapshot())

    async def _open_disk(self) -> AsyncDiskStore | None:
        m = self.manifest
        c = m.cache.compression
        compressor = (
            Compressor(level=c.level, dict_size=c.dict_size,
                       min_samples=c.train_samples, train=c.dictionaries)
            if c.enabled else None
        )
        return await AsyncDiskStore.open(
            self.data_dir / m.cache.disk.path,
            m.fallbacks.disk,
            max_bytes=m.cache.disk.max_bytes,
            max_entry_bytes=m.cache.max_entry_bytes,
            compressor=compressor,
        )

    def _admin_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/admin/policy/reload", self._admin_reload)
        app.router.add_get("/admin/cache/stats", self._admin_cache_stats)
        app.router.add_post("/admin/cache/purge", self._admin_cache_purge)
        app.router.add_routes(self.artifacts.routes())
        for pattern in self.manifest.artifacts.upstream_patterns:
            app.router.add_route("*", pattern, self._admin_upstream_artifact)
        state.attach(app, self.hub)
        return app

    # -- running --------------------------------------------------------------

    async def start(self) -> None:
        m = self.manifest
        data_host, data_port = split_host_port(m.listen.data)
        admin_host, admin_port = split_host_port(m.admin.listen)
        if not is_loopback(admin_host) and not m.admin.token:
            raise StartupError(
                f"the admin port would listen on {m.admin.listen}, beyond loopback,"
                " without an admin token: set SIDECAR_ADMIN_TOKEN (or admin.token)"
                " or bind admin.listen to 127.0.0.1"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if m.cache.disk.enabled:
            try:
                self.cache.disk = await self._open_disk()
            except StoreError as exc:
                raise StartupError(
                    f"the disk cache cannot be opened ({exc}) and fallbacks.disk is"
                    " fail: fix or remove the directory, or choose memory_only"
                ) from None
        self._spawn(self.cache.upkeep_forever(), "cache-upkeep")
        await self.artifacts.start()
        self.hub.register("artifacts", self.artifacts.model)
        await self.poller.start()
        if self.balancer is not None:
            self.balancer.start()
        self._spawn(self._state_upkeep(), "state-upkeep")
        self._data_server = HTTPServer(
            self.proxy.handle,
            max_header_bytes=m.limits.max_header_bytes,
            quick=self.quick_hits.answer,
            after_quick=self.quick_hits.fold,
        )
        admin_runner = web.AppRunner(self._admin_app(), shutdown_timeout=1.0,
                                     handler_cancellation=True)
        await admin_runner.setup()
        self._runners = [admin_runner]
        try:
            admin_site = web.TCPSite(admin_runner, admin_host, admin_port)
            await admin_site.start()
            self.admin_address = _bound(admin_site)
            self.data_address = await self._data_server.start(data_host, data_port)
        except OSError as exc:
            await self._cleanup_runners()
            raise StartupError(f"cannot listen: {exc.strerror or exc}") from None
        hop_host = self.admin_address[0]
        if hop_host in ("0.0.0.0", "::"):
            hop_host = "127.0.0.1" if hop_host == "0.0.0.0" else "::1"
        hop_host = f"[{hop_host}]" if ":" in hop_host else hop_host
        self._admin_hop = Upstream(f"http://{hop_host}:{self.admin_address[1]}")
        self._spawn(self._health_loop(), "health")
        log.server.info(
            "sidecar.listening",
            extra={
                "data": "{}:{}".format(*self.data_address),
                "admin": "{}:{}".format(*self.admin_address),
                "upstream": ",".join(m.upstream_urls),
                "manifest": m.source,
                "digest": m.digest[:12],
            },
        )

    def _spawn(self, coro: Any, name: str) -> None:
        # Strong references to background tasks: the loop keeps only weak ones.
        task = asyncio.create_task(coro, name=f"sidecar.{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _health_loop(self) -> None:
        path = "/health" if self.manifest.upstream.kind == "llama.cpp" else "/v1/models"
        while not self.draining:
            ok = False
            try:
                resp = await self.upstream.request("GET", path, _PROBE_HEADERS, probe=True)
                async with resp:
                    async for _ in resp.iter_chunks():
                        pass
                # Any answer proves the upstream is reachable; llama.cpp's
                # /health answers 503 while the model loads, which is not ready.
                ok = resp.status < 500
            except SidecarError:
                ok = False
            if ok:
                await self.environment.refresh(self.upstream)
            if ok != self.upstream_ok:
                log.upstream.info("upstream.health_changed", extra={"ok": ok})
            self.upstream_ok = ok
            await asyncio.sleep(self.manifest.upstream.health_interval if ok else 1.0)

    async def serve_until_signalled(self) -> None:
        """Run until SIGTERM/SIGINT (then drain) ; SIGHUP reloads the manifest."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_term)
        loop.add_signal_handler(signal.SIGINT, self._on_term)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        await self._stopped.wait()

    def _on_term(self) -> None:
        if not self.draining:
            self._spawn(self.drain(), "drain")

    async def drain(self) -> None:
        """Stop gracefully: see the module docstring for the steps."""
        self.draining = True
        self.proxy.draining = True
        self.quick_hits.enabled = False
        listen = self.manifest.listen
        log.server.info(
            "sidecar.draining",
            extra={"in_flight": self.proxy.in_flight, "grace_s": listen.grace},
        )
        await asyncio.sleep(listen.drain_delay)
        if self._data_server is not None:
            self._data_server.stop_accepting()
            self._data_server.close_idle()
        deadline = time.monotonic() + listen.grace
        while self.proxy.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.proxy.in_flight:
            log.server.warning(
                "sidecar.grace_expired", extra={"closing": self.proxy.in_flight}
            )
            self.proxy.end_streams()
            end = time.monotonic() + 1.0
            while self.proxy.in_flight and time.monotonic() < end:
                await asyncio.sleep(0.02)
        await self.close()
        log.server.info("sidecar.stopped")
        self._stopped.set()

    async def close(self) -> None:
        self.draining = True
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        await self._cleanup_runners()
        await self.poller.close()
        if self.balancer is not None:
            await self.balancer.close()
        await self.artifacts.close()
        await self.cache_stage.drain_writes()
        await self.cache.close()
        for pool in self.upstreams:
            await pool.close()

    async def _cleanup_runners(self) -> None:
        if self._data_server is not None:
            await self._data_server.close()
        for runner in self._runners:
            await runner.cleanup()
        self._runners = []
        if self._admin_hop is not None:
            await self._admin_hop.close()

    # -- manifest reload ------------------------------------------------------

    def reload(self) -> bool:
        """Load the manifest again; a bad one leaves the old one in force."""
        if self._reload_manifest is None:
            return False
        try:
            new = self._reload_manifest()
        except ManifestError as exc:
            self.metrics.policy_reloads.inc({"result": "error"})
            self.policy_model.record_reload_failure(exc.errors[0] if exc.errors else str(exc))
            log.manifest.error(
                "manifest.reload_failed",
                extra={"errors": len(exc.errors), "first": exc.errors[0] if exc.errors else ""},
            )
            return False
        self._apply(new)
        self.policy_model.update(new, new.digest, new.source)
        self.metrics.policy_reloads.inc({"result": "ok"})
        log.manifest.info(
            "manifest.reloaded",
            extra={"source": new.source, "digest": new.digest[:12], "routes": len(new.routes)},
        )
        return True

    def _apply(self, new: Manifest) -> None:
        old = self.manifest
        if (new.listen.data, new.admin.listen) != (old.listen.data, old.admin.listen):
            log.manifest.warning("manifest.listen_change_needs_restart")
        if new.upstream_urls != old.upstream_urls or new.upstream != old.upstream:
            previous = self.upstreams
            self.upstreams = self._make_upstreams(new)
            self.upstream = self.upstreams[0]
            # Responses in flight keep their own connections; only new
            # requests use the new pools.
            for pool in previous:
                self._spawn(_close_later(pool), "close-old-upstream")
            if self.balancer is not None:
                self._spawn(self.balancer.close(), "close-old-balancer")
            self.balancer = self._make_balancer(new)
            if self.balancer is not None:
                self.balancer.start()
        self.rewriter.mode = new.prompt_cache.mode
        self.proxy.router = Router(new.routes)
        self.proxy.forwarder = Forwarder(
            self.upstream, new.listen.forwarded, new.limits.max_body_bytes
        )
        self.proxy.max_body_bytes = new.limits.max_body_bytes
        self.proxy.max_header_bytes = new.limits.max_header_bytes
        c = new.coalescing
        self.coalescer.enabled = c.enabled
        self.coalescer.follower_timeout_s = c.follower_timeout
        self.coalescer.max_waiters = c.max_waiters
        self.coalescer.max_keys = c.max_keys
        self.coalescer.hit_for_miss_s = c.hit_for_miss
        self.coalescer.max_buffer_bytes = new.cache.max_entry_bytes
        self.limiter.set_limits(
            max_in_flight=new.limits.upstream_in_flight,
            max_queue=new.limits.upstream_queue,
            queue_timeout_s=new.limits.queue_timeout,
        )
        self.cache_stage.max_entry_bytes = new.cache.max_entry_bytes
        self.cache_stage.max_body_bytes = new.limits.max_body_bytes
        self.quick_hits.max_entries = new.cache.memory.max_entries
        self.quick_hits.max_header_bytes = new.limits.max_header_bytes
        self.quick_hits.reset(_significant_headers(new))
        self.environment.set_output_fields(_output_fields(new))
        self.manifest = new
        self.proxy.set_stages(self._stages(), self._passthrough_stages())

    # -- per-request accounting -----------------------------------------------

    def _observe(self, ex: Exchange, duration_s: float) -> None:
        route = ex.route.name
        self.metrics.hot.request(
            route, ex.status, ex.cache, duration_s, ex.upstream_s, _cache_outcome(ex)
        )
        self.routes_model.observe(route, ex.status, duration_s)
        if ex.error is not None:
            if ex.error in ("upstream_failed", "upstream_timeout", "cut"):
                self.metrics.upstream_errors.inc({"route": route, "kind": ex.error})
            elif ex.error not in ("overloaded", "draining"):
                self.metrics.client_errors.inc({"reason": ex.error})
        shown = "coalesced" if ex.coalesced == "follower" else ex.cache
        if shown != "none":
            self.cache_model.record(
                ex.tier, route, shown, latency_saved_s=ex.saved_s,
                bytes_saved=ex.bytes_out if shown == "hit" else 0,
            )
        if not log.access.isEnabledFor(logging.INFO):
            return
        # Fields that say nothing for this request (no cache decision, no
        # upstream call, no singleflight role) are left out: shorter lines,
        # and a cheaper one on the path of every request.
        fields: dict[str, Any] = {
            "method": ex.request.method,
            "route": route,
            "status": ex.status,
            "duration_ms": round(duration_s * 1000, 3),
            "bytes": ex.bytes_out,
        }
        if ex.cache != "none":
            fields["cache"] = ex.cache
            if ex.cache_reason is not None:
                fields["reason"] = ex.cache_reason
        if ex.upstream_s is not None:
            fields["upstream_ms"] = round(ex.upstream_s * 1000, 3)
        if ex.coalesced != "none":
            fields["coalesced"] = ex.coalesced
        if ex.cut:
            fields["cut"] = True
        log.access_line(fields)

    def _observe_quick_hits(
        self,
        method: str,
        route: str,
        status: int,
        durations_s: list[float],
        sizes: list[int],
        saved_s: float,
    ) -> None:
        """``_observe`` for memory hits the quick path answered (cache/hits.py).

        The same counts, read-model updates and access lines as hits that
        went through the pipeline, for a batch of one route and status.
        """
        n = len(durations_s)
        size = sum(sizes)
        hot = self.metrics.hot
        hot.hits(route, status, durations_s)
        hot.tier("memory", "hit", n)
        hot.saved(route, saved_s, size)
        self.routes_model.observe_many(route, status, durations_s)
        self.cache_model.record(
            "memory", route, "hit", latency_saved_s=saved_s, bytes_saved=size, count=n
        )
        if log.access.isEnabledFor(logging.INFO):
            # The fields and their order of the pipeline's line for a hit.
            log.access_group(
                (("method", method), ("route", route), ("status", status)),
                [
                    (("duration_ms", round(duration_s * 1000, 3)), ("bytes", one))
                    for duration_s, one in zip(durations_s, sizes, strict=True)
                ],
                (("cache", "hit"),),
            )

    # -- admin handlers -------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive", "uptime_s": round(time.time() - self.started_at, 3)})

    @property
    def upstream_reachable(self) -> bool:
        """The first upstream answers, or, with replicas, any healthy one."""
        if self.balancer is not None:
            return self.upstream_ok or any(r.healthy for r in self.balancer.replicas)
        return self.upstream_ok

    @property
    def ready(self) -> bool:
        return not self.draining and self.upstream_reachable

    async def _readyz(self, request: web.Request) -> web.Response:
        body = {"ready": self.ready, "draining": self.draining, "upstream": self.upstream_reachable}
        return web.json_response(body, status=200 if self.ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        m = self.metrics
        m.in_flight.set({}, self.proxy.in_flight)
        m.upstream_in_flight.set({}, sum(u.in_flight for u in self.upstreams))
        await self.cache.refresh_gauges()
        body, headers = m.render(request.headers.getall("Accept", []))
        return web.Response(body=body, headers=headers)

    def _authorized(self, request: web.Request) -> web.Response | None:
        token = self.manifest.admin.token
        if not token:
            return admin_error(
                ErrorCode.UNAUTHORIZED,
                "mutating admin calls need an admin token; none is configured"
                " (set SIDECAR_ADMIN_TOKEN)",
            )
        given = request.headers.get("Authorization", "")
        expected = "Bearer " + token
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return admin_error(ErrorCode.UNAUTHORIZED, "missing or wrong admin token")
        return None

    async def _admin_cache_stats(self, request: web.Request) -> web.Response:
        stats = await self.cache.refresh_gauges()
        return web.json_response({**stats, "quick": self.quick_hits.stats()})

    async def _admin_cache_purge(self, request: web.Request) -> web.Response:
        """Purge everything, one route (``{"route": NAME}``) or one key (``{"key": HEX}``)."""
        refused = self._authorized(request)
        if refused is not None:
            return refused
        try:
            doc = await request.json() if request.can_read_body else {}
        except ValueError:
            return admin_error(ErrorCode.BAD_REQUEST, "the body must be a JSON object")
        if not isinstance(doc, dict) or set(doc) - {"route", "key"}:
            return admin_error(
                ErrorCode.BAD_REQUEST, 'expected {}, {"route": NAME} or {"key": HEX}'
            )
        try:
            if "key" in doc:
                key = bytes.fromhex(str(doc["key"]))
                if len(key) != 32:
                    raise ValueError
                removed = await self.cache.delete(key)
            else:
                route = doc.get("route")
                if route is not None and not isinstance(route, str):
                    raise ValueError
                removed = await self.cache.purge(route)
        except ValueError:
            return admin_error(ErrorCode.BAD_REQUEST, "key must be 64 hex digits, route a name")
        except StoreError as exc:
            return admin_error(ErrorCode.OVERLOADED, f"the disk tier refused the purge: {exc}")
        # What was purged can no longer be a quick hit anyway; the rest is
        # remembered again on its next hit.
        self.quick_hits.clear()
        return web.json_response({"removed": removed})

    async def _admin_reload(self, request: web.Request) -> web.Response:
        refused = self._authorized(request)
        if refused is not None:
            return refused
        ok = self.reload()
        body = {"reloaded": ok, "digest": self.manifest.digest, "source": self.manifest.source}
        return web.json_response(body, status=200 if ok else 422)


def admin_error(code: ErrorCode, message: str) -> web.Response:
    """An admin-port error in the OpenAI shape, never cached by a client.

    The same answer the artifact handlers give (both run on aiohttp).
    """
    return json_error(code, message)


def _output_fields(manifest: Manifest) -> dict[str, Any]:
    """Manifest fields that change what the upstream answers (env signature)."""
    return {"prompt_cache": str(manifest.prompt_cache.mode), "kind": str(manifest.upstream.kind)}


def _significant_headers(manifest: Manifest) -> set[str]:
    """Every request field some route declares significant for its action key."""
    return {
        name for route in manifest.routes for name in route.cache.significant_headers
    }


def _cache_outcome(ex: Exchange) -> str | None:
    """The outcome label of sidecar_cache_requests_total for one request."""
    if ex.coalesced == "follower":
        return "coalesced"
    if ex.cache == "hit":
        return "hit"
    if ex.cache == "miss":
        return "miss" if ex.stored else (ex.cache_reason or "not_stored")
    if ex.cache == "bypass":
        return ex.cache_reason or "bypass"
    return None


async def _close_later(upstream: Upstream, delay_s: float = 30.0) -> None:
    await asyncio.sleep(delay_s)
    await upstream.close()


def _bound(site: web.TCPSite) -> tuple[str, int]:
    server = site._server
    assert server is not None
    sock = server.sockets[0]  # type: ignore[attr-defined]
    host, port = sock.getsockname()[:2]
    return host, port


def build_manifest_loader(
    path: str | None, env: dict[str, str], flags: dict[str, str | None]
) -> Callable[[], Manifest]:
    def load() -> Manifest:
        return load_manifest(path, env=env, flags=flags)

    return load
