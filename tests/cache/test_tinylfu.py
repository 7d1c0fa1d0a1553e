"""The memory tier's eviction policy and its LRU peer (sidecar/cache/tinylfu.py).

A contract both classes share (get/put/pop, TTL with an injected clock,
ceilings on entries and weight, refusal of over-heavy entries, len and weight
always matching a model of what was stored and evicted), then what only
W-TinyLFU promises: admission by frequency, scan resistance, the SLRU
segments and the hill climber moving the window.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sidecar.cache.simulate import simulate
from sidecar.cache.sketch import FrequencySketch
from sidecar.cache.tinylfu import LRU, WTinyLFU

CACHES = [WTinyLFU, LRU]


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=CACHES, ids=["wtinylfu", "lru"])
def cache_class(request: pytest.FixtureRequest) -> Any:
    return request.param


# -- the shared contract -----------------------------------------------------


def test_cache_put_then_get_returns_value(cache_class: Any) -> None:
    """A stored value comes back from get."""
    cache = cache_class(10)
    cache.put(b"k", "v")
    assert cache.get(b"k") == "v"


def test_cache_get_absent_returns_none(cache_class: Any) -> None:
    """get of a key never stored is None."""
    assert cache_class(10).get("nope") is None


def test_cache_put_existing_replaces_value_and_weight(cache_class: Any) -> None:
    """A second put replaces the value and the weight, without an eviction."""
    cache = cache_class(10, 100)
    cache.put(1, "a", weight=10)
    assert cache.put(1, "b", weight=30) == []
    assert (cache.get(1), cache.weight, len(cache), cache.evictions) == ("b", 30, 1, 0)


def test_cache_pop_returns_value_and_removes(cache_class: Any) -> None:
    """pop gives the value back once, then the key is gone."""
    cache = cache_class(10)
    cache.put("k", 5, weight=3)
    assert (cache.pop("k"), cache.pop("k")) == (5, None)
    assert (len(cache), cache.weight, "k" in cache) == (0, 0, False)


def test_cache_entry_ceiling_evicts_on_put(cache_class: Any) -> None:
    """Past max_entries, put returns what it evicted and len stays at the ceiling."""
    cache = cache_class(3)
    evicted = [e for k in range(10) for e in cache.put(k, k * 10)]
    assert len(cache) == 3
    assert len(evicted) == 7
    assert cache.evictions == 7
    assert all(value == key * 10 for key, value in evicted)


def test_cache_weight_ceiling_evicts_on_put(cache_class: Any) -> None:
    """Past max_weight, entries leave until the total weight fits."""
    cache = cache_class(100, 50)
    for key in range(10):
        cache.put(key, key, weight=10)
        assert cache.weight <= 50
    assert cache.weight == sum(10 for key in range(10) if key in cache)


def test_cache_entry_heavier_than_ceiling_refused(cache_class: Any) -> None:
    """An entry heavier than max_weight is returned as evicted and not stored."""
    cache = cache_class(10, 100)
    cache.put("small", 1, weight=10)
    assert cache.put("big", 2, weight=101) == [("big", 2)]
    assert ("big" in cache, cache.get("small"), cache.weight) == (False, 1, 10)


def test_cache_refused_replacement_drops_old_value(cache_class: Any) -> None:
    """A refused heavy put for a stored key leaves no stale value behind."""
    cache = cache_class(10, 100)
    cache.put("k", "old", weight=10)
    assert cache.put("k", "new", weight=500) == [("k", "new")]
    assert (cache.get("k"), cache.weight) == (None, 0)


def test_cache_ttl_expired_get_is_miss_and_removes(cache_class: Any) -> None:
    """After its TTL an entry reads as a miss and leaves len and weight."""
    clock = FakeClock()
    cache = cache_class(10, clock=clock)
    cache.put("k", "v", weight=4, ttl_s=5)
    clock.now += 4.9
    assert cache.get("k") == "v"
    clock.now += 0.1
    assert cache.get("k") is None
    assert (len(cache), cache.weight) == (0, 0)


def test_cache_ttl_expired_contains_false(cache_class: Any) -> None:
    """`in` reports an expired entry as absent."""
    clock = FakeClock()
    cache = cache_class(10, clock=clock)
    cache.put("k", "v", ttl_s=1)
    clock.now += 1
    assert "k" not in cache
    assert len(cache) == 0


def test_cache_ttl_expired_pop_returns_none(cache_class: Any) -> None:
    """pop of an expired entry removes it and returns None."""
    clock = FakeClock()
    cache = cache_class(10, clock=clock)
    cache.put("k", "v", ttl_s=1)
    clock.now += 2
    assert cache.pop("k") is None
    assert len(cache) == 0


def test_cache_without_ttl_never_expires(cache_class: Any) -> None:
    """An entry stored without ttl_s survives any clock jump."""
    clock = FakeClock()
    cache = cache_class(10, clock=clock)
    cache.put("k", "v")
    clock.now += 1e9
    assert cache.get("k") == "v"


def test_cache_put_bad_arguments_refused(cache_class: Any) -> None:
    """Negative weights and non-positive TTLs are programming errors."""
    cache = cache_class(10)
    with pytest.raises(ValueError, match="weight"):
        cache.put("k", "v", weight=-1)
    with pytest.raises(ValueError, match="ttl_s"):
        cache.put("k", "v", ttl_s=0)


def test_cache_ceilings_below_one_refused(cache_class: Any) -> None:
    """A cache needs room for at least one entry and one unit of weight."""
    with pytest.raises(ValueError, match="max_entries"):
        cache_class(0)
    with pytest.raises(ValueError, match="max_weight"):
        cache_class(10, 0)


def test_cache_clear_empties(cache_class: Any) -> None:
    """clear() removes every entry without counting evictions."""
    cache = cache_class(10)
    for key in range(5):
        cache.put(key, key, weight=2)
    cache.clear()
    assert (len(cache), cache.weight, cache.evictions, cache.get(1)) == (0, 0, 0, None)


def test_cache_stats_report_totals(cache_class: Any) -> None:
    """stats() carries entries, weight and evictions consistent with the cache."""
    cache = cache_class(2)
    for key in range(5):
        cache.put(key, key, weight=3)
    stats = cache.stats()
    assert (stats["entries"], stats["weight"], stats["evictions"]) == (2, 6, 3)


class CacheModel(RuleBasedStateMachine):
    """Random operations against a model of what was stored and evicted.

    The model is exact: a key is in the cache iff it was put, not reported
    evicted by a later put, not popped, and not seen expired by get/in/pop.
    """

    cache_class: Any = WTinyLFU

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.cache = self.cache_class(8, 60, clock=self.clock)
        # key -> (value, weight, expires_at or None)
        self.model: dict[int, tuple[int, int, float | None]] = {}
        self.evicted_total = 0
        self.serial = 0

    def _expired(self, key: int) -> bool:
        expires_at = self.model[key][2]
        return expires_at is not None and self.clock.now >= expires_at

    @rule(
        key=st.integers(0, 15),
        weight=st.integers(0, 70),
        ttl=st.none() | st.sampled_from([1.0, 5.0]),
    )
    def put(self, key: int, weight: int, ttl: float | None) -> None:
        self.serial += 1
        evicted = self.cache.put(key, self.serial, weight=weight, ttl_s=ttl)
        expires_at = None if ttl is None else self.clock.now + ttl
        self.model[key] = (self.serial, weight, expires_at)
        for gone, value in evicted:
            assert gone in self.model
            assert self.model.pop(gone)[0] == value
        self.evicted_total += len(evicted)

    @rule(key=st.integers(0, 15))
    def get(self, key: int) -> None:
        got = self.cache.get(key)
        if key in self.model and self._expired(key):
            del self.model[key]
        expected = self.model[key][0] if key in self.model else None
        assert got == expected

    @rule(key=st.integers(0, 15))
    def contains(self, key: int) -> None:
        if key in self.model and self._expired(key):
            del self.model[key]
        assert (key in self.cache) == (key in self.model)

    @rule(key=st.integers(0, 15))
    def pop(self, key: int) -> None:
        got = self.cache.pop(key)
        held = self.model.pop(key, None)
        expired = held is not None and held[2] is not None and self.clock.now >= held[2]
        assert got == (None if held is None or expired else held[0])

    @rule(seconds=st.sampled_from([0.5, 1.0, 3.0]))
    def advance(self, seconds: float) -> None:
        self.clock.now += seconds

    @precondition(lambda self: self.serial % 7 == 6)
    @rule()
    def clear(self) -> None:
        self.cache.clear()
        self.model.clear()

    @invariant()
    def totals_match_model(self) -> None:
        assert len(self.cache) == len(self.model) <= 8
        weight = sum(w for _, w, _ in self.model.values())
        assert self.cache.weight == weight <= 60
        assert self.cache.evictions == self.evicted_total

    @invariant()
    def segments_add_up(self) -> None:
        stats = self.cache.stats()
        if stats["policy"] == "wtinylfu":
            sizes = stats["window"] + stats["probation"] + stats["protected"]
            weights = (
                stats["window_weight"]
                + stats["probation_weight"]
                + stats["protected_weight"]
            )
            assert (sizes, weights) == (stats["entries"], stats["weight"])


class LRUModel(CacheModel):
    cache_class = LRU


_MODEL_SETTINGS = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestWTinyLFUModel = CacheModel.TestCase
TestWTinyLFUModel.settings = _MODEL_SETTINGS
TestLRUModel = LRUModel.TestCase
TestLRUModel.settings = _MODEL_SETTINGS


# -- LRU order ---------------------------------------------------------------


def test_lru_evicts_least_recently_used() -> None:
    """LRU evicts the entry untouched for longest; a get refreshes it."""
    cache: LRU[int] = LRU(3)
    for key in (1, 2, 3):
        cache.put(key, key)
    cache.get(1)
    assert cache.put(4, 4) == [(2, 2)]


# -- W-TinyLFU ---------------------------------------------------------------


def heat(cache: WTinyLFU[Any], keys: range, times: int) -> None:
    for _ in range(times):
        for key in keys:
            if cache.get(key) is None:
                cache.put(key, key)


def test_wtinylfu_cold_newcomers_leave_in_arrival_order() -> None:
    """Against frequently used residents of main, the window's entries are the
    ones evicted, oldest first: each in turn is the candidate and loses."""
    cache: WTinyLFU[int] = WTinyLFU(50)
    heat(cache, range(50), 5)  # 0..48 end up in main, 49 in the 1-entry window
    evicted = [key for new in range(1000, 1010) for key, _ in cache.put(new, new)]
    assert evicted == [49, *range(1000, 1009)]
    assert all(key in cache for key in range(49))


def test_wtinylfu_frequent_candidate_admitted() -> None:
    """A newcomer asked for more often than the victim replaces it."""
    cache: WTinyLFU[int] = WTinyLFU(20)
    heat(cache, range(20), 1)
    for _ in range(6):
        cache.get(999)
    cache.put(999, 999)
    cache.put(1000, 1000)  # pushes 999 out of the window as a candidate
    assert 999 in cache


def test_wtinylfu_admit_tie_goes_to_victim() -> None:
    """Equal estimates keep the resident: admit() needs a strictly higher count."""
    cache: WTinyLFU[int] = WTinyLFU(100)
    for key in (1, 2):
        for _ in range(3):
            cache.get(key)
    assert (cache.admit(1, 2), cache.admit(2, 1)) == (False, False)
    cache.get(1)
    assert cache.admit(1, 2)


def test_wtinylfu_probation_hit_promotes_to_protected() -> None:
    """A hit in probation moves the entry to protected (SLRU)."""
    cache: WTinyLFU[int] = WTinyLFU(100)
    for key in range(5):
        cache.put(key, key)
    before = cache.stats()
    cache.get(0)  # 0 was pushed from the window into probation
    after = cache.stats()
    assert (after["protected"], after["probation"]) == (1, before["probation"] - 1)


def test_wtinylfu_protected_capped_at_80_percent_of_main() -> None:
    """Protected never holds more than 80% of the main region's entries."""
    cache: WTinyLFU[int] = WTinyLFU(100)
    heat(cache, range(100), 3)
    stats = cache.stats()
    main = 100 - stats["window_max_entries"]
    assert stats["protected"] <= int(0.8 * main)


def scan_trace(rounds: int) -> list[int]:
    """80 hot keys, each round followed by a scan of 200 one-time keys."""
    trace: list[int] = []
    for round_ in range(rounds):
        trace.extend(range(80))
        trace.extend(range(10_000 + 200 * round_, 10_200 + 200 * round_))
    return trace


def test_wtinylfu_scans_leave_hot_set_resident() -> None:
    """Scans twice the cache's size between rounds of hot keys: LRU loses the
    hot set every time, W-TinyLFU keeps nearly all of it."""
    trace = scan_trace(30)
    hot_accesses = 80 * 30
    lru = simulate(trace, "lru", 100)
    wtinylfu = simulate(trace, "wtinylfu", 100)
    assert lru.hits == 0
    assert wtinylfu.hits >= 0.9 * hot_accesses


def looping_trace(distinct: int, loops: int) -> list[int]:
    return [key for _ in range(loops) for key in range(distinct)]


def test_wtinylfu_looping_scan_near_optimal_where_lru_gets_nothing() -> None:
    """A loop 20% longer than the cache: LRU never hits, W-TinyLFU reaches most
    of what Belady's optimum gets."""
    trace = looping_trace(120, 150)
    lru = simulate(trace, "lru", 100)
    wtinylfu = simulate(trace, "wtinylfu", 100)
    optimum = simulate(trace, "opt", 100)
    assert lru.hits == 0
    assert wtinylfu.hit_ratio >= 0.8 * optimum.hit_ratio


def zipf_trace(distinct: int, length: int, skew: float, seed: int) -> list[int]:
    rng = random.Random(seed)
    weights = [1 / (rank**skew) for rank in range(1, distinct + 1)]
    return rng.choices(range(distinct), weights=weights, k=length)


def test_wtinylfu_zipf_beats_lru() -> None:
    """On a skewed (Zipf 0.9) workload frequency beats recency."""
    trace = zipf_trace(5000, 40_000, 0.9, seed=7)
    lru = simulate(trace, "lru", 200)
    wtinylfu = simulate(trace, "wtinylfu", 200)
    assert wtinylfu.hit_ratio > lru.hit_ratio + 0.03


def recency_trace(length: int, seed: int) -> list[int]:
    """Each key is asked for in a short burst and never again: only recency pays."""
    rng = random.Random(seed)
    return [t // 4 - rng.randrange(60) for t in range(length)]


def test_wtinylfu_recency_trace_grows_window() -> None:
    """The hill climber widens the window when recency is what pays."""
    cache: WTinyLFU[bool] = WTinyLFU(100)
    start = cache.window_share
    for key in recency_trace(60_000, seed=3):
        if cache.get(key) is None:
            cache.put(key, True)
    assert cache.window_share >= start + 0.2


def late_hit_ratio(cache: WTinyLFU[bool] | LRU[bool], trace: list[int]) -> float:
    """The hit ratio over the trace's last third (after the climber settled)."""
    late = 2 * len(trace) // 3
    hits = 0
    for index, key in enumerate(trace):
        if cache.get(key) is None:
            cache.put(key, True)
        elif index >= late:
            hits += 1
    return hits / (len(trace) - late)


def test_wtinylfu_recency_trace_settles_near_lru() -> None:
    """Once the window has grown, W-TinyLFU does about as well as LRU."""
    trace = recency_trace(60_000, seed=3)
    lru = late_hit_ratio(LRU(100), trace)
    wtinylfu = late_hit_ratio(WTinyLFU(100), trace)
    assert wtinylfu >= lru - 0.02


def test_wtinylfu_frequency_trace_keeps_window_small() -> None:
    """On a looping scan, the climber keeps the window near its minimum."""
    cache: WTinyLFU[bool] = WTinyLFU(100)
    for key in looping_trace(120, 200):
        if cache.get(key) is None:
            cache.put(key, True)
    assert cache.window_share <= 0.05


def test_wtinylfu_heavy_entry_skips_window() -> None:
    """An entry heavier than the window's weight share competes for main at
    once instead of pushing every window entry out."""
    cache: WTinyLFU[int] = WTinyLFU(100, 1000)
    for key in range(5):
        cache.put(key, key, weight=1)
    window_before = cache.stats()["window"]
    cache.put("heavy", 0, weight=500)
    stats = cache.stats()
    assert "heavy" in cache
    assert stats["window"] == window_before


def test_wtinylfu_contains_records_no_access() -> None:
    """`in` leaves the frequency sketch untouched; get records an access."""
    cache: WTinyLFU[int] = WTinyLFU(10)
    cache.put("k", 1)
    samples = cache._sketch.samples
    assert "k" in cache
    assert cache._sketch.samples == samples
    cache.get("k")
    assert cache._sketch.samples == samples + 1


def test_wtinylfu_single_entry_cache_holds_latest() -> None:
    """With max_entries=1 the window is the whole cache: the newest entry stays."""
    cache: WTinyLFU[int] = WTinyLFU(1)
    cache.put(1, 1)
    assert cache.put(2, 2) == [(1, 1)]
    assert (cache.get(2), len(cache)) == (2, 1)


def test_wtinylfu_expired_victim_evicted_before_duel() -> None:
    """An expired main entry leaves first, whatever its frequency."""
    clock = FakeClock()
    cache: WTinyLFU[int] = WTinyLFU(3, clock=clock)
    cache.put("old", 0, ttl_s=1)
    for _ in range(10):
        cache.get("old")
    cache.put("a", 1)
    cache.put("b", 2)  # "old" and "a" are now in main
    clock.now += 2
    evicted = cache.put("c", 3)
    assert [key for key, _ in evicted] == ["old"]


def test_wtinylfu_hot_key_shortcut_keeps_the_sketch_exact() -> None:
    """Gets of a saturated key skip its counters, leaving the sketch as counting would."""
    cache: WTinyLFU[str] = WTinyLFU(64)
    reference = FrequencySketch(64)
    keys = [f"k{n}" for n in range(40)]
    for key in keys:
        cache.put(key, key)
    rng = random.Random(7)
    for _ in range(5_000):
        key = rng.choice(keys[:5]) if rng.random() < 0.8 else rng.choice(keys)
        cache.get(key)
        reference.increment(hash(key))
    sketch = cache._sketch
    assert (sketch._table.tobytes(), bytes(sketch._door), sketch.samples) == (
        reference._table.tobytes(), bytes(reference._door), reference.samples
    )
