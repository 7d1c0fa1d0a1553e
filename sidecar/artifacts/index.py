"""The digest index: which file, by path and fingerprint, holds which digest.

Owns the persistent table ``(path, dev, inode, size, mtime_ns, ctime_ns) ->
sha256`` in ``<data_dir>/artifacts/index.sqlite3`` and an in-memory view of
it for lookups by digest. Not here: walking folders and hashing (scan.py),
deciding whether a record may be served (verify.py).

Invariants:
- A record is written only after a full hash of the file at that
  fingerprint produced that digest (verify.py and scan.py are the writers).
- Writes go to SQLite first, in one transaction each (atomic: a crash
  leaves the old row or the new one), then to the memory view; so the view
  is never ahead of the disk and ``load`` may replace it at any time.
- One lock guards the view and the connection. Lookups hold it for a dict
  read and never wait on disk while a writer holds it only for one small
  transaction (WAL mode, ``synchronous=NORMAL``: no fsync per commit).
  Callers in any thread; the event loop only ever calls the read methods.
- The view holds only paths inside the roots given to ``load``: rows the
  command line wrote for other folders stay on disk, untouched and unserved.

Known limitations: ``synchronous=NORMAL`` may lose the last commits on a
power cut (never on a process crash); a lost row only costs a re-hash at
the next scan. One writer process at a time is assumed; a second (the
command line beside a running sidecar) waits up to ``_BUSY_TIMEOUT_S``
for the lock, then fails that write (``IndexWriteError``, an OSError) and
the next scan retries it. ``load`` holds the lock while it reads every row:
with a hundred thousand files, lookups wait some tens of milliseconds once
per scan.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Final

from sidecar.artifacts.digest import Digest, Fingerprint

INDEX_FILE: Final = "index.sqlite3"
_BUSY_TIMEOUT_S: Final = 5.0
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,
    digest TEXT NOT NULL,
    dev INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    hashed_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS files_by_digest ON files (digest);
"""
_COLUMNS: Final = "path, digest, dev, inode, size, mtime_ns, ctime_ns, hashed_at"


@dataclass(frozen=True, slots=True)
class Record:
    """One indexed file: its resolved path, digest and fingerprint when hashed."""

    path: str
    digest: Digest
    fingerprint: Fingerprint
    hashed_at: float  # wall clock, seconds

    def refreshed(self, fingerprint: Fingerprint, hashed_at: float) -> Record:
        return replace(self, fingerprint=fingerprint, hashed_at=hashed_at)


PathFilter = Callable[[str], bool]


class IndexWriteError(OSError):
    """The index file could not be read or written (SQLite's error, translated).

    An OSError, so every caller that copes with a failing disk copes with
    this too: the view is left as it was and the next scan retries.
    """


@contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        raise IndexWriteError(f"artifact index: {exc}") from exc


class DigestIndex:
    """The persistent index and its in-memory view; safe in any thread."""

    def __init__(self, db_path: str) -> None:
        os.makedirs(os.path.dirname(db_path) or ".", exist_ok=True)
        self.db_path = db_path
        with _translated():
            self._db = sqlite3.connect(
                db_path,
                timeout=_BUSY_TIMEOUT_S,
                check_same_thread=False,
                isolation_level=None,
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        # path -> record and digest -> paths: the served view, guarded by _lock.
        self._by_path: dict[str, Record] = {}
        self._by_digest: dict[Digest, list[str]] = {}

    def load(self, keep: PathFilter) -> None:
        """Replace the view with every stored row whose path ``keep`` accepts."""
        with self._lock, _translated():
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM files").fetchall()
            self._by_path.clear()
            self._by_digest.clear()
            for row in rows:
                record = _record(row)
                if record is not None and keep(record.path):
                    self._remember(record)

    def lookup(self, digest: Digest) -> list[Record]:
        """Records claiming ``digest``, oldest path first."""
        with self._lock:
            return [self._by_path[p] for p in self._by_digest.get(digest, ())]

    def get(self, path: str) -> Record | None:
        with self._lock:
            return self._by_path.get(path)

    def paths(self) -> list[str]:
        with self._lock:
            return list(self._by_path)

    def totals(self) -> tuple[int, int]:
        """How many files the view holds, and their bytes."""
        with self._lock:
            total = sum(r.fingerprint.size for r in self._by_path.values())
            return len(self._by_path), total

    def put(self, record: Record) -> None:
        fp = record.fingerprint
        with self._lock, _translated():
            self._db.execute(
                f"INSERT OR REPLACE INTO files ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)",
                (
                    record.path,
                    str(record.digest),
                    fp.dev,
                    fp.inode,
                    fp.size,
                    fp.mtime_ns,
                    fp.ctime_ns,
                    record.hashed_at,
                ),
            )
            self._forget(record.path)
            self._remember(record)

    def remove(self, path: str) -> Record | None:
        with self._lock, _translated():
            self._db.execute("DELETE FROM files WHERE path = ?", (path,))
            return self._forget(path)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # The two helpers below run with _lock held.

    def _remember(self, record: Record) -> None:
        self._by_path[record.path] = record
        self._by_digest.setdefault(record.digest, []).append(record.path)

    def _forget(self, path: str) -> Record | None:
        old = self._by_path.pop(path, None)
        if old is not None:
            paths = self._by_digest[old.digest]
            paths.remove(path)
            if not paths:
                del self._by_digest[old.digest]
        return old


def _record(row: tuple[Any, ...]) -> Record | None:
    """A row as a record; None for a row with a malformed digest."""
    path, digest, dev, inode, size, mtime_ns, ctime_ns, hashed_at = row
    parsed = Digest.parse(str(digest))
    if parsed is None:
        return None
    fp = Fingerprint(int(dev), int(inode), int(size), int(mtime_ns), int(ctime_ns))
    return Record(str(path), parsed, fp, float(hashed_at))
