"""The benchmark rig: processes, ports, pinning, nginx configs, wrk and tables.

Owns what every ``bench/bench_*.py`` script shares: starting a process pinned
to a CPU and stopping it by PID, free loopback ports, the generated nginx
configs (a fixed-body origin and a keep-alive reverse proxy), running ``wrk``
and parsing its report, medians and percentiles, and the plain-text tables
and JSON lines the scripts print. Not here: what a benchmark measures (the
``bench_*.py`` scripts) or the Python upstream (``bench/upstream.py``).

Invariants: every process is started by ``start_process`` and ended by
``stop_process`` with its own PID, never by name; a child is exec'd through
``taskset`` so the PID we hold is the program's own. Every wait is bounded by
a deadline. nginx runs from a private prefix directory (config, pid file,
error log and temp paths all inside it) and never reads ``/etc/nginx``.

Known limitations: nginx is stopped through its master PID only; if the master
is killed with SIGKILL after ignoring SIGTERM, its worker is left to notice
the closed channel and exit on its own. Pinning needs ``taskset`` and two
allowed CPUs; with fewer, everything runs unpinned and the scripts say so,
and the proxy then competes with the load generator for CPU.
"""

from __future__ import annotations

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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

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


def wrk_argv(url: str, *, connections: int, duration_s: float) -> list[str]:
    """One wrk thread (the load has one CPU), ``connections`` connections."""
    return [
        WRK,
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",
        f"--timeout={WRK_TIMEOUT_S}s",
        "--latency",
        url,
    ]


def run_wrk(
    url: str, *, connections: int, duration_s: float, cpu: int | None
) -> WrkResult:
    """Run wrk against ``url`` on ``cpu`` and parse its report."""
    argv = pinned(wrk_argv(url, connections=connections, duration_s=duration_s), cpu)
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=duration_s + 30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RigError(f"wrk failed to run: {exc}") from exc
    if done.returncode != 0:
        raise RigError(f"wrk exited {done.returncode}: {done.stderr.strip()}")
    return parse_wrk(done.stdout)


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
