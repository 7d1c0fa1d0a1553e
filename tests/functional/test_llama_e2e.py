"""End to end against a real llama-server: first directly, then through the sidecar.

The direct tests pin down what the rest of the suite assumes of the upstream
(prompt timings, prefix reuse inside one slot); the sidecar tests check that a
client (the ``openai`` SDK, a raw ``/completion`` caller, a scraper of the
upstream's own paths) sees through the data port what it sees directly.

The sidecar runs as a child process (``tests/helpers/process.py``) with its
command line from DESIGN.md, in front of the session's llama-server.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import aiohttp
import openai
import pytest

from tests.helpers.llama import LlamaServer, llama_timeout
from tests.helpers.process import SidecarProcess
from tests.helpers.tinymodel import write_tiny_llama

pytestmark = [pytest.mark.llama, llama_timeout()]

N_PREDICT: Final = 4
STREAM_SEED: Final = 7
REQUEST_TIMEOUT: Final = aiohttp.ClientTimeout(total=30)


@pytest.fixture(scope="module")
def sidecar(
    llama_server: LlamaServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarProcess]:
    """``sidecar serve`` in front of the session's llama-server."""
    data_dir = tmp_path_factory.mktemp("sidecar-llama") / "data"
    with SidecarProcess(llama_server.url, data_dir) as process:
        yield process


async def test_llama_completion_cache_prompt_reports_timings(
    llama_server: LlamaServer,
) -> None:
    """/completion with cache_prompt reports cached and evaluated prompt tokens."""
    prompt = "timings probe: the quick brown fox"
    body = await _completion(llama_server.url, prompt, id_slot=1)

    timings = body["timings"]
    assert isinstance(timings["cache_n"], int)
    assert timings["prompt_n"] > 0
    # One token per ASCII character plus BOS, each either reused or evaluated.
    assert timings["cache_n"] + timings["prompt_n"] == len(prompt) + 1


async def test_llama_completion_shared_prefix_reuses_prefix(
    llama_server: LlamaServer,
) -> None:
    """A second prompt sharing a prefix in the same slot reuses the prefix's KV."""
    prefix = "shared prefix probe. " + "0123456789abcdef" * 16
    await _completion(llama_server.url, prefix + " first ending", id_slot=0)
    second = await _completion(llama_server.url, prefix + " other ending", id_slot=0)

    prefix_tokens = len(prefix) + 2  # BOS, the prefix bytes and the shared space
    cache_n = second["timings"]["cache_n"]
    assert prefix_tokens - 2 <= cache_n <= prefix_tokens
    prompt_tokens = len(prefix) + len(" other ending") + 1
    assert second["timings"]["prompt_n"] == prompt_tokens - cache_n


def test_tinymodel_same_seed_writes_identical_bytes(tmp_path: Path) -> None:
    """The model file is a pure function of its arguments and seed."""
    first = write_tiny_llama(tmp_path / "a.gguf", seed=7).read_bytes()
    second = write_tiny_llama(tmp_path / "b.gguf", seed=7).read_bytes()
    other = write_tiny_llama(tmp_path / "c.gguf", seed=8).read_bytes()

    assert first == second
    assert first != other


async def test_sidecar_chat_completion_openai_sdk_returns_message(
    sidecar: SidecarProcess, llama_server: LlamaServer
) -> None:
    """The openai SDK pointed at the data port gets a complete chat answer."""
    async with _openai_client(sidecar) as client:
        answer = await client.chat.completions.create(
            model=llama_server.model,
            messages=[{"role": "user", "content": "Say something."}],
            max_tokens=N_PREDICT,
        )

    choice = answer.choices[0]
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in {"length", "stop"}
    assert answer.usage is not None and answer.usage.prompt_tokens > 0


async def test_sidecar_chat_completion_stream_ends_with_finish_reason(
    sidecar: SidecarProcess, llama_server: LlamaServer
) -> None:
    """A streamed chat through the data port yields chunks, the last with a reason."""
    finish_reasons: list[str | None] = []
    async with _openai_client(sidecar) as client:
        stream = await client.chat.completions.create(
            model=llama_server.model,
            messages=[{"role": "user", "content": "Stream something."}],
            max_tokens=N_PREDICT,
            stream=True,
            # The model's weights are seeded; so is its sampling here. Left to
            # chance, a few random tokens were sometimes pieces of one UTF-8
            # character, held back by the server and sent with the final
            # chunk only. Sampling stays random (no temperature 0), so the
            # request is forwarded, never answered from the cache.
            seed=STREAM_SEED,
        )
        async for chunk in stream:
            finish_reasons.extend(choice.finish_reason for choice in chunk.choices)

    assert len(finish_reasons) >= 2
    assert finish_reasons[-1] in {"length", "stop"}
    assert all(reason is None for reason in finish_reasons[:-1])


async def test_sidecar_completion_same_shape_as_upstream(
    sidecar: SidecarProcess, llama_server: LlamaServer
) -> None:
    """/completion through the data port has the fields and timings of a direct one."""
    prompt = "shape probe: same fields either way"
    direct = await _completion(llama_server.url, prompt)
    proxied = await _completion(sidecar.url, prompt)

    assert proxied.keys() == direct.keys()
    assert proxied["timings"].keys() == direct["timings"].keys()
    assert proxied["tokens_evaluated"] == direct["tokens_evaluated"]


def _slots_listed(body: bytes) -> bool:
    return len(json.loads(body)) == 2


def _props_total_slots(body: bytes) -> bool:
    return bool(json.loads(body)["total_slots"] == 2)


def _health_ok(body: bytes) -> bool:
    return bool(json.loads(body)["status"] == "ok")


def _metrics_exposed(body: bytes) -> bool:
    return b"llamacpp:prompt_tokens_total" in body


@pytest.mark.parametrize(
    ("path", "check"),
    [
        ("/health", _health_ok),
        ("/slots", _slots_listed),
        ("/props", _props_total_slots),
        ("/metrics", _metrics_exposed),
    ],
)
async def test_sidecar_upstream_path_reachable_through_data_port(
    sidecar: SidecarProcess, path: str, check: Callable[[bytes], bool]
) -> None:
    """The upstream's own paths answer through the data port, unchanged."""
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
        async with session.get(sidecar.url + path) as response:
            status, body = response.status, await response.read()

    assert status == 200
    assert check(body)


async def _completion(
    base_url: str, prompt: str, *, id_slot: int = -1
) -> dict[str, Any]:
    # Greedy and short: the text is noise, only the counts and shape matter.
    payload = {
        "prompt": prompt,
        "n_predict": N_PREDICT,
        "cache_prompt": True,
        "temperature": 0,
        "id_slot": id_slot,
    }
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
        async with session.post(base_url + "/completion", json=payload) as response:
            assert response.status == 200, await response.text()
            body: dict[str, Any] = await response.json()
    return body


def _openai_client(sidecar: SidecarProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=sidecar.url + "/v1", api_key="unused", max_retries=0, timeout=30.0
    )
