"""The per-request metrics fast path renders exactly what aioprometheus would."""

from __future__ import annotations

import random

from sidecar.metrics import LATENCY_BUCKETS, Metrics


def test_metrics_hot_path_matches_collectors() -> None:
    """Totals folded in at scrape time equal direct aioprometheus observations."""
    rng = random.Random(7)
    fast, direct = Metrics(), Metrics()
    for _ in range(2000):
        route = rng.choice(["chat", "models"])
        code = rng.choice([200, 502])
        cache = rng.choice(["hit", "miss"])
        duration = rng.choice([*LATENCY_BUCKETS, rng.random() * 400])
        upstream = rng.choice([None, rng.random()])
        outcome = rng.choice([None, "hit", "not_deterministic"])
        fast.hot.request(route, code, cache, duration, upstream, outcome)
        direct.requests.inc({"route": route, "code": str(code)})
        direct.request_duration.observe({"route": route, "cache": cache}, duration)
        if upstream is not None:
            direct.upstream_duration.observe({"route": route}, upstream)
        if outcome is not None:
            direct.cache_requests.inc({"route": route, "outcome": outcome})
    text_fast = fast.render(["text/plain"])[0].decode()
    text_direct = direct.render(["text/plain"])[0].decode()
    assert text_fast == text_direct
    assert 'sidecar_request_duration_seconds_bucket{cache="hit",le="+Inf",route="chat"}' in text_fast
