"""Batched updates equal the same updates made one request at a time.

The quick hit path accounts for a batch of memory hits with one call per
counter: ``RequestMetrics.hits``/``tier``/``saved``, ``RoutesModel.observe_many``
and ``CacheModel.record(count=n)``. Each must leave exactly what the
per-request calls would: the same Prometheus exposition, the same snapshot.
"""

from __future__ import annotations

import random

import pytest

from sidecar.metrics import LATENCY_BUCKETS, Metrics
from sidecar.state import CacheModel, RoutesModel
from sidecar.state.traffic import RECENT_SAMPLES


def _durations(seed: int, n: int) -> list[float]:
    """Latencies on, between and past the histogram buckets."""
    rng = random.Random(seed)
    return [
        rng.choice([*LATENCY_BUCKETS, 0.0, 400.0, rng.random(), rng.random() * 0.01])
        for _ in range(n)
    ]


def _body(metrics: Metrics) -> str:
    return metrics.render([])[0].decode()


# -- RequestMetrics: hits, tier, saved ----------------------------------------


def test_hits_new_series_matches_per_request_calls() -> None:
    """``hits`` on a route with no hits yet renders as one ``request`` per hit."""
    batched, single = Metrics(), Metrics()
    durations = _durations(1, 200)
    batched.hot.hits("chat", 200, durations)
    for d in durations:
        single.hot.request("chat", 200, "hit", d, None, "hit")
    assert _body(batched) == _body(single)


def test_hits_leaves_other_series_alone() -> None:
    """Misses, other codes and other routes render as if fed one by one."""
    batched, single = Metrics(), Metrics()
    for m in (batched, single):
        m.hot.request("chat", 200, "miss", 0.5, 0.4, "miss")
        m.hot.request("chat", 502, "miss", 0.02, 0.01, None)
        m.hot.request("models", 200, "hit", 0.001, None, "hit")
    durations = _durations(2, 50)
    batched.hot.hits("chat", 200, durations)
    for d in durations:
        single.hot.request("chat", 200, "hit", d, None, "hit")
    assert _body(batched) == _body(single)


def test_hits_onto_existing_series_matches_per_request_calls() -> None:
    """Hits added to a series that has observations render as one call per hit."""
    batched, single = Metrics(), Metrics()
    batched.hot.request("chat", 200, "hit", 0.1, None, "hit")
    batched.hot.hits("chat", 200, [0.2, 0.3])
    for d in (0.1, 0.2, 0.3):
        single.hot.request("chat", 200, "hit", d, None, "hit")
    assert _body(batched) == _body(single)


def test_tier_count_matches_repeated_calls() -> None:
    """``tier(t, o, n)`` counts as n calls of ``tier(t, o)``, added to earlier ones."""
    batched, single = Metrics(), Metrics()
    for m in (batched, single):
        m.hot.tier("memory", "hit")
        m.hot.tier("disk", "miss")
    batched.hot.tier("memory", "hit", 5)
    for _ in range(5):
        single.hot.tier("memory", "hit")
    body = _body(batched)
    assert body == _body(single)
    assert 'sidecar_cache_tier_requests_total{outcome="hit",tier="memory"} 6' in body


def test_saved_accumulates_per_route() -> None:
    """Savings add up per route, as one call with the sums would set them."""
    batched, summed = Metrics(), Metrics()
    batched.hot.saved("chat", 0.25, 100)
    batched.hot.saved("chat", 0.5, 50)
    batched.hot.saved("models", 1.0, 7)
    summed.hot.saved("chat", 0.75, 150)
    summed.hot.saved("models", 1.0, 7)
    body = _body(batched)
    assert body == _body(summed)
    assert 'sidecar_cache_latency_saved_seconds_total{route="chat"} 0.75' in body
    assert 'sidecar_cache_bytes_saved_total{route="chat"} 150' in body


# -- RoutesModel.observe_many --------------------------------------------------


@pytest.mark.parametrize("status", [200, 404, 503, 0])
@pytest.mark.parametrize("earlier", [[], [0.5, 0.05]])
def test_routes_observe_many_matches_observe_in_order(
    status: int, earlier: list[float]
) -> None:
    """Counts, codes, errors, EWMA and quantiles equal one ``observe`` per request."""
    batched, single = RoutesModel(), RoutesModel()
    for model in (batched, single):
        model.observe("other", 200, 0.2)
        for d in earlier:
            model.observe("chat", 200, d)
    durations = _durations(3, 60)
    batched.observe_many("chat", status, durations)
    for d in durations:
        single.observe("chat", status, d)
    assert batched.snapshot() == single.snapshot()


def test_routes_observe_many_past_ring_matches_observe() -> None:
    """A batch longer than the sample ring keeps the same newest samples."""
    batched, single = RoutesModel(), RoutesModel()
    durations = [i / 1000 for i in range(1, RECENT_SAMPLES + 201)]
    batched.observe_many("chat", 200, durations[:100])
    batched.observe_many("chat", 200, durations[100:])
    for d in durations:
        single.observe("chat", 200, d)
    doc = batched.snapshot()
    assert doc == single.snapshot()
    assert doc["routes"]["chat"]["p50_ms"] > 200.0


def test_routes_observe_many_bumps_version() -> None:
    """A non-empty batch is a change the hub must publish."""
    routes = RoutesModel()
    routes.observe_many("chat", 200, [0.01])
    assert routes.version > 0


def test_routes_observe_many_empty_is_no_change() -> None:
    """An empty batch changes neither the version nor the snapshot."""
    routes = RoutesModel()
    routes.observe("chat", 200, 0.01)
    before, version = routes.snapshot(), routes.version
    routes.observe_many("chat", 200, [])
    routes.observe_many("new", 500, [])
    assert (routes.snapshot(), routes.version) == (before, version)


# -- CacheModel.record(count=n) ------------------------------------------------


def test_cache_record_count_hit_with_tier_matches_repeated_calls() -> None:
    """n hits from a tier at once equal n records, their savings summed."""
    batched, single = CacheModel(), CacheModel()
    for model in (batched, single):
        model.record("disk", "chat", "hit", latency_saved_s=0.3, bytes_saved=9)
        model.record_tier("memory", "miss")
        model.record(None, "chat", "miss")
    rng = random.Random(4)
    savings = [(rng.random(), rng.randrange(1000)) for _ in range(7)]
    batched.record(
        "memory",
        "chat",
        "hit",
        latency_saved_s=sum(s for s, _ in savings),
        bytes_saved=sum(b for _, b in savings),
        count=len(savings),
    )
    for saved_s, size in savings:
        single.record(
            "memory", "chat", "hit", latency_saved_s=saved_s, bytes_saved=size
        )
    doc = batched.snapshot()
    assert doc == single.snapshot()
    assert (doc["tiers"]["memory"]["hits"], doc["tiers"]["memory"]["lookups"]) == (7, 8)


def test_cache_record_count_bypass_matches_repeated_calls() -> None:
    """n bypasses at once equal n bypass records: counted, and not lookups."""
    batched, single = CacheModel(), CacheModel()
    for model in (batched, single):
        model.record(None, "chat", "hit")
    batched.record(None, "chat", "bypass", count=3)
    for _ in range(3):
        single.record(None, "chat", "bypass")
    doc = batched.snapshot()
    assert doc == single.snapshot()
    route = doc["routes"]["chat"]
    assert (route["bypasses"], route["lookups"], route["hit_ratio"]) == (3, 1, 1.0)
