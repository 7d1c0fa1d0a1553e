"""When an indexed file must be re-hashed, and what a fresh hash changes.

Owns the serving guarantee's bookkeeping: which records were fully hashed
in this process and when, the per-path table of hashes in flight (so many
requests for one unverified file cost one read), and ``apply``, the one
function that turns a finished hash into index rows, quarantine and log
lines (the scan uses it too). Not here: reading the file (digest.py),
walking folders (scan.py), HTTP (serve.py).

The rule (``needs_hash``): a record is re-hashed before it is used when the
open file's fingerprint differs from the record's, whatever the response;
and before a response that carries body bytes (200 or 206) when it was not
fully hashed by this process yet (``verify_on_first_serve``) or its last
full hash is ``reverify_after_s`` old. A hash that disagrees with the
record withdraws the record (quarantine: logged, counted, and for a store
blob the file is moved to ``quarantine/``), and the file is re-indexed
under the digest its bytes have now; a hash during which the file changed
proves nothing and is discarded.

Invariants: ``_fresh`` and ``_inflight`` are touched on the event loop
only, except ``_fresh`` writes from ``apply``, which runs in hashing threads
and takes ``_lock``. Each in-flight hash is a task held in ``_inflight``
(a strong reference) with its own duplicated descriptor, so a client that
goes away cancels only its wait, never the read another client relies on.

Known limitations: a re-hash reads the whole file before the first byte of
the answer; for a 10 GiB file that is several seconds after each start-up.
A byte that changes while it is being sent cannot be recalled; the next
request sees the new fingerprint.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Final

from sidecar import log
from sidecar.artifacts.digest import Digest, Fingerprint, HashResult, hash_fd
from sidecar.artifacts.index import DigestIndex, IndexWriteError, Record
from sidecar.artifacts.model import ArtifactsModel
from sidecar.artifacts.store import Store

DEFAULT_REVERIFY_AFTER_S: Final = 7 * 24 * 3600.0
_HASH_THREADS: Final = 2


class HashCancelledError(Exception):
    """A hash was abandoned because the sidecar is closing."""


class Verifier:
    """Decides when to re-hash, runs those hashes and records their result."""

    def __init__(
        self,
        index: DigestIndex,
        store: Store,
        model: ArtifactsModel,
        *,
        verify_on_first_serve: bool = True,
        reverify_after_s: float = DEFAULT_REVERIFY_AFTER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.index = index
        self.store = store
        self.model = model
        self.verify_on_first_serve = verify_on_first_serve
        self.reverify_after_s = reverify_after_s
        self._clock = clock
        self._lock = threading.Lock()
        # path -> (fingerprint, clock time) of the last full hash that matched.
        self._fresh: dict[str, tuple[Fingerprint, float]] = {}
        # path -> task hashing it; event loop only, no await between get and set.
        self._inflight: dict[str, asyncio.Task[Record | None]] = {}
        self._executor = ThreadPoolExecutor(_HASH_THREADS, "sidecar-artifacts-hash")
        self._closing = False

    def needs_hash(self, record: Record, fp: Fingerprint, *, body: bool) -> bool:
        if fp != record.fingerprint:
            return True
        if not body:
            return False
        with self._lock:
            seen = self._fresh.get(record.path)
        if seen is not None and seen[0] == fp:
            age = self._clock() - seen[1]
        elif self.verify_on_first_serve:
            return True
        else:
            age = time.time() - record.hashed_at
        return age >= self.reverify_after_s

    async def check(
        self, record: Record, fd: int, fp: Fingerprint, *, body: bool
    ) -> Record | None:
        """The record the open file ``fd`` may be served under, or None."""
        if not self.needs_hash(record, fp, body=body):
            return record
        task = self._inflight.get(record.path)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._hash(record, os.dup(fd))
            )
            self._inflight[record.path] = task
            task.add_done_callback(lambda _: self._inflight.pop(record.path, None))
        await asyncio.shield(task)
        current = self.index.get(record.path)
        if current is None or current.digest != record.digest:
            return None
        return None if self.needs_hash(current, fp, body=body) else current

    async def _hash(self, record: Record, fd: int) -> Record | None:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._executor, self._hash_owned, record.path, fd, record
            )
        except (OSError, HashCancelledError):
            log.artifacts.warning(
                "artifacts.verify_failed",
                extra={"path": record.path, "digest": record.digest.short},
            )
            return None

    def _hash_owned(self, path: str, fd: int, expected: Record | None) -> Record | None:
        # The thread owns ``fd``: closing it from the loop while a read runs
        # could hand the number to another file mid-hash.
        try:
            return self.hash_and_apply(path, fd, expected)
        finally:
            os.close(fd)

    def hash_and_apply(
        self, path: str, fd: int, expected: Record | None
    ) -> Record | None:
        """Hash ``fd`` (the file at ``path``) and record the result; blocking."""
        result = hash_fd(fd, self._progress)
        return self.apply(path, result, expected)

    def _progress(self, nbytes: int) -> None:
        if self._closing:
            raise HashCancelledError
        self.model.hashed(nbytes)

    def apply(
        self, path: str, result: HashResult, expected: Record | None
    ) -> Record | None:
        """Record a finished hash of ``path``; the record now backing it, or None.

        ``expected`` is the record the file was indexed under, if any. Runs
        in hashing threads; blocking (index writes, store moves).
        """
        if not result.stable:
            log.artifacts.debug("artifacts.hash_unstable", extra={"path": path})
            return None
        named = self.store.digest_of(path)
        claimed = expected.digest if expected is not None else named
        if claimed is not None and claimed != result.digest:
            reason = "corrupt"
            if expected is not None and expected.fingerprint != result.after:
                reason = "modified"
            self._quarantine(path, claimed, result.digest, reason)
        if named is not None and named != result.digest:
            self.store.quarantine(path, named)
            self.index.remove(path)
            return None
        record = Record(path, result.digest, result.after, time.time())
        self.index.put(record)
        with self._lock:
            self._fresh[path] = (result.after, self._clock())
        return record

    def note_published(self, record: Record) -> None:
        """A blob the ingest just hashed and published is fresh."""
        self.index.put(record)
        with self._lock:
            self._fresh[record.path] = (record.fingerprint, self._clock())

    def forget(self, path: str) -> None:
        """``path`` is gone: drop its record and freshness (best effort)."""
        with self._lock:
            self._fresh.pop(path, None)
        try:
            self.index.remove(path)
        except IndexWriteError as exc:
            # The row stays; the next request or scan finds the file gone again.
            log.artifacts.warning(
                "artifacts.index_write_failed", extra={"path": path, "error": str(exc)}
            )

    def _quarantine(
        self, path: str, expected: Digest, actual: Digest, reason: str
    ) -> None:
        level = log.artifacts.warning if reason == "corrupt" else log.artifacts.info
        level(
            "artifacts.quarantined",
            extra={
                "path": path,
                "digest": expected.short,
                "actual": actual.short,
                "reason": reason,
            },
        )
        self.model.quarantined(path, expected, actual, reason)

    async def close(self) -> None:
        """Abandon running hashes: each stops at its next chunk."""
        self._closing = True
        await asyncio.gather(*self._inflight.values(), return_exceptions=True)
        self._executor.shutdown(wait=False)
