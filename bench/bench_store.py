"""Disk tier costs: put and get latency, the async facade, and start-up time.

Owns the measurement of ``sidecar.cache.store`` on its own: the per-call
latency of ``DiskStore.put`` and ``get`` (median, p99) for small answers with
trained dictionaries, the same calls through ``AsyncDiskStore`` from an event
loop, the bytes stored per answer, and how long reopening takes (the start-up
walk over every record and blob key). Not here: compression ratios
(``bench/bench_compress.py``) or the proxy around the store.

Invariants: the store lives in a temporary directory removed at the end; every
loop is bounded by a count. Answers come from ``bench.bench_compress``'s
generator with a fixed seed, so runs are comparable.

Known limitations: the page cache is warm throughout, so reads measure LevelDB
and zstd, not the disk; a cold start on a slow volume is slower than the
reopen time printed here. Run with ``python -m bench.bench_store [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench import rig
from bench.bench_compress import corpus
from sidecar.cache.compress import Compressor, ContentClass
from sidecar.cache.store import AsyncDiskStore, DiskStore, Entry

MiB = 1024 * 1024


def action_key(n: int) -> bytes:
    return hashlib.sha256(b"bench-%d" % n).digest()


def entries(count: int, seed: int) -> list[Entry]:
    """Entries for ``count`` generated answers, streams marked as such."""
    rng = random.Random(seed)
    items = corpus(rng, count // 3 + 1)[:count]
    now = time.time()
    return [
        Entry.create(
            body,
            headers=(("content-type", "application/json"),),
            created=now,
            ttl_s=86_400,
            content_type="application/json",
            stream=cls is ContentClass.SSE,
            route="chat" if cls is ContentClass.CHAT else "completions",
        )
        for cls, body in items
    ]


def open_store(path: Path) -> DiskStore:
    # Background training, as in the sidecar: a put never waits for zstd's trainer.
    compressor = Compressor(min_samples=128)
    return DiskStore(
        path, max_bytes=1 << 30, max_entry_bytes=MiB, compressor=compressor
    )


def timed_calls(
    store: DiskStore, batch: Sequence[Entry]
) -> tuple[list[float], list[float]]:
    """Per-call seconds of put for each entry, then of get for each."""
    puts, gets = [], []
    for n, e in enumerate(batch):
        t0 = time.perf_counter()
        store.put(action_key(n), e)
        puts.append(time.perf_counter() - t0)
    for n in range(len(batch)):
        t0 = time.perf_counter()
        found = store.get(action_key(n))
        gets.append(time.perf_counter() - t0)
        assert found is not None
    return puts, gets


async def timed_async_gets(store: DiskStore, count: int) -> list[float]:
    """Per-call seconds of get through the async facade, from the loop;
    closes the store."""
    facade = AsyncDiskStore(store)
    times = []
    try:
        for n in range(count):
            t0 = time.perf_counter()
            await facade.get(action_key(n))
            times.append(time.perf_counter() - t0)
    finally:
        await facade.close()
    return times


def row(name: str, times: Sequence[float]) -> list[str]:
    return [
        name,
        str(len(times)),
        rig.fmt_latency(rig.median(times)),
        rig.fmt_latency(rig.percentile(times, 99)),
        rig.fmt_rate(len(times) / sum(times)),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="2,000 answers, not 20,000"
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    argv_used = list(sys.argv[1:] if argv is None else argv)
    count = 2_000 if args.quick else 20_000

    batch = entries(count, args.seed)
    raw_bytes = sum(e.size for e in batch)
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        path = Path(tmp) / "disk"
        store = open_store(path)
        puts, gets = timed_calls(store, batch)
        stats = store.stats()
        async_gets = asyncio.run(timed_async_gets(store, min(count, 5_000)))
        t0 = time.perf_counter()
        reopened = open_store(path)
        reopen_s = time.perf_counter() - t0
        reopened.close()

    print(f"{count} answers, mean {raw_bytes / count:,.0f} bytes; warm page cache")
    header = ("call", "count", "median", "p99", "calls/s")
    print(
        rig.format_table(
            header,
            [
                row("put (compress, write)", puts),
                row("get (read, verify)", gets),
                row("get via AsyncDiskStore", async_gets),
            ],
        )
    )
    stored = stats["bytes"] / stats["entries"]
    print(
        f"\nstored {stats['bytes']:,} bytes for {stats['blob_body_bytes']:,} of answers"
        f" ({stats['blob_body_bytes'] / stats['bytes']:.2f}x, {stored:,.0f} bytes per"
        f" entry including its index record); dictionaries: {stats['dictionaries']}"
    )
    print(f"reopen with {stats['entries']:,} entries: {reopen_s * 1000:.0f} ms")
    print("\n" + rig.rerun_line("bench.bench_store", argv_used))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
