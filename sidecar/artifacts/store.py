"""The sidecar's content-addressed store: ``<data_dir>/artifacts/<sha256>``.

Owns the folder's layout and the file moves in it: temporary files for
blobs being fetched, the rename that publishes a verified blob under its
digest, discarding a failed fetch, and quarantine. Not here: fetching and
hashing (ingest.py), indexing the published files (index.py).

Layout::

    <data_dir>/artifacts/<sha256>                 published blobs
    <data_dir>/artifacts/.tmp-<sha256>-<random>   blobs being fetched
    <data_dir>/artifacts/quarantine/<sha256>      blobs whose bytes did not
                                                  match their name
    <data_dir>/artifacts/index.sqlite3            the digest index

Invariants: a file is published only by ``os.replace`` of a temporary file
in the same folder (atomic on POSIX: readers see the old name, or the whole
new file), and only after its bytes hashed to its name. Temporary files are
never served and are removed at start-up, since no fetch survives a
restart. Quarantine keeps at most one file per digest (a later one replaces
an earlier), so repeated corruption cannot fill the disk with copies.
Every method blocks: call them from a worker thread.

Known limitations: no eviction: the store grows with every distinct blob
fetched and an operator deletes files by hand (the next scan drops their
index rows). Published blobs are not fsynced: after a power cut a blob may
be short or zero-filled; its fingerprint then no longer matches and it is
re-hashed and quarantined before anything is served from it.
"""

from __future__ import annotations

import os
import secrets
from typing import Final

from sidecar.artifacts.digest import Digest

TEMP_PREFIX: Final = ".tmp-"
QUARANTINE_DIR: Final = "quarantine"


class Store:
    """The store folder; ``root`` is resolved (no symlinks)."""

    def __init__(self, root: str) -> None:
        os.makedirs(os.path.join(root, QUARANTINE_DIR), exist_ok=True)
        self.root = os.path.realpath(root)

    def path_for(self, digest: Digest) -> str:
        return os.path.join(self.root, digest)

    def digest_of(self, path: str) -> Digest | None:
        """The digest a published blob's path names, or None (not a blob)."""
        folder, name = os.path.split(path)
        return Digest.parse(name) if folder == self.root else None

    def create_temp(self, digest: Digest) -> TempBlob:
        """A new, empty temporary file for ``digest``, open for writing and reading."""
        return TempBlob(self, digest)

    def quarantine(self, path: str, digest: Digest) -> str | None:
        """Move a published blob aside; None when it was already gone."""
        target = os.path.join(self.root, QUARANTINE_DIR, digest)
        try:
            os.replace(path, target)
        except FileNotFoundError:
            return None
        return target

    def remove_temps(self) -> int:
        """Delete temporary files left by an earlier process; how many."""
        removed = 0
        for entry in os.scandir(self.root):
            if entry.name.startswith(TEMP_PREFIX) and entry.is_file(
                follow_symlinks=False
            ):
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    continue
                removed += 1
        return removed


class TempBlob:
    """A blob being fetched: a temporary file in the store, written and read at once.

    Each descriptor is closed exactly once, and the file is either published
    (renamed to its digest) or discarded (unlinked), never both. The methods
    are called one after another, never concurrently (the fetch awaits each
    worker-thread call to its end, even when cancelled).
    """

    def __init__(self, store: Store, digest: Digest) -> None:
        self.digest = digest
        self._store = store
        name = f"{TEMP_PREFIX}{digest}-{secrets.token_hex(4)}"
        self.path = os.path.join(store.root, name)
        cloexec = getattr(os, "O_CLOEXEC", 0)
        self._wfd: int | None = os.open(
            self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | cloexec, 0o644
        )
        # Readers ``dup`` this one while the fetch runs; the bytes they read
        # are the file's, whatever its name becomes.
        self.read_fd: int | None = os.open(self.path, os.O_RDONLY | cloexec)
        self._published = False

    def write(self, data: bytes) -> None:
        assert self._wfd is not None
        view = memoryview(data)
        while view:
            view = view[os.write(self._wfd, view) :]

    def publish(self) -> str:
        """Rename to the digest's name (atomic, same folder); the final path."""
        self._close_write()
        final = self._store.path_for(self.digest)
        os.replace(self.path, final)
        self._published = True
        return final

    def discard(self) -> None:
        """Close the write end and delete the file, unless it was published."""
        self._close_write()
        if not self._published:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def close_read(self) -> None:
        if self.read_fd is not None:
            fd, self.read_fd = self.read_fd, None
            os.close(fd)

    def _close_write(self) -> None:
        if self._wfd is not None:
            fd, self._wfd = self._wfd, None
            os.close(fd)
