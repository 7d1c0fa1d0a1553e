"""The benchmark rig's parsing, generated configs and report helpers.

Covers ``bench/rig.py``. Fast and offline: wrk reports are fixed text, nginx
is only asked to check a config (``nginx -t``), CPU accounting is checked on
short-lived local processes, records and reports are built from fixed
values, and no benchmark is run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
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


def _wrk(rps: float, p50_s: float, p99_s: float, errors: int = 0) -> rig.WrkResult:
    return rig.WrkResult(rps, p50_s, p99_s, 100, errors, 0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench")
    parser.add_argument("--quick", action="store_true")
    rig.add_length_args(parser)
    return parser


def test_wrk_argv_script_goes_before_the_url() -> None:
    """A Lua script is passed with -s, and the URL stays the last word."""
    argv = rig.wrk_argv(
        "http://127.0.0.1:1/x", connections=1, duration_s=1, script=Path("p.lua")
    )

    assert argv[-3:] == ["-s", "p.lua", "http://127.0.0.1:1/x"]


def test_wrk_line_shows_rate_latency_and_only_nonzero_errors() -> None:
    """The progress line names the leg, rate and percentiles; errors only if any."""
    clean = rig.wrk_line("nginx", 1, _wrk(9692.0, 98e-6, 256e-6))
    dirty = rig.wrk_line("sidecar", 64, _wrk(5.0, 1.2e-3, 2.5, 3), unit="hits/s")

    assert clean == "nginx    c=1       9,692 req/s  p50 98 us  p99 256 us"
    assert dirty.endswith("5 hits/s  p50 1.20 ms  p99 2.50 s  errors 3")


def test_wrk_medians_take_medians_and_sum_errors() -> None:
    """Rate and percentiles are medians over runs (in us); errors add up."""
    runs = [_wrk(1.0, 1e-6, 4e-6, 1), _wrk(3.0, 3e-6, 2e-6), _wrk(2.0, 2e-6, 3e-6, 2)]

    assert rig.wrk_medians(runs) == pytest.approx(
        {"requests_per_s": 2.0, "p50_us": 2.0, "p99_us": 3.0, "errors": 3}
    )


def test_run_interleaved_warms_then_repeats_outermost() -> None:
    """Every leg warms once; then per repeat, per concurrency, every leg runs."""
    calls: list[tuple[str, int, bool]] = []
    legs = {"a": None, "b": None}

    rig.run_interleaved(legs, (1, 64), 2, lambda *call: calls.append(call))

    warm = [("a", rig.WARMUP_CONNECTIONS, True), ("b", rig.WARMUP_CONNECTIONS, True)]
    one_repeat = [("a", 1, False), ("b", 1, False), ("a", 64, False), ("b", 64, False)]
    assert calls == warm + one_repeat + one_repeat


def test_run_interleaved_skips_a_leg_dropped_midway() -> None:
    """A leg the run callback drops from ``legs`` is not run again."""
    calls: list[tuple[str, int]] = []
    legs = {"a": None, "b": None}

    def run(name: str, connections: int, warmup: bool) -> None:
        calls.append((name, connections))
        if name == "a" and connections == 1:
            legs.pop("a")

    rig.run_interleaved(legs, (1, 64), 1, run)

    assert calls[2:] == [("a", 1), ("b", 1), ("b", 64)]


def test_leg_failure_without_process_is_the_reason_alone() -> None:
    """A leg with no process of its own (direct) has no log to add."""
    leg = rig.Leg("direct", "http://127.0.0.1:1", None)

    assert leg.failure("GET failed") == "GET failed"
    assert leg.cpu_seconds() == 0.0


def test_leg_failure_appends_its_log_and_error_log(tmp_path: Path) -> None:
    """The reason is followed by the end of the process log and the error log."""
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait(timeout=10)
    (tmp_path / "stderr.log").write_text("started\ncrashed\n")
    (tmp_path / "error.log").write_text("upstream reset\n")
    proc = rig.Proc("nginx", finished, tmp_path / "stderr.log")
    leg = rig.Leg("nginx", "http://127.0.0.1:1", proc, tmp_path / "error.log")

    text = leg.failure("wrk exited 1")

    assert text.splitlines()[0] == "wrk exited 1"
    assert "started\ncrashed" in text
    assert text.endswith(f"log {tmp_path / 'error.log'}:\nupstream reset")


def test_check_answer_wrong_body_raises_with_status() -> None:
    """Only a 200 with the expected body passes; anything else names the answer."""
    rig.check_answer("GET /x", 200, b"ok", b"ok")
    rig.check_answer("GET /x", 500, b"no", None)

    with pytest.raises(rig.RigError, match=r"GET /x answered 502 b'bad'"):
        rig.check_answer("GET /x", 502, b"bad", b"ok")


def test_raise_exit_turns_a_signal_into_system_exit() -> None:
    """SIGTERM becomes SystemExit(128 + 15), so ExitStacks unwind."""
    with pytest.raises(SystemExit) as stopped:
        rig.raise_exit(signal.SIGTERM, None)

    assert stopped.value.code == 128 + signal.SIGTERM


@pytest.mark.parametrize(
    ("argv", "length"),
    [
        ([], (5.0, 3)),
        (["--quick"], (2.0, 1)),
        (["--quick", "--duration-s", "7", "--repeats", "4"], (7.0, 4)),
        (["--repeats", "0"], (5.0, 3)),
    ],
)
def test_run_length_defaults_depend_on_quick(
    argv: list[str], length: tuple[float, int]
) -> None:
    """Unset length flags default to 5 s x 3, or 2 s x 1 with --quick."""
    assert rig.run_length(_parser().parse_args(argv)) == length


def test_legs_arg_keeps_the_known_order() -> None:
    """--only may name legs in any order; they run in the known order."""
    legs = rig.legs_arg(_parser(), " sidecar,direct ", ("direct", "nginx", "sidecar"))

    assert legs == ("direct", "sidecar")


@pytest.mark.parametrize("text", ["direct,bogus", ",", ""])
def test_legs_arg_unknown_or_none_is_a_usage_error(
    text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unknown leg, or none at all, stops with a usage error naming --only."""
    with pytest.raises(SystemExit):
        rig.legs_arg(_parser(), text, ("direct", "nginx"))

    assert "--only takes direct,nginx" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["1,x", "0", " , "])
def test_concurrencies_arg_bad_list_is_a_usage_error(
    text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Connection counts must be numbers, at least one, each >= 1."""
    with pytest.raises(SystemExit):
        rig.concurrencies_arg(_parser(), text, "1,64")

    assert "--concurrency" in capsys.readouterr().err


def test_concurrencies_arg_reads_numbers_in_order() -> None:
    """The counts are kept as given, spaces ignored."""
    assert rig.concurrencies_arg(_parser(), "64, 1", "1,64") == (64, 1)


def test_verdict_record_names_bench_and_result() -> None:
    """A target record carries the bench, its kind, the target and the result."""
    passed = rig.verdict("hit_p99_c1", True, "fine")

    assert rig.verdict("t", False, "d").result == "FAIL"
    assert passed.record("cache") == {
        "bench": "cache",
        "kind": "target",
        "target": "hit_p99_c1",
        "result": "PASS",
        "detail": "fine",
    }


def test_find_returns_first_match_or_none() -> None:
    """find matches every given field and returns the first such record."""
    records = [{"leg": "a", "c": 1}, {"leg": "b", "c": 1}, {"leg": "b", "c": 2}]

    assert rig.find(records, leg="b") is records[1]
    assert rig.find(records, leg="b", c=2) is records[2]
    assert rig.find(records, leg="z") is None


def test_add_ratios_divides_by_the_base_leg_in_the_group() -> None:
    """Ratios are against the base leg of the same group; no base gives None."""
    records: list[rig.Record] = [
        {"leg": "nginx", "c": 1, "rps": 100.0},
        {"leg": "sidecar", "c": 1, "rps": 50.0},
        {"leg": "sidecar", "c": 64, "rps": 80.0},
    ]

    rig.add_ratios(records, ("rps",), ("nginx", "direct"), c=1)

    assert records[1]["rps_vs_nginx"] == 0.5
    assert records[1]["rps_vs_direct"] is None
    assert "rps_vs_nginx" not in records[2]


def test_failure_record_has_scenario_only_when_given() -> None:
    """A failure names its leg, and its scenario when the bench has several."""
    assert list(rig.failure_record("server", "lean", "gone")) == [
        "bench", "kind", "leg", "reason",
    ]
    assert rig.failure_record("proxy", "all", "x", "sse")["scenario"] == "sse"


def test_finish_report_prints_failures_targets_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Failed legs, targets, JSON lines and the rerun line; a failure exits 1."""
    failures = [rig.failure_record("proxy", "sidecar", "died\nlog", "sse")]
    verdicts = [rig.verdict("t", True, "ok")]
    path = tmp_path / "out.jsonl"

    status = rig.finish_report(
        "proxy", [{"kind": "setup"}], failures, verdicts, json_path=path, argv=["-q"]
    )

    out = capsys.readouterr().out.splitlines()
    assert status == 1
    assert out[:6] == [
        "", "failed legs", "  sidecar (sse): died", "", "targets for the sidecar",
        "PASS t: ok",
    ]
    kinds = [json.loads(line)["kind"] for line in path.read_text().splitlines()]
    assert kinds == ["setup", "failure", "target"]
    assert out[-2] == f"wrote 3 JSON lines to {path}"
    assert out[-1].endswith("-m bench.bench_proxy -q")


def test_finish_report_without_failures_or_targets_exits_zero(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A clean run prints no failure or target section and exits 0."""
    status = rig.finish_report("server", [], [], [], json_path=None, argv=[])

    out = capsys.readouterr().out
    assert status == 0
    assert "failed legs" not in out and "targets" not in out


def test_finish_report_failed_target_exits_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A FAIL target alone fails the run; a SKIP does not."""
    skipped = rig.Verdict("s", "SKIP", "n/a")

    assert rig.finish_report("c", [], [], [skipped], json_path=None, argv=[]) == 0
    failed = [skipped, rig.verdict("t", False, "slow")]
    assert rig.finish_report("c", [], [], failed, json_path=None, argv=[]) == 1
