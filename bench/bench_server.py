"""The data port's HTTP server alone: sidecar.http next to aiohttp and nginx.

Run as ``python -m bench.bench_server [--quick] [--only lean,aiohttp,nginx]``.
Every leg answers ``GET`` with the same small fixed JSON body, from memory,
on one CPU:

- ``lean``: ``sidecar.http.HTTPServer`` on uvloop with a handler returning a
  ``Response`` (what the data port runs);
- ``aiohttp``: aiohttp's low-level ``web.Server`` on uvloop, same handler
  (what the data port ran before);
- ``nginx``: one worker, ``return 200`` with the body (the yardstick).

``wrk --latency`` measures requests per second and p50/p99 latency at each
concurrency (1 and 64 by default), the median over repeats, with the runs of
every leg interleaved so drift on a shared machine hits all legs alike. It
prints a table, one JSON line per measurement (also to ``--json FILE``) and
a ``rerun with:`` line; the exit status is 1 when a leg failed.

Not here: process, nginx and wrk plumbing (``bench/rig.py``); the cost of
the proxy itself (``bench/bench_proxy.py``). ``--serve lean|aiohttp`` runs
one Python leg in the foreground; the benchmark starts its legs that way.

Invariants: the server under test runs on one CPU, wrk on the other (see
``rig.plan_cpus``); every process started here is stopped by PID before
exit, also on SIGTERM; a leg that fails to start or dies midway is reported
and the others go on.

Known limitations: the machine is shared, so figures move with its load
(the load average is recorded); the handler does no work, so the figures
bound what the server itself costs per request, not what the proxy costs.
wrk does not correct for coordinated omission.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final

from bench import rig, upstream

LEGS: Final = ("lean", "aiohttp", "nginx")
PYTHON_LEGS: Final = ("lean", "aiohttp")
READY_LINE: Final = "bench_server.ready"
WARMUP_CONNECTIONS: Final = 16

Record = dict[str, Any]


@dataclass(frozen=True)
class Settings:
    legs: tuple[str, ...]
    concurrencies: tuple[int, ...]
    duration_s: float
    warmup_s: float
    repeats: int
    one_core: bool


@dataclass
class Measurements:
    """Raw results of one invocation; written by the main thread only."""

    runs: dict[tuple[str, int], list[rig.WrkResult]] = field(default_factory=dict)
    # leg -> why it stopped being measured
    failures: dict[str, str] = field(default_factory=dict)


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- the Python servers (``--serve``) ---------------------------------------


async def _serve_lean(port: int) -> None:
    from sidecar.http import HTTPServer, Request, Response, StreamResponse

    async def handler(request: Request) -> StreamResponse:
        return Response(body=upstream.FIXED_BODY, content_type="application/json")

    server = HTTPServer(handler, max_header_bytes=64 * 1024)
    await server.start(rig.LOOPBACK, port)
    print(READY_LINE, flush=True)
    await asyncio.Event().wait()


async def _serve_aiohttp(port: int) -> None:
    from aiohttp import web

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(body=upstream.FIXED_BODY, content_type="application/json")

    runner = web.ServerRunner(web.Server(handler, handler_cancellation=True))
    await runner.setup()
    await web.TCPSite(runner, rig.LOOPBACK, port).start()
    print(READY_LINE, flush=True)
    await asyncio.Event().wait()


def _serve(kind: str, port: int) -> int:
    import uvloop

    serve = _serve_lean if kind == "lean" else _serve_aiohttp
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(port))
    return 0


# -- legs -------------------------------------------------------------------


@dataclass(frozen=True)
class Leg:
    """A started leg: where to send requests and the process behind it."""

    name: str
    url: str
    proc: rig.Proc

    def failure(self, what: str) -> str:
        """``what`` went wrong, then the end of this leg's log."""
        return f"{what}\nlog {self.proc.log_path}:\n{self.proc.log_tail()}"


def _start_leg(
    name: str, plan: rig.CpuPlan, stack: contextlib.ExitStack, workdir: Path
) -> Leg:
    (port,) = rig.free_ports(1)
    if name == "nginx":
        prefix = workdir / "nginx"
        config = rig.nginx_origin_config(prefix, port, upstream.FIXED_BODY.decode())
        proc = rig.start_nginx("nginx", prefix, config, port=port, cpu=plan.proxy_cpu)
    else:
        python = rig.REPO / ".venv" / "bin" / "python"
        interpreter = str(python) if python.exists() else sys.executable
        argv = [interpreter, "-m", "bench.bench_server", "--serve", name]
        proc = rig.start_ready(
            name,
            [*argv, "--port", str(port)],
            log_path=workdir / f"{name}.log",
            cpu=plan.proxy_cpu,
            port=port,
            line=READY_LINE,
        )
    stack.callback(rig.stop_process, proc)
    leg = Leg(name, f"http://{rig.LOOPBACK}:{port}{upstream.JSON_PATH}", proc)
    _check_body(leg)
    return leg


def _check_body(leg: Leg) -> None:
    """The leg must answer the fixed body, or its figures mean nothing."""
    try:
        with urllib.request.urlopen(leg.url, timeout=5) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except OSError as exc:
        raise rig.RigError(leg.failure(f"GET {leg.url} failed: {exc}")) from exc
    if status != 200 or body != upstream.FIXED_BODY:
        raise rig.RigError(
            leg.failure(f"GET {leg.url} answered {status} {body[:200]!r}")
        )


def _measure(
    settings: Settings, plan: rig.CpuPlan, workdir: Path, found: Measurements
) -> None:
    with contextlib.ExitStack() as stack:
        legs: dict[str, Leg] = {}
        for name in settings.legs:
            try:
                legs[name] = _start_leg(name, plan, stack, workdir)
            except rig.RigError as exc:
                _fail(found, name, str(exc))
        for name in list(legs):
            _run_point(
                settings, plan, found, legs, name, WARMUP_CONNECTIONS, warmup=True
            )
        # Repeats outermost, legs innermost: drift on a shared machine then
        # lands on every leg alike instead of on whichever ran last.
        for repeat in range(settings.repeats):
            for connections in settings.concurrencies:
                for name in list(legs):
                    _run_point(settings, plan, found, legs, name, connections)
            _progress(f"repeat {repeat + 1}/{settings.repeats} done")


def _run_point(
    settings: Settings,
    plan: rig.CpuPlan,
    found: Measurements,
    legs: dict[str, Leg],
    name: str,
    connections: int,
    *,
    warmup: bool = False,
) -> None:
    """One wrk run; a leg whose run fails is dropped from ``legs``."""
    try:
        result = rig.run_wrk(
            legs[name].url,
            connections=connections,
            duration_s=settings.warmup_s if warmup else settings.duration_s,
            cpu=plan.load_cpu,
        )
    except rig.RigError as exc:
        _fail(found, name, legs.pop(name).failure(str(exc)))
        return
    if warmup:
        return
    found.runs.setdefault((name, connections), []).append(result)
    _progress(
        f"{name:8} c={connections:<3} {rig.fmt_rate(result.requests_per_s):>9} req/s"
        f"  p50 {rig.fmt_latency(result.p50_s)}  p99 {rig.fmt_latency(result.p99_s)}"
        + (f"  errors {result.errors}" if result.errors else "")
    )


def _fail(found: Measurements, leg: str, reason: str) -> None:
    found.failures[leg] = reason
    _progress(f"FAILED {leg}: {reason}")


# -- records and the report -------------------------------------------------


def _records(settings: Settings, found: Measurements) -> list[Record]:
    """One record per leg and concurrency: medians over the repeats."""
    records: list[Record] = []
    for connections in settings.concurrencies:
        group: list[Record] = []
        for leg in settings.legs:
            runs = found.runs.get((leg, connections))
            if not runs:
                continue
            group.append(
                {
                    "bench": "server",
                    "kind": "http",
                    "leg": leg,
                    "concurrency": connections,
                    "requests_per_s": rig.median([r.requests_per_s for r in runs]),
                    "p50_us": rig.median([r.p50_s * 1e6 for r in runs]),
                    "p99_us": rig.median([r.p99_s * 1e6 for r in runs]),
                    "errors": sum(r.errors for r in runs),
                    "runs": [
                        {
                            "requests_per_s": r.requests_per_s,
                            "p50_us": r.p50_s * 1e6,
                            "p99_us": r.p99_s * 1e6,
                            "errors": r.errors,
                        }
                        for r in runs
                    ],
                }
            )
        for base in ("nginx", "aiohttp"):
            other = next((r for r in group if r["leg"] == base), None)
            for record in group:
                for name in ("requests_per_s", "p50_us"):
                    value = other[name] if other else None
                    record[f"{name}_vs_{base}"] = rig.ratio(record[name], value)
        records += group
    return records


COLUMNS: Final[Sequence[rig.Column]] = (
    ("leg", "leg", rig.fmt_plain),
    ("conns", "concurrency", rig.fmt_plain),
    ("req/s", "requests_per_s", rig.fmt_rate),
    ("p50", "p50_us", rig.fmt_us),
    ("p99", "p99_us", rig.fmt_us),
    ("errors", "errors", rig.fmt_plain),
    ("req/s vs nginx", "requests_per_s_vs_nginx", rig.fmt_ratio),
    ("req/s vs aiohttp", "requests_per_s_vs_aiohttp", rig.fmt_ratio),
    ("p50 vs nginx", "p50_us_vs_nginx", rig.fmt_ratio),
)


def _print_report(
    settings: Settings,
    plan: rig.CpuPlan,
    found: Measurements,
    json_path: Path | None,
    argv: Sequence[str],
) -> int:
    records = _records(settings, found)
    print(f"\n{plan.describe()}")
    print(
        f"\nGET {upstream.JSON_PATH} -> {len(upstream.FIXED_BODY)}-byte JSON, wrk,"
        f" median of {settings.repeats} run(s) of {settings.duration_s:g} s"
    )
    print(rig.format_records(records, COLUMNS))
    failures = [
        {"bench": "server", "kind": "failure", "leg": leg, "reason": reason}
        for leg, reason in found.failures.items()
    ]
    if failures:
        print("\nfailed legs")
        for failure in failures:
            print(f"  {failure['leg']}: {str(failure['reason']).splitlines()[0]}")
    setup = {
        "bench": "server",
        "kind": "setup",
        "legs": list(settings.legs),
        "concurrencies": list(settings.concurrencies),
        "duration_s": settings.duration_s,
        "repeats": settings.repeats,
        "proxy_cpu": plan.proxy_cpu,
        "load_cpu": plan.load_cpu,
        "loadavg": list(os.getloadavg()),
    }
    everything = [setup, *records, *failures]
    print()
    for record in everything:
        print(rig.json_line(record))
    if json_path is not None:
        rig.write_json_lines(json_path, everything)
        print(f"wrote {len(everything)} JSON lines to {json_path}")
    print(rig.rerun_line("bench.bench_server", argv))
    return 1 if failures else 0


# -- command line -----------------------------------------------------------


def _parse_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_server",
        description="The data port's HTTP server next to aiohttp and nginx.",
    )
    parser.add_argument("--quick", action="store_true", help="short runs, one repeat")
    parser.add_argument("--only", default=",".join(LEGS), help="legs, e.g. lean,nginx")
    parser.add_argument("--concurrency", default="1,64", help="wrk connections")
    parser.add_argument("--duration-s", type=float, help="seconds per wrk run (5)")
    parser.add_argument("--repeats", type=int, help="runs per point, median kept (3)")
    parser.add_argument(
        "--one-core", action="store_true", help="run the server on the load CPU too"
    )
    parser.add_argument("--json", type=Path, help="also write the JSON lines here")
    # One Python leg in the foreground (how the benchmark starts its legs).
    parser.add_argument("--serve", choices=PYTHON_LEGS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve and not args.port:
        parser.error("--serve needs --port")
    legs = _parse_list(args.only)
    if not legs or set(legs) - set(LEGS):
        parser.error(f"--only takes {','.join(LEGS)}; got {args.only!r}")
    try:
        concurrencies = tuple(int(c) for c in _parse_list(args.concurrency))
    except ValueError:
        parser.error(
            f"--concurrency takes numbers such as 1,64; got {args.concurrency!r}"
        )
    if not concurrencies or min(concurrencies) < 1:
        parser.error("--concurrency needs at least one number >= 1")
    settings = Settings(
        legs=tuple(leg for leg in LEGS if leg in legs),
        concurrencies=concurrencies,
        duration_s=args.duration_s or (2.0 if args.quick else 5.0),
        warmup_s=1.0,
        repeats=max(1, args.repeats or (1 if args.quick else 3)),
        one_core=args.one_core,
    )
    return args, settings


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    # SIGTERM (from run_all's budget) unwinds the ExitStack, which stops
    # every process this run started.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, settings = _parse_args(argv)
    if args.serve:
        return _serve(args.serve, args.port)
    signal.signal(signal.SIGTERM, _raise_exit)
    plan = rig.plan_cpus(one_core=settings.one_core)
    rig.pin_self(plan.load_cpu)
    _progress(plan.describe())
    found = Measurements()
    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        try:
            _measure(settings, plan, Path(tmp), found)
        except rig.RigError as exc:
            _fail(found, "all", str(exc))
        except SystemExit:
            _fail(found, "all", "stopped by a signal before the end")
            _print_report(settings, plan, found, args.json, argv)
            raise
    return _print_report(settings, plan, found, args.json, argv)


if __name__ == "__main__":
    raise SystemExit(main())
