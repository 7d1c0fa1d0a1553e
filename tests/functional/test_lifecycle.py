"""The real ``sidecar serve`` process: start-up refusals, SIGTERM drain, SIGHUP reload."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.helpers.fake_upstream import FakeUpstream
from tests.helpers.process import SidecarProcess


async def test_serve_sigterm_drains_50_in_flight(fake_upstream: FakeUpstream, tmp_path: Path) -> None:
    """SIGTERM with 50 requests in flight: all complete, exit 0, within the grace period."""
    n = 50
    all_arrived = asyncio.Event()
    release = asyncio.Event()
    arrived = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal arrived
        arrived += 1
        if arrived == n:
            all_arrived.set()
        await release.wait()
        return web.json_response({"n": request.path})

    fake_upstream.handler = handler
    policy = tmp_path / "p.yaml"
    policy.write_text("listen:\n  drain_delay: 300ms\n  grace: 5s\n")
    proc = SidecarProcess(fake_upstream.url, tmp_path / "data", policy=str(policy))
    await asyncio.to_thread(proc.start)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

            async def one(i: int) -> tuple[int, dict[str, str]]:
                async with s.post(f"{proc.url}/v1/x{i}", json={"i": i}) as resp:
                    return resp.status, await resp.json()

            tasks = [asyncio.create_task(one(i)) for i in range(n)]
            async with asyncio.timeout(20):
                await all_arrived.wait()
            t0 = time.monotonic()
            proc.signal(signal.SIGTERM)
            # Readiness turns false at once, while requests are still held.
            async with asyncio.timeout(5):
                while True:
                    async with s.get(f"{proc.admin_url}/readyz") as resp:
                        if resp.status == 503:
                            break
                    await asyncio.sleep(0.02)
            release.set()
            results = await asyncio.gather(*tasks)
        assert [status for status, _ in results] == [200] * n
        assert sorted(body["n"] for _, body in results) == sorted(f"/v1/x{i}" for i in range(n))
        rc = await asyncio.to_thread(proc.wait, 15)
        assert rc == 0
        assert time.monotonic() - t0 < 0.3 + 5 + 2
    finally:
        release.set()
        proc.stop()


async def test_serve_grace_expiry_ends_streams_cleanly(fake_upstream: FakeUpstream, tmp_path: Path) -> None:
    """A stream still running when the grace period ends is finished cleanly, and the process exits 0."""
    first = asyncio.Event()
    never = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: 1\n\n")
        first.set()
        await never.wait()
        return resp

    fake_upstream.handler = handler
    policy = tmp_path / "p.yaml"
    policy.write_text("listen:\n  drain_delay: 100ms\n  grace: 1s\n")
    proc = SidecarProcess(fake_upstream.url, tmp_path / "data", policy=str(policy))
    await asyncio.to_thread(proc.start)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{proc.url}/stream") as resp:
                await first.wait()
                t0 = time.monotonic()
                proc.signal(signal.SIGTERM)
                body = await resp.read()  # a cut stream would raise ClientPayloadError
        assert body == b"data: 1\n\n"
        assert await asyncio.to_thread(proc.wait, 10) == 0
        assert time.monotonic() - t0 < 0.1 + 1 + 2.5
    finally:
        never.set()
        proc.stop()


async def test_serve_sighup_reloads_and_bad_manifest_keeps_old(fake_upstream: FakeUpstream, tmp_path: Path) -> None:
    """SIGHUP reloads the manifest; a bad one is counted and the old one stays in force."""
    policy = tmp_path / "p.yaml"
    policy.write_text("limits:\n  max_body_bytes: 1MiB\n")
    proc = SidecarProcess(fake_upstream.url, tmp_path / "data", policy=str(policy))
    await asyncio.to_thread(proc.start)
    try:
        async with aiohttp.ClientSession() as s:

            async def reloads(result: str) -> float:
                async with s.get(f"{proc.admin_url}/metrics") as resp:
                    text = await resp.text()
                for line in text.splitlines():
                    if line.startswith(f'sidecar_policy_reloads_total{{result="{result}"}}'):
                        return float(line.split()[-1])
                return 0.0

            async def status_for(size: int) -> int:
                async with s.post(f"{proc.url}/x", data=b"a" * size) as resp:
                    await resp.read()
                    return resp.status

            assert await status_for(2048) == 200
            policy.write_text("limits:\n  max_body_bytes: 1KiB\n")
            proc.signal(signal.SIGHUP)
            async with asyncio.timeout(5):
                while await reloads("ok") < 1:
                    await asyncio.sleep(0.02)
            assert await status_for(2048) == 413
            policy.write_text("limits:\n  max_body_bytes: lots\n")
            proc.signal(signal.SIGHUP)
            async with asyncio.timeout(5):
                while await reloads("error") < 1:
                    await asyncio.sleep(0.02)
            assert await status_for(2048) == 413
            assert await status_for(512) == 200
        assert "manifest.reload_failed" in proc.log_text()
    finally:
        proc.stop()


def test_serve_admin_beyond_loopback_without_token_refuses(tmp_path: Path) -> None:
    """Binding the admin port beyond loopback without a token refuses to start, with a clear message."""
    policy = tmp_path / "empty.yaml"
    policy.write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "serve", "--policy", str(policy),
         "--upstream", "http://127.0.0.1:9", "--listen", "127.0.0.1:0",
         "--admin-listen", "0.0.0.0:0", "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert "beyond loopback" in result.stderr
    assert "SIDECAR_ADMIN_TOKEN" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_bad_manifest_refuses_to_start(tmp_path: Path) -> None:
    """A manifest that does not validate stops start-up with its errors, exit 2."""
    policy = tmp_path / "bad.yaml"
    policy.write_text("upstream:\n  url: ftp://nope\n")
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "serve", "--policy", str(policy),
         "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert f"{policy}:2: upstream.url:" in result.stderr
    assert "Traceback" not in result.stderr
