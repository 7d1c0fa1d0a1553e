"""The upstream read model against a real llama-server on a tiny model.

Uses the session fixture ``llama_server`` (tests/helpers/llama.py, registered
as a plugin by the top conftest): two slots, ``--metrics`` and ``--slots`` on.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from sidecar.state import StateHub, UpstreamModel, UpstreamPoller
from tests.helpers.llama import llama_timeout
from tests.state.sse_client import Mirror, parse

pytestmark = [pytest.mark.llama, llama_timeout()]

N_PREDICT = 600
MAX_POLLS = 2000


def running_decoded(upstream: dict[str, Any]) -> list[int]:
    """n_decoded of every slot that is processing right now."""
    return [
        slot["next_token"][0]["n_decoded"]
        for slot in upstream["slots"] or []
        if slot.get("is_processing") and slot.get("next_token")
    ]


async def test_upstream_llama_slots_appear_and_change_while_request_runs(
    llama_server: Any,
) -> None:
    """Idle slots are published, a running request shows in them, then it ends."""
    model = UpstreamModel("llama.cpp", llama_server.url)
    poller = UpstreamPoller(model, llama_server.url, "llama.cpp", interval_s=0.05)
    hub = StateHub(first_event_id=1)
    hub.register("upstream", model)
    mirror = Mirror()
    start = hub.subscribe(["upstream"])
    mirror.apply_all(parse(start.frames))
    decoded_seen: set[int] = set()
    slot_paths: set[str] = set()

    async def poll_and_publish() -> None:
        await poller.poll_once()
        hub.tick()
        if start.subscriber.queued:
            events = parse((await start.subscriber.next_batch())[0])
            mirror.apply_all(events)
            slot_paths.update(
                op["path"]
                for e in events
                if e.event == "patch"
                for op in e.json()["patch"]
                if op["path"].startswith("/slots")
            )

    body = {"prompt": "hello", "n_predict": N_PREDICT, "ignore_eos": True}
    try:
        await poll_and_publish()
        idle = mirror.models["upstream"]
        assert idle["status"] == "up"
        assert idle["slots_summary"] == {"total": 2, "processing": 0}
        assert idle["metrics"]["enabled"] is True
        async with aiohttp.ClientSession() as session:
            request = asyncio.create_task(
                session.post(f"{llama_server.url}/completion", json=body)
            )
            for _ in range(MAX_POLLS):
                await poll_and_publish()
                decoded_seen.update(running_decoded(mirror.models["upstream"]))
                if request.done():
                    break
            response = await request
            result = await response.json()
        await poll_and_publish()
    finally:
        hub.unsubscribe(start.subscriber)
        await poller.close()
    assert result["timings"]["predicted_n"] == N_PREDICT
    assert len(decoded_seen) >= 2, f"running slot seen with n_decoded {decoded_seen}"
    done = mirror.models["upstream"]
    assert done["slots_summary"]["processing"] == 0
    # After the request the slot keeps its tokens (prompt plus generated).
    kept = [s.get("n_prompt_tokens", 0) for s in done["slots"]]
    assert max(kept) >= N_PREDICT, json.dumps(done["slots"])
    assert slot_paths, "no patch touched /slots"
    assert mirror.models["upstream"] == model.snapshot()
