"""The dashboard in headless Chromium: live counters, resume, and its applier."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.state import StateHub
from tests.state import patch_corpus
from tests.state.conftest import Producers, make_hub, serve

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]
STATIC = Path(__file__).resolve().parents[2] / "sidecar" / "static"
WAIT_MS = 10_000

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason=f"{CHROMIUM} is not installed (Debian's chromium)",
)


@contextlib.asynccontextmanager
async def browser_page() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS
        )
        try:
            yield await browser.new_page()
        finally:
            await browser.close()


async def wait_for(page: Any, expression: str) -> None:
    # An arrow function, not a bare expression: Playwright evals bare
    # expressions inside the page, which the dashboard's CSP forbids.
    await page.wait_for_function(f"() => {expression}", timeout=WAIT_MS)


def drop_streams(hub: StateHub) -> int:
    """Cut every stream's connection, as a crashing proxy in front would."""
    subscribers = hub.subscribers()
    for sub in subscribers:
        assert sub.abort is not None
        sub.abort()
    return len(subscribers)


async def test_dashboard_counter_changes_after_traffic(producers: Producers) -> None:
    """Requests made after the page loaded show up in its request counter."""
    hub = make_hub(producers, coalesce_s=0.05)
    async with serve(hub, start=True) as client, browser_page() as page:
        await page.goto(str(client.make_url("/dashboard")))
        await wait_for(
            page, "document.getElementById('v-requests').textContent === '0'"
        )
        for _ in range(3):
            producers.routes.observe("chat", 200, 0.02)
        producers.upstream.update(slots_summary={"total": 2, "processing": 1})
        await wait_for(
            page, "document.getElementById('v-requests').textContent === '3'"
        )
        await wait_for(
            page, "document.getElementById('v-slots').textContent === '1 / 2'"
        )


async def test_dashboard_resumes_after_drop_without_snapshot(
    producers: Producers,
) -> None:
    """A dropped stream is resumed from Last-Event-ID: missed patches, no snapshot."""
    hub = make_hub(producers, coalesce_s=0.05, retry_s=0.2)
    models = len(hub.names())
    async with serve(hub, start=True) as client, browser_page() as page:
        resumes: list[str] = []
        page.on(
            "response",
            lambda r: (
                resumes.append(r.headers.get("x-sidecar-resume", ""))
                if "state/stream" in r.url
                else None
            ),
        )
        await page.goto(str(client.make_url("/dashboard")))
        await wait_for(page, f"window.sidecarDashboard.stats.snapshots === {models}")
        producers.routes.observe("chat", 200, 0.02)
        await wait_for(
            page, "document.getElementById('v-requests').textContent === '1'"
        )

        assert drop_streams(hub) == 1
        producers.routes.observe("chat", 200, 0.02)
        producers.routes.observe("chat", 200, 0.02)
        await wait_for(page, "window.sidecarDashboard.stats.opens >= 2")
        await wait_for(
            page, "document.getElementById('v-requests').textContent === '3'"
        )
        stats = await page.evaluate("window.sidecarDashboard.stats")
    assert stats["snapshots"] == models
    assert stats["resyncs"] == 0
    assert resumes[:2] == ["snapshot", "replayed"]


async def test_dashboard_applier_agrees_with_jsonpatch() -> None:
    """The page's RFC 6902 applier gives jsonpatch's result, or fails where it fails."""
    cases = patch_corpus.WRITTEN + patch_corpus.generated(400)
    async with browser_page() as page:
        await page.set_content("<!doctype html><title>applier</title>")
        await page.add_script_tag(path=str(STATIC / "rfc6902.js"))
        # JSON text both ways: keys such as "__proto__" must stay data.
        results = json.loads(
            await page.evaluate(
                """(text) => JSON.stringify(JSON.parse(text).map((c) => {
                    try { return {ok: true, doc: RFC6902.apply(c.doc, c.patch)}; }
                    catch (e) { return {ok: false}; }
                }))""",
                json.dumps(cases),
            )
        )
    disagreements = []
    for case, result in zip(cases, results, strict=True):
        want = patch_corpus.expected(case)
        got = result["doc"] if result["ok"] else None
        if json.dumps(want, sort_keys=True) != json.dumps(got, sort_keys=True):
            disagreements.append((case, want, got))
    assert disagreements == []


async def test_dashboard_applier_leaves_input_unchanged_on_failure() -> None:
    """A patch that fails halfway changes nothing (RFC 6902 section 5)."""
    async with browser_page() as page:
        await page.set_content("<!doctype html><title>applier</title>")
        await page.add_script_tag(path=str(STATIC / "rfc6902.js"))
        doc = await page.evaluate(
            """() => {
                const doc = {a: 1};
                try { RFC6902.apply(doc, [{op: "add", path: "/b", value: 2},
                                          {op: "remove", path: "/zz"}]); } catch (e) {}
                return doc;
            }"""
        )
    assert doc == {"a": 1}
