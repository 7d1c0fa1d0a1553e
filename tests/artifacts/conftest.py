"""Fixtures for the artifact tests: folders of model files and a live endpoint.

``serve_artifacts`` starts ``Artifacts`` on a temporary data dir and mounts
it in a small aiohttp Application on 127.0.0.1 (port 0), the way the admin
port does; requests to other paths go to ``handle_upstream`` and, when it
declines, get 299 ``forwarded`` so a test can tell "left to the proxy".
``curl_fetch`` runs the real curl against it.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecar.artifacts import ArtifactOptions, Artifacts
from sidecar.artifacts.digest import Digest

_CURL_RUNS = itertools.count()
FORWARDED = 299


def write_file(folder: Path, name: str, data: bytes) -> Digest:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return Digest(hashlib.sha256(data).hexdigest())


def pattern_bytes(n: int, seed: int = 1) -> bytes:
    """``n`` bytes unlike their neighbours anywhere, so any slice is checkable."""
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(block[:64] + i.to_bytes(8, "big")).digest() * 2048
        i += 1
    return bytes(out[:n])


@dataclass
class Served:
    artifacts: Artifacts
    url: str
    port: int

    def by_hash(self, digest: str) -> str:
        return f"{self.url}/admin/models/by-hash/{digest}"


def build_app(
    artifacts: Artifacts, exits: asyncio.Queue[str] | None = None
) -> web.Application:
    async def rest(request: web.Request) -> web.StreamResponse:
        try:
            answered = await artifacts.handle_upstream(request)
            return answered if answered is not None else web.Response(status=FORWARDED)
        finally:
            if exits is not None:  # handler ended (returned, raised or cancelled)
                exits.put_nowait(request.path)

    app = web.Application()
    app.router.add_routes(artifacts.routes())
    app.router.add_route("*", "/{tail:.*}", rest)
    return app


@asynccontextmanager
async def listening(runner: web.BaseRunner) -> AsyncIterator[str]:
    """Run ``runner`` on 127.0.0.1 (port 0); yield its base URL; clean up."""
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def serving(
    artifacts: Artifacts, *, scan: bool = True, exits: asyncio.Queue[str] | None = None
) -> AsyncIterator[Served]:
    """Serve ``artifacts``; a lost client cancels its handler, as on the data port."""
    await artifacts.start()
    runner = web.AppRunner(build_app(artifacts, exits), handler_cancellation=True)
    try:
        if scan:
            assert artifacts.scanner is not None
            await artifacts.scanner.scan_now()
        async with listening(runner) as url:
            yield Served(artifacts, url, int(url.rsplit(":", 1)[1]))
    finally:
        await artifacts.close()


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    return folder


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def quick_options(**overrides: Any) -> ArtifactOptions:
    """No background scan during a test: passes run when the test asks."""
    return ArtifactOptions(**{"background_scan": False, **overrides})


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


async def curl_fetch(
    url: str, *headers: str, head: bool = False, tmp: Path
) -> tuple[int, dict[str, str], int, bytes]:
    """curl a URL: (exit code, header fields of the last response, status, body)."""
    body_path = tmp / f"curl-body-{next(_CURL_RUNS)}"
    # With -I curl writes the headers to -o as well; a HEAD has no body to keep.
    target = "/dev/null" if head else str(body_path)
    args = ["curl", "-s", "-S", "-D", "-", "-o", target, "--max-time", "30"]
    if head:
        args.append("-I")
    for h in headers:
        args += ["-H", h]
    proc = await asyncio.create_subprocess_exec(
        *args, url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 40)
    status, fields = parse_head(out.decode("latin-1"))
    body = body_path.read_bytes() if body_path.exists() else b""
    body_path.unlink(missing_ok=True)
    return proc.returncode or 0, fields, status, body


def parse_head(text: str) -> tuple[int, dict[str, str]]:
    blocks = [b for b in text.replace("\r\n", "\n").split("\n\n") if b.strip()]
    if not blocks:
        return 0, {}
    lines = blocks[-1].split("\n")
    status = int(lines[0].split()[1])
    fields: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return status, fields
