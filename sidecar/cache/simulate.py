"""``sidecar simulate``: replay a key trace against eviction policies.

Reads a cache-access trace (each access is one key), replays it against each
requested policy at each requested size, and prints the hit ratios, as a
table or (``--json``) as one object a line:
``{"policy": ..., "size": N, "accesses": N, "hits": N, "hit_ratio": r}``.

Policies: ``wtinylfu`` (the memory tier's policy, ``cache/tinylfu.py``),
``lru``, ``opt`` (Belady's optimal: evict the resident key whose next use is
farthest away, computed offline from the whole trace; an upper bound for any
policy that does not see the future) and ``theine`` when ``theine_core`` is
importable (the engine of the ``theine`` package: W-TinyLFU with its own
window adaptation; its figures vary by a few hits between runs). A replay counts an access as a hit when the key is resident, and on
a miss inserts it with weight 1 and no TTL.

Trace formats: ``lirs`` (text, one integer a line, lines holding only ``*``
skipped), ``cache2k`` (binary big-endian signed 32-bit keys) and ``keys``
(text, one key a line, blank lines skipped). Files ending in ``.gz``, ``.xz``
or ``.bz2`` are decompressed on the fly.

Not here: wiring into the command line (``sidecar/cli.py`` calls ``main``).
Invariants: bad input (missing file, unknown format or policy, bad sizes, a
malformed trace) exits 2 with one line on stderr, never a traceback.

Known limitations: the whole trace is held in memory as a list (about 40
bytes an access, so 100 million accesses need about 4 GB); ``theine`` is
driven through its core directly, without the package's read buffers, so its
figures are the policy's own, slightly better than the package would give.
With ``--format keys`` the keys are strings, whose hashes Python salts per
process, so W-TinyLFU's figures may differ by a few hits between runs (set
``PYTHONHASHSEED`` for repeatable ones); integer traces are repeatable.
"""

from __future__ import annotations

import argparse
import array
import bz2
import dataclasses
import gzip
import heapq
import json
import lzma
import sys
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Final, NoReturn, cast

from sidecar.cache.tinylfu import LRU, Key, WTinyLFU

FORMATS: Final = ("lirs", "cache2k", "keys")
DEFAULT_POLICIES: Final = ("wtinylfu", "lru", "opt")


class TraceError(ValueError):
    """A trace file that cannot be read in the requested format."""


@dataclasses.dataclass(frozen=True)
class Result:
    """One policy's replay of one trace at one size."""

    policy: str
    size: int
    accesses: int
    hits: int

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "policy": self.policy,
            "size": self.size,
            "accesses": self.accesses,
            "hits": self.hits,
            "hit_ratio": round(self.hit_ratio, 6),
        }


# -- traces ------------------------------------------------------------


def _open_binary(path: str) -> IO[bytes]:
    if path.endswith(".gz"):
        return cast(IO[bytes], gzip.open(path, "rb"))
    if path.endswith(".xz"):
        return lzma.open(path, "rb")
    if path.endswith(".bz2"):
        return bz2.open(path, "rb")
    return open(path, "rb")


def _text_lines(path: str) -> Iterator[tuple[int, str]]:
    with _open_binary(path) as stream:
        for number, raw in enumerate(stream, 1):
            try:
                yield number, raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise TraceError(f"{path}:{number}: not UTF-8 text") from None


def read_lirs(path: str) -> list[int]:
    """Integer keys, one a line; ``*`` checkpoint lines and blanks skipped."""
    keys: list[int] = []
    for number, line in _text_lines(path):
        if not line or line == "*":
            continue
        try:
            keys.append(int(line))
        except ValueError:
            shown = line[:40]
            message = f"{path}:{number}: expected an integer key, got {shown!r}"
            raise TraceError(message) from None
    return keys


def read_cache2k(path: str) -> list[int]:
    """Big-endian signed 32-bit keys, back to back."""
    with _open_binary(path) as stream:
        data = stream.read()
    if len(data) % 4:
        raise TraceError(
            f"{path}: {len(data)} bytes is not a whole number of 32-bit keys"
        )
    keys = array.array("i")
    keys.frombytes(data)
    if sys.byteorder == "little":
        keys.byteswap()
    return keys.tolist()


def read_keys(path: str) -> list[str]:
    """One key a line, surrounding whitespace and blank lines dropped."""
    return [line for _, line in _text_lines(path) if line]


_READERS: Final[dict[str, Callable[[str], Sequence[Key]]]] = {
    "lirs": read_lirs,
    "cache2k": read_cache2k,
    "keys": read_keys,
}


def read_trace(path: str, fmt: str) -> Sequence[Key]:
    """The trace's keys; TraceError for an unknown format or bad content."""
    reader = _READERS.get(fmt)
    if reader is None:
        raise TraceError(
            f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}"
        )
    try:
        return reader(path)
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise TraceError(f"{path}: cannot read trace: {reason}") from None


# -- policies ----------------------------------------------------------


def _replay_cache(keys: Sequence[Key], cache: WTinyLFU[bool] | LRU[bool]) -> int:
    hits = 0
    get, put = cache.get, cache.put
    for key in keys:
        if get(key) is None:
            put(key, True)
        else:
            hits += 1
    return hits


def _replay_theine(keys: Sequence[Key], size: int) -> int:
    from theine_core import TlfuCore, spread

    core = TlfuCore(size)
    resident: set[int] = set()
    hits = 0
    for key in keys:
        h = spread(hash(key))
        if h in resident:
            hits += 1
            core.access([h])
        else:
            resident.add(h)
            resident.difference_update(core.set([(h, 0)]))
    return hits


def next_uses(keys: Sequence[Key]) -> list[int]:
    """For each access, the index of the same key's next access (or len)."""
    n = len(keys)
    following = [n] * n
    last: dict[Key, int] = {}
    for i in range(n - 1, -1, -1):
        key = keys[i]
        following[i] = last.get(key, n)
        last[key] = i
    return following


def _replay_opt(keys: Sequence[Key], size: int, following: Sequence[int]) -> int:
    """Belady's MIN with bypass: a key used farthest in the future leaves.

    The heap holds (-next use, key) for resident keys; an item is stale when
    the key has been used since it was pushed (its next use moved on).
    """
    resident: dict[Key, int] = {}
    heap: list[tuple[int, Key]] = []
    hits = 0
    for i, key in enumerate(keys):
        nxt = following[i]
        if key in resident:
            hits += 1
        resident[key] = nxt
        heapq.heappush(heap, (-nxt, key))
        while len(resident) > size:
            neg, victim = heapq.heappop(heap)
            if resident.get(victim) == -neg:
                del resident[victim]
        if len(heap) > 4 * size + 64:
            heap = [(-nu, k) for k, nu in resident.items()]
            heapq.heapify(heap)
    return hits


def theine_available() -> bool:
    """Whether the ``theine`` policy can run here."""
    try:
        import theine_core  # noqa: F401
    except ImportError:
        return False
    return True


def policies() -> tuple[str, ...]:
    """Every policy name this build can replay."""
    names = ("wtinylfu", "lru", "opt")
    return (*names, "theine") if theine_available() else names


def simulate(
    keys: Sequence[Key],
    policy: str,
    size: int,
    *,
    following: Sequence[int] | None = None,
) -> Result:
    """Replay ``keys`` against ``policy`` holding at most ``size`` entries.

    ``following`` (from ``next_uses``) saves recomputing it for ``opt`` when
    several sizes replay the same trace.
    """
    if size < 1:
        raise ValueError(f"size must be at least 1, got {size}")
    if policy == "wtinylfu":
        hits = _replay_cache(keys, WTinyLFU[bool](size))
    elif policy == "lru":
        hits = _replay_cache(keys, LRU[bool](size))
    elif policy == "opt":
        hits = _replay_opt(keys, size, following or next_uses(keys))
    elif policy == "theine" and theine_available():
        hits = _replay_theine(keys, size)
    else:
        raise ValueError(
            f"unknown policy {policy!r}; expected one of {', '.join(policies())}"
        )
    return Result(policy, size, len(keys), hits)


# -- command line ------------------------------------------------------


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line and no exit."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def _parse_sizes(text: str) -> list[int]:
    sizes: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise _UsageError(
                f"--size: expected positive integers separated by commas, got {text!r}"
            )
        sizes.append(int(part))
    return sizes


def _parse_policies(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    known = policies()
    for name in names:
        if name not in known:
            raise _UsageError(
                f"--policy: unknown policy {name!r}; expected some of {','.join(known)}"
            )
    if not names:
        raise _UsageError("--policy: expected at least one policy name")
    return names


def _build_parser() -> _Parser:
    parser = _Parser(
        prog="sidecar simulate",
        description="Replay a cache-access trace and print each policy's hit ratio.",
    )
    parser.add_argument("--trace", required=True, metavar="FILE")
    parser.add_argument("--format", required=True, choices=FORMATS, dest="fmt")
    parser.add_argument("--size", required=True, metavar="N[,N...]")
    parser.add_argument(
        "--policy", default=",".join(DEFAULT_POLICIES), metavar="NAME[,NAME...]"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object a line")
    return parser


def _print_table(results: list[Result], out: IO[str]) -> None:
    out.write(
        f"{'policy':<10} {'size':>8} {'accesses':>10} {'hits':>10} {'hit ratio':>9}\n"
    )
    for r in results:
        out.write(
            f"{r.policy:<10} {r.size:>8} {r.accesses:>10} {r.hits:>10} "
            f"{100 * r.hit_ratio:>8.2f}%\n"
        )


def run(
    keys: Sequence[Key], names: Sequence[str], sizes: Sequence[int]
) -> Iterator[Result]:
    """Every (size, policy) replay, sizes outermost."""
    following = next_uses(keys) if "opt" in names else None
    for size in sizes:
        for name in names:
            yield simulate(keys, name, size, following=following)


def main(argv: list[str]) -> int:
    """Entry point of ``sidecar simulate``; returns the exit status."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        sizes = _parse_sizes(args.size)
        names = _parse_policies(args.policy)
        keys = read_trace(args.trace, args.fmt)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except (_UsageError, TraceError) as exc:
        sys.stderr.write(f"sidecar simulate: {exc}\n")
        return 2
    out = sys.stdout
    if args.json:
        for result in run(keys, names, sizes):
            out.write(json.dumps(result.as_dict()) + "\n")
            out.flush()
    else:
        _print_table(list(run(keys, names, sizes)), out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
