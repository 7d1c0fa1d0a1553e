"""Run every benchmark script in ``bench/``, each within a time budget.

Run as ``python -m bench.run_all [--quick] [--only proxy,store] [--list]``.
It finds every ``bench/bench_*.py``, runs each as its own subprocess
(``python -m bench.<name>``, with ``--quick`` when asked) with its output
passed straight through, and ends with a summary table. A benchmark that
fails, crashes or overruns its budget is reported and the others still run;
the exit status is 1 if any did not pass.

Owns discovery, order, budgets and the summary. Not here: what each
benchmark measures (its own module) or the shared rig (``bench/rig.py``).

Invariants: one benchmark runs at a time (they all want the same two CPUs);
a benchmark over budget gets SIGTERM, which the rig's scripts turn into a
clean stop of their own processes, then SIGKILL after ``GRACE_S``; only the
PID this module started is signalled.

Known limitations: a benchmark killed with SIGKILL after ignoring SIGTERM may
leave its own children running; their output still names them.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench import rig

BENCH_DIR: Final = Path(__file__).resolve().parent
# Known benchmarks first, in this order; any other bench_*.py after, by name.
ORDER: Final = (
    "proxy",
    "tinylfu",
    "canonical",
    "store",
    "compress",
    "state",
    "artifacts",
)
BUDGET_S: Final = 900.0
QUICK_BUDGET_S: Final = 180.0
GRACE_S: Final = 15.0


@dataclass(frozen=True)
class Outcome:
    """How one benchmark ended: ``ok``, ``failed`` or ``timeout``."""

    name: str
    status: str
    returncode: int | None
    duration_s: float


def discover(bench_dir: Path = BENCH_DIR) -> list[str]:
    """Names (``proxy`` for ``bench_proxy.py``) of the benchmarks, in run order."""
    names = [path.stem.removeprefix("bench_") for path in bench_dir.glob("bench_*.py")]

    def rank(name: str) -> tuple[int, str]:
        return (ORDER.index(name) if name in ORDER else len(ORDER), name)

    return sorted(names, key=rank)


def _stop(popen: subprocess.Popen[bytes]) -> None:
    """SIGTERM the benchmark we started, then SIGKILL if it lingers."""
    if popen.poll() is not None:
        return
    os.kill(popen.pid, signal.SIGTERM)
    try:
        popen.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        os.kill(popen.pid, signal.SIGKILL)
        popen.wait(timeout=GRACE_S)


def run_one(name: str, *, quick: bool, budget_s: float) -> Outcome:
    """Run ``bench.bench_<name>`` with output passed through; how it ended."""
    argv = [
        sys.executable,
        "-m",
        f"bench.bench_{name}",
        *(["--quick"] if quick else []),
    ]
    print(f"\n=== bench_{name} (budget {budget_s:.0f} s): {' '.join(argv)}", flush=True)
    started = time.monotonic()
    popen = subprocess.Popen(argv, cwd=rig.REPO, stdin=subprocess.DEVNULL)
    try:
        returncode: int | None = popen.wait(timeout=budget_s)
        status = "ok" if returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        _stop(popen)
        returncode, status = None, "timeout"
    finally:
        # Ctrl-C or SIGTERM on us: the benchmark must not outlive this run.
        _stop(popen)
    return Outcome(name, status, returncode, time.monotonic() - started)


def summary(outcomes: Sequence[Outcome], budget_s: float) -> str:
    rows = []
    for outcome in outcomes:
        if outcome.status == "timeout":
            detail = f"over its {budget_s:.0f} s budget, stopped"
        elif outcome.status == "failed":
            detail = f"exit status {outcome.returncode}"
        else:
            detail = ""
        rows.append(
            [
                f"bench_{outcome.name}",
                outcome.status,
                f"{outcome.duration_s:.0f} s",
                detail,
            ]
        )
    return rig.format_table(["benchmark", "result", "time", "detail"], rows)


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m bench.run_all", description="Run every bench/bench_*.py."
    )
    parser.add_argument("--quick", action="store_true", help="pass --quick to each")
    parser.add_argument("--only", help="names to run, e.g. proxy,store")
    parser.add_argument("--budget-s", type=float, help="seconds allowed per benchmark")
    parser.add_argument("--list", action="store_true", help="print the names and stop")
    args = parser.parse_args(argv)

    names = discover()
    if args.only:
        wanted = [
            n.strip().removeprefix("bench_") for n in args.only.split(",") if n.strip()
        ]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            parser.error(f"no bench/bench_{unknown[0]}.py; found: {', '.join(names)}")
        names = [n for n in names if n in wanted]
    if args.list:
        print("\n".join(names))
        return 0
    budget_s = args.budget_s or (QUICK_BUDGET_S if args.quick else BUDGET_S)
    signal.signal(signal.SIGTERM, _raise_exit)
    outcomes = [run_one(name, quick=args.quick, budget_s=budget_s) for name in names]

    print(f"\n=== summary of {len(outcomes)} benchmark(s)")
    print(summary(outcomes, budget_s) if outcomes else "(no bench/bench_*.py found)")
    print(rig.rerun_line("bench.run_all", argv))
    return 0 if all(o.status == "ok" for o in outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
