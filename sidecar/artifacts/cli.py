"""``sidecar artifacts index DIR...``: hash model folders into the digest index.

Owns the command line of the artifact subsystem: one pass of ``scan_roots``
over the given folders, with a progress bar on a terminal (tqdm) or a plain
line every ``_LINE_EVERY_S`` seconds otherwise, writing the index into
``<data-dir>/artifacts/index.sqlite3``; a sidecar started with those
folders in ``artifacts.dirs`` then serves them at once and re-hashes
nothing unchanged. Not here: argument dispatch of the ``sidecar`` command
(sidecar/cli.py calls ``main(argv)`` with the words after ``artifacts``).

Exit status: 0 when every file was indexed, 1 when some could not be read
(each is logged), 2 for bad arguments, 130 when interrupted (what was
hashed so far is kept: each file is committed as it completes).

Known limitations: only ``index``; there is no command to list or verify
the index yet (``sqlite3`` on the file shows it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, Final, TextIO

from sidecar.artifacts.index import INDEX_FILE, DigestIndex
from sidecar.artifacts.model import ArtifactsModel
from sidecar.artifacts.paths import Roots
from sidecar.artifacts.scan import ScanProgress, ScanReport, scan_roots
from sidecar.artifacts.service import STORE_DIR
from sidecar.artifacts.store import Store
from sidecar.artifacts.verify import Verifier

DEFAULT_DATA_DIR: Final = ".sidecar-data"
_LINE_EVERY_S: Final = 5.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidecar artifacts")
    sub = parser.add_subparsers(dest="command", required=True)
    index = sub.add_parser("index", help="hash model files for serving by digest")
    index.add_argument("dirs", nargs="+", metavar="DIR", help="folders of model files")
    index.add_argument(
        "--data-dir",
        default=None,
        help=f"index location (default: $SIDECAR_DATA_DIR or {DEFAULT_DATA_DIR})",
    )
    return parser


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


class _LineProgress(ScanProgress):
    """A plain progress line every few seconds, for logs and pipes."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._files = [0, 0]
        self._bytes = [0, 0]
        self._next = 0.0

    def started(self, files_total: int, bytes_total: int) -> None:
        self._files, self._bytes = [0, files_total], [0, bytes_total]
        self._next = time.monotonic() + _LINE_EVERY_S
        print(f"hashing {files_total} files, {_human(bytes_total)}", file=self._out)

    def advanced(self, nbytes: int) -> None:
        self._bytes[0] += nbytes
        if time.monotonic() >= self._next:
            self._next = time.monotonic() + _LINE_EVERY_S
            print(
                f"hashed {self._files[0]}/{self._files[1]} files, "
                f"{_human(self._bytes[0])} of {_human(self._bytes[1])}",
                file=self._out,
            )

    def file_done(self, path: str) -> None:
        self._files[0] += 1


class _BarProgress(ScanProgress):
    """A tqdm bar in bytes, on a terminal."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._bar: Any = None

    def started(self, files_total: int, bytes_total: int) -> None:
        from tqdm import tqdm  # type: ignore[import-untyped]

        self._bar = tqdm(
            total=bytes_total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=self._out,
            desc=f"hashing {files_total} files",
        )

    def advanced(self, nbytes: int) -> None:
        self._bar.update(nbytes)

    def file_done(self, path: str) -> None:
        self._bar.set_postfix_str(os.path.basename(path)[-40:], refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _run_index(
    dirs: Sequence[str], data_dir: str, err: TextIO
) -> tuple[ScanReport, str]:
    store = Store(os.path.join(data_dir, STORE_DIR))
    db_path = os.path.join(store.root, INDEX_FILE)
    index = DigestIndex(db_path)
    roots = Roots.resolve(dirs, store.root)
    verifier = Verifier(index, store, ArtifactsModel())
    progress: ScanProgress = _BarProgress(err) if err.isatty() else _LineProgress(err)
    try:
        return scan_roots(verifier, roots, roots.dirs, progress), db_path
    finally:
        if isinstance(progress, _BarProgress):
            progress.close()
        index.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``sidecar artifacts ...``; ``argv`` are the words after ``artifacts``."""
    try:
        args = _parser().parse_args(list(sys.argv[2:] if argv is None else argv))
    except SystemExit as exc:
        return 2 if exc.code else 0
    data_dir = args.data_dir or os.environ.get("SIDECAR_DATA_DIR") or DEFAULT_DATA_DIR
    missing = [d for d in args.dirs if not os.path.isdir(d)]
    if missing:
        for d in missing:
            print(f"sidecar artifacts index: {d}: not a directory", file=sys.stderr)
        return 2
    try:
        report, db_path = _run_index(args.dirs, data_dir, sys.stderr)
    except KeyboardInterrupt:
        print("interrupted; files hashed so far are kept", file=sys.stderr)
        return 130
    print(
        f"indexed {report.files} files, {_human(report.bytes)} "
        f"(hashed {report.hashed_files}, {_human(report.hashed_bytes)}; "
        f"removed {report.removed}; failed {report.failed}) in {db_path}"
    )
    return 1 if report.failed else 0
