"""Indexing the artifact folders: walk, notice new and changed files, hash them.

Owns ``scan_roots`` (one pass over the folders: blocking, shared by the
background ``Scanner`` and ``sidecar artifacts index``) and ``Scanner``, the
start-up and periodic scan in the running sidecar. Not here: how a hash
result changes the index and when it is a quarantine (verify.py), serving.

A pass: list every regular file under the roots (``Roots.walk``: symlinks
resolved, anything outside the roots skipped; in the store only files named
by a digest), drop index rows for files that disappeared, and hash every
file with no row or whose fingerprint no longer matches its row. Unchanged
files are not read, so a restart re-hashes only what changed.

Invariants: one pass at a time (``Scanner._lock``), in its own thread, so
serving never waits for it: a request for a file not indexed yet is a 404
until the pass reaches it, and files already indexed are served from the
first moment. ``Scanner._task`` is the strong reference to the background
loop. Progress goes to the read model continuously and to the log every
``_LOG_EVERY_S`` seconds.

Known limitations: changes are noticed by polling (``rescan_interval_s``,
60 s by default), not inotify: a new file waits up to that long to be
served. Each pass stats every file; for a million files that is seconds of
I/O per interval.
"""

from __future__ import annotations

import asyncio
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Final

from sidecar import log
from sidecar.artifacts.digest import Fingerprint, hash_fd
from sidecar.artifacts.paths import Roots
from sidecar.artifacts.verify import HashCancelledError, Verifier

DEFAULT_RESCAN_INTERVAL_S: Final = 60.0
_LOG_EVERY_S: Final = 5.0


@dataclass
class ScanReport:
    """What one pass found and did."""

    files: int = 0
    bytes: int = 0
    hashed_files: int = 0
    hashed_bytes: int = 0
    removed: int = 0
    failed: int = 0
    duration_s: float = 0.0
    pending: list[tuple[str, Fingerprint]] = field(default_factory=list, repr=False)


class ScanProgress:
    """Hooks a pass calls; the command line draws a bar from them."""

    def started(self, files_total: int, bytes_total: int) -> None:
        """Hashing begins: this many files and bytes to read."""

    def advanced(self, nbytes: int) -> None:
        """``nbytes`` more were read."""

    def file_done(self, path: str) -> None:
        """One file is hashed (or failed)."""


def scan_roots(
    verifier: Verifier,
    roots: Roots,
    walk: Sequence[str],
    progress: ScanProgress,
    stop: threading.Event | None = None,
) -> ScanReport:
    """One pass over the folders ``walk`` (each inside ``roots``); blocking."""
    started = time.monotonic()
    verifier.index.load(roots.contains)
    report = _inventory(verifier, roots, walk)
    progress.started(len(report.pending), sum(fp.size for _, fp in report.pending))
    for path, _ in report.pending:
        if stop is not None and stop.is_set():
            break
        _hash_one(verifier, roots, path, progress, stop, report)
        progress.file_done(path)
    report.pending = []
    report.files, report.bytes = verifier.index.totals()
    report.duration_s = round(time.monotonic() - started, 3)
    return report


def _inventory(verifier: Verifier, roots: Roots, walk: Sequence[str]) -> ScanReport:
    """Drop rows of vanished files; list files to hash (new or changed)."""
    report = ScanReport()
    seen: set[str] = set()
    for root in walk:
        for path in roots.walk(root):
            fp = _stat(path)
            if fp is None or (
                roots.in_store(path) and not verifier.store.digest_of(path)
            ):
                continue
            seen.add(path)
            record = verifier.index.get(path)
            if record is None or record.fingerprint != fp:
                report.pending.append((path, fp))
    for path in verifier.index.paths():
        if path not in seen and roots.root_of(path) in walk:
            verifier.forget(path)
            report.removed += 1
    return report


def _stat(path: str) -> Fingerprint | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return Fingerprint.of(st) if stat.S_ISREG(st.st_mode) else None


def _hash_one(
    verifier: Verifier,
    roots: Roots,
    path: str,
    progress: ScanProgress,
    stop: threading.Event | None,
    report: ScanReport,
) -> None:
    def advanced(nbytes: int) -> None:
        if stop is not None and stop.is_set():
            raise HashCancelledError
        verifier.model.hashed(nbytes)
        progress.advanced(nbytes)

    try:
        fd = roots.open(path)
    except OSError as exc:
        log.artifacts.warning(
            "artifacts.open_failed", extra={"path": path, "error": str(exc)}
        )
        report.failed += 1
        return
    try:
        result = hash_fd(fd, advanced)
        verifier.apply(path, result, verifier.index.get(path))
        report.hashed_files += 1
        report.hashed_bytes += result.nbytes
    except OSError as exc:
        log.artifacts.warning(
            "artifacts.hash_failed", extra={"path": path, "error": str(exc)}
        )
        report.failed += 1
    finally:
        os.close(fd)


class _LoggedProgress(ScanProgress):
    """Progress into the read model and, every few seconds, the log."""

    def __init__(
        self, verifier: Verifier, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._model = verifier.model
        self._clock = clock
        self._next_log = 0.0
        self._done = [0, 0, 0, 0]  # files done, files total, bytes done, bytes total

    def started(self, files_total: int, bytes_total: int) -> None:
        self._done = [0, files_total, 0, bytes_total]
        self._next_log = self._clock() + _LOG_EVERY_S
        self._model.hashing_started(files_total, bytes_total)
        if files_total:
            log.artifacts.info(
                "artifacts.index_started",
                extra={"files": files_total, "bytes": bytes_total},
            )

    def advanced(self, nbytes: int) -> None:
        self._done[2] += nbytes
        if self._clock() >= self._next_log:
            self._next_log = self._clock() + _LOG_EVERY_S
            files_done, files_total, bytes_done, bytes_total = self._done
            log.artifacts.info(
                "artifacts.index_progress",
                extra={
                    "files_done": files_done,
                    "files_total": files_total,
                    "bytes_done": bytes_done,
                    "bytes_total": bytes_total,
                },
            )

    def file_done(self, path: str) -> None:
        self._done[0] += 1
        self._model.hashed(0, file_done=True)


class Scanner:
    """The start-up scan and the periodic rescans of a running sidecar."""

    def __init__(
        self,
        verifier: Verifier,
        roots: Roots,
        *,
        rescan_interval_s: float = DEFAULT_RESCAN_INTERVAL_S,
    ) -> None:
        self.verifier = verifier
        self.roots = roots
        self.rescan_interval_s = rescan_interval_s
        self._executor = ThreadPoolExecutor(1, "sidecar-artifacts-scan")
        self._lock = asyncio.Lock()
        self._stop = threading.Event()
        self._task: asyncio.Task[None] | None = None
        self.passes = 0
        # Set when a pass ends, then replaced: await ``pass_finished.wait()``
        # to see the next pass end (event loop only).
        self.pass_finished = asyncio.Event()

    def start(self) -> None:
        """Begin scanning in the background; returns at once."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def scan_now(self) -> ScanReport:
        """Run one pass (after any pass already running) and return its report."""
        async with self._lock:
            loop = asyncio.get_running_loop()
            progress = _LoggedProgress(self.verifier)
            report = await loop.run_in_executor(
                self._executor,
                scan_roots,
                self.verifier,
                self.roots,
                self.roots.all(),
                progress,
                self._stop,
            )
            self.verifier.model.hashing_finished()
            self.verifier.model.set_index(report.files, report.bytes)
            self.passes += 1
            finished, self.pass_finished = self.pass_finished, asyncio.Event()
            finished.set()
        if report.hashed_files or report.removed or report.failed:
            log.artifacts.info(
                "artifacts.index_finished",
                extra={
                    "files": report.files,
                    "bytes": report.bytes,
                    "hashed_files": report.hashed_files,
                    "hashed_bytes": report.hashed_bytes,
                    "removed": report.removed,
                    "failed": report.failed,
                    "duration_s": report.duration_s,
                },
            )
        return report

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await self.scan_now()
            except (OSError, HashCancelledError) as exc:
                log.artifacts.warning(
                    "artifacts.scan_failed", extra={"error": str(exc)}
                )
            await asyncio.sleep(self.rescan_interval_s)

    async def close(self) -> None:
        """Stop the background loop and wait for a running pass to stop.

        The pass stops at its next chunk; waiting for it matters because it
        writes to the index, which the caller closes next.
        """
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)
