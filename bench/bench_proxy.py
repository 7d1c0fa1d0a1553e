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
reports it. Not here: process, nginx and wrk plumbing (``bench/rig.py``), the
upstream (``bench/upstream.py``).

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
import dataclasses
import os
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final, Literal

import aiohttp
import uvloop

from bench import rig, upstream

LEGS: Final = ("direct", "nginx", "sidecar")
DEFAULT_SIDECAR_CMD: Final = (
    "{python} -m sidecar serve --upstream {upstream} --listen 127.0.0.1:{port}"
    " --admin-listen 127.0.0.1:{admin_port} --data-dir {data_dir}"
)
SIDECAR_READY_LINE: Final = "sidecar.listening"
SIDECAR_START_TIMEOUT_S: Final = 30.0
WARMUP_CONNECTIONS: Final = 16
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


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


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
    return _start_sidecar(
        upstream_port, settings, plan, stack, workdir / f"sidecar-{scenario}"
    )


def _start_sidecar(
    upstream_port: int,
    settings: Settings,
    plan: rig.CpuPlan,
    stack: contextlib.ExitStack,
    workdir: Path,
) -> tuple[str, rig.Proc]:
    port, admin_port = rig.free_ports(2)
    data_dir = workdir / "data"
    data_dir.mkdir(parents=True)
    python = rig.REPO / ".venv" / "bin" / "python"
    fields = {
        "python": str(python) if python.exists() else sys.executable,
        "upstream": f"http://{rig.LOOPBACK}:{upstream_port}",
        "port": port,
        "admin_port": admin_port,
        "data_dir": str(data_dir),
    }
    argv = rig.command_from_template(settings.sidecar_cmd, fields)
    proc = rig.start_ready(
        "sidecar",
        argv,
        log_path=workdir / "stderr.log",
        cpu=plan.proxy_cpu,
        port=port,
        line=SIDECAR_READY_LINE,
        timeout_s=SIDECAR_START_TIMEOUT_S,
    )
    stack.callback(rig.stop_process, proc)
    return f"http://{rig.LOOPBACK}:{port}", proc


def _check_json(url: str) -> str | None:
    """A request through a leg must return the origin's body unchanged.

    Returns the ``X-Sidecar-Cache`` header of a second request, which tells
    whether the sidecar passed it through or answered from a cache.
    """
    cache = None
    for _ in range(2):
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                status, body = response.status, response.read()
                cache = response.headers.get("X-Sidecar-Cache")
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read()
        except OSError as exc:
            raise rig.RigError(f"GET {url} failed: {exc}") from exc
        if status != 200 or body != upstream.FIXED_BODY:
            raise rig.RigError(f"GET {url} answered {status} {body[:200]!r}")
    return cache


@dataclass(frozen=True)
class Leg:
    """A started leg: where to send requests and the process behind it."""

    name: str
    url: str
    proc: rig.Proc | None

    def failure(self, what: str) -> str:
        """``what`` went wrong, then the end of this leg's log if it has one."""
        if self.proc is None:
            return what
        return f"{what}\nlog {self.proc.log_path}:\n{self.proc.log_tail()}"


def _start_legs(
    settings: Settings,
    plan: rig.CpuPlan,
    stack: contextlib.ExitStack,
    workdir: Path,
    *,
    upstream_port: int,
    scenario: str,
    found: Measurements,
) -> dict[str, Leg]:
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
        leg = Leg(name, url, proc)
        try:
            if scenario == "http":
                cache = _check_json(url + upstream.JSON_PATH)
                if cache is not None:
                    _progress(f"{name}: X-Sidecar-Cache: {cache} on a repeated GET")
        except rig.RigError as exc:
            _fail(found, name, scenario, leg.failure(str(exc)))
            continue
        legs[name] = leg
    return legs


def _fail(found: Measurements, leg: str, scenario: str, reason: str) -> None:
    found.failures[(leg, scenario)] = reason
    _progress(f"FAILED {leg} ({scenario}): {reason}")


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
        _progress("nginx missing: the HTTP origin is bench/upstream.py (slower)")
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
            _progress(f"http: repeat {repeat + 1}/{settings.repeats} done")


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
            legs[name].url + upstream.JSON_PATH,
            connections=connections,
            duration_s=settings.warmup_s if warmup else settings.duration_s,
            cpu=plan.load_cpu,
        )
    except rig.RigError as exc:
        _fail(found, name, "http", legs.pop(name).failure(str(exc)))
        return
    if warmup:
        return
    found.http.setdefault((name, connections), []).append(result)
    _progress(
        f"http: {name:8} c={connections:<3} {rig.fmt_rate(result.requests_per_s):>9}"
        f" req/s  p50 {rig.fmt_latency(result.p50_s)}"
        f"  p99 {rig.fmt_latency(result.p99_s)}"
        + (f"  errors {result.errors}" if result.errors else "")
    )


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
            _progress(f"sse: round {repeat + 1}/{settings.repeats} done")


def _run_sse_round(
    settings: Settings, found: Measurements, legs: dict[str, Leg], name: str
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
    _progress(
        f"sse: {name:8} p50 {rig.fmt_latency(rig.percentile(delays, 50))}"
        f"  p99 {rig.fmt_latency(rig.percentile(delays, 99))}"
    )


# -- records ------------------------------------------------------------------
# Every figure is a JSON-ready record; the tables and the targets read them.

Record = dict[str, Any]
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
                    "requests_per_s": rig.median([r.requests_per_s for r in runs]),
                    "p50_us": rig.median([_us(r.p50_s) for r in runs]),
                    "p99_us": rig.median([_us(r.p99_s) for r in runs]),
                    "errors": sum(r.errors for r in runs),
                    "runs": [_run_record(r) for r in runs],
                }
            )
        _add_ratios(records, ("requests_per_s", "p50_us"), concurrency=connections)
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
    direct = _find(http, leg="direct", concurrency=1)
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
    _add_ratios(records, ("added_p50_us",), bases=("nginx",))
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
    direct = _find(records, leg="direct")
    for record in records:
        for q in ("p50", "p99"):
            base = direct[f"{q}_us"] if direct else None
            record[f"added_{q}_us"] = None if base is None else record[f"{q}_us"] - base
    _add_ratios(records, ("p50_us", "p99_us"))
    return records


def _find(records: Sequence[Record], **match: Any) -> Record | None:
    """The first record whose fields equal ``match``."""
    for record in records:
        if all(record.get(k) == v for k, v in match.items()):
            return record
    return None


def _add_ratios(
    records: list[Record],
    fields: Sequence[str],
    bases: Sequence[str] = BASE_LEGS,
    **same: Any,
) -> None:
    """Add ``<field>_vs_<base>`` to the records matching ``same``."""
    group = [r for r in records if all(r.get(k) == v for k, v in same.items())]
    for base in bases:
        other = _find(group, leg=base)
        for record in group:
            for name in fields:
                value = other[name] if other else None
                record[f"{name}_vs_{base}"] = rig.ratio(record[name], value)


def _setup_record(settings: Settings, plan: rig.CpuPlan) -> Record:
    return {
        "bench": "proxy",
        "kind": "setup",
        "legs": list(settings.legs),
        "concurrencies": list(settings.concurrencies),
        "duration_s": settings.duration_s,
        "repeats": settings.repeats,
        "proxy_cpu": plan.proxy_cpu,
        "load_cpu": plan.load_cpu,
        "loadavg": list(os.getloadavg()),
        "sidecar_cmd": settings.sidecar_cmd,
        "sidecar_log_level": os.environ.get("SIDECAR_LOG_LEVEL"),
    }


# -- tables ---------------------------------------------------------------------

HTTP_COLUMNS: Final[Sequence[rig.Column]] = (
    ("leg", "leg", rig.fmt_plain),
    ("conns", "concurrency", rig.fmt_plain),
    ("req/s", "requests_per_s", rig.fmt_rate),
    ("p50", "p50_us", rig.fmt_us),
    ("p99", "p99_us", rig.fmt_us),
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


Result = Literal["PASS", "FAIL", "SKIP"]


@dataclass(frozen=True)
class Verdict:
    """One target: ``PASS``, ``FAIL`` or ``SKIP`` (could not be judged)."""

    target: str
    result: Result
    detail: str

    def record(self) -> Record:
        return {"bench": "proxy", "kind": "target", **dataclasses.asdict(self)}


def _blocked(
    settings: Settings,
    found: Measurements,
    target: str,
    scenario: str,
    legs: Sequence[str],
) -> Verdict | None:
    """Why ``target`` cannot be judged from ``legs`` in ``scenario``, if so.

    A failed sidecar leg fails the target; a failed reference leg only
    leaves it unjudged (the failure itself still fails the run).
    """
    absent = [leg for leg in legs if leg not in settings.legs]
    if absent:
        return Verdict(
            target,
            "SKIP",
            f"needs the {' and '.join(absent)} leg{'s' * (len(absent) > 1)} (--only)",
        )
    for leg in (*legs, "all"):
        reason = found.failures.get((leg, scenario))
        if reason is not None:
            result: Result = "FAIL" if leg in ("sidecar", "all") else "SKIP"
            who = f"the {scenario} run" if leg == "all" else f"the {leg} leg"
            return Verdict(target, result, f"{who} failed: {reason.splitlines()[0]}")
    return None


def _target_added_latency(
    settings: Settings, found: Measurements, added: list[Record], http: list[Record]
) -> Verdict:
    name = "added_latency_c1"
    blocked = _blocked(settings, found, name, "http", ("direct", "nginx", "sidecar"))
    if blocked is not None:
        return blocked
    sidecar, nginx = _find(added, leg="sidecar"), _find(added, leg="nginx")
    if sidecar is None or nginx is None:
        return Verdict(name, "SKIP", "needs concurrency 1 (--concurrency)")
    nginx_us, sidecar_us = nginx["added_p50_us"], sidecar["added_p50_us"]
    if nginx_us <= 0:
        return Verdict(name, "SKIP", "nginx added no measurable latency; rerun")
    limit_us = MAX_ADDED_LATENCY_VS_NGINX * nginx_us
    errors = (_find(http, leg="sidecar", concurrency=1) or {}).get("errors", 0)
    detail = (
        f"sidecar adds {rig.fmt_us(sidecar_us)} at c=1; limit "
        f"{MAX_ADDED_LATENCY_VS_NGINX}x nginx's {rig.fmt_us(nginx_us)} = "
        f"{rig.fmt_us(limit_us)}" + (f"; {errors} errors" if errors else "")
    )
    return _verdict(name, sidecar_us <= limit_us and not errors, detail)


def _target_throughput(
    settings: Settings, found: Measurements, http: list[Record]
) -> Verdict:
    name = f"throughput_c{THROUGHPUT_CONCURRENCY}"
    blocked = _blocked(settings, found, name, "http", ("nginx", "sidecar"))
    if blocked is not None:
        return blocked
    sidecar = _find(http, leg="sidecar", concurrency=THROUGHPUT_CONCURRENCY)
    nginx = _find(http, leg="nginx", concurrency=THROUGHPUT_CONCURRENCY)
    if sidecar is None or nginx is None:
        return Verdict(name, "SKIP", f"needs concurrency {THROUGHPUT_CONCURRENCY}")
    limit = MIN_THROUGHPUT_VS_NGINX * nginx["requests_per_s"]
    detail = (
        f"sidecar {rig.fmt_rate(sidecar['requests_per_s'])} req/s at "
        f"c={THROUGHPUT_CONCURRENCY}; at least {MIN_THROUGHPUT_VS_NGINX:.0%} of "
        f"nginx's {rig.fmt_rate(nginx['requests_per_s'])} = {rig.fmt_rate(limit)}"
        + (f"; {sidecar['errors']} errors" if sidecar["errors"] else "")
    )
    passed = sidecar["requests_per_s"] >= limit and not sidecar["errors"]
    return _verdict(name, passed, detail)


def _target_sse(settings: Settings, found: Measurements, sse: list[Record]) -> Verdict:
    name = "sse_delay_p99"
    blocked = _blocked(settings, found, name, "sse", ("nginx", "sidecar"))
    if blocked is not None:
        return blocked
    sidecar, nginx = _find(sse, leg="sidecar"), _find(sse, leg="nginx")
    if sidecar is None or nginx is None:
        return Verdict(name, "SKIP", "no SSE rounds were measured")
    detail = (
        f"sidecar per-event delay p99 {rig.fmt_us(sidecar['p99_us'])}; at most "
        f"nginx's with proxy_buffering off, {rig.fmt_us(nginx['p99_us'])}"
    )
    return _verdict(name, sidecar["p99_us"] <= nginx["p99_us"], detail)


def _verdict(target: str, passed: bool, detail: str) -> Verdict:
    return Verdict(target, "PASS" if passed else "FAIL", detail)


# -- command line -------------------------------------------------------------


def _parse_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


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
    parser.add_argument("--duration-s", type=float, help="seconds per wrk run (5)")
    parser.add_argument("--repeats", type=int, help="runs per point, median kept (3)")
    parser.add_argument("--sse-events", type=int, help="events per SSE stream (500)")
    parser.add_argument("--sse-interval-ms", type=int, default=2)
    parser.add_argument(
        "--sse-streams", type=int, default=1, help="streams read at once"
    )
    parser.add_argument(
        "--sidecar-cmd",
        default=DEFAULT_SIDECAR_CMD,
        help="command for the sidecar leg; fields: {python} {upstream} {port} "
        "{admin_port} {data_dir}",
    )
    parser.add_argument(
        "--one-core",
        action="store_true",
        help="run the proxy on the load CPU too (no cross-CPU wake-ups)",
    )
    parser.add_argument("--json", type=Path, help="also write the JSON lines here")
    args = parser.parse_args(argv)
    legs = _parse_list(args.only)
    unknown = sorted(set(legs) - set(LEGS))
    if unknown or not legs:
        parser.error(f"--only takes {','.join(LEGS)}; got {args.only!r}")
    try:
        concurrencies = tuple(int(c) for c in _parse_list(args.concurrency))
    except ValueError:
        parser.error(
            f"--concurrency takes numbers such as 1,16,64; got {args.concurrency!r}"
        )
    if not concurrencies or min(concurrencies) < 1:
        parser.error("--concurrency needs at least one number >= 1")
    quick = args.quick
    settings = Settings(
        legs=tuple(leg for leg in LEGS if leg in legs),
        concurrencies=concurrencies,
        duration_s=args.duration_s or (2.0 if quick else 5.0),
        warmup_s=1.0,
        repeats=max(1, args.repeats or (1 if quick else 3)),
        sse_events=max(1, args.sse_events or (200 if quick else 500)),
        sse_interval_ms=max(1, args.sse_interval_ms),
        sse_streams=max(1, args.sse_streams),
        sidecar_cmd=args.sidecar_cmd,
        one_core=args.one_core,
    )
    return settings, args.json


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    # SIGTERM (from run_all's budget) unwinds the ExitStacks, which stop
    # every process this run started.
    raise SystemExit(128 + signum)


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
        {
            "bench": "proxy",
            "kind": "failure",
            "leg": leg,
            "scenario": scenario,
            "reason": reason,
        }
        for (leg, scenario), reason in found.failures.items()
    ]
    if failures:
        print("\nfailed legs")
        for failure in failures:
            first_line = str(failure["reason"]).splitlines()[0]
            print(f"  {failure['leg']} ({failure['scenario']}): {first_line}")
    print("\ntargets for the sidecar")
    for verdict in verdicts:
        print(f"{verdict.result} {verdict.target}: {verdict.detail}")

    records = [_setup_record(settings, plan), *http, *added, *sse, *failures]
    records += [verdict.record() for verdict in verdicts]
    print()
    for record in records:
        print(rig.json_line(record))
    if json_path is not None:
        rig.write_json_lines(json_path, records)
        print(f"wrote {len(records)} JSON lines to {json_path}")
    print(rig.rerun_line("bench.bench_proxy", argv))
    failed = bool(failures) or any(v.result == "FAIL" for v in verdicts)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    settings, json_path = _parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_exit)
    plan = rig.plan_cpus(one_core=settings.one_core)
    rig.pin_self(plan.load_cpu)
    _progress(plan.describe())
    _progress(f"sidecar command: {settings.sidecar_cmd}")
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
