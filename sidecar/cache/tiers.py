"""The action cache's tiers in order: memory (W-TinyLFU) over disk (LevelDB).

Owns: the lookup order (memory, then disk, a disk hit refilling memory),
writes to both tiers, purge, per-tier metrics, and keeping the disk tier
available: reopening it after a full disk, or opening it late when it could
not be opened at start-up (``fallbacks.disk: memory_only``). Not here: what
is cacheable (keys.py), the HTTP side (stage.py), storage formats (store.py).

Invariants:
- An entry is served only if unexpired by its own wall-clock ``created`` and
  ``ttl_s``, whichever tier it comes from.
- The memory tier holds at most ``cache.memory.max_entries`` entries and
  ``max_bytes`` body bytes (each entry weighs its body size).
- Every disk call runs off the event loop (AsyncDiskStore); a disk failure
  is never an error for the request: it is a miss, or a skipped write.

``route -> keys`` is kept beside the memory tier so a purge of one route does
not scan everything; it is trimmed on eviction and removal.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from sidecar import log
from sidecar.cache.store import AsyncDiskStore, Entry, StoreError
from sidecar.cache.tinylfu import WTinyLFU
from sidecar.metrics import Metrics


class TieredCache:
    """Memory over disk, with the metrics of both."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        max_entries: int,
        max_bytes: int,
        disk: AsyncDiskStore | None,
        open_disk: Callable[[], Any] | None = None,
        reopen_interval_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.metrics = metrics
        self.memory: WTinyLFU[Entry] = WTinyLFU(max_entries, max_bytes)
        self.disk = disk
        self._open_disk = open_disk
        self.reopen_interval_s = reopen_interval_s
        self._clock = clock
        # route name -> action keys in the memory tier. Event-loop thread only.
        self._routes: dict[str, set[bytes]] = {}

    # -- lookups and writes -----------------------------------------------

    def _count(self, tier: str, outcome: str) -> None:
        self.metrics.hot.tier(tier, outcome)

    async def get(self, key: bytes) -> tuple[Entry, str] | None:
        """The entry for an action key and the tier it came from, or None."""
        now = self._clock()
        entry = self.memory.get(key)
        if entry is not None:
            if not entry.expired(now):
                self._count("memory", "hit")
                return entry, "memory"
            self._forget(key, entry)
            self._count("memory", "expired")
        else:
            self._count("memory", "miss")
        disk = self.disk
        if disk is None:
            return None
        try:
            entry = await disk.get(key)
        except StoreError:
            self._count("disk", "error")
            return None
        if entry is None or entry.expired(now):
            self._count("disk", "miss")
            return None
        self._count("disk", "hit")
        self._put_memory(key, entry, now)
        return entry, "disk"

    def _put_memory(self, key: bytes, entry: Entry, now: float) -> None:
        ttl = entry.created + entry.ttl_s - now
        if ttl <= 0:
            return
        evicted = self.memory.put(key, entry, weight=max(1, entry.size), ttl_s=ttl)
        self._routes.setdefault(entry.route, set()).add(key)
        for old_key, old in evicted:
            assert isinstance(old_key, bytes)
            self._drop_route_key(old.route, old_key)
        if evicted:
            self.metrics.cache_evictions.add({"tier": "memory"}, len(evicted))

    async def put(self, key: bytes, entry: Entry) -> bool:
        """Store in memory at once and on disk off the loop; True if kept anywhere."""
        self._put_memory(key, entry, self._clock())
        kept = key in self.memory
        disk = self.disk
        if disk is not None:
            try:
                kept = await disk.put(key, entry) or kept
            except StoreError as exc:
                log.cache.warning("cache.disk_write_failed", extra={"error": str(exc)})
        return kept

    def _drop_route_key(self, route: str, key: bytes) -> None:
        keys = self._routes.get(route)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._routes[route]

    def _forget(self, key: bytes, entry: Entry) -> None:
        self.memory.pop(key)
        self._drop_route_key(entry.route, key)

    async def delete(self, key: bytes) -> int:
        entry = self.memory.pop(key)
        removed = 0
        if entry is not None:
            self._drop_route_key(entry.route, key)
            removed = 1
        if self.disk is not None and await self.disk.delete(key):
            removed = 1
        return removed

    async def purge(self, route: str | None = None) -> int:
        """Remove every entry, or those of one route; returns how many."""
        if route is None:
            removed = len(self.memory)
            self.memory.clear()
            self._routes.clear()
        else:
            keys = self._routes.pop(route, set())
            for key in keys:
                self.memory.pop(key)
            removed = len(keys)
        if self.disk is not None:
            removed = max(removed, await self.disk.purge(route=route))
        return removed

    # -- upkeep -----------------------------------------------------------

    async def upkeep_forever(self) -> None:
        """Reopen a degraded disk tier, open a missing one, sweep expiries."""
        while True:
            await asyncio.sleep(self.reopen_interval_s)
            await self.upkeep()

    async def upkeep(self) -> None:
        try:
            if self.disk is None and self._open_disk is not None:
                self.disk = await self._open_disk()
                if self.disk is not None:
                    log.cache.info("cache.disk_opened_late")
            elif self.disk is not None:
                if self.disk.degraded:
                    await self.disk.reopen()
                await self.disk.sweep_expired()
        except StoreError as exc:
            log.cache.warning("cache.disk_upkeep_failed", extra={"error": str(exc)})

    async def stats(self) -> dict[str, Any]:
        memory = self.memory.stats()
        out: dict[str, Any] = {"memory": memory, "disk": None}
        if self.disk is not None:
            try:
                out["disk"] = {**await self.disk.stats(), "degraded": self.disk.degraded}
            except StoreError:
                out["disk"] = {"error": True}
        return out

    async def refresh_gauges(self) -> dict[str, Any]:
        """Update the per-tier gauges (called when /metrics is scraped)."""
        stats = await self.stats()
        m = self.metrics
        m.cache_entries.set({"tier": "memory"}, len(self.memory))
        m.cache_size.set({"tier": "memory"}, self.memory.weight)
        disk = stats["disk"]
        if disk and "entries" in disk:
            m.cache_entries.set({"tier": "disk"}, disk["entries"])
            m.cache_size.set({"tier": "disk"}, disk["bytes"])
            m.cache_evictions.set({"tier": "disk"}, disk.get("evictions", 0))
        return stats

    async def close(self) -> None:
        if self.disk is not None:
            await self.disk.close()
