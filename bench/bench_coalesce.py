"""Coalescing cost: the latency a follower adds over its leader, and its CPU.

Run as ``python -m bench.bench_coalesce [--quick] [--json FILE]`` from the
repository root. Two measurements:

- ``http``: a sidecar in its own process (this module with ``--serve``,
  pinned to one CPU) runs the chain ``[bench key stage] -> Coalescer ->
  Forwarder`` in front of a held upstream in this process (on the other
  CPU). Each round sends the leader's request, waits until the upstream has
  it, sends N identical followers on their own keep-alive connections,
  waits until the sidecar reports N waiters, then releases the upstream.
  Every client records when its first body byte and its last byte arrived;
  a follower's added latency is its time minus the leader's, in the same
  round. CPU per follower is the sidecar's CPU time over the round (read
  from the sidecar itself, ``time.process_time``) minus that of a round with
  no followers, over N. Shapes: ``json`` (one 1 KiB body) and ``sse`` (a
  stream whose first event goes out alone, then the rest). Leg ``off`` runs
  the same with coalescing disabled, so every request goes upstream: the
  cost of a pass-through request to compare a follower with.
- ``stage``: the ``Coalescer`` alone, in this process, with a fake upstream
  and N readers: its own CPU per follower, without HTTP.

Not here: the proxy's pass-through cost (``bench/bench_proxy.py``). Owns its
own upstream and client (small asyncio protocols on httptools), because an
aiohttp client costs more per request than the sidecar does and would be
what this measured.

Invariants: the sidecar under test and the load run on different CPUs when
two are allowed (``rig.plan_cpus``); the child is stopped by its PID, also on
SIGTERM; each ``on`` round must reach the upstream exactly once, or the run
fails (exit status 1).

Known limitations: figures move with the shared machine's load. The client
reads all N responses on one CPU, so the p99 includes the client's own
queueing. The sidecar runs without an access log (its cost is the same with
and without coalescing). The key stage hashes the body instead of the real
cache lookup, so the cache's own costs are not in these figures.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Final

import httptools
import uvloop
from multidict import CIMultiDict

from bench import rig

FOLLOWERS: Final = (100, 1000)
SHAPES: Final = ("json", "sse")
LEGS: Final = ("on", "off")
ROUNDS: Final = 10
QUICK_ROUNDS: Final = 3
STAGE_ROUNDS: Final = 20
BODY_BYTES: Final = 1024
SSE_EVENTS: Final = 8
# The first event goes out alone; the rest after this gap, so first-byte
# times are those of the first event only.
SSE_GAP_S: Final = 0.02
CONNECT_BATCH: Final = 100  # under the sidecar's listen backlog (128)
ROUND_TIMEOUT_S: Final = 60.0
READY_LINE: Final = "bench.coalesce.ready"
STATE_PATH: Final = "/_bench/state"
HEALTH_AGENT: Final = b"sidecar-health"


# -- the sidecar under test (child process) ----------------------------------------


class _Answer:
    """A ``Reply`` the bench stage answers itself."""

    def __init__(self, body: bytes) -> None:
        self.status = 200
        self.reason = "OK"
        self.headers: CIMultiDict[str] = CIMultiDict(
            {"Content-Type": "application/json"}
        )
        self.content_length: int | None = len(body)
        self._body = body

    def complete_body(self) -> bytes | None:
        return self._body

    async def chunks(self) -> AsyncIterator[bytes]:
        yield self._body

    def close(self) -> None:
        pass


async def _serve(args: argparse.Namespace) -> None:
    from sidecar.app import Sidecar
    from sidecar.coalesce import Coalescer
    from sidecar.manifest import load_manifest
    from sidecar.proxy import Exchange, Next, Reply

    flags = {
        "upstream": args.upstream,
        "listen": f"127.0.0.1:{args.port}",
        "admin_listen": f"127.0.0.1:{args.admin_port}",
    }
    manifest = load_manifest(None, env={}, flags=flags)
    sidecar = Sidecar(manifest, data_dir=args.data_dir)
    await sidecar.start()
    c = manifest.coalescing
    coalescer = Coalescer(
        sidecar.metrics, enabled=args.coalesce == "on",
        follower_timeout_s=c.follower_timeout, max_waiters=c.max_waiters,
        max_keys=c.max_keys, hit_for_miss_s=c.hit_for_miss,
        max_buffer_bytes=manifest.cache.max_entry_bytes,
    )

    async def key_stage(ex: Exchange, nxt: Next) -> Reply:
        # Stands in for the cache lookup: the body's hash is the action key.
        if ex.request.raw_path == STATE_PATH:
            state = {"cpu_s": time.process_time(), "waiters": coalescer.waiters}
            return _Answer(json.dumps(state).encode())
        if ex.request.method == "POST":
            ex.action_key = hashlib.sha256(ex.body or b"").digest()
        return await nxt(ex)

    sidecar.proxy.set_stages([key_stage, coalescer])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print(READY_LINE, flush=True)
    await stop.wait()
    await sidecar.close()


# -- the held upstream (this process) --------------------------------------------


class _Upstream:
    """Counts requests and answers each once ``release`` is set."""

    def __init__(self) -> None:
        self.shape = "json"
        self.received = 0
        self.release = asyncio.Event()
        self._arrived = asyncio.Event()
        self._want = 0

    def reset(self, shape: str) -> None:
        self.shape = shape
        self.received = 0
        self.release = asyncio.Event()

    async def wait_received(self, count: int) -> None:
        while self.received < count:
            self._want = count
            self._arrived.clear()
            await self._arrived.wait()

    def arrived(self) -> None:
        self.received += 1
        if self.received >= self._want:
            self._arrived.set()


class _UpstreamConn(asyncio.Protocol):
    def __init__(self, upstream: _Upstream) -> None:
        self.upstream = upstream
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.health = False
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.health = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"user-agent" and value.startswith(HEALTH_AGENT):
            self.health = True

    def on_message_complete(self) -> None:
        if self.health:
            self._write_json(b"{}")
            return
        self.upstream.arrived()
        # Strong reference: the loop keeps only weak ones to tasks.
        task = asyncio.get_running_loop().create_task(self._answer())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _write_json(self, body: bytes) -> None:
        assert self.transport is not None
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        self.transport.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)

    async def _answer(self) -> None:
        upstream = self.upstream
        await upstream.release.wait()
        if upstream.shape == "json":
            self._write_json(b'{"pad":"' + b"x" * (BODY_BYTES - 10) + b'"}')
            return
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + _chunk(_event(0))
        )
        await asyncio.sleep(SSE_GAP_S)
        rest = b"".join(_chunk(_event(i)) for i in range(1, SSE_EVENTS))
        self.transport.write(rest + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")


def _event(i: int) -> bytes:
    return b'data: {"seq":%d,"pad":"%s"}\n\n' % (i, b"x" * 120)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# -- the client (this process) ------------------------------------------------------


class _Client(asyncio.Protocol):
    """One keep-alive connection; records first-byte and end times per response."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[None] | None = None
        self.first = 0.0
        self.last = 0.0
        self.status = 0
        self.body = bytearray()
        self._now = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, request: bytes) -> asyncio.Future[None]:
        assert self.transport is not None
        self.first = self.last = 0.0
        self.body = bytearray()
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.done

    def data_received(self, data: bytes) -> None:
        self._now = time.monotonic()
        self.parser.feed_data(data)

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if not self.first:
            self.first = self._now
        self.body += body

    def on_message_complete(self) -> None:
        self.last = self._now
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("sidecar closed the connection"))


def _post(body: bytes) -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    ) + body


async def _connect(port: int, count: int) -> list[_Client]:
    loop = asyncio.get_running_loop()
    clients: list[_Client] = []
    for start in range(0, count, CONNECT_BATCH):
        batch = min(CONNECT_BATCH, count - start)
        made = await asyncio.gather(*(
            loop.create_connection(_Client, rig.LOOPBACK, port) for _ in range(batch)
        ))
        clients.extend(protocol for _, protocol in made)
    return clients


async def _state(control: _Client) -> dict[str, Any]:
    request = b"GET %s HTTP/1.1\r\nHost: bench\r\n\r\n" % STATE_PATH.encode()
    await control.send(request)
    doc: dict[str, Any] = json.loads(bytes(control.body))
    return doc


async def _wait_waiters(control: _Client, count: int) -> None:
    while (await _state(control))["waiters"] < count:
        await asyncio.sleep(0.005)


@dataclasses.dataclass
class _Round:
    cpu_s: float
    added_first: list[float]
    added_last: list[float]
    upstream_calls: int


async def _round(
    clients: list[_Client], control: _Client, upstream: _Upstream, *,
    leg: str, shape: str, followers: int, tag: int,
) -> _Round:
    upstream.reset(shape)
    request = _post(json.dumps({"messages": [{"role": "user", "content": f"r{tag}"}],
                                "temperature": 0}).encode())
    leader, rest = clients[0], clients[1 : followers + 1]
    waits = [leader.send(request)]
    await upstream.wait_received(1)
    cpu0 = (await _state(control))["cpu_s"]
    waits += [client.send(request) for client in rest]
    if leg == "on":
        await _wait_waiters(control, followers)
    else:
        await upstream.wait_received(followers + 1)
    upstream.release.set()
    await asyncio.gather(*waits)
    cpu1 = (await _state(control))["cpu_s"]
    if any(c.status != 200 for c in [leader, *rest]):
        raise rig.RigError("a request through the sidecar did not get 200")
    return _Round(
        cpu_s=cpu1 - cpu0,
        added_first=[c.first - leader.first for c in rest],
        added_last=[c.last - leader.last for c in rest],
        upstream_calls=upstream.received,
    )


async def _http(port: int, upstream: _Upstream, *, leg: str, rounds: int,
                tag: list[int]) -> list[dict[str, Any]]:
    records = []
    clients = await _connect(port, max(FOLLOWERS) + 1)
    (control,) = await _connect(port, 1)
    try:
        for shape in SHAPES:
            baseline: list[float] = []
            for _ in range(rounds):
                tag[0] += 1
                one = await asyncio.wait_for(_round(
                    clients, control, upstream, leg=leg, shape=shape,
                    followers=0, tag=tag[0]), ROUND_TIMEOUT_S)
                baseline.append(one.cpu_s)
            for n in FOLLOWERS:
                runs = []
                for _ in range(rounds):
                    tag[0] += 1
                    runs.append(await asyncio.wait_for(_round(
                        clients, control, upstream, leg=leg, shape=shape,
                        followers=n, tag=tag[0]), ROUND_TIMEOUT_S))
                records.append(_summary(leg, shape, n, runs, baseline))
    finally:
        for client in [*clients, control]:
            if client.transport is not None:
                client.transport.close()
    return records


def _summary(leg: str, shape: str, n: int, runs: list[_Round],
             baseline: list[float]) -> dict[str, Any]:
    first = [x for r in runs for x in r.added_first]
    last = [x for r in runs for x in r.added_last]
    cpu = (rig.median([r.cpu_s for r in runs]) - rig.median(baseline)) / n
    calls = sorted({r.upstream_calls for r in runs})
    return {
        "bench": "coalesce", "scenario": "http", "leg": leg, "shape": shape,
        "followers": n, "rounds": len(runs),
        "added_first_p50_s": rig.percentile(first, 50),
        "added_first_p99_s": rig.percentile(first, 99),
        "added_last_p50_s": rig.percentile(last, 50),
        "added_last_p99_s": rig.percentile(last, 99),
        "cpu_per_follower_us": cpu * 1e6,
        "upstream_calls_per_round": calls,
        "ok": calls == ([1] if leg == "on" else [n + 1]),
    }


async def _run_upstream(port: int, upstream: _Upstream) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _UpstreamConn(upstream), rig.LOOPBACK, port)


async def _http_leg(leg: str, plan: rig.CpuPlan, rounds: int, workdir: Path,
                    tag: list[int]) -> list[dict[str, Any]]:
    upstream_port, port, admin_port = rig.free_ports(3)
    upstream = _Upstream()
    server = await _run_upstream(upstream_port, upstream)
    argv = [sys.executable, "-m", "bench.bench_coalesce", "--serve",
            "--coalesce", leg, "--upstream", f"http://127.0.0.1:{upstream_port}",
            "--port", str(port), "--admin-port", str(admin_port),
            "--data-dir", str(workdir / f"data-{leg}")]
    proc = await asyncio.to_thread(
        rig.start_ready, f"sidecar-{leg}", argv,
        log_path=workdir / f"sidecar-{leg}.log", port=port, cpu=plan.proxy_cpu,
        line=READY_LINE,
    )
    try:
        return await _http(port, upstream, leg=leg, rounds=rounds, tag=tag)
    finally:
        rig.stop_process(proc)
        server.close()


# -- the stage alone (this process) ---------------------------------------------


async def _stage_round(n: int, body: bytes) -> float:
    from sidecar.coalesce import Coalescer
    from sidecar.metrics import Metrics
    from sidecar.proxy import Exchange, Reply

    coalescer = Coalescer(
        Metrics(), enabled=True, follower_timeout_s=30.0, max_waiters=100_000,
        max_keys=10_000, hit_for_miss_s=5.0, max_buffer_bytes=1 << 20,
    )
    gate = asyncio.Event()

    async def nxt(ex: Exchange) -> Reply:
        await gate.wait()
        return _Answer(body)

    async def one(ex: Exchange) -> None:
        reply = await coalescer(ex, nxt)
        if reply.complete_body() is None:
            async for _ in reply.chunks():
                pass

    exchanges = []
    for _ in range(n + 1):
        ex = Exchange(None, _STAGE_ROUTE, {}, 0.0)  # type: ignore[arg-type]
        ex.action_key = b"k" * 32
        exchanges.append(ex)
    started = time.process_time()
    tasks = [asyncio.create_task(one(ex)) for ex in exchanges]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(*tasks)
    return time.process_time() - started


class _StageRoute:
    name = "chat"
    coalesce = False


_STAGE_ROUTE: Final = _StageRoute()


async def _stage(rounds: int) -> list[dict[str, Any]]:
    body = b"x" * BODY_BYTES
    base = rig.median([await _stage_round(0, body) for _ in range(rounds)])
    records = []
    for n in FOLLOWERS:
        cost = rig.median([await _stage_round(n, body) for _ in range(rounds)])
        records.append({
            "bench": "coalesce", "scenario": "stage", "followers": n, "rounds": rounds,
            "cpu_per_follower_us": (cost - base) / n * 1e6, "ok": True,
        })
    return records


# -- output and entry point -----------------------------------------------------


HTTP_COLUMNS: Final[Sequence[rig.Column]] = (
    ("leg", "leg", rig.fmt_plain),
    ("shape", "shape", rig.fmt_plain),
    ("followers", "followers", rig.fmt_plain),
    ("first byte +p50", "added_first_p50_s", rig.fmt_latency),
    ("first byte +p99", "added_first_p99_s", rig.fmt_latency),
    ("end +p50", "added_last_p50_s", rig.fmt_latency),
    ("end +p99", "added_last_p99_s", rig.fmt_latency),
    ("CPU/follower", "cpu_per_follower_us", rig.fmt_us),
    ("upstream calls", "upstream_calls_per_round", rig.fmt_plain),
)
STAGE_COLUMNS: Final[Sequence[rig.Column]] = (
    ("followers", "followers", rig.fmt_plain),
    ("CPU/follower", "cpu_per_follower_us", rig.fmt_us),
)


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


async def _measure(args: argparse.Namespace, plan: rig.CpuPlan) -> list[dict[str, Any]]:
    rounds = QUICK_ROUNDS if args.quick else ROUNDS
    records = await _stage(QUICK_ROUNDS if args.quick else STAGE_ROUNDS)
    tag = [0]
    with tempfile.TemporaryDirectory(prefix="bench-coalesce-") as tmp:
        for leg in args.legs.split(","):
            records += await _http_leg(leg, plan, rounds, Path(tmp), tag)
    return records


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m bench.bench_coalesce")
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--legs", default=",".join(LEGS), help="on,off")
    parser.add_argument("--json", type=Path, help="also write the JSON lines here")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--coalesce", default="on", help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--admin-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        uvloop.run(_serve(args))
        return 0
    unknown = set(args.legs.split(",")) - set(LEGS)
    if unknown:
        parser.error(f"unknown leg {sorted(unknown)[0]}; legs: {', '.join(LEGS)}")

    signal.signal(signal.SIGTERM, _raise_exit)
    plan = rig.plan_cpus()
    rig.pin_self(plan.load_cpu)
    load = os.getloadavg()[0]
    records = uvloop.run(_measure(args, plan))

    print(f"\n{plan.describe()}; load average {load:.2f}")
    print("\nthe Coalescer alone (fake upstream, no HTTP): CPU per follower")
    print(rig.format_records([r for r in records if r["scenario"] == "stage"],
                             STAGE_COLUMNS))
    print("\nthrough the sidecar: latency a follower adds over its leader, and CPU;"
          " leg off = coalescing disabled, every request upstream")
    print(rig.format_records([r for r in records if r["scenario"] == "http"],
                             HTTP_COLUMNS))
    print()
    for record in records:
        print(rig.json_line(record))
    if args.json is not None:
        rig.write_json_lines(args.json, records)
        print(f"wrote {len(records)} JSON lines to {args.json}")
    failed = [r for r in records if not r["ok"]]
    for record in failed:
        print(f"FAIL {record['leg']} {record['shape']} {record['followers']}: upstream"
              f" calls per round {record['upstream_calls_per_round']}")
    print(rig.rerun_line("bench.bench_coalesce", argv))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
