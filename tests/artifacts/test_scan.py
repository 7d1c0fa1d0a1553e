"""The digest index and the folder scan: persistence, change detection, progress."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from pathlib import Path

import aiohttp
import pytest

from sidecar.artifacts import Artifacts
from sidecar.artifacts.digest import Digest, Fingerprint
from sidecar.artifacts.index import INDEX_FILE, DigestIndex, Record
from tests.artifacts.conftest import pattern_bytes, quick_options, serving, write_file


async def test_scan_restart_rehashes_only_changed(
    models_dir: Path, data_dir: Path
) -> None:
    """After a restart only new and changed files are read; vanished ones dropped."""
    for i, name in enumerate(("a.bin", "b.bin", "c.bin")):
        write_file(models_dir, name, pattern_bytes(1000 + i, seed=i))
    first = Artifacts(
        dirs=[str(models_dir)], data_dir=data_dir, options=quick_options()
    )
    async with serving(first, scan=False):
        assert first.scanner is not None
        assert (await first.scanner.scan_now()).hashed_files == 3

    (models_dir / "b.bin").write_bytes(pattern_bytes(1001, seed=1) + b"more")
    (models_dir / "c.bin").unlink()
    new_digest = write_file(models_dir, "d.bin", b"new file")

    again = Artifacts(
        dirs=[str(models_dir)], data_dir=data_dir, options=quick_options()
    )
    async with serving(again, scan=False):
        assert again.scanner is not None
        report = await again.scanner.scan_now()
        assert (report.hashed_files, report.hashed_bytes) == (
            2,
            1001 + 4 + len(b"new file"),
        )
        assert report.removed == 1
        assert report.files == 3
        assert again.server is not None
        assert [r.path for r in again.server.index.lookup(new_digest)] == [
            os.path.realpath(models_dir / "d.bin")
        ]


async def test_scan_indexed_files_served_without_scanning(
    models_dir: Path, data_dir: Path, client: aiohttp.ClientSession
) -> None:
    """Files indexed by an earlier run are served from start-up, before any scan."""
    data = pattern_bytes(5000)
    digest = write_file(models_dir, "m.bin", data)
    async with serving(
        Artifacts(dirs=[str(models_dir)], data_dir=data_dir, options=quick_options())
    ):
        pass
    again = Artifacts(
        dirs=[str(models_dir)], data_dir=data_dir, options=quick_options()
    )
    async with serving(again, scan=False) as served:
        async with client.get(served.by_hash(digest)) as resp:
            assert resp.status == 200 and await resp.read() == data
        assert again.scanner is not None and again.scanner.passes == 0


async def test_scan_background_rescan_notices_new_file(
    models_dir: Path, data_dir: Path, client: aiohttp.ClientSession
) -> None:
    """The background scan indexes at start-up and notices files added later."""
    artifacts = Artifacts(
        dirs=[str(models_dir)],
        data_dir=data_dir,
        options=quick_options(background_scan=True, rescan_interval_s=0.01),
    )
    async with serving(artifacts, scan=False) as served:
        scanner = artifacts.scanner
        assert scanner is not None
        if scanner.passes == 0:
            await asyncio.wait_for(scanner.pass_finished.wait(), 10)
        digest = write_file(models_dir, "late.bin", b"added after start-up")
        # The pass running now may have listed the folder before the write;
        # the one after it cannot have.
        seen = scanner.passes
        while scanner.passes < seen + 2:
            await asyncio.wait_for(scanner.pass_finished.wait(), 10)
        async with client.get(served.by_hash(digest)) as resp:
            assert resp.status == 200
            assert await resp.read() == b"added after start-up"


async def test_scan_changed_file_reindexed_under_new_digest(
    models_dir: Path, data_dir: Path, client: aiohttp.ClientSession
) -> None:
    """A replaced file is noticed: its old digest is withdrawn, the new one served."""
    old = write_file(models_dir, "m.bin", b"version one")
    artifacts = Artifacts(
        dirs=[str(models_dir)], data_dir=data_dir, options=quick_options()
    )
    async with serving(artifacts) as served:
        new = write_file(models_dir, "m.bin", b"version two!")
        assert artifacts.scanner is not None
        await artifacts.scanner.scan_now()
        async with client.get(served.by_hash(old)) as resp:
            assert resp.status == 404
        async with client.get(served.by_hash(new)) as resp:
            assert await resp.read() == b"version two!"


async def test_scan_progress_logged(
    models_dir: Path, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A pass that hashes logs its start and end with file and byte counts."""
    write_file(models_dir, "m.bin", pattern_bytes(3000))
    caplog.set_level(logging.INFO, logger="sidecar.artifacts")
    artifacts = Artifacts(
        dirs=[str(models_dir)], data_dir=data_dir, options=quick_options()
    )
    async with serving(artifacts):
        pass
    events = {r.getMessage(): r for r in caplog.records}
    assert events["artifacts.index_started"].__dict__["bytes"] == 3000
    finished = events["artifacts.index_finished"].__dict__
    assert (finished["hashed_files"], finished["hashed_bytes"]) == (1, 3000)
    assert artifacts.model.snapshot()["hashing"] == {
        "running": False,
        "files_done": 1,
        "files_total": 1,
        "bytes_done": 3000,
        "bytes_total": 3000,
    }


async def test_scan_leaves_rows_of_other_folders(
    tmp_path: Path, models_dir: Path, data_dir: Path
) -> None:
    """Rows for folders this sidecar does not serve stay on disk, unserved."""
    other = tmp_path / "other"
    other_digest = write_file(other, "x.bin", b"other folder")
    write_file(models_dir, "m.bin", b"mine")
    both = Artifacts(dirs=[str(other)], data_dir=data_dir, options=quick_options())
    async with serving(both):
        pass
    mine = Artifacts(dirs=[str(models_dir)], data_dir=data_dir, options=quick_options())
    async with serving(mine):
        assert mine.server is not None
        assert mine.server.index.lookup(other_digest) == []
    db = sqlite3.connect(data_dir / "artifacts" / INDEX_FILE)
    try:
        rows = db.execute("SELECT digest FROM files").fetchall()
    finally:
        db.close()
    assert (other_digest,) in rows and len(rows) == 2


async def test_start_removes_leftover_temp_files(data_dir: Path) -> None:
    """Temporary files of fetches cut by a crash are removed at start-up."""
    store = data_dir / "artifacts"
    store.mkdir(parents=True)
    leftover = store / (".tmp-" + "0" * 64 + "-abcd")
    leftover.write_bytes(b"partial")
    async with serving(Artifacts(dirs=[], data_dir=data_dir, options=quick_options())):
        assert not leftover.exists()


def test_index_record_survives_reopen(tmp_path: Path) -> None:
    """A record written is there after the index is closed and opened again."""
    db = str(tmp_path / INDEX_FILE)
    digest = Digest("ab" * 32)
    record = Record("/models/m.bin", digest, Fingerprint(1, 2, 3, 4, 5), 6.0)
    index = DigestIndex(db)
    index.put(record)
    index.close()
    reopened = DigestIndex(db)
    reopened.load(lambda path: True)
    assert reopened.lookup(digest) == [record]
    assert reopened.totals() == (1, 3)
    reopened.close()


def test_index_put_replaces_path_digest(tmp_path: Path) -> None:
    """Putting a path again moves it from its old digest to the new one."""
    index = DigestIndex(str(tmp_path / INDEX_FILE))
    old, new = Digest("ab" * 32), Digest("cd" * 32)
    index.put(Record("/m.bin", old, Fingerprint(1, 2, 3, 4, 5), 0.0))
    index.put(Record("/m.bin", new, Fingerprint(1, 2, 4, 5, 6), 0.0))
    assert index.lookup(old) == []
    assert [r.digest for r in index.lookup(new)] == [new]
    index.close()


def test_index_load_filters_paths(tmp_path: Path) -> None:
    """``load`` keeps only the rows the filter accepts in the served view."""
    db = str(tmp_path / INDEX_FILE)
    index = DigestIndex(db)
    index.put(Record("/in/m.bin", Digest("ab" * 32), Fingerprint(1, 2, 3, 4, 5), 0.0))
    index.put(Record("/out/m.bin", Digest("cd" * 32), Fingerprint(1, 3, 3, 4, 5), 0.0))
    index.load(lambda path: path.startswith("/in/"))
    assert index.paths() == ["/in/m.bin"]
    index.close()
