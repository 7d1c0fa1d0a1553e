"""Frequency estimates for the memory tier's admission decision.

``FrequencySketch`` answers "about how often was this key asked for lately?"
in constant time and about 40 bytes per cache entry: a count-min sketch of
4-bit counters behind a doorkeeper, with periodic halving, as TinyLFU
describes.

Layout. The counters live in ``_table``, an ``array('Q')`` of 64-bit words
(4 words per cache entry, rounded up to a power of two); each word holds 16
counters of 4 bits, in four groups of four. A key maps to one word and takes
one counter from each group, so its four "rows" cost one table read and one
write. Its estimate is the smallest of the four counters, and an increment
raises only the counters equal to that minimum (conservative update, which
inflates other keys' estimates less). The doorkeeper is a one-probe bloom
filter in a ``bytearray``: a key's first sighting in a sample only sets its
bit, so keys seen once never reach the counters.

A key whose estimate is saturated (four counters at 15, doorkeeper bit
set) stays so until the next reset, so ``increment`` reports saturation and
a caller that remembers it (tinylfu.py, per entry and ``generation``) calls
``tick`` for the next sightings: the same state, without the hashing and
counter arithmetic, for the hottest keys, whose lookups are most of them.

Not here: the eviction policy that consults the estimates
(``cache/tinylfu.py``); hashing keys to integers (callers pass ``hash(key)``).

Invariants:
- every counter stays in 0..15 (saturating), and ``frequency()`` in 0..15;
- between two resets, ``frequency(h)`` is never below the number of
  ``increment(h)`` calls made since the last reset (capped at 15);
- when ``samples`` reaches ``sample_limit`` (``SAMPLE_FACTOR`` times the
  capacity), every counter is halved (rounding down), the doorkeeper is
  cleared and ``samples`` halves, so old popularity fades with a half-life
  of about one sample period.

``SAMPLE_FACTOR`` is 16 rather than the paper's 10: with longer samples the
counters of a looping scan's keys differ less by phase, so fewer of them
displace residents (measured on the loop and multi1 traces; see
``bench/bench_tinylfu.py``).

Known limitations: the doorkeeper takes at most 2**24 bits (2 MiB), which is
64 bits per entry up to 262,144 entries; above that its false-positive rate
grows, one-time keys start to reach the counters and rare keys' estimates
rise a little. Not thread-safe: the event-loop thread owns each instance.
"""

from __future__ import annotations

from array import array
from typing import Final

_MASK64: Final = (1 << 64) - 1
# Clears the top bit of each 4-bit counter after a one-bit right shift.
_HALVE_MASK: Final = 0x7777_7777_7777_7777
_MAX_COUNT: Final = 15
# The splitmix64 finaliser, inlined where used: `hash()` of a small int is
# the int itself, and without mixing keys 0, 1, 2, ... would share table
# words and counters in regular patterns (a looping scan then defeats the
# admission filter). A single multiply is not enough for that case.
_MIX1: Final = 0xBF58_476D_1CE4_E5B9
_MIX2: Final = 0x94D0_49BB_1331_11EB
# Bits of doorkeeper per cache entry (one probe: about 7% false positives
# when the sample holds five distinct keys per entry).
_DOOR_BITS_PER_ENTRY: Final = 64
_MAX_DOOR_LOG2: Final = 24
SAMPLE_FACTOR: Final = 16
_WORDS_PER_ENTRY: Final = 4


def _ceil_log2(n: int) -> int:
    return max(0, (n - 1).bit_length())


class FrequencySketch:
    """Count-min sketch of 4-bit counters with a doorkeeper and halving.

    Bits of the mixed hash: 0..31 pick the table word, 32..39 pick one
    counter in each of the word's four groups, and the top bits (40..63 at
    most) pick the doorkeeper bit; the three uses never share a bit.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"sketch capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        words = 1 << min(32, max(4, _ceil_log2(capacity * _WORDS_PER_ENTRY)))
        self._mask = words - 1
        self._table = array("Q", bytes(8 * words))
        door_log2 = _ceil_log2(capacity * _DOOR_BITS_PER_ENTRY)
        door_log2 = min(_MAX_DOOR_LOG2, max(6, door_log2))
        self._door_shift = 64 - door_log2
        self._door = bytearray(1 << (door_log2 - 3))
        self.sample_limit = SAMPLE_FACTOR * capacity
        self.samples = 0
        self.resets = 0
        # Moves on every reset and clear: a key found saturated (see
        # ``increment``) stays so until this changes.
        self.generation = 0

    def increment(self, key_hash: int) -> bool:
        """Record one sighting of the key; may trigger a reset.

        Returns True when the key's estimate is now saturated (its four
        counters at 15, its doorkeeper bit set) and no reset happened: until
        ``generation`` moves, another sighting of it changes nothing but the
        sample count, so a caller that remembers this may call ``tick``
        instead. One function on purpose: it runs on every cache lookup, and
        a call costs as much here as a few of the lines below.
        """
        saturated = False
        h = key_hash & _MASK64
        h = ((h ^ (h >> 30)) * _MIX1) & _MASK64
        h = ((h ^ (h >> 27)) * _MIX2) & _MASK64
        h ^= h >> 31
        bit = h >> self._door_shift
        door = self._door
        byte, flag = bit >> 3, 1 << (bit & 7)
        if not door[byte] & flag:
            door[byte] |= flag
        else:
            table = self._table
            index = h & self._mask
            word = table[index]
            sel = (h >> 32) & 0xFF
            # Group g's counter is nibble 4g + (two bits of sel), at bit
            # offset 16g + 4 * (sel >> 2g & 3); the masks compute exactly that.
            o0 = (sel & 3) << 2
            o1 = 16 + (sel & 12)
            o2 = 32 + ((sel >> 2) & 12)
            o3 = 48 + ((sel >> 4) & 12)
            c0 = (word >> o0) & 15
            c1 = (word >> o1) & 15
            c2 = (word >> o2) & 15
            c3 = (word >> o3) & 15
            low = min(c0, c1, c2, c3)
            # Conservative update raises every minimal counter, so the
            # minimum becomes low + 1 (or stays 15).
            saturated = low >= _MAX_COUNT - 1
            if low != _MAX_COUNT:
                # Conservative update: raising only the minimal counters keeps
                # the estimate exact for this key while adding less noise.
                if c0 == low:
                    word += 1 << o0
                if c1 == low:
                    word += 1 << o1
                if c2 == low:
                    word += 1 << o2
                if c3 == low:
                    word += 1 << o3
                table[index] = word
        self.samples += 1
        if self.samples >= self.sample_limit:
            self.reset()
            return False
        return saturated

    def tick(self) -> None:
        """``increment`` for a key known saturated in this ``generation``."""
        self.samples += 1
        if self.samples >= self.sample_limit:
            self.reset()

    def frequency(self, key_hash: int) -> int:
        """The estimated sightings of the key since about one sample ago."""
        h = key_hash & _MASK64
        h = ((h ^ (h >> 30)) * _MIX1) & _MASK64
        h = ((h ^ (h >> 27)) * _MIX2) & _MASK64
        h ^= h >> 31
        bit = h >> self._door_shift
        seen = 1 if self._door[bit >> 3] & (1 << (bit & 7)) else 0
        word = self._table[h & self._mask]
        sel = (h >> 32) & 0xFF
        low = min(
            (word >> ((sel & 3) << 2)) & 15,
            (word >> (16 + (sel & 12))) & 15,
            (word >> (32 + ((sel >> 2) & 12))) & 15,
            (word >> (48 + ((sel >> 4) & 12))) & 15,
        )
        return min(_MAX_COUNT, low + seen)

    def reset(self) -> None:
        """Halve every counter and clear the doorkeeper (ages the history).

        O(table size), once per ``sample_limit`` increments: O(1) amortised.
        """
        self._table = array("Q", [(w >> 1) & _HALVE_MASK for w in self._table])
        self._door = bytearray(len(self._door))
        self.samples //= 2
        self.resets += 1
        self.generation += 1

    def clear(self) -> None:
        """Forget everything, as if newly built."""
        self._table = array("Q", bytes(8 * len(self._table)))
        self._door = bytearray(len(self._door))
        self.samples = 0
        self.generation += 1
