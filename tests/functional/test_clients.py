"""Real clients through the sidecar: the openai SDK (plain and streaming) and curl,
plus what the access log may and may not say about a request."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess

import openai
import pytest
from aiohttp import web

from tests.conftest import SidecarFactory, data_url
from tests.helpers.fake_upstream import (
    FakeUpstream,
    chat_chunk,
    chat_completion,
    sse_event,
    sse_handler,
)


async def test_openai_sdk_chat_through_proxy(fake_upstream: FakeUpstream, make_sidecar: SidecarFactory) -> None:
    """The openai SDK gets the upstream's completion through the sidecar."""

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response(chat_completion("hi there"))

    fake_upstream.handler = handler
    sidecar = await make_sidecar(fake_upstream.url)
    client = openai.AsyncOpenAI(base_url=data_url(sidecar) + "/v1", api_key="sk-test", max_retries=0)
    reply = await client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], temperature=0
    )
    await client.close()
    assert reply.choices[0].message.content == "hi there"
    sent = json.loads(fake_upstream.received[-1].body)
    assert sent["messages"] == [{"role": "user", "content": "hello"}]
    assert fake_upstream.received[-1].header("authorization") == "Bearer sk-test"


async def test_openai_sdk_stream_through_proxy(fake_upstream: FakeUpstream, make_sidecar: SidecarFactory) -> None:
    """A streamed completion arrives chunk by chunk through the sidecar, ending with its finish reason."""
    words = ["one ", "two ", "three"]
    events = [sse_event(chat_chunk(i, w)) for i, w in enumerate(words)]
    events.append(sse_event(chat_chunk(3, "", "stop")))
    events.append(sse_event("[DONE]"))
    fake_upstream.handler = sse_handler(events)
    sidecar = await make_sidecar(fake_upstream.url)
    client = openai.AsyncOpenAI(base_url=data_url(sidecar) + "/v1", api_key="sk-test", max_retries=0)
    stream = await client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "count"}], stream=True
    )
    text = ""
    finish = None
    async for chunk in stream:
        text += chunk.choices[0].delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    await client.close()
    assert text == "one two three"
    assert finish == "stop"


async def test_curl_through_proxy(fake_upstream: FakeUpstream, make_sidecar: SidecarFactory) -> None:
    """curl, a real independent client, gets the upstream's answer through the sidecar."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.fail("curl is not installed (make debs installs it)")

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response(chat_completion("via curl"))

    fake_upstream.handler = handler
    sidecar = await make_sidecar(fake_upstream.url)
    result = await asyncio.to_thread(
        subprocess.run,
        [curl, "-sS", "-i", "-X", "POST", "-H", "Content-Type: application/json",
         "--data", '{"model":"tiny","messages":[]}', data_url(sidecar) + "/v1/chat/completions"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("HTTP/1.1 200")
    assert "via curl" in result.stdout


async def test_access_log_line_without_secrets(fake_upstream: FakeUpstream, make_sidecar: SidecarFactory, caplog: pytest.LogCaptureFixture) -> None:
    """One access line per request, with route and status, and never a credential, cookie or prompt."""
    sidecar = await make_sidecar(fake_upstream.url)
    caplog.set_level(logging.INFO, logger="sidecar")
    logging.getLogger("sidecar").propagate = True
    client = openai.AsyncOpenAI(base_url=data_url(sidecar) + "/v1", api_key="sk-very-secret",
                                default_headers={"Cookie": "session=cookie-secret"}, max_retries=0)
    await client.with_raw_response.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "my secret prompt text"}]
    )
    await client.close()
    access = [r for r in caplog.records if r.name == "sidecar.access"]
    assert len(access) == 1
    record = access[0]
    assert record.getMessage() == "http.request"
    assert record.route == "chat"  # type: ignore[attr-defined]
    assert record.status == 200  # type: ignore[attr-defined]
    from sidecar.log import JsonFormatter, TextFormatter

    for fmt in (TextFormatter(), JsonFormatter()):
        text = "\n".join(fmt.format(r) for r in caplog.records)
        for secret in ("sk-very-secret", "cookie-secret", "my secret prompt text"):
            assert secret not in text
