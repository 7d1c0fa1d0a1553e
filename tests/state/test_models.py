"""The read models: what producers' calls do to versions and snapshots."""

from __future__ import annotations

import dataclasses
import datetime
import json

import pytest

from sidecar.state import (
    ArtifactsModel,
    CacheModel,
    CoalescingModel,
    PolicyModel,
    RoutesModel,
)
from sidecar.state.policy import REDACTED
from sidecar.state.traffic import RECENT_SAMPLES, quantile


def test_cache_record_hit_counts_route_and_tier() -> None:
    """A hit from a tier counts for its route and for that tier, with savings."""
    cache = CacheModel()
    cache.record("memory", "chat", "hit", latency_saved_s=0.25, bytes_saved=100)
    doc = cache.snapshot()
    for counters in (doc["routes"]["chat"], doc["tiers"]["memory"], doc["total"]):
        assert (counters["lookups"], counters["hits"]) == (1, 1)
        assert counters["latency_saved_s"] == 0.25
        assert counters["bytes_saved"] == 100
        assert counters["hit_ratio"] == 1.0


def test_cache_bypass_is_not_a_lookup() -> None:
    """A bypass skips every cache, so it does not lower the hit ratio."""
    cache = CacheModel()
    cache.record(None, "chat", "hit")
    cache.record(None, "chat", "bypass")
    route = cache.snapshot()["routes"]["chat"]
    assert (route["lookups"], route["bypasses"], route["hit_ratio"]) == (1, 1, 1.0)


def test_cache_hit_ratio_counts_hit_like_outcomes() -> None:
    """Stale, semantic and negative hits are answers from a cache; misses are not."""
    cache = CacheModel()
    for outcome in ("stale", "semantic-hit", "negative-hit", "miss"):
        cache.record(None, "chat", outcome)
    assert cache.snapshot()["total"]["hit_ratio"] == 0.75


def test_cache_hit_ratio_before_lookups_is_null() -> None:
    """No lookups yet reads as no ratio, not as zero."""
    assert CacheModel().snapshot()["total"]["hit_ratio"] is None


def test_cache_record_unknown_outcome_raises() -> None:
    """An outcome outside the X-Sidecar-Cache words is a producer bug."""
    with pytest.raises(KeyError):
        CacheModel().record(None, "chat", "maybe")


def test_cache_record_tier_counts_only_the_tier() -> None:
    """A tier lookup that did not decide the request leaves route counts alone."""
    cache = CacheModel()
    cache.record_tier("memory", "miss")
    doc = cache.snapshot()
    assert doc["tiers"]["memory"]["misses"] == 1
    assert doc["routes"] == {}


def test_cache_set_tier_sets_gauges_and_bumps_version() -> None:
    """Tier sizes are gauges: set, not added; every call is a change."""
    cache = CacheModel()
    cache.set_tier("disk", entries=3, bytes=4096, evictions=1)
    cache.set_tier("disk", entries=2)
    tier = cache.snapshot()["tiers"]["disk"]
    assert (tier["entries"], tier["bytes"], tier["evictions"]) == (2, 4096, 1)
    assert cache.version == 2


def test_cache_snapshot_shares_nothing_with_model() -> None:
    """A snapshot taken earlier does not move when the model does."""
    cache = CacheModel()
    cache.record("memory", "chat", "hit")
    before = cache.snapshot()
    cache.record("memory", "chat", "hit")
    assert before["routes"]["chat"]["hits"] == 1


def test_routes_observe_counts_errors_and_classes() -> None:
    """5xx and no-status answers are errors; every answer counts in its class."""
    routes = RoutesModel()
    for status in (200, 404, 502, 0):
        routes.observe("chat", status, 0.01)
    chat = routes.snapshot()["routes"]["chat"]
    assert (chat["requests"], chat["errors"]) == (4, 2)
    assert chat["codes"] == {"2xx": 1, "4xx": 1, "5xx": 1, "none": 1}


def test_routes_quantiles_are_nearest_rank() -> None:
    """p50 and p95 over 1..100 ms are 50 and 95 ms."""
    routes = RoutesModel()
    for ms in range(1, 101):
        routes.observe("chat", 200, ms / 1000)
    chat = routes.snapshot()["routes"]["chat"]
    assert (chat["p50_ms"], chat["p95_ms"]) == (50.0, 95.0)


def test_routes_quantiles_forget_old_requests() -> None:
    """Only the most recent samples count toward p95."""
    routes = RoutesModel()
    for _ in range(RECENT_SAMPLES):
        routes.observe("chat", 200, 10.0)
    for _ in range(RECENT_SAMPLES):
        routes.observe("chat", 200, 0.001)
    assert routes.snapshot()["routes"]["chat"]["p95_ms"] == 1.0


def test_routes_ewma_moves_toward_new_latency() -> None:
    """The EWMA starts at the first sample and moves a fraction toward each next one."""
    routes = RoutesModel()
    routes.observe("chat", 200, 0.100)
    routes.observe("chat", 200, 0.200)
    assert routes.snapshot()["routes"]["chat"]["ewma_ms"] == 120.0


def test_routes_prompt_tokens_add_up() -> None:
    """Reused and evaluated tokens are summed per route and in total."""
    routes = RoutesModel()
    routes.add_prompt_tokens("chat", reused=10, evaluated=3)
    routes.add_prompt_tokens("complete", reused=1, evaluated=1)
    assert routes.snapshot()["total"]["prompt_tokens"] == {"reused": 11, "evaluated": 4}


def test_quantile_of_one_sample_is_that_sample() -> None:
    """Nearest rank never indexes outside the list."""
    assert quantile([3.0], 0.5) == quantile([3.0], 0.95) == 3.0


def test_coalescing_record_counts_roles() -> None:
    """Followers are the suppressed duplicates; leaders called the upstream."""
    co = CoalescingModel()
    co.record("chat", "leader")
    co.record("chat", "follower")
    co.record("chat", "follower")
    assert co.snapshot()["total"] == {"leaders": 1, "followers": 2}


def test_coalescing_set_waiters_same_value_is_no_change() -> None:
    """Setting the same waiter count does not bump the version."""
    co = CoalescingModel()
    co.set_waiters(2)
    co.set_waiters(2)
    assert (co.version, co.snapshot()["waiters"]) == (1, 2)


def test_policy_snapshot_redacts_credentials_at_any_depth() -> None:
    """Keys that name credentials are published as <redacted>."""
    manifest = {
        "admin": {"token": "s3cret", "listen": "0.0.0.0:8091"},
        "upstream": {"headers": [{"Authorization": "Bearer x"}]},
    }
    doc = PolicyModel(manifest, "ab" * 32).snapshot()
    assert doc["manifest"]["admin"] == {"token": REDACTED, "listen": "0.0.0.0:8091"}
    assert doc["manifest"]["upstream"]["headers"] == [{"Authorization": REDACTED}]


def test_policy_accepts_dataclass_manifest_with_durations() -> None:
    """A frozen dataclass manifest with timedeltas becomes plain JSON."""

    @dataclasses.dataclass(frozen=True)
    class State:
        coalesce: datetime.timedelta
        replay: int

    doc = PolicyModel({"state": State(datetime.timedelta(milliseconds=250), 8)}, "d")
    json.dumps(doc.snapshot(), allow_nan=False)
    assert doc.snapshot()["manifest"]["state"] == {"coalesce": 0.25, "replay": 8}


def test_policy_update_and_failure_count_reloads() -> None:
    """A good reload replaces digest; a refused one keeps it and records why."""
    policy = PolicyModel({}, "old")
    policy.update({"a": 1}, "new")
    policy.record_reload_failure(
        "policies/x.yaml:3: state.coalesce: expected a duration"
    )
    doc = policy.snapshot()
    assert (doc["digest"], doc["reloads"]) == ("new", {"ok": 1, "failed": 1})
    assert doc["last_error"]["message"].startswith("policies/x.yaml:3:")


def test_artifacts_record_served_by_status() -> None:
    """200 and 304 answers are counted apart; bytes add up."""
    art = ArtifactsModel()
    art.set_index(2, 1000)
    art.record_served(200, 600)
    art.record_served(304, 0)
    doc = art.snapshot()
    assert (doc["files"], doc["bytes"]) == (2, 1000)
    assert doc["served"] == {
        "ok": 1,
        "not_modified": 1,
        "not_found": 0,
        "bytes_sent": 600,
    }


@pytest.mark.parametrize(
    "model", [CacheModel(), RoutesModel(), CoalescingModel(), ArtifactsModel()]
)
def test_model_empty_snapshot_is_json(model: object) -> None:
    """Every model's first snapshot is already valid, finite JSON."""
    json.dumps(model.snapshot(), allow_nan=False)  # type: ignore[attr-defined]
