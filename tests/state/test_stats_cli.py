"""``sidecar stats`` against a served hub, and when the admin port is absent."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from sidecar import stats_cli
from tests.state.conftest import Producers, make_hub, serve


def fill(producers: Producers) -> None:
    producers.cache.record(
        "memory", "chat", "hit", latency_saved_s=1.5, bytes_saved=2048
    )
    producers.cache.record(None, "chat", "miss")
    producers.cache.set_tier("memory", entries=7, bytes=4096, evictions=1)
    producers.routes.observe("chat", 200, 0.012)
    producers.coalescing.record("chat", "leader")
    producers.coalescing.record("chat", "follower")
    producers.upstream.update(slots_summary={"total": 4, "processing": 1})


async def test_stats_summary_shows_the_numbers(
    producers: Producers, capsys: pytest.CaptureFixture[str]
) -> None:
    """The summary has hit ratio, savings, coalesced, route latency and slots."""
    fill(producers)
    async with serve(make_hub(producers)) as client:
        base = str(client.make_url("")).rstrip("/")
        code = await asyncio.to_thread(stats_cli.main, ["--admin", base])
    out = capsys.readouterr().out
    assert code == 0
    assert "hit ratio 50.0%" in out
    assert "latency saved 1.50 s" in out and "bytes saved 2.0 KiB" in out
    assert "1 followers behind 1 leaders" in out
    assert "chat" in out and "12.0" in out
    assert "slots 1/4 processing" in out


async def test_stats_json_prints_raw_models(
    producers: Producers, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json prints every model, as served, keyed by name."""
    fill(producers)
    hub = make_hub(producers)
    async with serve(hub) as client:
        base = str(client.make_url("")).rstrip("/")
        code = await asyncio.to_thread(stats_cli.main, ["--admin", base, "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0
    assert set(doc) == set(hub.names())
    assert doc["cache"] == json.loads(json.dumps(producers.cache.snapshot()))


def test_stats_unreachable_admin_exits_1_with_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """No admin port: exit 1 and exactly one line saying what failed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = stats_cli.main(["--admin", f"http://127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1
    assert err.startswith("sidecar stats: cannot reach the admin port at")


async def test_stats_http_error_exits_1(
    producers: Producers, capsys: pytest.CaptureFixture[str]
) -> None:
    """An admin port that answers an error status is a failure, not a crash."""
    async with serve(make_hub(producers)) as client:
        base = str(client.make_url("")).rstrip("/") + "/nothing-here"
        code = await asyncio.to_thread(stats_cli.main, ["--admin", base])
    assert code == 1
    assert "answered 404" in capsys.readouterr().err


def test_stats_admin_url_from_wildcard_listen(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wildcard SIDECAR_ADMIN_LISTEN is reached on loopback."""
    monkeypatch.setenv("SIDECAR_ADMIN_LISTEN", "0.0.0.0:9191")
    assert stats_cli.admin_url(None) == "http://127.0.0.1:9191"


def test_stats_admin_flag_wins_over_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--admin overrides the environment."""
    monkeypatch.setenv("SIDECAR_ADMIN_LISTEN", "0.0.0.0:9191")
    assert stats_cli.admin_url("http://10.0.0.1:1/") == "http://10.0.0.1:1"
