"""Contract of sidecar.cache.store: the LevelDB disk tier and its async facade."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import plyvel  # type: ignore[import-untyped]
import pytest
import zstandard

from sidecar import log
from sidecar.cache.compress import Compressor, ContentClass
from sidecar.cache.store import (
    BLOB_PREFIX,
    AsyncDiskStore,
    DiskStore,
    Entry,
    StoreCorruptError,
    StoreFullError,
    StoreLockedError,
    StoreWriteError,
    _decode_record,
    open_store,
)

REPO = Path(__file__).resolve().parents[2]
T0 = 1_750_000_000.0
MiB = 1024 * 1024


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def key(n: int) -> bytes:
    return hashlib.sha256(b"action-%d" % n).digest()


def chat_body(n: int, filler: int = 0) -> bytes:
    doc = {
        "id": f"chatcmpl-{n:08d}",
        "object": "chat.completion",
        "model": "llama-3.1-8b",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": f"answer number {n} " * 3},
            }
        ],
        "pad": "x" * filler,
    }
    return json.dumps(doc).encode()


def entry(
    body: bytes, *, route: str = "chat", created: float = T0, ttl_s: float = 3600.0
) -> Entry:
    return Entry.create(
        body,
        status=200,
        headers=(("content-type", "application/json"),),
        created=created,
        ttl_s=ttl_s,
        upstream_duration_s=0.25,
        content_type="application/json",
        route=route,
    )


def body_of(found: Entry | None) -> bytes:
    """The body of an entry that must be there."""
    assert found is not None
    return found.body


def make_store(path: Path, clock: Clock | None = None, **options: object) -> DiskStore:
    settings: dict[str, object] = {
        "max_bytes": 8 * MiB,
        "max_entry_bytes": MiB,
        "compressor": Compressor(train=False),
        "clock": clock or Clock(),
        "paranoid_checks": True,
    }
    settings.update(options)
    return DiskStore(path, **settings)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "disk"


@pytest.fixture
def store(db_path: Path, clock: Clock) -> Iterator[DiskStore]:
    s = make_store(db_path, clock)
    yield s
    s.close()


@contextlib.contextmanager
def raw_db(path: Path) -> Iterator[plyvel.DB]:
    """The store's LevelDB opened directly (the store must be closed)."""
    db = plyvel.DB(str(path))
    try:
        yield db
    finally:
        db.close()


def layout(path: Path) -> tuple[dict[bytes, bytes], set[bytes]]:
    """Action key -> digest for every index record, and every blob digest."""
    with raw_db(path) as db:
        records = {
            k[2:]: _decode_record(v).meta.digest for k, v in db.iterator(prefix=b"a/")
        }
        blobs = {k[2:] for k in db.iterator(prefix=BLOB_PREFIX, include_value=False)}
    return records, blobs


def assert_consistent(path: Path) -> None:
    """No record points at a missing blob and no blob lacks a record."""
    records, blobs = layout(path)
    assert set(records.values()) == blobs


class Captured(logging.Handler):
    """Collects records sent to the sidecar.cache logger."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def events(self, level: int = logging.WARNING) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level]


@pytest.fixture
def cache_log() -> Iterator[Captured]:
    handler = Captured()
    previous = log.cache.level
    log.cache.addHandler(handler)
    log.cache.setLevel(logging.DEBUG)
    yield handler
    log.cache.removeHandler(handler)
    log.cache.setLevel(previous)


# -- round trip, dedup, replace ----------------------------------------------


def test_store_put_then_get_returns_equal_entry(store: DiskStore) -> None:
    """What was put comes back equal, body and metadata."""
    e = entry(chat_body(1))
    assert store.put(key(1), e) is True
    assert store.get(key(1)) == e


def test_store_unknown_key_is_miss(store: DiskStore) -> None:
    """A key never stored is a miss."""
    assert store.get(key(404)) is None
    assert store.stats()["misses"] == 1


def test_store_equal_bodies_share_one_blob(store: DiskStore, db_path: Path) -> None:
    """Two action keys with the same answer store its blob once."""
    body = chat_body(7)
    store.put(key(1), entry(body))
    store.put(key(2), entry(body, route="other"))
    stats = store.stats()
    store.close()
    assert (stats["entries"], stats["blobs"], stats["dedup_hits"]) == (2, 1, 1)
    assert len(layout(db_path)[1]) == 1


def test_store_deleting_every_reference_collects_the_blob(
    store: DiskStore, db_path: Path
) -> None:
    """A shared blob outlives one reference and goes with the last."""
    body = chat_body(7)
    store.put(key(1), entry(body))
    store.put(key(2), entry(body))
    store.delete(key(1))
    assert store.get(key(2)) is not None
    store.delete(key(2))
    store.close()
    assert layout(db_path) == ({}, set())


def test_store_put_same_key_replaces_entry_and_old_blob(
    store: DiskStore, db_path: Path
) -> None:
    """A second put under a key replaces the entry and collects the old blob."""
    store.put(key(1), entry(chat_body(1)))
    store.put(key(1), entry(chat_body(2)))
    assert body_of(store.get(key(1))) == chat_body(2)
    store.close()
    _, blobs = layout(db_path)
    assert blobs == {hashlib.sha256(chat_body(2)).digest()}


def test_store_entry_over_entry_ceiling_is_skipped(db_path: Path) -> None:
    """An answer above max_entry_bytes is not stored."""
    s = make_store(db_path, max_entry_bytes=1000)
    try:
        assert s.put(key(1), entry(os.urandom(1001))) is False
        assert (s.stats()["too_large"], s.get(key(1))) == (1, None)
    finally:
        s.close()


def test_store_entry_with_wrong_digest_raises(store: DiskStore) -> None:
    """An Entry whose digest does not match its body is a programming error."""
    bad = replace(entry(b"one"), body=b"two")
    with pytest.raises(ValueError, match="digest"):
        store.put(key(1), bad)


def test_store_entries_survive_close_and_reopen(db_path: Path) -> None:
    """Entries written before close are readable after a reopen."""
    s = make_store(db_path)
    stored = {n: entry(chat_body(n)) for n in range(20)}
    for n, e in stored.items():
        s.put(key(n), e)
    s.close()
    s = make_store(db_path)
    try:
        assert {n: s.get(key(n)) for n in stored} == stored
        assert s.stats()["entries"] == 20
    finally:
        s.close()


# -- ceiling and eviction -----------------------------------------------------


def test_store_over_ceiling_evicts_and_keeps_index_consistent(db_path: Path) -> None:
    """Under the byte ceiling, eviction never leaves a dangling or orphan blob."""
    s = make_store(db_path, max_bytes=64 * 1024)
    rng = random.Random(3)
    for n in range(200):
        body = os.urandom(rng.randrange(500, 6000)) if n % 3 else chat_body(n % 7)
        s.put(key(n), entry(body))
        assert s.stats()["bytes"] <= 64 * 1024
    stats = s.stats()
    s.close()
    assert stats["evictions"] > 0
    assert_consistent(db_path)
    assert len(layout(db_path)[0]) == stats["entries"]


def test_store_eviction_spares_recently_read_entry(db_path: Path) -> None:
    """The least recently used entry goes first; a read protects an entry."""
    s = make_store(db_path, max_bytes=35_000)
    try:
        for n in range(3):
            s.put(key(n), entry(os.urandom(10_000)))
        s.get(key(0))
        s.put(key(3), entry(os.urandom(10_000)))  # over the ceiling: one must go
        assert s.get(key(0)) is not None
        assert s.get(key(1)) is None
    finally:
        s.close()


def test_store_reopen_keeps_persisted_access_order(db_path: Path) -> None:
    """A read older than access_persist_s is written back and survives reopen."""
    clock = Clock()
    s = make_store(db_path, clock, max_bytes=35_000, access_persist_s=60)
    for n in range(3):
        clock.now += 1
        s.put(key(n), entry(os.urandom(10_000)))
    clock.now += 120
    s.get(key(0))
    s.close()
    s = make_store(db_path, clock, max_bytes=35_000, access_persist_s=60)
    try:
        s.put(key(3), entry(os.urandom(10_000)))
        assert s.get(key(0)) is not None
        assert s.get(key(1)) is None
    finally:
        s.close()


def test_store_orphan_blob_is_collected_on_open(db_path: Path) -> None:
    """A blob no record references is deleted when the store opens."""
    s = make_store(db_path)
    s.put(key(1), entry(chat_body(1)))
    s.close()
    with raw_db(db_path) as db:
        db.put(BLOB_PREFIX + b"\x00" * 32, b"orphan")
    s = make_store(db_path)
    assert s.stats()["orphans_collected"] == 1
    s.close()
    assert_consistent(db_path)


def test_store_lower_ceiling_on_open_evicts(db_path: Path) -> None:
    """Reopening with a smaller max_bytes evicts down to it at once."""
    s = make_store(db_path)
    for n in range(10):
        s.put(key(n), entry(os.urandom(10_000)))
    s.close()
    s = make_store(db_path, max_bytes=30_000)
    try:
        assert s.stats()["bytes"] <= 30_000
        assert s.stats()["evictions"] > 0
    finally:
        s.close()
    assert_consistent(db_path)


# -- expiry and purge ---------------------------------------------------------


def test_store_expired_entry_is_miss_and_deleted(
    store: DiskStore, clock: Clock, db_path: Path
) -> None:
    """Once created + ttl_s has passed, the entry is a miss and is removed."""
    store.put(key(1), entry(chat_body(1), ttl_s=10))
    clock.now = T0 + 11
    assert store.get(key(1)) is None
    assert store.stats()["expired"] == 1
    store.close()
    assert layout(db_path) == ({}, set())


def test_store_entry_within_ttl_is_hit(store: DiskStore, clock: Clock) -> None:
    """Before created + ttl_s, the entry is served."""
    store.put(key(1), entry(chat_body(1), ttl_s=10))
    clock.now = T0 + 9
    assert store.get(key(1)) is not None


def test_store_sweep_expired_removes_only_expired(
    store: DiskStore, clock: Clock
) -> None:
    """sweep_expired deletes entries past their TTL and keeps the rest."""
    store.put(key(1), entry(chat_body(1), ttl_s=10))
    store.put(key(2), entry(chat_body(2), ttl_s=100))
    clock.now = T0 + 50
    assert store.sweep_expired() == 1
    assert store.stats()["entries"] == 1
    assert store.get(key(2)) is not None


def test_store_purge_route_removes_only_that_route(
    store: DiskStore, db_path: Path
) -> None:
    """purge(route=...) removes that route's entries and nothing else."""
    for n in range(6):
        store.put(key(n), entry(chat_body(n), route="chat" if n % 2 else "embeddings"))
    assert store.purge(route="chat") == 3
    assert [store.get(key(n)) is not None for n in range(6)] == [True, False] * 3
    store.close()
    assert_consistent(db_path)


def test_store_purge_all_empties_store(store: DiskStore, db_path: Path) -> None:
    """purge() removes every entry and every blob."""
    for n in range(5):
        store.put(key(n), entry(chat_body(n)))
    assert store.purge() == 5
    assert store.stats()["entries"] == store.stats()["blobs"] == 0
    store.close()
    assert layout(db_path) == ({}, set())


# -- corruption ---------------------------------------------------------------


def _flip(value: bytes, index: int) -> bytes:
    return value[:index] + bytes([value[index] ^ 0xFF]) + value[index + 1 :]


@pytest.mark.parametrize(
    ("prefix", "index"),
    [
        pytest.param(b"b/", 0, id="blob-header"),
        pytest.param(b"b/", -5, id="blob-payload"),
        pytest.param(b"a/", 0, id="record-header"),
    ],
)
def test_store_corrupt_value_is_miss_counted_and_deleted(
    db_path: Path, prefix: bytes, index: int
) -> None:
    """A flipped byte in a stored value makes a miss, is deleted and counted."""
    s = make_store(db_path)
    s.put(key(1), entry(chat_body(1, filler=300)))
    s.close()
    with raw_db(db_path) as db:
        ((k, v),) = list(db.iterator(prefix=prefix))
        db.put(k, _flip(v, index % len(v)))
    s = make_store(db_path)
    assert s.get(key(1)) is None
    assert s.stats()["corrupt"] == 1
    s.close()
    assert layout(db_path) == ({}, set())


def test_store_blob_digest_mismatch_is_corrupt(db_path: Path) -> None:
    """A blob that decodes to other bytes than its digest names is a miss."""
    s = make_store(db_path, compressor=None)
    s.put(key(1), entry(b"A" * 100))
    s.close()
    with raw_db(db_path) as db:
        ((k, v),) = list(db.iterator(prefix=b"b/"))
        db.put(k, v[:-1] + b"B")
    s = make_store(db_path)
    try:
        assert s.get(key(1)) is None
        assert s.stats()["corrupt"] == 1
    finally:
        s.close()


def test_store_corrupt_blob_removes_every_record_naming_it(db_path: Path) -> None:
    """When a shared blob is corrupt, no record is left pointing at it."""
    s = make_store(db_path)
    body = chat_body(1, filler=300)
    s.put(key(1), entry(body))
    s.put(key(2), entry(body))
    s.close()
    with raw_db(db_path) as db:
        ((k, v),) = list(db.iterator(prefix=b"b/"))
        db.put(k, _flip(v, len(v) - 5))
    s = make_store(db_path)
    assert s.get(key(1)) is None
    s.close()
    assert layout(db_path) == ({}, set())


def test_store_corrupt_read_logs_warning(db_path: Path, cache_log: Captured) -> None:
    """A corrupt value is logged as cache.disk_corrupt."""
    s = make_store(db_path)
    s.put(key(1), entry(chat_body(1, filler=300)))
    s.close()
    with raw_db(db_path) as db:
        ((k, v),) = list(db.iterator(prefix=b"b/"))
        db.put(k, _flip(v, 0))
    s = make_store(db_path)
    try:
        s.get(key(1))
        assert "cache.disk_corrupt" in cache_log.events()
    finally:
        s.close()


@functools.cache
def bomb_frame() -> bytes:
    """A ~6 KB zstd frame that states and inflates to 200 MB."""
    size = 200 * MiB
    stream = zstandard.ZstdCompressor(level=3).compressobj(size=size)
    zeros = bytes(MiB)
    return b"".join([*(stream.compress(zeros) for _ in range(200)), stream.flush()])


@pytest.mark.parametrize(
    "claimed", [1000, 200 * MiB], ids=["header-small", "header-200MB"]
)
def test_store_decompression_bomb_is_refused(db_path: Path, claimed: int) -> None:
    """A 6 KB blob frame claiming 200 MB is a corrupt miss, never inflated."""
    s = make_store(db_path)
    s.put(key(1), entry(chat_body(1, filler=300)))
    s.close()
    frame = bomb_frame()
    assert len(frame) < 8 * 1024
    with raw_db(db_path) as db:
        ((k, v),) = list(db.iterator(prefix=b"b/"))
        header = bytes([1, 1]) + v[2:6] + claimed.to_bytes(4, "big")
        db.put(k, header + frame)
    s = make_store(db_path)
    try:
        assert s.get(key(1)) is None
        assert s.stats()["corrupt"] == 1
    finally:
        s.close()


def test_store_foreign_leveldb_is_refused_as_corrupt(db_path: Path) -> None:
    """A LevelDB directory holding data that is not a store is not adopted."""
    db = plyvel.DB(str(db_path), create_if_missing=True)
    db.put(b"someone-else", b"data")
    db.close()
    with pytest.raises(StoreCorruptError, match="not a sidecar store"):
        make_store(db_path)


# -- dictionaries -------------------------------------------------------------


def training_compressor() -> Compressor:
    return Compressor(
        min_samples=40, dict_size=4096, background=False, retrain_after=None
    )


def test_store_dictionary_persists_across_reopen(db_path: Path) -> None:
    """Blobs compressed with a trained dictionary read back after a restart."""
    s = make_store(db_path, compressor=training_compressor())
    for n in range(80):
        s.put(key(n), entry(chat_body(n)))
    assert s.stats()["dictionaries"] == 1
    s.close()
    s = make_store(db_path, compressor=Compressor(train=False))
    try:
        assert all(body_of(s.get(key(n))) == chat_body(n) for n in range(80))
        assert s.stats()["corrupt"] == 0
    finally:
        s.close()


def test_store_blob_naming_missing_dictionary_is_corrupt(db_path: Path) -> None:
    """A blob whose dictionary is gone from disk is a corrupt miss."""
    s = make_store(db_path, compressor=training_compressor())
    for n in range(80):
        s.put(key(n), entry(chat_body(n)))
    s.close()
    with raw_db(db_path) as db:
        for k in list(db.iterator(prefix=b"d/", include_value=False)):
            db.delete(k)
    s = make_store(db_path, compressor=Compressor(train=False))
    try:
        assert s.get(key(79)) is None
        assert s.stats()["corrupt"] == 1
    finally:
        s.close()


def test_store_old_dictionary_kept_while_referenced(db_path: Path) -> None:
    """A replaced dictionary stays on disk until its last blob is gone."""
    comp = training_compressor()
    s = make_store(db_path, compressor=comp)
    for n in range(80):
        s.put(key(n), entry(chat_body(n)))
    comp.train(ContentClass.CHAT)
    s.put(key(100), entry(chat_body(100)))
    assert s.stats()["dictionaries"] == 2
    for n in range(80):
        s.delete(key(n))
    assert s.stats()["dictionaries"] == 1
    s.close()
    s = make_store(db_path, compressor=Compressor(train=False))
    try:
        assert body_of(s.get(key(100))) == chat_body(100)
    finally:
        s.close()


# -- opening: locks, corruption, fallbacks -------------------------------------------


def test_store_second_open_of_same_directory_is_locked(
    store: DiskStore, db_path: Path
) -> None:
    """LevelDB admits one handle per directory; the second gets StoreLockedError."""
    with pytest.raises(StoreLockedError, match="locked by another process"):
        make_store(db_path)


def test_open_store_locked_memory_only_returns_none_and_warns(
    store: DiskStore, db_path: Path, cache_log: Captured
) -> None:
    """memory_only: a locked directory gives None and a WARNING with the reason."""
    assert (
        open_store(
            db_path, "memory_only", max_bytes=MiB, max_entry_bytes=MiB, compressor=None
        )
        is None
    )
    (record,) = [
        r for r in cache_log.records if r.getMessage() == "cache.disk_unavailable"
    ]
    assert (record.levelno, record.__dict__["reason"]) == (logging.WARNING, "locked")


def test_open_store_locked_quarantine_leaves_directory_alone(
    store: DiskStore, db_path: Path
) -> None:
    """quarantine: a locked directory is in use, so it is not moved; memory only."""
    assert (
        open_store(
            db_path, "quarantine", max_bytes=MiB, max_entry_bytes=MiB, compressor=None
        )
        is None
    )
    assert [p.name for p in db_path.parent.iterdir()] == [db_path.name]
    assert store.put(key(1), entry(b"still usable")) is True


def test_open_store_locked_fail_raises(store: DiskStore, db_path: Path) -> None:
    """fail: a locked directory raises StoreLockedError."""
    with pytest.raises(StoreLockedError):
        open_store(db_path, "fail", max_bytes=MiB, max_entry_bytes=MiB, compressor=None)


def corrupt_directory(path: Path) -> None:
    s = make_store(path)
    s.put(key(1), entry(chat_body(1)))
    s.close()
    (path / "CURRENT").write_text("garbage")


def test_open_store_corrupt_quarantine_moves_aside_and_opens_fresh(
    db_path: Path, cache_log: Captured
) -> None:
    """quarantine: a corrupt directory is renamed aside and a new store opened."""
    corrupt_directory(db_path)
    s = open_store(
        db_path, "quarantine", max_bytes=MiB, max_entry_bytes=MiB, compressor=None
    )
    assert s is not None
    try:
        assert s.stats()["entries"] == 0
        assert s.put(key(2), entry(b"fresh")) is True
    finally:
        s.close()
    aside = [p.name for p in db_path.parent.iterdir() if p != db_path]
    assert len(aside) == 1 and aside[0].startswith("disk.quarantine-")
    assert "cache.disk_quarantined" in cache_log.events()


def test_open_store_corrupt_memory_only_returns_none(
    db_path: Path, cache_log: Captured
) -> None:
    """memory_only: a corrupt directory gives None and is left for inspection."""
    corrupt_directory(db_path)
    assert (
        open_store(
            db_path, "memory_only", max_bytes=MiB, max_entry_bytes=MiB, compressor=None
        )
        is None
    )
    assert (db_path / "CURRENT").read_text() == "garbage"
    assert "cache.disk_unavailable" in cache_log.events()


def test_open_store_corrupt_fail_raises(db_path: Path) -> None:
    """fail: a corrupt directory raises StoreCorruptError naming the fallback."""
    corrupt_directory(db_path)
    with pytest.raises(StoreCorruptError, match=r"fallbacks\.disk: quarantine"):
        open_store(db_path, "fail", max_bytes=MiB, max_entry_bytes=MiB, compressor=None)


def test_open_store_unknown_fallback_raises_value_error(db_path: Path) -> None:
    """A fallback outside memory_only, quarantine and fail is refused."""
    with pytest.raises(ValueError):
        open_store(
            db_path, "retry", max_bytes=MiB, max_entry_bytes=MiB, compressor=None
        )


# -- kill -9 mid-write --------------------------------------------------------


def writer_body(n: int) -> bytes:
    """The n-th answer the writer child stores: 0 to 60 KB, half compressible."""
    noise = random.Random(n).randbytes((n * 7919) % 30_000).hex()
    return json.dumps({"n": n, "object": "chat.completion", "pad": noise}).encode()


# The child imports writer_body from this module, so both sides agree on bodies.
WRITER = textwrap.dedent(
    """
    import hashlib, sys, time
    from sidecar.cache.compress import Compressor
    from sidecar.cache.store import DiskStore, Entry
    from tests.cache.test_store import writer_body

    store = DiskStore(sys.argv[1], max_bytes=1 << 30, max_entry_bytes=1 << 20,
                      compressor=Compressor(min_samples=32, dict_size=4096))
    print("ready", flush=True)
    for n in range(100000):
        key = hashlib.sha256(b"action-%d" % n).digest()
        e = Entry.create(writer_body(n), created=time.time(), ttl_s=3600)
        store.put(key, e)
        sys.stdout.write("%d\\n" % n)
        sys.stdout.flush()
    """
)


def test_store_kill_during_writes_keeps_acknowledged_entries_intact(
    db_path: Path,
) -> None:
    """After SIGKILL mid-write, each acknowledged entry reads back or is cleanly
    missing; nothing is corrupt."""
    seed = random.randrange(1 << 30)
    stop_after = random.Random(seed).randrange(20, 400)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    acked: list[int] = []
    with subprocess.Popen(
        [sys.executable, "-c", WRITER, str(db_path)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    ) as proc:
        # A watchdog bounds the test even if the child hangs.
        watchdog = threading.Timer(60, proc.kill)
        watchdog.start()
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
            for line in proc.stdout:
                acked.append(int(line))
                if len(acked) >= stop_after:
                    break
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            watchdog.cancel()
    assert proc.returncode == -signal.SIGKILL, f"seed={seed}"
    assert len(acked) == stop_after, f"seed={seed}"
    s = make_store(db_path, compressor=Compressor(train=False), max_bytes=1 << 30)
    try:
        for n in acked:
            got = s.get(key(n))
            assert got is None or got.body == writer_body(n), f"seed={seed} n={n}"
        assert s.stats()["corrupt"] == 0, f"seed={seed}"
    finally:
        s.close()


# -- full disk ----------------------------------------------------------------


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, with 1.2 MiB of it taken by a ballast file."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        (mount / "ballast").write_bytes(os.urandom(1200 * 1024))
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.fixture
def full_store(tiny_fs: Path) -> Iterator[tuple[DiskStore, list[int]]]:
    """A store on the tiny tmpfs, written until the disk is full.

    Yields the store and the keys stored before the failure.
    """
    s = make_store(
        tiny_fs / "disk",
        compressor=None,
        max_bytes=64 * MiB,
        write_buffer_size=128 * 1024,
        paranoid_checks=False,
    )
    stored: list[int] = []
    try:
        for n in range(200):
            try:
                s.put(key(n), entry(os.urandom(40_000)))
            except StoreFullError:
                break
            stored.append(n)
        else:
            pytest.fail("a 2 MiB tmpfs never filled up")
        yield s, stored
    finally:
        s.close()


def test_store_full_disk_put_raises_and_degrades(tiny_fs: Path) -> None:
    """The write that hits ENOSPC raises StoreFullError and degrades the store."""
    s = make_store(
        tiny_fs / "disk",
        compressor=None,
        max_bytes=64 * MiB,
        write_buffer_size=128 * 1024,
    )
    try:
        with pytest.raises(StoreFullError):
            for n in range(200):
                s.put(key(n), entry(os.urandom(40_000)))
        assert s.degraded is True
    finally:
        s.close()


def test_store_degraded_gets_still_return_entries(
    full_store: tuple[DiskStore, list[int]],
) -> None:
    """While degraded, entries written before the failure are still served."""
    s, stored = full_store
    assert stored
    assert all(s.get(key(n)) is not None for n in stored)


def test_store_degraded_puts_are_skipped_and_counted(
    full_store: tuple[DiskStore, list[int]],
) -> None:
    """While degraded, puts return False without raising, and are counted."""
    s, _ = full_store
    assert s.put(key(999), entry(b"small")) is False
    assert s.stats()["writes_skipped"] == 1


def test_store_degraded_delete_raises(full_store: tuple[DiskStore, list[int]]) -> None:
    """While degraded, an invalidation that cannot be applied raises."""
    s, stored = full_store
    with pytest.raises(StoreWriteError, match="degraded"):
        s.delete(key(stored[0]))


def test_store_reopen_after_space_freed_restores_writes(
    full_store: tuple[DiskStore, list[int]], tiny_fs: Path
) -> None:
    """Once space is freed, reopen() clears degraded mode and writes work."""
    s, stored = full_store
    (tiny_fs / "ballast").unlink()
    assert s.reopen() is True
    assert s.degraded is False
    assert s.put(key(999), entry(b"after reopen")) is True
    assert s.get(key(999)) is not None
    assert all(s.get(key(n)) is not None for n in stored)


def test_store_reopen_without_space_stays_degraded_and_readable(
    full_store: tuple[DiskStore, list[int]],
) -> None:
    """reopen() on a still-full disk keeps the handle, so reads go on."""
    s, stored = full_store
    # The failed put may have left a few free blocks, enough for LevelDB to
    # open a new log; take them, so the disk really is still full.
    fd = os.open(s.path.parent / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    assert s.reopen() is False
    assert s.degraded is True
    assert s.get(key(stored[0])) is not None


# -- the async facade ---------------------------------------------------------


class ThreadRecordingStore(DiskStore):
    """A DiskStore that notes which thread ran each blocking call."""

    threads: list[int]

    def get(self, action_key: bytes) -> Entry | None:
        self.threads.append(threading.get_ident())
        return super().get(action_key)

    def put(self, action_key: bytes, entry: Entry) -> bool:
        self.threads.append(threading.get_ident())
        return super().put(action_key, entry)


async def test_async_store_runs_blocking_calls_off_the_loop_thread(
    db_path: Path,
) -> None:
    """get and put run on the store's own thread, never the event loop's."""
    inner = ThreadRecordingStore(
        db_path, max_bytes=MiB, max_entry_bytes=MiB, compressor=None, clock=Clock()
    )
    inner.threads = []
    store = AsyncDiskStore(inner)
    try:
        assert await store.put(key(1), entry(b"body")) is True
        assert body_of(await store.get(key(1))) == b"body"
    finally:
        await store.close()
    assert len(inner.threads) == 2
    assert threading.get_ident() not in inner.threads
    assert len(set(inner.threads)) == 1


async def test_async_store_concurrent_calls_are_serialised(db_path: Path) -> None:
    """Many concurrent calls all complete, in one thread, without interleaving."""
    inner = ThreadRecordingStore(
        db_path, max_bytes=MiB, max_entry_bytes=MiB, compressor=None, clock=Clock()
    )
    inner.threads = []
    store = AsyncDiskStore(inner)
    try:
        results = await asyncio.gather(
            *(store.put(key(n), entry(b"body %d" % n)) for n in range(20))
        )
        assert results == [True] * 20
        assert (await store.stats())["entries"] == 20
    finally:
        await store.close()
    assert len(set(inner.threads)) == 1


async def test_async_store_open_locked_memory_only_returns_none(
    store: DiskStore, db_path: Path
) -> None:
    """AsyncDiskStore.open follows the fallback too: memory only gives None."""
    got = await AsyncDiskStore.open(
        db_path, "memory_only", max_bytes=MiB, max_entry_bytes=MiB, compressor=None
    )
    assert got is None


async def test_async_store_open_then_round_trip(db_path: Path) -> None:
    """A store opened through the facade stores and serves entries."""
    store = await AsyncDiskStore.open(
        db_path,
        "fail",
        max_bytes=MiB,
        max_entry_bytes=MiB,
        compressor=None,
        clock=Clock(),
    )
    assert store is not None
    try:
        await store.put(key(1), entry(b"async"))
        assert body_of(await store.get(key(1))) == b"async"
        assert store.degraded is False
    finally:
        await store.close()


def test_entry_expired_is_strictly_after_ttl() -> None:
    """Entry.expired is true only once created + ttl_s lies in the past."""
    e = entry(b"x", created=100.0, ttl_s=10.0)
    assert (e.expired(110.0), e.expired(110.5)) == (False, True)
