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

Not here: process, nginx and wrk plumbing, the common flags, legs and the
report's tail (``bench/rig.py``); the cost of the proxy itself
(``bench/bench_proxy.py``). ``--serve lean|aiohttp`` runs one Python leg in
the foreground; the benchmark starts its legs that way.

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
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from bench import rig, upstream

LEGS: Final = ("lean", "aiohttp", "nginx")
PYTHON_LEGS: Final = ("lean", "aiohttp")
READY_LINE: Final = "bench_server.ready"

Record = rig.Record


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


def _start_leg(
    name: str, plan: rig.CpuPlan, stack: contextlib.ExitStack, workdir: Path
) -> rig.Leg:
    (port,) = rig.free_ports(1)
    if name == "nginx":
        prefix = workdir / "nginx"
        config = rig.nginx_origin_config(prefix, port, upstream.FIXED_BODY.decode())
        proc = rig.start_nginx("nginx", prefix, config, port=port, cpu=plan.proxy_cpu)
    else:
        argv = [rig.python_path(), "-m", "bench.bench_server", "--serve", name]
        proc = rig.start_ready(
            name,
            [*argv, "--port", str(port)],
            log_path=workdir / f"{name}.log",
            cpu=plan.proxy_cpu,
            port=port,
            line=READY_LINE,
        )
    stack.callback(rig.stop_process, proc)
    leg = rig.Leg(name, f"http://{rig.LOOPBACK}:{port}{upstream.JSON_PATH}", proc)
    _check_body(leg)
    return leg


def _check_body(leg: rig.Leg) -> None:
    """The leg must answer the fixed body, or its figures mean nothing."""
    try:
        rig.fetch(leg.url, expect=upstream.FIXED_BODY)
    except rig.RigError as exc:
        raise rig.RigError(leg.failure(str(exc))) from exc


def _measure(
    settings: Settings, plan: rig.CpuPlan, workdir: Path, found: Measurements
) -> None:
    with contextlib.ExitStack() as stack:
        legs: dict[str, rig.Leg] = {}
        for name in settings.legs:
            try:
                legs[name] = _start_leg(name, plan, stack, workdir)
            except rig.RigError as exc:
                _fail(found, name, str(exc))

        def point(name: str, connections: int, warmup: bool) -> None:
            _run_point(settings, plan, found, legs, name, connections, warmup)

        rig.run_interleaved(legs, settings.concurrencies, settings.repeats, point)


def _run_point(
    settings: Settings,
    plan: rig.CpuPlan,
    found: Measurements,
    legs: dict[str, rig.Leg],
    name: str,
    connections: int,
    warmup: bool,
) -> None:
    """One wrk run; a leg whose run fails is dropped from ``legs``."""
    duration_s = settings.warmup_s if warmup else settings.duration_s
    result = rig.run_point(
        legs,
        name,
        "",
        connections,
        duration_s=duration_s,
        cpu=plan.load_cpu,
        fail=lambda leg, reason: _fail(found, leg, reason),
    )
    if result is None or warmup:
        return
    found.runs.setdefault((name, connections), []).append(result)
    rig.progress(rig.wrk_line(name, connections, result))


def _fail(found: Measurements, leg: str, reason: str) -> None:
    found.failures[leg] = reason
    rig.progress(f"FAILED {leg}: {reason}")


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
                    **rig.wrk_medians(runs),
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
        rig.add_ratios(group, ("requests_per_s", "p50_us"), ("nginx", "aiohttp"))
        records += group
    return records


COLUMNS: Final[Sequence[rig.Column]] = (
    *rig.wrk_columns(),
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
        rig.failure_record("server", leg, reason)
        for leg, reason in found.failures.items()
    ]
    setup = {
        "bench": "server",
        "kind": "setup",
        "legs": list(settings.legs),
        "concurrencies": list(settings.concurrencies),
        **rig.run_fields(plan, settings.duration_s, settings.repeats),
    }
    return rig.finish_report(
        "server", [setup, *records], failures, (), json_path=json_path, argv=argv
    )


# -- command line -----------------------------------------------------------


def _parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_server",
        description="The data port's HTTP server next to aiohttp and nginx.",
    )
    parser.add_argument("--quick", action="store_true", help="short runs, one repeat")
    parser.add_argument("--only", default=",".join(LEGS), help="legs, e.g. lean,nginx")
    parser.add_argument("--concurrency", default="1,64", help="wrk connections")
    rig.add_length_args(parser)
    rig.add_layout_args(parser, one_core_help="run the server on the load CPU too")
    # One Python leg in the foreground (how the benchmark starts its legs).
    parser.add_argument("--serve", choices=PYTHON_LEGS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve and not args.port:
        parser.error("--serve needs --port")
    duration_s, repeats = rig.run_length(args)
    settings = Settings(
        legs=rig.legs_arg(parser, args.only, LEGS),
        concurrencies=rig.concurrencies_arg(parser, args.concurrency, "1,64"),
        duration_s=duration_s,
        warmup_s=rig.WARMUP_S,
        repeats=repeats,
        one_core=args.one_core,
    )
    return args, settings


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, settings = _parse_args(argv)
    if args.serve:
        return _serve(args.serve, args.port)
    plan = rig.begin_run(one_core=settings.one_core)
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
