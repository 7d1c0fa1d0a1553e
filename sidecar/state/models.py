"""Read models the proxy updates on every request: cache, coalescing, artifacts.

A read model is a JSON document the sidecar keeps current. It is pull-based:
producers mutate counters and bump ``version``; the hub (hub.py) calls
``snapshot()`` at most once per coalescing window, and only when the version
moved. ``ReadModel`` is the whole contract the hub relies on.
Not here: route latencies (traffic.py), the manifest in force (policy.py), the
upstream's own state (poller.py), publishing (hub.py).

Invariants: producer calls are cheap and never await (a few dict increments
and a version bump); every mutation bumps ``version``; ``snapshot()`` returns
a fresh, JSON-ready structure that shares nothing mutable with the model, so
the hub may keep it as the published base. Ratios and float sums are rounded
in snapshots, so float noise does not turn into patches. Event-loop thread
only: a worker thread (file hashing, plyvel) must hand its update back with
``loop.call_soon_threadsafe``.

Known limitations: counters are per process and start at zero on restart
(Prometheus keeps the long-term view); the set of routes and tiers is
whatever producers name, so it is bounded only because route names come from
the manifest.
"""

from __future__ import annotations

import time
from typing import Any, Final, Literal, Protocol

# X-Sidecar-Cache outcome -> counter it increments.
_OUTCOME_FIELDS: Final = {
    "hit": "hits",
    "miss": "misses",
    "bypass": "bypasses",
    "stale": "stale",
    "semantic-hit": "semantic_hits",
    "negative-hit": "negative_hits",
    "coalesced": "coalesced",
}
# Outcomes answered from a cache without an upstream call of their own.
_ANSWERED_FIELDS: Final = ("hits", "stale", "semantic_hits", "negative_hits")
_COUNTERS: Final = ("lookups", *_OUTCOME_FIELDS.values())
_RATIO_DIGITS: Final = 4
_SECONDS_DIGITS: Final = 6

Role = Literal["leader", "follower"]


class ReadModel(Protocol):
    """What the hub publishes: a version that moves on change, and a snapshot."""

    @property
    def version(self) -> int: ...

    def snapshot(self) -> dict[str, Any]: ...


def hit_ratio(counters: dict[str, Any]) -> float | None:
    """Answered-from-cache over lookups, or None before the first lookup."""
    lookups = int(counters["lookups"])
    if not lookups:
        return None
    answered = sum(int(counters[name]) for name in _ANSWERED_FIELDS)
    return round(answered / lookups, _RATIO_DIGITS)


def _new_counters() -> dict[str, Any]:
    counters: dict[str, Any] = dict.fromkeys(_COUNTERS, 0)
    counters["latency_saved_s"] = 0.0
    counters["bytes_saved"] = 0
    return counters


def _export(counters: dict[str, Any]) -> dict[str, Any]:
    doc = dict(counters)
    doc["latency_saved_s"] = round(doc["latency_saved_s"], _SECONDS_DIGITS)
    doc["hit_ratio"] = hit_ratio(counters)
    return doc


class CacheModel:
    """Cache outcomes per route and per tier, with tier sizes and savings.

    ``record`` is called once per request with its final outcome (the
    ``X-Sidecar-Cache`` value) and, for an answer from a tier, that tier.
    ``record_tier`` counts a tier lookup that was not the last one (the memory
    miss before a disk hit). A bypass is not a lookup.
    """

    def __init__(self) -> None:
        self.version = 0
        self._routes: dict[str, dict[str, Any]] = {}
        self._tiers: dict[str, dict[str, Any]] = {}

    def record(
        self,
        tier: str | None,
        route: str,
        outcome: str,
        latency_saved_s: float = 0.0,
        bytes_saved: int = 0,
        count: int = 1,
    ) -> None:
        """Count requests' final cache outcome (``hit``, ``miss``, ...).

        ``count`` requests of one route, tier and outcome at once, with
        their savings summed.
        """
        field = _OUTCOME_FIELDS[outcome]  # KeyError: a producer bug, fail loudly
        counters = self._routes.get(route)
        if counters is None:
            counters = self._routes[route] = _new_counters()
        self._count(counters, field, latency_saved_s, bytes_saved, count)
        if tier is not None:
            self._count(self._tier(tier), field, latency_saved_s, bytes_saved, count)
        self.version += 1

    def record_tier(self, tier: str, outcome: str) -> None:
        """Count a lookup in one tier that did not decide the request."""
        self._count(self._tier(tier), _OUTCOME_FIELDS[outcome], 0.0, 0)
        self.version += 1

    def set_tier(
        self,
        tier: str,
        *,
        entries: int | None = None,
        bytes: int | None = None,
        evictions: int | None = None,
    ) -> None:
        """Set a tier's gauges (entries, stored bytes, evictions so far)."""
        counters = self._tier(tier)
        for name, value in (
            ("entries", entries),
            ("bytes", bytes),
            ("evictions", evictions),
        ):
            if value is not None:
                counters[name] = value
        self.version += 1

    def snapshot(self) -> dict[str, Any]:
        routes = {name: _export(c) for name, c in self._routes.items()}
        total = _new_counters()
        for counters in self._routes.values():
            for name in total:
                total[name] += counters[name]
        return {
            "routes": routes,
            "tiers": {name: _export(c) for name, c in self._tiers.items()},
            "total": _export(total),
        }

    def _tier(self, tier: str) -> dict[str, Any]:
        counters = self._tiers.get(tier)
        if counters is None:
            counters = _new_counters()
            counters.update(entries=0, bytes=0, evictions=0)
            self._tiers[tier] = counters
        return counters

    @staticmethod
    def _count(
        counters: dict[str, Any],
        field: str,
        latency_saved_s: float,
        bytes_saved: int,
        count: int = 1,
    ) -> None:
        counters[field] += count
        if field != "bypasses":
            counters["lookups"] += count
        counters["latency_saved_s"] += latency_saved_s
        counters["bytes_saved"] += bytes_saved

    def __repr__(self) -> str:
        return f"<CacheModel v{self.version} routes={len(self._routes)} tiers={len(self._tiers)}>"


class CoalescingModel:
    """Singleflight roles per route, and how many followers wait right now.

    ``followers`` is the number of duplicate upstream calls suppressed.
    """

    def __init__(self) -> None:
        self.version = 0
        self._routes: dict[str, dict[str, int]] = {}
        self._waiters = 0

    def record(self, route: str, role: Role) -> None:
        """Count one request that led (called upstream) or followed (attached)."""
        counters = self._routes.get(route)
        if counters is None:
            counters = self._routes[route] = {"leaders": 0, "followers": 0}
        counters["leaders" if role == "leader" else "followers"] += 1
        self.version += 1

    def set_waiters(self, n: int) -> None:
        """Followers currently attached to an in-flight leader."""
        if n != self._waiters:
            self._waiters = n
            self.version += 1

    def snapshot(self) -> dict[str, Any]:
        leaders = sum(c["leaders"] for c in self._routes.values())
        followers = sum(c["followers"] for c in self._routes.values())
        return {
            "routes": {name: dict(c) for name, c in self._routes.items()},
            "total": {"leaders": leaders, "followers": followers},
            "waiters": self._waiters,
        }

    def __repr__(self) -> str:
        return f"<CoalescingModel v{self.version} waiters={self._waiters}>"


class ArtifactsModel:
    """The digest-addressed artifact index and what was served from it."""

    def __init__(self) -> None:
        self.version = 0
        self._files = 0
        self._bytes = 0
        self._indexed_at: float | None = None
        self._served = {"ok": 0, "not_modified": 0, "not_found": 0, "bytes_sent": 0}

    def set_index(self, files: int, total_bytes: int) -> None:
        """The index was (re)built: how many files and bytes it holds."""
        self._files = files
        self._bytes = total_bytes
        self._indexed_at = round(time.time(), 3)
        self.version += 1

    def record_served(self, status: int, nbytes: int) -> None:
        """Count one ``/admin/models/by-hash/...`` answer by its status."""
        if status == 304:
            self._served["not_modified"] += 1
        elif status == 404:
            self._served["not_found"] += 1
        elif 200 <= status < 300:
            self._served["ok"] += 1
        self._served["bytes_sent"] += nbytes
        self.version += 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "files": self._files,
            "bytes": self._bytes,
            "indexed_at": self._indexed_at,
            "served": dict(self._served),
        }

    def __repr__(self) -> str:
        return f"<ArtifactsModel v{self.version} files={self._files}>"
