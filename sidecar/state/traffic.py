"""The ``routes`` read model: requests, errors and latency per route.

Owns per-route request counts, status classes, p50/p95 over recent requests,
an EWMA of latency, and prompt tokens reused and evaluated (llama.cpp's
``timings.cache_n`` and ``timings.prompt_n``).
Not here: cache outcomes (models.py), Prometheus histograms (metrics.py).

Invariants: ``observe`` is O(1) (an append to a bounded ring, an EWMA step,
two increments); quantiles are computed only in ``snapshot()``, which the hub
calls at most once per window, by sorting at most ``RECENT_SAMPLES`` numbers
per route. ``errors`` counts 5xx answers and failures with no status (0).

Known limitations: p50/p95 describe the last ``RECENT_SAMPLES`` requests of a
route, not all time and not a fixed time span, so a route with little traffic
shows old latencies until new requests push them out. Nearest-rank quantiles
over 1,024 samples are exact for those samples, with no interpolation.
"""

from __future__ import annotations

import collections
import math
from typing import Any, Final

RECENT_SAMPLES: Final = 1024
# Weight of the newest observation in the EWMA: about the last ten requests
# dominate, which tracks a latency shift within seconds under load.
EWMA_ALPHA: Final = 0.2
_MS_DIGITS: Final = 3


def quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile of a non-empty ascending list (0 < q <= 1)."""
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


class _RouteStats:
    __slots__ = (
        "codes",
        "errors",
        "ewma_s",
        "recent_s",
        "requests",
        "tokens_evaluated",
        "tokens_reused",
    )

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.codes: dict[str, int] = {}
        self.recent_s: collections.deque[float] = collections.deque(
            maxlen=RECENT_SAMPLES
        )
        self.ewma_s: float | None = None
        self.tokens_reused = 0
        self.tokens_evaluated = 0

    def export(self) -> dict[str, Any]:
        recent = sorted(self.recent_s)
        return {
            "requests": self.requests,
            "errors": self.errors,
            "codes": dict(self.codes),
            "p50_ms": _ms(quantile(recent, 0.50)) if recent else None,
            "p95_ms": _ms(quantile(recent, 0.95)) if recent else None,
            "ewma_ms": _ms(self.ewma_s) if self.ewma_s is not None else None,
            "prompt_tokens": {
                "reused": self.tokens_reused,
                "evaluated": self.tokens_evaluated,
            },
        }


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, _MS_DIGITS)


def _status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status <= 599 else "none"


class RoutesModel:
    """Per-route traffic: called by the proxy once per finished request."""

    def __init__(self) -> None:
        self.version = 0
        self._routes: dict[str, _RouteStats] = {}

    def observe(self, route: str, status: int, duration_s: float) -> None:
        """One request finished with ``status`` (0: no response) after ``duration_s``."""
        stats = self._stats(route)
        stats.requests += 1
        if status >= 500 or status == 0:
            stats.errors += 1
        code = _status_class(status)
        stats.codes[code] = stats.codes.get(code, 0) + 1
        stats.recent_s.append(duration_s)
        if stats.ewma_s is None:
            stats.ewma_s = duration_s
        else:
            stats.ewma_s += EWMA_ALPHA * (duration_s - stats.ewma_s)
        self.version += 1

    def observe_many(self, route: str, status: int, durations_s: list[float]) -> None:
        """``observe`` for several requests of one route and status, in order."""
        if not durations_s:
            return
        stats = self._stats(route)
        n = len(durations_s)
        stats.requests += n
        if status >= 500 or status == 0:
            stats.errors += n
        code = _status_class(status)
        stats.codes[code] = stats.codes.get(code, 0) + n
        stats.recent_s.extend(durations_s)
        ewma = stats.ewma_s
        for duration_s in durations_s:
            ewma = duration_s if ewma is None else ewma + EWMA_ALPHA * (duration_s - ewma)
        stats.ewma_s = ewma
        self.version += 1

    def add_prompt_tokens(self, route: str, reused: int, evaluated: int) -> None:
        """Prompt tokens the upstream reused from its cache and evaluated anew."""
        stats = self._stats(route)
        stats.tokens_reused += reused
        stats.tokens_evaluated += evaluated
        self.version += 1

    def snapshot(self) -> dict[str, Any]:
        routes = {name: stats.export() for name, stats in self._routes.items()}
        reused = sum(s.tokens_reused for s in self._routes.values())
        evaluated = sum(s.tokens_evaluated for s in self._routes.values())
        return {
            "routes": routes,
            "total": {
                "requests": sum(s.requests for s in self._routes.values()),
                "errors": sum(s.errors for s in self._routes.values()),
                "prompt_tokens": {"reused": reused, "evaluated": evaluated},
            },
        }

    def _stats(self, route: str) -> _RouteStats:
        stats = self._routes.get(route)
        if stats is None:
            stats = self._routes[route] = _RouteStats()
        return stats

    def __repr__(self) -> str:
        return f"<RoutesModel v{self.version} routes={len(self._routes)}>"
