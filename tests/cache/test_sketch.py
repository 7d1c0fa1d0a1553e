"""The frequency sketch behind admission (sidecar/cache/sketch.py).

Rules: counters saturate at 15; a reset halves every count and clears the
doorkeeper; keys seen once stay out of the counters; between resets an
estimate is never below the true count (capped at 15).
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.cache.sketch import SAMPLE_FACTOR, FrequencySketch


def fill(sketch: FrequencySketch, key_hash: int, times: int) -> None:
    for _ in range(times):
        sketch.increment(key_hash)


def test_sketch_unseen_key_estimates_zero() -> None:
    """A key never incremented estimates 0 in an empty sketch."""
    assert FrequencySketch(100).frequency(hash(b"never")) == 0


def test_sketch_repeated_increments_counted_exactly() -> None:
    """With few keys, each estimate equals the number of increments."""
    sketch = FrequencySketch(1000)
    for count in range(1, 15):
        fill(sketch, count * 7919, count)
    assert [sketch.frequency(c * 7919) for c in range(1, 15)] == list(range(1, 15))


def test_sketch_counter_saturates_at_15() -> None:
    """Counters are 4 bits: a hundred increments still estimate 15."""
    sketch = FrequencySketch(1000)
    fill(sketch, 42, 100)
    assert sketch.frequency(42) == 15


def test_sketch_saturated_key_leaves_neighbours_alone() -> None:
    """Saturating one key's counters does not lift an unrelated key's estimate."""
    sketch = FrequencySketch(1000)
    fill(sketch, 42, 100)
    fill(sketch, 43, 3)
    assert sketch.frequency(43) == 3


def test_sketch_reset_halves_counts() -> None:
    """A reset halves each counted sighting (rounding down); the doorkeeper's one
    sighting is forgotten with the doorkeeper."""
    sketch = FrequencySketch(1000)
    fill(sketch, 1, 15)
    fill(sketch, 2, 9)
    fill(sketch, 3, 5)
    sketch.reset()
    # 15 sightings = doorkeeper + 14 counted -> 7; 9 -> 8 counted -> 4; 5 -> 2.
    assert [sketch.frequency(k) for k in (1, 2, 3)] == [7, 4, 2]


def test_sketch_reset_happens_at_sample_limit() -> None:
    """After SAMPLE_FACTOR * capacity increments the sketch resets by itself."""
    capacity = 64
    sketch = FrequencySketch(capacity)
    fill(sketch, 5, 10)
    for key in range(1000, 1000 + SAMPLE_FACTOR * capacity - 11):
        sketch.increment(key)
    assert (sketch.resets, sketch.frequency(5)) == (0, 10)
    sketch.increment(2**40)
    assert (sketch.resets, sketch.frequency(5)) == (1, 4)


def test_sketch_reset_halves_sample_count() -> None:
    """A reset halves the sample count, so the next reset comes half a period later."""
    sketch = FrequencySketch(64)
    for key in range(sketch.sample_limit):
        sketch.increment(key)
    assert sketch.samples == sketch.sample_limit // 2


def counted(sketch: FrequencySketch) -> int:
    """The sum of every 4-bit counter in the sketch's table."""
    return sum(
        (word >> shift) & 15 for word in sketch._table for shift in range(0, 64, 4)
    )


def test_sketch_doorkeeper_keeps_one_time_keys_out_of_counters() -> None:
    """Keys seen once set doorkeeper bits; only its rare false positives reach
    the counters (without it, 5,000 keys would add about 20,000 counts)."""
    sketch = FrequencySketch(1000)
    for key in range(5000):
        sketch.increment(key * 2654435761)
    assert counted(sketch) < 0.1 * 4 * 5000


def test_sketch_second_sighting_reaches_counters() -> None:
    """The doorkeeper passes a key's second sighting on to the counters."""
    sketch = FrequencySketch(1000)
    sketch.increment(777)
    assert counted(sketch) == 0
    sketch.increment(777)
    assert counted(sketch) == 4


def test_sketch_doorkeeper_answers_for_first_sighting() -> None:
    """A key seen once estimates 1, from the doorkeeper alone."""
    sketch = FrequencySketch(1000)
    sketch.increment(12345)
    assert sketch.frequency(12345) == 1


def test_sketch_reset_clears_doorkeeper() -> None:
    """After a reset a key seen once before estimates 0 again."""
    sketch = FrequencySketch(1000)
    sketch.increment(12345)
    sketch.reset()
    assert sketch.frequency(12345) == 0


def test_sketch_clear_forgets_everything() -> None:
    """clear() returns the sketch to its empty state."""
    sketch = FrequencySketch(100)
    fill(sketch, 9, 9)
    sketch.clear()
    assert (sketch.frequency(9), sketch.samples) == (0, 0)


def test_sketch_capacity_below_one_refused() -> None:
    """A sketch needs room for at least one entry."""
    with pytest.raises(ValueError, match="at least 1"):
        FrequencySketch(0)


@settings(max_examples=60, deadline=None)
@given(
    capacity=st.integers(1, 300),
    keys=st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=30),
    picks=st.lists(st.integers(0, 29), max_size=1500),
)
def test_sketch_estimate_never_below_true_count(
    capacity: int, keys: list[int], picks: list[int]
) -> None:
    """Between resets, every estimate is at least min(true count, 15)."""
    sketch = FrequencySketch(capacity)
    counts: Counter[int] = Counter()
    for pick in picks:
        key = keys[pick % len(keys)]
        resets = sketch.resets
        sketch.increment(key)
        if sketch.resets != resets:
            counts.clear()  # a reset ages history; start counting afresh
            continue
        counts[key] += 1
        assert sketch.frequency(key) >= min(counts[key], 15)
    for key, count in counts.items():
        assert sketch.frequency(key) >= min(count, 15)


def _state(sketch: FrequencySketch) -> tuple[bytes, bytes, int, int]:
    return (sketch._table.tobytes(), bytes(sketch._door), sketch.samples, sketch.resets)


def test_sketch_increment_says_saturated_once_every_counter_is_full() -> None:
    """increment returns True from the sighting that fills the key's counters."""
    sketch = FrequencySketch(1000)
    answers = [sketch.increment(hash(b"hot")) for _ in range(20)]
    # The first sighting only sets the doorkeeper bit; then 15 raise the counters.
    assert answers == [False] * 15 + [True] * 5
    assert sketch.frequency(hash(b"hot")) == 15


@given(st.lists(st.integers(0, 40), min_size=1, max_size=400))
@settings(max_examples=50, deadline=None)
def test_sketch_tick_for_a_saturated_key_equals_increment(order: list[int]) -> None:
    """For a key increment called saturated, tick leaves the same state as increment."""
    one, other = FrequencySketch(8), FrequencySketch(8)
    saturated: dict[int, int] = {}
    for key in order:
        h = hash(b"k%d" % key)
        if saturated.get(key) == one.generation:
            one.tick()
        else:
            generation = one.generation
            if one.increment(h):
                saturated[key] = generation
        other.increment(h)
        assert _state(one) == _state(other)


def test_sketch_generation_moves_on_reset_and_clear() -> None:
    """A reset and a clear both start a new generation (saturation forgotten)."""
    sketch = FrequencySketch(10)
    first = sketch.generation
    sketch.reset()
    assert sketch.generation == first + 1
    sketch.clear()
    assert sketch.generation == first + 2
    assert sketch.increment(hash(b"x")) is False
