"""Bytes that do not match their digest are never served with 200 (verify.py)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from sidecar.artifacts import ArtifactCounters, Artifacts
from sidecar.artifacts.digest import Digest, Fingerprint, HashResult, hash_fd
from sidecar.artifacts.index import INDEX_FILE, DigestIndex, Record
from sidecar.artifacts.model import ArtifactsModel
from sidecar.artifacts.store import Store
from sidecar.artifacts.verify import Verifier
from tests.artifacts.conftest import pattern_bytes, quick_options, serving, write_file

SIZE = 1024 * 1024
AN_HOUR_AGO_NS = 3600 * 10**9


def _flip_byte(path: Path, offset: int) -> None:
    """Change one byte in place, as a normal write does (mtime and ctime move)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(1)
        f.seek(offset)
        f.write(bytes([old[0] ^ 0xFF]))


def _wait_fs_tick(scratch: Path, after_ns: int) -> None:
    """Return once the filesystem clock has passed ``after_ns``.

    File times come from a coarse clock (one kernel tick); a change in the
    same tick as the recorded fingerprint would be invisible to it, which
    these tests are not about. Bounded: a tick is a few milliseconds.
    """
    for _ in range(200_000):
        scratch.write_bytes(b"")
        if os.stat(scratch).st_ctime_ns > after_ns:
            return
    raise AssertionError("filesystem clock did not advance")


def _age(path: Path) -> None:
    st = path.stat()
    os.utime(
        path, ns=(st.st_atime_ns - AN_HOUR_AGO_NS, st.st_mtime_ns - AN_HOUR_AGO_NS)
    )


async def test_verify_flipped_byte_normal_write_never_served(
    models_dir: Path,
    data_dir: Path,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A byte changed by a normal write is caught before any 200 and quarantined."""
    data = pattern_bytes(SIZE)
    digest = write_file(models_dir, "model.gguf", data)
    _age(models_dir / "model.gguf")
    counted: list[str] = []
    caplog.set_level(logging.INFO, logger="sidecar.artifacts")
    artifacts = Artifacts(
        dirs=[str(models_dir)],
        data_dir=data_dir,
        options=quick_options(),
        counters=ArtifactCounters(quarantined=counted.append),
    )
    async with serving(artifacts) as served:
        async with client.get(served.by_hash(digest)) as resp:
            assert resp.status == 200 and await resp.read() == data
        _flip_byte(models_dir / "model.gguf", SIZE // 2)
        async with client.get(served.by_hash(digest)) as resp:
            assert resp.status == 404
        quarantined = artifacts.model.snapshot()["quarantined"]
        assert quarantined["total"] == 1
        assert quarantined["recent"][0]["reason"] == "modified"
    assert counted == ["modified"]
    logged = [r for r in caplog.records if r.getMessage() == "artifacts.quarantined"]
    assert [r.__dict__["digest"] for r in logged] == [digest.short]


async def test_verify_deleted_file_404_and_record_dropped(
    models_dir: Path, data_dir: Path, client: aiohttp.ClientSession
) -> None:
    """A file deleted after indexing answers 404 and leaves the index."""
    digest = write_file(models_dir, "model.gguf", b"short-lived")
    artifacts = Artifacts(
        dirs=[str(models_dir)], data_dir=data_dir, options=quick_options()
    )
    async with serving(artifacts) as served:
        (models_dir / "model.gguf").unlink()
        async with client.get(served.by_hash(digest)) as resp:
            assert resp.status == 404
        assert (
            artifacts.server is not None and artifacts.server.index.lookup(digest) == []
        )


async def test_verify_flipped_byte_mtime_restored_caught_by_ctime(
    models_dir: Path, data_dir: Path, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    """Restoring mtime with os.utime after the write still moves ctime: caught."""
    data = pattern_bytes(SIZE)
    path = models_dir / "model.gguf"
    digest = write_file(models_dir, "model.gguf", data)
    artifacts = Artifacts(
        dirs=[str(models_dir)], data_dir=data_dir, options=quick_options()
    )
    async with serving(artifacts) as served:
        async with client.get(served.by_hash(digest)) as resp:
            assert resp.status == 200 and await resp.read() == data
        before = path.stat()
        _wait_fs_tick(tmp_path / "tick", before.st_ctime_ns)
        _flip_byte(path, 7)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = path.stat()
        assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
            before.st_size,
            before.st_mtime_ns,
            before.st_ino,
        )
        async with client.get(
            served.by_hash(digest), headers={"Range": "bytes=0-15"}
        ) as resp:
            assert resp.status == 404
        async with client.get(served.by_hash(digest)) as resp:
            assert resp.status == 404
        assert artifacts.model.snapshot()["quarantined"]["total"] == 1


async def test_verify_corruption_invisible_to_metadata_caught_before_first_200(
    models_dir: Path, data_dir: Path, client: aiohttp.ClientSession
) -> None:
    """Bytes changed with the metadata intact (bit rot) are caught before a 200."""
    data = pattern_bytes(SIZE)
    path = models_dir / "model.gguf"
    digest = write_file(models_dir, "model.gguf", data)
    first = Artifacts(
        dirs=[str(models_dir)], data_dir=data_dir, options=quick_options()
    )
    async with serving(first):
        pass
    _flip_byte(path, 12345)
    _forge_fingerprint(
        data_dir, path
    )  # the index now agrees with the rotten file's stat

    again = Artifacts(
        dirs=[str(models_dir)], data_dir=data_dir, options=quick_options()
    )
    async with serving(again, scan=False) as served:
        async with client.head(served.by_hash(digest)) as resp:
            assert resp.status == 200  # no body: the fingerprint check suffices
        async with client.get(served.by_hash(digest)) as resp:
            assert resp.status == 404
            assert b'"code":"not_found"' in await resp.read()
        quarantined = again.model.snapshot()["quarantined"]
        assert quarantined["total"] == 1
        assert quarantined["recent"][0]["reason"] == "corrupt"


def _forge_fingerprint(data_dir: Path, path: Path) -> None:
    st = path.stat()
    db = sqlite3.connect(data_dir / "artifacts" / INDEX_FILE)
    try:
        with db:
            changed = db.execute(
                "UPDATE files SET dev=?, inode=?, size=?, mtime_ns=?, ctime_ns=?"
                " WHERE path=?",
                (
                    st.st_dev,
                    st.st_ino,
                    st.st_size,
                    st.st_mtime_ns,
                    st.st_ctime_ns,
                    os.path.realpath(path),
                ),
            ).rowcount
        assert changed == 1
    finally:
        db.close()


async def test_verify_corrupt_store_blob_moved_to_quarantine(
    data_dir: Path, client: aiohttp.ClientSession
) -> None:
    """A store blob whose bytes do not match its name is moved aside, not served."""
    claimed = Digest(hashlib.sha256(b"the real blob").hexdigest())
    store_dir = data_dir / "artifacts"
    store_dir.mkdir(parents=True)
    (store_dir / claimed).write_bytes(b"something else")
    artifacts = Artifacts(dirs=[], data_dir=data_dir, options=quick_options())
    async with serving(artifacts) as served:
        async with client.get(served.by_hash(claimed)) as resp:
            assert resp.status == 404
        assert not (store_dir / claimed).exists()
        assert (store_dir / "quarantine" / claimed).read_bytes() == b"something else"
        assert (
            artifacts.model.snapshot()["quarantined"]["recent"][0]["reason"]
            == "corrupt"
        )


async def test_verify_touched_file_same_bytes_served_after_rehash(
    models_dir: Path, data_dir: Path, client: aiohttp.ClientSession
) -> None:
    """A changed fingerprint with the same bytes is re-hashed and served."""
    data = pattern_bytes(4096)
    path = models_dir / "model.gguf"
    digest = write_file(models_dir, "model.gguf", data)
    artifacts = Artifacts(
        dirs=[str(models_dir)], data_dir=data_dir, options=quick_options()
    )
    async with serving(artifacts) as served:
        _age(path)
        hashed_before = artifacts.model.snapshot()["hashing"]["bytes_done"]
        async with client.get(served.by_hash(digest)) as resp:
            assert resp.status == 200 and await resp.read() == data
        assert (
            artifacts.model.snapshot()["hashing"]["bytes_done"] == hashed_before + 4096
        )
        assert artifacts.model.snapshot()["quarantined"]["total"] == 0


def _verifier(
    tmp_path: Path, clock: Callable[[], float], **kw: bool | float
) -> Verifier:
    store = Store(str(tmp_path / "store"))
    index = DigestIndex(os.path.join(store.root, INDEX_FILE))
    model = ArtifactsModel()
    return Verifier(index, store, model, clock=clock, **kw)  # type: ignore[arg-type]


def _hashed_record(tmp_path: Path) -> tuple[str, HashResult]:
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    fd = os.open(path, os.O_RDONLY)
    try:
        return str(path), hash_fd(fd)
    finally:
        os.close(fd)


def test_verifier_fresh_hash_then_interval_elapsed_needs_hash(tmp_path: Path) -> None:
    """A body needs a re-hash ``reverify_after_s`` after the last full hash."""
    now = [1000.0]
    verifier = _verifier(tmp_path, lambda: now[0], reverify_after_s=60.0)
    path, result = _hashed_record(tmp_path)
    record = verifier.apply(path, result, None)
    assert record is not None
    assert not verifier.needs_hash(record, result.after, body=True)
    now[0] += 61.0
    assert verifier.needs_hash(record, result.after, body=True)
    assert not verifier.needs_hash(record, result.after, body=False)
    verifier.index.close()


def test_verifier_record_from_earlier_process_needs_hash_for_body(
    tmp_path: Path,
) -> None:
    """A record not hashed by this process needs a hash before a body, not HEAD."""
    verifier = _verifier(tmp_path, lambda: 0.0)
    path, result = _hashed_record(tmp_path)
    record = Record(path, result.digest, result.after, hashed_at=0.0)
    assert verifier.needs_hash(record, result.after, body=True)
    assert not verifier.needs_hash(record, result.after, body=False)
    verifier.index.close()


def test_verifier_first_serve_off_trusts_recent_record(tmp_path: Path) -> None:
    """With verify_on_first_serve off, a record younger than the interval is trusted."""
    import time

    verifier = _verifier(
        tmp_path, lambda: 0.0, verify_on_first_serve=False, reverify_after_s=3600.0
    )
    path, result = _hashed_record(tmp_path)
    assert not verifier.needs_hash(
        Record(path, result.digest, result.after, time.time()), result.after, body=True
    )
    assert verifier.needs_hash(
        Record(path, result.digest, result.after, time.time() - 7200),
        result.after,
        body=True,
    )
    verifier.index.close()


def test_verifier_changed_fingerprint_needs_hash_even_without_body(
    tmp_path: Path,
) -> None:
    """A fingerprint that differs from the record needs a hash for any answer."""
    verifier = _verifier(tmp_path, lambda: 0.0)
    path, result = _hashed_record(tmp_path)
    record = verifier.apply(path, result, None)
    assert record is not None
    fp = result.after
    moved = Fingerprint(fp.dev, fp.inode, fp.size, fp.mtime_ns, fp.ctime_ns + 1)
    assert verifier.needs_hash(record, moved, body=False)
    verifier.index.close()


async def test_verifier_concurrent_checks_one_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two requests for one unverified file share one hash (coalesced per path)."""
    verifier = _verifier(tmp_path, lambda: 0.0)
    path, result = _hashed_record(tmp_path)
    record = Record(path, result.digest, result.after, hashed_at=0.0)
    loop = asyncio.get_running_loop()
    started, release = asyncio.Event(), threading.Event()
    calls: list[str] = []
    real = verifier.hash_and_apply

    def held(p: str, fd: int, expected: Record | None) -> Record | None:
        calls.append(p)
        loop.call_soon_threadsafe(started.set)
        assert release.wait(10)
        return real(p, fd, expected)

    monkeypatch.setattr(verifier, "hash_and_apply", held)
    fds = [os.open(path, os.O_RDONLY) for _ in range(2)]
    try:
        first = asyncio.create_task(
            verifier.check(record, fds[0], result.after, body=True)
        )
        await started.wait()
        second = asyncio.create_task(
            verifier.check(record, fds[1], result.after, body=True)
        )
        await asyncio.sleep(0)  # let it reach its wait on the hash in flight
        release.set()
        assert await first == await second
        assert calls == [path]
    finally:
        for fd in fds:
            os.close(fd)
        await verifier.close()
        verifier.index.close()
