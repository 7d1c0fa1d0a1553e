"""The benchmark rig's parsing and generated configs (``bench/rig.py``).

Fast and offline: wrk reports are fixed text, nginx is only asked to check
a config (``nginx -t``), CPU accounting is checked on short-lived local
processes, and no benchmark is run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import rig, run_all, upstream

WRK_REPORT = """\
Running 1s test @ http://127.0.0.1:44631/
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    87.78us  306.85us   4.24ms   95.81%
    Req/Sec    93.60k     8.54k  105.78k    63.64%
  Latency Distribution
     50%   28.00us
     75%   37.00us
     90%   55.00us
     99%    1.66ms
  102207 requests in 1.10s, 15.60MB read
Requests/sec:  92909.71
Transfer/sec:     14.18MB
"""

WRK_ERRORS = """\
  Latency Distribution
     50%    1.20s
     75%    1.50s
     90%    2.00s
     99%    2.50m
  40 requests in 5.00s, 4.00KB read
  Socket errors: connect 1, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 12
Requests/sec:      8.00
"""


def test_parse_wrk_report_reads_throughput_and_percentiles() -> None:
    """A --latency report gives requests/s, p50, p99 and the request count."""
    result = rig.parse_wrk(WRK_REPORT)

    assert result.requests_per_s == pytest.approx(92909.71)
    assert result.p50_s == pytest.approx(28e-6)
    assert result.p99_s == pytest.approx(1.66e-3)
    assert result.requests == 102207
    assert result.errors == 0


def test_parse_wrk_error_lines_count_sockets_and_statuses() -> None:
    """Socket errors of every kind and non-2xx answers all count as errors."""
    result = rig.parse_wrk(WRK_ERRORS)

    assert (result.socket_errors, result.non_2xx, result.errors) == (6, 12, 18)
    assert result.p50_s == pytest.approx(1.2)
    assert result.p99_s == pytest.approx(150.0)


def test_parse_wrk_without_latency_distribution_raises() -> None:
    """A report run without --latency is refused, not read as zero latency."""
    without = WRK_REPORT.split("  Latency Distribution")[0] + "Requests/sec: 1.0\n"

    with pytest.raises(rig.RigError, match="--latency"):
        rig.parse_wrk(without)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("36.05us", 36.05e-6), ("1.66ms", 1.66e-3), ("1.20s", 1.2), ("2.00m", 120.0)],
)
def test_parse_wrk_time_units_convert_to_seconds(text: str, seconds: float) -> None:
    """wrk's us, ms, s and m suffixes are read as seconds."""
    assert rig.parse_wrk_time(text) == pytest.approx(seconds)


def test_parse_wrk_time_unknown_unit_raises() -> None:
    """A duration in a unit wrk never prints is an error."""
    with pytest.raises(rig.RigError):
        rig.parse_wrk_time("3ns")


def test_percentile_nearest_rank_picks_a_sample() -> None:
    """Percentiles are nearest-rank: always one of the samples."""
    values = [float(v) for v in range(100, 0, -1)]

    assert rig.percentile(values, 50) == 50.0
    assert rig.percentile(values, 99) == 99.0
    assert rig.percentile(values, 100) == 100.0
    assert rig.percentile([7.0], 99) == 7.0


def test_percentile_of_nothing_raises() -> None:
    """An empty sample has no percentile."""
    with pytest.raises(ValueError):
        rig.percentile([], 50)


def test_median_even_count_averages_middle_pair() -> None:
    """The median of repeats with an even count is the middle pair's mean."""
    assert rig.median([4.0, 1.0, 3.0, 2.0]) == 2.5


def test_ratio_missing_or_zero_base_is_none() -> None:
    """A ratio against a missing or zero base is unknown, not infinite."""
    assert rig.ratio(2.0, 4.0) == 0.5
    assert rig.ratio(2.0, 0.0) is None
    assert rig.ratio(None, 4.0) is None


def test_nginx_proxy_config_keeps_upstream_connections_alive(tmp_path: Path) -> None:
    """The proxy config pools upstream connections over HTTP/1.1."""
    text = rig.nginx_proxy_config(tmp_path, 8100, 8200)

    assert "server 127.0.0.1:8200;" in text
    assert "keepalive 64;" in text
    assert "proxy_http_version 1.1;" in text
    assert 'proxy_set_header Connection "";' in text
    assert "worker_processes 1;" in text
    assert "proxy_buffering" not in text


def test_nginx_proxy_config_without_buffering_turns_it_off(tmp_path: Path) -> None:
    """buffering=False relays chunks as they arrive, as SSE needs."""
    text = rig.nginx_proxy_config(tmp_path, 8100, 8200, buffering=False)

    assert "proxy_buffering off;" in text


def test_nginx_config_keeps_pid_and_logs_in_prefix(tmp_path: Path) -> None:
    """The pid file, error log and temp paths all live in the prefix."""
    text = rig.nginx_origin_config(tmp_path, 8100, "{}")
    prefix = str(tmp_path.resolve())

    assert f'pid "{prefix}/nginx.pid";' in text
    assert f'error_log "{prefix}/error.log" warn;' in text
    assert f'proxy_temp_path "{prefix}/proxy_temp";' in text
    assert "/etc/nginx" not in text and "/var/" not in text


def test_nginx_origin_config_escapes_body_quotes(tmp_path: Path) -> None:
    """The fixed body is one nginx string even with quotes and backslashes."""
    text = rig.nginx_origin_config(tmp_path, 8100, """{"a":"it's \\ ok"}""")

    assert """return 200 '{"a":"it\\'s \\\\ ok"}';""" in text
    assert "default_type application/json;" in text


@pytest.mark.skipif(not Path(rig.NGINX).exists(), reason="nginx is not installed")
@pytest.mark.parametrize("kind", ["origin", "proxy", "proxy-unbuffered"])
def test_nginx_generated_config_passes_nginx_check(tmp_path: Path, kind: str) -> None:
    """nginx itself accepts every config the rig generates (nginx -t)."""
    if kind == "origin":
        text = rig.nginx_origin_config(tmp_path, 8100, upstream.FIXED_BODY.decode())
    else:
        text = rig.nginx_proxy_config(tmp_path, 8100, 8200, buffering=kind == "proxy")
    (tmp_path / "nginx.conf").write_text(text)

    done = subprocess.run(
        rig.nginx_argv(tmp_path, test_only=True),
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert done.returncode == 0, done.stderr


def test_nginx_argv_runs_in_foreground_from_prefix(tmp_path: Path) -> None:
    """nginx is started in the foreground on the prefix's own config."""
    argv = rig.nginx_argv(tmp_path)
    prefix = str(tmp_path.resolve())

    assert argv[1:5] == ["-p", prefix, "-c", f"{prefix}/nginx.conf"]
    assert argv[-2:] == ["-g", "daemon off;"]


def test_wrk_argv_asks_for_latency_with_one_thread() -> None:
    """wrk gets one thread, the connections, a whole-second duration, --latency."""
    argv = rig.wrk_argv("http://127.0.0.1:1/x", connections=64, duration_s=2.4)

    assert argv[1:4] == ["-t1", "-c64", "-d2s"]
    assert "--latency" in argv and argv[-1] == "http://127.0.0.1:1/x"


def test_pinned_prefixes_taskset_only_with_a_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A CPU means ``taskset -c N argv``; no CPU leaves argv as it is."""
    monkeypatch.setattr(rig, "TASKSET", "/usr/bin/taskset")

    assert rig.pinned(["wrk"], 1) == ["/usr/bin/taskset", "-c", "1", "wrk"]
    assert rig.pinned(["wrk"], None) == ["wrk"]


def test_plan_cpus_two_cpus_split_proxy_from_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With two CPUs the proxy gets the first and the load the second."""
    monkeypatch.setattr(rig, "TASKSET", "/usr/bin/taskset")

    assert rig.plan_cpus([0, 1]) == rig.CpuPlan(0, 1)
    assert rig.plan_cpus([0, 1], one_core=True) == rig.CpuPlan(1, 1)
    assert rig.plan_cpus([3]) == rig.CpuPlan(None, None)


def test_plan_cpus_without_taskset_pins_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without taskset nothing is pinned, and the plan says so."""
    monkeypatch.setattr(rig, "TASKSET", None)

    plan = rig.plan_cpus([0, 1])

    assert plan == rig.CpuPlan(None, None)
    assert "none" in plan.describe()


def test_command_from_template_fills_each_word() -> None:
    """Fields are filled per shell word, so a path with spaces stays one word."""
    argv = rig.command_from_template(
        "{python} -m sidecar serve --listen 127.0.0.1:{port} --data-dir '{data_dir}'",
        {"python": "py", "port": 8090, "data_dir": "/tmp/a b"},
    )

    assert argv == [
        "py",
        "-m",
        "sidecar",
        "serve",
        "--listen",
        "127.0.0.1:8090",
        "--data-dir",
        "/tmp/a b",
    ]


def test_command_from_template_unknown_field_raises() -> None:
    """A field the rig does not know is named in the error."""
    with pytest.raises(rig.RigError, match="'upstrem'"):
        rig.command_from_template("x --upstream {upstrem}", {"upstream": "u"})


def test_format_records_missing_field_shows_dash() -> None:
    """A record without a column's field shows ``-`` in that cell."""
    columns: list[rig.Column] = [
        ("leg", "leg", rig.fmt_plain),
        ("p50", "p50_us", rig.fmt_us),
        ("ratio", "vs", rig.fmt_ratio),
    ]
    table = rig.format_records([{"leg": "nginx", "p50_us": 38.0}], columns)

    assert table.splitlines()[-1].split() == ["nginx", "38", "us", "-"]


def test_fmt_latency_picks_unit_by_size() -> None:
    """Latencies print in us below 1 ms, ms below 1 s, s above."""
    assert rig.fmt_latency(38e-6) == "38 us"
    assert rig.fmt_latency(1.234e-3) == "1.23 ms"
    assert rig.fmt_latency(2.5) == "2.50 s"


def test_json_line_is_one_compact_line() -> None:
    """Each measurement is one JSON line, floats rounded to 9 places."""
    line = rig.json_line({"leg": "nginx", "p50_us": 1 / 3, "runs": [{"x": 2 / 3}]})

    assert line == '{"leg":"nginx","p50_us":0.333333333,"runs":[{"x":0.666666667}]}'


def test_sse_event_round_trips_send_time() -> None:
    """The client reads back exactly the send time the upstream wrote."""
    event = upstream.encode_event(7, 123456789, pad=5)
    data_line = next(ln for ln in event.split(b"\n") if ln.startswith(b"data:"))

    assert upstream.sent_ns_of(data_line) == 123456789
    assert upstream.sent_ns_of(b"data: [DONE]") is None
    assert upstream.sent_ns_of(b"id: 7") is None


def test_run_all_discover_orders_known_benchmarks_first(tmp_path: Path) -> None:
    """Known benchmarks run in the fixed order, any others after, by name."""
    for name in ("bench_zeta.py", "bench_store.py", "bench_alpha.py", "bench_proxy.py"):
        (tmp_path / name).write_text("")
    (tmp_path / "rig.py").write_text("")

    assert run_all.discover(tmp_path) == ["proxy", "store", "alpha", "zeta"]


def test_rerun_line_repeats_the_arguments() -> None:
    """The rerun line quotes every argument as given."""
    line = rig.rerun_line(
        "bench.bench_proxy", ["--only", "direct,nginx", "--sidecar-cmd", "a b"]
    )

    assert line.startswith("rerun with: cd ")
    assert line.endswith("-m bench.bench_proxy --only direct,nginx --sidecar-cmd 'a b'")


def test_rig_cpu_seconds_grows_with_work() -> None:
    """cpu_seconds counts the CPU time a process spends, in clock ticks."""
    before = rig.cpu_seconds(os.getpid())
    deadline = time.process_time() + 0.1
    while time.process_time() < deadline:
        pass
    assert rig.cpu_seconds(os.getpid()) - before >= 0.05


def test_rig_cpu_seconds_of_a_child_includes_its_children() -> None:
    """A parent that only waits is charged its child's CPU time."""
    burn = "import time\nt = time.process_time() + 0.2\nwhile time.process_time() < t: pass\n"
    parent = subprocess.Popen(
        [sys.executable, "-c",
         "import subprocess, sys\n"
         f"child = subprocess.Popen([sys.executable, '-c', {burn!r}])\n"
         "print(child.pid, flush=True)\nsys.stdin.read()\nchild.wait()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        deadline = time.monotonic() + 10
        while rig.cpu_seconds(parent.pid) < 0.1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rig.cpu_seconds(parent.pid) >= 0.1
        assert rig.cpu_seconds(child_pid) <= rig.cpu_seconds(parent.pid)
    finally:
        assert parent.stdin is not None and parent.stdout is not None
        parent.stdin.close()
        parent.wait(timeout=10)
        parent.stdout.close()


def test_rig_cpu_seconds_of_a_gone_process_is_zero() -> None:
    """A PID nothing runs under counts no CPU time."""
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait(timeout=10)
    assert rig.cpu_seconds(finished.pid) == 0.0
