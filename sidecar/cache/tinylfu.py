"""The memory tier's eviction policy: W-TinyLFU with an adaptive window.

``WTinyLFU`` keeps entries in three LRU segments: the admission ``window``
(new entries land here) and a main region split SLRU-style into
``probation`` (entries admitted from the window) and ``protected`` (entries
hit again while in probation; at most 80% of the main region). When the
window overflows, its LRU entry becomes a candidate for the main region and
``admit()`` lets it in only if the frequency sketch (``cache/sketch.py``)
says it is asked for more often than the main region's victim (probation's
LRU entry). A scan churns the small window and leaves the frequently used
main region alone, while a new popular key gets in after a few hits.

The window's share of capacity adapts by hill climbing (``_Climber``): every
sample period (``20 * max_entries`` lookups, at least 1,000) the hit ratio is
compared with the previous period's and the window grows or shrinks by one
step. The direction reverses when the hit ratio dropped, the step decays by
2% a period and starts over at full size when the hit ratio moves by 5 points
or more (the workload changed). Recency-heavy traffic grows the window
towards plain LRU; frequency-heavy traffic shrinks it towards pure TinyLFU.

Also here: ``LRU``, the same interface with least-recently-used eviction, for
comparison in ``sidecar simulate``.
Not here: storing or sizing values (callers pass ``weight``, usually the
stored bytes), metrics (the memory tier turns ``evictions`` and ``stats()``
into ``sidecar_cache_*{tier="memory"}``), the simulator (``simulate.py``).

Invariants:
- after every call, ``len(cache) <= max_entries`` and ``cache.weight <=
  max_weight``; ``len`` and ``weight`` count exactly the entries held,
  including expired ones not yet noticed;
- every key is in exactly one segment, each an ``OrderedDict`` in LRU-to-MRU
  order, so operations are O(1) except a window resize, which moves at most
  the window's worth of entries once per sample period (O(1) amortised);
- ``get()`` records the access in the sketch, hit or miss, and feeds the
  climber; ``put()``, ``pop()`` and ``in`` record nothing, so a get-miss
  followed by a put counts once;
- ``put()`` returns every entry it removed to respect the ceilings, possibly
  the one just put (it lost admission, or weighs more than ``max_weight``
  and was refused); ``evictions`` counts every entry ever returned so.
  Replacing a key's value, ``pop()`` and expiry are not evictions.

Known limitations: expired entries leave only when looked up or when they
reach the LRU end of the main region (no timer wheel), so until then they
take room and count in ``len`` and ``weight``. The climber needs one sample
period per step, so a cache of 100,000 entries takes millions of lookups to
move its window far; until then it behaves as W-TinyLFU with a 1% window.
Keys reach the sketch through ``hash()``, which Python salts per process for
bytes and str (the memory tier's digest keys) but not for ints, so a client
choosing int keys could aim collisions at a victim's counters. Not
thread-safe: the event-loop thread owns each instance, and no call awaits.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final, Generic, TypeAlias, TypeVar

from sidecar import log
from sidecar.cache.sketch import FrequencySketch

V = TypeVar("V")
Key: TypeAlias = bytes | int | str
Clock: TypeAlias = Callable[[], float]
Evicted: TypeAlias = list[tuple[Key, V]]

_WINDOW: Final = 0
_PROBATION: Final = 1
_PROTECTED: Final = 2

_PROTECTED_SHARE: Final = 0.8
_INITIAL_WINDOW_SHARE: Final = 0.01
_MAX_WINDOW_SHARE: Final = 0.8
_STEP: Final = 0.0625
_STEP_DECAY: Final = 0.98
_RESTART_THRESHOLD: Final = 0.05
# Twice the period the literature suggests: shorter periods made the climber
# chase sampling noise on the loop and web12 traces (bench/bench_tinylfu.py).
_PERIOD_FACTOR: Final = 20
_MIN_PERIOD: Final = 1000


class _Entry(Generic[V]):
    __slots__ = ("expires_at", "saturated", "segment", "value", "weight")

    def __init__(
        self, value: V, weight: int, expires_at: float | None, segment: int
    ) -> None:
        self.value = value
        self.weight = weight
        self.expires_at = expires_at
        self.segment = segment
        # The sketch generation in which this key's estimate was seen
        # saturated (-1: not seen so); W-TinyLFU only.
        self.saturated = -1


def _check_ceilings(max_entries: int, max_weight: int | None) -> None:
    if max_entries < 1:
        raise ValueError(f"max_entries must be at least 1, got {max_entries}")
    if max_weight is not None and max_weight < 1:
        raise ValueError(f"max_weight must be at least 1, got {max_weight}")


def _check_put(weight: int, ttl_s: float | None) -> None:
    if weight < 0:
        raise ValueError(f"weight must be 0 or more, got {weight}")
    if ttl_s is not None and not ttl_s > 0:
        raise ValueError(f"ttl_s must be a positive number of seconds, got {ttl_s}")


class LRU(Generic[V]):
    """Least-recently-used eviction under the same ceilings and contract."""

    def __init__(
        self,
        max_entries: int,
        max_weight: int | None = None,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        _check_ceilings(max_entries, max_weight)
        self.max_entries = max_entries
        self.max_weight = max_weight
        self._clock = clock
        self._data: OrderedDict[Key, _Entry[V]] = OrderedDict()
        self._weight = 0
        self.evictions = 0

    @property
    def weight(self) -> int:
        """Total weight of the entries held."""
        return self._weight

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Key) -> bool:
        return self._live(key) is not None

    def get(self, key: Key) -> V | None:
        """The value, or None if absent or expired; marks it most recent."""
        entry = self._live(key)
        if entry is None:
            return None
        self._data.move_to_end(key)
        return entry.value

    def put(
        self, key: Key, value: V, *, weight: int = 1, ttl_s: float | None = None
    ) -> Evicted[V]:
        """Store the value; return the entries removed to respect the ceilings."""
        _check_put(weight, ttl_s)
        old = self._data.pop(key, None)
        if old is not None:
            self._weight -= old.weight
        if self.max_weight is not None and weight > self.max_weight:
            self.evictions += 1
            return [(key, value)]
        expires_at = None if ttl_s is None else self._clock() + ttl_s
        self._data[key] = _Entry(value, weight, expires_at, _WINDOW)
        self._weight += weight
        evicted: Evicted[V] = []
        while len(self._data) > self.max_entries or (
            self.max_weight is not None and self._weight > self.max_weight
        ):
            victim, entry = self._data.popitem(last=False)
            self._weight -= entry.weight
            evicted.append((victim, entry.value))
        self.evictions += len(evicted)
        return evicted

    def pop(self, key: Key) -> V | None:
        """Remove the key; its value, or None if absent or expired."""
        entry = self._live(key)
        if entry is None:
            return None
        del self._data[key]
        self._weight -= entry.weight
        return entry.value

    def clear(self) -> None:
        """Remove every entry (not counted as evictions)."""
        self._data.clear()
        self._weight = 0

    def stats(self) -> dict[str, Any]:
        """Entry count, weight, ceilings and evictions."""
        return {
            "policy": "lru",
            "entries": len(self._data),
            "weight": self._weight,
            "max_entries": self.max_entries,
            "max_weight": self.max_weight,
            "evictions": self.evictions,
        }

    def _live(self, key: Key) -> _Entry[V] | None:
        """The key's entry, dropping it first if it has expired."""
        entry = self._data.get(key)
        if entry is not None and self._expired(entry):
            del self._data[key]
            self._weight -= entry.weight
            return None
        return entry

    def _expired(self, entry: _Entry[V]) -> bool:
        return entry.expires_at is not None and self._clock() >= entry.expires_at


class _Climber:
    """Hill climbing over the window share, one decision per sample period.

    A drop right after a period in which the share could not move (it sat at
    a bound) is not held against the direction: the change was noise, not a
    verdict, unless it is as large as a workload change. Without this rule
    the window left a bound whenever noise dipped and paid for the excursion.
    """

    def __init__(self) -> None:
        self.direction = 1
        self.step = _STEP
        self.previous_ratio = 0.0
        self.moved = True

    def next_share(self, share: float, ratio: float) -> float:
        change = ratio - self.previous_ratio
        self.previous_ratio = ratio
        if change < 0 and (self.moved or change <= -_RESTART_THRESHOLD):
            self.direction = -self.direction
        if abs(change) >= _RESTART_THRESHOLD:
            self.step = _STEP
        else:
            self.step *= _STEP_DECAY
        target = min(_MAX_WINDOW_SHARE, max(0.0, share + self.direction * self.step))
        self.moved = target != share
        return target


class WTinyLFU(Generic[V]):
    """W-TinyLFU: LRU window, SLRU main region, sketch-based admission.

    Segment ceilings apply to the entry count and, when ``max_weight`` is
    set, to weight: the window holds at most ``window_share`` of each (at
    least one entry), protected at most 80% of what the window leaves.
    Probation has no ceiling of its own: the main region evicts only when the
    whole cache is over a ceiling, so an underfull window lends it room.
    """

    def __init__(
        self,
        max_entries: int,
        max_weight: int | None = None,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        _check_ceilings(max_entries, max_weight)
        self.max_entries = max_entries
        self.max_weight = max_weight
        self._clock = clock
        self._sketch = FrequencySketch(max_entries)
        self._entries: dict[Key, _Entry[V]] = {}
        # One OrderedDict per segment, LRU first, indexed by _Entry.segment.
        # An entry between segments (a candidate being judged) is in
        # _entries and the totals but in no segment.
        self._segments: tuple[OrderedDict[Key, _Entry[V]], ...] = (
            OrderedDict(),
            OrderedDict(),
            OrderedDict(),
        )
        self._window, self._probation, self._protected = self._segments
        self._seg_weight = [0, 0, 0]
        self._weight = 0
        self.evictions = 0
        self._period = max(_MIN_PERIOD, _PERIOD_FACTOR * max_entries)
        self._samples = 0
        self._sample_hits = 0
        self._climber = _Climber()
        self._set_window_share(_INITIAL_WINDOW_SHARE)

    # -- public interface ------------------------------------------------

    @property
    def weight(self) -> int:
        """Total weight of the entries held."""
        return self._weight

    @property
    def window_share(self) -> float:
        """The window's current share of the ceilings (0.0 to 0.8)."""
        return self._share

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Key) -> bool:
        return self._live(key) is not None

    def get(self, key: Key) -> V | None:
        """The value, or None if absent or expired; records the access."""
        entry = self._entries.get(key)
        sketch = self._sketch
        if entry is not None and entry.saturated == sketch.generation:
            # A hot key: the sighting would change no counter (sketch.py).
            sketch.tick()
        else:
            generation = sketch.generation
            if sketch.increment(hash(key)) and entry is not None:
                entry.saturated = generation
        if entry is not None and entry.expires_at is not None and self._expired(entry):
            self._unlink(key, entry)
            entry = None
        self._samples += 1
        if entry is not None:
            self._sample_hits += 1
            segment = entry.segment
            if segment == _PROBATION:
                self._promote(key, entry)
            else:
                self._segments[segment].move_to_end(key)
        if self._samples >= self._period:
            self._end_period()
        return None if entry is None else entry.value

    def put(
        self, key: Key, value: V, *, weight: int = 1, ttl_s: float | None = None
    ) -> Evicted[V]:
        """Store the value; return the entries removed to respect the ceilings.

        An entry heavier than ``max_weight`` is refused: the key's old value
        (if any) is dropped and ``[(key, value)]`` is returned.
        """
        _check_put(weight, ttl_s)
        expires_at = None if ttl_s is None else self._clock() + ttl_s
        entry = self._entries.get(key)
        if self.max_weight is not None and weight > self.max_weight:
            if entry is not None:
                self._unlink(key, entry)
            self.evictions += 1
            return [(key, value)]
        evicted: Evicted[V] = []
        if entry is not None:
            self._replace(key, entry, value, weight, expires_at)
        elif self._window_weight_max is not None and weight > self._window_weight_max:
            # Too heavy for the window: it would push every other window
            # entry out, so it competes for the main region at once.
            entry = _Entry(value, weight, expires_at, _PROBATION)
            self._entries[key] = entry
            self._weight += weight
            self._admit_candidate(key, entry, evicted)
        else:
            entry = _Entry(value, weight, expires_at, _WINDOW)
            self._entries[key] = entry
            self._window[key] = entry
            self._seg_weight[_WINDOW] += weight
            self._weight += weight
        self._rebalance(evicted)
        self.evictions += len(evicted)
        return evicted

    def pop(self, key: Key) -> V | None:
        """Remove the key; its value, or None if absent or expired."""
        entry = self._live(key)
        if entry is None:
            return None
        self._unlink(key, entry)
        return entry.value

    def clear(self) -> None:
        """Remove every entry and forget the access history."""
        self._entries.clear()
        for segment in self._segments:
            segment.clear()
        self._seg_weight = [0, 0, 0]
        self._weight = 0
        self._sketch.clear()
        self._samples = self._sample_hits = 0
        self._climber = _Climber()
        self._set_window_share(_INITIAL_WINDOW_SHARE)

    def admit(self, candidate: Key, victim: Key) -> bool:
        """Whether the window's candidate should replace the main victim.

        Ties go to the victim: in a cyclic scan every key is equally
        frequent, and admitting on ties would turn the main region into LRU,
        which keeps nothing of a loop longer than the cache.
        """
        candidate_frequency = self._sketch.frequency(hash(candidate))
        victim_frequency = self._sketch.frequency(hash(victim))
        admitted = candidate_frequency > victim_frequency
        if log.cache.isEnabledFor(logging.DEBUG):
            log.cache.debug(
                "cache.admission",
                extra={
                    "tier": "memory",
                    "admitted": admitted,
                    "candidate_frequency": candidate_frequency,
                    "victim_frequency": victim_frequency,
                },
            )
        return admitted

    def stats(self) -> dict[str, Any]:
        """Sizes per segment, window share, ceilings and evictions."""
        return {
            "policy": "wtinylfu",
            "entries": len(self._entries),
            "weight": self._weight,
            "max_entries": self.max_entries,
            "max_weight": self.max_weight,
            "window": len(self._window),
            "probation": len(self._probation),
            "protected": len(self._protected),
            "window_weight": self._seg_weight[_WINDOW],
            "probation_weight": self._seg_weight[_PROBATION],
            "protected_weight": self._seg_weight[_PROTECTED],
            "window_share": self._share,
            "window_max_entries": self._window_max,
            "evictions": self.evictions,
            "sketch_resets": self._sketch.resets,
        }

    # -- moving entries --------------------------------------------------

    def _live(self, key: Key) -> _Entry[V] | None:
        """The key's entry, dropping it first if it has expired."""
        entry = self._entries.get(key)
        if entry is not None and self._expired(entry):
            self._unlink(key, entry)
            return None
        return entry

    def _promote(self, key: Key, entry: _Entry[V]) -> None:
        """A probation hit: the entry earns protection (SLRU)."""
        self._move(key, entry, _PROTECTED)
        self._demote_protected_overflow()

    def _replace(
        self,
        key: Key,
        entry: _Entry[V],
        value: V,
        weight: int,
        expires_at: float | None,
    ) -> None:
        self._segments[entry.segment].move_to_end(key)
        self._seg_weight[entry.segment] += weight - entry.weight
        self._weight += weight - entry.weight
        entry.value, entry.weight, entry.expires_at = value, weight, expires_at

    def _move(self, key: Key, entry: _Entry[V], segment: int) -> None:
        """Move an entry to the MRU end of another segment."""
        del self._segments[entry.segment][key]
        self._seg_weight[entry.segment] -= entry.weight
        entry.segment = segment
        self._segments[segment][key] = entry
        self._seg_weight[segment] += entry.weight

    def _unlink(self, key: Key, entry: _Entry[V]) -> None:
        """Remove an entry from the index, its segment and the totals."""
        del self._entries[key]
        segment = self._segments[entry.segment]
        if segment.pop(key, None) is not None:
            self._seg_weight[entry.segment] -= entry.weight
        self._weight -= entry.weight

    def _evict(self, key: Key, entry: _Entry[V], evicted: Evicted[V]) -> None:
        self._unlink(key, entry)
        evicted.append((key, entry.value))

    # -- ceilings and admission ------------------------------------------

    def _over_ceiling(self) -> bool:
        if len(self._entries) > self.max_entries:
            return True
        return self.max_weight is not None and self._weight > self.max_weight

    def _window_over(self) -> bool:
        if len(self._window) > self._window_max:
            return True
        limit = self._window_weight_max
        return limit is not None and self._seg_weight[_WINDOW] > limit

    def _protected_over(self) -> bool:
        if len(self._protected) > self._protected_max:
            return True
        limit = self._protected_weight_max
        return limit is not None and self._seg_weight[_PROTECTED] > limit

    def _demote_protected_overflow(self) -> None:
        protected = self._protected
        while protected and self._protected_over():
            key, entry = next(iter(protected.items()))
            self._move(key, entry, _PROBATION)

    def _main_victim(self) -> tuple[Key, _Entry[V]] | None:
        """The main region's LRU entry: probation first, then protected."""
        for segment in (self._probation, self._protected):
            if segment:
                return next(iter(segment.items()))
        return None

    def _rebalance(self, evicted: Evicted[V]) -> None:
        """Restore every segment ceiling, evicting only to meet the totals."""
        self._demote_protected_overflow()
        window = self._window
        while window and self._window_over():
            key, entry = window.popitem(last=False)
            self._seg_weight[_WINDOW] -= entry.weight
            entry.segment = _PROBATION
            self._admit_candidate(key, entry, evicted)
        # Only a value replaced by a heavier one gets here still over.
        while self._over_ceiling():
            victim = self._main_victim() or next(iter(window.items()), None)
            if victim is None:
                break
            self._evict(victim[0], victim[1], evicted)

    def _admit_candidate(self, key: Key, entry: _Entry[V], evicted: Evicted[V]) -> None:
        """Let a candidate (in no segment) into probation, or evict it.

        While the cache is over a ceiling the candidate duels the main
        region's LRU victim and the loser leaves; an expired entry loses
        without a duel. A heavy candidate may need several duels.
        """
        while self._over_ceiling():
            victim = self._main_victim()
            if victim is None:
                self._evict(key, entry, evicted)
                return
            victim_key, victim_entry = victim
            if self._expired(victim_entry):
                self._evict(victim_key, victim_entry, evicted)
            elif self._expired(entry) or not self.admit(key, victim_key):
                self._evict(key, entry, evicted)
                return
            else:
                self._evict(victim_key, victim_entry, evicted)
        self._probation[key] = entry
        self._seg_weight[_PROBATION] += entry.weight

    def _expired(self, entry: _Entry[V]) -> bool:
        return entry.expires_at is not None and self._clock() >= entry.expires_at

    # -- window size -----------------------------------------------------

    def _end_period(self) -> None:
        ratio = self._sample_hits / self._samples
        self._samples = self._sample_hits = 0
        share = self._climber.next_share(self._share, ratio)
        if share != self._share:
            self._resize_window(share)

    def _set_window_share(self, share: float) -> None:
        self._share = share
        self._window_max = max(1, round(share * self.max_entries))
        main = max(0, self.max_entries - self._window_max)
        self._protected_max = math.floor(_PROTECTED_SHARE * main)
        self._window_weight_max: int | None = None
        self._protected_weight_max: int | None = None
        if self.max_weight is not None:
            self._window_weight_max = max(1, round(share * self.max_weight))
            main_weight = max(0, self.max_weight - self._window_weight_max)
            self._protected_weight_max = math.floor(_PROTECTED_SHARE * main_weight)

    def _resize_window(self, share: float) -> None:
        """Apply a new share by moving entries between window and main.

        Growing pulls the main region's LRU entries into the window (MRU
        end); shrinking pushes the window's LRU entries into probation. The
        totals do not change, so nothing is evicted.
        """
        self._set_window_share(share)
        while self._window_has_room():
            victim = self._main_victim()
            if victim is None:
                break
            self._move(victim[0], victim[1], _WINDOW)
        evicted: Evicted[V] = []
        self._rebalance(evicted)
        assert not evicted, "a resize moves entries, it never evicts"

    def _window_has_room(self) -> bool:
        if len(self._window) >= self._window_max:
            return False
        limit = self._window_weight_max
        return limit is None or self._seg_weight[_WINDOW] < limit
