"""Serving a model file by digest: the sidecar next to nginx, in the same run.

Run as ``python -m bench.bench_artifacts [--quick] [--size-mib N]``. One run
writes a file (1 GiB; 128 MiB with ``--quick``), indexes it with
``sidecar artifacts index``, and measures two legs serving the same file
from the page cache:

- ``nginx``: one worker, ``sendfile on``, the file as a static path;
- ``sidecar``: ``Artifacts`` on uvloop behind aiohttp, as the admin port
  mounts it, at ``/admin/models/by-hash/<sha256>`` (this script's
  ``--serve`` mode, so the leg does not depend on the rest of the app).

Two measurements: throughput of a whole-file GET (curl to ``/dev/null``,
MiB/s, the median over repeats, legs interleaved), and 304 answers per
second (``wrk`` with ``If-None-Match`` naming each server's own ETag, 16
connections). It prints a table, one JSON line per leg and a ``rerun with:``
line; the exit status is 1 when a leg failed. Not here: process, nginx and
wrk plumbing (``bench/rig.py``).

Invariants: the servers run on one CPU and curl and wrk on the other (see
``rig.plan_cpus``); every process started here is stopped by its PID before
exit, also on SIGTERM; both legs are warmed once before measuring (the
sidecar's first body answer re-hashes the file: its verification, not its
throughput).

Known limitations: a shared machine moves the figures (compare the two legs
of one run, not runs); curl copies what it receives into user space, which
caps both legs alike; the file is read from the page cache, so disk speed
is not measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Final

from bench import rig

MIB: Final = 1024 * 1024
READY_LINE: Final = "bench-artifacts-ready"
WRK_CONNECTIONS: Final = 16
_BLOCK_MIB: Final = 64


def _progress(text: str) -> None:
    print(f"# {text}", file=sys.stderr, flush=True)


def _write_file(path: Path, size: int) -> str:
    """``size`` bytes of incompressible data; its sha256."""
    block = os.urandom(_BLOCK_MIB * MIB)
    hasher = hashlib.sha256()
    with open(path, "wb") as out:
        left = size
        while left:
            piece = block[: min(left, len(block))]
            out.write(piece)
            hasher.update(piece)
            left -= len(piece)
    return hasher.hexdigest()


# -- the sidecar leg (``--serve``, in its own process) -------------------------


async def _serve(models: str, data_dir: str, port: int) -> None:
    from aiohttp import web

    from sidecar.artifacts import ArtifactOptions, Artifacts

    artifacts = Artifacts(
        dirs=[models], data_dir=data_dir, options=ArtifactOptions(background_scan=False)
    )
    await artifacts.start()
    app = web.Application()
    app.router.add_routes(artifacts.routes())
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, rig.LOOPBACK, port).start()
    print(READY_LINE, flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await artifacts.close()


def _serve_main(args: argparse.Namespace) -> int:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(args.dir, args.data_dir, args.port))
    return 0


# -- measuring -----------------------------------------------------------------


def _curl(
    url: str, cpu: int | None, *headers: str, timeout_s: float = 120
) -> dict[str, str]:
    argv = [
        "curl",
        "-s",
        "-S",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{size_download} %{speed_download} %{header_json}",
    ]
    for h in headers:
        argv += ["-H", h]
    done = subprocess.run(
        rig.pinned([*argv, url], cpu),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if done.returncode != 0:
        raise rig.RigError(f"curl {url}: exit {done.returncode}: {done.stderr.strip()}")
    code, size, speed, header_json = done.stdout.split(" ", 3)
    import json

    fields = {k.lower(): v[0] for k, v in json.loads(header_json).items()}
    return {"code": code, "size": size, "speed": speed, **fields}


def _throughput_mib_s(url: str, size: int, cpu: int | None) -> float:
    got = _curl(url, cpu)
    if got["code"] != "200" or int(got["size"]) != size:
        raise rig.RigError(
            f"{url}: status {got['code']}, {got['size']} of {size} bytes"
        )
    return float(got["speed"]) / MIB


def _not_modified_per_s(
    url: str, etag: str, duration_s: float, cpu: int | None
) -> rig.WrkResult:
    base = rig.wrk_argv(url, connections=WRK_CONNECTIONS, duration_s=duration_s)
    argv = [*base[:-1], "-H", f"If-None-Match: {etag}", base[-1]]
    done = subprocess.run(
        rig.pinned(argv, cpu),
        capture_output=True,
        text=True,
        timeout=duration_s + 30,
        check=False,
    )
    if done.returncode != 0:
        raise rig.RigError(f"wrk exited {done.returncode}: {done.stderr.strip()}")
    return rig.parse_wrk(done.stdout)


def _nginx_static_config(prefix: Path, port: int, root: Path) -> str:
    server = (
        "    sendfile on;\n"
        "    tcp_nopush on;\n"
        "    server {\n"
        f"        listen {rig.LOOPBACK}:{port};\n"
        f'        root "{root.resolve()}";\n'
        "    }\n"
    )
    return rig._nginx_main(prefix, server)


@contextlib.contextmanager
def _legs(
    work: Path, models: Path, digest: str, plan: rig.CpuPlan
) -> Iterator[dict[str, str]]:
    """Start both servers; yield leg name -> URL of the file; stop them by PID."""
    nginx_port, sidecar_port = rig.free_ports(2)
    procs: list[rig.Proc] = []
    try:
        procs.append(
            rig.start_nginx(
                "nginx",
                work / "nginx",
                _nginx_static_config(work / "nginx", nginx_port, models),
                port=nginx_port,
                cpu=plan.proxy_cpu,
            )
        )
        argv = [
            sys.executable,
            "-m",
            "bench.bench_artifacts",
            "--serve",
            "--dir",
            str(models),
            "--data-dir",
            str(work / "data"),
            "--port",
            str(sidecar_port),
        ]
        procs.append(
            rig.start_ready(
                "sidecar",
                argv,
                log_path=work / "sidecar.log",
                port=sidecar_port,
                cpu=plan.proxy_cpu,
                line=READY_LINE,
            )
        )
        yield {
            "nginx": f"http://{rig.LOOPBACK}:{nginx_port}/model.bin",
            "sidecar": f"http://{rig.LOOPBACK}:{sidecar_port}"
            f"/admin/models/by-hash/{digest}",
        }
    finally:
        for proc in reversed(procs):
            rig.stop_process(proc)


def _measure(args: argparse.Namespace, plan: rig.CpuPlan) -> list[dict[str, Any]]:
    size = args.size_mib * MIB
    with tempfile.TemporaryDirectory(prefix="bench-artifacts-") as tmp:
        work = Path(tmp)
        models = work / "models"
        models.mkdir()
        _progress(f"writing a {args.size_mib} MiB file")
        digest = _write_file(models / "model.bin", size)
        # nginx workers may run as another user; the temp dir is private.
        for path in (work, models, models / "model.bin"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        from sidecar.artifacts.cli import main as index_main

        if index_main(["index", str(models), "--data-dir", str(work / "data")]) != 0:
            raise rig.RigError("sidecar artifacts index failed")
        with _legs(work, models, digest, plan) as urls:
            return _run_legs(urls, size, args, plan)


def _run_legs(
    urls: dict[str, str], size: int, args: argparse.Namespace, plan: rig.CpuPlan
) -> list[dict[str, Any]]:
    etags = {}
    for leg, url in urls.items():
        _progress(f"warming {leg}")
        _throughput_mib_s(url, size, plan.load_cpu)
        etags[leg] = _curl(url, plan.load_cpu, "Range: bytes=0-0")["etag"]
    speeds: dict[str, list[float]] = {leg: [] for leg in urls}
    for i in range(args.repeats):
        for leg, url in urls.items():
            speeds[leg].append(_throughput_mib_s(url, size, plan.load_cpu))
            _progress(f"{leg} run {i + 1}: {speeds[leg][-1]:.0f} MiB/s")
    records = []
    for leg, url in urls.items():
        wrk = _not_modified_per_s(url, etags[leg], args.duration_s, plan.load_cpu)
        records.append(
            {
                "bench": "artifacts",
                "leg": leg,
                "size_bytes": size,
                "throughput_mib_s": rig.median(speeds[leg]),
                "runs_mib_s": speeds[leg],
                "not_modified_per_s": wrk.requests_per_s,
                "not_modified_p99_s": wrk.p99_s,
                "wrk_errors": wrk.errors,
                "connections": WRK_CONNECTIONS,
            }
        )
    return records


def _report(records: list[dict[str, Any]], argv: Sequence[str]) -> None:
    nginx = next((r for r in records if r["leg"] == "nginx"), None)
    rows = []
    for r in records:
        vs = (
            rig.ratio(r["throughput_mib_s"], nginx["throughput_mib_s"])
            if nginx
            else None
        )
        rows.append(
            [
                r["leg"],
                f"{r['throughput_mib_s']:.0f}",
                rig.fmt_ratio(vs),
                rig.fmt_rate(r["not_modified_per_s"]),
                rig.fmt_latency(r["not_modified_p99_s"]),
                str(r["wrk_errors"]),
            ]
        )
    print(
        rig.format_table(
            ("leg", "GET MiB/s", "vs nginx", "304/s", "304 p99", "errors"), rows
        )
    )
    for r in records:
        print(rig.json_line(r))
    print(rig.rerun_line("bench.bench_artifacts", argv))


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    # SIGTERM (run_all's budget) unwinds the context managers: servers stop.
    raise SystemExit(128 + signum)


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="128 MiB, short runs")
    parser.add_argument("--size-mib", type=int, help="file size (1024; 128 quick)")
    parser.add_argument("--repeats", type=int, help="GETs per leg, median kept (3)")
    parser.add_argument("--duration-s", type=float, help="seconds of wrk per leg (5)")
    parser.add_argument("--one-core", action="store_true", help="everything on one CPU")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.size_mib = args.size_mib or (128 if args.quick else 1024)
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.duration_s = args.duration_s or (2.0 if args.quick else 5.0)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse_args(argv)
    if args.serve:
        return _serve_main(args)
    signal.signal(signal.SIGTERM, _raise_exit)
    plan = rig.plan_cpus(one_core=args.one_core)
    rig.pin_self(plan.load_cpu)
    _progress(plan.describe())
    try:
        records = _measure(args, plan)
    except rig.RigError as exc:
        print(f"FAIL: {exc}", file=sys.stderr)
        return 1
    _report(records, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
