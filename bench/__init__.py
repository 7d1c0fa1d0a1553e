"""Benchmarks for sidecar, run with ``make bench`` or ``python -m bench.run_all``.

Owns the benchmark scripts (``bench/bench_*.py``), the shared rig
(``bench/rig.py``: processes, ports, nginx configs, wrk, pinning, tables) and
the cheap upstream they all talk to (``bench/upstream.py``). Not here: the
proxy itself (``sidecar/``) or its tests (``tests/``).

Invariants: a benchmark talks only to 127.0.0.1, bounds every run in time,
ends only the processes it started (by PID), and prints the command that
reruns it. Each script runs as ``python -m bench.<name>`` from the repository
root and accepts ``--quick``.
"""
