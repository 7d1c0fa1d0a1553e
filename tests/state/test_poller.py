"""The upstream poller against a scripted fake upstream on 127.0.0.1."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from sidecar.state import UpstreamModel, UpstreamPoller
from sidecar.state.poller import METRICS_REPROBE_POLLS, public_url, without_text
from sidecar.state.promjson import json_number, metrics_to_json

METRICS_TEXT = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 42
# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 1
# HELP odd A gauge with odd values.
# TYPE odd gauge
odd{kind="nan"} NaN
odd{kind="inf"} +Inf
odd{kind="half"} 0.5
"""

SLOT = {
    "id": 0,
    "n_ctx": 512,
    "is_processing": True,
    "id_task": 7,
    "params": {
        "n_predict": 16,
        "temperature": 0.8,
        "stop": ["secret stop"],
        "grammar": "root ::= x",
        "chat_format": "Content-only",
    },
    "next_token": [{"has_next_token": True, "n_remain": 9, "n_decoded": 7}],
    "prompt": "a user's private question",
    "generated": "the model's private answer",
}


class FakeUpstream:
    """A llama.cpp-shaped upstream whose answers the test sets."""

    def __init__(self) -> None:
        self.hits: collections.Counter[str] = collections.Counter()
        self.health_status = 200
        self.metrics_status = 200
        self.slots: list[dict[str, Any]] = [
            SLOT,
            {"id": 1, "n_ctx": 512, "is_processing": False},
        ]
        self.slots_seen = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/slots", self._slots)
        app.router.add_get("/props", self._props)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/models", self._models)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        self.hits["/health"] += 1
        if self.health_status == 503:
            body = {"error": {"code": 503, "message": "Loading model"}}
            return web.json_response(body, status=503)
        if self.health_status == 200:
            return web.json_response({"status": "ok"})
        return web.Response(status=self.health_status)

    async def _slots(self, request: web.Request) -> web.Response:
        self.hits["/slots"] += 1
        self.slots_seen.set()
        return web.json_response(self.slots)

    async def _props(self, request: web.Request) -> web.Response:
        self.hits["/props"] += 1
        return web.json_response(
            {
                "total_slots": 2,
                "chat_template": "{{ x }}" * 100,
                "model_path": "/m.gguf",
            }
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        self.hits["/metrics"] += 1
        if self.metrics_status != 200:
            return web.json_response(
                {"error": {"code": 501}}, status=self.metrics_status
            )
        return web.Response(text=METRICS_TEXT, content_type="text/plain")

    async def _models(self, request: web.Request) -> web.Response:
        self.hits["/v1/models"] += 1
        return web.json_response(
            {"object": "list", "data": [{"id": "tiny"}, {"id": "big"}]}
        )


@contextlib.asynccontextmanager
async def poller_for(
    fake: FakeUpstream, kind: str = "llama.cpp", **options: Any
) -> AsyncIterator[UpstreamPoller]:
    async with TestServer(fake.app(), host="127.0.0.1") as server:
        url = str(server.make_url(""))
        poller = UpstreamPoller(UpstreamModel(kind, url), url, kind, **options)
        try:
            yield poller
        finally:
            await poller.close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_poller_llama_up_republishes_slots_props_metrics() -> None:
    """A healthy llama.cpp upstream has its slots, props and metrics published."""
    fake = FakeUpstream()
    async with poller_for(fake) as poller:
        assert await poller.poll_once()
        doc = poller.model.snapshot()
    assert (doc["status"], doc["health"]) == ("up", {"status": "ok"})
    assert doc["slots_summary"] == {"total": 2, "processing": 1}
    assert doc["slots"][0]["next_token"][0]["n_decoded"] == 7
    assert doc["props"] == {"total_slots": 2, "model_path": "/m.gguf"}
    families = doc["metrics"]["families"]
    assert families["llamacpp:prompt_tokens"]["samples"][0]["value"] == 42
    assert doc["metrics"]["enabled"] is True


async def test_poller_slots_lose_all_free_text() -> None:
    """Prompts, generated text, stop words and grammars never reach the model."""
    fake = FakeUpstream()
    async with poller_for(fake) as poller:
        await poller.poll_once()
        text = json.dumps(poller.model.snapshot())
    for secret in ("private question", "private answer", "secret stop", "root ::="):
        assert secret not in text
    assert "Content-only" in text


async def test_poller_metrics_disabled_is_recorded_and_not_polled_each_time() -> None:
    """A 501 /metrics is published as disabled and probed again only rarely."""
    fake = FakeUpstream()
    fake.metrics_status = 501
    async with poller_for(fake) as poller:
        for _ in range(METRICS_REPROBE_POLLS + 1):
            await poller.poll_once()
        metrics = poller.model.snapshot()["metrics"]
    assert metrics == {"enabled": False, "status": 501, "families": None}
    assert fake.hits["/metrics"] == 2
    assert fake.hits["/health"] == METRICS_REPROBE_POLLS + 1


async def test_poller_loading_upstream_reads_as_loading() -> None:
    """llama.cpp's 503 while loading is 'loading', and slots are not asked."""
    fake = FakeUpstream()
    fake.health_status = 503
    async with poller_for(fake) as poller:
        assert await poller.poll_once()
        assert poller.model.status == "loading"
    assert fake.hits["/slots"] == 0


async def test_poller_unhealthy_status_reads_as_error() -> None:
    """A health answer other than 200 or 503 is an error with its status."""
    fake = FakeUpstream()
    fake.health_status = 500
    async with poller_for(fake) as poller:
        await poller.poll_once()
        doc = poller.model.snapshot()
    assert (doc["status"], doc["error"]) == ("error", "http_500")


async def test_poller_unreachable_is_down_and_backs_off() -> None:
    """Each failed poll doubles the delay, up to the cap."""
    url = f"http://127.0.0.1:{closed_port()}"
    poller = UpstreamPoller(
        UpstreamModel("llama.cpp", url),
        url,
        "llama.cpp",
        interval_s=1.0,
        max_backoff_s=5.0,
    )
    delays = []
    try:
        for _ in range(4):
            assert not await poller.poll_once()
            delays.append(poller.next_delay())
    finally:
        await poller.close()
    assert poller.model.status == "down"
    assert poller.model.snapshot()["failures"] == 4
    assert delays == [2.0, 4.0, 5.0, 5.0]


async def test_poller_recovery_resets_backoff() -> None:
    """The first answer after failures goes back to the plain interval."""
    fake = FakeUpstream()
    async with poller_for(fake, interval_s=1.0) as poller:
        poller.failures = 3
        await poller.poll_once()
        assert poller.next_delay() == 1.0
        assert poller.model.snapshot()["failures"] == 0


async def test_poller_unchanged_upstream_does_not_bump_version() -> None:
    """A poll that finds the same state is not a change to publish."""
    fake = FakeUpstream()
    async with poller_for(fake) as poller:
        await poller.poll_once()
        version = poller.model.version
        await poller.poll_once()
        assert poller.model.version == version


async def test_poller_slot_change_bumps_version() -> None:
    """A slot that starts processing is a change."""
    fake = FakeUpstream()
    fake.slots = [{"id": 0, "is_processing": False}]
    async with poller_for(fake) as poller:
        await poller.poll_once()
        version = poller.model.version
        fake.slots = [{"id": 0, "is_processing": True}]
        await poller.poll_once()
        assert poller.model.version > version
        assert poller.model.snapshot()["slots_summary"]["processing"] == 1


async def test_poller_vllm_polls_health_and_metrics_only() -> None:
    """vLLM has no /slots or /props; its /metrics is republished."""
    fake = FakeUpstream()
    async with poller_for(fake, kind="vllm") as poller:
        await poller.poll_once()
        doc = poller.model.snapshot()
    assert set(fake.hits) == {"/health", "/metrics"}
    assert doc["metrics"]["families"]["llamacpp:requests_processing"]["type"] == "gauge"


async def test_poller_openai_lists_models() -> None:
    """Another OpenAI-compatible server is probed with /v1/models."""
    fake = FakeUpstream()
    async with poller_for(fake, kind="openai") as poller:
        await poller.poll_once()
        doc = poller.model.snapshot()
    assert (doc["status"], doc["models"]) == ("up", ["tiny", "big"])
    assert set(fake.hits) == {"/v1/models"}


async def test_poller_started_polls_in_background() -> None:
    """start() polls on its own until close()."""
    fake = FakeUpstream()
    async with poller_for(fake, interval_s=0.01) as poller:
        await poller.start()
        async with asyncio.timeout(5):
            await fake.slots_seen.wait()
    assert fake.hits["/health"] >= 1


async def test_poller_down_upstream_clears_slots() -> None:
    """Slots last seen before the upstream went away are not shown as current."""
    fake = FakeUpstream()
    async with TestServer(fake.app(), host="127.0.0.1") as server:
        url = str(server.make_url(""))
        poller = UpstreamPoller(UpstreamModel("llama.cpp", url), url, "llama.cpp")
        try:
            await poller.poll_once()
            assert poller.model.snapshot()["slots_summary"] is not None
            await server.close()
            await poller.poll_once()
        finally:
            await poller.close()
    doc = poller.model.snapshot()
    assert (doc["status"], doc["slots"], doc["slots_summary"]) == ("down", None, None)


def test_poller_unknown_kind_raises() -> None:
    """upstream.kind is one of llama.cpp, vllm, openai."""
    with pytest.raises(ValueError):
        UpstreamPoller(UpstreamModel("tgi", "http://x"), "http://x", "tgi")


def test_public_url_drops_credentials_and_query() -> None:
    """The published URL has no user, password or query string."""
    assert (
        public_url("http://u:p@127.0.0.1:8080/v1?key=k") == "http://127.0.0.1:8080/v1"
    )


def test_without_text_keeps_numbers_and_format_names() -> None:
    """Strings go, except format names; string-only lists go entirely."""
    value = {
        "a": 1,
        "b": "x",
        "c": ["s"],
        "d": [],
        "chat_format": "f",
        "e": [{"n": 2, "t": "x"}],
    }
    assert without_text(value) == {"a": 1, "d": [], "chat_format": "f", "e": [{"n": 2}]}


def test_promjson_non_finite_values_become_strings() -> None:
    """NaN and infinities are spelled as Prometheus does, never bare."""
    samples = metrics_to_json(METRICS_TEXT)["odd"]["samples"]
    assert [s["value"] for s in samples] == ["NaN", "+Inf", 0.5]
    assert samples[0]["labels"] == {"kind": "nan"}
    json.dumps(samples, allow_nan=False)


def test_promjson_integral_values_become_ints() -> None:
    """Whole numbers are published as integers; large ones stay floats."""
    assert (json_number(3.0), json_number(2.0**60), json_number(-0.25)) == (
        3,
        2.0**60,
        -0.25,
    )


def test_promjson_malformed_text_raises() -> None:
    """An exposition that does not parse raises ValueError for the caller."""
    with pytest.raises(ValueError):
        metrics_to_json("metric{unclosed 1\n")
