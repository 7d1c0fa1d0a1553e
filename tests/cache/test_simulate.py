"""The trace simulator behind ``sidecar simulate`` (sidecar/cache/simulate.py).

Rules: the three trace formats read as documented, compressed or not;
Belady's optimum is computed correctly and bounds every policy; the command
prints a table or one JSON object a line; bad input exits 2 with one line on
stderr and no traceback.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import random
import struct
from pathlib import Path

import pytest

from sidecar.cache.simulate import Result, main, policies, read_trace, simulate

TRACES = Path("/work/shared/traces")


def write_lirs(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


# -- reading traces ----------------------------------------------------------


def test_read_lirs_skips_checkpoint_lines(tmp_path: Path) -> None:
    """lirs: one integer a line; `*` lines and blank lines are skipped."""
    path = write_lirs(tmp_path / "t.lirs", ["1", "*", "2", "", " 3 ", "*"])
    assert read_trace(str(path), "lirs") == [1, 2, 3]


def test_read_cache2k_big_endian_signed(tmp_path: Path) -> None:
    """cache2k: big-endian signed 32-bit integers, back to back."""
    path = tmp_path / "t.cache2k"
    path.write_bytes(struct.pack(">3i", 1, -2, 2**31 - 1))
    assert read_trace(str(path), "cache2k") == [1, -2, 2**31 - 1]


def test_read_keys_one_key_a_line(tmp_path: Path) -> None:
    """keys: any text key, one a line, surrounding white space dropped."""
    path = tmp_path / "t.keys"
    path.write_text("GET /a\n\n  b \nGET /a\n")
    assert read_trace(str(path), "keys") == ["GET /a", "b", "GET /a"]


@pytest.mark.parametrize(
    "suffix, opener", [(".gz", gzip.open), (".xz", lzma.open), (".bz2", bz2.open)]
)
def test_read_trace_compressed_transparently(
    tmp_path: Path, suffix: str, opener: object
) -> None:
    """A .gz, .xz or .bz2 trace reads the same as its plain form."""
    path = tmp_path / f"t.lirs{suffix}"
    with opener(path, "wb") as stream:  # type: ignore[operator]
        stream.write(b"5\n*\n6\n")
    assert read_trace(str(path), "lirs") == [5, 6]


# -- replaying ---------------------------------------------------------------


def test_simulate_opt_matches_hand_computed_example() -> None:
    """Belady with two slots on 1 2 3 1 2 4 1 2: evicting 3 then 4 gives 4 hits."""
    result = simulate([1, 2, 3, 1, 2, 4, 1, 2], "opt", 2)
    assert result == Result("opt", 2, 8, 4)


def test_simulate_opt_bounds_every_policy() -> None:
    """No policy beats the optimum on a random trace."""
    rng = random.Random(11)
    trace = [int(rng.paretovariate(1.2)) for _ in range(20_000)]
    optimum = simulate(trace, "opt", 50).hits
    for policy in ("wtinylfu", "lru"):
        assert simulate(trace, policy, 50).hits <= optimum


def test_simulate_result_reports_ratio() -> None:
    """hit_ratio is hits over accesses, and 0 for an empty trace."""
    assert simulate([1, 1, 1, 2], "lru", 1).hit_ratio == 0.5
    assert simulate([], "lru", 1).hit_ratio == 0.0


def test_simulate_unknown_policy_refused() -> None:
    """An unknown policy name is a ValueError naming the known ones."""
    with pytest.raises(ValueError, match="unknown policy 'mru'"):
        simulate([1], "mru", 1)


def test_simulate_theine_runs_when_installed() -> None:
    """theine replays through its own engine when it is importable."""
    pytest.importorskip("theine_core")
    assert "theine" in policies()
    result = simulate([1, 2, 1, 2, 3, 1], "theine", 2)
    assert (result.accesses, 0 < result.hits <= 3) == (6, True)


# -- the command line --------------------------------------------------------


def test_main_prints_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --json: a header and one row per size and policy."""
    path = write_lirs(tmp_path / "t.lirs", ["1", "2", "1", "2"])
    assert main(["--trace", str(path), "--format", "lirs", "--size", "1,2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["policy", "size", "accesses", "hits", "hit", "ratio"]
    assert [line.split()[:2] for line in lines[1:]] == [
        ["wtinylfu", "1"], ["lru", "1"], ["opt", "1"],
        ["wtinylfu", "2"], ["lru", "2"], ["opt", "2"],
    ]  # fmt: skip


def test_main_json_one_object_a_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json prints {"policy", "size", "accesses", "hits", "hit_ratio"} per line."""
    path = write_lirs(tmp_path / "t.lirs", ["1", "2", "1", "2"])
    argv = ["--trace", str(path), "--format", "lirs", "--size", "2"]
    assert main([*argv, "--policy", "lru,opt", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows == [
        {"policy": "lru", "size": 2, "accesses": 4, "hits": 2, "hit_ratio": 0.5},
        {"policy": "opt", "size": 2, "accesses": 4, "hits": 2, "hit_ratio": 0.5},
    ]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--format", "lirs", "--size", "1"], "the following arguments are required"),
        (["--trace", "{missing}", "--format", "lirs", "--size", "1"], "cannot read"),
        (["--trace", "{trace}", "--format", "csv", "--size", "1"], "invalid choice"),
        (["--trace", "{trace}", "--format", "lirs", "--size", "1,x"], "--size"),
        (["--trace", "{trace}", "--format", "lirs", "--size", "0"], "--size"),
        (["--trace", "{trace}", "--format", "lirs", "--size", ""], "--size"),
        (
            [
                "--trace",
                "{trace}",
                "--format",
                "lirs",
                "--size",
                "1",
                "--policy",
                "mru",
            ],
            "unknown policy 'mru'",
        ),
        (["--trace", "{bad}", "--format", "lirs", "--size", "1"], "bad.lirs:2"),
        (["--trace", "{trace}", "--format", "cache2k", "--size", "1"], "32-bit"),
        (["--trace", "{corrupt}", "--format", "lirs", "--size", "1"], "cannot read"),
        (["--trace", "{mangled}", "--format", "lirs", "--size", "1"], "cannot read"),
    ],
)
def test_main_bad_input_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    """Bad input: exit status 2, a single stderr line naming the problem."""
    trace = write_lirs(tmp_path / "t.lirs", ["1", "2", "3"])
    bad = write_lirs(tmp_path / "bad.lirs", ["1", "two"])
    corrupt = tmp_path / "corrupt.lirs.gz"
    corrupt.write_bytes(b"\x1f\x8b\x08\x00garbage")
    # A valid gzip header and trailer around a damaged deflate stream.
    stream = gzip.compress(b"1\n2\n3\n" * 1000)
    mangled = tmp_path / "mangled.lirs.gz"
    mangled.write_bytes(
        stream[:20] + bytes(b ^ 0x55 for b in stream[20:60]) + stream[60:]
    )
    names = {
        "trace": str(trace),
        "bad": str(bad),
        "missing": str(tmp_path / "missing.lirs"),
        "corrupt": str(corrupt),
        "mangled": str(mangled),
    }
    assert main([arg.format(**names) for arg in argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.splitlines()) == 1
    assert captured.err.startswith("sidecar simulate: ")
    assert message in captured.err


def test_main_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    """--help prints usage and returns 0."""
    assert main(["--help"]) == 0
    assert "--trace" in capsys.readouterr().out


# -- the shared traces (skipped where they are not present) ------------------


@pytest.mark.skipif(not (TRACES / "multi1.lirs.gz").exists(), reason="no shared traces")
def test_multi1_wtinylfu_at_least_lru_and_theine() -> None:
    """On multi1, W-TinyLFU beats LRU and matches theine at every size (theine's
    result varies by a few hits between runs, so it gets 0.1% of slack)."""
    keys = read_trace(str(TRACES / "multi1.lirs.gz"), "lirs")
    assert len(keys) == 15_858
    for size in (100, 500, 1000, 2000):
        ours = simulate(keys, "wtinylfu", size).hits
        assert ours >= simulate(keys, "lru", size).hits
        if "theine" in policies():
            assert ours >= simulate(keys, "theine", size).hits - len(keys) // 1000
