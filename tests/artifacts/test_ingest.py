"""Digest-addressed upstream paths: fetched once, verified, then served locally."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from sidecar.artifacts import ArtifactCounters, Artifacts
from sidecar.artifacts.digest import Digest
from sidecar.artifacts.serve import IMMUTABLE
from tests.artifacts.conftest import (
    FORWARDED,
    Served,
    listening,
    pattern_bytes,
    quick_options,
    serving,
)

PATTERN = "/v2/blobs/sha256:{sha256}"
BLOB = pattern_bytes(3 * 1024 * 1024 + 17, seed=7)
DIGEST = Digest(hashlib.sha256(BLOB).hexdigest())
FIRST_CHUNK = 64 * 1024


@dataclass
class FakeRegistry:
    """A scripted blob server: serves ``blobs``, may lie, hold or refuse."""

    blobs: dict[str, bytes] = field(default_factory=lambda: {DIGEST: BLOB})
    calls: list[str] = field(default_factory=list)
    hold: asyncio.Event | None = None  # when set: pause after the first chunk
    chunked: bool = False
    status: int = 200
    url: str = ""

    async def blob(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        self.calls.append(digest)
        assert request.headers.get("Accept-Encoding") == "identity"
        assert "Range" not in request.headers
        if self.status != 200 or digest not in self.blobs:
            status = self.status if self.status != 200 else 404
            return web.json_response(
                {"errors": [{"code": "BLOB_UNKNOWN"}]},
                status=status,
                headers={"Docker-Distribution-Api-Version": "2.0"},
            )
        data = self.blobs[digest]
        resp = web.StreamResponse()
        if self.chunked:
            resp.enable_chunked_encoding()
        else:
            resp.content_length = len(data)
        await resp.prepare(request)
        await resp.write(data[:FIRST_CHUNK])
        if self.hold is not None:
            await self.hold.wait()
        await resp.write(data[FIRST_CHUNK:])
        await resp.write_eof()
        return resp


@pytest.fixture
async def registry() -> AsyncIterator[FakeRegistry]:
    fake = FakeRegistry()
    app = web.Application()
    app.router.add_get("/v2/blobs/sha256:{digest}", fake.blob)
    async with listening(web.AppRunner(app)) as fake.url:
        yield fake


@pytest.fixture
async def sidecar(registry: FakeRegistry, data_dir: Path) -> AsyncIterator[Served]:
    artifacts = Artifacts(
        dirs=[],
        data_dir=data_dir,
        upstream_url=registry.url,
        upstream_patterns=[PATTERN],
        options=quick_options(),
    )
    async with serving(artifacts) as served:
        yield served


def _blob_url(served: Served, digest: str = DIGEST) -> str:
    return f"{served.url}/v2/blobs/sha256:{digest}"


def _store_files(data_dir: Path) -> list[str]:
    store = data_dir / "artifacts"
    return sorted(
        n
        for n in os.listdir(store)
        if not n.startswith("index.sqlite3") and n != "quarantine"
    )


async def test_ingest_first_fetch_streams_and_stores(
    sidecar: Served,
    registry: FakeRegistry,
    data_dir: Path,
    client: aiohttp.ClientSession,
) -> None:
    """The first request streams the upstream blob; it is then kept under its digest."""
    async with client.get(_blob_url(sidecar)) as resp:
        assert resp.status == 200
        assert resp.headers["X-Sidecar-Cache"] == "miss"
        assert resp.headers["ETag"] == f'"{DIGEST}"'
        assert await resp.read() == BLOB
    assert _store_files(data_dir) == [DIGEST]
    assert sidecar.artifacts.model.snapshot()["ingest"]["stored"] == 1


async def test_ingest_later_requests_served_locally_with_validators(
    sidecar: Served, registry: FakeRegistry, client: aiohttp.ClientSession
) -> None:
    """After the first fetch, requests are answered from the store with validators."""
    async with client.get(_blob_url(sidecar)) as resp:
        await resp.read()
    async with client.get(_blob_url(sidecar), headers={"Range": "bytes=10-19"}) as resp:
        assert resp.status == 206
        assert await resp.read() == BLOB[10:20]
        assert resp.headers["X-Sidecar-Cache"] == "hit"
        assert resp.headers["Cache-Control"] == IMMUTABLE
        assert "Last-Modified" in resp.headers and int(resp.headers["Age"]) >= 0
    async with client.get(
        _blob_url(sidecar), headers={"If-None-Match": f'"{DIGEST}"'}
    ) as resp:
        assert resp.status == 304
    async with client.get(sidecar.by_hash(DIGEST)) as resp:
        assert resp.status == 200 and await resp.read() == BLOB
    assert registry.calls == [DIGEST]


async def test_ingest_mismatch_cuts_client_and_keeps_nothing(
    sidecar: Served,
    registry: FakeRegistry,
    data_dir: Path,
    client: aiohttp.ClientSession,
) -> None:
    """Bytes that do not match the digest cut the download; nothing is stored."""
    registry.blobs[DIGEST] = BLOB[:-1] + b"X"
    async with client.get(_blob_url(sidecar)) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert _store_files(data_dir) == []
    assert sidecar.artifacts.model.snapshot()["ingest"]["mismatch"] == 1
    async with client.get(sidecar.by_hash(DIGEST)) as resp:
        assert resp.status == 404


async def test_ingest_mismatch_chunked_cuts_before_final_chunk(
    sidecar: Served,
    registry: FakeRegistry,
    data_dir: Path,
    client: aiohttp.ClientSession,
) -> None:
    """Without a Content-Length, the final chunk is withheld and the download cut."""
    registry.chunked = True
    registry.blobs[DIGEST] = b"Y" + BLOB[1:]
    async with client.get(_blob_url(sidecar)) as resp:
        assert resp.headers.get("Transfer-Encoding") == "chunked"
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert _store_files(data_dir) == []


async def test_ingest_mismatch_curl_sees_error(
    sidecar: Served, registry: FakeRegistry, data_dir: Path, tmp_path: Path
) -> None:
    """curl reports the cut download as an error (exit 18, partial file)."""
    registry.blobs[DIGEST] = BLOB[:-1] + b"X"
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-s",
        "-o",
        str(tmp_path / "out"),
        _blob_url(sidecar),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 18
    assert _store_files(data_dir) == []


async def test_ingest_chunked_match_stored(
    sidecar: Served,
    registry: FakeRegistry,
    data_dir: Path,
    client: aiohttp.ClientSession,
) -> None:
    """A chunked upstream blob that matches is relayed whole and stored."""
    registry.chunked = True
    async with client.get(_blob_url(sidecar)) as resp:
        assert await resp.read() == BLOB
    assert _store_files(data_dir) == [DIGEST]


async def test_ingest_empty_body_for_digest_502_json(
    sidecar: Served,
    registry: FakeRegistry,
    data_dir: Path,
    client: aiohttp.ClientSession,
) -> None:
    """An empty body that is not the digest's bytes is a 502 before any byte is sent."""
    registry.blobs[DIGEST] = b""
    async with client.get(_blob_url(sidecar)) as resp:
        assert resp.status == 502
        assert b'"code":"upstream_failed"' in await resp.read()
    assert _store_files(data_dir) == []


async def test_ingest_concurrent_first_fetches_one_upstream_call(
    sidecar: Served, registry: FakeRegistry, client: aiohttp.ClientSession
) -> None:
    """Two requests overlapping the first fetch make one upstream call; both get it."""
    registry.hold = asyncio.Event()
    async with client.get(_blob_url(sidecar)) as first:
        head = await first.content.readexactly(1024)
        async with client.get(_blob_url(sidecar)) as second:
            assert second.headers["X-Sidecar-Cache"] == "coalesced"
            head2 = await second.content.readexactly(1024)
            registry.hold.set()
            assert head + await first.read() == BLOB
            assert head2 + await second.read() == BLOB
    assert registry.calls == [DIGEST]
    assert sidecar.artifacts.model.snapshot()["ingest"]["followers"] == 1


async def test_ingest_client_gone_fetch_completes_for_resume(
    registry: FakeRegistry, data_dir: Path, client: aiohttp.ClientSession
) -> None:
    """A client that goes away does not abort the fetch; a resumed request gets 206."""
    registry.hold = asyncio.Event()
    exits: asyncio.Queue[str] = asyncio.Queue()
    artifacts = Artifacts(
        dirs=[],
        data_dir=data_dir,
        upstream_url=registry.url,
        upstream_patterns=[PATTERN],
        options=quick_options(),
    )
    async with serving(artifacts, exits=exits) as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(
            f"GET /v2/blobs/sha256:{DIGEST} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        await reader.readexactly(1024)
        writer.transport.abort()
        await asyncio.wait_for(exits.get(), 10)  # its handler was cancelled
        registry.hold.set()
        async with client.get(
            _blob_url(served), headers={"Range": "bytes=1000-"}
        ) as resp:
            assert resp.status == 206
            assert await resp.read() == BLOB[1000:]
    assert registry.calls == [DIGEST]


async def test_ingest_range_before_stored_waits_then_partial(
    sidecar: Served, registry: FakeRegistry, client: aiohttp.ClientSession
) -> None:
    """A Range request for a blob not stored yet gets 206 cut from verified bytes."""
    async with client.get(_blob_url(sidecar), headers={"Range": "bytes=-100"}) as resp:
        assert resp.status == 206
        assert resp.headers["X-Sidecar-Cache"] == "miss"
        assert await resp.read() == BLOB[-100:]


async def test_ingest_upstream_404_relayed_nothing_stored(
    sidecar: Served,
    registry: FakeRegistry,
    data_dir: Path,
    client: aiohttp.ClientSession,
) -> None:
    """A non-200 upstream answer is passed through with its body; nothing is kept."""
    unknown = hashlib.sha256(b"unknown").hexdigest()
    async with client.get(_blob_url(sidecar, unknown)) as resp:
        assert resp.status == 404
        assert resp.headers["Docker-Distribution-Api-Version"] == "2.0"
        assert resp.headers["X-Sidecar-Cache-Reason"] == "upstream_error"
        assert await resp.json() == {"errors": [{"code": "BLOB_UNKNOWN"}]}
    assert _store_files(data_dir) == []
    assert sidecar.artifacts.model.snapshot()["ingest"]["upstream_status"] == 1


async def test_ingest_head_not_stored_left_to_proxy(
    sidecar: Served, registry: FakeRegistry, client: aiohttp.ClientSession
) -> None:
    """HEAD for a blob not stored yet starts no fetch; the proxy forwards it."""
    async with client.head(_blob_url(sidecar)) as resp:
        assert resp.status == FORWARDED
    assert registry.calls == []


async def test_ingest_other_paths_left_to_proxy(
    sidecar: Served, registry: FakeRegistry, client: aiohttp.ClientSession
) -> None:
    """Paths outside the patterns, and upper-case digests, are not handled here."""
    for path in (
        "/v1/models",
        f"/v2/blobs/sha256:{DIGEST.upper()}",
        f"/v2/blobs/{DIGEST}",
    ):
        async with client.get(sidecar.url + path) as resp:
            assert resp.status == FORWARDED, path
    assert registry.calls == []


async def test_ingest_if_none_match_digest_304_without_fetch(
    sidecar: Served, registry: FakeRegistry, client: aiohttp.ClientSession
) -> None:
    """A client holding the digest's tag gets 304 without an upstream call."""
    async with client.get(
        _blob_url(sidecar), headers={"If-None-Match": f'W/"{DIGEST}"'}
    ) as resp:
        assert resp.status == 304
        assert await resp.read() == b""
    assert registry.calls == []


async def test_ingest_blob_over_size_limit_cut_nothing_kept(
    registry: FakeRegistry, data_dir: Path, client: aiohttp.ClientSession
) -> None:
    """A blob growing past ``max_blob_bytes`` is cut and nothing is kept."""
    registry.hold = asyncio.Event()
    artifacts = Artifacts(
        dirs=[],
        data_dir=data_dir,
        upstream_url=registry.url,
        upstream_patterns=[PATTERN],
        options=quick_options(max_blob_bytes=FIRST_CHUNK + 10),
    )
    async with serving(artifacts) as served, client.get(_blob_url(served)) as resp:
        assert resp.status == 200
        await resp.content.readexactly(1024)  # streaming has begun
        registry.hold.set()
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert _store_files(data_dir) == []
    assert artifacts.model.snapshot()["ingest"]["failed"] == 1


async def test_ingest_upstream_unreachable_502_json(
    data_dir: Path, client: aiohttp.ClientSession, unused_tcp_port: int
) -> None:
    """An upstream that refuses connections gives a 502 JSON error."""
    counted: list[str] = []
    artifacts = Artifacts(
        dirs=[],
        data_dir=data_dir,
        upstream_url=f"http://127.0.0.1:{unused_tcp_port}",
        upstream_patterns=[PATTERN],
        options=quick_options(),
        counters=ArtifactCounters(ingests=counted.append),
    )
    async with serving(artifacts) as served, client.get(_blob_url(served)) as resp:
        assert resp.status == 502
        assert b'"code":"upstream_failed"' in await resp.read()
    assert counted == ["failed"]
    assert _store_files(data_dir) == []
