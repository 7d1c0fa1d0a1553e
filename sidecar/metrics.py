"""Every Prometheus metric the sidecar exports, with its exact meaning.

One ``Metrics`` object per running sidecar owns its own aioprometheus
``Registry`` (never the library's global one), so two sidecars in one test
process never share counters. Names follow Prometheus conventions: ``_total``
for counters, ``_seconds`` and ``_bytes`` for units, and label values are
always bounded (route names from the manifest, status codes, fixed outcome
words): never a user, a scope, a path or a key.

The help strings below are the definitions; dashboards and alert rules rely
on them, so change a meaning only together with its name.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from typing import Final

from aioprometheus import histogram as _histogram
from aioprometheus.collectors import Counter, Gauge, Histogram, Registry
from aioprometheus.renderer import render

# Latency buckets from 100 us (a memory hit) to 5 min (a long generation).
LATENCY_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip


class Metrics:
    """The sidecar's metric families, registered in a private registry."""

    def __init__(self) -> None:
        self.registry = Registry()
        r = self.registry
        self.requests = Counter(
            "sidecar_requests_total",
            "Requests answered on the data port, by route and HTTP status code.",
            registry=r,
        )
        self.request_duration = Histogram(
            "sidecar_request_duration_seconds",
            "Time from a request's arrival to the end of its response, by route"
            " and cache outcome (hit, miss, bypass, coalesced, none).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "sidecar_upstream_duration_seconds",
            "Time from sending a request upstream to the end of the upstream's"
            " response body, by route.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "sidecar_in_flight_requests",
            "Data-port requests being handled right now.",
            registry=r,
        )
        self.upstream_in_flight = Gauge(
            "sidecar_upstream_in_flight_requests",
            "Requests sent upstream whose response has not ended yet.",
            registry=r,
        )
        self.upstream_errors = Counter(
            "sidecar_upstream_errors_total",
            "Upstream calls that failed, by route and kind (upstream_failed:"
            " refused, reset or invalid before a reply; upstream_timeout; cut:"
            " the body broke off after the head was relayed).",
            registry=r,
        )
        self.cache_requests = Counter(
            "sidecar_cache_requests_total",
            "Cache decisions for data-port requests, by route and outcome (hit,"
            " miss, or the reason a request was not served from or stored in"
            " the cache).",
            registry=r,
        )
        self.cache_tier_requests = Counter(
            "sidecar_cache_tier_requests_total",
            "Lookups in one cache tier, by tier (memory, disk) and outcome"
            " (hit, miss, expired, corrupt).",
            registry=r,
        )
        self.cache_entries = Gauge(
            "sidecar_cache_entries",
            "Entries held by a cache tier.",
            registry=r,
        )
        self.cache_size = Gauge(
            "sidecar_cache_size_bytes",
            "Bytes held by a cache tier (stored size, after compression on disk).",
            registry=r,
        )
        self.cache_evictions = Counter(
            "sidecar_cache_evictions_total",
            "Entries a cache tier evicted to stay under its ceilings.",
            registry=r,
        )
        self.cache_latency_saved = Counter(
            "sidecar_cache_latency_saved_seconds_total",
            "Upstream time saved by cache hits: the stored upstream duration"
            " minus the time taken to serve the hit, by route.",
            registry=r,
        )
        self.cache_bytes_saved = Counter(
            "sidecar_cache_bytes_saved_total",
            "Response bytes served from the cache instead of the upstream, by route.",
            registry=r,
        )
        self.coalesced = Counter(
            "sidecar_coalesced_requests_total",
            "Follower requests answered by another request's upstream call;"
            " leaders not counted.",
            registry=r,
        )
        self.coalescing_waiters = Gauge(
            "sidecar_coalescing_waiters",
            "Follower requests waiting on a leader right now.",
            registry=r,
        )
        self.shed = Counter(
            "sidecar_shed_requests_total",
            "Requests refused with 503 because the upstream concurrency ceiling"
            " and its queue were full, or the sidecar was draining, by reason.",
            registry=r,
        )
        self.semantic_verifier = Counter(
            "sidecar_semantic_verifier_total",
            "Semantic-cache candidates checked by the verifier, by outcome"
            " (accepted, rejected).",
            registry=r,
        )
        self.prompt_tokens_reused = Counter(
            "sidecar_prompt_tokens_reused_total",
            "Prompt tokens the upstream reported as taken from its prompt cache,"
            " by route and replica.",
            registry=r,
        )
        self.prompt_tokens_evaluated = Counter(
            "sidecar_prompt_tokens_evaluated_total",
            "Prompt tokens the upstream reported as evaluated anew, by route and"
            " replica.",
            registry=r,
        )
        self.sse_subscribers = Gauge(
            "sidecar_sse_subscribers",
            "Clients subscribed to /state/stream right now.",
            registry=r,
        )
        self.policy_reloads = Counter(
            "sidecar_policy_reloads_total",
            "Manifest reloads (SIGHUP or POST /admin/policy/reload), by result"
            " (ok, error).",
            registry=r,
        )
        self.client_errors = Counter(
            "sidecar_client_errors_total",
            "Requests refused by the sidecar itself before reaching the upstream,"
            " by reason (payload_too_large, headers_too_large, duplicate_keys,"
            " ambiguous_framing as seen by the pipeline). Refusals by the HTTP"
            " parser itself close the connection before a route is known and"
            " are not counted here.",
            registry=r,
        )
        self.artifact_requests = Counter(
            "sidecar_artifact_requests_total",
            "Answers of /admin/models/by-hash/{sha256}, by outcome (full, partial,"
            " not_modified, head, range_not_satisfiable, not_found, malformed).",
            registry=r,
        )
        self.artifact_bytes_served = Counter(
            "sidecar_artifact_bytes_served_total",
            "Body bytes sent for digest-addressed artifacts.",
            registry=r,
        )
        self.artifact_quarantined = Counter(
            "sidecar_artifact_quarantined_total",
            "Artifacts withdrawn because their bytes no longer match their digest,"
            " by reason (modified, corrupt).",
            registry=r,
        )
        self.artifact_hashed_bytes = Counter(
            "sidecar_artifact_hashed_bytes_total",
            "Bytes read to compute or verify artifact digests.",
            registry=r,
        )
        self.artifact_ingests = Counter(
            "sidecar_artifact_ingests_total",
            "Upstream blob fetches, by outcome (stored, mismatch, upstream_status,"
            " failed).",
            registry=r,
        )
        # Counters that must show 0 from the first scrape, so rate() and
        # alerts work before the first event.
        self.policy_reloads.set({"result": "ok"}, 0)
        self.policy_reloads.set({"result": "error"}, 0)
        self.in_flight.set({}, 0)
        self.upstream_in_flight.set({}, 0)
        self.sse_subscribers.set({}, 0)
        self.coalescing_waiters.set({}, 0)
        self.shed.set({"reason": "queue_full"}, 0)
        self.shed.set({"reason": "queue_timeout"}, 0)

        self.hot = RequestMetrics(self)

    def render(self, accept: list[str]) -> tuple[bytes, dict[str, str]]:
        """The exposition body and its headers, in the format ``accept`` asks for."""
        self.hot.flush()
        body, headers = render(self.registry, accept)
        return body, dict(headers)


class _Series:
    """One histogram series kept as plain numbers: per-bucket counts, sum, count."""

    __slots__ = ("counts", "n", "total")

    def __init__(self, size: int) -> None:
        self.counts = [0] * size
        self.total = 0.0
        self.n = 0


class RequestMetrics:
    """The per-request metrics, accumulated in plain dicts on the hot path.

    aioprometheus validates labels and serialises them to a key on every
    call, and a histogram observation walks every bucket: together about a
    tenth of a cached hit's CPU. Here a request costs a few dict lookups and
    one bisect; the totals are folded into the collectors when /metrics is
    scraped (``flush``), so the exposition is the same. Event-loop thread
    only.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics
        self._bounds = [*LATENCY_BUCKETS, float("inf")]
        self._requests: dict[tuple[str, str], int] = {}
        self._outcomes: dict[tuple[str, str], int] = {}
        self._durations: dict[tuple[str, str], _Series] = {}
        self._upstream: dict[str, _Series] = {}
        self._tiers: dict[tuple[str, str], int] = {}
        # route -> [latency saved (s), bytes saved]
        self._saved: dict[str, list[float]] = {}

    def _observe(self, series: _Series, value: float) -> None:
        series.counts[bisect.bisect_left(self._bounds, value)] += 1
        series.total += value
        series.n += 1

    def request(
        self,
        route: str,
        code: int,
        cache: str,
        duration_s: float,
        upstream_s: float | None,
        outcome: str | None,
    ) -> None:
        key = (route, str(code))
        self._requests[key] = self._requests.get(key, 0) + 1
        dkey = (route, cache)
        series = self._durations.get(dkey)
        if series is None:
            series = self._durations[dkey] = _Series(len(self._bounds))
        self._observe(series, duration_s)
        if upstream_s is not None:
            useries = self._upstream.get(route)
            if useries is None:
                useries = self._upstream[route] = _Series(len(self._bounds))
            self._observe(useries, upstream_s)
        if outcome is not None:
            okey = (route, outcome)
            self._outcomes[okey] = self._outcomes.get(okey, 0) + 1

    def hits(self, route: str, code: int, durations_s: list[float]) -> None:
        """``request`` for several cache hits of one route and status."""
        n = len(durations_s)
        if not n:
            return
        key = (route, str(code))
        self._requests[key] = self._requests.get(key, 0) + n
        dkey = (route, "hit")
        series = self._durations.get(dkey)
        if series is None:
            series = self._durations[dkey] = _Series(len(self._bounds))
        counts = series.counts
        bounds = self._bounds
        total = series.total
        for duration_s in durations_s:
            counts[bisect.bisect_left(bounds, duration_s)] += 1
            # One addition per request, in order: the same float sum as
            # ``request`` gives.
            total += duration_s
        series.total = total
        series.n += n
        okey = (route, "hit")
        self._outcomes[okey] = self._outcomes.get(okey, 0) + n

    def tier(self, tier: str, outcome: str, n: int = 1) -> None:
        """Lookups in a cache tier (``sidecar_cache_tier_requests_total``)."""
        key = (tier, outcome)
        self._tiers[key] = self._tiers.get(key, 0) + n

    def saved(self, route: str, latency_s: float, size: int) -> None:
        """What one cache hit saved: upstream time and response bytes."""
        totals = self._saved.get(route)
        if totals is None:
            self._saved[route] = [latency_s, size]
        else:
            totals[0] += latency_s
            totals[1] += size

    def _histogram(self, series: _Series) -> _histogram.Histogram:
        h = _histogram.Histogram(*self._bounds)
        running = 0
        buckets: OrderedDict[float, int] = OrderedDict()
        for bound, count in zip(self._bounds, series.counts, strict=True):
            running += count
            buckets[bound] = running
        h.buckets = buckets
        h.sum = series.total
        h.observations = series.n
        return h

    def flush(self) -> None:
        """Fold the totals into the aioprometheus collectors."""
        m = self._m
        for (route, code), n in self._requests.items():
            m.requests.set({"route": route, "code": code}, n)
        for (route, outcome), n in self._outcomes.items():
            m.cache_requests.set({"route": route, "outcome": outcome}, n)
        for (route, cache), series in self._durations.items():
            m.request_duration.set_value({"route": route, "cache": cache}, self._histogram(series))
        for route, series in self._upstream.items():
            m.upstream_duration.set_value({"route": route}, self._histogram(series))
        for (tier, outcome), n in self._tiers.items():
            m.cache_tier_requests.set({"tier": tier, "outcome": outcome}, n)
        for route, (latency_s, size) in self._saved.items():
            m.cache_latency_saved.set({"route": route}, latency_s)
            m.cache_bytes_saved.set({"route": route}, int(size))
