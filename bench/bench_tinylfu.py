"""Memory-tier eviction: hit ratios on public traces, and operations per second.

Run as ``python -m bench.bench_tinylfu [--quick] [--traces DIR] [--json FILE]``.

Hit ratios: each trace in ``/work/shared/traces`` (multi1, loop, web12; see
the README there) is replayed at several cache sizes against LRU, theine
(the ``theine`` package's engine; its result varies a little from run to
run, so the median of three runs is shown), W-TinyLFU and Belady's optimum,
through ``sidecar.cache.simulate``. Target, checked per trace and size:
W-TinyLFU's hit ratio is at least the better of LRU and theine. The
``w/opt`` column is W-TinyLFU's hits over the optimum's.

Throughput: in this process, on one core, a full ``WTinyLFU`` (and an
``LRU`` beside it) of 32-byte digest keys: ``get`` hits in a random order,
and ``put`` of fresh keys, each evicting one. The figure is the best of a few
repeats, in operations per second.

It prints tables, PASS/FAIL lines, one JSON line per measurement (also
written to ``--json FILE``) and a ``rerun with:`` line; the exit status is 1
when a target failed or no trace was found. Not here: the simulator itself
(``sidecar/cache/simulate.py``), the memory tier around the policy.

Invariants: deterministic inputs (fixed seeds; the trace keys are integers,
whose hashes do not vary between runs), every loop bounded by a count.

Known limitations: the machine is shared, so operations per second move with
its load (the load average is printed); hit ratios do not. ``--quick`` runs
fewer sizes per trace and shorter throughput loops.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from bench import rig
from sidecar.cache.simulate import next_uses, policies, read_trace, simulate
from sidecar.cache.tinylfu import LRU, WTinyLFU

TRACES_DIR: Final = Path("/work/shared/traces")
# file, format, sizes, sizes in --quick mode
TRACES: Final = {
    "multi1": ("multi1.lirs.gz", "lirs", (100, 500, 1000, 2000), (100, 1000)),
    "loop": ("loop.lirs.gz", "lirs", (250, 500, 1000), (250,)),
    "web12": ("web12.cache2k.xz", "cache2k", (500, 1000, 2000, 4000), (500, 2000)),
}
THEINE_RUNS: Final = 3


def hit_ratio_rows(
    name: str, keys: Sequence[Any], sizes: Sequence[int]
) -> list[dict[str, Any]]:
    """One record per size: each policy's hits, and whether the target holds."""
    following = next_uses(keys)
    have_theine = "theine" in policies()
    records = []
    for size in sizes:
        hits = {
            p: simulate(keys, p, size, following=following).hits
            for p in ("lru", "wtinylfu", "opt")
        }
        if have_theine:
            runs = [simulate(keys, "theine", size).hits for _ in range(THEINE_RUNS)]
            hits["theine"] = int(statistics.median(runs))
        best_peer = max(hits["lru"], hits.get("theine", 0))
        records.append(
            {
                "bench": "tinylfu_hit_ratio",
                "trace": name,
                "size": size,
                "accesses": len(keys),
                **{f"{p}_hits": h for p, h in hits.items()},
                **{f"{p}_ratio": h / len(keys) for p, h in hits.items()},
                "wtinylfu_over_opt": hits["wtinylfu"] / hits["opt"]
                if hits["opt"]
                else None,
                "margin_hits": hits["wtinylfu"] - best_peer,
                "pass": hits["wtinylfu"] >= best_peer,
            }
        )
    return records


def print_hit_table(name: str, records: Sequence[dict[str, Any]]) -> None:
    def pct(record: dict[str, Any], policy: str) -> str:
        value = record.get(f"{policy}_ratio")
        return "-" if value is None else f"{100 * value:.2f}%"

    rows = [
        [
            str(r["size"]),
            pct(r, "lru"),
            pct(r, "theine"),
            pct(r, "wtinylfu"),
            pct(r, "opt"),
            f"{100 * r['wtinylfu_over_opt']:.1f}%",
            f"{r['margin_hits']:+d}",
            "PASS" if r["pass"] else "FAIL",
        ]
        for r in records
    ]
    header = ("size", "LRU", "theine", "W-TinyLFU", "OPT", "w/opt", "margin", "target")
    print(f"\n{name}: {records[0]['accesses']:,} accesses")
    print(rig.format_table(header, rows))


def digest_keys(count: int, salt: bytes) -> list[bytes]:
    return [hashlib.sha256(salt + b"%d" % i).digest() for i in range(count)]


def best_rate(action: Callable[[], int], repeats: int) -> float:
    """Operations per second of ``action`` (which returns its op count), best run."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        ops = action()
        rates.append(ops / (time.perf_counter() - start))
    return max(rates)


def throughput(
    cache_class: Any, entries: int, ops: int, repeats: int
) -> dict[str, Any]:
    """get-hit and put-with-eviction rates of a full cache of ``entries`` digests."""
    cache = cache_class(entries)
    resident = digest_keys(entries, b"resident-")
    for key in resident:
        cache.put(key, key)
        cache.get(key)
    order = random.Random(1).choices([k for k in resident if k in cache], k=ops)

    def gets() -> int:
        get = cache.get
        for key in order:
            get(key)
        return len(order)

    fresh = iter(digest_keys(ops * repeats, b"fresh-"))

    def puts() -> int:
        put = cache.put
        for _ in range(ops):
            key = next(fresh)
            put(key, key)
        return ops

    get_rate = best_rate(gets, repeats)
    put_rate = best_rate(puts, repeats)
    return {
        "bench": "tinylfu_ops",
        "policy": cache.stats()["policy"],
        "entries": entries,
        "get_hit_per_s": get_rate,
        "put_evict_per_s": put_rate,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_tinylfu")
    parser.add_argument(
        "--quick", action="store_true", help="fewer sizes, shorter loops"
    )
    parser.add_argument("--traces", type=Path, default=TRACES_DIR, metavar="DIR")
    parser.add_argument(
        "--json", type=Path, metavar="FILE", help="also write JSON lines"
    )
    argv_used = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv_used)

    records: list[dict[str, Any]] = []
    found = 0
    for name, (file, fmt, sizes, quick_sizes) in TRACES.items():
        path = args.traces / file
        if not path.exists():
            print(f"\n{name}: {path} not found, skipped")
            continue
        found += 1
        rows = hit_ratio_rows(
            name, read_trace(str(path), fmt), quick_sizes if args.quick else sizes
        )
        print_hit_table(name, rows)
        records.extend(rows)
    if "theine" not in policies():
        print("\ntheine is not installed: the target compares with LRU only")

    ops, repeats = (20_000, 2) if args.quick else (200_000, 3)
    print(
        f"\none core, 10,000 entries of 32-byte keys, best of {repeats} x {ops:,} ops;"
        f" load average {os.getloadavg()[0]:.2f}"
    )
    rates = [throughput(cls, 10_000, ops, repeats) for cls in (WTinyLFU, LRU)]
    print(
        rig.format_table(
            ("policy", "get hits/s", "put+evict/s"),
            [
                [
                    r["policy"],
                    rig.fmt_rate(r["get_hit_per_s"]),
                    rig.fmt_rate(r["put_evict_per_s"]),
                ]
                for r in rates
            ],
        )
    )
    records.extend(rates)

    failed = [r for r in records if r.get("pass") is False]
    print()
    for r in records:
        if "pass" in r:
            verdict = "PASS" if r["pass"] else "FAIL"
            print(
                f"{verdict} {r['trace']} size {r['size']}:"
                " W-TinyLFU >= max(LRU, theine)"
                f" ({r['margin_hits']:+d} hits)"
            )
    print()
    for record in records:
        print(rig.json_line(record))
    if args.json:
        rig.write_json_lines(args.json, records)
    print("\n" + rig.rerun_line("bench.bench_tinylfu", argv_used))
    if not found:
        print("FAIL no trace found", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
