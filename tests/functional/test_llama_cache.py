"""The action cache against a real llama-server: a greedy completion is paid for once."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from tests.conftest import SidecarFactory, data_url
from tests.helpers.llama import LlamaServer, llama_timeout

pytestmark = [pytest.mark.llama, llama_timeout()]

# The tiny model stops on its token budget, so "length" must count as a
# complete answer here.
POLICY = """
routes:
  - name: completion
    methods: [POST]
    paths: [/completion, /v1/completions]
    kind: completion
    cache: {when: deterministic, ttl: 1h, finish_reasons: [stop, length]}
  - name: chat
    methods: [POST]
    paths: [/v1/chat/completions]
    kind: chat
    cache: {when: deterministic, ttl: 1h, finish_reasons: [stop, length]}
"""


async def test_llama_greedy_completion_cached(llama_server: LlamaServer, make_sidecar: SidecarFactory) -> None:
    """A temperature-0 completion repeated through the sidecar is a byte-identical hit."""
    sidecar = await make_sidecar(llama_server.url, POLICY)
    async with asyncio.timeout(20):
        while sidecar.environment.signature is None:
            await asyncio.sleep(0.02)
    request = {"prompt": "The cache test prompt", "n_predict": 4, "temperature": 0}
    async with aiohttp.ClientSession() as s:
        answers = []
        for _ in range(2):
            async with s.post(data_url(sidecar) + "/completion", json=request) as resp:
                assert resp.status == 200
                answers.append((resp.headers["X-Sidecar-Cache"], await resp.read()))
            await sidecar.cache_stage.drain_writes()
        stream_answers = []
        for _ in range(2):
            chat = {"model": llama_server.model, "messages": [{"role": "user", "content": "hi"}],
                    "temperature": 0, "max_tokens": 3, "stream": True}
            async with s.post(data_url(sidecar) + "/v1/chat/completions", json=chat) as resp:
                stream_answers.append((resp.headers["X-Sidecar-Cache"], await resp.read()))
            await sidecar.cache_stage.drain_writes()
    assert [a[0] for a in answers] == ["miss", "hit"]
    assert answers[0][1] == answers[1][1]
    assert json.loads(answers[0][1])["timings"]["prompt_n"] > 0
    assert [a[0] for a in stream_answers] == ["miss", "hit"]
    assert stream_answers[0][1] == stream_answers[1][1]
    assert stream_answers[0][1].rstrip().endswith(b"data: [DONE]")
