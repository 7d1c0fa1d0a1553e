"""Pass-through cost of the sidecar, next to a direct connection and nginx.

Run as ``python -m bench.bench_proxy [--quick] [--only direct,nginx,sidecar]``.
One run measures three legs against the same cheap upstream:

- ``direct``: the client talks to the upstream itself (the limit);
- ``nginx``: nginx as a reverse proxy with upstream keep-alive, one worker;
- ``sidecar``: ``python -m sidecar serve`` (or ``--sidecar-cmd``).

Two scenarios. HTTP load: ``wrk --latency`` against ``GET /bench/json`` at
each concurrency (1, 16, 64), answered by an nginx origin returning a fixed
JSON body; requests per second and p50/p99 latency, the median over repeats,
with the runs of every leg interleaved so drift on a shared machine hits all
legs alike. SSE: a Python client reads streams from ``bench/upstream.py``
through each leg (nginx with ``proxy_buffering off``) and records, per event,
arrival time minus the send time the event carries.

It prints tables, one JSON line per measurement (also written to ``--json
FILE``), PASS/FAIL lines for the sidecar's targets and a ``rerun with:`` line.
The exit status is 1 when a leg failed or a target failed, so ``run_all``
reports it. Not here: process, nginx and wrk plumbing, the common flags,
legs, targets and the report's tail (``bench/rig.py``), the upstream
(``bench/upstream.py``).

Invariants: the proxy under test runs on one CPU, the upstream, wrk and the
SSE client on the other (see ``rig.plan_cpus``); every process started here
is stopped by PID before exit, also on SIGTERM; a leg that fails to start or
dies midway is reported and the other legs go on.

Known limitations: the machine is shared, so figures move with its load (the
load average is recorded). The sidecar runs with the log level the
environment gives it; its access log costs throughput, so compare runs with
the same ``SIDECAR_LOG_LEVEL``. On a VM, a request that crosses to the
proxy's idle CPU waits for that CPU to wake, which at concurrency 1 can cost
more than nginx's own work and flatters the added-latency ratio;
``--one-core`` puts everything on one CPU to measure without it (throughput
is then shared with wrk). wrk measures latency per request on open
connections and does not correct for coordinated omission.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import aiohttp
import uvloop

from bench import rig, upstream

LEGS: Final = ("direct", "nginx", "sidecar")
# About the size of one OpenAI-style streamed chat chunk.
SSE_PAD_BYTES: Final = 160

# The sidecar's targets, relative to nginx.
MAX_ADDED_LATENCY_VS_NGINX: Final = 2.5
MIN_THROUGHPUT_VS_NGINX: Final = 0.10
THROUGHPUT_CONCURRENCY: Final = 64


@dataclass(frozen=True)
class Settings:
    legs: tuple[str, ...]
    concurrencies: tuple[int, ...]
    duration_s: float
    warmup_s: float
    repeats: int
    sse_events: int
    sse_interval_ms: int
    sse_streams: int
    sidecar_cmd: str
    one_core: bool


@dataclass
class Measurements:
    """Raw results of one invocation; written by the main thread only."""

    http: dict[tuple[str, int], list[rig.WrkResult]] = field(default_factory=dict)
    # leg -> one list of per-event delays (seconds) per round
    sse: dict[str, list[list[float]]] = field(default_factory=dict)
    # (leg, scenario) -> why that leg stopped being measured
    failures: dict[tuple[str, str], str] = field(default_factory=dict)


# -- legs -------------------------------------------------------------------


def _start_leg(
    name: str,
    upstream_port: int,
    *,
    settings: Settings,
    plan: rig.CpuPlan,
    stack: contextlib.ExitStack,
    workdir: Path,
    scenario: str,
) -> tuple[str, rig.Proc | None]:
    """Start leg ``name`` in front of ``upstream_port``: its base URL, process."""
    if name == "direct":
        return f"http://{rig.LOOPBACK}:{upstream_port}", None
    if name == "nginx":
        (port,) = rig.free_ports(1)
        config = rig.nginx_proxy_config(
            workdir / f"nginx-{scenario}",
            port,
            upstream_port,
            buffering=scenario != "sse",
        )
        proc = rig.start_nginx(
            "nginx",
            workdir / f"nginx-{scenario}",
            config,
            port=port,
            cpu=plan.proxy_cpu,
        )
        stack.callback(rig.stop_process, proc)
        return f"http://{rig.LOOPBACK}:{port}", proc
    return rig.start_sidecar(
        settings.sidecar_cmd,
        upstream_port,
        workdir / f"sidecar-{scenario}",
        cpu=plan.proxy_cpu,
        stack=stack,
    )


def _check_json(url: str) -> str | None:
    """A request through a leg must return the origin's body unchanged.

    Returns the ``X-Sidecar-Cache`` header of a second request, which tells
    whether the sidecar passed it through or answered from a cache.
    """
    cache = None
    for _ in range(2):
        _, headers, _ = rig.fetch(url, expect=upstream.FIXED_BODY)
        cache = headers.get("x-sidecar-cache")
    return cache


def _start_legs(
    settings: Settings,
    plan: rig.CpuPlan,
    stack: contextlib.ExitStack,
    workdir: Path,
    *,
    upstream_port: int,
    scenario: str,
    found: Measurements,
) -> dict[str, rig.Leg]:
    """Every leg that starts (and, for HTTP, answers correctly), by name."""
    legs = {}
    for name in settings.legs:
        try:
            url, proc = _start_leg(
                name,
                upstream_port,
                settings=settings,
                plan=plan,
                stack=stack,
                workdir=workdir,
                scenario=scenario,
            )
        except rig.RigError as exc:
            _fail(found, name, scenario, str(exc))
            continue
        leg = rig.Leg(name, url, proc)
        try:
            if scenario == "http":
                cache = _check_json(url + upstream.JSON_PATH)
                if cache is not None:
                    rig.progress(f"{name}: X-Sidecar-Cache: {cache} on a repeated GET")
        except rig.RigError as exc:
            _fail(found, name, scenario, leg.failure(str(exc)))
            continue
        legs[name] = leg
    return legs


def _fail(found: Measurements, leg: str, scenario: str, reason: str) -> None:
    found.failures[(leg, scenario)] = reason
    rig.progress(f"FAILED {leg} ({scenario}): {reason}")


# -- HTTP load ------------------------------------------------------------


def _start_json_origin(
    plan: rig.CpuPlan, stack: contextlib.ExitStack, workdir: Path
) -> int:
    """The fixed-body origin on the load CPU: nginx, or upstream.py without it."""
    (port,) = rig.free_ports(1)
    if Path(rig.NGINX).exists():
        prefix = workdir / "origin"
        config = rig.nginx_origin_config(prefix, port, upstream.FIXED_BODY.decode())
        proc = rig.start_nginx(
            "nginx origin", prefix, config, port=port, cpu=plan.load_cpu
        )
    else:
        rig.progress("nginx missing: the HTTP origin is bench/upstream.py (slower)")
        proc = _start_python_upstream(port, plan, workdir)
    stack.callback(rig.stop_process, proc)
    return port


def _start_python_upstream(port: int, plan: rig.CpuPlan, workdir: Path) -> rig.Proc:
    argv = [sys.executable, "-m", "bench.upstream", "--port", str(port)]
    log_path = workdir / f"upstream-{port}.log"
    return rig.start_ready(
        "upstream", argv, log_path=log_path, cpu=plan.load_cpu, port=port
    )


def _measure_http(
    settings: Settings, plan: rig.CpuPlan, workdir: Path, found: Measurements
) -> None:
    with contextlib.ExitStack() as stack:
        origin_port = _start_json_origin(plan, stack, workdir)
        legs = _start_legs(
            settings,
            plan,
            stack,
            workdir,
            upstream_port=origin_port,
            scenario="http",
            found=found,
        )

        def point(name: str, connections: int, warmup: bool) -> None:
            _run_point(settings, plan, found, legs, name, connections, warmup)

        rig.run_interleaved(
            legs, settings.concurrencies, settings.repeats, point, label="http: "
        )


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
    result = rig.run_point(
        legs,
        name,
        upstream.JSON_PATH,
        connections,
        duration_s=settings.warmup_s if warmup else settings.duration_s,
        cpu=plan.load_cpu,
        fail=lambda leg, reason: _fail(found, leg, "http", reason),
    )
    if result is None or warmup:
        return
    found.http.setdefault((name, connections), []).append(result)
    rig.progress("http: " + rig.wrk_line(name, connections, result))


# -- SSE delay --------------------------------------------------------------


async def _read_stream(
    session: aiohttp.ClientSession, url: str, expected: int
) -> list[float]:
    """Per-event delays in seconds (arrival minus send) of one stream."""
    delays = []
    async with session.get(url) as response:
        if response.status != 200:
            raise rig.RigError(f"GET {url} answered {response.status}")
        async for line in response.content:
            arrived_ns = time.monotonic_ns()
            sent_ns = upstream.sent_ns_of(line)
            if sent_ns is not None:
                delays.append((arrived_ns - sent_ns) / 1e9)
    if len(delays) != expected:
        raise rig.RigError(f"stream delivered {len(delays)} of {expected} events")
    return delays


async def _sse_round(url: str, settings: Settings) -> list[float]:
    """Read ``sse_streams`` streams at once; every event's delay, pooled."""
    budget_s = settings.sse_events * settings.sse_interval_ms / 1000 + 30
    timeout = aiohttp.ClientTimeout(total=budget_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        streams = [
            _read_stream(session, url, settings.sse_events)
            for _ in range(settings.sse_streams)
        ]
        results = await asyncio.gather(*streams)
    return [delay for delays in results for delay in delays]


def _measure_sse(
    settings: Settings, plan: rig.CpuPlan, workdir: Path, found: Measurements
) -> None:
    with contextlib.ExitStack() as stack:
        (port,) = rig.free_ports(1)
        stack.callback(rig.stop_process, _start_python_upstream(port, plan, workdir))
        legs = _start_legs(
            settings,
            plan,
            stack,
            workdir,
            upstream_port=port,
            scenario="sse",
            found=found,
        )
        for repeat in range(settings.repeats):
            for name in list(legs):
                _run_sse_round(settings, found, legs, name)
            rig.progress(f"sse: round {repeat + 1}/{settings.repeats} done")


def _run_sse_round(
    settings: Settings, found: Measurements, legs: dict[str, rig.Leg], name: str
) -> None:
    """One round of streams; a leg whose round fails is dropped from ``legs``."""
    path = upstream.sse_query(
        settings.sse_events, settings.sse_interval_ms, SSE_PAD_BYTES
    )
    try:
        delays = uvloop.run(_sse_round(legs[name].url + path, settings))
    except (rig.RigError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
        what = f"{type(exc).__name__}: {exc}"
        _fail(found, name, "sse", legs.pop(name).failure(what))
        return
    found.sse.setdefault(name, []).append(delays)
    rig.progress(
        f"sse: {name:8} p50 {rig.fmt_latency(rig.percentile(delays, 50))}"
        f"  p99 {rig.fmt_latency(rig.percentile(delays, 99))}"
    )


# -- records ------------------------------------------------------------------
# Every figure is a JSON-ready record; the tables and the targets read them.

Record = rig.Record
BASE_LEGS: Final = ("direct", "nginx")


def _us(seconds: float) -> float:
    return seconds * 1e6


def _http_records(settings: Settings, found: Measurements) -> list[Record]:
    """One record per leg and concurrency: medians over the repeats."""
    records = []
    for connections in settings.concurrencies:
        for leg in settings.legs:
            runs = found.http.get((leg, connections))
            if not runs:
                continue
            records.append(
                {
                    "bench": "proxy",
                    "kind": "http",
                    "leg": leg,
                    "concurrency": connections,
                    **rig.wrk_medians(runs),
                    "runs": [_run_record(r) for r in runs],
                }
            )
        rig.add_ratios(
            records, ("requests_per_s", "p50_us"), BASE_LEGS, concurrency=connections
        )
    return records


def _run_record(run: rig.WrkResult) -> Record:
    return {
        "requests_per_s": run.requests_per_s,
        "p50_us": _us(run.p50_s),
        "p99_us": _us(run.p99_s),
        "requests": run.requests,
        "errors": run.errors,
    }


def _added_records(http: list[Record]) -> list[Record]:
    """Latency each proxy adds at concurrency 1: its p50 minus direct's."""
    direct = rig.find(http, leg="direct", concurrency=1)
    if direct is None:
        return []
    records = [
        {
            "bench": "proxy",
            "kind": "added_latency",
            "leg": r["leg"],
            "concurrency": 1,
            "p50_us": r["p50_us"],
            "added_p50_us": r["p50_us"] - direct["p50_us"],
            "p50_us_vs_direct": r["p50_us_vs_direct"],
        }
        for r in http
        if r["concurrency"] == 1 and r["leg"] != "direct"
    ]
    rig.add_ratios(records, ("added_p50_us",), ("nginx",))
    return records


def _sse_records(settings: Settings, found: Measurements) -> list[Record]:
    """Per-event delay of each leg: the median over rounds of p50 and p99."""
    records = []
    for leg in settings.legs:
        rounds = found.sse.get(leg)
        if not rounds:
            continue
        p50s = [_us(rig.percentile(delays, 50)) for delays in rounds]
        p99s = [_us(rig.percentile(delays, 99)) for delays in rounds]
        records.append(
            {
                "bench": "proxy",
                "kind": "sse_delay",
                "leg": leg,
                "events": sum(len(delays) for delays in rounds),
                "streams": settings.sse_streams,
                "interval_ms": settings.sse_interval_ms,
                "p50_us": rig.median(p50s),
                "p99_us": rig.median(p99s),
                "rounds": [{"p50_us": a, "p99_us": b} for a, b in zip(p50s, p99s, strict=True)],
            }
        )
    direct = rig.find(records, leg="direct")
    for record in records:
        for q in ("p50", "p99"):
            base = direct[f"{q}_us"] if direct else None
            record[f"added_{q}_us"] = None if base is None else record[f"{q}_us"] - base
    rig.add_ratios(records, ("p50_us", "p99_us"), BASE_LEGS)
    return records


def _setup_record(settings: Settings, plan: rig.CpuPlan) -> Record:
    return {
        "bench": "proxy",
        "kind": "setup",
        "legs": list(settings.legs),
        "concurrencies": list(settings.concurrencies),
        **rig.run_fields(plan, settings.duration_s, settings.repeats),
        **rig.sidecar_fields(settings.sidecar_cmd),
    }


# -- tables ---------------------------------------------------------------------

HTTP_COLUMNS: Final[Sequence[rig.Column]] = (
    *rig.wrk_columns(),
    ("errors", "errors", rig.fmt_plain),
    ("req/s vs direct", "requests_per_s_vs_direct", rig.fmt_ratio),
    ("req/s vs nginx", "requests_per_s_vs_nginx", rig.fmt_ratio),
    ("p50 vs direct", "p50_us_vs_direct", rig.fmt_ratio),
    ("p50 vs nginx", "p50_us_vs_nginx", rig.fmt_ratio),
)
ADDED_COLUMNS: Final[Sequence[rig.Column]] = (
    ("leg", "leg", rig.fmt_plain),
    ("p50", "p50_us", rig.fmt_us),
    ("added p50", "added_p50_us", rig.fmt_us),
    ("p50 vs direct", "p50_us_vs_direct", rig.fmt_ratio),
    ("added vs nginx", "added_p50_us_vs_nginx", rig.fmt_ratio),
)
SSE_COLUMNS: Final[Sequence[rig.Column]] = (
    ("leg", "leg", rig.fmt_plain),
    ("events", "events", rig.fmt_plain),
    ("p50", "p50_us", rig.fmt_us),
    ("p99", "p99_us", rig.fmt_us),
    ("added p50", "added_p50_us", rig.fmt_us),
    ("added p99", "added_p99_us", rig.fmt_us),
    ("p50 vs direct", "p50_us_vs_direct", rig.fmt_ratio),
    ("p99 vs direct", "p99_us_vs_direct", rig.fmt_ratio),
    ("p50 vs nginx", "p50_us_vs_nginx", rig.fmt_ratio),
    ("p99 vs nginx", "p99_us_vs_nginx", rig.fmt_ratio),
)


# -- targets ------------------------------------------------------------------


def _blocked(
    settings: Settings,
    found: Measurements,
    target: str,
    scenario: str,
    legs: Sequence[str],
) -> rig.Verdict | None:
    """Why ``target`` cannot be judged from ``legs`` in ``scenario``, if so.

    A failed sidecar leg fails the target; a failed reference leg only
    leaves it unjudged (the failure itself still fails the run).
    """
    absent = [leg for leg in legs if leg not in settings.legs]
    if absent:
        return rig.Verdict(
            target,
            "SKIP",
            f"needs the {' and '.join(absent)} leg{'s' * (len(absent) > 1)} (--only)",
        )
    for leg in (*legs, "all"):
        reason = found.failures.get((leg, scenario))
        if reason is not None:
            result: rig.Result = "FAIL" if leg in ("sidecar", "all") else "SKIP"
            who = f"the {scenario} run" if leg == "all" else f"the {leg} leg"
            why = f"{who} failed: {reason.splitlines()[0]}"
            return rig.Verdict(target, result, why)
    return None


def _target_added_latency(
    settings: Settings, found: Measurements, added: list[Record], http: list[Record]
) -> rig.Verdict:
    name = "added_latency_c1"
    blocked = _blocked(settings, found, name, "http", ("direct", "nginx", "sidecar"))
    if blocked is not None:
        return blocked
    sidecar, nginx = rig.find(added, leg="sidecar"), rig.find(added, leg="nginx")
    if sidecar is None or nginx is None:
        return rig.Verdict(name, "SKIP", "needs concurrency 1 (--concurrency)")
    nginx_us, sidecar_us = nginx["added_p50_us"], sidecar["added_p50_us"]
    if nginx_us <= 0:
        return rig.Verdict(name, "SKIP", "nginx added no measurable latency; rerun")
    limit_us = MAX_ADDED_LATENCY_VS_NGINX * nginx_us
    errors = (rig.find(http, leg="sidecar", concurrency=1) or {}).get("errors", 0)
    detail = (
        f"sidecar adds {rig.fmt_us(sidecar_us)} at c=1; limit "
        f"{MAX_ADDED_LATENCY_VS_NGINX}x nginx's {rig.fmt_us(nginx_us)} = "
        f"{rig.fmt_us(limit_us)}" + (f"; {errors} errors" if errors else "")
    )
    return rig.verdict(name, sidecar_us <= limit_us and not errors, detail)


def _target_throughput(
    settings: Settings, found: Measurements, http: list[Record]
) -> rig.Verdict:
    name = f"throughput_c{THROUGHPUT_CONCURRENCY}"
    blocked = _blocked(settings, found, name, "http", ("nginx", "sidecar"))
    if blocked is not None:
        return blocked
    sidecar = rig.find(http, leg="sidecar", concurrency=THROUGHPUT_CONCURRENCY)
    nginx = rig.find(http, leg="nginx", concurrency=THROUGHPUT_CONCURRENCY)
    if sidecar is None or nginx is None:
        return rig.Verdict(name, "SKIP", f"needs concurrency {THROUGHPUT_CONCURRENCY}")
    limit = MIN_THROUGHPUT_VS_NGINX * nginx["requests_per_s"]
    detail = (
        f"sidecar {rig.fmt_rate(sidecar['requests_per_s'])} req/s at "
        f"c={THROUGHPUT_CONCURRENCY}; at least {MIN_THROUGHPUT_VS_NGINX:.0%} of "
        f"nginx's {rig.fmt_rate(nginx['requests_per_s'])} = {rig.fmt_rate(limit)}"
        + (f"; {sidecar['errors']} errors" if sidecar["errors"] else "")
    )
    passed = sidecar["requests_per_s"] >= limit and not sidecar["errors"]
    return rig.verdict(name, passed, detail)


def _target_sse(
    settings: Settings, found: Measurements, sse: list[Record]
) -> rig.Verdict:
    name = "sse_delay_p99"
    blocked = _blocked(settings, found, name, "sse", ("nginx", "sidecar"))
    if blocked is not None:
        return blocked
    sidecar, nginx = rig.find(sse, leg="sidecar"), rig.find(sse, leg="nginx")
    if sidecar is None or nginx is None:
        return rig.Verdict(name, "SKIP", "no SSE rounds were measured")
    detail = (
        f"sidecar per-event delay p99 {rig.fmt_us(sidecar['p99_us'])}; at most "
        f"nginx's with proxy_buffering off, {rig.fmt_us(nginx['p99_us'])}"
    )
    return rig.verdict(name, sidecar["p99_us"] <= nginx["p99_us"], detail)


# -- command line -------------------------------------------------------------


def _parse_args(argv: Sequence[str]) -> tuple[Settings, Path | None]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_proxy",
        description="Pass-through cost of the sidecar next to direct and nginx.",
    )
    parser.add_argument("--quick", action="store_true", help="short runs, one repeat")
    parser.add_argument(
        "--only", default=",".join(LEGS), help="legs, e.g. direct,nginx"
    )
    parser.add_argument("--concurrency", default="1,16,64", help="wrk connections")
    rig.add_length_args(parser)
    parser.add_argument("--sse-events", type=int, help="events per SSE stream (500)")
    parser.add_argument("--sse-interval-ms", type=int, default=2)
    parser.add_argument(
        "--sse-streams", type=int, default=1, help="streams read at once"
    )
    rig.add_sidecar_cmd_arg(parser)
    rig.add_layout_args(parser)
    args = parser.parse_args(argv)
    legs = rig.legs_arg(parser, args.only, LEGS)
    concurrencies = rig.concurrencies_arg(parser, args.concurrency, "1,16,64")
    duration_s, repeats = rig.run_length(args)
    settings = Settings(
        legs=legs,
        concurrencies=concurrencies,
        duration_s=duration_s,
        warmup_s=rig.WARMUP_S,
        repeats=repeats,
        sse_events=max(1, args.sse_events or (200 if args.quick else 500)),
        sse_interval_ms=max(1, args.sse_interval_ms),
        sse_streams=max(1, args.sse_streams),
        sidecar_cmd=args.sidecar_cmd,
        one_core=args.one_core,
    )
    return settings, args.json


def _print_report(
    settings: Settings,
    plan: rig.CpuPlan,
    found: Measurements,
    json_path: Path | None,
    argv: Sequence[str],
) -> int:
    """Print tables, targets and JSON lines; the exit status of the run."""
    http = _http_records(settings, found)
    added = _added_records(http)
    sse = _sse_records(settings, found)
    verdicts = [
        _target_added_latency(settings, found, added, http),
        _target_throughput(settings, found, http),
        _target_sse(settings, found, sse),
    ]
    print(f"\n{plan.describe()}")
    print(f"\nHTTP load: wrk, GET {upstream.JSON_PATH}, median of {settings.repeats}")
    print(rig.format_records(http, HTTP_COLUMNS))
    print("\nlatency added at concurrency 1 (leg p50 minus direct p50)")
    print(rig.format_records(added, ADDED_COLUMNS))
    if plan.proxy_cpu != plan.load_cpu:
        print(
            "(across two CPUs each request also waits for the other CPU to wake;"
            " --one-core measures without that)"
        )
    print(
        f"\nSSE per-event delay, arrival minus send: {settings.sse_events} events "
        f"every {settings.sse_interval_ms} ms x {settings.sse_streams} stream(s), "
        f"median of {settings.repeats} round(s)"
    )
    print(rig.format_records(sse, SSE_COLUMNS))
    failures = [
        rig.failure_record("proxy", leg, reason, scenario)
        for (leg, scenario), reason in found.failures.items()
    ]
    measured = [_setup_record(settings, plan), *http, *added, *sse]
    return rig.finish_report(
        "proxy", measured, failures, verdicts, json_path=json_path, argv=argv
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    settings, json_path = _parse_args(argv)
    plan = rig.begin_run(
        one_core=settings.one_core, sidecar_cmd=settings.sidecar_cmd
    )
    found = Measurements()
    scenarios = (("http", _measure_http), ("sse", _measure_sse))
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp:
        for index, (scenario, measure) in enumerate(scenarios):
            try:
                measure(settings, plan, Path(tmp), found)
            except rig.RigError as exc:
                _fail(found, "all", scenario, str(exc))
            except SystemExit:
                # Stopped (run_all's budget): report what was measured so far.
                for unfinished, _ in scenarios[index:]:
                    _fail(
                        found, "all", unfinished, "stopped by a signal before the end"
                    )
                _print_report(settings, plan, found, json_path, argv)
                raise
    return _print_report(settings, plan, found, json_path, argv)


if __name__ == "__main__":
    raise SystemExit(main())
