"""Path safety: hostile request targets and symlinks never open a file outside.

Opens are recorded by the audit hook in ``tests/artifacts/audit.py`` while a
request or a scan runs.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.artifacts import Artifacts
from sidecar.artifacts.digest import Digest
from sidecar.artifacts.paths import OutsideRootsError, Roots
from tests.artifacts.audit import recording_opens
from tests.artifacts.conftest import Served, quick_options, serving, write_file

PREFIX = "/admin/models/by-hash/"


@dataclass
class Fenced:
    served: Served
    prober: Prober
    inside: Digest  # a file in the folder
    outside: Digest  # a file outside, reachable only through symlinks
    allowed: tuple[str, ...]  # resolved folders an open may touch

    def assert_inside(self, opened: list[str]) -> None:
        for path in opened:
            real = os.path.realpath(path)
            assert any(
                real == a or real.startswith(a + os.sep) for a in self.allowed
            ), real


@pytest.fixture
async def fenced(
    tmp_path: Path, models_dir: Path, data_dir: Path
) -> AsyncIterator[Fenced]:
    outside_dir = tmp_path / "outside"
    outside = write_file(outside_dir, "secret.bin", b"not for serving")
    inside = write_file(models_dir, "model.bin", b"weights" * 100)
    (models_dir / "evil.bin").symlink_to(outside_dir / "secret.bin")
    (models_dir / "relative.bin").symlink_to(Path("..") / "outside" / "secret.bin")
    (models_dir / "evil_dir").symlink_to(outside_dir, target_is_directory=True)
    (models_dir / "sub").mkdir()
    (models_dir / "sub" / "up.bin").symlink_to(
        Path("..") / ".." / "outside" / "secret.bin"
    )
    artifacts = Artifacts(
        dirs=[str(models_dir)], data_dir=data_dir, options=quick_options()
    )
    async with serving(artifacts) as served:
        allowed = (os.path.realpath(models_dir), os.path.realpath(artifacts.store_dir))
        fenced = Fenced(served, Prober(served.port), inside, outside, allowed)
        # Warm-up outside the recording: lazy imports, and the source lines
        # aiohttp's parser-error traceback reads (linecache opens .py files).
        for target in (
            PREFIX + inside,
            PREFIX + outside,
            PREFIX + "x",
            PREFIX + "\x00",
        ):
            await fenced.prober.status(target.encode())
        try:
            yield fenced
        finally:
            fenced.prober.close()


class Prober:
    """GETs with raw request targets over one keep-alive connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def status(self, target: bytes) -> int:
        """The status of one GET for ``target``; 0 if the server sent none.

        A reused connection the server closed after its last answer (it
        does after a parse error) is replaced once.
        """
        for _ in range(2):
            reused = self._conn is not None
            if self._conn is None:
                self._conn = await asyncio.open_connection("127.0.0.1", self.port)
            try:
                return await self._exchange(target)
            except (asyncio.IncompleteReadError, ConnectionError):
                self.close()
                if not reused:
                    return 0
        return 0

    async def _exchange(self, target: bytes) -> int:
        assert self._conn is not None
        reader, writer = self._conn
        async with asyncio.timeout(10):
            writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            fields = head.lower().split(b"\r\n")
            length = next(
                (
                    int(f.split(b":", 1)[1])
                    for f in fields
                    if f.startswith(b"content-length:")
                ),
                0,
            )
            await reader.readexactly(length)
        if b"connection: close" in fields:
            self.close()
        parts = head.split(b" ", 2)
        return int(parts[1]) if parts[1].isdigit() else 0

    def close(self) -> None:
        if self._conn is not None:
            self._conn[1].close()
            self._conn = None


def _expected_ok(target: bytes, fenced: Fenced) -> bool:
    if any(b < 0x21 or b > 0x7E for b in target):
        return False  # not a valid request-target: the HTTP parser refuses it
    path = target.split(b"?", 1)[0].decode("latin-1")
    return path.startswith(PREFIX) and unquote(path[len(PREFIX) :]) == fenced.inside


async def _probe(fenced: Fenced, target: bytes) -> list[str]:
    with recording_opens() as opened:
        status = await fenced.prober.status(target)
    fenced.assert_inside(opened)
    if _expected_ok(target, fenced):
        assert status == 200, target
    else:
        assert status in (400, 404), (target, status)
    return opened


def _corpus(inside: str, outside: str) -> list[str]:
    d = inside
    return [
        "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "..%2f..%2f..%2fetc%2fpasswd",
        "../../etc/passwd",
        "%2e%2e/%2e%2e/" + d,
        "%2F" + d,
        "/" + d,
        d + "/",
        d + "%2F",
        d + "%2f..",
        d + "%00",
        "%00" + d,
        d[:32] + "%00" + d[32:],
        d.upper(),
        d[:-1] + d[-1].upper(),
        d[:63],
        d + "0",
        d[1:],
        "",
        "%",
        "%zz",
        "%25" + d,
        "%2561" + d[1:],
        d + "%0a",
        d + "%0d%0a",
        d + ";x",
        d + "%3B",
        "sha256:" + d,
        "sha256%3A" + d,
        d.replace("a", "%61"),
        d + "?x=../../etc",
        d + "#frag",
        "..%5c..%5cetc",
        quote("\uff10" * 64),
        quote("\u0661" * 64),
        d[:60] + quote("\uff41") * 4,
        outside,
        "evil.bin",
        "evil_dir/secret.bin",
        ".",
        "..",
        "%2e",
        "%2e%2e",
        d + "/..",
        d + "/.",
        "./" + d,
    ]


async def test_by_hash_hostile_corpus_no_open_outside(fenced: Fenced) -> None:
    """Encoded dots and slashes, NUL, case, lengths, suffixes: 400/404, opens inside."""
    opened = []
    for segment in _corpus(fenced.inside, fenced.outside):
        opened += await _probe(fenced, (PREFIX + segment).encode("latin-1"))
    assert opened  # the hook saw the served file being opened: it is live


async def test_by_hash_raw_nul_and_control_bytes_refused(fenced: Fenced) -> None:
    """Raw NUL and control bytes in the target never reach a file."""
    for raw in (b"\x00", b"%00\x00", b"\x01\x02", b"\x7f"):
        with recording_opens() as opened:
            status = await fenced.prober.status(
                PREFIX.encode() + fenced.inside.encode() + raw
            )
        fenced.assert_inside(opened)
        assert status in (400, 404)


async def test_by_hash_digest_of_file_behind_symlink_not_found(fenced: Fenced) -> None:
    """A file reachable only through symlinks pointing out is not indexed: 404."""
    assert await fenced.prober.status((PREFIX + fenced.outside).encode()) == 404


async def test_scan_with_symlinks_out_opens_only_inside(fenced: Fenced) -> None:
    """A full rescan (four symlinks point out) opens only files inside the folders."""
    scanner = fenced.served.artifacts.scanner
    assert scanner is not None
    with recording_opens() as opened:
        server = fenced.served.artifacts.server
        assert server is not None
        for path in server.index.paths():
            server.verifier.forget(path)  # force every file to be hashed again
        report = await scanner.scan_now()
    assert report.hashed_files == 1
    assert opened
    fenced.assert_inside(opened)


_TOKENS = [
    "%2e",
    ".",
    "/",
    "%2f",
    "%2F",
    "%00",
    "%",
    "%25",
    ";",
    "\\",
    "..",
    "a",
    "A",
    "0",
    "f",
    "F",
    "g",
    "%61",
    "%41",
    "?",
    "#",
    "%0a",
    "sha256:",
    "\u00e9",
    "%c3%a9",
]


_TOKEN_SEGMENT = st.lists(
    st.sampled_from(_TOKENS) | st.sampled_from(["<in>", "<out>", "<in63>"]), max_size=8
)
# Several targets per example: hypothesis costs a few ms per async example.
_FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@_FUZZ
@given(segments=st.lists(_TOKEN_SEGMENT, min_size=4, max_size=8))
async def test_by_hash_token_fuzz_no_open_outside(
    fenced: Fenced, segments: list[list[str]]
) -> None:
    """Targets of hostile tokens and real digests: right status, opens inside."""
    swap = {
        "<in>": fenced.inside,
        "<out>": fenced.outside,
        "<in63>": fenced.inside[:63],
    }
    for parts in segments:
        segment = "".join(swap.get(p, p) for p in parts)
        await _probe(fenced, (PREFIX + segment).encode("utf-8"))


@_FUZZ
@given(segments=st.lists(st.text(max_size=80), min_size=4, max_size=8))
async def test_by_hash_text_fuzz_no_open_outside(
    fenced: Fenced, segments: list[str]
) -> None:
    """Any text, percent-encoded as clients send it: right status, opens inside."""
    for segment in segments:
        await _probe(fenced, (PREFIX + quote(segment, safe="/%?")).encode("ascii"))


def test_roots_open_refuses_symlinked_path(tmp_path: Path) -> None:
    """``Roots.open`` refuses a path that is a symlink, even to a file inside."""
    inside = tmp_path / "in"
    write_file(inside, "real.bin", b"x")
    (inside / "link.bin").symlink_to(inside / "real.bin")
    roots = Roots.resolve([str(inside)], str(tmp_path / "store"))
    with recording_opens() as opened, pytest.raises(OutsideRootsError):
        roots.open(str(inside / "link.bin"))
    assert opened == []


def test_roots_open_refuses_path_outside(tmp_path: Path) -> None:
    """``Roots.open`` refuses a resolved path outside every folder before opening."""
    write_file(tmp_path / "out", "secret.bin", b"x")
    roots = Roots.resolve([str(tmp_path / "in")], str(tmp_path / "store"))
    with recording_opens() as opened, pytest.raises(OutsideRootsError):
        roots.open(str(tmp_path / "out" / "secret.bin"))
    assert opened == []


def test_roots_walk_keeps_inside_symlink_once(tmp_path: Path) -> None:
    """A symlink to a file inside is resolved to that file, listed once."""
    inside = tmp_path / "in"
    write_file(inside, "real.bin", b"x")
    (inside / "alias.bin").symlink_to(inside / "real.bin")
    roots = Roots.resolve([str(inside)], str(tmp_path / "store"))
    assert list(roots.walk(roots.dirs[0])) == [os.path.realpath(inside / "real.bin")]


def test_digest_parse_refuses_near_misses() -> None:
    """Only exactly 64 lower-case ASCII hex characters are a digest."""
    good = hashlib.sha256(b"x").hexdigest()
    for text in (
        good.upper(),
        good[:63],
        good + "0",
        good + "\n",
        "\uff10" * 64,
        " " + good[1:],
    ):
        assert Digest.parse(text) is None
    assert Digest.parse(good) == good
