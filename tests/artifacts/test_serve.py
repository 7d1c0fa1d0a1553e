"""``/admin/models/by-hash/{sha256}`` over real HTTP, with aiohttp and with curl."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import h11
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from sidecar.artifacts import Artifacts
from sidecar.artifacts.digest import Digest
from sidecar.artifacts.serve import IMMUTABLE
from sidecar.artifacts.validators import format_http_date
from tests.artifacts.audit import recording_opens
from tests.artifacts.conftest import (
    Served,
    curl_fetch,
    listening,
    pattern_bytes,
    quick_options,
    serving,
    write_file,
)

SIZE = 200_000


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes


Fetch = Callable[..., Awaitable[Answer]]


@dataclass
class Weights:
    served: Served
    digest: Digest
    data: bytes
    path: Path

    @property
    def url(self) -> str:
        return self.served.by_hash(self.digest)


@pytest.fixture
async def weights(models_dir: Path, data_dir: Path) -> AsyncIterator[Weights]:
    data = pattern_bytes(SIZE)
    digest = write_file(models_dir, "model.gguf", data)
    artifacts = Artifacts(
        dirs=[str(models_dir)], data_dir=data_dir, options=quick_options()
    )
    async with serving(artifacts) as served:
        yield Weights(served, digest, data, models_dir / "model.gguf")


@pytest.fixture(params=["aiohttp", "curl"])
def fetch(
    request: pytest.FixtureRequest, client: aiohttp.ClientSession, tmp_path: Path
) -> Fetch:
    """GET or HEAD with header lines ``"Name: value"``, through aiohttp or curl."""

    async def with_aiohttp(url: str, *fields: str, method: str = "GET") -> Answer:
        headers = [
            (name, value) for name, _, value in (f.partition(": ") for f in fields)
        ]
        async with client.request(method, url, headers=headers) as resp:
            body = await resp.read()
            return Answer(
                resp.status, {k.lower(): v for k, v in resp.headers.items()}, body
            )

    async def with_curl(url: str, *fields: str, method: str = "GET") -> Answer:
        code, headers, status, body = await curl_fetch(
            url, *fields, head=method == "HEAD", tmp=tmp_path
        )
        assert code == 0, f"curl exit {code}"
        return Answer(status, headers, body)

    return with_aiohttp if request.param == "aiohttp" else with_curl


def _assert_validators(answer: Answer, w: Weights) -> None:
    assert answer.headers["etag"] == f'"{w.digest}"'
    assert answer.headers["cache-control"] == IMMUTABLE
    assert answer.headers["accept-ranges"] == "bytes"
    assert answer.headers["last-modified"] == format_http_date(
        int(w.path.stat().st_mtime)
    )


async def test_by_hash_get_full_body_with_validators(
    weights: Weights, fetch: Fetch
) -> None:
    """GET answers 200 with the file, ETag, Last-Modified, immutable caching, ranges."""
    answer = await fetch(weights.url)
    assert answer.status == 200
    _assert_validators(answer, weights)
    assert answer.headers["content-length"] == str(SIZE)
    assert answer.body == weights.data


async def test_by_hash_head_headers_without_body(
    weights: Weights, fetch: Fetch
) -> None:
    """HEAD gets the 200 headers, Content-Length included, and no body."""
    answer = await fetch(weights.url, method="HEAD")
    assert answer.status == 200
    _assert_validators(answer, weights)
    assert answer.headers["content-length"] == str(SIZE)
    assert answer.body == b""


@pytest.mark.parametrize(
    "tag",
    ['"{d}"', 'W/"{d}"', '"0000", "{d}"', "*"],
    ids=["strong", "weak", "list", "star"],
)
async def test_by_hash_if_none_match_not_modified_empty_body(
    weights: Weights, fetch: Fetch, tag: str
) -> None:
    """If-None-Match (strong, weak, list or *) gives 304 with validators and no body."""
    answer = await fetch(weights.url, "If-None-Match: " + tag.format(d=weights.digest))
    assert answer.status == 304
    assert answer.body == b""
    assert answer.headers["etag"] == f'"{weights.digest}"'
    assert answer.headers["cache-control"] == IMMUTABLE


async def test_by_hash_not_modified_opens_no_file(
    weights: Weights, fetch: Fetch
) -> None:
    """A 304 is answered from the index without opening the file."""
    with recording_opens() as opened:
        answer = await fetch(weights.url, f'If-None-Match: "{weights.digest}"')
    assert answer.status == 304
    assert str(weights.path) not in [os.path.realpath(p) for p in opened]


async def test_by_hash_head_if_none_match_not_modified(
    weights: Weights, fetch: Fetch
) -> None:
    """HEAD with a matching If-None-Match gives 304 too."""
    answer = await fetch(
        weights.url, f'If-None-Match: "{weights.digest}"', method="HEAD"
    )
    assert answer.status == 304
    assert answer.body == b""


async def test_by_hash_if_none_match_beats_if_modified_since(
    weights: Weights, fetch: Fetch
) -> None:
    """A non-matching If-None-Match wins over an If-Modified-Since that would match."""
    later = format_http_date(int(weights.path.stat().st_mtime) + 3600)
    answer = await fetch(
        weights.url, 'If-None-Match: "other"', f"If-Modified-Since: {later}"
    )
    assert answer.status == 200
    assert answer.body == weights.data


async def test_by_hash_if_modified_since_not_modified(
    weights: Weights, fetch: Fetch
) -> None:
    """If-Modified-Since at Last-Modified gives 304 with no body."""
    answer = await fetch(
        weights.url,
        "If-Modified-Since: " + format_http_date(int(weights.path.stat().st_mtime)),
    )
    assert answer.status == 304
    assert answer.body == b""


@pytest.mark.parametrize(
    ("spec", "start", "end"),
    [
        ("bytes=100-199", 100, 199),
        ("bytes=199990-", 199990, SIZE - 1),
        ("bytes=-10", SIZE - 10, SIZE - 1),
        ("bytes=0-999999999", 0, SIZE - 1),
    ],
    ids=["closed", "open", "suffix", "clamped"],
)
async def test_by_hash_single_range_partial_slice(
    weights: Weights, fetch: Fetch, spec: str, start: int, end: int
) -> None:
    """One range gives 206, Content-Range and exactly that slice."""
    answer = await fetch(weights.url, f"Range: {spec}")
    assert answer.status == 206
    assert answer.headers["content-range"] == f"bytes {start}-{end}/{SIZE}"
    assert answer.headers["content-length"] == str(end - start + 1)
    assert answer.body == weights.data[start : end + 1]
    _assert_validators(answer, weights)


async def test_by_hash_unsatisfiable_range_416(weights: Weights, fetch: Fetch) -> None:
    """A range past the end gives 416, ``Content-Range: bytes */LEN``, a JSON error."""
    answer = await fetch(weights.url, f"Range: bytes={SIZE}-")
    assert answer.status == 416
    assert answer.headers["content-range"] == f"bytes */{SIZE}"
    assert b'"code":"range_not_satisfiable"' in answer.body


@pytest.mark.parametrize(
    "spec",
    ["bytes=0-9,20-29", "bytes=0-100,50-150", "bytes=-5,-5"],
    ids=["many", "overlapping", "repeated-suffix"],
)
async def test_by_hash_many_ranges_whole_body(
    weights: Weights, fetch: Fetch, spec: str
) -> None:
    """Several ranges are answered with the whole body, never a multipart answer."""
    answer = await fetch(weights.url, f"Range: {spec}")
    assert answer.status == 200
    assert "multipart" not in answer.headers.get("content-type", "")
    assert answer.body == weights.data


async def test_by_hash_if_range_stale_whole_body(
    weights: Weights, fetch: Fetch
) -> None:
    """If-Range with a stale validator gets the whole body."""
    answer = await fetch(weights.url, "Range: bytes=0-9", 'If-Range: "stale"')
    assert answer.status == 200
    assert answer.body == weights.data


async def test_by_hash_if_range_weak_whole_body(weights: Weights, fetch: Fetch) -> None:
    """If-Range compares strongly: a weak form of the right tag gets the whole body."""
    answer = await fetch(
        weights.url, "Range: bytes=0-9", f'If-Range: W/"{weights.digest}"'
    )
    assert answer.status == 200
    assert answer.body == weights.data


async def test_by_hash_if_range_current_partial(weights: Weights, fetch: Fetch) -> None:
    """If-Range with the current tag honours the range."""
    answer = await fetch(
        weights.url, "Range: bytes=0-9", f'If-Range: "{weights.digest}"'
    )
    assert answer.status == 206
    assert answer.body == weights.data[:10]


async def test_by_hash_head_with_range_headers_only(
    weights: Weights, fetch: Fetch
) -> None:
    """HEAD ignores Range: 200 headers for the whole file, no body."""
    answer = await fetch(weights.url, "Range: bytes=0-9", method="HEAD")
    assert answer.status == 200
    assert answer.headers["content-length"] == str(SIZE)
    assert answer.body == b""


async def test_by_hash_pipelined_head_and_304_send_no_body_bytes(
    weights: Weights,
) -> None:
    """HEAD and 304 send no byte after their headers (h11 parses what follows)."""
    target = f"/admin/models/by-hash/{weights.digest}"
    raw = (
        f"HEAD {target} HTTP/1.1\r\nHost: x\r\n\r\n"
        f'GET {target} HTTP/1.1\r\nHost: x\r\nIf-None-Match: "{weights.digest}"\r\n\r\n'
        f"GET {target} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-3\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", weights.served.port)
    writer.write(raw)
    answers: list[tuple[int, bytes]] = []
    conn = h11.Connection(h11.CLIENT)
    try:
        async with asyncio.timeout(10):
            for method in (b"HEAD", b"GET", b"GET"):
                conn.send(
                    h11.Request(method=method, target=target, headers=[("Host", "x")])
                )
                conn.send(h11.EndOfMessage())
                status, body = 0, b""
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await reader.read(65536))
                    elif isinstance(event, h11.Response):
                        status = event.status_code
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                answers.append((status, body))
                conn.start_next_cycle()
    finally:
        writer.close()
    assert answers == [(200, b""), (304, b""), (206, weights.data[:4])]


async def test_by_hash_unknown_digest_404_json(weights: Weights, fetch: Fetch) -> None:
    """A well-formed digest nobody indexed is a 404 JSON error, not cacheable."""
    answer = await fetch(weights.served.by_hash(hashlib.sha256(b"nope").hexdigest()))
    assert answer.status == 404
    assert answer.headers["cache-control"] == "no-store"
    assert b'"code":"not_found"' in answer.body


async def test_by_hash_malformed_digest_400_json(
    weights: Weights, fetch: Fetch
) -> None:
    """Anything but 64 lower-case hex digits is a 400 JSON error."""
    answer = await fetch(weights.served.by_hash(weights.digest.upper()))
    assert answer.status == 400
    assert b'"code":"bad_request"' in answer.body


async def test_by_hash_post_refused_with_allow(
    weights: Weights, client: aiohttp.ClientSession
) -> None:
    """Methods other than GET and HEAD are refused with Allow: GET, HEAD."""
    async with client.post(weights.url, data=b"x") as resp:
        assert resp.status == 400
        assert resp.headers["Allow"] == "GET, HEAD"


async def test_by_hash_percent_encoded_digest_served(
    weights: Weights, client: aiohttp.ClientSession
) -> None:
    """The segment is matched after percent-decoding: %61 for ``a`` still names it."""
    encoded = "".join(f"%{ord(c):02x}" for c in weights.digest)
    url = URL(weights.served.url + "/admin/models/by-hash/" + encoded, encoded=True)
    async with client.get(url) as resp:
        assert resp.status == 200
        assert await resp.read() == weights.data


async def test_by_hash_curl_resume_completes_file(
    weights: Weights, tmp_path: Path
) -> None:
    """``curl -C -`` resumes a partial download with a 206 and ends with the file."""
    out = tmp_path / "partial.gguf"
    out.write_bytes(weights.data[:12345])
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-s",
        "-S",
        "-C",
        "-",
        "-o",
        str(out),
        "-w",
        "%{http_code}",
        weights.url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, stderr
    assert stdout == b"206"
    assert out.read_bytes() == weights.data


async def test_by_hash_body_sent_with_sendfile(
    weights: Weights, client: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a plain TCP connection the body goes through os.sendfile, not Python reads."""
    moved: list[int] = []
    real = os.sendfile

    def counting(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        sent = real(out_fd, in_fd, offset, count)
        moved.append(sent)
        return sent

    monkeypatch.setattr(os, "sendfile", counting)
    async with client.get(weights.url) as resp:
        assert await resp.read() == weights.data
    assert sum(moved) == SIZE


async def test_by_hash_low_level_server_handles_base_request(weights: Weights) -> None:
    """``Artifacts.handle`` serves a plain ``web.Server`` (the data port's kind)."""
    artifacts = weights.served.artifacts

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        assert artifacts.is_by_hash(request.raw_path)
        return await artifacts.handle(request)

    async with (
        listening(web.ServerRunner(web.Server(handler))) as base,
        aiohttp.ClientSession() as session,
        session.get(
            f"{base}/admin/models/by-hash/{weights.digest}",
            headers={"Range": "bytes=5-9"},
        ) as resp,
    ):
        assert resp.status == 206
        assert await resp.read() == weights.data[5:10]


async def test_by_hash_client_gone_mid_body_server_keeps_serving(
    models_dir: Path, data_dir: Path, client: aiohttp.ClientSession
) -> None:
    """A client that disconnects mid-body does not break later requests."""
    data = pattern_bytes(24 * 1024 * 1024)
    digest = write_file(models_dir, "big.bin", data)
    artifacts = Artifacts(
        dirs=[str(models_dir)], data_dir=data_dir, options=quick_options()
    )
    async with serving(artifacts) as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(
            f"GET /admin/models/by-hash/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        await reader.readexactly(4096)
        writer.transport.abort()
        async with client.get(
            served.by_hash(digest), headers={"Range": "bytes=-4"}
        ) as resp:
            assert resp.status == 206
            assert await resp.read() == data[-4:]


async def test_by_hash_before_start_503(data_dir: Path) -> None:
    """Before ``start`` the endpoint answers 503 with Retry-After, not a traceback."""
    artifacts = Artifacts(dirs=[], data_dir=data_dir)
    app = web.Application()
    app.router.add_routes(artifacts.routes())
    async with (
        listening(web.AppRunner(app)) as base,
        aiohttp.ClientSession() as session,
        session.get(f"{base}/admin/models/by-hash/{'0' * 64}") as resp,
    ):
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    first=st.none() | st.integers(0, SIZE + 10),
    last=st.none() | st.integers(0, SIZE + 10),
    pad=st.sampled_from(["", " ", "\t"]),
    unit=st.sampled_from(["bytes", "BYTES"]),
)
async def test_by_hash_any_single_range_answer_matches_slice(
    weights: Weights,
    client: aiohttp.ClientSession,
    first: int | None,
    last: int | None,
    pad: str,
    unit: str,
) -> None:
    """For any single range: 206 with exactly the slice, 416, or the whole file."""
    spec = f"{'' if first is None else first}-{'' if last is None else last}"
    async with client.get(
        weights.url, headers={"Range": f"{unit}={pad}{spec}{pad}"}
    ) as resp:
        body = await resp.read()
        if resp.status == 206:
            unit_, _, span = resp.headers["Content-Range"].partition(" ")
            bounds, _, total = span.partition("/")
            start, end = (int(x) for x in bounds.split("-"))
            assert (unit_, int(total)) == ("bytes", SIZE)
            assert body == weights.data[start : end + 1]
            assert int(resp.headers["Content-Length"]) == len(body) == end - start + 1
            if first is not None:
                assert start == first
        elif resp.status == 416:
            assert resp.headers["Content-Range"] == f"bytes */{SIZE}"
        else:
            assert resp.status == 200
            assert body == weights.data
