"""Memory-tier hits answered before the pipeline runs: the data port's quick path.

Owns: ``QuickHits``, the data port's quick handler (sidecar/http/server.py).
A request whose answer is in the memory tier is answered from the read
callback: no Exchange, no stage chain, no JSON parse, no canonical form, no
coroutine. Everything else, including every first request and every hit
from disk, takes the pipeline (proxy.py, stage.py), which stays the one
place that decides what is cacheable and under which action key.

How a request is recognised without the pipeline. The pipeline's action
key is a function of the request (method, target, body bytes, the caller's
credential, the header fields routes declare significant) and of settings
that stay fixed between reloads (the manifest, the scope secret) or change
visibly (the environment signature). So when the pipeline computes a key
for a request it either hits or stores, it tells this module, which
remembers ``fingerprint(request) -> action key``. The fingerprint is a
keyed BLAKE2b (a MAC; under a secret made for this process, so no plain
hash of a credential is kept) of those request parts framed with their
lengths, 32 bytes; equal fingerprints mean equal parts, so the
remembered key is exactly the key the pipeline would compute again. A
request with a ``Cache-Control`` field is never fingerprinted (it may ask
to refresh or bypass), nor one whose header fields are over the current
``limits.max_header_bytes``.

Invariants:
- What is remembered is valid for one environment signature and one
  manifest: a new signature, a reload (``reset``) or a purge forgets it all.
- A quick answer is a hit the pipeline would have served from memory: an
  unexpired entry (wall clock, as tiers.py), the same bytes as the
  pipeline's answer apart from ``Age`` and ``Date``, and the same
  accounting (the caller's ``on_hits``: metrics, read models, access
  lines). The accounting is tallied per request and handed over once per
  loop iteration (``fold``), in order: one call per route instead of a
  dozen per request, which was a fifth of a quick hit's cost. Until the
  iteration ends, metrics and read models lag by the hits of that
  iteration.
- Only for an HTTP/1.1 keep-alive request that has fully arrived (the
  server hands over its whole body), while the sidecar is not draining;
  anything else is passed on (returns None).
- At most ``max_entries`` fingerprints are kept, 32 bytes each plus the
  rendered head of their entry; the oldest not used since it was last
  looked at goes first. Nothing here holds a stored body alive: entries are
  referenced weakly, so the memory tier's ceilings stay the only ones.

Known limitations: a request whose body is still arriving when its turn
comes takes the pipeline (the quick handler does not wait). A fingerprint
whose entry has left the memory tier costs one memory-tier lookup before
the pipeline looks again, and that lookup counts twice in the admission
sketch. The access line of a quick hit has the same fields as the
pipeline's; its duration is the time spent here (fingerprint, lookup,
answer), a few microseconds, not from the arrival of the request's first
byte (neither path measures that); the lines of one loop iteration's quick
hits are written when it ends, so they may follow lines of requests that
finished after them.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import weakref
from collections.abc import Callable, Iterable
from hashlib import blake2b
from typing import Any, Final, Protocol

from multidict import CIMultiDict

from sidecar.cache.store import Entry
from sidecar.cache.tinylfu import WTinyLFU
from sidecar.http import HttpVersion11, Request, http_date
from sidecar.http.response import encode_head

# Stands in for the Age value while an entry's head is rendered once. No
# stored field holds it (the upstream parser refuses NUL in field values);
# a head that holds it anyway does not split in two and is left to the
# pipeline.
_AGE_MARK: Final = "\x00sidecar-age\x00"
_AGE_MARK_BYTES: Final = _AGE_MARK.encode()
# Roles of the request header fields the fingerprint looks at.
_REFUSE: Final = 1
_CREDENTIAL: Final = 2
_SIGNIFICANT: Final = 4
# How many used fingerprints an eviction may pass over before it takes one.
_SECOND_CHANCES: Final = 8

# The hits of one loop iteration with one method, route and status: the
# seconds each took and its body bytes, then the upstream seconds saved.
OnHits = Callable[[str, str, int, list[float], list[int], float], None]


class _Wire:
    """An entry's answer as bytes, but for the Age value (and Date if absent)."""

    __slots__ = ("dated", "entry", "prefix", "rest")

    def __init__(self, entry: Entry, prefix: bytes, rest: bytes, dated: bool) -> None:
        self.entry = weakref.ref(entry)
        self.prefix = prefix
        # After the Age value: the remaining fields, framing, and the blank
        # line when the entry has its own Date; without it, up to where the
        # Date field goes.
        self.rest = rest
        self.dated = dated


class Signed(Protocol):
    """Where the current environment signature is read (environment.py)."""

    @property
    def signature(self) -> bytes | None: ...


class _Tally:
    """Hits of one group since the last fold."""

    __slots__ = ("durations", "saved_s", "sizes")

    def __init__(self) -> None:
        self.durations: list[float] = []
        self.sizes: list[int] = []
        self.saved_s = 0.0


class _Memo:
    """One remembered request: its action key and route, and the rendered head."""

    __slots__ = ("key", "route", "target", "used", "wire")

    def __init__(self, key: bytes, route: str, target: str) -> None:
        self.key = key
        self.route = route
        self.target = target
        self.used = False
        self.wire: _Wire | None = None


class QuickHits:
    """Remembers the pipeline's keys and answers memory hits from them."""

    def __init__(
        self,
        memory: WTinyLFU[Entry],
        *,
        environment: Signed,
        credential_headers: Iterable[str],
        on_hits: OnHits,
        max_entries: int,
        max_header_bytes: int,
        clock: Callable[[], float] = time.time,
        fold_by_itself: bool = True,
    ) -> None:
        self._memory = memory
        self._environment = environment
        self._credentials = tuple(h.lower().encode() for h in credential_headers)
        self._on_hits = on_hits
        # False when the server calls ``fold`` after writing the answers
        # (``HTTPServer(after_quick=...)``); True to schedule it here.
        self._fold_by_itself = fold_by_itself
        # Hits answered since the last fold, by (method, route, status).
        self._tally: dict[tuple[str, str, int], _Tally] = {}
        self.max_entries = max(1, max_entries)
        self.max_header_bytes = max_header_bytes
        self._clock = clock
        self._secret = secrets.token_bytes(32)
        # False while draining: the pipeline then frames every answer.
        self.enabled = True
        # Requests answered here since start (``/admin/cache/stats``).
        self.answered = 0
        # The signature the remembered keys were computed under.
        self._signature: bytes | None = None
        self._memo: dict[bytes, _Memo] = {}
        # target -> remembered fingerprints with it: a request to any other
        # target is passed on before it is fingerprinted.
        self._targets: dict[str, int] = {}
        # Request header fields the fingerprint reads, by lower-case name,
        # and the lengths of those names (a cheap test that skips the rest).
        self._watched: dict[bytes, int] = {}
        self._sizes: frozenset[int] = frozenset()
        self.reset(())
        self._date = ""
        self._date_line = b""

    def __len__(self) -> int:
        return len(self._memo)

    # -- what the pipeline calls ---------------------------------------------

    def reset(self, significant_headers: Iterable[str]) -> None:
        """Forget everything; take the significant fields of a new manifest."""
        watched = {b"cache-control": _REFUSE}
        for name in self._credentials:
            watched[name] = watched.get(name, 0) | _CREDENTIAL
        for text in significant_headers:
            name = text.lower().encode()
            watched[name] = watched.get(name, 0) | _SIGNIFICANT
        self._watched = watched
        self._sizes = frozenset(len(n) for n in watched)
        self.clear()

    def clear(self) -> None:
        """Forget every remembered request (a purge, a new signature)."""
        self._memo = {}
        self._targets = {}

    def remember(
        self, request: Request, body: bytes, route: str, key: bytes, signature: bytes
    ) -> None:
        """The pipeline computed ``key`` for this request and hit or stored it."""
        if signature != self._signature:
            self.clear()
            self._signature = signature
        fp = self.fingerprint(request, body)
        if fp is None:
            return
        memo = self._memo.get(fp)
        if memo is not None:
            if memo.key == key and memo.route == route:
                return
            self._forget(fp, memo)
        if len(self._memo) >= self.max_entries:
            self._evict()
        target = request.raw_path
        self._memo[fp] = _Memo(key, route, target)
        self._targets[target] = self._targets.get(target, 0) + 1

    def fingerprint(self, request: Request, body: bytes) -> bytes | None:
        """What the action key depends on in this request, or None to pass it on.

        The credential is the first credential field with a value, as
        scope.Scopes takes it; significant fields go in as sent, in order.
        """
        if request.field_bytes > self.max_header_bytes:
            return None
        watched = self._watched
        sizes = self._sizes
        found: dict[bytes, bytes] | None = None
        significant: list[bytes] | None = None
        for name, value in request.raw_headers:
            if len(name) not in sizes:
                continue
            lower = name.lower()
            role = watched.get(lower)
            if role is None:
                continue
            if role & _REFUSE:
                return None
            if role & _CREDENTIAL:
                if found is None:
                    found = {}
                found.setdefault(lower, value)
            if role & _SIGNIFICANT:
                if significant is None:
                    significant = []
                significant.append(b"%d,%d:%s%s" % (len(lower), len(value), lower, value))
        credential = b""
        if found is not None:
            for name in self._credentials:
                given = found.get(name)
                if given:
                    credential = given
                    break
        fields = b"".join(significant) if significant is not None else b""
        method = request.method.encode()
        target = request.raw_path.encode("latin-1")
        parts = b"%d,%d,%d,%d:%s%s%s%s" % (
            len(method), len(target), len(credential), len(fields),
            method, target, credential, fields,
        )
        mac = blake2b(parts, key=self._secret, digest_size=32)
        mac.update(body)
        return mac.digest()

    # -- the quick handler -----------------------------------------------------

    def answer(self, request: Request, body: bytes) -> bytes | None:
        """The whole answer if it is a memory hit, else None (the pipeline's).

        ``body`` is the request's whole body, as the server hands it over.
        """
        version = request.version
        if (
            not self.enabled
            or not request.keep_alive
            or (version is not HttpVersion11 and version != HttpVersion11)
            or request.raw_path not in self._targets
        ):
            return None
        signature = self._environment.signature
        if signature is None or signature != self._signature:
            return None
        started = time.perf_counter()
        fp = self.fingerprint(request, body)
        if fp is None:
            return None
        memo = self._memo.get(fp)
        if memo is None:
            return None
        entry = self._memory.get(memo.key)
        now = self._clock()
        if entry is None or entry.created + entry.ttl_s < now:
            # Gone from memory, or due to go: the pipeline looks in every
            # tier, and remembers the request again if it finds it.
            self._forget(fp, memo)
            return None
        wire = memo.wire
        if wire is None or wire.entry() is not entry:
            wire = memo.wire = _render(entry)
            if wire is None:
                return None
        memo.used = True
        self.answered += 1
        age_s = int(now - entry.created)
        age = b"%d" % age_s if age_s > 0 else b"0"
        if wire.dated:
            data = b"".join((wire.prefix, age, wire.rest, entry.body))
        else:
            data = b"".join((wire.prefix, age, wire.rest, self._date_field(), entry.body))
        spent = time.perf_counter() - started
        group = (request.method, memo.route, entry.status)
        tally = self._tally.get(group)
        if tally is None:
            if not self._tally and self._fold_by_itself:
                self._schedule_fold()
            tally = self._tally[group] = _Tally()
        tally.durations.append(spent)
        tally.sizes.append(entry.size)
        saved = entry.upstream_duration_s - spent
        if saved > 0.0:
            tally.saved_s += saved
        return data

    def fold(self) -> None:
        """Hand the hits answered since the last fold to ``on_hits``."""
        tally, self._tally = self._tally, {}
        for (method, route, status), t in tally.items():
            self._on_hits(method, route, status, t.durations, t.sizes, t.saved_s)

    # -- helpers -------------------------------------------------------------

    def _schedule_fold(self) -> None:
        """Fold after the answers of this loop iteration have been written.

        The server writes quick answers from a callback it schedules once
        the first is ready, after this one; scheduling the fold from a
        callback puts it behind that write, so no client waits for the
        accounting of its own answer.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a direct call): ``fold`` is called by hand
        loop.call_soon(loop.call_soon, self.fold)

    def _date_field(self) -> bytes:
        """``Date: ...`` and the blank line ending a head, formatted once a second."""
        date = http_date()
        if date is not self._date:
            self._date = date
            self._date_line = b"Date: " + date.encode("ascii") + b"\r\n\r\n"
        return self._date_line

    def _forget(self, fp: bytes, memo: _Memo) -> None:
        del self._memo[fp]
        left = self._targets[memo.target] - 1
        if left:
            self._targets[memo.target] = left
        else:
            del self._targets[memo.target]

    def _evict(self) -> None:
        """Drop the oldest fingerprint, passing over a few used since last time."""
        memo_map = self._memo
        for _ in range(_SECOND_CHANCES):
            fp = next(iter(memo_map))
            memo = memo_map[fp]
            if not memo.used:
                break
            memo.used = False
            del memo_map[fp]
            memo_map[fp] = memo
        else:
            fp = next(iter(memo_map))
            memo = memo_map[fp]
        self._forget(fp, memo)

    def stats(self) -> dict[str, Any]:
        """What ``/admin/cache/stats`` shows under ``quick``."""
        return {
            "enabled": self.enabled,
            "answered": self.answered,
            "fingerprints": len(self._memo),
            "max_fingerprints": self.max_entries,
        }


def _render(entry: Entry) -> _Wire | None:
    """The answer's head as the relay (proxy.py) writes it for a hit, split at Age.

    The same steps as ``proxy.Proxy._relay`` and ``http.StreamResponse`` for
    a ``CachedReply``: the stored fields, then ``X-Sidecar-Cache`` and ``Age``
    set over them, framing fields dropped, ``Content-Length`` of the body,
    and ``Date`` when the stored fields have none. None for what the relay
    would frame otherwise (no 2xx, a ``Connection`` field), which the
    pipeline then answers.
    """
    if not 200 <= entry.status < 300 or entry.status == 204:
        return None
    headers: CIMultiDict[str] = CIMultiDict(entry.headers)
    headers.update({"X-Sidecar-Cache": "hit", "Age": _AGE_MARK})
    if "Connection" in headers:
        return None
    headers.popall("Transfer-Encoding", None)
    headers.popall("Content-Length", None)
    dated = "Date" in headers
    try:
        head = encode_head(entry.status, "", headers, f"Content-Length: {entry.size}\r\n")
    except ValueError:
        return None
    parts = head.split(_AGE_MARK_BYTES)
    if len(parts) != 2:
        return None
    prefix, rest = parts
    if not dated:
        rest = rest[:-2]  # the blank line comes after the Date field
    return _Wire(entry, prefix, rest, dated)
