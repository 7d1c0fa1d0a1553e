"""The HTTP side of the read models: snapshots, ETags, the stream, the dashboard."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sidecar.state.views import etag_matches
from tests.state.conftest import FIRST_ID, Producers, make_hub, serve
from tests.state.sse_client import Mirror, StreamReader

# Windows of 256 KiB changes allowed before an unread stream must fall behind:
# far more than loopback socket buffers hold.
MAX_WINDOWS = 400


async def test_views_list_names_every_model(producers: Producers) -> None:
    """GET /state lists each model with its version and where to read it."""
    async with serve(make_hub(producers)) as client:
        response = await client.get("/state")
        doc = await response.json()
    assert set(doc["models"]) == {
        "cache",
        "routes",
        "coalescing",
        "upstream",
        "policy",
        "artifacts",
    }
    assert doc["models"]["cache"] == {"version": 0, "href": "/state/cache"}
    assert doc["stream"] == "/state/stream"


async def test_views_model_has_strong_etag(producers: Producers) -> None:
    """A snapshot carries a strong (not W/) quoted ETag."""
    async with serve(make_hub(producers)) as client:
        response = await client.get("/state/cache")
        etag = response.headers["ETag"]
        doc = await response.json()
    assert etag.startswith('"') and etag.endswith('"')
    assert doc["total"]["lookups"] == 0


async def test_views_model_if_none_match_gives_304(producers: Producers) -> None:
    """A matching If-None-Match gets 304 with the same ETag and no body."""
    async with serve(make_hub(producers)) as client:
        etag = (await client.get("/state/cache")).headers["ETag"]
        response = await client.get("/state/cache", headers={"If-None-Match": etag})
        body = await response.read()
    assert (response.status, response.headers["ETag"], body) == (304, etag, b"")


async def test_views_model_change_changes_etag(producers: Producers) -> None:
    """After a change the old ETag no longer matches: 200 with the new state."""
    async with serve(make_hub(producers)) as client:
        etag = (await client.get("/state/cache")).headers["ETag"]
        producers.cache.record(None, "chat", "hit")
        response = await client.get("/state/cache", headers={"If-None-Match": etag})
        doc = await response.json()
    assert response.status == 200
    assert response.headers["ETag"] != etag
    assert doc["total"]["hits"] == 1


def test_views_etag_matches_lists_weak_and_star() -> None:
    """If-None-Match uses weak comparison over a list; * matches anything."""
    assert etag_matches('"a", W/"b"', '"b"')
    assert etag_matches("*", '"x"')
    assert not etag_matches('"a"', '"b"')
    assert not etag_matches("", '"b"')


async def test_views_unknown_model_is_404_json(producers: Producers) -> None:
    """An unknown model is a 404 in the OpenAI error shape."""
    async with serve(make_hub(producers)) as client:
        response = await client.get("/state/nope")
        doc = await response.json()
    assert response.status == 404
    assert doc["error"]["code"] == "not_found"


async def test_views_stream_is_not_read_as_a_model(producers: Producers) -> None:
    """/state/stream is the stream, not a model called 'stream'."""
    async with serve(make_hub(producers)) as client:
        async with client.get("/state/stream?models=cache") as response:
            assert response.headers["Content-Type"] == "text/event-stream"


async def test_views_stream_headers_and_retry_hint(producers: Producers) -> None:
    """The stream disables proxy buffering and caching and sends retry first."""
    async with serve(make_hub(producers, retry_s=1.5)) as client:
        async with client.get("/state/stream?models=cache") as response:
            reader = StreamReader(response)
            await reader.next()
            assert response.headers["X-Accel-Buffering"] == "no"
            assert response.headers["Cache-Control"] == "no-cache"
            assert response.headers["X-Sidecar-Resume"] == "snapshot"
            assert response.headers["X-Sidecar-Resume-Reason"] == "new"
            assert reader.retry == 1500


async def test_views_stream_snapshots_in_order_then_patch(producers: Producers) -> None:
    """One snapshot per model asked for, in that order, then patches."""
    hub = make_hub(producers)
    async with serve(hub) as client:
        async with client.get("/state/stream?models=routes,cache") as response:
            reader = StreamReader(response)
            snapshots = await reader.take(2)
            producers.cache.record("memory", "chat", "hit")
            hub.tick()
            patch = await reader.next()
    assert [(e.event, e.json()["model"]) for e in snapshots] == [
        ("snapshot", "routes"),
        ("snapshot", "cache"),
    ]
    assert (patch.event, patch.id) == ("patch", str(FIRST_ID + 1))
    assert patch.json()["model"] == "cache"


async def test_views_stream_without_models_gets_all(producers: Producers) -> None:
    """No models= parameter subscribes to every model."""
    hub = make_hub(producers)
    async with serve(hub) as client:
        async with client.get("/state/stream") as response:
            events = await StreamReader(response).take(len(hub.names()))
    assert [e.json()["model"] for e in events] == hub.names()


async def test_views_stream_coalesces_thirty_changes_into_one_patch(
    producers: Producers,
) -> None:
    """With the hub's own timer, 30 changes in a window arrive as one patch."""
    hub = make_hub(producers, coalesce_s=0.05)
    async with serve(hub, start=True) as client:
        async with client.get("/state/stream?models=cache") as response:
            reader = StreamReader(response)
            mirror = Mirror()
            mirror.apply(await reader.next())
            for _ in range(30):
                producers.cache.record("memory", "chat", "hit")
            event = await reader.next()
            mirror.apply(event)
    assert event.event == "patch"
    assert mirror.models["cache"]["routes"]["chat"]["hits"] == 30


@pytest.mark.parametrize("query", ["models=cache,nope", "models=", "models=,"])
async def test_views_stream_bad_models_is_400_json(
    producers: Producers, query: str
) -> None:
    """Unknown or empty model lists are a 400 in the OpenAI error shape."""
    async with serve(make_hub(producers)) as client:
        response = await client.get(f"/state/stream?{query}")
        doc = await response.json()
    assert response.status == 400
    assert doc["error"]["type"] == "invalid_request_error"
    assert doc["error"]["code"] == "bad_request"


async def test_views_stream_header_resume_replays_without_snapshot(
    producers: Producers,
) -> None:
    """Last-Event-ID inside the buffer gets only the missed patches."""
    hub = make_hub(producers)
    producers.cache.record(None, "chat", "hit")
    hub.tick()
    async with serve(hub) as client:
        headers = {"Last-Event-ID": str(FIRST_ID)}
        async with client.get(
            "/state/stream?models=cache", headers=headers
        ) as response:
            event = await StreamReader(response).next()
            assert response.headers["X-Sidecar-Resume"] == "replayed"
    assert (event.event, event.id) == ("patch", str(FIRST_ID + 1))


async def test_views_stream_query_resume_replays(producers: Producers) -> None:
    """Without the header, the last_event_id query parameter resumes."""
    hub = make_hub(producers)
    producers.cache.record(None, "chat", "hit")
    hub.tick()
    async with serve(hub) as client:
        url = f"/state/stream?models=cache&last_event_id={FIRST_ID}"
        async with client.get(url) as response:
            event = await StreamReader(response).next()
    assert event.event == "patch"


async def test_views_stream_header_wins_over_query(producers: Producers) -> None:
    """A malformed header is not rescued by a valid query parameter."""
    hub = make_hub(producers)
    async with serve(hub) as client:
        url = f"/state/stream?models=cache&last_event_id={FIRST_ID}"
        headers = {"Last-Event-ID": "garbage"}
        async with client.get(url, headers=headers) as response:
            event = await StreamReader(response).next()
            assert response.headers["X-Sidecar-Resume-Reason"] == "malformed"
    assert event.event == "snapshot"


@pytest.mark.parametrize(
    ("last_id", "reason"),
    [("x1", "malformed"), (str(FIRST_ID + 99), "future"), ("5", "unknown")],
)
async def test_views_stream_bad_resume_gets_snapshot_and_says_why(
    producers: Producers, last_id: str, reason: str
) -> None:
    """A resume id the hub cannot honour gets a fresh snapshot, never a 500."""
    async with serve(make_hub(producers)) as client:
        headers = {"Last-Event-ID": last_id}
        async with client.get(
            "/state/stream?models=cache", headers=headers
        ) as response:
            event = await StreamReader(response).next()
            assert response.status == 200
            assert response.headers["X-Sidecar-Resume"] == "snapshot"
            assert response.headers["X-Sidecar-Resume-Reason"] == reason
    assert event.event == "snapshot"


async def test_views_stream_ceiling_is_503_with_retry_after(
    producers: Producers,
) -> None:
    """Past the subscriber ceiling the stream is refused with Retry-After."""
    async with serve(make_hub(producers, max_subscribers=1, retry_s=2.0)) as client:
        async with client.get("/state/stream?models=cache") as first:
            await StreamReader(first).next()
            refused = await client.get("/state/stream?models=cache")
            doc = await refused.json()
    assert refused.status == 503
    assert refused.headers["Retry-After"] == "2"
    assert doc["error"]["code"] == "overloaded"


async def test_views_stream_shutdown_sends_final_event_and_ends(
    producers: Producers,
) -> None:
    """Closing the hub ends every stream with a shutdown event, then EOF."""
    hub = make_hub(producers)
    async with serve(hub) as client:
        async with client.get("/state/stream?models=cache") as response:
            reader = StreamReader(response)
            await reader.next()
            await hub.close()
            last = await reader.next()
            with pytest.raises(EOFError):
                await reader.next()
    assert last.event == "shutdown"


async def test_views_stream_disconnect_unsubscribes(producers: Producers) -> None:
    """A client that goes away is dropped at the next keep-alive."""
    gone = asyncio.Event()

    def on_count(n: int) -> None:
        if n == 0:
            gone.set()

    hub = make_hub(
        producers, coalesce_s=0.01, idle_publish_s=0.02, on_subscribers=on_count
    )
    async with serve(hub, start=True) as client:
        response = await client.get("/state/stream?models=cache")
        await StreamReader(response).next()
        response.close()
        async with asyncio.timeout(5):
            await gone.wait()
    assert hub.subscriber_count == 0


async def test_views_stream_head_is_not_allowed(producers: Producers) -> None:
    """HEAD on the stream would open a subscription for nothing: 405."""
    async with serve(make_hub(producers)) as client:
        response = await client.head("/state/stream")
    assert response.status == 405


async def test_views_dashboard_serves_page_and_scripts(producers: Producers) -> None:
    """The page and both scripts are served, with a CSP that allows only self."""
    async with serve(make_hub(producers)) as client:
        page = await client.get("/dashboard")
        html = await page.text()
        scripts = [
            await client.get(f"/dashboard/{name}")
            for name in ("rfc6902.js", "dashboard.js")
        ]
    assert page.headers["Content-Type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert 'src="dashboard/rfc6902.js"' in html
    assert all(s.status == 200 for s in scripts)
    assert all(s.headers["Content-Type"].startswith("text/javascript") for s in scripts)


class BlobModel:
    """A model whose every change is large: fills a socket in a few windows."""

    def __init__(self) -> None:
        self.version = 0

    def snapshot(self) -> dict[str, Any]:
        return {"blob": f"{self.version:08d}" * 32_768, "n": self.version}


async def test_views_slow_reader_resyncs_without_slowing_others(
    producers: Producers,
) -> None:
    """A client that stops reading is resynced; the reading client gets every patch."""
    hub = make_hub(producers, subscriber_queue=4)
    blob = BlobModel()
    hub.register("blob", blob)
    async with serve(hub) as client:
        async with (
            client.get("/state/stream?models=blob") as slow,
            client.get("/state/stream?models=blob") as fast,
        ):
            fast_reader = StreamReader(fast)
            fast_mirror = Mirror()
            fast_mirror.apply(await fast_reader.next())
            slow_sub = hub.subscribers()[0]
            for _ in range(MAX_WINDOWS):
                blob.version += 1
                hub.tick()
                fast_mirror.apply(await fast_reader.next())
                if slow_sub.needs_resync:
                    break
            assert slow_sub.needs_resync, "the unread stream never fell behind"
            assert fast_mirror.patches == blob.version
            blob.version += 1
            hub.tick()
            slow_mirror = Mirror()
            slow_reader = StreamReader(slow)
            for _ in range(MAX_WINDOWS + 10):
                slow_mirror.apply(await slow_reader.next())
                if slow_mirror.last_id == str(hub.last_event_id):
                    break
    assert slow_mirror.snapshots == 2
    assert slow_mirror.models["blob"] == blob.snapshot()
