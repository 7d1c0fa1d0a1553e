"""The cache_prompt/cache_salt rewrite and prompt-token accounting (sidecar/prompt.py).

Pure functions first (parsing, splicing, reading token counts), then the
two stages in the real sidecar in front of the fake upstream, asserting on
what the upstream received and what the client and the metrics saw.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecar.app import Sidecar
from sidecar.manifest import PromptCacheMode, UpstreamKind
from sidecar.prompt import (
    PromptRewriter,
    TokenMeter,
    header_salt,
    parse_object,
    set_field,
    tokens_from_doc,
    tokens_from_tail,
    wanted_field,
)
from tests.conftest import SidecarFactory, data_url
from tests.helpers.fake_upstream import FakeUpstream, sse_event, sse_handler

TEST_KEY = b"test-salt-key-0123456789abcdef"
JSON = {"Content-Type": "application/json"}


def _salt(credential: str) -> str:
    msg = b"cache_salt\0" + credential.encode()
    return hmac.new(TEST_KEY, msg, hashlib.sha256).hexdigest()


# --- parse_object ------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b'[{"prompt": "x"}]',
        b'"a string"',
        b'{"prompt": "x", "prompt": "y"}',
        b'{"temperature": NaN}',
        b'{"temperature": 1e999}',
        b'{"prompt": "\xff\xfe"}',
        b'\xef\xbb\xbf{"prompt": "bom"}',
        b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"prompt": "x"',
    ],
    ids=[
        "empty",
        "text",
        "array",
        "string",
        "repeated",
        "nan",
        "inf",
        "latin1",
        "bom",
        "deep",
        "truncated",
    ],
)
def test_parse_object_not_a_faithful_object_none(body: bytes) -> None:
    """Anything but one UTF-8 JSON object that can be written back as is: None."""
    assert parse_object(body) is None


def test_parse_object_plain_object_parsed() -> None:
    """A plain JSON object parses to a dict."""
    assert parse_object(b' {"prompt": [1, 2, 3], "n": 1.5} ') == {
        "prompt": [1, 2, 3],
        "n": 1.5,
    }


# --- set_field ---------------------------------------------------------------------


def test_set_field_absent_spliced_other_bytes_untouched() -> None:
    """An absent field goes right after the brace; every client byte follows as sent."""
    body = b'  {"prompt" :  "hi",\n "n_predict": 4}\n'
    obj = parse_object(body)
    assert obj is not None

    new = set_field(body, obj, "cache_prompt", True)

    assert new == b'  {"cache_prompt":true,"prompt" :  "hi",\n "n_predict": 4}\n'
    assert json.loads(new) == {"cache_prompt": True, "prompt": "hi", "n_predict": 4}


def test_set_field_empty_object_no_comma() -> None:
    """Splicing into ``{}`` adds no trailing comma."""
    new = set_field(b"{ }", {}, "cache_prompt", True)

    assert new is not None and json.loads(new) == {"cache_prompt": True}


def test_set_field_other_value_replaced_compactly() -> None:
    """Another value is replaced and the body re-serialised compactly."""
    body = b'{"prompt": "h\xc3\xa9", "cache_prompt": false}'
    obj = parse_object(body)
    assert obj is not None

    new = set_field(body, obj, "cache_prompt", True)

    assert new == '{"prompt":"hé","cache_prompt":true}'.encode()


def test_set_field_same_value_unchanged() -> None:
    """A field already holding the value leaves the body as it is (None)."""
    body = b'{"cache_prompt": true}'
    obj = parse_object(body)
    assert obj is not None

    assert set_field(body, obj, "cache_prompt", True) is None


def test_set_field_integer_one_is_not_true() -> None:
    """``1`` is not ``true``: the field is replaced with a real boolean."""
    body = b'{"cache_prompt": 1}'
    obj = parse_object(body)
    assert obj is not None

    assert set_field(body, obj, "cache_prompt", True) == b'{"cache_prompt":true}'


def test_set_field_lone_surrogate_kept_escaped() -> None:
    """A lone surrogate the client escaped stays escaped: the output is valid UTF-8."""
    body = b'{"prompt": "\\ud800", "cache_prompt": false}'
    obj = parse_object(body)
    assert obj is not None

    new = set_field(body, obj, "cache_prompt", True)

    assert new == b'{"prompt":"\\ud800","cache_prompt":true}'
    new.decode("utf-8")


# --- wanted_field ------------------------------------------------------------------


def _never() -> str:
    raise AssertionError("salt computed for a non-vLLM upstream")


@pytest.mark.parametrize(
    ("mode", "obj", "expected"),
    [
        (PromptCacheMode.FORCE, {"cache_prompt": False}, ("cache_prompt", True)),
        (PromptCacheMode.FORCE, {}, ("cache_prompt", True)),
        (PromptCacheMode.DEFAULT, {}, ("cache_prompt", True)),
        (PromptCacheMode.DEFAULT, {"cache_prompt": False}, None),
        (PromptCacheMode.OFF, {}, None),
    ],
)
def test_wanted_field_llama_modes_as_documented(
    mode: PromptCacheMode, obj: dict[str, Any], expected: tuple[str, Any] | None
) -> None:
    """force always sets true, default only where absent, off never."""
    assert wanted_field(mode, UpstreamKind.LLAMA_CPP, obj, _never) == expected


@pytest.mark.parametrize("mode", list(PromptCacheMode))
def test_wanted_field_vllm_salt_in_every_mode(mode: PromptCacheMode) -> None:
    """On vLLM the salt is set whatever the mode: it is isolation, not reuse."""
    assert wanted_field(mode, UpstreamKind.VLLM, {}, lambda: "s") == ("cache_salt", "s")


# --- reading token counts ----------------------------------------------------------


def test_tokens_from_doc_llama_timings_read() -> None:
    """llama.cpp's timings give reused (cache_n) and evaluated (prompt_n)."""
    doc = {
        "timings": {"cache_n": 90, "prompt_n": 10},
        "tokens_cached": 104,
        "usage": {"prompt_tokens": 100},
    }

    assert tokens_from_doc(doc) == (90, 10)


def test_tokens_from_doc_openai_usage_cached_subtracted() -> None:
    """OpenAI usage: cached_tokens reused, the rest of prompt_tokens evaluated."""
    doc = {
        "usage": {"prompt_tokens": 100, "prompt_tokens_details": {"cached_tokens": 64}}
    }

    assert tokens_from_doc(doc) == (64, 36)


def test_tokens_from_doc_usage_without_details_all_evaluated() -> None:
    """Without prompt_tokens_details every prompt token counts as evaluated."""
    assert tokens_from_doc({"usage": {"prompt_tokens": 7}}) == (0, 7)


@pytest.mark.parametrize(
    "doc",
    [
        None,
        [],
        {},
        {"timings": {"cache_n": "5", "prompt_n": 1}},
        {"usage": {"prompt_tokens": -1}},
        {"timings": {"cache_n": True, "prompt_n": 1}},
    ],
)
def test_tokens_from_doc_malformed_none(doc: Any) -> None:
    """Missing or mistyped counts report nothing rather than a wrong number."""
    assert tokens_from_doc(doc) is None


def test_tokens_from_tail_llama_chat_stream_final_chunk() -> None:
    """A streamed chat's last chunk before [DONE] carries llama.cpp's timings."""
    tail = (
        sse_event({"choices": [{"delta": {"content": "a"}}]})
        + sse_event(
            {
                "choices": [{"delta": {}, "finish_reason": "length"}],
                "timings": {"cache_n": 21, "prompt_n": 1, "prompt_ms": 0.2},
            }
        )
        + b"data: [DONE]\n\n"
    )

    assert tokens_from_tail(tail) == (21, 1)


def test_tokens_from_tail_event_larger_than_tail_still_read() -> None:
    """A final event longer than the kept tail (an echoed prompt) still counts."""
    event = sse_event(
        {
            "content": "",
            "stop": True,
            "prompt": "x" * 200_000,
            "timings": {"cache_n": 5, "prompt_n": 200_001},
        }
    )

    assert tokens_from_tail(event[-64 * 1024 :]) == (5, 200_001)


def test_tokens_from_tail_usage_after_null_usages() -> None:
    """include_usage streams: the last non-null usage is the one counted."""
    tail = (
        sse_event({"choices": [{"delta": {"content": "a"}}], "usage": None})
        + sse_event(
            {
                "choices": [],
                "usage": {
                    "prompt_tokens": 50,
                    "prompt_tokens_details": {"cached_tokens": 48},
                },
            }
        )
        + sse_event({"choices": [{"delta": {}}], "usage": None})
        + b"data: [DONE]\n\n"
    )

    assert tokens_from_tail(tail) == (48, 2)


def test_tokens_from_tail_key_inside_text_ignored() -> None:
    """Generated text that spells a timings member cannot forge a count."""
    forged = ',"timings":{"cache_n":999,"prompt_n":999}'
    tail = (
        sse_event({"choices": [{"delta": {"content": forged}}]}) + b"data: [DONE]\n\n"
    )

    assert tokens_from_tail(tail) is None


# --- the rewrite stage in the sidecar ----------------------------------------------


async def _sidecar(
    make_sidecar: SidecarFactory,
    fake: FakeUpstream,
    mode: str = "force",
    kind: str = "llama.cpp",
    meter: TokenMeter | None = None,
) -> Sidecar:
    sidecar = await make_sidecar(fake.url, f"upstream:\n  kind: {kind}\n")
    rewriter = PromptRewriter(
        PromptCacheMode(mode),
        UpstreamKind(kind),
        header_salt(TEST_KEY),
        max_body_bytes=sidecar.manifest.limits.max_body_bytes,
    )
    sidecar.proxy.set_stages([rewriter] if meter is None else [rewriter, meter])
    return sidecar


async def _post(
    client: aiohttp.ClientSession,
    sidecar: Sidecar,
    path: str,
    body: Any,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    async with client.post(
        data_url(sidecar) + path, data=body, headers={**JSON, **(headers or {})}
    ) as resp:
        return resp.status, await resp.read()


@pytest.mark.parametrize(
    "path",
    [
        "/completion",
        "/completions",
        "/v1/completions",
        "/chat/completions",
        "/v1/chat/completions",
        "/infill",
    ],
)
async def test_rewriter_force_client_false_upstream_gets_true(
    make_sidecar: SidecarFactory,
    fake_upstream: FakeUpstream,
    client: aiohttp.ClientSession,
    path: str,
) -> None:
    """force sets cache_prompt true over a client's false, on every generation route."""
    sidecar = await _sidecar(make_sidecar, fake_upstream, "force")

    status, _ = await _post(
        client, sidecar, path, b'{"prompt": "p", "cache_prompt": false}'
    )

    assert status == 200
    got = fake_upstream.received[-1]
    assert json.loads(got.body) == {"prompt": "p", "cache_prompt": True}
    assert got.header("Content-Length") == str(len(got.body))


async def test_rewriter_default_client_false_kept(
    make_sidecar: SidecarFactory,
    fake_upstream: FakeUpstream,
    client: aiohttp.ClientSession,
) -> None:
    """default mode leaves a client's explicit false alone, byte for byte."""
    sidecar = await _sidecar(make_sidecar, fake_upstream, "default")
    body = b'{"prompt": "p",  "cache_prompt": false}'

    await _post(client, sidecar, "/completion", body)

    assert fake_upstream.received[-1].body == body


async def test_rewriter_default_absent_set_true(
    make_sidecar: SidecarFactory,
    fake_upstream: FakeUpstream,
    client: aiohttp.ClientSession,
) -> None:
    """default mode sets cache_prompt where the client did not say."""
    sidecar = await _sidecar(make_sidecar, fake_upstream, "default")

    await _post(client, sidecar, "/completion", b'{"prompt": "p"}')

    assert json.loads(fake_upstream.received[-1].body) == {
        "cache_prompt": True,
        "prompt": "p",
    }


async def test_rewriter_off_body_untouched(
    make_sidecar: SidecarFactory,
    fake_upstream: FakeUpstream,
    client: aiohttp.ClientSession,
) -> None:
    """off mode forwards the body exactly as the client sent it."""
    sidecar = await _sidecar(make_sidecar, fake_upstream, "off")
    body = b'{ "prompt" : "p" ,\n"cache_prompt": false }'

    await _post(client, sidecar, "/completion", body)

    assert fake_upstream.received[-1].body == body


@pytest.mark.parametrize(
    "body",
    [
        b"prompt=hello",
        b'[{"prompt": "a"}]',
        b'{"prompt": "a", "prompt": "b"}',
        b'{"prompt": ',
        b"\x1f\x8b\x08\x00gzip",
    ],
    ids=["form", "array", "repeated", "truncated", "gzip"],
)
async def test_rewriter_malformed_body_passes_through(
    make_sidecar: SidecarFactory,
    fake_upstream: FakeUpstream,
    client: aiohttp.ClientSession,
    body: bytes,
) -> None:
    """A body that is not one faithful JSON object reaches the upstream as sent."""
    sidecar = await _sidecar(make_sidecar, fake_upstream, "force")
    fake_upstream.handler = _answer(400, {"error": {"message": "bad"}})

    status, answer = await _post(client, sidecar, "/completion", body)

    assert fake_upstream.received[-1].body == body
    assert (status, json.loads(answer)) == (400, {"error": {"message": "bad"}})


async def test_rewriter_huge_prompt_rewritten(
    make_sidecar: SidecarFactory,
    fake_upstream: FakeUpstream,
    client: aiohttp.ClientSession,
) -> None:
    """A 2 MB prompt (read from a streamed body) is rewritten with a matching length."""
    sidecar = await _sidecar(make_sidecar, fake_upstream, "force")
    prompt = "long context " * 160_000

    async def chunked() -> AsyncIterator[bytes]:
        data = json.dumps({"prompt": prompt}).encode()
        for start in range(0, len(data), 256 * 1024):
            yield data[start : start + 256 * 1024]

    status, _ = await _post(client, sidecar, "/completion", chunked())

    got = fake_upstream.received[-1]
    assert status == 200
    assert json.loads(got.body) == {"cache_prompt": True, "prompt": prompt}
    assert got.header("Content-Length") == str(len(got.body))


async def test_rewriter_token_array_prompt_rewritten(
    make_sidecar: SidecarFactory,
    fake_upstream: FakeUpstream,
    client: aiohttp.ClientSession,
) -> None:
    """A prompt given as token ids is kept as is; only cache_prompt changes."""
    sidecar = await _sidecar(make_sidecar, fake_upstream, "force")

    await _post(
        client,
        sidecar,
        "/completion",
        b'{"prompt": [1, 15043, 3186], "cache_prompt": false}',
    )

    assert json.loads(fake_upstream.received[-1].body) == {
        "prompt": [1, 15043, 3186],
        "cache_prompt": True,
    }


async def test_rewriter_other_route_untouched(
    make_sidecar: SidecarFactory,
    fake_upstream: FakeUpstream,
    client: aiohttp.ClientSession,
) -> None:
    """Routes that are not generation routes (embeddings) are never rewritten."""
    sidecar = await _sidecar(make_sidecar, fake_upstream, "force")
    body = b'{"input": "x"}'

    await _post(client, sidecar, "/v1/embeddings", body)

    assert fake_upstream.received[-1].body == body


async def test_rewriter_vllm_client_salt_replaced(
    make_sidecar: SidecarFactory,
    fake_upstream: FakeUpstream,
    client: aiohttp.ClientSession,
) -> None:
    """On vLLM the client's cache_salt is replaced by its credential's HMAC."""
    sidecar = await _sidecar(make_sidecar, fake_upstream, "force", kind="vllm")

    await _post(
        client,
        sidecar,
        "/v1/chat/completions",
        b'{"messages": [], "cache_salt": "victim-salt"}',
        headers={"Authorization": "Bearer tenant-a"},
    )

    got = json.loads(fake_upstream.received[-1].body)
    assert got == {"messages": [], "cache_salt": _salt("Bearer tenant-a")}


async def test_rewriter_vllm_tenants_get_different_salts(
    make_sidecar: SidecarFactory,
    fake_upstream: FakeUpstream,
    client: aiohttp.ClientSession,
) -> None:
    """Two credentials never share a salt; one credential always gets the same one."""
    sidecar = await _sidecar(make_sidecar, fake_upstream, "force", kind="vllm")

    for tenant in ("Bearer a", "Bearer b", "Bearer a"):
        await _post(
            client,
            sidecar,
            "/v1/completions",
            b'{"prompt": "p"}',
            headers={"Authorization": tenant},
        )

    salts = [json.loads(r.body)["cache_salt"] for r in fake_upstream.received]
    assert salts[0] == salts[2] != salts[1]
    assert "cache_prompt" not in json.loads(fake_upstream.received[0].body)


# --- the token meter in the sidecar ------------------------------------------------


def _answer(status: int, doc: Any) -> Any:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response(doc, status=status)

    return handler


class _Calls:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int, int]] = []
        self.seen = asyncio.Event()

    def __call__(self, route: str, replica: str, reused: int, evaluated: int) -> None:
        self.calls.append((route, replica, reused, evaluated))
        self.seen.set()


async def test_meter_json_answer_counted_per_route_and_replica(
    make_sidecar: SidecarFactory,
    fake_upstream: FakeUpstream,
    client: aiohttp.ClientSession,
) -> None:
    """A plain answer's timings go to both counters, labelled by route and replica."""
    calls = _Calls()
    sidecar = await make_sidecar(fake_upstream.url)
    sidecar.proxy.set_stages([TokenMeter(sidecar.metrics, on_tokens=calls)])
    fake_upstream.handler = _answer(
        200, {"content": "x", "timings": {"cache_n": 30, "prompt_n": 4}}
    )

    await _post(client, sidecar, "/completion", b'{"prompt": "p"}')

    labels = {"route": "completion", "replica": sidecar.upstream.authority}
    assert sidecar.metrics.prompt_tokens_reused.get(labels) == 30
    assert sidecar.metrics.prompt_tokens_evaluated.get(labels) == 4
    assert calls.calls == [("completion", sidecar.upstream.authority, 30, 4)]


async def test_meter_stream_counted_from_final_chunk(
    make_sidecar: SidecarFactory,
    fake_upstream: FakeUpstream,
    client: aiohttp.ClientSession,
) -> None:
    """A streamed answer is counted once, from its final chunk, after it ends."""
    calls = _Calls()
    sidecar = await make_sidecar(fake_upstream.url)
    sidecar.proxy.set_stages([TokenMeter(sidecar.metrics, on_tokens=calls)])
    fake_upstream.handler = sse_handler(
        [
            sse_event({"choices": [{"delta": {"content": "a"}}]}),
            sse_event(
                {
                    "choices": [{"delta": {}, "finish_reason": "stop"}],
                    "usage": {
                        "prompt_tokens": 12,
                        "prompt_tokens_details": {"cached_tokens": 8},
                    },
                }
            ),
            b"data: [DONE]\n\n",
        ]
    )

    status, _ = await _post(
        client, sidecar, "/v1/chat/completions", b'{"messages": []}'
    )

    assert status == 200
    assert calls.calls == [("chat", sidecar.upstream.authority, 8, 4)]


async def test_meter_cut_stream_not_counted(
    make_sidecar: SidecarFactory,
    fake_upstream: FakeUpstream,
    client: aiohttp.ClientSession,
) -> None:
    """A stream the upstream cut reports no tokens."""
    calls = _Calls()
    sidecar = await make_sidecar(fake_upstream.url)
    sidecar.proxy.set_stages([TokenMeter(sidecar.metrics, on_tokens=calls)])
    fake_upstream.handler = sse_handler(
        [sse_event({"timings": {"cache_n": 1, "prompt_n": 1}}), b"data: [DONE]\n\n"],
        cut_after=1,
    )

    with pytest.raises(aiohttp.ClientPayloadError):
        await _post(client, sidecar, "/v1/chat/completions", b'{"messages": []}')

    assert calls.calls == []


async def test_meter_error_answer_not_counted(
    make_sidecar: SidecarFactory,
    fake_upstream: FakeUpstream,
    client: aiohttp.ClientSession,
) -> None:
    """A non-2xx answer is not counted even if it carries timings."""
    calls = _Calls()
    sidecar = await make_sidecar(fake_upstream.url)
    sidecar.proxy.set_stages([TokenMeter(sidecar.metrics, on_tokens=calls)])
    fake_upstream.handler = _answer(500, {"timings": {"cache_n": 1, "prompt_n": 1}})

    status, _ = await _post(client, sidecar, "/completion", b'{"prompt": "p"}')

    assert status == 500
    assert calls.calls == []
