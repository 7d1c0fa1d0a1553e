"""The admin port: liveness, readiness, metrics, and token-guarded reloads."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import SidecarFactory, admin_url, data_url
from tests.helpers.fake_upstream import FakeUpstream

TOKEN_POLICY = "admin:\n  token: s3cret-token-0123456789\n"


async def _wait_ready(session: aiohttp.ClientSession, url: str, want: int) -> dict[str, object]:
    for _ in range(200):
        async with session.get(url + "/readyz") as resp:
            body = await resp.json()
            if resp.status == want:
                return body
        await __import__("asyncio").sleep(0.02)
    raise AssertionError(f"/readyz never answered {want}")


async def test_admin_healthz_alive(fake_upstream: FakeUpstream, make_sidecar: SidecarFactory) -> None:
    """/healthz answers 200 while the process runs."""
    sidecar = await make_sidecar(fake_upstream.url)
    async with aiohttp.ClientSession() as s, s.get(admin_url(sidecar) + "/healthz") as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "alive"


async def test_admin_readyz_follows_upstream(make_sidecar: SidecarFactory) -> None:
    """/readyz is 503 while the upstream is unreachable and 200 once it answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sidecar = await make_sidecar(f"http://127.0.0.1:{port}", "upstream:\n  connect_timeout: 200ms\n")
    async with aiohttp.ClientSession() as s:
        body = await _wait_ready(s, admin_url(sidecar), 503)
        assert body["upstream"] is False
        from aiohttp import web

        async def ok(request: web.BaseRequest) -> web.Response:
            return web.Response(text="ok")

        server = web.Server(ok)
        runner = web.ServerRunner(server)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            body = await _wait_ready(s, admin_url(sidecar), 200)
            assert body == {"ready": True, "draining": False, "upstream": True}
        finally:
            await runner.cleanup()


async def test_admin_readyz_false_while_draining(fake_upstream: FakeUpstream, make_sidecar: SidecarFactory) -> None:
    """/readyz turns false as soon as a drain starts."""
    sidecar = await make_sidecar(fake_upstream.url, "listen:\n  drain_delay: 2s\n")
    async with aiohttp.ClientSession() as s:
        await _wait_ready(s, admin_url(sidecar), 200)
        sidecar._on_term()
        body = await _wait_ready(s, admin_url(sidecar), 503)
        assert body["draining"] is True


async def test_admin_metrics_pass_promtool(fake_upstream: FakeUpstream, make_sidecar: SidecarFactory, tmp_path: Path) -> None:
    """/metrics carries the DESIGN.md families and `promtool check metrics` accepts it."""
    sidecar = await make_sidecar(fake_upstream.url)
    async with aiohttp.ClientSession() as s:
        for path in ("/v1/models", "/v1/chat/completions", "/other"):
            async with s.get(data_url(sidecar) + path) as resp:
                await resp.read()
        async with s.get(admin_url(sidecar) + "/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    for family in (
        "sidecar_requests_total", "sidecar_request_duration_seconds",
        "sidecar_upstream_duration_seconds", "sidecar_in_flight_requests",
        "sidecar_policy_reloads_total",
    ):
        assert f"# TYPE {family} " in text
    assert 'sidecar_requests_total{code="200",route="models"} 1' in text
    assert 'route="other"' in text
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed (make debs installs Debian's prometheus)")
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


async def test_admin_reload_needs_token(fake_upstream: FakeUpstream, make_sidecar: SidecarFactory) -> None:
    """POST /admin/policy/reload without the right bearer token is refused with 401."""
    sidecar = await make_sidecar(fake_upstream.url, TOKEN_POLICY)
    async with aiohttp.ClientSession() as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token-0123456789"}):
            async with s.post(admin_url(sidecar) + "/admin/policy/reload", headers=headers) as resp:
                assert resp.status == 401
                assert (await resp.json())["error"]["code"] == "unauthorized"
        async with s.post(admin_url(sidecar) + "/admin/policy/reload",
                          headers={"Authorization": "Bearer s3cret-token-0123456789"}) as resp:
            assert resp.status == 200
            assert (await resp.json())["reloaded"] is True


async def test_admin_reload_refused_without_configured_token(fake_upstream: FakeUpstream, make_sidecar: SidecarFactory) -> None:
    """With no admin token configured, mutating calls are refused outright."""
    sidecar = await make_sidecar(fake_upstream.url)
    async with aiohttp.ClientSession() as s:
        async with s.post(admin_url(sidecar) + "/admin/policy/reload",
                          headers={"Authorization": "Bearer "}) as resp:
            assert resp.status == 401
            assert "none is configured" in (await resp.json())["error"]["message"]


async def test_admin_bad_reload_keeps_old_manifest(fake_upstream: FakeUpstream, make_sidecar: SidecarFactory, tmp_path: Path) -> None:
    """A reload with a broken manifest answers 422, is counted, and leaves the old one in force."""
    sidecar = await make_sidecar(fake_upstream.url, TOKEN_POLICY)
    digest = sidecar.manifest.digest
    (tmp_path / "policy-0.yaml").write_text(TOKEN_POLICY + "cache:\n  memroy: {}\n")
    async with aiohttp.ClientSession() as s:
        async with s.post(admin_url(sidecar) + "/admin/policy/reload",
                          headers={"Authorization": "Bearer s3cret-token-0123456789"}) as resp:
            assert resp.status == 422
        async with s.get(admin_url(sidecar) + "/metrics") as resp:
            text = await resp.text()
    assert sidecar.manifest.digest == digest
    assert 'sidecar_policy_reloads_total{result="error"} 1' in text
