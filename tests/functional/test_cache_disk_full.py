"""A full disk never stops the sidecar from answering.

The data dir sits on a 1 MiB tmpfs; distinct cacheable answers of 20 KiB
fill it. LevelDB's writes then fail, the disk tier degrades (reads go on,
writes are skipped) and every request is still answered by the upstream
or the memory tier.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from sidecar.app import Sidecar
from sidecar.manifest import load_manifest
from tests.conftest import data_url
from tests.helpers.fake_upstream import FakeUpstream, chat_completion


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "tiny"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_cache_full_disk_keeps_answering(fake_upstream: FakeUpstream, tiny_disk: Path, tmp_path: Path) -> None:
    """With the disk tier's file system full, every request still gets its 200."""

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response(chat_completion(os.urandom(10_000).hex()))

    fake_upstream.handler = handler
    policy = tmp_path / "p.yaml"
    policy.write_text("cache:\n  compression: {enabled: false}\n  memory: {max_entries: 8}\n")
    flags = {"upstream": fake_upstream.url, "listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0"}
    sidecar = Sidecar(load_manifest(str(policy), env={}, flags=flags), data_dir=tiny_disk / "data")
    await sidecar.start()
    try:
        async with asyncio.timeout(10):
            while sidecar.environment.signature is None:
                await asyncio.sleep(0.01)
        statuses = []
        async with aiohttp.ClientSession() as s:
            for i in range(120):
                payload = {"messages": [{"role": "user", "content": f"q{i}"}], "temperature": 0}
                async with s.post(data_url(sidecar) + "/v1/chat/completions", json=payload) as resp:
                    statuses.append(resp.status)
                    await resp.read()
                await sidecar.cache_stage.drain_writes()
            assert sidecar.cache.disk is not None
            assert sidecar.cache.disk.degraded
            # Still answering, and the memory tier still serves repeats.
            payload = {"messages": [{"role": "user", "content": "q119"}], "temperature": 0}
            async with s.post(data_url(sidecar) + "/v1/chat/completions", json=payload) as resp:
                assert resp.status == 200
                assert resp.headers["X-Sidecar-Cache"] == "hit"
        assert statuses == [200] * 120
    finally:
        await sidecar.close()
