"""State streams at scale: JSON Patch deltas against full snapshots, same rate.

Owns the measurement of ``sidecar.state`` serving many dashboards: a server
process runs a ``StateHub`` at 4 windows a second (``state.coalesce`` 250 ms)
over read models fed by simulated traffic (8 routes, an upstream with 4 slots
polled every 2 s), and this process holds 1,000 real SSE connections to it on
loopback (``--quick``: 100). Each traffic level (``--rates``, default 10 and
200 requests a second) runs once per mode, with the same seeded traffic:
- ``patch``: the product, one compact RFC 6902 delta per changed model;
- ``snapshot``: the whole document of each changed model, every window;
- ``all``: every model whole, every window (what polling ``/state/*`` at the
  window rate costs);
- ``raw`` (on request): ``jsonpatch.make_patch`` output, not compacted.
Reported per run: server CPU per window (whole process; the publishing step;
the simulated traffic), bytes the server sent per window to all subscribers,
per subscriber per second, and events per window.
Not here: the hub's correctness (tests/state/), the proxy's throughput
(bench/bench_proxy.py).

Invariants: the server is a child started and stopped by PID through
``bench.rig``; it is pinned to one CPU and the clients to the other when two
are allowed, so the clients' reading does not count as server CPU. Every
wait is bounded by a deadline; every loop by a count or the run's duration.

Known limitations: runs share the machine with whatever else runs; CPU
figures are process CPU (``time.process_time`` in the server), so they
include the simulated traffic (reported apart) and aiohttp's writes. Run with
``python -m bench.bench_state [--quick] [--subscribers N] [--duration-s S]
[--rates 10,200] [--modes patch,snapshot,all,raw]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import jsonpatch
from aiohttp import web

from bench import rig
from sidecar.state import (
    ArtifactsModel,
    CacheModel,
    CoalescingModel,
    PolicyModel,
    RoutesModel,
    StateHub,
    UpstreamModel,
    routes,
    sse,
)

WINDOW_S: Final = 0.25
TRAFFIC_RATE: Final = 200
TRAFFIC_STEP_S: Final = 0.01
UPSTREAM_POLL_S: Final = 2.0
ROUTES: Final = tuple(f"route-{i}" for i in range(8))
SLOTS: Final = 4
CONNECT_BATCH: Final = 100
READY_TIMEOUT_S: Final = 60.0
READY_LINE: Final = "bench-state-ready"
MODES: Final = ("patch", "snapshot", "all", "raw")


# -- server side --------------------------------------------------------------


class CountingHub(StateHub):
    """A hub that counts windows and the CPU its publishing step takes."""

    windows = 0
    tick_cpu_s = 0.0

    def tick(self) -> int:
        started = time.process_time()
        published = super().tick()
        self.tick_cpu_s += time.process_time() - started
        self.windows += 1
        return published


class RawPatchHub(CountingHub):
    """For reference: jsonpatch.make_patch's output, not compacted."""

    def _encode_change(
        self, name: str, event_id: int, before: dict[str, Any], after: dict[str, Any]
    ) -> bytes | None:
        patch = jsonpatch.make_patch(before, after).patch
        return sse.encode_delta(name, sse.dumps(patch), event_id) if patch else None


class FullSnapshotHub(CountingHub):
    """The baseline: every changed model goes out whole, as a snapshot event."""

    def _encode_change(
        self, name: str, event_id: int, before: dict[str, Any], after: dict[str, Any]
    ) -> bytes | None:
        if sse.dumps(before) == sse.dumps(after):
            return None
        return sse.encode_snapshot(name, after, event_id)


class AllSnapshotsHub(FullSnapshotHub):
    """The polling baseline: every model goes out whole every window."""

    def tick(self) -> int:
        for entry in self._entries.values():
            entry.version = -1  # read as changed, so each window republishes it
        return super().tick()

    def _encode_change(
        self, name: str, event_id: int, before: dict[str, Any], after: dict[str, Any]
    ) -> bytes | None:
        return sse.encode_snapshot(name, after, event_id)


def _slot(slot_id: int, decoded: int, processing: bool) -> dict[str, Any]:
    params = {f"p{i}": i * 0.1 for i in range(30)}
    return {
        "id": slot_id,
        "n_ctx": 4096,
        "is_processing": processing,
        "n_prompt_tokens": 300 + decoded,
        "params": params,
        "next_token": [
            {
                "has_next_token": processing,
                "n_remain": 512 - decoded,
                "n_decoded": decoded,
            }
        ],
    }


def _families(polls: int) -> dict[str, Any]:
    names = [f"llamacpp:metric_{i}" for i in range(12)]
    return {
        name: {
            "type": "counter",
            "help": f"help text for {name}",
            "samples": [
                {"name": name + "_total", "labels": {}, "value": polls * (i + 1)}
            ],
        }
        for i, name in enumerate(names)
    }


class Traffic:
    """Simulated producers: what the proxy and the poller would do."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.cache = CacheModel()
        self.routes = RoutesModel()
        self.coalescing = CoalescingModel()
        self.upstream = UpstreamModel("llama.cpp", "http://127.0.0.1:8080")
        manifest = {
            f"section_{i}": {f"key_{j}": j for j in range(12)} for i in range(8)
        }
        self.policy = PolicyModel(manifest, "ab" * 32)
        self.artifacts = ArtifactsModel()
        self.polls = 0
        self.cpu_s = 0.0

    def models(self) -> dict[str, Any]:
        return {
            "cache": self.cache,
            "routes": self.routes,
            "coalescing": self.coalescing,
            "upstream": self.upstream,
            "policy": self.policy,
            "artifacts": self.artifacts,
        }

    def requests(self, n: int) -> None:
        started = time.process_time()
        rng = self.rng
        for _ in range(n):
            route = rng.choice(ROUTES)
            outcome = rng.choices(("hit", "miss", "bypass"), (6, 3, 1))[0]
            tier = "memory" if outcome == "hit" else None
            self.cache.record(
                tier, route, outcome, rng.random() * 0.5, rng.randrange(4096)
            )
            self.routes.observe(
                route, 200 if rng.random() < 0.99 else 502, rng.random()
            )
            self.routes.add_prompt_tokens(route, rng.randrange(200), rng.randrange(50))
            if rng.random() < 0.1:
                self.coalescing.record(route, rng.choice(("leader", "follower")))
        self.cache.set_tier("memory", entries=1000 + rng.randrange(100), bytes=2**24)
        self.cpu_s += time.process_time() - started

    def poll(self) -> None:
        self.polls += 1
        slots = [_slot(i, self.rng.randrange(512), i % 2 == 0) for i in range(SLOTS)]
        summary = {
            "total": SLOTS,
            "processing": sum(1 for s in slots if s["is_processing"]),
        }
        self.upstream.update(
            slots=slots,
            slots_summary=summary,
            metrics={"enabled": True, "status": 200, "families": _families(self.polls)},
        )


async def _drive(traffic: Traffic, rate: int) -> None:
    owed = 0.0  # requests due but not yet simulated: rates below 100/s need it
    last_poll = time.monotonic()
    while True:
        await asyncio.sleep(TRAFFIC_STEP_S)
        owed += rate * TRAFFIC_STEP_S
        if owed >= 1.0:
            traffic.requests(int(owed))
            owed -= int(owed)
        if time.monotonic() - last_poll >= UPSTREAM_POLL_S:
            last_poll = time.monotonic()
            traffic.poll()


async def serve(mode: str, port: int, max_subscribers: int, rate: int) -> None:
    """The server process: hub, routes, a stats endpoint, simulated traffic."""
    traffic = Traffic(random.Random(7))
    hub_class = {
        "patch": CountingHub,
        "snapshot": FullSnapshotHub,
        "all": AllSnapshotsHub,
        "raw": RawPatchHub,
    }[mode]
    hub = hub_class(coalesce_s=WINDOW_S, max_subscribers=max_subscribers)
    for name, model in traffic.models().items():
        hub.register(name, model)

    async def stats(_request: web.Request) -> web.Response:
        subs = hub.subscribers()
        return web.json_response(
            {
                "windows": hub.windows,
                "tick_cpu_s": hub.tick_cpu_s,
                "traffic_cpu_s": traffic.cpu_s,
                "process_cpu_s": time.process_time(),
                "events": hub.events_published,
                "bytes_sent": sum(s.bytes_sent for s in subs),
                "subscribers": len(subs),
                "resyncs": sum(s.resyncs for s in subs),
            }
        )

    app = web.Application()
    app.add_routes(routes(hub))
    app.router.add_get("/bench/stats", stats)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    await web.TCPSite(runner, rig.LOOPBACK, port, backlog=2048).start()
    await hub.start()
    driver = asyncio.create_task(_drive(traffic, rate))  # strong reference kept here
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(READY_LINE, flush=True)
    await stop.wait()
    driver.cancel()
    await hub.close(timeout_s=2.0)
    await runner.cleanup()


# -- client side --------------------------------------------------------------


class Streams:
    """Raw SSE connections that only count what they receive."""

    def __init__(self) -> None:
        self.bytes_received = 0
        self.started = 0
        self._tasks: list[asyncio.Task[None]] = []  # strong references
        self._writers: list[asyncio.StreamWriter] = []

    async def open(self, port: int, count: int) -> None:
        for first in range(0, count, CONNECT_BATCH):
            batch = min(CONNECT_BATCH, count - first)
            await asyncio.gather(*(self._open_one(port) for _ in range(batch)))

    async def _open_one(self, port: int) -> None:
        reader, writer = await asyncio.open_connection(rig.LOOPBACK, port)
        writer.write(
            b"GET /state/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Accept: text/event-stream\r\n\r\n"
        )
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise rig.RigError(f"stream refused: {head.splitlines()[0]!r}")
        self._writers.append(writer)
        self.started += 1
        self._tasks.append(asyncio.create_task(self._read(reader)))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while chunk := await reader.read(65536):
            self.bytes_received += len(chunk)

    async def close(self) -> None:
        for writer in self._writers:
            writer.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _server_stats(port: int) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection(rig.LOOPBACK, port)
    writer.write(
        b"GET /bench/stats HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    data = await reader.read()
    writer.close()
    return dict(json.loads(data.split(b"\r\n\r\n", 1)[1]))


async def _measure_running(
    port: int, subscribers: int, warmup_s: float, duration_s: float
) -> dict[str, Any]:
    streams = Streams()
    await streams.open(port, subscribers)
    try:
        await asyncio.sleep(warmup_s)
        before = await _server_stats(port)
        received_before = streams.bytes_received
        await asyncio.sleep(duration_s)
        after = await _server_stats(port)
        received = streams.bytes_received - received_before
    finally:
        await streams.close()
    windows = max(1, int(after["windows"]) - int(before["windows"]))

    def per_window(key: str) -> float:
        return (float(after[key]) - float(before[key])) / windows

    return {
        "subscribers": after["subscribers"],
        "windows": windows,
        "cpu_ms_per_window": per_window("process_cpu_s") * 1000,
        "publish_ms_per_window": per_window("tick_cpu_s") * 1000,
        "traffic_ms_per_window": per_window("traffic_cpu_s") * 1000,
        "bytes_per_window": per_window("bytes_sent"),
        "bytes_per_subscriber_s": per_window("bytes_sent")
        / WINDOW_S
        / max(1, subscribers),
        "wire_bytes_per_window": received / windows,
        "events_per_window": per_window("events"),
        "resyncs": after["resyncs"],
    }


def run_mode(
    mode: str, rate: int, args: argparse.Namespace, plan: rig.CpuPlan, workdir: Path
) -> dict[str, Any]:
    """Start a server in ``mode`` at ``rate``, measure it, stop it."""
    port = rig.free_ports(1)[0]
    argv = [
        sys.executable, "-m", "bench.bench_state", "--serve", mode,
        "--port", str(port), "--subscribers", str(args.subscribers),
        "--rates", str(rate),
    ]  # fmt: skip
    proc = rig.start_ready(
        f"state server ({mode}, {rate}/s)",
        argv,
        log_path=workdir / f"{mode}-{rate}.log",
        port=port,
        cpu=plan.proxy_cpu,
        line=READY_LINE,
        timeout_s=READY_TIMEOUT_S,
    )
    try:
        record = asyncio.run(
            _measure_running(port, args.subscribers, args.warmup_s, args.duration_s)
        )
    finally:
        rig.stop_process(proc)
    return {"mode": mode, "rate": rate, **record}


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, needed), hard))


def _fmt(digits: int) -> Callable[[Any], str]:
    return lambda value: f"{value:,.{digits}f}"


COLUMNS: Final[Sequence[rig.Column]] = (
    ("mode", "mode", str),
    ("req/s", "rate", rig.fmt_plain),
    ("subscribers", "subscribers", rig.fmt_plain),
    ("windows", "windows", rig.fmt_plain),
    ("CPU ms/window", "cpu_ms_per_window", _fmt(2)),
    ("publish ms/window", "publish_ms_per_window", _fmt(2)),
    ("traffic ms/window", "traffic_ms_per_window", _fmt(2)),
    ("bytes/window (all)", "bytes_per_window", _fmt(0)),
    ("bytes/s per subscriber", "bytes_per_subscriber_s", _fmt(0)),
    ("events/window", "events_per_window", _fmt(2)),
    ("resyncs", "resyncs", rig.fmt_plain),
)


def _comparisons(records: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    by_key = {(r["mode"], r["rate"]): r for r in records}
    for (mode, rate), record in by_key.items():
        if mode not in ("patch", "raw"):
            continue
        for base_mode in ("snapshot", "all"):
            base = by_key.get((base_mode, rate))
            if base is None:
                continue
            size = rig.ratio(record["bytes_per_window"], base["bytes_per_window"])
            cpu = rig.ratio(record["cpu_ms_per_window"], base["cpu_ms_per_window"])
            lines.append(
                f"{mode} vs {base_mode} at {rate} req/s: {rig.fmt_ratio(size)} of the "
                f"bytes, {rig.fmt_ratio(cpu)} of the server CPU per window"
            )
    return lines


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_state", description=__doc__.splitlines()[0]
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="100 subscribers, 4 s a run")
    add("--subscribers", type=int, help="SSE connections (default 1000)")
    add("--duration-s", type=float, help="measured seconds per run (default 15)")
    add("--warmup-s", type=float, default=2.0, help="seconds before measuring")
    add("--rates", default="10,200", help="simulated requests/s, one run each")
    add("--modes", default="patch,snapshot,all", help=f"any of {','.join(MODES)}")
    add("--json", type=Path, help="also write the records as JSON lines")
    add("--serve", choices=MODES, help=argparse.SUPPRESS)
    add("--port", type=int, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    args.subscribers = args.subscribers or (100 if args.quick else 1000)
    args.duration_s = args.duration_s or (4.0 if args.quick else 15.0)
    rates = [int(r) for r in args.rates.split(",") if r.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not rates or any(m not in MODES for m in modes):
        parser.error(f"--rates needs numbers; --modes takes {','.join(MODES)}")
    _raise_fd_limit(args.subscribers * 2 + 256)
    if args.serve:
        import uvloop

        uvloop.run(serve(args.serve, args.port, args.subscribers + 16, rates[0]))
        return 0
    plan = rig.plan_cpus()
    rig.pin_self(plan.load_cpu)
    print(
        f"{args.subscribers} SSE subscribers on loopback, {1 / WINDOW_S:.0f} "
        f"windows/s, {len(ROUTES)} routes; {plan.describe()}",
        flush=True,
    )
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with tempfile.TemporaryDirectory(prefix="bench-state-") as tmp:
        records = [
            run_mode(mode, rate, args, plan, Path(tmp))
            for rate in rates
            for mode in modes
        ]
    print(rig.format_records(records, COLUMNS))
    print("\n".join(_comparisons(records)))
    if args.json:
        rig.write_json_lines(args.json, records)
    print(rig.rerun_line("bench.bench_state", argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
