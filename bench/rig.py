"""The benchmark rig: processes, ports, pinning, nginx configs, wrk and reports.

Owns what every ``bench/bench_*.py`` script shares: starting a process pinned
to a CPU and stopping it by PID, free loopback ports, the generated nginx
configs (a fixed-body origin and a keep-alive reverse proxy), starting the
sidecar from a command template, running ``wrk`` (optionally with a Lua
script) and parsing its report, the interleaved warm-up-then-repeats order
of wrk runs, one-shot HTTP checks, medians and percentiles, and the run's
frame: SIGTERM turned into ``SystemExit``, progress on stderr, the common
flags (``--quick``, ``--duration-s``, ``--repeats``, ``--only``,
``--concurrency``, ``--sidecar-cmd``, ``--one-core``, ``--json``), legs,
records and their ratios, targets (``Verdict``), failed legs, the plain-text
tables and the report's tail (JSON lines, ``--json`` file, ``rerun with:``
line, exit status). Not here: what a benchmark measures, its targets and
thresholds (the ``bench_*.py`` scripts) or the Python upstream
(``bench/upstream.py``).

Invariants: every process is started by ``start_process`` and ended by
``stop_process`` with its own PID, never by name; a child is exec'd through
``taskset`` so the PID we hold is the program's own. Every wait is bounded by
a deadline. nginx runs from a private prefix directory (config, pid file,
error log and temp paths all inside it) and never reads ``/etc/nginx``.
Progress goes to stderr and the report to stdout, so the JSON lines can be
read from stdout alone.

Known limitations: nginx is stopped through its master PID only; if the master
is killed with SIGKILL after ignoring SIGTERM, its worker is left to notice
the closed channel and exit on its own. Pinning needs ``taskset`` and two
allowed CPUs; with fewer, everything runs unpinned and the scripts say so,
and the proxy then competes with the load generator for CPU. The module
holds several nouns (processes, wrk, reports); it is one file so that each
script imports one rig.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Final, Literal

REPO: Final = Path(__file__).resolve().parent.parent
LOOPBACK: Final = "127.0.0.1"
WRK: Final = shutil.which("wrk") or "/usr/bin/wrk"
NGINX: Final = shutil.which("nginx") or "/usr/sbin/nginx"
TASKSET: Final = shutil.which("taskset")

# wrk's default is 2 s; a stalled proxy should show up as timeouts, not hang.
WRK_TIMEOUT_S: Final = 5
# Both ends keep connections for the whole run: nginx's default of 1000
# requests per connection would make every run measure reconnects too.
KEEPALIVE_REQUESTS: Final = 1_000_000
LOG_TAIL_LINES: Final = 15
# wrk connections of the untimed run that warms every leg before measuring.
WARMUP_CONNECTIONS: Final = 16
WARMUP_S: Final = 1.0
DEFAULT_SIDECAR_CMD: Final = (
    "{python} -m sidecar serve --upstream {upstream} --listen 127.0.0.1:{port}"
    " --admin-listen 127.0.0.1:{admin_port} --data-dir {data_dir}"
)
SIDECAR_READY_LINE: Final = "sidecar.listening"
SIDECAR_START_TIMEOUT_S: Final = 30.0

# One measurement, target or failure, ready for ``json_line``.
Record = dict[str, Any]


class RigError(Exception):
    """A benchmark step that could not run; the message says which and why.

    The bench scripts are tools outside the ``sidecar`` package, so they keep
    their own error instead of borrowing the proxy's tree.
    """


# -- CPU pinning ---------------------------------------------------------


@dataclass(frozen=True)
class CpuPlan:
    """Which CPU runs the proxy under test and which runs everything else."""

    proxy_cpu: int | None
    load_cpu: int | None

    def describe(self) -> str:
        if self.proxy_cpu is None or self.load_cpu is None:
            return "pinning: none (needs taskset and 2 CPUs); results are noisier"
        if self.proxy_cpu == self.load_cpu:
            return (
                "pinning: proxy under test, upstream, load generator and clients "
                f"all on cpu {self.load_cpu} (one-core layout)"
            )
        return (
            f"pinning: proxy under test on cpu {self.proxy_cpu}; "
            f"upstream, load generator and clients on cpu {self.load_cpu}"
        )


def plan_cpus(
    allowed: Iterable[int] | None = None, *, one_core: bool = False
) -> CpuPlan:
    """Put the proxy on the first allowed CPU and the load on the second.

    With ``one_core`` everything shares the second CPU instead. On a VM, a
    request that crosses to an idle CPU waits for that CPU to wake (well
    over 100 us each way on some hosts), which swamps what a proxy adds at
    concurrency 1; sharing one CPU measures the proxy's own work but lets it
    compete with the load generator for throughput.
    """
    cpus = sorted(os.sched_getaffinity(0) if allowed is None else allowed)
    if TASKSET is None or len(cpus) < (1 if one_core else 2):
        return CpuPlan(None, None)
    if one_core:
        shared = cpus[min(1, len(cpus) - 1)]
        return CpuPlan(shared, shared)
    return CpuPlan(cpus[0], cpus[1])


def pinned(argv: Sequence[str], cpu: int | None) -> list[str]:
    """``argv`` run through ``taskset`` (which execs, so the PID is kept)."""
    if cpu is None or TASKSET is None:
        return list(argv)
    return [TASKSET, "-c", str(cpu), *argv]


def pin_self(cpu: int | None) -> None:
    """Pin this process (and the children it starts unpinned) to ``cpu``."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


# -- ports and processes -------------------------------------------------


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((LOOPBACK, 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def port_open(port: int, host: str = LOOPBACK) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class Proc:
    """A process the rig started, with its combined output in ``log_path``."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` and its direct children, so far.

    For a server that forks workers (nginx) the children do the work. CPU
    time stolen by other tenants of the machine is not counted, so CPU per
    request moves less with the machine's load than requests per second.
    A process that is gone counts 0.
    """
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # Fields after the command name, which may hold spaces.
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) == pid or int(fields[1]) == pid:
            total += int(fields[11]) + int(fields[12])
    return total / tick


def start_process(
    name: str,
    argv: Sequence[str],
    *,
    log_path: Path,
    cpu: int | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Proc:
    """Start ``argv`` pinned to ``cpu``, stdout and stderr into ``log_path``."""
    with open(log_path, "wb") as log:
        try:
            popen = subprocess.Popen(
                pinned(argv, cpu),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=None if env is None else dict(env),
                cwd=cwd,
            )
        except OSError as exc:
            raise RigError(f"{name}: cannot start {argv[0]}: {exc}") from exc
    return Proc(name, popen, log_path)


def start_ready(
    name: str,
    argv: Sequence[str],
    *,
    log_path: Path,
    port: int,
    cpu: int | None = None,
    line: str | None = None,
    timeout_s: float = 20.0,
) -> Proc:
    """``start_process`` then ``wait_ready``; a process that fails is stopped."""
    proc = start_process(name, argv, log_path=log_path, cpu=cpu, cwd=REPO)
    try:
        wait_ready(proc, port=port, line=line, timeout_s=timeout_s)
    except BaseException:
        stop_process(proc)
        raise
    return proc


def stop_process(proc: Proc, timeout_s: float = 5.0) -> None:
    """End ``proc`` by its PID: SIGTERM, then SIGKILL after ``timeout_s``."""
    if not proc.alive():
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.popen.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.popen.wait(timeout=timeout_s)


def wait_ready(
    proc: Proc, *, port: int, line: str | None = None, timeout_s: float = 20.0
) -> None:
    """Return once ``proc`` logs ``line`` or accepts on ``port``.

    Either signal is enough: a program that never logs ``line`` (a
    calibration proxy given with ``--sidecar-cmd``) is ready once it accepts.
    Raises ``RigError`` with the end of its log if it exits or times out.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            status = proc.popen.returncode
            raise RigError(
                _log_message(proc, f"exited with status {status} before ready")
            )
        if line is not None and line in proc.log_tail(lines=200):
            return
        if port_open(port):
            return
        time.sleep(0.05)
    raise RigError(
        _log_message(proc, f"not ready on port {port} after {timeout_s:.0f} s")
    )


def _log_message(proc: Proc, what: str) -> str:
    """``what`` happened, then the last log line on the first line, then more."""
    tail = proc.log_tail()
    last = next((ln.strip() for ln in reversed(tail.splitlines()) if ln.strip()), "")
    return f"{proc.name} {what}: {last or 'no output'}\nlog {proc.log_path}:\n{tail}"


def python_path() -> str:
    """The project's virtualenv interpreter, or this one when there is none."""
    python = REPO / ".venv" / "bin" / "python"
    return str(python) if python.exists() else sys.executable


def start_sidecar(
    template: str,
    upstream_port: int,
    home: Path,
    *,
    cpu: int | None,
    stack: ExitStack,
) -> tuple[str, Proc]:
    """The sidecar (``template``, see ``--sidecar-cmd``) before ``upstream_port``.

    Its data directory and log live in ``home``; it counts as ready when it
    logs ``SIDECAR_READY_LINE`` or accepts, and ``stack`` stops it. Returns
    its base URL and its process.
    """
    port, admin_port = free_ports(2)
    data_dir = home / "data"
    data_dir.mkdir(parents=True)
    fields = {
        "python": python_path(),
        "upstream": f"http://{LOOPBACK}:{upstream_port}",
        "port": port,
        "admin_port": admin_port,
        "data_dir": str(data_dir),
    }
    proc = start_ready(
        "sidecar",
        command_from_template(template, fields),
        log_path=home / "stderr.log",
        cpu=cpu,
        port=port,
        line=SIDECAR_READY_LINE,
        timeout_s=SIDECAR_START_TIMEOUT_S,
    )
    stack.callback(stop_process, proc)
    return f"http://{LOOPBACK}:{port}", proc


# -- nginx ----------------------------------------------------------------


def _nginx_quote(text: str) -> str:
    """``text`` as an nginx single-quoted string."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _nginx_main(prefix: Path, http_body: str) -> str:
    """The parts every generated config shares, around ``http_body``."""
    p = prefix.resolve()
    temp_paths = "".join(
        f'    {kind}_temp_path "{p}/{kind}_temp";\n'
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        "worker_processes 1;\n"
        f'pid "{p}/nginx.pid";\n'
        f'error_log "{p}/error.log" warn;\n'
        "events {\n    worker_connections 4096;\n}\n"
        "http {\n"
        "    access_log off;\n"
        f"    keepalive_requests {KEEPALIVE_REQUESTS};\n"
        "    keepalive_timeout 75s;\n"
        f"{temp_paths}"
        f"{http_body}"
        "}\n"
    )


def nginx_origin_config(prefix: Path, port: int, body: str) -> str:
    """An nginx that answers every request with ``body`` as JSON."""
    server = (
        "    server {\n"
        f"        listen {LOOPBACK}:{port};\n"
        "        location / {\n"
        "            default_type application/json;\n"
        f"            return 200 {_nginx_quote(body)};\n"
        "        }\n"
        "    }\n"
    )
    return _nginx_main(prefix, server)


def nginx_proxy_config(
    prefix: Path, port: int, upstream_port: int, *, buffering: bool = True
) -> str:
    """An nginx reverse proxy to ``upstream_port`` with upstream keep-alive.

    ``buffering=False`` relays each chunk as it arrives, which is what an SSE
    stream needs and what the sidecar is compared against.
    """
    buffering_line = "" if buffering else "            proxy_buffering off;\n"
    body = (
        "    upstream bench_upstream {\n"
        f"        server {LOOPBACK}:{upstream_port};\n"
        "        keepalive 64;\n"
        f"        keepalive_requests {KEEPALIVE_REQUESTS};\n"
        "    }\n"
        "    server {\n"
        f"        listen {LOOPBACK}:{port};\n"
        "        location / {\n"
        "            proxy_pass http://bench_upstream;\n"
        "            proxy_http_version 1.1;\n"
        '            proxy_set_header Connection "";\n'
        f"{buffering_line}"
        "        }\n"
        "    }\n"
    )
    return _nginx_main(prefix, body)


def nginx_argv(prefix: Path, *, test_only: bool = False) -> list[str]:
    """The nginx command for the config in ``prefix/nginx.conf``, foreground."""
    p = prefix.resolve()
    argv = [
        NGINX,
        "-p",
        str(p),
        "-c",
        str(p / "nginx.conf"),
        "-e",
        str(p / "error.log"),
    ]
    return [*argv, "-t", "-q"] if test_only else [*argv, "-g", "daemon off;"]


def start_nginx(
    name: str, prefix: Path, config: str, *, port: int, cpu: int | None
) -> Proc:
    """Write ``config`` into ``prefix`` and start nginx on it, ready on ``port``."""
    if not Path(NGINX).exists():
        raise RigError(f"{name}: nginx not found at {NGINX}")
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "nginx.conf").write_text(config)
    return start_ready(
        name, nginx_argv(prefix), log_path=prefix / "stderr.log", cpu=cpu, port=port
    )


# -- wrk --------------------------------------------------------------------


@dataclass(frozen=True)
class WrkResult:
    """One wrk run: throughput, latency percentiles and what went wrong."""

    requests_per_s: float
    p50_s: float
    p99_s: float
    requests: int
    non_2xx: int
    socket_errors: int

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors


_TIME_UNITS: Final = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PERCENTILE_RE: Final = re.compile(
    r"^\s*(\d+(?:\.\d+)?)%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.MULTILINE
)
_RPS_RE: Final = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_REQUESTS_RE: Final = re.compile(r"^\s*(\d+) requests in ", re.MULTILINE)
_NON_2XX_RE: Final = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET_RE: Final = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"
)


def parse_wrk_time(text: str) -> float:
    """A wrk duration such as ``36.05us`` or ``1.20s``, in seconds."""
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if match is None:
        raise RigError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _TIME_UNITS[match.group(2)]


def parse_wrk(text: str) -> WrkResult:
    """The numbers in a ``wrk --latency`` report; ``RigError`` if any is missing."""
    percentiles = {
        float(m.group(1)): float(m.group(2)) * _TIME_UNITS[m.group(3)]
        for m in _PERCENTILE_RE.finditer(text)
    }
    rps = _RPS_RE.search(text)
    requests = _REQUESTS_RE.search(text)
    if (
        rps is None
        or requests is None
        or 50.0 not in percentiles
        or 99.0 not in percentiles
    ):
        raise RigError(f"unreadable wrk report (was --latency given?):\n{text.strip()}")
    non_2xx = _NON_2XX_RE.search(text)
    sockets = _SOCKET_RE.search(text)
    return WrkResult(
        requests_per_s=float(rps.group(1)),
        p50_s=percentiles[50.0],
        p99_s=percentiles[99.0],
        requests=int(requests.group(1)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(n) for n in sockets.groups()) if sockets else 0,
    )


def wrk_argv(
    url: str, *, connections: int, duration_s: float, script: Path | None = None
) -> list[str]:
    """One wrk thread (the load has one CPU), ``connections`` connections.

    ``script`` is a Lua file wrk runs to build its requests (a POST body).
    """
    script_args = [] if script is None else ["-s", str(script)]
    return [
        WRK,
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",
        f"--timeout={WRK_TIMEOUT_S}s",
        "--latency",
        *script_args,
        url,
    ]


def run_wrk(
    url: str,
    *,
    connections: int,
    duration_s: float,
    cpu: int | None,
    script: Path | None = None,
) -> WrkResult:
    """Run wrk against ``url`` on ``cpu`` (with Lua ``script``), parse its report."""
    command = wrk_argv(
        url, connections=connections, duration_s=duration_s, script=script
    )
    argv = pinned(command, cpu)
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=duration_s + 30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RigError(f"wrk failed to run: {exc}") from exc
    if done.returncode != 0:
        raise RigError(f"wrk exited {done.returncode}: {done.stderr.strip()}")
    return parse_wrk(done.stdout)


def wrk_line(
    name: str, connections: int, result: WrkResult, unit: str = "req/s"
) -> str:
    """One wrk run as a progress line: leg, connections, rate, p50, p99, errors."""
    return (
        f"{name:8} c={connections:<3} {fmt_rate(result.requests_per_s):>9} {unit}"
        f"  p50 {fmt_latency(result.p50_s)}  p99 {fmt_latency(result.p99_s)}"
        + (f"  errors {result.errors}" if result.errors else "")
    )


def wrk_medians(runs: Sequence[WrkResult]) -> Record:
    """Requests per second, p50 and p99 (us): medians of ``runs``; errors summed."""
    return {
        "requests_per_s": median([r.requests_per_s for r in runs]),
        "p50_us": median([r.p50_s * 1e6 for r in runs]),
        "p99_us": median([r.p99_s * 1e6 for r in runs]),
        "errors": sum(r.errors for r in runs),
    }


def run_point(
    legs: dict[str, Leg],
    name: str,
    path: str,
    connections: int,
    *,
    duration_s: float,
    cpu: int | None,
    fail: Callable[[str, str], None],
    script: Path | None = None,
) -> WrkResult | None:
    """One wrk run against leg ``name`` at its URL plus ``path``; None if it failed.

    A leg whose run fails is dropped from ``legs``, and ``fail(leg, reason)``
    hears why, with the end of the leg's logs.
    """
    try:
        return run_wrk(
            legs[name].url + path,
            connections=connections,
            duration_s=duration_s,
            cpu=cpu,
            script=script,
        )
    except RigError as exc:
        fail(name, legs.pop(name).failure(str(exc)))
        return None


def run_interleaved(
    legs: Mapping[str, object],
    concurrencies: Sequence[int],
    repeats: int,
    run: Callable[[str, int, bool], None],
    *,
    label: str = "",
) -> None:
    """Warm every leg once, then ``run(leg, connections, warmup)`` for each point.

    Repeats outermost, legs innermost: drift on a shared machine then lands
    on every leg alike instead of on whichever ran last. ``run`` may drop a
    failed leg from ``legs``; the legs are read again before every round.
    """
    for name in list(legs):
        run(name, WARMUP_CONNECTIONS, True)
    for repeat in range(repeats):
        for connections in concurrencies:
            for name in list(legs):
                run(name, connections, False)
        progress(f"{label}repeat {repeat + 1}/{repeats} done")


# -- legs and one-shot requests ----------------------------------------------


@dataclass(frozen=True)
class Leg:
    """A started leg: where to send requests and the process behind it.

    ``proc`` is None for a leg the benchmark talks to directly; nginx
    reports request failures in ``error_log``, not on its stderr.
    """

    name: str
    url: str
    proc: Proc | None
    error_log: Path | None = None

    def failure(self, what: str) -> str:
        """``what`` went wrong, then the end of this leg's logs if it has any."""
        if self.proc is None:
            return what
        text = f"{what}\nlog {self.proc.log_path}:\n{self.proc.log_tail()}"
        if self.error_log is not None and self.error_log.exists():
            lines = self.error_log.read_text(errors="replace").splitlines()
            tail = "\n".join(lines[-LOG_TAIL_LINES:])
            text += f"\nlog {self.error_log}:\n{tail}"
        return text

    def cpu_seconds(self) -> float:
        """CPU time of the leg's processes so far; 0 without a process."""
        return 0.0 if self.proc is None else cpu_seconds(self.proc.pid)


def fetch(
    url: str,
    *,
    method: str = "GET",
    data: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    expect: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request: status, lower-cased headers and body, error statuses too.

    With ``expect``, anything but a 200 with exactly that body raises
    ``RigError``, as does a request that cannot be sent.
    """
    request = urllib.request.Request(
        url, data=data, method=method, headers=dict(headers or {})
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            status, got, body = response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        status, got, body = exc.code, exc.headers, exc.read()
    except OSError as exc:
        raise RigError(f"{method} {url} failed: {exc}") from exc
    check_answer(f"{method} {url}", status, body, expect)
    return status, {name.lower(): value for name, value in got.items()}, body


def check_answer(what: str, status: int, body: bytes, expect: bytes | None) -> None:
    """``RigError`` unless ``what`` got a 200 with body ``expect`` (None: any)."""
    if expect is not None and (status != 200 or body != expect):
        raise RigError(f"{what} answered {status} {body[:200]!r}")


# -- statistics -------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    """The median of a non-empty sequence (the mean of the middle two)."""
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (0 < q <= 100) of ``values``."""
    if not values or not 0 < q <= 100:
        raise ValueError("percentile needs values and 0 < q <= 100")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def ratio(value: float | None, base: float | None) -> float | None:
    """``value / base``, or None when either is missing or ``base`` is not > 0."""
    if value is None or base is None or base <= 0:
        return None
    return value / base


# -- output -------------------------------------------------------------


def fmt_latency(seconds: float | None) -> str:
    """``38 us``, ``1.23 ms``, ``2.10 s``, or ``-`` when missing."""
    if seconds is None:
        return "-"
    if abs(seconds) < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if abs(seconds) < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_rate(per_s: float | None) -> str:
    return "-" if per_s is None else f"{per_s:,.0f}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def fmt_us(micros: float | None) -> str:
    return "-" if micros is None else fmt_latency(micros * 1e-6)


def fmt_plain(value: object) -> str:
    return "-" if value is None else str(value)


# A table column: header, record field, and how to show the field's value.
Column = tuple[str, str, Callable[[Any], str]]


def wrk_columns(rate: str = "req/s") -> tuple[Column, ...]:
    """The first columns of a wrk table: leg, connections, rate, p50, p99."""
    return (
        ("leg", "leg", fmt_plain),
        ("conns", "concurrency", fmt_plain),
        (rate, "requests_per_s", fmt_rate),
        ("p50", "p50_us", fmt_us),
        ("p99", "p99_us", fmt_us),
    )


def format_records(
    records: Sequence[Mapping[str, Any]], columns: Sequence[Column]
) -> str:
    """``records`` as a table, one row each; a missing field shows ``-``."""
    if not records:
        return "(nothing measured)"
    rows = [[show(r.get(key)) for _, key, show in columns] for r in records]
    return format_table([header for header, _, _ in columns], rows)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def json_line(record: Mapping[str, Any]) -> str:
    """One measurement as one compact JSON line (floats rounded for reading)."""

    def rounded(value: Any) -> Any:
        if isinstance(value, float):
            return round(value, 9)
        if isinstance(value, dict):
            return {k: rounded(v) for k, v in value.items()}
        if isinstance(value, list):
            return [rounded(v) for v in value]
        return value

    return json.dumps(rounded(dict(record)), separators=(",", ":"), sort_keys=False)


def write_json_lines(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    path.write_text("".join(json_line(r) + "\n" for r in records))


def command_from_template(template: str, fields: Mapping[str, object]) -> list[str]:
    """Split ``template`` like a shell and fill ``{name}`` fields in each word.

    Raises ``RigError`` naming the field when the template uses an unknown one.
    """
    try:
        return [word.format(**fields) for word in shlex.split(template)]
    except KeyError as exc:
        known = ", ".join(f"{{{name}}}" for name in fields)
        raise RigError(f"unknown field {exc} in command; known: {known}") from exc
    except (ValueError, IndexError) as exc:
        raise RigError(f"malformed command {template!r}: {exc}") from exc


def rerun_line(module: str, argv: Sequence[str]) -> str:
    """The command that reruns ``module`` with the same arguments."""
    python = REPO / ".venv" / "bin" / "python"
    interpreter = ".venv/bin/python" if python.exists() else sys.executable
    command = shlex.join([interpreter, "-m", module, *argv])
    return f"rerun with: cd {shlex.quote(str(REPO))} && {command}"


# -- the run ------------------------------------------------------------------


def progress(text: str) -> None:
    """``text`` on stderr at once, apart from the report on stdout."""
    print(text, file=sys.stderr, flush=True)


def raise_exit(signum: int, frame: FrameType | None) -> None:
    """A signal handler that raises ``SystemExit(128 + signum)``.

    SIGTERM (from run_all's budget) then unwinds the ExitStacks, which stop
    every process the run started.
    """
    raise SystemExit(128 + signum)


def begin_run(*, one_core: bool, sidecar_cmd: str | None = None) -> CpuPlan:
    """Trap SIGTERM, plan the CPUs, pin this process to the load CPU, say so.

    ``sidecar_cmd``, for a run with a sidecar leg, is announced too.
    """
    signal.signal(signal.SIGTERM, raise_exit)
    plan = plan_cpus(one_core=one_core)
    pin_self(plan.load_cpu)
    progress(plan.describe())
    if sidecar_cmd is not None:
        progress(f"sidecar command: {sidecar_cmd}")
    return plan


def run_fields(plan: CpuPlan, duration_s: float, repeats: int) -> Record:
    """The setup fields every wrk benchmark records: run length, CPUs, load."""
    return {
        "duration_s": duration_s,
        "repeats": repeats,
        "proxy_cpu": plan.proxy_cpu,
        "load_cpu": plan.load_cpu,
        "loadavg": list(os.getloadavg()),
    }


def sidecar_fields(sidecar_cmd: str) -> Record:
    """The setup fields of a run with a sidecar leg: its command, its log level."""
    return {
        "sidecar_cmd": sidecar_cmd,
        "sidecar_log_level": os.environ.get("SIDECAR_LOG_LEVEL"),
    }


# -- command line ---------------------------------------------------------------


def add_length_args(parser: argparse.ArgumentParser) -> None:
    """``--duration-s`` and ``--repeats``; ``run_length`` reads them."""
    parser.add_argument("--duration-s", type=float, help="seconds per wrk run (5)")
    parser.add_argument("--repeats", type=int, help="runs per point, median kept (3)")


def run_length(args: argparse.Namespace) -> tuple[float, int]:
    """Seconds per wrk run and repeats: as given, else 2 s x 1 quick, 5 s x 3."""
    duration_s = args.duration_s or (2.0 if args.quick else 5.0)
    repeats = max(1, args.repeats or (1 if args.quick else 3))
    return duration_s, repeats


def add_sidecar_cmd_arg(parser: argparse.ArgumentParser) -> None:
    """``--sidecar-cmd``: the template ``start_sidecar`` fills."""
    parser.add_argument(
        "--sidecar-cmd",
        default=DEFAULT_SIDECAR_CMD,
        help="command for the sidecar leg; fields: {python} {upstream} {port} "
        "{admin_port} {data_dir}",
    )


def add_layout_args(
    parser: argparse.ArgumentParser,
    *,
    one_core_help: str = "run the proxy on the load CPU too (no cross-CPU wake-ups)",
) -> None:
    """``--one-core`` (see ``plan_cpus``) and ``--json FILE``."""
    parser.add_argument("--one-core", action="store_true", help=one_core_help)
    parser.add_argument("--json", type=Path, help="also write the JSON lines here")


def parse_list(text: str) -> tuple[str, ...]:
    """The non-empty comma-separated parts of ``text``, stripped."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def legs_arg(
    parser: argparse.ArgumentParser, text: str, known: Sequence[str]
) -> tuple[str, ...]:
    """The legs ``--only`` names, in ``known`` order; a parser error otherwise."""
    legs = parse_list(text)
    if not legs or set(legs) - set(known):
        parser.error(f"--only takes {','.join(known)}; got {text!r}")
    return tuple(leg for leg in known if leg in legs)


def concurrencies_arg(
    parser: argparse.ArgumentParser, text: str, example: str
) -> tuple[int, ...]:
    """The connection counts ``--concurrency`` names; a parser error otherwise."""
    try:
        concurrencies = tuple(int(c) for c in parse_list(text))
    except ValueError:
        parser.error(f"--concurrency takes numbers such as {example}; got {text!r}")
    if not concurrencies or min(concurrencies) < 1:
        parser.error("--concurrency needs at least one number >= 1")
    return concurrencies


# -- records, targets and the report -------------------------------------------

Result = Literal["PASS", "FAIL", "SKIP"]


@dataclass(frozen=True)
class Verdict:
    """One target: ``PASS``, ``FAIL`` or ``SKIP`` (could not be judged)."""

    target: str
    result: Result
    detail: str

    def record(self, bench: str) -> Record:
        return {"bench": bench, "kind": "target", **dataclasses.asdict(self)}


def verdict(target: str, passed: bool, detail: str) -> Verdict:
    """``PASS`` when ``passed``, else ``FAIL``."""
    return Verdict(target, "PASS" if passed else "FAIL", detail)


def find(records: Sequence[Record], **match: Any) -> Record | None:
    """The first record whose fields equal ``match``."""
    for record in records:
        if all(record.get(k) == v for k, v in match.items()):
            return record
    return None


def add_ratios(
    records: Sequence[Record],
    fields: Sequence[str],
    bases: Sequence[str],
    **same: Any,
) -> None:
    """Add ``<field>_vs_<base>`` to the records matching ``same``.

    The base is the matching record of leg ``base``; without one the ratio
    is None.
    """
    group = [r for r in records if all(r.get(k) == v for k, v in same.items())]
    for base in bases:
        other = find(group, leg=base)
        for record in group:
            for name in fields:
                value = other[name] if other else None
                record[f"{name}_vs_{base}"] = ratio(record[name], value)


def failure_record(
    bench: str, leg: str, reason: str, scenario: str | None = None
) -> Record:
    """Why ``leg`` (``all``: the whole run) stopped being measured."""
    where = {"leg": leg} if scenario is None else {"leg": leg, "scenario": scenario}
    return {"bench": bench, "kind": "failure", **where, "reason": reason}


def finish_report(
    bench: str,
    measured: Sequence[Record],
    failures: Sequence[Record],
    verdicts: Sequence[Verdict],
    *,
    json_path: Path | None,
    argv: Sequence[str],
) -> int:
    """Print failed legs, targets, JSON lines and the rerun line; the exit status.

    Every record goes to stdout, one JSON line each (measurements, then
    failures, then targets), and to ``json_path`` when given. The status is
    1 when a leg failed or a target failed.
    """
    if failures:
        print("\nfailed legs")
        for failure in failures:
            scenario = failure.get("scenario")
            where = failure["leg"] + (f" ({scenario})" if scenario else "")
            print(f"  {where}: {str(failure['reason']).splitlines()[0]}")
    if verdicts:
        print("\ntargets for the sidecar")
        for target in verdicts:
            print(f"{target.result} {target.target}: {target.detail}")

    records = [*measured, *failures, *(v.record(bench) for v in verdicts)]
    print()
    for record in records:
        print(json_line(record))
    if json_path is not None:
        write_json_lines(json_path, records)
        print(f"wrote {len(records)} JSON lines to {json_path}")
    print(rerun_line(f"bench.bench_{bench}", argv))
    failed = bool(failures) or any(v.result == "FAIL" for v in verdicts)
    return 1 if failed else 0
