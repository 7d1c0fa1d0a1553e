"""The ``artifacts`` read model and the metric callbacks behind it.

Owns the live state of the artifact subsystem as a JSON document (files and
bytes indexed, hashing progress, quarantined entries, what was served and
fetched) and the one call per event that both updates it and feeds the
Prometheus counters. Not here: publishing (sidecar/state/hub.py reads
``version`` and ``snapshot()``), metric families (sidecar/metrics.py owns
them and passes ``ArtifactCounters`` callbacks in).

Metrics fed through ``ArtifactCounters`` (names for sidecar/metrics.py):

- ``sidecar_artifact_requests_total{outcome}``: by-hash and store answers,
  outcome in ``SERVE_OUTCOMES``.
- ``sidecar_artifact_bytes_served_total``: body bytes sent from artifact
  files (200 and 206).
- ``sidecar_artifact_quarantined_total{reason}``: index entries withdrawn
  because a re-hash gave another digest; reason ``modified`` (the file's
  fingerprint had changed: usually a replaced file) or ``corrupt`` (same
  fingerprint, other bytes: storage corruption).
- ``sidecar_artifact_hashed_bytes_total``: bytes read to hash files (index
  scans and verification before serving).
- ``sidecar_artifact_ingests_total{outcome}``: upstream blob fetches,
  outcome in ``INGEST_OUTCOMES``.

Invariants: every method is cheap and never awaits; state is guarded by one
lock because hashing threads report progress; each mutation bumps
``version``; ``snapshot()`` shares nothing mutable. Counter callbacks run on
the event loop: a call from another thread is handed over with
``call_soon_threadsafe`` once ``bind_loop`` was called.

Known limitations: the numbers are per process and start at zero on
restart, except ``files`` and ``bytes``, which come from the persisted index.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

SERVE_OUTCOMES: Final = (
    "full", "partial", "not_modified", "head", "range_not_satisfiable",
    "not_found", "malformed",
)  # fmt: skip
INGEST_OUTCOMES: Final = ("stored", "mismatch", "upstream_status", "failed")
QUARANTINE_REASONS: Final = ("modified", "corrupt")
_RECENT_QUARANTINED: Final = 20


def _ignore(*_: object) -> None:
    return None


@dataclass(frozen=True, slots=True)
class ArtifactCounters:
    """Prometheus callbacks; each defaults to doing nothing."""

    requests: Callable[[str], None] = _ignore  # outcome
    bytes_served: Callable[[int], None] = _ignore
    quarantined: Callable[[str], None] = _ignore  # reason
    hashed_bytes: Callable[[int], None] = _ignore
    ingests: Callable[[str], None] = _ignore  # outcome


class ArtifactsModel:
    """Live state of the artifact index, its hashing, serving and fetching."""

    def __init__(self, counters: ArtifactCounters | None = None) -> None:
        self.counters = counters or ArtifactCounters()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._version = 0
        self._files = 0
        self._bytes = 0
        self._hashing = {
            "running": False,
            "files_done": 0,
            "files_total": 0,
            "bytes_done": 0,
            "bytes_total": 0,
        }
        self._served: dict[str, int] = dict.fromkeys(SERVE_OUTCOMES, 0)
        self._served["bytes"] = 0
        self._ingest: dict[str, int] = dict.fromkeys(INGEST_OUTCOMES, 0)
        self._ingest["in_flight"] = 0
        self._ingest["followers"] = 0
        self._quarantined = 0
        self._recent: deque[dict[str, Any]] = deque(maxlen=_RECENT_QUARANTINED)

    @property
    def version(self) -> int:
        return self._version

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver counter callbacks from worker threads on ``loop``."""
        self._loop = loop

    def set_index(self, files: int, total_bytes: int) -> None:
        with self._lock:
            self._files, self._bytes = files, total_bytes
            self._version += 1

    def hashing_started(self, files_total: int, bytes_total: int) -> None:
        with self._lock:
            self._hashing = {
                "running": True,
                "files_done": 0,
                "files_total": files_total,
                "bytes_done": 0,
                "bytes_total": bytes_total,
            }
            self._version += 1

    def hashed(self, nbytes: int, *, file_done: bool = False) -> None:
        """Progress of a hash: ``nbytes`` more read (scan or verification)."""
        with self._lock:
            self._hashing["bytes_done"] += nbytes
            self._hashing["files_done"] += int(file_done)
            self._version += 1
        self._emit(self.counters.hashed_bytes, nbytes)

    def hashing_finished(self) -> None:
        with self._lock:
            self._hashing["running"] = False
            self._version += 1

    def served(self, outcome: str, nbytes: int = 0) -> None:
        with self._lock:
            self._served[outcome] += 1
            self._served["bytes"] += nbytes
            self._version += 1
        self._emit(self.counters.requests, outcome)
        if nbytes:
            self._emit(self.counters.bytes_served, nbytes)

    def quarantined(self, path: str, expected: str, actual: str, reason: str) -> None:
        entry = {
            "path": path,
            "digest": expected[:12],
            "actual": actual[:12],
            "reason": reason,
            "at": round(time.time(), 3),
        }
        with self._lock:
            self._quarantined += 1
            self._recent.append(entry)
            self._version += 1
        self._emit(self.counters.quarantined, reason)

    def ingest_started(self) -> None:
        with self._lock:
            self._ingest["in_flight"] += 1
            self._version += 1

    def ingest_joined(self) -> None:
        """A request joined a fetch already in flight (a follower)."""
        with self._lock:
            self._ingest["followers"] += 1
            self._version += 1

    def ingest_finished(self, outcome: str) -> None:
        with self._lock:
            self._ingest["in_flight"] -= 1
            self._ingest[outcome] += 1
            self._version += 1
        self._emit(self.counters.ingests, outcome)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "files": self._files,
                "bytes": self._bytes,
                "hashing": dict(self._hashing),
                "served": dict(self._served),
                "ingest": dict(self._ingest),
                "quarantined": {
                    "total": self._quarantined,
                    "recent": [dict(e) for e in self._recent],
                },
            }

    def _emit(self, callback: Callable[[Any], None], value: Any) -> None:
        loop = self._loop
        if loop is None or _running_loop() is loop:
            callback(value)
        elif not loop.is_closed():
            loop.call_soon_threadsafe(callback, value)

    def __repr__(self) -> str:
        return f"<ArtifactsModel v{self._version} files={self._files}>"


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
