"""``sidecar artifacts index DIR...``: indexing from the command line."""

from __future__ import annotations

import io
import os
import sqlite3
from pathlib import Path

import aiohttp
import pytest

from sidecar.artifacts import Artifacts
from sidecar.artifacts.cli import _run_index, main
from sidecar.artifacts.index import INDEX_FILE
from tests.artifacts.conftest import pattern_bytes, quick_options, serving, write_file


def _rows(data_dir: Path) -> list[tuple[str, str]]:
    db = sqlite3.connect(data_dir / "artifacts" / INDEX_FILE)
    try:
        return sorted(db.execute("SELECT path, digest FROM files").fetchall())
    finally:
        db.close()


def test_cli_index_writes_rows_and_summary(
    models_dir: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Indexing a folder records every file and prints a summary; exit 0."""
    a = write_file(models_dir, "a.gguf", pattern_bytes(10_000))
    b = write_file(models_dir, "sub/b.safetensors", b"tensor bytes")
    assert main(["index", str(models_dir), "--data-dir", str(data_dir)]) == 0
    assert _rows(data_dir) == sorted(
        [
            (os.path.realpath(models_dir / "a.gguf"), a),
            (os.path.realpath(models_dir / "sub" / "b.safetensors"), b),
        ]
    )
    out, err = capsys.readouterr()
    assert out.startswith("indexed 2 files")
    assert "hashing 2 files" in err  # plain progress lines when stderr is not a TTY


def test_cli_index_again_hashes_nothing(
    models_dir: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second run over unchanged files reads none of them."""
    write_file(models_dir, "a.gguf", pattern_bytes(10_000))
    main(["index", str(models_dir), "--data-dir", str(data_dir)])
    capsys.readouterr()
    assert main(["index", str(models_dir), "--data-dir", str(data_dir)]) == 0
    assert "(hashed 0, 0 B;" in capsys.readouterr().out


def test_cli_index_data_dir_from_environment(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --data-dir the index goes to $SIDECAR_DATA_DIR."""
    write_file(models_dir, "a.gguf", b"x")
    monkeypatch.setenv("SIDECAR_DATA_DIR", str(tmp_path / "from-env"))
    assert main(["index", str(models_dir)]) == 0
    assert len(_rows(tmp_path / "from-env")) == 1


def test_cli_index_missing_folder_exit_2(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder that does not exist is an argument error (exit 2) naming it."""
    assert main(["index", str(tmp_path / "nope"), "--data-dir", str(data_dir)]) == 2
    assert f"{tmp_path / 'nope'}: not a directory" in capsys.readouterr().err


def test_cli_no_command_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """``sidecar artifacts`` without a command prints usage and exits 2."""
    assert main([]) == 2
    assert "usage: sidecar artifacts" in capsys.readouterr().err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_cli_index_on_terminal_draws_bar(models_dir: Path, data_dir: Path) -> None:
    """On a terminal progress is a tqdm bar in bytes."""
    write_file(models_dir, "a.gguf", pattern_bytes(50_000))
    term = _Terminal()
    report, _ = _run_index([str(models_dir)], str(data_dir), term)
    assert report.hashed_files == 1
    assert "hashing 1 files" in term.getvalue() and "100%" in term.getvalue()


async def test_cli_index_then_sidecar_serves_without_scanning(
    models_dir: Path, data_dir: Path, client: aiohttp.ClientSession
) -> None:
    """Files indexed from the command line are served by a sidecar at once."""
    data = pattern_bytes(20_000)
    digest = write_file(models_dir, "a.gguf", data)
    assert main(["index", str(models_dir), "--data-dir", str(data_dir)]) == 0
    artifacts = Artifacts(
        dirs=[str(models_dir)], data_dir=data_dir, options=quick_options()
    )
    async with (
        serving(artifacts, scan=False) as served,
        client.get(served.by_hash(digest)) as resp,
    ):
        assert resp.status == 200 and await resp.read() == data
