"""Cost of an action-cache hit: the sidecar next to nginx ``proxy_cache``.

Run as ``python -m bench.bench_cache [--quick] [--one-core]``. One run puts
two legs in front of the same cheap upstream (an nginx origin answering
``POST /v1/chat/completions`` with a fixed ~600-byte chat completion, and
``/v1/models`` and ``/props`` with small identity documents):

- ``nginx``: nginx as a caching reverse proxy (``proxy_cache`` keyed on the
  URI and the request body, POST cached, one worker, a buffered access log);
- ``sidecar``: ``python -m sidecar serve`` with the default manifest, which
  caches temperature-0 chat requests (or ``--sidecar-cmd``).

Each leg is warmed until it answers from its cache (``X-Cache-Status: HIT``,
``X-Sidecar-Cache: hit``), then ``wrk`` with a Lua script sends the same
deterministic POST at concurrency 1 (hit latency p50/p99) and 64 (hits per
second), the median over repeats, legs interleaved so drift on a shared
machine hits both alike. The origin logs every POST it answers, so a
measured run also counts the requests that got past the cache (0 when every
request was a hit). Every measured hit after the first is one the quick
path answers (sidecar/cache/hits.py); the pipeline served the first. For
each leg it also reports the CPU time its processes used per hit (user and
system, children included): on a machine whose other tenants take CPU time
away, hits per second swings with them and CPU per hit much less, so the
ratio of CPU per hit is the steadier comparison. Beside the HTTP figures it
times, in this process and without HTTP, the steps of the pipeline's lookup
(strict parse, the determinism decision, RFC 8785 canonical form, scope
HMAC, action key, memory-tier get) and the quick path's whole answer, in
microseconds per request.

It prints tables, PASS/FAIL lines for the targets, one JSON line per
measurement (also written to ``--json FILE``) and a ``rerun with:`` line; the
exit status is 1 when a leg failed or a target failed. Not here: process,
nginx and wrk plumbing, the common flags, legs, targets and the report's
tail (``bench/rig.py``), the pass-through comparison (``bench/bench_proxy.py``).

Invariants: the proxy under test runs on one CPU, the origin and wrk on the
other (``rig.plan_cpus``; ``--one-core`` shares one CPU); every process
started here is stopped by PID before exit, also on SIGTERM; every wait is
bounded by a deadline; a leg that fails is reported and the other goes on.

Known limitations: the machine is shared, so figures move with its load (the
load average is recorded; time stolen by the hypervisor, 40-60% of a CPU in
bad moments, shows as hits/s falling for both legs). The sidecar runs with
the log level the environment gives it; at the default, both legs write an
access line per hit, so compare runs with the same ``SIDECAR_LOG_LEVEL``. The sidecar
polls the origin in the background (health, identity, state), a few requests
every few seconds. nginx's cache is a file read through the page cache, the
sidecar's an in-memory lookup; both serve the same bytes. wrk does not
correct for coordinated omission, and across two CPUs each request at
concurrency 1 also waits for the other CPU to wake. The origin's log is read
as soon as wrk exits, so a miss still in flight then goes uncounted. The
in-process lookup steps restate ``CacheStage.lookup`` (sidecar/cache/
stage.py) by hand; a new step there is missing here until added. CPU time is
read from /proc in clock ticks (10 ms), so a run of a few seconds measures
it to about 1%.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
import timeit
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from bench import rig
from sidecar import canonical, keys
from sidecar.cache.hits import QuickHits
from sidecar.cache.store import Entry
from sidecar.cache.tinylfu import WTinyLFU
from sidecar.http import HttpVersion11, Request
from sidecar.scope import Scopes

LEGS: Final = ("nginx", "sidecar")
CHAT_PATH: Final = "/v1/chat/completions"
REQUEST_BODY: Final = (
    b'{"model":"tiny","messages":[{"role":"user","content":"hello"}],'
    b'"temperature":0}'
)
MODELS_BODY: Final = '{"object":"list","data":[{"id":"tiny","object":"model"}]}'
PROPS_BODY: Final = '{"model_path":"tiny.gguf","build_info":"bench"}'
COMPLETION_BYTES: Final = 600
# The sidecar bypasses its cache until it has read the upstream's identity,
# which its health loop does within a few seconds of starting.
WARM_TIMEOUT_S: Final = 30.0
WARM_POLL_S: Final = 0.2
# Lookup-path timing: calls per timed batch and batches (median kept).
LOOKUP_CALLS: Final = 20_000
QUICK_LOOKUP_CALLS: Final = 5_000
LOOKUP_BATCHES: Final = 5
# Other entries in the memory tier while it is timed, so the lookup is not
# into a one-entry table.
LOOKUP_FILL: Final = 5_000

# The sidecar's targets.
LATENCY_CONCURRENCY: Final = 1
THROUGHPUT_CONCURRENCY: Final = 64
MAX_HIT_P99_US: Final = 2_000.0
MIN_HITS_VS_NGINX: Final = 0.5

Record = rig.Record


def completion_body(size: int = COMPLETION_BYTES) -> str:
    """A fixed OpenAI chat completion document of exactly ``size`` bytes."""
    doc: dict[str, Any] = {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "tiny",
        "system_fingerprint": "bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 60, "total_tokens": 69},
    }
    bare = len(json.dumps(doc, separators=(",", ":")))
    phrase = "Hello! How can I help you today? "
    doc["choices"][0]["message"]["content"] = (phrase * size)[: max(0, size - bare)]
    return json.dumps(doc, separators=(",", ":"))


COMPLETION_BODY: Final = completion_body()


@dataclass(frozen=True)
class Settings:
    duration_s: float
    warmup_s: float
    repeats: int
    lookup_calls: int
    sidecar_cmd: str
    one_core: bool


@dataclass(frozen=True)
class Point:
    """One measured wrk run and the requests that reached the origin in it."""

    wrk: rig.WrkResult
    upstream_calls: int
    # CPU seconds the leg's processes used during the run.
    cpu_s: float


@dataclass
class Measurements:
    """Raw results of one invocation; written by the main thread only."""

    http: dict[tuple[str, int], list[Point]] = field(default_factory=dict)
    lookup: list[Record] = field(default_factory=list)
    # leg ("all" for the whole run) -> why it stopped being measured
    failures: dict[str, str] = field(default_factory=dict)


def _fail(found: Measurements, leg: str, reason: str) -> None:
    found.failures[leg] = reason
    rig.progress(f"FAILED {leg}: {reason}")


# -- nginx configs ------------------------------------------------------------


def origin_config(prefix: Path, port: int) -> str:
    """The cheap upstream: identity documents, and the completion for the rest.

    Every POST it answers is logged, one ``METHOD URI`` line each, so a run
    can count the requests that got past a cache.
    """
    # rig.nginx_origin_config serves one body on every path and logs
    # nothing; this origin needs three bodies and a log, so the http block is
    # built here inside rig's shared frame.
    p = prefix.resolve()
    body = (
        "    log_format bench '$request_method $uri';\n"
        "    server {\n"
        f"        listen {rig.LOOPBACK}:{port};\n"
        f'        access_log "{p}/access.log" bench;\n'
        "        default_type application/json;\n"
        + _return_location("= /v1/models", MODELS_BODY)
        + _return_location("= /props", PROPS_BODY)
        + _return_location("/", COMPLETION_BODY)
        + "    }\n"
    )
    return rig._nginx_main(prefix, body)


def _return_location(match: str, body: str) -> str:
    return f"        location {match} {{ return 200 {rig._nginx_quote(body)}; }}\n"


def cache_proxy_config(prefix: Path, port: int, upstream_port: int) -> str:
    """nginx as a caching reverse proxy keyed on the URI and the request body.

    It writes an access line per request, buffered, as the sidecar does by
    default (its lines are batched per loop iteration), so both legs do the
    same work per hit.

    ``$request_body`` is only set when the body sits in one memory buffer,
    hence the buffer size and ``client_body_in_single_buffer``; caching needs
    ``proxy_buffering on``. ``X-Cache-Status`` tells a hit from a miss.
    """
    p = prefix.resolve()
    body = (
        f'    proxy_cache_path "{p}/cache" levels=1:2 keys_zone=bench_hits:1m'
        " max_size=64m inactive=1h use_temp_path=off;\n"
        "    upstream bench_upstream {\n"
        f"        server {rig.LOOPBACK}:{upstream_port};\n"
        "        keepalive 64;\n"
        f"        keepalive_requests {rig.KEEPALIVE_REQUESTS};\n"
        "    }\n"
        "    server {\n"
        f"        listen {rig.LOOPBACK}:{port};\n"
        f'        access_log "{p}/access.log" combined buffer=64k flush=1s;\n'
        "        client_body_buffer_size 64k;\n"
        "        client_body_in_single_buffer on;\n"
        "        location / {\n"
        "            proxy_pass http://bench_upstream;\n"
        "            proxy_http_version 1.1;\n"
        '            proxy_set_header Connection "";\n'
        "            proxy_buffering on;\n"
        "            proxy_cache bench_hits;\n"
        "            proxy_cache_methods POST;\n"
        '            proxy_cache_key "$request_uri|$request_body";\n'
        "            proxy_cache_valid 200 1h;\n"
        "            add_header X-Cache-Status $upstream_cache_status always;\n"
        "        }\n"
        "    }\n"
    )
    return rig._nginx_main(prefix, body)


def wrk_script() -> str:
    """The wrk Lua script: the same POST on every request (built once by wrk)."""
    body = REQUEST_BODY.decode("ascii")
    # A JSON string literal of ASCII text is also a valid Lua string literal.
    return (
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(body)}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )


# -- legs ---------------------------------------------------------------------


def _start_origin(
    plan: rig.CpuPlan, stack: contextlib.ExitStack, workdir: Path
) -> tuple[int, Path]:
    """The origin on the load CPU: its port and its access log."""
    (port,) = rig.free_ports(1)
    prefix = workdir / "origin"
    config = origin_config(prefix, port)
    proc = rig.start_nginx("nginx origin", prefix, config, port=port, cpu=plan.load_cpu)
    stack.callback(rig.stop_process, proc)
    return port, prefix / "access.log"


def _start_nginx_leg(
    upstream_port: int, plan: rig.CpuPlan, stack: contextlib.ExitStack, workdir: Path
) -> rig.Leg:
    (port,) = rig.free_ports(1)
    prefix = workdir / "nginx-cache"
    prefix.mkdir()
    if os.geteuid() == 0:
        # A master started as root runs its worker as nobody, which must
        # reach the cache directory: let it through the private temp dirs.
        for path in (workdir, prefix):
            path.chmod(0o711)
    config = cache_proxy_config(prefix, port, upstream_port)
    proc = rig.start_nginx("nginx", prefix, config, port=port, cpu=plan.proxy_cpu)
    stack.callback(rig.stop_process, proc)
    url = f"http://{rig.LOOPBACK}:{port}"
    return rig.Leg("nginx", url, proc, prefix / "error.log")


def _start_sidecar_leg(
    upstream_port: int,
    settings: Settings,
    plan: rig.CpuPlan,
    stack: contextlib.ExitStack,
    workdir: Path,
) -> rig.Leg:
    url, proc = rig.start_sidecar(
        settings.sidecar_cmd,
        upstream_port,
        workdir / "sidecar",
        cpu=plan.proxy_cpu,
        stack=stack,
    )
    return rig.Leg("sidecar", url, proc)


def _cache_state(leg: str, headers: Mapping[str, str]) -> str:
    """What the leg says about its cache, e.g. ``hit`` or ``bypass (reason)``."""
    if leg == "nginx":
        return (headers.get("x-cache-status") or "none").lower()
    state = headers.get("x-sidecar-cache") or "none"
    reason = headers.get("x-sidecar-cache-reason")
    return f"{state} ({reason})" if reason else state


def _warm(leg: rig.Leg) -> None:
    """Send the POST until the leg answers it from its cache, bounded in time.

    Raises ``RigError`` on a wrong answer or when no hit comes in time.
    """
    url = leg.url + CHAT_PATH
    deadline = time.monotonic() + WARM_TIMEOUT_S
    seen: list[str] = []
    while time.monotonic() < deadline:
        _, headers, _ = rig.fetch(
            url,
            method="POST",
            data=REQUEST_BODY,
            headers={"Content-Type": "application/json"},
            expect=COMPLETION_BODY.encode(),
        )
        state = _cache_state(leg.name, headers)
        if not seen or seen[-1] != state:
            seen.append(state)
        if state == "hit":
            states = ", ".join(seen)
            rig.progress(f"{leg.name}: cache states before measuring: {states}")
            return
        time.sleep(WARM_POLL_S)
    raise rig.RigError(
        f"{leg.name} gave no cache hit in {WARM_TIMEOUT_S:.0f} s;"
        f" cache states seen: {', '.join(seen)}"
    )


def _start_legs(
    settings: Settings,
    plan: rig.CpuPlan,
    stack: contextlib.ExitStack,
    workdir: Path,
    origin_port: int,
    found: Measurements,
) -> dict[str, rig.Leg]:
    """Every leg that starts and answers from its cache, by name."""
    starters: dict[str, Callable[[], rig.Leg]] = {
        "nginx": lambda: _start_nginx_leg(origin_port, plan, stack, workdir),
        "sidecar": lambda: _start_sidecar_leg(
            origin_port, settings, plan, stack, workdir
        ),
    }
    legs = {}
    for name in LEGS:
        try:
            leg = starters[name]()
        except rig.RigError as exc:
            _fail(found, name, str(exc))
            continue
        try:
            _warm(leg)
        except rig.RigError as exc:
            _fail(found, name, leg.failure(str(exc)))
            continue
        legs[name] = leg
    return legs


# -- HTTP load ----------------------------------------------------------------


def _origin_posts(access_log: Path) -> int:
    """POSTs the origin has answered so far."""
    try:
        text = access_log.read_text(errors="replace")
    except FileNotFoundError:
        return 0
    return sum(1 for line in text.splitlines() if line.startswith("POST "))


def _measure_http(
    settings: Settings, plan: rig.CpuPlan, workdir: Path, found: Measurements
) -> None:
    script = workdir / "post.lua"
    script.write_text(wrk_script())
    with contextlib.ExitStack() as stack:
        origin_port, access_log = _start_origin(plan, stack, workdir)
        legs = _start_legs(settings, plan, stack, workdir, origin_port, found)

        def point(name: str, connections: int, warmup: bool) -> None:
            _run_point(
                settings, plan, found, legs, name, connections,
                script=script, access_log=access_log, warmup=warmup,
            )

        concurrencies = (LATENCY_CONCURRENCY, THROUGHPUT_CONCURRENCY)
        rig.run_interleaved(
            legs, concurrencies, settings.repeats, point, label="http: "
        )


def _run_point(
    settings: Settings,
    plan: rig.CpuPlan,
    found: Measurements,
    legs: dict[str, rig.Leg],
    name: str,
    connections: int,
    *,
    script: Path,
    access_log: Path,
    warmup: bool,
) -> None:
    """One wrk run; a leg whose run fails is dropped from ``legs``."""
    before = _origin_posts(access_log)
    leg = legs[name]
    cpu_before = leg.cpu_seconds()
    result = rig.run_point(
        legs,
        name,
        CHAT_PATH,
        connections,
        duration_s=settings.warmup_s if warmup else settings.duration_s,
        cpu=plan.load_cpu,
        fail=lambda failed, reason: _fail(found, failed, reason),
        script=script,
    )
    if result is None or warmup:
        return
    calls = _origin_posts(access_log) - before
    cpu_s = leg.cpu_seconds() - cpu_before
    found.http.setdefault((name, connections), []).append(Point(result, calls, cpu_s))
    rig.progress(
        "http: "
        + rig.wrk_line(name, connections, result, unit="hits/s")
        + (f"  upstream calls {calls}" if calls else "")
    )


def _http_records(found: Measurements) -> list[Record]:
    """One record per (leg, concurrency): medians over repeats, with ratios."""
    records = []
    metrics = ("requests_per_s", "p50_us", "p99_us", "cpu_us_per_hit")
    for connections in (LATENCY_CONCURRENCY, THROUGHPUT_CONCURRENCY):
        for name in LEGS:
            points = found.http.get((name, connections))
            if not points:
                continue
            records.append(_http_record(name, connections, points))
        rig.add_ratios(records, metrics, ("nginx",), concurrency=connections)
    return records


def _http_record(name: str, connections: int, points: Sequence[Point]) -> Record:
    runs = [p.wrk for p in points]
    return {
        "bench": "cache",
        "kind": "http_hit",
        "leg": name,
        "concurrency": connections,
        "requests_per_s": rig.median([r.requests_per_s for r in runs]),
        "p50_us": rig.median([r.p50_s * 1e6 for r in runs]),
        "p99_us": rig.median([r.p99_s * 1e6 for r in runs]),
        "cpu_us_per_hit": rig.median([_cpu_per_hit(p) for p in points]),
        "requests": sum(r.requests for r in runs),
        "errors": sum(r.errors for r in runs),
        "upstream_calls": sum(p.upstream_calls for p in points),
        "rounds": [
            {
                "requests_per_s": p.wrk.requests_per_s,
                "p50_us": p.wrk.p50_s * 1e6,
                "p99_us": p.wrk.p99_s * 1e6,
                "errors": p.wrk.errors,
                "upstream_calls": p.upstream_calls,
                "cpu_us_per_hit": _cpu_per_hit(p),
            }
            for p in points
        ],
    }


def _cpu_per_hit(point: Point) -> float:
    return point.cpu_s / max(1, point.wrk.requests) * 1e6


# -- the lookup path in-process -----------------------------------------------


def lookup_steps() -> list[tuple[str, Callable[[], object]]]:
    """The sidecar's hit path without HTTP, step by step, then all of it.

    Mirrors ``CacheStage.lookup`` for the benchmark's request: strict parse,
    the determinism decision, canonical bytes, the scope HMAC of an
    anonymous caller, the action key, and the memory-tier lookup.
    """
    raw = REQUEST_BODY
    body = canonical.parse_body(raw)
    canonical_body = canonical.canonicalize(body)
    scopes = Scopes(b"bench-scope-secret-0123456789abcdef", ("authorization",))
    headers: dict[str, str] = {}
    environment = hashlib.sha256(MODELS_BODY.encode()).digest()

    def key_of(canonical_bytes: bytes, scope: str) -> bytes:
        return keys.action_key(
            route="chat", version=1, method="POST", target=CHAT_PATH,
            canonical_body=canonical_bytes, environment=environment,
            significant=[], scope=scope,
        )

    key = key_of(canonical_body, scopes.scope(headers))
    memory = _filled_memory(key)

    def whole() -> object:
        parsed = canonical.parse_body(raw)
        if not keys.body_decision("deterministic", "chat", parsed).cacheable:
            raise rig.RigError("the benchmark request is not cacheable")
        found_key = key_of(canonical.canonicalize(parsed), scopes.scope(headers))
        return memory.get(found_key)

    if whole() is None:
        raise rig.RigError("the lookup path missed its own entry")
    return [
        ("parse_body", lambda: canonical.parse_body(raw)),
        ("body_decision", lambda: keys.body_decision("deterministic", "chat", body)),
        ("canonicalize", lambda: canonical.canonicalize(body)),
        ("scope", lambda: scopes.scope(headers)),
        ("action_key", lambda: key_of(canonical_body, "")),
        ("memory_get", lambda: memory.get(key)),
        ("lookup_path", whole),
        ("quick_answer", _quick_answer(memory, key)),
    ]


class _QuietConnection:
    """What a Request and its Body need of a connection, and nothing else."""

    peer = "127.0.0.1"

    def body_buffered(self, delta: int) -> None:
        pass


class _Signature:
    signature = hashlib.sha256(MODELS_BODY.encode()).digest()


def _quick_answer(memory: WTinyLFU[Entry], key: bytes) -> Callable[[], object]:
    """The quick path's whole answer to a repeat (sidecar/cache/hits.py).

    What the data port runs for every hit after the first: fingerprint,
    memory-tier lookup, the rendered answer, the tally (folded each call
    here, into a no-op). HTTP parsing and the socket write are not in it.
    """
    quick = QuickHits(
        memory, environment=_Signature(), credential_headers=("authorization",),
        on_hits=lambda *args: None, max_entries=LOOKUP_FILL, max_header_bytes=65536,
    )
    conn: Any = _QuietConnection()
    request = Request(
        conn, "POST", CHAT_PATH, HttpVersion11,
        ((b"Host", b"sidecar"), (b"Content-Type", b"application/json")),
        len(REQUEST_BODY), False, True,
    )
    request.content.feed(REQUEST_BODY)
    request.content.feed_eof()
    quick.remember(request, REQUEST_BODY, "chat", key, _Signature.signature)

    def answer() -> object:
        found = quick.answer(request, REQUEST_BODY)
        quick.fold()
        return found

    if answer() is None:
        raise rig.RigError("the quick path missed its own entry")
    return answer


def _filled_memory(key: bytes) -> WTinyLFU[Entry]:
    """A memory tier holding ``key`` among ``LOOKUP_FILL`` other entries."""
    value = Entry.create(
        COMPLETION_BODY.encode(), headers=(("Content-Type", "application/json"),),
        created=time.time(), ttl_s=3600.0, route="chat",
    )
    memory: WTinyLFU[Entry] = WTinyLFU(10_000, 256 * 1024 * 1024)
    for n in range(LOOKUP_FILL):
        memory.put(hashlib.sha256(b"fill-%d" % n).digest(), value, weight=value.size)
    memory.put(key, value, weight=value.size)
    # A few hits move it from the window into the main region, as a key
    # that is asked for again and again would be.
    for _ in range(3):
        memory.get(key)
    return memory


def _measure_lookup(
    settings: Settings, plan: rig.CpuPlan, found: Measurements
) -> None:
    """Time each lookup step on the proxy's CPU; median of the batches."""
    rig.pin_self(plan.proxy_cpu)
    try:
        for step, call in lookup_steps():
            batches = timeit.Timer(call).repeat(LOOKUP_BATCHES, settings.lookup_calls)
            per_call_us = [t / settings.lookup_calls * 1e6 for t in batches]
            found.lookup.append(
                {
                    "bench": "cache",
                    "kind": "lookup",
                    "step": step,
                    "us_per_request": rig.median(per_call_us),
                    "calls": settings.lookup_calls,
                    "batches_us": per_call_us,
                }
            )
    finally:
        rig.pin_self(plan.load_cpu)
    whole = found.lookup[-1]["us_per_request"]
    rig.progress(f"lookup path in-process: {whole:.2f} us per request")


# -- targets ------------------------------------------------------------------


def _unclean(record: Record) -> str:
    """``; N errors; M upstream calls`` for a point that was not all hits."""
    parts = []
    if record["errors"]:
        parts.append(f"{record['errors']} errors")
    if record["upstream_calls"]:
        parts.append(f"{record['upstream_calls']} requests reached the upstream")
    return "".join(f"; {part}" for part in parts)


def _target_latency(found: Measurements, http: Sequence[Record]) -> rig.Verdict:
    name = f"hit_p99_c{LATENCY_CONCURRENCY}"
    sidecar = rig.find(http, leg="sidecar", concurrency=LATENCY_CONCURRENCY)
    if sidecar is None:
        why = found.failures.get("sidecar") or found.failures.get("all") or "no run"
        return rig.Verdict(name, "FAIL", f"not measured: {why.splitlines()[0]}")
    dirty = _unclean(sidecar)
    detail = (
        f"sidecar hit p99 {rig.fmt_us(sidecar['p99_us'])} at c={LATENCY_CONCURRENCY}"
        f"; limit {rig.fmt_us(MAX_HIT_P99_US)}{dirty}"
    )
    return rig.verdict(name, sidecar["p99_us"] < MAX_HIT_P99_US and not dirty, detail)


def _target_throughput(found: Measurements, http: Sequence[Record]) -> rig.Verdict:
    name = f"hits_c{THROUGHPUT_CONCURRENCY}_vs_nginx"
    sidecar = rig.find(http, leg="sidecar", concurrency=THROUGHPUT_CONCURRENCY)
    nginx = rig.find(http, leg="nginx", concurrency=THROUGHPUT_CONCURRENCY)
    if sidecar is None:
        why = found.failures.get("sidecar") or found.failures.get("all") or "no run"
        return rig.Verdict(name, "FAIL", f"not measured: {why.splitlines()[0]}")
    if nginx is None or _unclean(nginx):
        # A failed reference leaves the target unjudged; the failure itself
        # still fails the run.
        why = _unclean(nginx).removeprefix("; ") if nginx else "no run"
        why = found.failures.get("nginx", why).splitlines()[0]
        return rig.Verdict(name, "SKIP", f"nginx not measured cleanly: {why}")
    limit = MIN_HITS_VS_NGINX * nginx["requests_per_s"]
    dirty = _unclean(sidecar)
    detail = (
        f"sidecar {rig.fmt_rate(sidecar['requests_per_s'])} hits/s at "
        f"c={THROUGHPUT_CONCURRENCY}; at least {MIN_HITS_VS_NGINX:.0%} of nginx "
        f"proxy_cache's {rig.fmt_rate(nginx['requests_per_s'])} = "
        f"{rig.fmt_rate(limit)}{dirty}"
    )
    return rig.verdict(name, sidecar["requests_per_s"] >= limit and not dirty, detail)


# -- report -------------------------------------------------------------------

HTTP_COLUMNS: Final[Sequence[rig.Column]] = (
    *rig.wrk_columns("hits/s"),
    ("CPU/hit", "cpu_us_per_hit", rig.fmt_us),
    ("errors", "errors", rig.fmt_plain),
    ("past cache", "upstream_calls", rig.fmt_plain),
    ("hits/s vs nginx", "requests_per_s_vs_nginx", rig.fmt_ratio),
    ("p50 vs nginx", "p50_us_vs_nginx", rig.fmt_ratio),
    ("p99 vs nginx", "p99_us_vs_nginx", rig.fmt_ratio),
    ("CPU/hit vs nginx", "cpu_us_per_hit_vs_nginx", rig.fmt_ratio),
)
LOOKUP_COLUMNS: Final[Sequence[rig.Column]] = (
    ("step", "step", rig.fmt_plain),
    ("per request", "us_per_request", lambda us: f"{us:.2f} us"),
    ("share of c=1 hit p50", "share_of_hit_p50", rig.fmt_plain),
)


def _with_shares(lookup: Sequence[Record], http: Sequence[Record]) -> list[Record]:
    """Lookup records with their share of the sidecar's HTTP hit p50."""
    sidecar = rig.find(http, leg="sidecar", concurrency=LATENCY_CONCURRENCY)
    p50_us = None if sidecar is None else sidecar["p50_us"]
    out = []
    for record in lookup:
        share = rig.ratio(record["us_per_request"], p50_us)
        shown = None if share is None else f"{share:.1%}"
        out.append({**record, "share_of_hit_p50": shown})
    return out


def _setup_record(settings: Settings, plan: rig.CpuPlan) -> Record:
    return {
        "bench": "cache",
        "kind": "setup",
        "request_bytes": len(REQUEST_BODY),
        "answer_bytes": len(COMPLETION_BODY),
        **rig.run_fields(plan, settings.duration_s, settings.repeats),
        **rig.sidecar_fields(settings.sidecar_cmd),
    }


def _print_report(
    settings: Settings,
    plan: rig.CpuPlan,
    found: Measurements,
    json_path: Path | None,
    argv: Sequence[str],
) -> int:
    """Print tables, targets and JSON lines; the exit status of the run."""
    http = _http_records(found)
    lookup = _with_shares(found.lookup, http)
    verdicts = [_target_latency(found, http), _target_throughput(found, http)]
    print(f"\n{plan.describe()}")
    print(
        f"\ncache hits: wrk, POST {CHAT_PATH} ({len(REQUEST_BODY)} B in,"
        f" {len(COMPLETION_BODY)} B out), median of {settings.repeats}"
    )
    print(rig.format_records(http, HTTP_COLUMNS))
    print(
        "(past cache: POSTs the origin answered during the measured runs;"
        " 0 means every request was a hit. CPU/hit: user and system CPU of the"
        " leg's processes per hit; time other tenants of the machine take is"
        " not in it, so it moves less with their load than hits/s does)"
    )
    print("\nthe sidecar's lookup path in-process, no HTTP (median of batches)")
    print(rig.format_records(lookup, LOOKUP_COLUMNS))
    failures = [
        rig.failure_record("cache", leg, reason)
        for leg, reason in found.failures.items()
    ]
    measured = [_setup_record(settings, plan), *http, *lookup]
    return rig.finish_report(
        "cache", measured, failures, verdicts, json_path=json_path, argv=argv
    )


# -- command line -------------------------------------------------------------


def _parse_args(argv: Sequence[str]) -> tuple[Settings, Path | None]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_cache",
        description="Cost of a cache hit: the sidecar next to nginx proxy_cache.",
    )
    parser.add_argument("--quick", action="store_true", help="short runs, one repeat")
    rig.add_length_args(parser)
    rig.add_sidecar_cmd_arg(parser)
    rig.add_layout_args(parser)
    args = parser.parse_args(argv)
    if args.duration_s is not None and args.duration_s <= 0:
        parser.error("--duration-s needs a positive number of seconds")
    duration_s, repeats = rig.run_length(args)
    settings = Settings(
        duration_s=duration_s,
        warmup_s=rig.WARMUP_S,
        repeats=repeats,
        lookup_calls=QUICK_LOOKUP_CALLS if args.quick else LOOKUP_CALLS,
        sidecar_cmd=args.sidecar_cmd,
        one_core=args.one_core,
    )
    return settings, args.json


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    settings, json_path = _parse_args(argv)
    plan = rig.begin_run(
        one_core=settings.one_core, sidecar_cmd=settings.sidecar_cmd
    )
    found = Measurements()
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        try:
            _measure_lookup(settings, plan, found)
            _measure_http(settings, plan, Path(tmp), found)
        except rig.RigError as exc:
            _fail(found, "all", str(exc))
        except SystemExit:
            # Stopped (run_all's budget): report what was measured so far.
            _fail(found, "all", "stopped by a signal before the end")
            _print_report(settings, plan, found, json_path, argv)
            raise
    return _print_report(settings, plan, found, json_path, argv)


if __name__ == "__main__":
    raise SystemExit(main())
