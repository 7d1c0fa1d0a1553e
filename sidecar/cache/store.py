"""The disk tier: a content-addressed answer store in LevelDB (plyvel), zstd inside.

Owns: the on-disk layout, the byte ceiling and eviction, blob reference
counting and garbage collection, digest verification of every read, TTL
expiry on read, purge, start-up failure handling (``open_store`` and the
manifest's ``fallbacks.disk``), the degraded mode after a write error, and the
async facade that keeps plyvel off the event loop. Not here: compression and
dictionaries (``compress.py``), the memory tier and tier ordering
(``tiers.py``), what is cacheable or how an action key is made (``keys.py``),
metrics (the owner turns ``stats()`` into ``sidecar_cache_*{tier="disk"}``).

Layout, one LevelDB database, keys by prefix:

- ``b/`` + sha256 of the uncompressed answer body: a blob. Value: a 10-byte
  header (format version, codec, dictionary id, uncompressed length), then the
  payload. Equal answers share one blob, whatever their action keys.
- ``a/`` + action key (32 raw bytes): an index record. Value: a fixed 80-byte
  part (version, flags, status, created, ttl_s, upstream_duration_s, last
  access, size, blob bytes, dictionary id, digest), then route, content type
  and the header pairs, each length-prefixed. The blob's stored size and
  dictionary id are copied into the record so that opening the store needs to
  read only the (small) records to know every byte count and reference.
- ``d/`` + dictionary id (4 bytes, big-endian): a trained zstd dictionary, so
  blobs stay readable after a restart.
- ``m/format``: the layout version; a database without it, but with data, is
  not ours and counts as corrupt.

Invariants:
- The index never points at a missing blob: a blob, its dictionary (on first
  use) and the record that references it are written in one WriteBatch;
  removals delete the record before (in the same batch as) the blob.
- A blob lives while at least one record references it; the count of
  references is kept in memory (rebuilt from the records at open), and
  orphans found at open are collected.
- Every read is checked: a malformed header or record, a failed
  decompression, an oversized frame or a sha256 mismatch make the read a miss;
  the bad value is deleted (unless degraded), counted in ``corrupt`` and
  logged as ``cache.disk_corrupt``.
- ``bytes`` (keys plus values of records and blobs) stays at or under
  ``max_bytes`` after every put: the put's batch also carries the evictions.
- The in-memory state mirrors the database after every operation; when a
  write fails, it is rebuilt from the database (a batch is all or nothing).

Access order: an exact LRU in memory (an OrderedDict of action keys, oldest
first), persisted lazily: a read rewrites a record's last-access time only
when the stored one is older than ``access_persist_s`` (5 minutes by default),
so each entry costs at most one extra write per interval, and after a restart
the order is right to within that interval.

Degraded mode: after a failed write (``ENOSPC`` above all), LevelDB fails
every later write on the handle even once space is freed, while reads keep
working. So the first write error marks the store ``degraded``; reads go on,
puts are skipped and counted (``writes_skipped``), ``delete`` and ``purge``
raise ``StoreWriteError`` (an invalidation must not fail silently, so the
owner should stop serving disk hits for what it meant to invalidate), and the
owner calls
``reopen()`` every ``fallbacks.reopen_interval``, which closes and reopens the
handle when the file system has room again.

Threads: ``DiskStore`` is not thread safe; use it from one thread at a time.
``AsyncDiskStore`` runs every call in its own single-thread executor, so calls
are serialised and the event loop never blocks on plyvel or zstd.

Errors: plyvel errors are translated here, once (``compress.CompressionError``
never leaves this module: it makes a corrupt miss)::

    SidecarError
     +-- StoreError                     the disk tier failed (this module)
          +-- StoreOpenError            the directory cannot be opened
          |    +-- StoreLockedError     another process holds its LOCK
          |    +-- StoreCorruptError    LevelDB or our format reports damage
          +-- StoreWriteError           a write failed; the store is degraded
               +-- StoreFullError       the file system is full (ENOSPC/EFBIG)

Logger ``sidecar.cache``, all WARNING but one: ``cache.disk_unavailable`` and
``cache.disk_quarantined`` (at open), ``cache.disk_corrupt``,
``cache.disk_degraded``, ``cache.disk_reopen_failed`` and
``cache.disk_resync_failed``; ``cache.disk_reopened`` is INFO. Metrics: none
written here; ``stats()`` carries the counters the owner exports.

Known limitations: opening walks every record and every blob key once (to
rebuild the mirror and collect orphans), so start-up time grows with the
number of entries: about 15 microseconds an entry measured on a busy 2-core
machine (``bench/bench_store.py``), some 15 s for a million; open it off the
loop (``AsyncDiskStore.open``). Memory holds about 420 bytes per entry for
the mirror. ``max_bytes`` counts logical bytes (records and blobs, not the
few dictionaries); LevelDB's files exceed it by its write-ahead log and by
values compaction has not yet dropped. Expired entries hold their bytes until
read, evicted, or removed by ``sweep_expired()``. Entries of 4 GiB or more
are refused (lengths are 32-bit). Pinned down by ``tests/cache/test_store.py``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import enum
import functools
import hashlib
import os
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NamedTuple, ParamSpec, TypeVar

import plyvel  # type: ignore[import-untyped]

from sidecar import log
from sidecar.cache.compress import (
    Codec,
    CompressionError,
    Compressor,
    Dictionary,
    classify,
)
from sidecar.errors import SidecarError

BLOB_PREFIX: Final = b"b/"
ACTION_PREFIX: Final = b"a/"
DICT_PREFIX: Final = b"d/"
FORMAT_KEY: Final = b"m/format"
FORMAT_VERSION: Final = 1
ACTION_KEY_BYTES: Final = 32
DIGEST_BYTES: Final = 32

DEFAULT_LRU_CACHE_BYTES: Final = 32 * 1024 * 1024
# LevelDB's default is 4 MiB; 8 MiB halves level-0 flushes for a store of
# answers while bounding the log replayed at open.
DEFAULT_WRITE_BUFFER_BYTES: Final = 8 * 1024 * 1024
DEFAULT_ACCESS_PERSIST_S: Final = 300.0
_PURGE_CHUNK: Final = 1000

# version, codec, dictionary id, uncompressed length
_BLOB_HEADER: Final = struct.Struct(">BBII")
# version, flags, status, created, ttl_s, upstream_duration_s, accessed,
# size, blob bytes, dictionary id, digest
_RECORD_FIXED: Final = struct.Struct(">BBHddddIII32s")
_ACCESSED_OFFSET: Final = 1 + 1 + 2 + 8 + 8 + 8
_STR_LEN: Final = struct.Struct(">H")
_FLAG_STREAM: Final = 0x01
_FULL_MARKERS: Final = (b"No space left on device", b"File too large")


# -- errors -----------------------------------------------------------------


class StoreError(SidecarError):
    """The disk tier failed; the message names the directory and the cause."""


class StoreOpenError(StoreError):
    """The store's directory cannot be opened."""


class StoreLockedError(StoreOpenError):
    """Another process (or handle) holds the directory's LevelDB LOCK."""


class StoreCorruptError(StoreOpenError):
    """LevelDB reports damage, or the directory holds something not ours."""


class StoreWriteError(StoreError):
    """A write failed; the store is now degraded until ``reopen()``."""


class StoreFullError(StoreWriteError):
    """The file system holding the store is full."""


class DiskFallback(enum.StrEnum):
    """What ``open_store`` does when the directory cannot be opened
    (manifest key ``fallbacks.disk``)."""

    MEMORY_ONLY = "memory_only"
    QUARANTINE = "quarantine"
    FAIL = "fail"


def _message(exc: BaseException) -> str:
    arg = exc.args[0] if exc.args else b""
    return arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)


def _open_error(path: Path, exc: BaseException) -> StoreOpenError:
    text = _message(exc)
    if isinstance(exc, plyvel.IOError) and "lock" in text.lower():
        return StoreLockedError(
            f"disk tier {path}: the directory is locked by another process "
            f"({text}); LevelDB allows one process per directory, so stop the "
            "other sidecar or set cache.disk.path to a directory of its own"
        )
    if isinstance(exc, plyvel.CorruptionError):
        return StoreCorruptError(
            f"disk tier {path}: LevelDB reports corruption ({text}); set "
            "fallbacks.disk: quarantine to move it aside and start empty"
        )
    return StoreOpenError(f"disk tier {path}: cannot open ({text})")


def _write_error(path: Path, exc: BaseException) -> StoreWriteError:
    text = _message(exc)
    if any(m.decode() in text for m in _FULL_MARKERS):
        return StoreFullError(
            f"disk tier {path}: file system full ({text}); writes are skipped "
            "until space is freed and the store is reopened"
        )
    return StoreWriteError(f"disk tier {path}: write failed ({text})")


# -- the stored entry ---------------------------------------------------------


@dataclass(frozen=True, slots=True, weakref_slot=True)
class Entry:
    """One stored answer: its metadata and its (uncompressed) body.

    ``digest`` is the sha256 of ``body`` (32 raw bytes) and ``size`` its
    length; ``Entry.create`` fills both. ``ttl_s`` counts from ``created``
    (wall time); ``math.inf`` never expires.
    """

    digest: bytes
    status: int
    headers: tuple[tuple[str, str], ...]
    created: float
    ttl_s: float
    upstream_duration_s: float
    size: int
    content_type: str
    stream: bool
    route: str
    body: bytes = field(repr=False)

    @classmethod
    def create(
        cls,
        body: bytes,
        *,
        status: int = 200,
        headers: tuple[tuple[str, str], ...] = (),
        created: float,
        ttl_s: float,
        upstream_duration_s: float = 0.0,
        content_type: str = "",
        stream: bool = False,
        route: str = "",
    ) -> Entry:
        """An entry for ``body``, with its digest and size computed."""
        return cls(
            digest=hashlib.sha256(body).digest(),
            status=status,
            headers=tuple(headers),
            created=created,
            ttl_s=ttl_s,
            upstream_duration_s=upstream_duration_s,
            size=len(body),
            content_type=content_type,
            stream=stream,
            route=route,
            body=body,
        )

    def expired(self, now: float) -> bool:
        """True once ``created + ttl_s`` lies in the past."""
        return self.created + self.ttl_s < now


class _FormatError(ValueError):
    """A record or blob whose bytes do not parse."""


@dataclass(frozen=True, slots=True)
class _Record:
    """A decoded index record: the entry without its body, plus blob facts."""

    meta: Entry  # body is b""
    accessed: float
    blob_bytes: int
    dict_id: int


def _pack_str(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogateescape")
    if len(raw) > 0xFFFF:
        raise ValueError("string longer than 65535 bytes in an index record")
    return _STR_LEN.pack(len(raw)) + raw


def _encode_record(
    entry: Entry, *, accessed: float, blob_bytes: int, dict_id: int
) -> bytes:
    fixed = _RECORD_FIXED.pack(
        FORMAT_VERSION,
        _FLAG_STREAM if entry.stream else 0,
        entry.status,
        entry.created,
        entry.ttl_s,
        entry.upstream_duration_s,
        accessed,
        entry.size,
        blob_bytes,
        dict_id,
        entry.digest,
    )
    parts = [fixed, _pack_str(entry.route), _pack_str(entry.content_type)]
    if len(entry.headers) > 0xFFFF:
        raise ValueError("more than 65535 headers in an index record")
    parts.append(_STR_LEN.pack(len(entry.headers)))
    for name, value in entry.headers:
        parts += (_pack_str(name), _pack_str(value))
    return b"".join(parts)


class _Reader:
    """Length-prefixed strings out of a record, with bounds checks."""

    def __init__(self, raw: bytes, offset: int) -> None:
        self.raw = raw
        self.offset = offset

    def u16(self) -> int:
        if self.offset + 2 > len(self.raw):
            raise _FormatError("record truncated")
        (value,) = _STR_LEN.unpack_from(self.raw, self.offset)
        self.offset += 2
        return int(value)

    def text(self) -> str:
        n = self.u16()
        end = self.offset + n
        if end > len(self.raw):
            raise _FormatError("record truncated")
        chunk = self.raw[self.offset : end]
        self.offset = end
        return chunk.decode("utf-8", "surrogateescape")


class _Fixed(NamedTuple):
    """The fixed part of an index record: all that opening the store needs."""

    version: int
    flags: int
    status: int
    created: float
    ttl_s: float
    upstream_duration_s: float
    accessed: float
    size: int
    blob_bytes: int
    dict_id: int
    digest: bytes


def _decode_fixed(raw: bytes) -> _Fixed:
    if len(raw) < _RECORD_FIXED.size:
        raise _FormatError("record shorter than its fixed part")
    fixed = _Fixed._make(_RECORD_FIXED.unpack_from(raw))
    if fixed.version != FORMAT_VERSION or fixed.flags & ~_FLAG_STREAM:
        raise _FormatError("record version or flags not recognised")
    return fixed


def _decode_record(raw: bytes) -> _Record:
    fixed = _decode_fixed(raw)
    reader = _Reader(raw, _RECORD_FIXED.size)
    try:
        route = reader.text()
        content_type = reader.text()
        headers = tuple((reader.text(), reader.text()) for _ in range(reader.u16()))
    except UnicodeDecodeError as exc:
        raise _FormatError("record text not decodable") from exc
    if reader.offset != len(raw):
        raise _FormatError("record has trailing bytes")
    meta = Entry(
        fixed.digest,
        fixed.status,
        headers,
        fixed.created,
        fixed.ttl_s,
        fixed.upstream_duration_s,
        fixed.size,
        content_type,
        bool(fixed.flags & _FLAG_STREAM),
        route,
        b"",
    )
    return _Record(meta, fixed.accessed, fixed.blob_bytes, fixed.dict_id)


# -- in-memory mirror ---------------------------------------------------------


@dataclass(slots=True)
class _Slot:
    """What memory keeps of one index record (the LRU holds these)."""

    digest: bytes
    record_bytes: int  # key plus value
    accessed: float  # the last-access time stored in the record
    expires_at: float


@dataclass(slots=True)
class _Blob:
    """What memory keeps of one blob."""

    stored_bytes: int  # key plus value
    body_bytes: int  # uncompressed
    dict_id: int
    refs: int


class _Batch:
    """Puts and deletes applied in order, in one atomic WriteBatch."""

    def __init__(self) -> None:
        self.ops: list[tuple[bytes, bytes | None]] = []

    def put(self, key: bytes, value: bytes) -> None:
        self.ops.append((key, value))

    def delete(self, key: bytes) -> None:
        self.ops.append((key, None))


def _blob_key(digest: bytes) -> bytes:
    return BLOB_PREFIX + digest


def _action_key(key: bytes) -> bytes:
    return ACTION_PREFIX + key


def _dict_key(dict_id: int) -> bytes:
    return DICT_PREFIX + dict_id.to_bytes(4, "big")


def _short(raw: bytes) -> str:
    return raw.hex()[:12]


# -- the store ---------------------------------------------------------------


class DiskStore:
    """A blocking, single-threaded LevelDB answer store.

    ``put`` returns True when the entry was stored and False when it was
    skipped (too large for ``max_entry_bytes`` or the ceiling, or the store is
    degraded); it raises ``StoreFullError``/``StoreWriteError`` on the write
    that fails, after which the store is degraded. ``get`` never raises for
    bad data: corruption is a miss.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int,
        max_entry_bytes: int,
        compressor: Compressor | None,
        clock: Callable[[], float] = time.time,
        lru_cache_size: int = DEFAULT_LRU_CACHE_BYTES,
        write_buffer_size: int = DEFAULT_WRITE_BUFFER_BYTES,
        access_persist_s: float = DEFAULT_ACCESS_PERSIST_S,
        paranoid_checks: bool = False,
    ) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.max_entry_bytes = min(max_entry_bytes, 0xFFFFFFFF)
        self._compressor = compressor
        # Without a compressor, blobs are written raw, but zstd blobs written
        # earlier must stay readable: a non-training compressor reads them.
        self._codec = compressor or Compressor(train=False)
        self._clock = clock
        self._access_persist_s = access_persist_s
        self._options: dict[str, Any] = {
            "create_if_missing": True,
            "bloom_filter_bits": 10,
            "lru_cache_size": lru_cache_size,
            "write_buffer_size": write_buffer_size,
            # Payloads are zstd already; snappy on top would only cost CPU.
            "compression": None,
            "paranoid_checks": paranoid_checks,
        }
        self.degraded = False
        self._counters: collections.Counter[str] = collections.Counter()
        self._db: plyvel.DB | None = None
        self._reset_mirror()
        self._open()

    def _reset_mirror(self) -> None:
        # Oldest first; move_to_end on every hit. Owned by the store's thread.
        self._index: collections.OrderedDict[bytes, _Slot] = collections.OrderedDict()
        self._blobs: dict[bytes, _Blob] = {}
        self._dict_refs: collections.Counter[int] = collections.Counter()
        self._persisted_dicts: set[int] = set()
        self._bytes = 0
        self._body_bytes = 0  # uncompressed size of every blob, for the ratio

    # -- open, close, reopen ----------------------------------------------

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = plyvel.DB(str(self.path), **self._options)
        except (plyvel.Error, OSError) as exc:
            raise _open_error(self.path, exc) from exc
        try:
            self._load(cleanup=True)
        except StoreWriteError:
            # The database opened but its clean-up write failed (a full disk):
            # serve reads, degraded, rather than fall back to memory only.
            pass
        except StoreError:
            self.close()
            raise
        except plyvel.Error as exc:
            self.close()
            raise _open_error(self.path, exc) from exc

    def close(self) -> None:
        """Close the LevelDB handle; later gets miss and puts are skipped."""
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def closed(self) -> bool:
        return self._db is None

    def reopen(self) -> bool:
        """Close and reopen the handle to leave degraded mode; True if healthy.

        Does nothing while the file system has less free space than one
        write buffer, since reopening then would fail and lose reads too.
        """
        if not self.degraded and self._db is not None:
            return True
        free = _free_bytes(self.path)
        if free is not None and free < self._options["write_buffer_size"]:
            return False
        self.close()
        self._reset_mirror()
        self.degraded = False
        try:
            self._open()
        except StoreError as exc:
            self.degraded = True
            log.cache.warning(
                "cache.disk_reopen_failed",
                extra={"path": str(self.path), "reason": str(exc)},
            )
            return False
        if not self.degraded:
            log.cache.info("cache.disk_reopened", extra={"path": str(self.path)})
        return not self.degraded

    def _require_db(self) -> plyvel.DB:
        if self._db is None:
            raise StoreError(f"disk tier {self.path}: the store is closed")
        return self._db

    # -- loading the mirror ----------------------------------------------

    def _load(self, *, cleanup: bool) -> None:
        """Rebuild the in-memory mirror from the database.

        With ``cleanup``, also delete what cannot be used: malformed or
        expired records, records whose blob is missing, orphan blobs and
        dictionaries no blob references; then enforce the ceiling.
        """
        db = self._require_db()
        self._check_format(db, write=cleanup)
        # Without clean-up (a resync after a failed write) nothing is staged or
        # counted: what is skipped stays on disk, and a read reports it.
        batch = _Batch() if cleanup else None
        self._load_dictionaries(db, batch)
        self._load_records(db, batch)
        self._load_blobs(db, batch)
        if batch is not None:
            self._evict_over_ceiling(batch, keep=None)
            self._commit(batch)

    def _check_format(self, db: plyvel.DB, *, write: bool) -> None:
        raw = db.get(FORMAT_KEY)
        if raw is None:
            if next(db.iterator(include_value=False), None) is not None:
                raise StoreCorruptError(
                    f"disk tier {self.path}: the directory holds a LevelDB "
                    "database that is not a sidecar store; point "
                    "cache.disk.path elsewhere or use fallbacks.disk: quarantine"
                )
            if write:
                db.put(FORMAT_KEY, str(FORMAT_VERSION).encode())
            return
        if raw != str(FORMAT_VERSION).encode():
            raise StoreCorruptError(
                f"disk tier {self.path}: store format {raw!r} is not the "
                f"supported {FORMAT_VERSION}; use fallbacks.disk: quarantine"
            )

    def _load_dictionaries(self, db: plyvel.DB, batch: _Batch | None) -> None:
        for key, raw in db.iterator(prefix=DICT_PREFIX):
            try:
                dictionary = Dictionary.decode(raw)
                if _dict_key(dictionary.dict_id) != key:
                    raise CompressionError("dictionary id differs from its key")
            except CompressionError as exc:
                if batch is not None:
                    self._report_corrupt(
                        "dictionary", key[len(DICT_PREFIX) :], str(exc)
                    )
                    batch.delete(key)
                continue
            self._codec.add_dictionary(dictionary)
            self._persisted_dicts.add(dictionary.dict_id)

    def _load_records(self, db: plyvel.DB, batch: _Batch | None) -> None:
        now = self._clock()
        # Only the fixed part of each record is decoded (its strings are
        # checked when the entry is read), which keeps opening a large store
        # to a few microseconds per entry.
        loaded: list[tuple[float, bytes, _Slot, _Blob]] = []
        for key, raw in db.iterator(prefix=ACTION_PREFIX):
            action_key = key[len(ACTION_PREFIX) :]
            try:
                fixed = _decode_fixed(raw)
            except _FormatError as exc:
                if batch is not None:
                    self._report_corrupt("record", action_key, str(exc))
                    batch.delete(key)
                continue
            expires_at = fixed.created + fixed.ttl_s
            if expires_at < now:
                if batch is not None:
                    self._counters["expired"] += 1
                    batch.delete(key)
                continue
            slot = _Slot(fixed.digest, len(key) + len(raw), fixed.accessed, expires_at)
            facts = _Blob(fixed.blob_bytes, fixed.size, fixed.dict_id, 0)
            loaded.append((fixed.accessed, action_key, slot, facts))
        loaded.sort(key=lambda item: item[0])
        for _, action_key, slot, facts in loaded:
            self._index[action_key] = slot
            self._bytes += slot.record_bytes
            blob = self._blobs.get(slot.digest)
            if blob is None:
                blob = facts
                self._blobs[slot.digest] = blob
                self._bytes += blob.stored_bytes
                self._body_bytes += blob.body_bytes
                self._dict_refs[blob.dict_id] += 1
            blob.refs += 1

    def _load_blobs(self, db: plyvel.DB, batch: _Batch | None) -> None:
        present: set[bytes] = set()
        for key in db.iterator(prefix=BLOB_PREFIX, include_value=False):
            digest = key[len(BLOB_PREFIX) :]
            if digest in self._blobs:
                present.add(digest)
            elif batch is not None:
                self._counters["orphans_collected"] += 1
                batch.delete(key)
        missing = [d for d in self._blobs if d not in present]
        for digest in missing:
            if batch is not None:
                self._report_corrupt("blob", digest, "missing blob")
            for action_key in self._keys_for(digest):
                self._drop(action_key, batch or _Batch())

    # -- reads -------------------------------------------------------------

    def get(self, action_key: bytes) -> Entry | None:
        """The live entry stored under ``action_key``, or None.

        Expired entries and every kind of bad data are misses, and are
        deleted (unless the store is degraded).
        """
        db = self._db
        if db is None:
            self._counters["misses"] += 1
            return None
        raw = db.get(_action_key(action_key))
        if raw is None:
            self._counters["misses"] += 1
            return None
        entry = self._read_entry(db, action_key, raw)
        if entry is None:
            self._counters["misses"] += 1
            return None
        self._counters["hits"] += 1
        self._touch(action_key, raw)
        return entry

    def _read_entry(self, db: plyvel.DB, action_key: bytes, raw: bytes) -> Entry | None:
        try:
            record = _decode_record(raw)
        except _FormatError as exc:
            self._report_corrupt("record", action_key, str(exc))
            self._remove_quietly([action_key])
            return None
        if record.meta.expired(self._clock()):
            self._counters["expired"] += 1
            self._remove_quietly([action_key])
            return None
        digest = record.meta.digest
        try:
            body = self._read_blob(db, digest)
        except (_FormatError, CompressionError) as exc:
            self._report_corrupt("blob", digest, str(exc))
            # Every record naming this blob goes with it, so none is left
            # pointing at a blob that is no longer there.
            keys = [action_key, *(k for k in self._keys_for(digest) if k != action_key)]
            self._remove_quietly(keys, blob=digest)
            return None
        return _with_body(record.meta, body)

    def _remove_quietly(
        self, action_keys: list[bytes], *, blob: bytes | None = None
    ) -> None:
        """Delete bad or expired data found by a read; skipped while degraded."""
        if self.degraded:
            self._counters["writes_skipped"] += 1
            return
        batch = _Batch()
        for action_key in action_keys:
            self._drop(action_key, batch, record_key_known=True)
        if blob is not None:
            batch.delete(_blob_key(blob))
        self._commit_quietly(batch)

    def _read_blob(self, db: plyvel.DB, digest: bytes) -> bytes:
        raw = db.get(_blob_key(digest))
        if raw is None:
            raise _FormatError("missing blob")
        if len(raw) < _BLOB_HEADER.size:
            raise _FormatError("blob shorter than its header")
        version, codec_value, dict_id, size = _BLOB_HEADER.unpack_from(raw)
        if version != FORMAT_VERSION or codec_value not in Codec._value2member_map_:
            raise _FormatError("blob header not recognised")
        codec = Codec(codec_value)
        body = self._codec.decompress(
            raw[_BLOB_HEADER.size :],
            codec=codec,
            dict_id=dict_id,
            size=size,
            max_size=self.max_entry_bytes,
        )
        if hashlib.sha256(body).digest() != digest:
            raise _FormatError("digest mismatch")
        return body

    def _touch(self, action_key: bytes, raw: bytes) -> None:
        slot = self._index.get(action_key)
        if slot is None:
            return
        self._index.move_to_end(action_key)
        now = self._clock()
        if self.degraded or now - slot.accessed < self._access_persist_s:
            return
        # Same length, so the byte accounting does not change.
        patched = bytearray(raw)
        struct.pack_into(">d", patched, _ACCESSED_OFFSET, now)
        batch = _Batch()
        batch.put(_action_key(action_key), bytes(patched))
        if self._commit_quietly(batch):
            slot.accessed = now

    # -- writes ------------------------------------------------------------

    def put(self, action_key: bytes, entry: Entry) -> bool:
        """Store ``entry`` under ``action_key`` (replacing any older entry).

        Returns False when skipped; raises ``StoreWriteError`` (usually
        ``StoreFullError``) when the write fails, leaving the store degraded.
        """
        _check_key(action_key)
        if hashlib.sha256(entry.body).digest() != entry.digest or entry.size != len(
            entry.body
        ):
            raise ValueError(
                "Entry.digest/size do not match its body; use Entry.create"
            )
        if self.degraded or self._db is None:
            self._counters["writes_skipped"] += 1
            return False
        if entry.size > self.max_entry_bytes:
            self._counters["too_large"] += 1
            return False
        batch = _Batch()
        blob = self._blobs.get(entry.digest)
        if blob is not None:
            blob_value = None
            stored, dict_id = blob.stored_bytes, blob.dict_id
        else:
            blob_value, dict_id = self._encode_blob(entry)
            stored = len(BLOB_PREFIX) + DIGEST_BYTES + len(blob_value)
        now = self._clock()
        record = _encode_record(entry, accessed=now, blob_bytes=stored, dict_id=dict_id)
        record_bytes = len(ACTION_PREFIX) + ACTION_KEY_BYTES + len(record)
        if record_bytes + (stored if blob_value is not None else 0) > self.max_bytes:
            self._counters["too_large"] += 1
            return False
        previous = self._index.get(action_key)
        if blob is not None and (previous is None or previous.digest != entry.digest):
            self._counters["dedup_hits"] += 1
        self._reference_blob(entry, blob_value, stored, dict_id, batch)
        self._drop(action_key, batch)
        batch.put(_action_key(action_key), record)
        self._index[action_key] = _Slot(
            entry.digest, record_bytes, now, entry.created + entry.ttl_s
        )
        self._bytes += record_bytes
        self._evict_over_ceiling(batch, keep=action_key)
        self._commit(batch)
        self._counters["puts"] += 1
        return True

    def _encode_blob(self, entry: Entry) -> tuple[bytes, int]:
        if self._compressor is None:
            header = _BLOB_HEADER.pack(FORMAT_VERSION, Codec.RAW, 0, entry.size)
            return header + entry.body, 0
        content_class = classify(
            content_type=entry.content_type, stream=entry.stream, route=entry.route
        )
        try:
            packed = self._compressor.compress(entry.body, content_class)
        except CompressionError:
            header = _BLOB_HEADER.pack(FORMAT_VERSION, Codec.RAW, 0, entry.size)
            return header + entry.body, 0
        header = _BLOB_HEADER.pack(
            FORMAT_VERSION, packed.codec, packed.dict_id, entry.size
        )
        return header + packed.payload, packed.dict_id

    def _reference_blob(
        self,
        entry: Entry,
        value: bytes | None,
        stored: int,
        dict_id: int,
        batch: _Batch,
    ) -> None:
        """Count one more reference to a blob, staging it if it is new."""
        digest = entry.digest
        blob = self._blobs.get(digest)
        if blob is not None:
            blob.refs += 1
            return
        assert value is not None
        if dict_id and dict_id not in self._persisted_dicts:
            dictionary = self._codec.dictionary(dict_id)
            assert dictionary is not None, "compressor returned an unknown dict id"
            # Same batch as the blob: no blob may name a dictionary not on disk.
            batch.put(_dict_key(dict_id), dictionary.encode())
            self._persisted_dicts.add(dict_id)
        batch.put(_blob_key(digest), value)
        self._blobs[digest] = _Blob(stored, entry.size, dict_id, 1)
        self._dict_refs[dict_id] += 1
        self._bytes += stored
        self._body_bytes += entry.size

    def delete(self, action_key: bytes) -> bool:
        """Remove one entry; True if it was there.

        Raises ``StoreWriteError`` while degraded: an invalidation that did
        not happen must not look like one that found nothing.
        """
        self._refuse_if_degraded("delete")
        if action_key not in self._index:
            return False
        batch = _Batch()
        self._drop(action_key, batch)
        self._commit(batch)
        return True

    def purge(self, *, route: str | None = None) -> int:
        """Remove every entry (of one route, if given); returns how many.

        Works in batches of 1000 entries, so a failure part-way leaves a
        consistent, partly purged store. Raises ``StoreWriteError`` while
        degraded.
        """
        self._refuse_if_degraded("purge")
        victims = list(self._index) if route is None else list(self._route_keys(route))
        for start in range(0, len(victims), _PURGE_CHUNK):
            batch = _Batch()
            for action_key in victims[start : start + _PURGE_CHUNK]:
                self._drop(action_key, batch)
            self._collect_dictionaries(batch)
            self._commit(batch)
        self._counters["purged"] += len(victims)
        return len(victims)

    def _refuse_if_degraded(self, operation: str) -> None:
        self._require_db()
        if self.degraded:
            self._counters["writes_skipped"] += 1
            raise StoreWriteError(
                f"disk tier {self.path}: {operation} not applied, the store is "
                "degraded after a write error until it is reopened"
            )

    def _route_keys(self, route: str) -> Iterator[bytes]:
        db = self._require_db()
        for key, raw in db.iterator(prefix=ACTION_PREFIX):
            try:
                record_route = _decode_record(raw).meta.route
            except _FormatError:
                continue  # a later get reports and deletes it
            if record_route == route:
                yield key[len(ACTION_PREFIX) :]

    def sweep_expired(self, limit: int = 10_000) -> int:
        """Delete up to ``limit`` expired entries; returns how many."""
        if self.degraded or self._db is None:
            return 0
        now = self._clock()
        victims = [k for k, s in self._index.items() if s.expires_at < now][:limit]
        batch = _Batch()
        for action_key in victims:
            self._drop(action_key, batch)
        self._collect_dictionaries(batch)
        self._commit(batch)
        self._counters["expired"] += len(victims)
        return len(victims)

    # -- removal and eviction (stage into a batch, update the mirror) ------

    def _drop(
        self, action_key: bytes, batch: _Batch, *, record_key_known: bool = False
    ) -> None:
        """Stage removing one record, and its blob if no other references it.

        The record's delete precedes the blob's in the batch. With
        ``record_key_known`` the record is deleted even if memory lacks it.
        """
        slot = self._index.pop(action_key, None)
        if slot is None:
            if record_key_known:
                batch.delete(_action_key(action_key))
            return
        batch.delete(_action_key(action_key))
        self._bytes -= slot.record_bytes
        blob = self._blobs.get(slot.digest)
        if blob is None:
            return
        blob.refs -= 1
        if blob.refs > 0:
            return
        del self._blobs[slot.digest]
        self._bytes -= blob.stored_bytes
        self._body_bytes -= blob.body_bytes
        batch.delete(_blob_key(slot.digest))
        self._dict_refs[blob.dict_id] -= 1
        if self._dict_refs[blob.dict_id] <= 0:
            del self._dict_refs[blob.dict_id]
            self._collect_dictionary(blob.dict_id, batch)

    def _evict_over_ceiling(self, batch: _Batch, *, keep: bytes | None) -> None:
        while self._bytes > self.max_bytes and self._index:
            victim = next(iter(self._index))
            if victim == keep:
                if len(self._index) == 1:
                    break
                self._index.move_to_end(victim)
                continue
            self._drop(victim, batch)
            self._counters["evictions"] += 1
        self._collect_dictionaries(batch)

    def _collect_dictionaries(self, batch: _Batch) -> None:
        """Stage deleting every persisted dictionary that no blob references
        and that is not current (new blobs would need it)."""
        for dict_id in list(self._persisted_dicts):
            self._collect_dictionary(dict_id, batch)

    def _collect_dictionary(self, dict_id: int, batch: _Batch) -> None:
        if dict_id not in self._persisted_dicts or self._dict_refs.get(dict_id, 0) > 0:
            return
        if dict_id in self._codec.current_ids():
            return
        batch.delete(_dict_key(dict_id))
        self._persisted_dicts.discard(dict_id)
        self._codec.drop_dictionary(dict_id)

    def _keys_for(self, digest: bytes) -> list[bytes]:
        # Linear in the number of entries; only used on corruption.
        return [k for k, s in self._index.items() if s.digest == digest]

    # -- committing ----------------------------------------------------------

    def _commit(self, batch: _Batch) -> None:
        """Write a batch; on failure degrade, resync the mirror and raise."""
        if not batch.ops:
            return
        db = self._require_db()
        try:
            with db.write_batch() as wb:
                for key, value in batch.ops:
                    if value is None:
                        wb.delete(key)
                    else:
                        wb.put(key, value)
        except plyvel.Error as exc:
            error = _write_error(self.path, exc)
            self._degrade(error)
            raise error from exc

    def _commit_quietly(self, batch: _Batch) -> bool:
        """A write made on the read path: never raises (it degrades instead)."""
        try:
            self._commit(batch)
        except StoreWriteError:
            return False
        return True

    def _degrade(self, error: StoreWriteError) -> None:
        if not self.degraded:
            log.cache.warning(
                "cache.disk_degraded",
                extra={"path": str(self.path), "reason": str(error)},
            )
        self.degraded = True
        self._counters["write_errors"] += 1
        self._resync()

    def _resync(self) -> None:
        # The failed (or skipped) batch changed memory but not the database;
        # rebuild the mirror from what is really there.
        self._reset_mirror()
        try:
            self._load(cleanup=False)
        except (StoreError, plyvel.Error) as exc:
            log.cache.warning(
                "cache.disk_resync_failed",
                extra={"path": str(self.path), "reason": str(exc)},
            )

    def _report_corrupt(self, what: str, name: bytes, reason: str) -> None:
        self._counters["corrupt"] += 1
        log.cache.warning(
            "cache.disk_corrupt",
            extra={"what": what, "key": _short(name), "reason": reason},
        )

    # -- stats ---------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Sizes and counters: entries, bytes, blobs, evictions, corrupt, ..."""
        counters = self._counters
        return {
            "entries": len(self._index),
            "bytes": self._bytes,
            "max_bytes": self.max_bytes,
            "blobs": len(self._blobs),
            "blob_body_bytes": self._body_bytes,
            "dictionaries": len(self._persisted_dicts),
            "hits": counters["hits"],
            "misses": counters["misses"],
            "puts": counters["puts"],
            "dedup_hits": counters["dedup_hits"],
            "evictions": counters["evictions"],
            "expired": counters["expired"],
            "purged": counters["purged"],
            "corrupt": counters["corrupt"],
            "orphans_collected": counters["orphans_collected"],
            "too_large": counters["too_large"],
            "writes_skipped": counters["writes_skipped"],
            "write_errors": counters["write_errors"],
            "degraded": int(self.degraded),
        }


def _with_body(meta: Entry, body: bytes) -> Entry:
    return Entry(
        meta.digest,
        meta.status,
        meta.headers,
        meta.created,
        meta.ttl_s,
        meta.upstream_duration_s,
        meta.size,
        meta.content_type,
        meta.stream,
        meta.route,
        body,
    )


def _check_key(action_key: bytes) -> None:
    if len(action_key) != ACTION_KEY_BYTES:
        raise ValueError(
            f"action keys are {ACTION_KEY_BYTES} bytes, got {len(action_key)}"
        )


def _free_bytes(path: Path) -> int | None:
    try:
        st = os.statvfs(path if path.exists() else path.parent)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


# -- opening with a fallback -------------------------------------------------


def open_store(
    path: str | os.PathLike[str],
    fallback: DiskFallback | str,
    **options: Any,
) -> DiskStore | None:
    """Open the disk tier, following ``fallbacks.disk`` when that fails.

    ``memory_only``: return None (the sidecar runs on the memory tier) and log
    ``cache.disk_unavailable`` with the reason. ``quarantine``: a corrupt
    directory is renamed to ``PATH.quarantine-<UTC timestamp>`` and a fresh
    store opened in its place; a locked directory is left alone (another live
    process is using it, and moving it would split that process's writes), so
    it falls back to memory only. ``fail``: raise the ``StoreOpenError``.
    Never retries in a loop: one attempt, plus one after a quarantine.
    ``options`` are passed to ``DiskStore``.
    """
    mode = DiskFallback(fallback)
    target = Path(path)
    try:
        return DiskStore(target, **options)
    except StoreOpenError as exc:
        if mode is DiskFallback.FAIL:
            raise
        if mode is DiskFallback.QUARANTINE and isinstance(exc, StoreCorruptError):
            return _quarantine_and_open(target, exc, options)
        _warn_unavailable(target, exc, mode)
        return None


def _quarantine_and_open(
    path: Path, cause: StoreCorruptError, options: dict[str, Any]
) -> DiskStore | None:
    aside = _quarantine_path(path)
    try:
        path.rename(aside)
    except OSError as exc:
        failure = StoreOpenError(f"{cause}; moving it aside failed: {exc}")
        _warn_unavailable(path, failure, DiskFallback.QUARANTINE)
        return None
    log.cache.warning(
        "cache.disk_quarantined",
        extra={"path": str(path), "moved_to": str(aside), "reason": str(cause)},
    )
    try:
        return DiskStore(path, **options)
    except StoreOpenError as exc:
        _warn_unavailable(path, exc, DiskFallback.QUARANTINE)
        return None


def _quarantine_path(path: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    candidate = path.with_name(f"{path.name}.quarantine-{stamp}")
    n = 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.quarantine-{stamp}-{n}")
        n += 1
    return candidate


def _warn_unavailable(path: Path, exc: StoreOpenError, mode: DiskFallback) -> None:
    reason = (
        "locked"
        if isinstance(exc, StoreLockedError)
        else ("corrupt" if isinstance(exc, StoreCorruptError) else "io_error")
    )
    log.cache.warning(
        "cache.disk_unavailable",
        extra={
            "path": str(path),
            "reason": reason,
            "fallback": mode.value,
            "detail": str(exc),
        },
    )


# -- the async facade ----------------------------------------------------------

_P = ParamSpec("_P")
_T = TypeVar("_T")


def _disk_executor() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(1, "sidecar-disk")


class AsyncDiskStore:
    """A ``DiskStore`` driven from the event loop.

    Every call runs on one dedicated thread, in submission order, so calls are
    serialised and plyvel and zstd never block the loop. A cancelled await
    does not cancel the call once it has started; it still completes.
    """

    def __init__(
        self,
        store: DiskStore,
        *,
        executor: concurrent.futures.ThreadPoolExecutor | None = None,
    ) -> None:
        self.store = store
        self._executor = executor or _disk_executor()

    @classmethod
    async def open(
        cls, path: str | os.PathLike[str], fallback: DiskFallback | str, **options: Any
    ) -> AsyncDiskStore | None:
        """``open_store`` on the store's own thread; None when memory only."""
        executor = _disk_executor()
        call = functools.partial(open_store, path, fallback, **options)
        try:
            store = await asyncio.get_running_loop().run_in_executor(executor, call)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        if store is None:
            executor.shutdown(wait=False)
            return None
        return cls(store, executor=executor)

    async def _run(
        self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs
    ) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, functools.partial(fn, *args, **kwargs)
        )

    @property
    def degraded(self) -> bool:
        # A plain attribute read; the store's thread is its only writer.
        return self.store.degraded

    async def get(self, action_key: bytes) -> Entry | None:
        return await self._run(self.store.get, action_key)

    async def put(self, action_key: bytes, entry: Entry) -> bool:
        return await self._run(self.store.put, action_key, entry)

    async def delete(self, action_key: bytes) -> bool:
        return await self._run(self.store.delete, action_key)

    async def purge(self, *, route: str | None = None) -> int:
        return await self._run(self.store.purge, route=route)

    async def sweep_expired(self, limit: int = 10_000) -> int:
        return await self._run(self.store.sweep_expired, limit)

    async def reopen(self) -> bool:
        return await self._run(self.store.reopen)

    async def stats(self) -> dict[str, int]:
        return await self._run(self.store.stats)

    async def close(self) -> None:
        """Close the store after every queued call, then stop the thread."""
        try:
            await self._run(self.store.close)
        finally:
            self._executor.shutdown(wait=False)
