"""zstd compression for the disk tier, with dictionaries trained per content class.

Owns: the codec of stored blobs (raw or zstd), the content classes that pick a
dictionary (``chat``, ``completion``, ``sse``, ``embedding``, ``other``), the
samples each class collects, training (``zstandard.train_dictionary``, on a
background thread or on demand), the table of dictionaries by id, and bounded
decompression. Not here: where blobs and dictionaries live (``store.py``
persists both under the ``b/`` and ``d/`` prefixes and records the dictionary
id of every blob), or what is cacheable (``keys.py``).

Why dictionaries: answers under 2 KiB are mostly repeated structure (field
names, ids, model names, SSE framing). Alone, such a body gives zstd too little
history to find it; a dictionary trained on recent answers of the same class
supplies that history, which ``bench/bench_compress.py`` measures.

Invariants:
- A dictionary id is never reused for different bytes within one store: ids
  grow from the highest id restored by ``add_dictionary``. Id 0 means "no
  dictionary".
- Frames are written without zstd's own dictionary id and checksum (the blob
  header carries the id, and the store verifies the sha256 of every read), but
  with the content size, so ``decompress`` can refuse an oversized frame
  before allocating anything.
- ``decompress`` never returns more than ``max_size`` bytes, nor allocates
  more than that plus one 64 KiB chunk. A frame whose header states its size
  is checked against the caller's expectation first (``ZstdDecompressor.decompress(max_output_size=...)`` is
  ignored by python-zstandard when the frame states its size); a frame that
  does not state it is read through a capped stream reader.
- zstd errors are translated here, once, into ``CompressionError`` (a
  ``SidecarError``; it cannot derive from ``store.StoreError`` without an
  import cycle, and the store turns it into a corrupt miss anyway).

Threads: ``compress`` and ``decompress`` are called from one thread at a time
(the disk store's executor thread); they reuse zstd contexts that are not
thread safe. Training runs on this object's own single background thread.
``_lock`` guards the tables both threads touch: samples, dictionaries, the
current dictionary of each class and the id counter.

Known limitations: samples are kept in memory (at most ``sample_budget_bytes``
per class, 1 MiB by default, 5 MiB in all); a class is trained only after
``min_samples`` answers of at most ``max_sample_bytes`` that add up to four
times ``dict_size`` (zstd's trainer fails on less), so a sidecar that
restarts often keeps compressing without a dictionary for a while (its
persisted dictionaries are restored, though). Larger answers are never
sampled: dictionaries help little above a few KiB. Pinned down by
``tests/cache/test_compress.py``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import enum
import struct
import threading
from dataclasses import dataclass
from typing import Final

import zstandard

from sidecar import log
from sidecar.errors import SidecarError

DEFAULT_LEVEL: Final = 3
# 16 KiB, the manifest's default: bench/bench_compress.py measured, on answers
# under 2 KiB, a gain over plain zstd of 2.56x (4 KiB), 2.69x (8 KiB), 2.72x
# (16 KiB) and 2.75x (32 and 64 KiB); beyond 16 KiB it costs training time
# and disk for almost nothing.
DEFAULT_DICT_SIZE: Final = 16 * 1024
# The manifest's default for cache.compression.train_samples.
DEFAULT_MIN_SAMPLES: Final = 200
DEFAULT_MAX_SAMPLE_BYTES: Final = 16 * 1024
DEFAULT_SAMPLE_BUDGET_BYTES: Final = 1024 * 1024
DEFAULT_RETRAIN_AFTER: Final = 4096
# zstd's trainer fails ("Src size is incorrect") on too little input; below
# this multiple of the dictionary size it is not worth calling.
_MIN_TRAINING_RATIO: Final = 4
_STREAM_CHUNK: Final = 64 * 1024
# frame_content_size() answers -1 for a frame without a stated size, although
# the module's CONTENTSIZE_UNKNOWN constant is 2**64 - 1; accept both.
_UNKNOWN_SIZE: Final = frozenset({-1, zstandard.CONTENTSIZE_UNKNOWN})

_DICT_VERSION: Final = 1
_DICT_HEADER: Final = struct.Struct(">BBI")  # version, class index, dict id


class CompressionError(SidecarError):
    """A stored frame cannot be turned back into its bytes.

    The disk store treats it as a corrupt blob: a miss, deleted and counted.
    """


class CorruptFrameError(CompressionError):
    """The frame is malformed, or inflates beyond the size it is allowed."""


class UnknownDictionaryError(CompressionError):
    """The blob names a dictionary id this compressor does not hold."""


class ContentClass(enum.Enum):
    """The kind of answer a dictionary is trained on."""

    CHAT = "chat"
    COMPLETION = "completion"
    SSE = "sse"
    EMBEDDING = "embedding"
    OTHER = "other"


_CLASS_ORDER: Final = tuple(ContentClass)


class Codec(enum.IntEnum):
    """How a blob's payload is encoded; the value is stored in its header."""

    RAW = 0
    ZSTD = 1


def classify(*, content_type: str, stream: bool, route: str = "") -> ContentClass:
    """Pick the content class of an answer from cheap facts about it.

    A stream (or ``text/event-stream``) is ``sse`` whatever the route; other
    answers go by the route name, which the shipped manifest spells after the
    OpenAI path (``chat``, ``completions``, ``embeddings``).
    """
    if stream or content_type.startswith("text/event-stream"):
        return ContentClass.SSE
    name = route.lower()
    if "embedding" in name:
        return ContentClass.EMBEDDING
    if "chat" in name:
        return ContentClass.CHAT
    if "completion" in name:
        return ContentClass.COMPLETION
    return ContentClass.OTHER


@dataclass(frozen=True, slots=True)
class Dictionary:
    """A trained zstd dictionary, as persisted by the disk store."""

    dict_id: int
    content_class: ContentClass
    data: bytes

    def encode(self) -> bytes:
        """The persisted form: a 6-byte header, then zstd's dictionary bytes."""
        index = _CLASS_ORDER.index(self.content_class)
        return _DICT_HEADER.pack(_DICT_VERSION, index, self.dict_id) + self.data

    @classmethod
    def decode(cls, raw: bytes) -> Dictionary:
        """Parse ``encode()``'s output; raises ``CompressionError`` if malformed."""
        if len(raw) <= _DICT_HEADER.size:
            raise CompressionError("dictionary record too short")
        version, index, dict_id = _DICT_HEADER.unpack_from(raw)
        if version != _DICT_VERSION or index >= len(_CLASS_ORDER) or dict_id == 0:
            raise CompressionError("dictionary record header not recognised")
        return cls(dict_id, _CLASS_ORDER[index], raw[_DICT_HEADER.size :])


@dataclass(frozen=True, slots=True)
class Compressed:
    """One compressed payload and what its reader needs to know."""

    codec: Codec
    dict_id: int
    payload: bytes


class _Samples:
    """Recent small answers of one class, bounded by count and bytes."""

    def __init__(self, max_count: int, budget_bytes: int) -> None:
        self.items: collections.deque[bytes] = collections.deque(maxlen=max_count)
        self.total_bytes = 0
        self.budget_bytes = budget_bytes
        self.since_training = 0

    def add(self, data: bytes) -> None:
        if len(self.items) == self.items.maxlen:
            self.total_bytes -= len(self.items[0])
        self.items.append(data)
        self.total_bytes += len(data)
        self.since_training += 1
        while self.total_bytes > self.budget_bytes and len(self.items) > 1:
            self.total_bytes -= len(self.items.popleft())


class Compressor:
    """zstd with one current dictionary per content class.

    ``compress`` records small answers as samples; once a class has
    ``min_samples`` of them (and again after every ``retrain_after`` new ones)
    a dictionary is trained for it, in the background unless ``background``
    is False, and later answers of that class are compressed with it. Older
    dictionaries stay available for decompression until ``drop_dictionary``.
    """

    def __init__(
        self,
        *,
        level: int = DEFAULT_LEVEL,
        dict_size: int = DEFAULT_DICT_SIZE,
        min_samples: int = DEFAULT_MIN_SAMPLES,
        max_samples: int = 2048,
        max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES,
        sample_budget_bytes: int = DEFAULT_SAMPLE_BUDGET_BYTES,
        retrain_after: int | None = DEFAULT_RETRAIN_AFTER,
        train: bool = True,
        background: bool = True,
    ) -> None:
        self.level = level
        self.dict_size = dict_size
        self.min_samples = min_samples
        self.max_sample_bytes = max_sample_bytes
        self.retrain_after = retrain_after
        self.train_enabled = train
        self._lock = threading.Lock()
        # Guarded by _lock (compress thread and training thread).
        self._samples = {
            c: _Samples(max_samples, sample_budget_bytes) for c in ContentClass
        }
        self._dicts: dict[int, Dictionary] = {}
        self._current: dict[ContentClass, int] = {}
        self._next_id = 1
        self._training: set[ContentClass] = set()
        self._trained = 0
        self._training_failures = 0
        # zstd contexts by dictionary id (0: none). Compress thread only.
        self._cctx: dict[int, zstandard.ZstdCompressor] = {}
        self._dctx: dict[int, zstandard.ZstdDecompressor] = {}
        self._executor = (
            concurrent.futures.ThreadPoolExecutor(1, "sidecar-zstd-train")
            if train and background
            else None
        )
        # Strong references to scheduled trainings, so none is collected
        # before it runs and wait_idle() can join them.
        self._jobs: set[concurrent.futures.Future[Dictionary | None]] = set()

    # -- compress ---------------------------------------------------------

    def compress(self, data: bytes, content_class: ContentClass) -> Compressed:
        """Compress ``data`` with its class's current dictionary, if any.

        Returns a raw payload when zstd does not make it smaller.
        """
        if self.train_enabled and len(data) <= self.max_sample_bytes:
            self._record_sample(data, content_class)
        with self._lock:
            dict_id = self._current.get(content_class, 0)
        try:
            payload = self._compressor(dict_id).compress(data)
        except zstandard.ZstdError as exc:
            raise CompressionError(f"zstd compression failed: {exc}") from exc
        if len(payload) >= len(data):
            return Compressed(Codec.RAW, 0, data)
        return Compressed(Codec.ZSTD, dict_id, payload)

    def _compressor(self, dict_id: int) -> zstandard.ZstdCompressor:
        cctx = self._cctx.get(dict_id)
        if cctx is None:
            zdict = self._zstd_dict(dict_id) if dict_id else None
            cctx = zstandard.ZstdCompressor(
                level=self.level,
                dict_data=zdict,
                write_checksum=False,
                write_content_size=True,
                write_dict_id=False,
            )
            self._cctx[dict_id] = cctx
        return cctx

    def _zstd_dict(self, dict_id: int) -> zstandard.ZstdCompressionDict:
        with self._lock:
            found = self._dicts.get(dict_id)
        if found is None:
            raise UnknownDictionaryError(f"no zstd dictionary with id {dict_id}")
        return zstandard.ZstdCompressionDict(
            found.data, dict_type=zstandard.DICT_TYPE_FULLDICT
        )

    # -- decompress -------------------------------------------------------

    def decompress(
        self, payload: bytes, *, codec: Codec, dict_id: int, size: int, max_size: int
    ) -> bytes:
        """The ``size`` bytes ``payload`` encodes, never more than ``max_size``.

        Raises ``CorruptFrameError`` when the frame is malformed or does not
        inflate to exactly ``size`` bytes, ``UnknownDictionaryError`` when
        ``dict_id`` is not held.
        """
        if size > max_size:
            raise CorruptFrameError(f"blob claims {size} bytes, ceiling {max_size}")
        if codec is Codec.RAW:
            if len(payload) != size:
                raise CorruptFrameError("raw blob length differs from its header")
            return payload
        dctx = self._decompressor(dict_id)
        try:
            declared = zstandard.frame_content_size(payload)
            if declared in _UNKNOWN_SIZE:
                out = self._read_capped(dctx, payload, size)
            elif declared != size:
                raise CorruptFrameError(f"frame claims {declared} bytes, blob {size}")
            else:
                out = dctx.decompress(payload, max_output_size=size)
        except zstandard.ZstdError as exc:
            raise CorruptFrameError(f"zstd decompression failed: {exc}") from exc
        if len(out) != size:
            raise CorruptFrameError(f"frame inflated to {len(out)} bytes, not {size}")
        return out

    @staticmethod
    def _read_capped(
        dctx: zstandard.ZstdDecompressor, payload: bytes, cap: int
    ) -> bytes:
        # The frame does not state its size, so inflate in chunks and stop as
        # soon as it passes the cap: a bomb costs at most cap + one chunk.
        parts: list[bytes] = []
        total = 0
        with dctx.stream_reader(payload) as reader:
            while chunk := reader.read(_STREAM_CHUNK):
                total += len(chunk)
                if total > cap:
                    raise CorruptFrameError(f"frame inflates beyond {cap} bytes")
                parts.append(chunk)
        return b"".join(parts)

    def _decompressor(self, dict_id: int) -> zstandard.ZstdDecompressor:
        dctx = self._dctx.get(dict_id)
        if dctx is None:
            zdict = self._zstd_dict(dict_id) if dict_id else None
            dctx = zstandard.ZstdDecompressor(dict_data=zdict)
            self._dctx[dict_id] = dctx
        return dctx

    # -- dictionaries -----------------------------------------------------

    def add_dictionary(self, dictionary: Dictionary) -> None:
        """Restore a persisted dictionary; the newest of a class becomes current."""
        with self._lock:
            self._dicts[dictionary.dict_id] = dictionary
            self._next_id = max(self._next_id, dictionary.dict_id + 1)
            cls = dictionary.content_class
            if dictionary.dict_id > self._current.get(cls, 0):
                self._current[cls] = dictionary.dict_id

    def dictionary(self, dict_id: int) -> Dictionary | None:
        """The dictionary with this id, if held."""
        with self._lock:
            return self._dicts.get(dict_id)

    def current_ids(self) -> frozenset[int]:
        """Ids new blobs are compressed with; never to be dropped."""
        with self._lock:
            return frozenset(self._current.values())

    def drop_dictionary(self, dict_id: int) -> bool:
        """Forget a dictionary no blob references; refuses a current one."""
        with self._lock:
            if dict_id in self._current.values() or dict_id not in self._dicts:
                return False
            del self._dicts[dict_id]
        self._cctx.pop(dict_id, None)
        self._dctx.pop(dict_id, None)
        return True

    # -- training ---------------------------------------------------------

    def _record_sample(self, data: bytes, content_class: ContentClass) -> None:
        with self._lock:
            samples = self._samples[content_class]
            samples.add(data)
            if not self._due(content_class, samples):
                return
            self._training.add(content_class)
        if self._executor is None:
            self._train_scheduled(content_class)
            return
        job = self._executor.submit(self._train_scheduled, content_class)
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    def _due(self, content_class: ContentClass, samples: _Samples) -> bool:
        # Caller holds _lock.
        if content_class in self._training or len(samples.items) < self.min_samples:
            return False
        if samples.total_bytes < _MIN_TRAINING_RATIO * self.dict_size:
            return False
        if content_class not in self._current:
            return samples.since_training >= self.min_samples
        return (
            self.retrain_after is not None
            and samples.since_training >= self.retrain_after
        )

    def _train_scheduled(self, content_class: ContentClass) -> Dictionary | None:
        try:
            return self.train(content_class)
        finally:
            with self._lock:
                self._training.discard(content_class)

    def train(self, content_class: ContentClass) -> Dictionary | None:
        """Train a dictionary for a class from its samples now, and make it current.

        Returns None (and keeps the current one) when zstd's trainer refuses
        the samples, typically because there are too few of them.
        """
        with self._lock:
            samples = self._samples[content_class]
            items: list[bytes | bytearray | memoryview] = list(samples.items)
            samples.since_training = 0
            dict_id = self._next_id
            self._next_id += 1
        try:
            zdict = zstandard.train_dictionary(
                self.dict_size, items, dict_id=dict_id, level=self.level
            )
        except zstandard.ZstdError as exc:
            with self._lock:
                self._training_failures += 1
            log.cache.debug(
                "cache.dictionary_training_failed",
                extra={
                    "content_class": content_class.value,
                    "samples": len(items),
                    "reason": str(exc),
                },
            )
            return None
        dictionary = Dictionary(dict_id, content_class, zdict.as_bytes())
        with self._lock:
            self._dicts[dict_id] = dictionary
            self._current[content_class] = dict_id
            self._trained += 1
        log.cache.debug(
            "cache.dictionary_trained",
            extra={
                "content_class": content_class.value,
                "dict_id": dict_id,
                "samples": len(items),
                "dict_bytes": len(dictionary.data),
            },
        )
        return dictionary

    def wait_idle(self, timeout_s: float = 30.0) -> bool:
        """Wait for scheduled trainings to finish; False if some still run."""
        _, not_done = concurrent.futures.wait(list(self._jobs), timeout=timeout_s)
        return not not_done

    def stats(self) -> dict[str, int]:
        """Counters for the read models: dictionaries held, trained, failed."""
        with self._lock:
            return {
                "dictionaries": len(self._dicts),
                "dictionaries_trained": self._trained,
                "training_failures": self._training_failures,
                "samples": sum(len(s.items) for s in self._samples.values()),
            }

    def close(self) -> None:
        """Stop the training thread; a training in progress is abandoned."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
